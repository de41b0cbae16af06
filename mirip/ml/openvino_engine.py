"""OpenVINO as the engine of a frozen extractor: the same backbone + feature bank, compiled for the CPU.

``benchmark.py --only engines`` measured OpenVINO f32 at 1.59-3.72x torch fp32 (batch 1-8, DINOv2-S/14 at
224 px, an AVX2 CPU) with features at cosine >= 0.9999998 (docs/benchmarks.md, issue 30), so scoring,
extraction and the service may run on it (``--engine openvino``). ``attach_openvino`` converts the
extractor's forward (``ov.convert_model``: backbone, hooks of the bank's blocks, final norm, pooling) with the
batch left dynamic and the image size fixed, and makes ``DINOv2FeatureExtractor.extract`` call the compiled
model instead of torch. The torch module stays loaded: it is what gets converted, and explanations need its
gradients.

Converting takes seconds (minutes for a large backbone), so the IR is saved under a cache directory
(``MIRIP_OPENVINO_CACHE``, default ``~/.cache/mirip/openvino``) keyed by everything that changes the graph:
the backbone's identity and weights, the image size, the bank's entries and blocks, the family's token
layout, and the openvino / torch / transformers / mirip versions. Entry scales are applied after the compiled
model, as torch applies them after the bank, so they are not part of the graph or the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from mirip.common.atomic import write_atomic
from mirip.common.package import package_version
from mirip.ml.feature_extractor import DINOv2FeatureExtractor

ENGINES = ("torch", "openvino")
CACHE_ENV = "MIRIP_OPENVINO_CACHE"
INSTALL_HINT = 'pip install "mirip[openvino]"'
# OpenVINO's names for the precisions its CPU plugin runs, in mirip's words.
PLUGIN_PRECISION = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
HINTS = {"fp32": "f32", "bf16": "bf16"}


def import_openvino():
    """The openvino module, or an ImportError that says how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(f"--engine openvino needs the openvino package, which is not installed ({exc}); "
                          f'install it with: {INSTALL_HINT}') from None
    return openvino


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mirip", "openvino")


def weights_digest(extractor: DINOv2FeatureExtractor) -> str:
    """A cheap identity of the backbone's weights: every tensor's name, shape and up to 256 of its values.

    Two checkpoints of one architecture differ in (nearly) every tensor, so a sample tells them apart without
    hashing gigabytes at every start."""
    h = hashlib.sha256()
    for name, t in extractor.backbone.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def graph_key(extractor: DINOv2FeatureExtractor, image_size: int) -> dict:
    """Everything the converted graph depends on, as plain values."""
    import transformers

    ov = import_openvino()
    return {"backbone": extractor.info.to_dict(), "weights": weights_digest(extractor),
            "family": extractor.family_facts(), "image_size": int(image_size),
            "entries": list(extractor.entry_names), "entry_blocks": [int(b) for b in extractor.entry_blocks],
            "openvino": ov.__version__, "torch": str(torch.__version__),
            "transformers": transformers.__version__, "mirip": package_version()}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


class _Bank(torch.nn.Module):
    """The extractor's backbone + bank, unscaled, as a module ``ov.convert_model`` can trace."""

    def __init__(self, extractor: DINOv2FeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor.bank_features(images)


def convert(extractor: DINOv2FeatureExtractor, image_size: int, example_batch: int = 2):
    """The extractor's bank as an OpenVINO model: batch dynamic (-1), 3 x image_size x image_size fixed."""
    ov = import_openvino()
    if extractor.weight_dtype != torch.float32:
        raise ValueError(f"the OpenVINO engine converts fp32 weights; this extractor holds {extractor.weight_dtype} "
                         "(build it with precision='fp32': the plugin picks its own precision)")
    example = torch.zeros(example_batch, 3, image_size, image_size)
    with warnings.catch_warnings(), torch.no_grad():
        # The trace's warnings are about Python-level shape checks that hold for every batch.
        warnings.simplefilter("ignore")
        return ov.convert_model(_Bank(extractor).eval(), example_input=example,
                                input=[(-1, 3, image_size, image_size)])


@dataclass
class EngineInfo:
    """How the engine came to be: the IR file, whether it was converted now or read, what the plugin runs."""

    ir_path: str
    converted: bool
    precision: str  # fp32 / bf16, as the CPU plugin runs it
    key: str

    def line(self) -> str:
        how = "converted and cached" if self.converted else "read from the cache (no conversion)"
        return f"engine: openvino ({self.precision} on the CPU plugin), IR {how}: {self.ir_path}"


class OpenVINOBank:
    """A compiled model called like the torch bank: (B, 3, S, S) float tensor -> (B, D) float32, unscaled."""

    def __init__(self, compiled, image_size: int, info: EngineInfo):
        self.compiled, self.image_size, self.info = compiled, int(image_size), info

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"the OpenVINO engine was built for (B, 3, {self.image_size}, {self.image_size}) "
                             f"images, got {tuple(images.shape)}")
        out = self.compiled(images.detach().float().cpu().numpy())[0]
        return torch.from_numpy(np.array(out, dtype=np.float32))


def build_openvino(extractor: DINOv2FeatureExtractor, image_size: int, cache_dir: Optional[str] = None,
                   precision: Optional[str] = None, threads: Optional[int] = None) -> OpenVINOBank:
    """The extractor's bank compiled for the CPU, its IR read from ``cache_dir`` or converted and saved there.

    ``precision``: fp32 or bf16 as the plugin's precision hint; None leaves the plugin's default for the chip
    (bf16 where the CPU has it, f32 elsewhere)."""
    ov = import_openvino()
    key = graph_key(extractor, image_size)
    digest = key_hash(key)
    folder = os.path.join(cache_dir or default_cache_dir(), digest)
    ir_path = os.path.join(folder, "bank.xml")
    converted = not os.path.exists(ir_path)
    if converted:
        model = convert(extractor, image_size)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"bank.tmp{os.getpid()}.xml")
        ov.save_model(model, tmp, compress_to_fp16=False)  # fp16 weights would change the features
        write_atomic(os.path.join(folder, "key.json"), json.dumps(key, indent=1, sort_keys=True, default=str))
        os.replace(tmp[:-4] + ".bin", ir_path[:-4] + ".bin")  # the weights first: an .xml is only ever complete
        os.replace(tmp, ir_path)
    else:
        model = ov.Core().read_model(ir_path)
    config = {"INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
    if precision is not None:
        if precision not in HINTS:
            raise ValueError(f"the OpenVINO engine runs fp32 or bf16, not {precision!r}")
        config["INFERENCE_PRECISION_HINT"] = HINTS[precision]
    compiled = ov.Core().compile_model(model, "CPU", config)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    info = EngineInfo(ir_path, converted, PLUGIN_PRECISION.get(name, name), digest)
    return OpenVINOBank(compiled, image_size, info)


def attach_openvino(extractor: DINOv2FeatureExtractor, image_size: int, cache_dir: Optional[str] = None,
                    precision: Optional[str] = None, announce: bool = True) -> EngineInfo:
    """Make ``extractor.extract`` run on OpenVINO (``build_openvino``); prints one line saying whether the IR
    was converted or read, and what precision the plugin runs, unless ``announce`` is False."""
    if str(extractor.device) != "cpu":
        raise ValueError(f"--engine openvino runs on the CPU; this extractor is on {extractor.device} "
                         "(pass --device cpu, or use --engine torch)")
    engine = build_openvino(extractor, image_size, cache_dir, precision)
    extractor.engine = engine
    if announce:
        print(engine.info.line(), flush=True)
    return engine.info
