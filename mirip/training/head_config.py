"""The settings that differ between heads trained together on cached features: one point of a sweep's grid
for one seed, or one member of an ensemble (``mirip.training.stacked_training`` trains groups of them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class HeadConfig:
    """Everything that differs between heads trained together: a point of a sweep grid x a seed, or an ensemble member."""

    margin: float
    hidden_dim: int
    projector_dim: int
    learning_rate: float
    dropout: float
    weight_decay: float
    seed: int
    feature: Optional[str] = None  # canonical feature spec; None: the cache's default (ids stay as before specs)
    # What one teacher-judged pair counts against one tier pair (mirip.training.judged_pairs); None: a run
    # without judgments (ids stay as before judged pairs).
    judgment_weight: Optional[float] = None

    @property
    def config_id(self) -> str:
        """A stable, file-name-safe name; repr() of a float round-trips, so distinct values never collide."""
        base = (f"m{self.margin!r}-h{self.hidden_dim}-p{self.projector_dim}-lr{self.learning_rate!r}"
                f"-do{self.dropout!r}-wd{self.weight_decay!r}-s{self.seed}")
        base = base if self.feature is None else f"{base}-f{spec_slug(self.feature)}"
        return base if self.judgment_weight is None else f"{base}-jw{self.judgment_weight!r}"

    @property
    def shape_key(self) -> Tuple:
        """Heads with equal keys have equal parameter shapes and see the same data: they stack. Heads of other
        judgment weights see other pairs, so they are other groups."""
        return (self.seed, self.hidden_dim, self.projector_dim, self.feature, self.judgment_weight)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"margin={self.margin:g} hidden={self.hidden_dim} proj={self.projector_dim} "
                f"lr={self.learning_rate:g} dropout={self.dropout:g} wd={self.weight_decay:g} seed={self.seed}"
                + ("" if self.feature is None else f" feature={self.feature}")
                + ("" if self.judgment_weight is None else f" judgment_weight={self.judgment_weight:g}"))


def spec_slug(spec: str) -> str:
    """A file-name-safe form of a canonical spec: ``cls@-4,-3+mean@-1`` -> ``cls.m4.m3_mean.m1``."""
    return spec.replace("@", ".").replace(",", ".").replace("-", "m").replace("+", "_")
