"""Feature fingerprints: everything that changes the numbers in a feature cache.

A fingerprint is a flat dict of plain values. It is stored as attributes of
every cache file and inside every checkpoint; appending to, training from or
scoring against features whose fingerprint differs is refused, naming the field.
"""

from __future__ import annotations

import json
from typing import Iterable, List, Mapping, Optional, Tuple

import torch
import transformers

from mirip.common.feature_spec import format1_entry
from mirip.common.package import package_version

# Read once: a folder shadowing the package fails here, named, not when a fingerprint is made.
MIRIP_VERSION = package_version()

# Format 2: a feature bank (feature_entries / feature_entry_blocks / feature_entry_dims / backbone_layers);
# a format-1 file (no such fields) reads as a bank of one entry, ``<pooling>@-1``. Format 3: per-row checksums
# (mirip.store.cache); a format-2 file has none and is read unverified.
CACHE_FORMAT_VERSION = 3
# Fields added after caches already existed, with the value those older caches implicitly have: a cache
# without "color_management" ignored embedded ICC profiles, so it reads as "none" and is refused beside a
# cache made with profiles converted to sRGB ("icc-to-srgb"), naming the field.
LEGACY_DEFAULTS = {"color_management": "none", "engine": "torch"}
# Fields that record the software, not the numbers' meaning: compared only when appending to a cache. ``engine``
# (torch / openvino) is one: features of the two agree to cos >= 0.9999 (measured), so a head trained on one
# engine's cache scores with the other (announced), but one cache's rows all come from one engine. Caches from
# before the field read as torch.
ENVIRONMENT_FIELDS = ("mirip_version", "torch_version", "transformers_version", "engine")
# The backbone family's facts (backbone_family, token_layout, cls_pooling: which family, which tokens are CLS /
# registers / patches, and what ``cls`` pools). Caches and checkpoints from before families were recorded are all
# DINOv2 (nothing else could be extracted), so a fingerprint without these fields reads as DINOv2's
# (``with_family_defaults``).
# Fields that describe which entries a cache holds and how they are laid out, not what an entry means: a head
# trained on some entries of one cache may read the same entries from another cache (checked by name instead).
LAYOUT_FIELDS = ("format_version", "feature_dim", "pooling", "views", "feature_entries", "feature_entry_blocks",
                 "feature_entry_dims", "backbone_layers")


# What to do about a mismatch, by what holds the stored value (the first word(s) of ``what``).
DEFAULT_FIXES = {
    "cache": "use a cache extracted with the settings asked for (scripts/extract.py with another --output), "
             "or ask for the cache's settings",
    "checkpoint": "leave out the option that differs: the checkpoint's own value is the default",
}


class FingerprintMismatch(ValueError):
    """Two fingerprints differ; ``fields`` maps each differing field to (expected, actual) as compared.

    The message says one thing everywhere: "the <cache/checkpoint> has X, <asker> asks for Y; to fix: ...".
    ``holder`` says which side is the stored one named by ``what``: "actual" (a cache checked against what a
    command wants: ``FeatureCache.check_fingerprint``) or "expected" (a checkpoint whose values a command's
    options or rebuilt backbone must match). ``has`` / ``asks`` hold the values that way round."""

    def __init__(self, fields: dict, what: str = "feature cache", *, holder: str = "actual",
                 asker: str = "this command", fix: Optional[str] = None):
        if holder not in ("actual", "expected"):
            raise ValueError(f"holder must be 'actual' or 'expected', not {holder!r}")
        self.fields = fields
        self.has = {k: (b if holder == "actual" else a) for k, (a, b) in fields.items()}
        self.asks = {k: (a if holder == "actual" else b) for k, (a, b) in fields.items()}
        noun = "checkpoint" if what.startswith("checkpoint") else "cache" if "cache" in what.split(" ")[:2] else what
        detail = "; ".join(f"{k}: the {noun} has {self.has[k]!r}, {asker} asks for {self.asks[k]!r}" for k in fields)
        fix = fix or DEFAULT_FIXES.get(noun, f"ask for the {noun}'s settings")
        super().__init__(f"{what} fingerprint does not match: {detail}; to fix: {fix}")


def make_fingerprint(extractor, preprocessor, feature_dtype: str = "float32", views: int = 0) -> dict:
    """The fingerprint of features made by ``extractor`` (a DINOv2FeatureExtractor) from ``preprocessor``; with
    an OpenVINO engine attached, ``engine`` says so and ``precision`` is what its plugin runs."""
    engine = getattr(extractor, "engine", None)
    info = extractor.info
    pre = preprocessor.config()
    facts = extractor.family_facts()
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "backbone": info.name,
        "backbone_revision": info.revision or "",
        "pretrained": bool(info.pretrained),
        "random_init_seed": -1 if info.random_init_seed is None else int(info.random_init_seed),
        "feature_dim": int(extractor.output_dim),
        "image_size": int(pre["image_size"]),
        "resize_mode": pre["resize_mode"],
        "patch_size": int(pre["patch_size"]),
        "mean": [float(x) for x in pre["mean"]],
        "std": [float(x) for x in pre["std"]],
        "color_management": pre.get("color_management", LEGACY_DEFAULTS["color_management"]),
        "backbone_family": facts["family"],
        "token_layout": facts["token_layout"],
        "cls_pooling": facts["cls"],
        "pooling": extractor.pooling,
        "feature_entries": list(extractor.entry_names),
        "feature_entry_blocks": [int(b) for b in extractor.entry_blocks],
        "feature_entry_dims": [int(d) for d in extractor.entry_dims],
        "backbone_layers": int(extractor.num_layers),
        "precision": engine.info.precision if engine is not None else extractor.precision,
        "engine": "torch" if engine is None else "openvino",
        "feature_dtype": feature_dtype,
        "views": int(views),
        "mirip_version": MIRIP_VERSION,
        "torch_version": str(torch.__version__),  # TorchVersion is a str subclass h5py cannot store
        "transformers_version": transformers.__version__,
    }


