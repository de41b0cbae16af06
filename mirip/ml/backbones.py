"""Loading backbones: from the hub, from a local directory, or as an architecture with random weights.

The family (DINOv2, DINOv2 with registers, DINOv3, SigLIP, CLIP) comes from the
config's ``model_type``; the per-family facts and the strict loading live in
``mirip.ml.families``. Configs for the common sizes ship inside the package, so
each architecture builds offline. Random weights are an explicit opt-in, seeded so
that the same "random backbone" can be rebuilt later (a cache made with it and
a full-image model rebuilt from a checkpoint give the same numbers).

Building a family's vision model: from a checkpoint with every one of its weights (or refused), or
with seeded random weights from a local config or one shipped inside the package (``configs/``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

from mirip.ml.families import BackboneFamily, UnsupportedBackboneError, family_for


RANDOM_INIT_SEED = 0


class RandomWeightsWarning(UserWarning):
    """Raised as a warning whenever a backbone has random (untrained) weights."""


class IncompleteWeightsError(ValueError):
    """A checkpoint's weights do not fill the family's vision model exactly (missing / unexpected / mismatched)."""

    def __init__(self, message: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 mismatched: Sequence[str] = ()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


# Short name -> hub organisation; the JSON lies in mirip/ml/configs/<short>.json. Where the numbers come from:
# - dinov2-with-registers-*: transformers' convert_dinov2_with_registers_to_hf.py (518 px, patch 14, 4 registers,
#   dinov2 ViT-S/B/L widths and depths); parameter counts = dinov2-* + 4 register tokens.
# - dinov3-vit{s,b,l}16-*: facebookresearch/dinov3 dinov3/hub/backbones.py (ffn_ratio 4, mlp, 4 storage tokens,
#   mask_k_bias -> no key bias, LayerNorm eps 1e-5, RoPE base 100, rescale_coords 2, 224 px).
# - siglip-so400m-patch14-384: google/siglip-so400m-patch14-384 config.json (both towers 1152 / 4304 / 27 / 16).
# - siglip2-so400m-patch16-512: the same So400m shape, patch 16 at 512 px, Gemma vocabulary (256000); the
#   fixed-resolution SigLIP2 checkpoints are SiglipModel checkpoints (model_type "siglip").
# - clip-vit-large-patch14: openai/clip-vit-large-patch14 (vision 1024 / 4096 / 24 / 16, patch 14, 224 px;
#   text 768 / 3072 / 12 / 12; projection 768; quick_gelu).
# tests/ml/test_families.py checks each one's parameter count against its model card.
SHIPPED: Dict[str, str] = {
    "dinov2-small": "facebook", "dinov2-base": "facebook", "dinov2-large": "facebook", "dinov2-giant": "facebook",
    "dinov2-with-registers-small": "facebook", "dinov2-with-registers-base": "facebook",
    "dinov2-with-registers-large": "facebook",
    "dinov3-vits16-pretrain-lvd1689m": "facebook", "dinov3-vitb16-pretrain-lvd1689m": "facebook",
    "dinov3-vitl16-pretrain-lvd1689m": "facebook",
    "siglip-so400m-patch14-384": "google", "siglip2-so400m-patch16-512": "google",
    "clip-vit-large-patch14": "openai",
}


def shipped_names() -> List[str]:
    """Hub ids with an architecture config inside the package (buildable offline with random weights)."""
    return [f"{org}/{short}" for short, org in SHIPPED.items()]


def shipped_config_dict(name: str) -> dict:
    """The packaged config.json (as a dict) for a hub id or short name; a full config for CLIP/SigLIP."""
    short = str(name).rstrip("/").split("/")[-1]
    if short not in SHIPPED:
        raise ValueError(
            f"no built-in architecture for backbone {name!r}; random weights are available for "
            f"{', '.join(shipped_names())}, or pass a local directory with a config.json"
        )
    return json.loads(resources.files("mirip.ml").joinpath("configs", f"{short}.json").read_text())


def shipped_config(name: str):
    """The vision-tower config of a shipped architecture (``facebook/dinov3-vitl16-pretrain-lvd1689m``...)."""
    d = shipped_config_dict(name)
    return family_for(d.get("model_type")).vision_config(d)


def read_config_dict(name: str, local_files_only: bool = False) -> dict:
    """config.json of a local directory or hub id (the hub cache, or the hub when reachable).
    ``local_files_only``: never ask the hub (an unreachable one costs the hub client's retries)."""
    import transformers

    # PreTrainedConfig since transformers 5; the older spelling stays as an alias in some releases.
    base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    config_dict, _ = base.get_config_dict(name, local_files_only=local_files_only)
    return config_dict


def random_model(config, seed: int = RANDOM_INIT_SEED) -> nn.Module:
    """The family's vision model with seeded random weights, without touching the caller's RNG."""
    family = family_for(getattr(config, "model_type", None))
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return family.model_class(config)


def _weight_problems(family: BackboneFamily, loading_info: dict) -> Tuple[List[str], List[str], List[str]]:
    missing = sorted(loading_info.get("missing_keys") or [])
    unexpected = sorted(k for k in (loading_info.get("unexpected_keys") or [])
                        if not k.startswith(family.ignorable_unexpected))
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k)
                        for k in (loading_info.get("mismatched_keys") or []))
    return missing, unexpected, mismatched


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def pretrained_model(name: str, config_dict: Optional[dict] = None, local_files_only: bool = False
                     ) -> Tuple[nn.Module, BackboneFamily]:
    """Load a checkpoint's vision tower with all of its weights, or refuse.

    The family comes from the checkpoint's ``model_type``; a full CLIP/SigLIP checkpoint gives its vision
    tower (its text tower is the only part allowed to stay unused). Missing, unexpected or mismatched
    weights raise :class:`IncompleteWeightsError` naming them: a model that would run half-random is never
    returned.
    """
    config_dict = read_config_dict(name, local_files_only) if config_dict is None else config_dict
    family = family_for(config_dict.get("model_type"))
    model, info = family.model_class.from_pretrained(name, attn_implementation="sdpa", output_loading_info=True,
                                                     local_files_only=local_files_only)
    missing, unexpected, mismatched = _weight_problems(family, info)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing (would be random): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected (would be ignored): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"wrong shape: {_listing(mismatched)}")
        raise IncompleteWeightsError(
            f"backbone {name!r} (model_type {config_dict.get('model_type')!r}) does not load completely as a "
            f"{family.title} ({type(model).__name__}); refusing it rather than extracting from partly random "
            f"weights. {'; '.join(parts)}. Check that the directory holds the weights that belong to its "
            "config.json (a converted or fine-tuned checkpoint must keep the original parameter names).",
            missing, unexpected, mismatched,
        )
    return model, family


