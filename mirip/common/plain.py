"""Plain Python values from numpy-laden results: the one converter behind every checkpoint key and JSON file."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def plain(obj: Any, finite: bool = False) -> Any:
    """Mappings to dicts with string keys, tuples to lists, numpy scalars to Python ones.

    ``finite``: also NaN and infinities to None, since JSON has no spelling for them (``json.dumps`` would
    write ``NaN``, which strict readers refuse); checkpoints keep them as they are.
    """
    if isinstance(obj, Mapping):
        return {str(k): plain(v, finite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, finite) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if finite and isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def json_safe(obj: Any) -> Any:
    """``plain(obj, finite=True)``: what every JSON file mirip writes goes through."""
    return plain(obj, finite=True)


__all__ = ["plain", "json_safe"]
