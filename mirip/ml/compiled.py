"""The frozen extractor's backbone, compiled: ``torch.compile`` with static shapes and a measured SDPA backend.

Stage one runs one backbone over fixed-size batches, the case ``torch.compile`` serves best:
shapes never change (``dynamic=False``), so one compilation (tens of seconds for DINOv2-large)
is paid once per process and every batch after it runs fused kernels. Attention goes through
``scaled_dot_product_attention``; which kernel is fastest (flash, cuDNN, memory-efficient, math)
depends on the card, head dim and sequence length, so ``choose_sdpa_backend`` times each one
the device offers on a real batch and keeps the fastest.

Compiling costs time up front, so small jobs skip it: ``should_compile`` compiles only from
``min_images`` images on (the break-even ``scripts/gpu_check.py`` measures: compile seconds over
the seconds saved per image). The extractor itself is untouched: ``compile_extractor`` swaps the
backbone module's ``forward`` for the compiled one (state dict, hooks and fingerprint unchanged)
and ``uncompile`` puts it back. Features must not change beyond the precision's tolerance; the
compiled path is checked against eager on CPU (tests) and on the GPU (``gpu_check``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
# Below this many images extraction runs eager: compilation would cost more than it saves. A conservative
# placeholder until the GPU check measures it (compile_s / saved seconds per image); see docs/benchmarks.md.
DEFAULT_MIN_IMAGES = 2000
COMPILE_MODES = ("off", "auto", "on")
# Compiled features may differ from eager ones by the precision's rounding, no more (relative L2 error of a batch):
# bf16 keeps ~3 significant digits.
TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2, "fp32": 1e-4}


class CompileFailed(RuntimeError):
    """The backbone could not be compiled, or its compiled features left the precision's tolerance."""

    extra: Dict[str, object] = {}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))
SDPA_CHOICES = ("auto",) + SDPA_BACKENDS  # auto: torch's own choice (measured when compiling on CUDA)


def _backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def sdpa_context(name: Optional[str]):
    """Restrict scaled_dot_product_attention to one backend (None: torch's own choice)."""
    if name is None:
        return contextlib.nullcontext()
    if name not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {name!r}; use one of {', '.join(SDPA_BACKENDS)}")
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([_backend_enum(name)])


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()  # CPU-GPU sync point: time the work, not its queueing


