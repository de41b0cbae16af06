"""The grid of a sweep: which values each hyperparameter takes, checked before any training starts.

A sweep trains one head per point of the grid (margin x hidden dim x projector
dim x learning rate x dropout x weight decay x feature spec x judgment weight)
for every seed. Points that share a seed, parameter shapes (hidden dim, projector
dim), a feature spec (so the same input dim) and a judgment weight (so the same
batches: judged pairs are mixed into the tier pairs by weight) form a *group*:
their heads are stacked and trained together over the same batches.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from mirip.common.feature_spec import FeatureSpecError, canonical_spec
from mirip.training.head_config import HeadConfig


class SweepConfigError(ValueError):
    """A sweep grid or setting that cannot be trained; the message names the option and the value."""


AXES = tuple(f.name for f in fields(HeadConfig))  # grid axes, in HeadConfig order
HYPERPARAMETERS = tuple(a for a in AXES if a != "seed")


def _option(axis: str) -> str:
    return "--seeds" if axis == "seed" else "--" + axis.replace("_", "-")


def _check_values(axis: str, values: Sequence) -> Tuple:
    option = _option(axis)
    values = tuple(values)
    if axis == "feature" and values != (None,):
        try:
            values = tuple(canonical_spec(v) for v in values)
        except FeatureSpecError as exc:
            raise SweepConfigError(f"--feature: {exc}") from None
    if axis == "feature":
        if not values:
            raise SweepConfigError("--feature: the grid is empty; give at least one spec")
        dups = sorted({v for v in values if values.count(v) > 1}, key=values.index)
        if dups:
            raise SweepConfigError(f"--feature: spec(s) listed more than once: {', '.join(dups)}")
        return values
    if axis == "judgment_weight" and values == (None,):
        return values  # no judgments: heads train on tier pairs only
    if not values:
        raise SweepConfigError(f"{option}: the grid is empty; give at least one value")
    dups = sorted({v for v in values if values.count(v) > 1}, key=values.index)
    if dups:
        raise SweepConfigError(f"{option}: value(s) listed more than once: {', '.join(map(str, dups))}")
    out = []
    for v in values:
        if axis in ("hidden_dim", "projector_dim", "seed"):
            if isinstance(v, bool) or not isinstance(v, (int,)) and not (isinstance(v, float) and v.is_integer()):
                raise SweepConfigError(f"{option}: values must be integers, got {v!r}")
            v = int(v)
            if axis == "seed" and v < 0:
                raise SweepConfigError(f"{option}: seeds must be non-negative, got {v}")
            if axis != "seed" and v <= 0:
                raise SweepConfigError(f"{option}: dims must be positive, got {v}")
        else:
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise SweepConfigError(f"{option}: values must be numbers, got {v!r}") from None
            if not math.isfinite(v):
                raise SweepConfigError(f"{option}: values must be finite, got {v}")
            if axis == "margin" and v < 0:
                raise SweepConfigError(f"{option}: a margin must be non-negative, got {v:g}")
            if axis == "learning_rate" and v <= 0:
                raise SweepConfigError(f"{option}: a learning rate must be positive, got {v:g}")
            if axis == "weight_decay" and v < 0:
                raise SweepConfigError(f"{option}: a weight decay must be non-negative, got {v:g}")
            if axis == "judgment_weight" and v < 0:
                raise SweepConfigError(f"{option}: a judgment weight must be non-negative, got {v:g}")
            if axis == "dropout" and not 0.0 <= v < 1.0:
                raise SweepConfigError(f"{option}: a dropout must be in [0, 1), got {v:g}")
        out.append(v)
    return tuple(out)


@dataclass(frozen=True)
class SweepGrid:
    """Values per axis; the sweep is their Cartesian product. Validated on construction."""

    margin: Tuple[float, ...] = (1.0,)
    hidden_dim: Tuple[int, ...] = (512,)
    projector_dim: Tuple[int, ...] = (256,)
    learning_rate: Tuple[float, ...] = (1e-4,)
    dropout: Tuple[float, ...] = (0.1,)
    weight_decay: Tuple[float, ...] = (0.01,)
    seed: Tuple[int, ...] = (42,)
    feature: Tuple[Optional[str], ...] = (None,)  # feature specs; (None,): the cache's default spec
    judgment_weight: Tuple[Optional[float], ...] = (None,)  # (None,): no judged pairs (sweep without --judgments)

    def __post_init__(self) -> None:
        for axis in AXES:
            value = getattr(self, axis)
            if isinstance(value, (int, float, str)) or value is None:
                value = (value,)
            object.__setattr__(self, axis, _check_values(axis, value))

    def configs(self) -> List[HeadConfig]:
        """Every point x seed, seeds outermost, then shapes, so one group's heads are neighbours."""
        order = ("seed", "feature", "judgment_weight", "hidden_dim", "projector_dim", "margin", "learning_rate",
                 "dropout", "weight_decay")
        out = []
        for values in itertools.product(*(getattr(self, a) for a in order)):
            out.append(HeadConfig(**dict(zip(order, values))))
        return out

    def __len__(self) -> int:
        return math.prod(len(getattr(self, a)) for a in AXES)

    def to_dict(self) -> Dict[str, list]:
        return {a: list(getattr(self, a)) for a in AXES}


def group_configs(configs: Iterable[HeadConfig]) -> Dict[Tuple, List[HeadConfig]]:
    """{(seed, hidden_dim, projector_dim, feature, judgment_weight): configs}, in first-seen order: each group
    trains as one stack."""
    groups: Dict[Tuple[int, int, int], List[HeadConfig]] = {}
    for cfg in configs:
        groups.setdefault(cfg.shape_key, []).append(cfg)
    return groups
