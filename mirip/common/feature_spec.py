"""The feature-spec vocabulary: which pooled vectors a cache holds, and which of them a head sees.

The bottom layer of mirip's data model: the extractor (``mirip.ml``), the cache and extraction
(``mirip.extract``), training, sweeps and scoring all speak it, so it imports nothing of theirs (torch only
inside the entry-scaling functions).

An *entry* of a feature bank is one pooled vector per image, named ``POOLING@LAYER``:

    cls@-1     the CLS token of the last block (the seed's feature)
    mean@-4    the mean of the patch tokens of the fourth block from the end
    std@12     the per-channel standard deviation of the patch tokens of block 12

Every selected block's output goes through the backbone's final layer norm before it is pooled.
Layers are transformer block indices, 1-based from the first block (``1`` .. ``num_layers``)
or negative from the last (``-1`` is the last block).

Canonicalisation: an entry keeps the layer *as the user wrote it* (``cls@-1`` stays ``cls@-1``), so a spec
names entries exactly as ``extract`` listed them; the cache also records each entry's absolute block
(``feature_entry_blocks``) and the backbone's block count (``backbone_layers``), so ``cls@24`` in a spec
finds ``cls@-1`` of a 24-block cache and vice versa (``resolve_layer``).

A *feature spec* names what a head sees, concatenated in order: entries joined by ``+``, and several
layers of one pooling written once: ``cls@-4,-3,-2,-1+mean@-1`` is cls@-4, cls@-3, cls@-2, cls@-1, mean@-1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

# Poolings of a bank entry. ``cls_mean`` (CLS and patch mean concatenated, 2 x hidden) exists only so that a
# format-1 cache made with ``--pooling cls_mean`` reads as a one-entry bank; new banks store cls and mean apart.
BANK_POOLINGS = ("cls", "mean", "std")
ENTRY_POOLINGS = BANK_POOLINGS + ("cls_mean",)
# The seed's ``DINOv2FeatureExtractor(pooling=...)`` choices, the ones named in its error message (``std`` is
# accepted there too, as a bank pooling); and every pooling extraction takes, in the order ``--help`` lists them.
POOLINGS = ("cls", "mean", "cls_mean")
EXTRACT_POOLINGS = tuple(dict.fromkeys(POOLINGS + BANK_POOLINGS))
# Poolings that read the family's CLS feature (a CLS token, or SigLIP's attention-pooling head).
CLS_POOLINGS = ("cls", "cls_mean")
# Poolings over the patch tokens alone: a score read from them splits into exact per-patch parts (mirip.scoring.explain).
PATCH_POOLINGS = ("mean", "std")
DEFAULT_SPEC = "cls@-1"

_ENTRY = re.compile(r"^([a-z_]+)@([+-]?\d+)$")


class FeatureSpecError(ValueError):
    """A malformed feature spec, or one naming entries a cache does not hold."""


@dataclass(frozen=True)
class Entry:
    """One pooled vector of a bank: ``pooling`` over the tokens of block ``layer`` (as written)."""

    pooling: str
    layer: int

    @property
    def name(self) -> str:
        return f"{self.pooling}@{self.layer}"

    def __str__(self) -> str:
        return self.name

    def block(self, num_layers: int) -> int:
        return resolve_layer(self.layer, num_layers)


def entry_dim(pooling: str, hidden: int) -> int:
    """The width of one entry of ``pooling`` over a backbone of width ``hidden``: ``cls_mean`` is two vectors."""
    return 2 * int(hidden) if pooling == "cls_mean" else int(hidden)


def format1_entry(pooling: Optional[str]) -> str:
    """The format-1 rule: a cache (or checkpoint) from before feature banks holds one entry, its pooling at the
    last block (``cls`` when even the pooling is unrecorded)."""
    return f"{pooling or 'cls'}@-1"


def resolve_layer(layer: int, num_layers: int) -> int:
    """The absolute 1-based block index of ``layer`` in a backbone with ``num_layers`` blocks."""
    layer, num_layers = int(layer), int(num_layers)
    absolute = layer if layer > 0 else num_layers + 1 + layer
    if layer == 0 or not 1 <= absolute <= num_layers:
        raise FeatureSpecError(
            f"layer {layer} does not exist in a backbone of {num_layers} blocks; use 1..{num_layers} "
            f"(from the first block) or -1..-{num_layers} (from the last)")
    return absolute


def parse_entry(name: str) -> Entry:
    """``"mean@-4"`` -> Entry("mean", -4)."""
    m = _ENTRY.match(str(name).strip())
    if not m:
        raise FeatureSpecError(f"bad feature entry {name!r}: write POOLING@LAYER, e.g. cls@-1 or mean@-4")
    pooling, layer = m.group(1), int(m.group(2))
    if pooling not in ENTRY_POOLINGS:
        raise FeatureSpecError(f"bad feature entry {name!r}: unknown pooling {pooling!r}; use one of "
                               f"{', '.join(BANK_POOLINGS)}")
    if layer == 0:
        raise FeatureSpecError(f"bad feature entry {name!r}: layers are 1-based (1 is the first block) or "
                               "negative (-1 is the last block); 0 is neither")
    return Entry(pooling, layer)


def bank_entries(layers: Sequence[int], poolings: Sequence[str]) -> List[Entry]:
    """The entries of ``--layers ... --pooling ...``: pooling-major, layers in the given order."""
    if not layers or not poolings:
        raise FeatureSpecError("a feature bank needs at least one layer and one pooling")
    entries = [parse_entry(f"{p}@{int(l)}") for p in poolings for l in layers]
    _check_unique(entries, "the bank")
    return entries


def _check_unique(entries: Sequence[Entry], what: str) -> None:
    seen, dups = set(), []
    for e in entries:
        if e.name in seen:
            dups.append(e.name)
        seen.add(e.name)
    if dups:
        raise FeatureSpecError(f"{what} names entries more than once: {', '.join(dict.fromkeys(dups))}")


@dataclass(frozen=True)
class FeatureSpec:
    """What a head sees: ``entries`` concatenated in order. ``str(spec)`` is the canonical form."""

    entries: Tuple[Entry, ...]

    @classmethod
    def parse(cls, text: Union[str, "FeatureSpec"]) -> "FeatureSpec":
        if isinstance(text, FeatureSpec):
            return text
        raw = str(text).replace(" ", "")
        if not raw:
            raise FeatureSpecError("empty feature spec; write e.g. cls@-1 or cls@-4,-3,-2,-1+mean@-1")
        entries: List[Entry] = []
        for group in raw.split("+"):
            pooling, sep, layers = group.partition("@")
            if not sep or not pooling or not layers:
                raise FeatureSpecError(f"bad feature spec {text!r}: part {group!r} is not POOLING@LAYER[,LAYER...] "
                                       "(parts are joined by '+', e.g. cls@-4,-3,-2,-1+mean@-1)")
            for layer in layers.split(","):
                try:
                    entries.append(parse_entry(f"{pooling}@{layer}"))
                except FeatureSpecError as exc:
                    raise FeatureSpecError(f"bad feature spec {text!r}: {exc}") from None
        _check_unique(entries, f"feature spec {text!r}")
        return cls(tuple(entries))

    @classmethod
    def from_entries(cls, entries: Sequence[Union[str, Entry]]) -> "FeatureSpec":
        return cls(tuple(e if isinstance(e, Entry) else parse_entry(e) for e in entries))

    @property
    def names(self) -> List[str]:
        return [e.name for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        groups: List[Tuple[str, List[int]]] = []
        for e in self.entries:
            if groups and groups[-1][0] == e.pooling:
                groups[-1][1].append(e.layer)
            else:
                groups.append((e.pooling, [e.layer]))
        return "+".join(f"{p}@{','.join(str(l) for l in layers)}" for p, layers in groups)

    @property
    def canonical(self) -> str:
        return str(self)


def canonical_spec(text: Union[str, FeatureSpec]) -> str:
    return str(FeatureSpec.parse(text))


def match_entries(spec: Union[str, FeatureSpec], available: Sequence[str], blocks: Optional[Sequence[int]] = None,
                  num_layers: Optional[int] = None, where: str = "the feature cache") -> List[int]:
    """Positions in ``available`` (a bank's entry names) of the spec's entries, in spec order.

    An entry is found by its name, or else by (pooling, absolute block) when the bank records its blocks
    and its backbone's block count. A missing entry is refused with the list of what the bank holds.
    """
    spec = FeatureSpec.parse(spec)
    by_name = {name: i for i, name in enumerate(available)}
    by_block = {}
    if blocks is not None and num_layers:
        by_block = {(parse_entry(n).pooling, int(b)): i for i, (n, b) in enumerate(zip(available, blocks))}
    out, missing = [], []
    for e in spec.entries:
        i = by_name.get(e.name)
        if i is None and by_block:
            try:
                i = by_block.get((e.pooling, e.block(int(num_layers))))
            except FeatureSpecError:
                i = None
        if i is None:
            missing.append(e.name)
        else:
            out.append(i)
    if missing:
        raise FeatureSpecError(
            f"feature spec {spec} names {', '.join(missing)}, which {where} does not hold; it holds: "
            f"{', '.join(available)}. Choose among those, or extract a bank with them "
            "(scripts/extract.py --layers ... --pooling ...)")
    return out


def default_spec(available: Sequence[str]) -> str:
    """The spec a run uses without ``--feature``: the cache's only entry, else ``cls@-1``."""
    if len(available) == 1:
        return str(FeatureSpec.parse(available[0]))
    return DEFAULT_SPEC


FEATURE_NORMS = ("auto", "entry", "none")


def resolve_feature_norm(mode: str, spec: Union[str, FeatureSpec]) -> str:
    """``auto``: ``entry`` for a spec of several entries, ``none`` for one (a one-entry run stays as it was)."""
    if mode not in FEATURE_NORMS:
        raise FeatureSpecError(f"feature_norm must be one of {', '.join(FEATURE_NORMS)}, got {mode!r}")
    if mode == "auto":
        return "entry" if len(FeatureSpec.parse(spec)) > 1 else "none"
    return mode


def entry_scales(features, dims: Sequence[int], rows=None) -> List[float]:
    """Per-entry normalisation: for each entry (a block of ``dims`` columns), 1 / its RMS spread, i.e. one over the
    root of the mean per-channel variance over ``rows`` (the train split). One scalar per entry keeps the
    relations between an entry's channels (and each image's magnitude, e.g. a std entry's contrast) intact
    while putting entries of different scale on the same footing."""
    import numpy as np
    import torch

    # A copy of the row list: split positions often come from pandas as read-only arrays.
    x = features if rows is None else features[torch.from_numpy(np.array(rows, dtype=np.int64))]
    x = x.double()
    out, start = [], 0
    for d in dims:
        block = x[:, start:start + d]
        spread = float(block.var(dim=0, unbiased=False).mean().sqrt()) if len(block) else 0.0
        out.append(1.0 / spread if spread > 0 else 1.0)
        start += d
    return out


def apply_entry_scales(features, dims: Sequence[int], scales: Optional[Sequence[float]]):
    """``features`` (float tensor, (N, sum(dims))) with each entry's columns multiplied by its scale (a copy)."""
    import torch

    if not scales:
        return features
    if len(scales) != len(dims) or sum(dims) != features.shape[-1]:
        raise FeatureSpecError(f"{len(scales)} entry scales for {len(dims)} entries of dims {list(dims)} "
                               f"do not fit features of width {features.shape[-1]}")
    factor = torch.cat([torch.full((d,), float(s), dtype=torch.float32) for d, s in zip(dims, scales)])
    return (features.float() * factor.to(features.device)).to(features.dtype)


def checkpoint_feature_spec(ckpt: dict) -> str:
    """A checkpoint's spec: its ``feature_spec``; without one (older checkpoints), the one entry of the format-1
    cache it was trained on (its pooling at the last block), ``cls@-1`` if even that is unknown."""
    spec = ckpt.get("feature_spec")
    if spec:
        return canonical_spec(spec)
    fp = ckpt.get("fingerprint") or {}
    entries = fp.get("feature_entries")
    if entries and len(entries) == 1:
        return canonical_spec(entries[0])
    return format1_entry(fp.get("pooling")) if not entries else DEFAULT_SPEC


__all__ = ["POOLINGS", "EXTRACT_POOLINGS", "CLS_POOLINGS", "PATCH_POOLINGS", "entry_dim", "format1_entry", "FEATURE_NORMS", "resolve_feature_norm", "entry_scales", "apply_entry_scales", "checkpoint_feature_spec", "BANK_POOLINGS", "ENTRY_POOLINGS", "DEFAULT_SPEC", "Entry", "FeatureSpec", "FeatureSpecError", "bank_entries", "canonical_spec", "default_spec", "match_entries", "parse_entry", "resolve_layer"]