def load_model(name: str, random_init: bool = False, seed: int = RANDOM_INIT_SEED, warn_stacklevel: int = 1,
               allowed: Optional[Sequence[str]] = None, local_files_only: bool = False
               ) -> Tuple[nn.Module, BackboneFamily, dict]:
    """Build the vision model named by a local directory or hub id; returns (model, family, config dict).

    ``random_init`` builds the architecture with seeded random weights (from the directory's config.json,
    or from the configs shipped in the package for hub ids) and warns with :class:`RandomWeightsWarning`.
    ``allowed`` (family names) refuses other families before any weights are read; None allows all.
    ``local_files_only`` reads a hub id from the local hub cache only.
    """
    if os.path.isdir(name) or not random_init:
        config_dict = read_config_dict(name, local_files_only)
    else:
        config_dict = shipped_config_dict(name)
    family = family_for(config_dict.get("model_type"))
    if allowed is not None and family.name not in allowed:
        raise UnsupportedBackboneError(
            f"backbone {name!r} is a {family.title} (model_type {config_dict.get('model_type')!r}); only "
            f"{', '.join(allowed)} backbones are accepted here"
        )
    if not random_init:
        model, family = pretrained_model(name, config_dict, local_files_only)
        return model, family, config_dict
    warnings.warn(
        f"backbone {name!r} is built with RANDOM weights: its features carry no learned meaning. "
        "Use this only for benchmarks and tests; caches and checkpoints made with it are marked pretrained=False.",
        RandomWeightsWarning,
        stacklevel=warn_stacklevel + 1,
    )
    return random_model(family.vision_config(config_dict), seed), family, config_dict


def image_normalization(family: BackboneFamily, name: Optional[str] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) for a backbone: a local checkpoint's ``preprocessor_config.json`` wins (DINOv3's satellite
    weights, a fine-tuned checkpoint with its own statistics), else the family's published values."""
    path = os.path.join(name, "preprocessor_config.json") if name and os.path.isdir(name) else None
    if not path or not os.path.isfile(path):
        return family.mean, family.std
    with open(path) as f:
        d = json.load(f)
    mean, std = d.get("image_mean"), d.get("image_std")
    if mean is None and std is None:
        return family.mean, family.std
    ok = all(isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
             for v in (mean, std))
    if not ok or any(x <= 0 for x in std):
        raise ValueError(f"{path}: image_mean and image_std must each be 3 numbers (std > 0), got "
                         f"image_mean={mean!r}, image_std={std!r}; fix the file or delete those two keys to use "
                         f"the {family.title} defaults")
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def count_parameters(config_dict: dict, full: bool = False) -> int:
    """Parameters of an architecture, counted on the meta device (no memory, no init): the vision tower,
    or with ``full`` the whole dual-tower model a CLIP/SigLIP config describes."""
    import transformers

    family = family_for(config_dict.get("model_type"))
    with torch.device("meta"):
        if full and family.full_model_class_name and "vision_config" in config_dict:
            d = {k: v for k, v in config_dict.items() if k != "model_type"}
            config = getattr(transformers, family.full_config_class_name)(**d)
            model = getattr(transformers, family.full_model_class_name)(config)
        else:
            model = family.model_class(family.vision_config(config_dict))
    return sum(p.numel() for p in model.parameters())


