"""Loading backbones: from the hub, from a local directory, or as an architecture with random weights.

The family (DINOv2, DINOv2 with registers, DINOv3, SigLIP, CLIP) comes from the
config's ``model_type``; the per-family facts and the strict loading live in
``mirip.ml.families``. Configs for the common sizes ship inside the package, so
each architecture builds offline. Random weights are an explicit opt-in, seeded so
that the same "random backbone" can be rebuilt later (a cache made with it and
a full-image model rebuilt from a checkpoint give the same numbers).
"""

from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence, Tuple
from urllib.parse import urlparse

from torch import nn

from mirip.ml import family_loading
from mirip.ml import family_registry
from mirip.ml.family_loading import RANDOM_INIT_SEED

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
    (``family_loading.IncompleteWeightsError`` / ``family_registry.UnsupportedBackboneError``). ``allowed_families`` (family
    names) narrows the choice for a caller that handles only some; None (default) allows every family in
    ``family_registry.FAMILIES``, all of which the feature extractor pools.
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
            model, family, _ = family_loading.load_model(name, random_init=random_init, warn_stacklevel=2,
                                                   allowed=allowed_families, local_files_only=offline)
    except (family_registry.UnsupportedBackboneError, family_loading.IncompleteWeightsError):
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
