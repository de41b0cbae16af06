"""Loading DINOv2 backbones: from the hub, from a local directory, or as an architecture with random weights.

Configs for dinov2-small/base/large/giant ship inside the package, so the
architecture builds offline. Random weights are an explicit opt-in, seeded so
that the same "random backbone" can be rebuilt later (a cache made with it and
a full-image model rebuilt from a checkpoint give the same numbers).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Optional, Tuple

import torch
from transformers import Dinov2Config, Dinov2Model

KNOWN_BACKBONES = ("dinov2-small", "dinov2-base", "dinov2-large", "dinov2-giant")
RANDOM_INIT_SEED = 0


class RandomWeightsWarning(UserWarning):
    """Raised as a warning whenever a backbone has random (untrained) weights."""


@dataclass(frozen=True)
class BackboneInfo:
    """What identifies a backbone's numbers; it ends up in every cache fingerprint and checkpoint."""

    name: str
    revision: Optional[str]
    pretrained: bool
    random_init_seed: Optional[int]
    hidden_size: int
    patch_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def shipped_config(name: str) -> Dinov2Config:
    """The packaged architecture config for a hub id or short name (``facebook/dinov2-large``, ``dinov2-large``)."""
    short = name.rstrip("/").split("/")[-1]
    if short not in KNOWN_BACKBONES:
        raise ValueError(
            f"no built-in architecture for backbone {name!r}; random weights are available for "
            f"{', '.join('facebook/' + k for k in KNOWN_BACKBONES)}, or pass a local directory with a config.json"
        )
    text = resources.files("mirip.ml").joinpath("configs", f"{short}.json").read_text()
    return Dinov2Config(**json.loads(text))


def _looks_like_path(name: str) -> bool:
    # A hub id is "org/name"; anything else with a separator, or starting like a path, is a directory.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name and os.sep != "/"


def _random_model(config: Dinov2Config, name: str) -> Dinov2Model:
    warnings.warn(
        f"backbone {name!r} is built with RANDOM weights: its features carry no learned meaning. "
        "Use this only for benchmarks and tests; caches and checkpoints made with it are marked pretrained=False.",
        RandomWeightsWarning,
        stacklevel=3,
    )
    config._attn_implementation = "sdpa"
    # Seeded without touching the caller's RNG, so the same random backbone can be rebuilt anywhere.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return Dinov2Model(config)


def _pretrained_model(name: str) -> Dinov2Model:
    try:
        return Dinov2Model.from_pretrained(name, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise OSError(
            f"could not load backbone {name!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}).\n"
            "To fix: download it once where the hub is reachable (e.g. `hf download "
            f"{name} --local-dir models/{name.split('/')[-1]}`) and pass that directory as the backbone name, "
            "or opt into an untrained architecture with random_init=True (--random-init) for benchmarks and tests."
        ) from exc


def load_backbone(name: str = "facebook/dinov2-large", random_init: bool = False) -> Tuple[Dinov2Model, BackboneInfo]:
    """Build the backbone named by a hub id or a local directory; ``random_init`` skips the weights."""
    name = os.path.expanduser(str(name))
    if os.path.isdir(name):
        if random_init:
            model = _random_model(Dinov2Config.from_pretrained(name), name)
        else:
            model = _pretrained_model(name)
    elif _looks_like_path(name):
        raise FileNotFoundError(
            f"backbone directory {name!r} does not exist; pass an existing directory holding config.json "
            "(and model weights), or a hub id such as facebook/dinov2-large"
        )
    elif random_init:
        model = _random_model(shipped_config(name), name)
    else:
        model = _pretrained_model(name)
    config = model.config
    info = BackboneInfo(
        name=name,
        revision=getattr(config, "_commit_hash", None),
        pretrained=not random_init,
        random_init_seed=RANDOM_INIT_SEED if random_init else None,
        hidden_size=int(config.hidden_size),
        patch_size=int(config.patch_size),
    )
    return model, info


def pretrained_available(name: str, timeout: float = 3.0) -> bool:
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
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False