HUB_PROBE_TIMEOUT = 3.0  # seconds: a reachable hub answers a TCP connect well within it
_HUB_REACHABLE: Optional[bool] = None  # the probe's answer, once asked


@dataclass(frozen=True)
class BackboneInfo:
    """What identifies a backbone's numbers; it ends up in every cache fingerprint and checkpoint."""

    name: str
    revision: Optional[str]
    pretrained: bool
    random_init_seed: Optional[int]
    hidden_size: int
    patch_size: int
    family: str = "dinov2"  # the config's model_type family (mirip.ml.families)

    def to_dict(self) -> dict:
        return asdict(self)


def _looks_like_path(name: str) -> bool:
    # A hub id is "org/name"; anything else with a separator, or starting like a path, is a directory.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name and os.sep != "/"


def load_backbone(name: str = "facebook/dinov2-large", random_init: bool = False, *,
                  allowed_families: Optional[Sequence[str]] = None) -> Tuple[nn.Module, BackboneInfo]:
    """Build the backbone named by a hub id or a local directory; ``random_init`` skips the weights.

    Weights that do not load completely, and a ``model_type`` mirip does not support, are refused
    (``IncompleteWeightsError`` / ``mirip.ml.families.UnsupportedBackboneError``). ``allowed_families`` (family
    names) narrows the choice for a caller that handles only some; None (default) allows every family in
    ``families.FAMILIES``, all of which the feature extractor pools.
    """
    name = os.path.expanduser(str(name))
    if not os.path.isdir(name) and _looks_like_path(name):
        raise FileNotFoundError(
            f"backbone directory {name!r} does not exist; pass an existing directory holding config.json "
            "(and model weights), or a hub id such as facebook/dinov2-large"
        )
    # Asked once, quickly: an unreachable hub otherwise costs the hub client's five retries (15-30 s) per file.
    offline = not random_init and not os.path.isdir(name) and (hub_offline() or not hub_reachable())
    try:
        with _hub_client_offline(offline):
            model, family, _ = load_model(name, random_init=random_init, warn_stacklevel=2,
                                                   allowed=allowed_families, local_files_only=offline)
    except (UnsupportedBackboneError, IncompleteWeightsError):
        raise
    except (OSError, ValueError) as exc:
        if random_init:
            raise
        where = (f"the hub ({hub_host()}) cannot be reached from here and it is not in the local hub cache"
                 if offline else f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}")
        raise OSError(
            f"could not load backbone {name!r} ({where}).\n"
            "To fix: download it once where the hub is reachable (e.g. `hf download "
            f"{name} --local-dir models/{name.split('/')[-1]}`) and pass that directory as the backbone name, "
            "or opt into an untrained architecture with random_init=True (--random-init) for benchmarks and tests."
        ) from exc
    config = model.config
    info = BackboneInfo(
        name=name,
        revision=getattr(config, "_commit_hash", None),
        pretrained=not random_init,
        random_init_seed=RANDOM_INIT_SEED if random_init else None,
        hidden_size=int(config.hidden_size),
        patch_size=family.patch_size(config),
        family=family.name,
    )
    return model, info


def hub_offline() -> bool:
    """Whether the hub client is told to stay offline (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(k, "0").strip().lower() not in ("0", "", "false", "no", "off")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_host() -> str:
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` s, name lookup included (which
    ``socket.create_connection``'s own timeout does not bound, hence the thread). Asked once per process."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        answer: list = []

        def probe() -> None:
            try:
                socket.create_connection((hub_host(), 443), timeout=timeout).close()
                answer.append(True)
            except OSError:
                answer.append(False)

        thread = threading.Thread(target=probe, daemon=True, name="mirip-hub-probe")
        thread.start()
        thread.join(timeout)
        _HUB_REACHABLE = bool(answer and answer[0])
    return _HUB_REACHABLE


@contextmanager
def _hub_client_offline(offline: bool) -> Iterator[None]:
    """The hub client told it is offline for a while: besides the files, it asks the hub for other things
    (its user-agent registry) unless its own offline switch is on, and that switch is read at import."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def pretrained_available(name: str, timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether ``name``'s weights can be had now: a local directory, the local hub cache, or a reachable hub.

    Answers in at most ``timeout`` seconds, so a demo can choose random weights offline without
    waiting through the hub client's retries.
    """
    if os.path.isdir(os.path.expanduser(name)):
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str) and any(
            isinstance(try_to_load_from_cache(name, f), str) for f in ("model.safetensors", "pytorch_model.bin")
        ):
            return True
    except Exception:  # an old or missing hub client only means "not cached"
        pass
    return not hub_offline() and hub_reachable(timeout)