def time_call(fn: Callable[[], object], device: str, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def choose_sdpa_backend(extractor, images: torch.Tensor, backends: Sequence[str] = SDPA_BACKENDS,
                        repeats: int = 3) -> Dict[str, object]:
    """Time ``extractor.extract(images)`` under each SDPA backend; {"chosen", "seconds": {name: s or None},
    "unavailable": {name: reason}}. A backend the device or dtype lacks raises, and is recorded as unavailable."""
    seconds: Dict[str, Optional[float]] = {}
    unavailable: Dict[str, str] = {}
    device = str(extractor.device)
    for name in backends:
        try:
            with sdpa_context(name):
                seconds[name] = time_call(lambda: extractor.extract(images), device, repeats=repeats)
        except (RuntimeError, ValueError) as exc:  # "No available kernel", unsupported dtype/head dim
            seconds[name] = None
            unavailable[name] = str(exc).splitlines()[0][:200]
    timed = {k: v for k, v in seconds.items() if v is not None}
    if not timed:
        raise RuntimeError(f"no SDPA backend ran on {device}: {unavailable}")
    return {"chosen": min(timed, key=timed.get), "seconds": seconds, "unavailable": unavailable}


@dataclass
class CompileInfo:
    """What was compiled and how: recorded in benchmark output and the extraction summary."""

    compiled: bool
    reason: str
    sdpa_backend: Optional[str] = None
    backend: str = "inductor"
    mode: Optional[str] = None
    compile_seconds: Optional[float] = None  # the first call's time: tracing + code generation (once per process)
    extra: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def can_compile(extractor) -> Optional[str]:
    """None when the extractor can be compiled, else why not."""
    if not getattr(extractor, "frozen", True):
        return "the backbone is trainable (compiling is for the frozen extractor)"
    last = getattr(extractor, "num_layers", None)
    if last is not None and any(b != last for b in getattr(extractor, "entry_blocks", [last])):
        # Intermediate blocks are read by forward hooks registered per call: each call would recompile.
        return "the feature spec reads intermediate blocks (hooks); only last-block features are compiled"
    return None


def should_compile(mode: str, num_images: int, min_images: int = DEFAULT_MIN_IMAGES) -> bool:
    """``on`` / ``off`` as asked; ``auto`` from ``min_images`` images on (the measured break-even)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
    return mode == "on" or (mode == "auto" and int(num_images) >= int(min_images))


def compile_extractor(extractor, *, sdpa_backend: Optional[str] = None, backend: str = "inductor",
                      mode: Optional[str] = None, warmup_images: Optional[torch.Tensor] = None,
                      batch_size: Optional[int] = None) -> CompileInfo:
    """Compile the extractor's backbone forward in place (static shapes). With ``warmup_images`` the first
    (compiling) call runs now and its time is ``compile_seconds``; otherwise compilation happens on first use.
    ``batch_size``: smaller batches (a run's last one) are padded to it and larger ones split into chunks of it,
    so one shape is ever compiled (images are independent in the backbone: padding rows change no other row)."""
    reason = can_compile(extractor)
    if reason is not None:
        return CompileInfo(False, reason, sdpa_backend=sdpa_backend, backend=backend, mode=mode)
    backbone = extractor.backbone
    uncompile(extractor)
    eager_forward = backbone.forward
    compiled = torch.compile(eager_forward, dynamic=False, backend=backend, mode=mode)

    def forward(*args, **kwargs):
        # The SDPA choice holds at trace time and on every call, so the compiled graph keeps that kernel.
        with sdpa_context(sdpa_backend):
            return compiled(*args, **kwargs)

    forward._mirip_eager_forward = eager_forward  # type: ignore[attr-defined]
    backbone.forward = forward
    if batch_size:
        eager_extract = extractor._extract

        def padded(images: torch.Tensor) -> torch.Tensor:
            n = images.shape[0]
            if n > batch_size:  # a larger batch runs as compiled-size chunks, never as a new shape
                return torch.cat([padded(images[i:i + batch_size]) for i in range(0, n, batch_size)])
            if n == batch_size:
                return eager_extract(images)
            pad = images.new_zeros((batch_size - n,) + tuple(images.shape[1:]))
            return eager_extract(torch.cat([images, pad]))[:n]

        padded._mirip_padded = True  # type: ignore[attr-defined]
        extractor._extract = padded
    info = CompileInfo(True, "compiled", sdpa_backend=sdpa_backend, backend=backend, mode=mode,
                       extra={"batch_size": batch_size})
    if warmup_images is not None:
        _sync(str(extractor.device))
        t0 = time.perf_counter()
        extractor.extract(warmup_images)
        _sync(str(extractor.device))
        info.compile_seconds = time.perf_counter() - t0
    return info


def uncompile(extractor) -> None:
    """Back to the eager forward (no-op when not compiled)."""
    forward = extractor.backbone.__dict__.get("forward")
    if forward is not None and hasattr(forward, "_mirip_eager_forward"):
        del extractor.backbone.forward
    if hasattr(extractor.__dict__.get("_extract"), "_mirip_padded"):
        del extractor._extract


def is_compiled(extractor) -> bool:
    return hasattr(extractor.backbone.__dict__.get("forward"), "_mirip_eager_forward")


def break_even_images(compile_seconds: float, eager_s_per_image: float, compiled_s_per_image: float) -> Optional[int]:
    """Images from which compiling pays for itself; None when compiled is not faster."""
    saved = eager_s_per_image - compiled_s_per_image
    if saved <= 0:
        return None
    return int(compile_seconds / saved) + 1


# --- what a run asks for: stage one's --compile / --sdpa-backend, full-image scoring's --compile ----------
def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def compile_decision(mode: str, num_images: int, device, min_images: int = DEFAULT_MIN_IMAGES) -> Tuple[bool, str]:
    """Whether a stage-one run of ``num_images`` images compiles, and why, in the words of its summary.

    ``auto`` compiles only on CUDA and only from the break-even on: compiling a CPU backbone has not been
    measured to pay, and a small job would spend longer compiling than it saves."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
    if mode != "auto":
        return mode == "on", f"{mode}: asked for (--compile {mode})"
    if not _is_cuda(device):
        return False, (f"auto: not compiled on {device} (compiling a CPU backbone has not been measured to pay; "
                       "--compile on forces it)")
    if not should_compile(mode, num_images, min_images):
        return False, f"auto: {num_images} images < break-even {min_images}"
    return True, f"auto: {num_images} images >= break-even {min_images}"


def check_sdpa_backend(extractor, name: Optional[str], image_size: int) -> None:
    """Refuse, before any image is read, an SDPA backend this device, dtype and backbone cannot run
    (one forward of a blank image under it); None (torch's own choice) always runs."""
    if name is None:
        return
    if name not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {name!r}; use auto or one of {', '.join(SDPA_BACKENDS)}")
    probe = torch.zeros(1, 3, image_size, image_size, device=extractor.device)
    try:
        with sdpa_context(name):
            extractor.extract(probe)
    except RuntimeError as exc:
        raise ValueError(f"SDPA backend {name!r} cannot run on {extractor.device} in {extractor.precision} with "
                         f"this backbone ({str(exc).splitlines()[0][:160]}); use --sdpa-backend auto (torch's own "
                         f"choice) or another of {', '.join(SDPA_BACKENDS)}") from None


def _probe_images(extractor, batch_size: int, image_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(extractor.device)


def compile_checked(extractor, probe: Optional[torch.Tensor], **kwargs) -> CompileInfo:
    """``compile_extractor(extractor, warmup_images=probe, **kwargs)``, then the compiled features on ``probe``
    checked against eager ones (relative L2 within ``TOLERANCE`` of the extractor's precision).

    Any fault, a compiler error or a mismatch, leaves the extractor eager and raises ``CompileFailed`` with a
    one-line reason (``.extra`` holds the measured error): a compiler fault must never reach a cache or a score.
    Without a probe there is nothing to check against, and compilation happens on first use."""
    extra: Dict[str, object] = {}
    try:
        ref = None
        if probe is not None:
            with sdpa_context(kwargs.get("sdpa_backend")):
                ref = extractor.extract(probe)  # eager: the reference
        info = compile_extractor(extractor, warmup_images=probe, **kwargs)
        if ref is not None and info.compiled:
            # Re-run on the probe: the warm-up call above paid the compilation.
            error = relative_error(extractor.extract(probe), ref)
            precision = getattr(extractor, "precision", "fp32")
            tol = TOLERANCE.get(precision, 1e-4)
            extra.update(compiled_vs_eager_relative_l2=error, tolerance=tol)
            info.extra.update(extra)
            if not error <= tol:
                raise CompileFailed(f"compiled features differ from eager ones by {error:.2e} (relative L2 on a "
                                    f"probe batch; tolerance {tol:g} for {precision})")
        return info
    except Exception as exc:  # noqa: BLE001 - any compiler fault, reported in one line
        uncompile(extractor)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        failed = CompileFailed(first if isinstance(exc, CompileFailed) else f"{type(exc).__name__}: {first}")
        failed.extra = extra
        raise failed from exc


def prepare_extractor(extractor, *, compile: str, num_images: int, batch_size: int, image_size: int,
                      sdpa_backend: str = "auto", backend: str = "inductor", mode: Optional[str] = None,
                      min_images: int = DEFAULT_MIN_IMAGES, warmup: bool = True) -> CompileInfo:
    """Stage one's ``--compile`` / ``--sdpa-backend`` applied to ``extractor`` for ``num_images`` images in
    batches of ``batch_size``: compiled in place (static shapes, short batches padded) or left eager, and why.

    ``sdpa_backend`` auto is torch's own choice, measured with ``choose_sdpa_backend`` when compiling on CUDA;
    a named one is checked first (``check_sdpa_backend``) and the caller runs eager batches under
    ``sdpa_context(info.sdpa_backend)``. A spec that reads intermediate blocks runs eager, with the reason.
    With ``warmup`` the compiling call runs now on a synthetic batch, so ``compile_seconds`` is its own figure.
    Nothing here touches the weights or what the fingerprint records: compiled and eager rows share a cache."""
    if sdpa_backend not in SDPA_CHOICES:
        raise ValueError(f"unknown SDPA backend {sdpa_backend!r}; use one of {', '.join(SDPA_CHOICES)}")
    chosen = None if sdpa_backend == "auto" else sdpa_backend
    check_sdpa_backend(extractor, chosen, image_size)
    extra: Dict[str, object] = {"asked": compile, "images": int(num_images), "break_even_images": int(min_images),
                                "batch_size": int(batch_size), "sdpa": "torch's own choice" if chosen is None
                                else "asked for"}
    wanted, reason = compile_decision(compile, num_images, extractor.device, min_images)
    why_not = can_compile(extractor) if wanted else None
    if not wanted or why_not is not None:
        reason = reason if why_not is None else f"{reason}, but {why_not}: runs eager"
        return CompileInfo(False, reason, sdpa_backend=chosen, backend=backend, mode=mode, extra=extra)
    if chosen is None and _is_cuda(extractor.device):
        measured = choose_sdpa_backend(extractor, _probe_images(extractor, batch_size, image_size), repeats=2)
        chosen, extra["sdpa"], extra["sdpa_seconds"] = measured["chosen"], "measured", measured["seconds"]
    probe = _probe_images(extractor, batch_size, image_size) if warmup else None
    try:
        info = compile_checked(extractor, probe, sdpa_backend=chosen, backend=backend, mode=mode,
                               batch_size=batch_size)
    except CompileFailed as exc:
        if compile == "on":
            raise CompileFailed(f"--compile on: {exc}. Run with --compile off (eager) or auto (falls back to "
                                "eager)") from exc
        return CompileInfo(False, f"{reason}, but compiling failed ({exc}): runs eager", sdpa_backend=chosen,
                           backend=backend, mode=mode, extra={**extra, **exc.extra})
    info.reason = reason
    info.extra.update(extra)
    return info


def describe(info: Optional[Dict[str, object]]) -> str:
    """One summary line from ``CompileInfo.to_dict()``: whether it compiled, why, the SDPA backend, compile time."""
    if not info:
        return "compile: not recorded"
    extra = info.get("extra") or {}
    sdpa = info.get("sdpa_backend") or "torch's own choice"
    how = f" ({extra['sdpa']})" if extra.get("sdpa") and info.get("sdpa_backend") else ""
    text = f"compile: {'yes' if info.get('compiled') else 'no'} ({info.get('reason')}); SDPA backend {sdpa}{how}"
    if info.get("compiled"):
        text += f"; torch.compile backend {info.get('backend')}, mode {info.get('mode') or 'default'}"
        if extra.get("batch_size"):
            text += f", batch {extra['batch_size']} (shorter batches padded)"
        seconds = info.get("compile_seconds")
        text += f"; compile {seconds:.1f} s once" if seconds is not None else "; compiled on first use"
    return text


def full_image_mode(device, mode: Optional[str] = None) -> Optional[str]:
    """torch.compile mode for full-image scoring: "reduce-overhead" (CUDA graphs) on CUDA, the default on CPU."""
    return mode or ("reduce-overhead" if _is_cuda(device) else None)


def compile_full_image(extractor, *, batch_size: int, image_size: Optional[int] = None, backend: str = "inductor",
                       mode: Optional[str] = None, sdpa_backend: Optional[str] = None,
                       warmup_images: Optional[torch.Tensor] = None) -> CompileInfo:
    """Full-image scoring compiled at one fixed batch size: every batch is padded (or split) to ``batch_size``,
    so one compiled graph (one CUDA graph under "reduce-overhead") serves them all. Warm-up (the compiling call,
    timed as ``compile_seconds``) on ``warmup_images``, else on a synthetic batch when ``image_size`` is given,
    and checked against eager there (``compile_checked``: a fault raises ``CompileFailed``, the scorer stays
    eager)."""
    if warmup_images is None and image_size is not None:
        warmup_images = _probe_images(extractor, batch_size, image_size)
    info = compile_checked(extractor, warmup_images, sdpa_backend=sdpa_backend, backend=backend,
                           mode=full_image_mode(extractor.device, mode), batch_size=batch_size)
    info.reason = (f"on: scoring compiled at batch {batch_size}" if info.compiled
                   else f"on, but {info.reason}: scores eager")
    info.extra["batch_size"] = int(batch_size)
    return info