def bank_layout(fingerprint: Mapping) -> Tuple[List[str], Optional[List[int]], List[int], Optional[int]]:
    """(entry names, absolute blocks or None, dims, backbone block count or None) of a cache's fingerprint.

    A format-1 fingerprint (no entries recorded) is a bank of one entry: its pooling at the last block.
    """
    entries = fingerprint.get("feature_entries")
    if entries:
        blocks = fingerprint.get("feature_entry_blocks")
        dims = fingerprint.get("feature_entry_dims") or [int(fingerprint["feature_dim"]) // len(entries)] * len(entries)
        return list(entries), (list(blocks) if blocks else None), [int(d) for d in dims], fingerprint.get("backbone_layers")
    return [format1_entry(fingerprint.get("pooling"))], None, [int(fingerprint.get("feature_dim", 0))], None


def with_family_defaults(fingerprint: Mapping) -> dict:
    """``fingerprint`` with the family fields filled in as DINOv2's where it predates them."""
    out = dict(fingerprint)
    if "backbone_family" not in out and "backbone" in out:
        out["backbone_family"] = "dinov2"
        out.setdefault("token_layout", {"num_prefix_tokens": 1, "cls_index": 0, "num_register_tokens": 0,
                                        "patch_size": int(out.get("patch_size", 14))})
        out.setdefault("cls_pooling", "token")
    return out


def _norm(value):
    # HDF5 attributes come back as numpy scalars/arrays; compare as JSON-level values.
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, tuple):
        value = list(value)
    return value


def diff_fingerprints(
    expected: Mapping, actual: Mapping, ignore: Iterable[str] = ENVIRONMENT_FIELDS, only: Optional[Iterable[str]] = None
) -> dict:
    """Fields whose values differ, as {field: (expected, actual)}; a field missing on one side differs."""
    expected, actual = with_family_defaults(expected), with_family_defaults(actual)
    keys = set(only) if only is not None else (set(expected) | set(actual))
    keys -= set(ignore)

    def get(fp: Mapping, k: str):
        return _norm(fp.get(k, LEGACY_DEFAULTS.get(k)))

    return {k: (get(expected, k), get(actual, k)) for k in sorted(keys) if get(expected, k) != get(actual, k)}


def check_fingerprint(
    expected: Mapping, actual: Mapping, what: str = "feature cache", ignore: Iterable[str] = ENVIRONMENT_FIELDS,
    only: Optional[Iterable[str]] = None, **wording,
) -> None:
    """Raise FingerprintMismatch naming every differing field (``wording``: its holder / asker / fix)."""
    diff = diff_fingerprints(expected, actual, ignore=ignore, only=only)
    if diff:
        raise FingerprintMismatch(diff, what, **wording)


RANDOM_WEIGHTS_NOTE = ("backbone weights are RANDOM (untrained): the features carry no learned meaning, "
                       "so these numbers only exercise the pipeline")


def weights_summary(fingerprint: Optional[Mapping]) -> dict:
    """What every output of a run states about the backbone behind its features."""
    if not fingerprint:
        return {"backbone": None, "backbone_weights": "unknown"}
    pretrained = fingerprint.get("pretrained")
    weights = "unknown" if pretrained is None else "pretrained" if pretrained else "random"
    summary = {"backbone": fingerprint.get("backbone"), "backbone_weights": weights,
               "backbone_family": with_family_defaults(fingerprint).get("backbone_family"),
               "image_size": fingerprint.get("image_size"), "pooling": fingerprint.get("pooling")}
    if weights == "random":
        summary["note"] = RANDOM_WEIGHTS_NOTE
    return summary


def to_attrs(fingerprint: Mapping) -> dict:
    """HDF5-safe attribute values (lists as JSON strings keep dtypes exact)."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) or v is None else v for k, v in fingerprint.items()}


def from_attrs(attrs: Mapping, keys: Iterable[str]) -> dict:
    out = {}
    for k in keys:
        v = _norm(attrs[k])
        if isinstance(v, str) and v[:1] in ("[", "{") or v == "null":  # "" is in any str
            v = json.loads(v)
        if isinstance(v, (bool, int, float, str, list, dict)) or v is None:
            out[k] = v
    return out


def fingerprint_sha256(fingerprint: Optional[Mapping], ignore: Iterable[str] = ENVIRONMENT_FIELDS) -> Optional[str]:
    """A short identity of the features a fingerprint describes: sha256 of its fields as canonical JSON, the
    library versions left out (a torch upgrade does not change which features a head expects). None for none."""
    if not fingerprint:
        return None
    import hashlib

    fields = {k: _norm(v) for k, v in with_family_defaults(fingerprint).items() if k not in set(ignore)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
