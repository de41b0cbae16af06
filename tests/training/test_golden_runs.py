"""A fixed-seed train and sweep give the numbers recorded in ``tests/data/golden_runs.json`` (see
``tests/_golden_runs.py``).

Where the kernel fingerprint (``tests/_kernel_fingerprint.py``: torch build, ATen's CPU capability, oneDNN's ISA,
the CPU's vector extensions, overrides) equals the recording's, every metric, history value and trained weight
must be bit-identical. Elsewhere kernels round differently in the last bits: a run then moves by at most ~6e-7
(measured by forcing ATen's default kernels and oneDNN's SSE4.1 ones on the recording machine), so floats are
compared to TOLERANCE, 10-20x that, and weights by their per-tensor sums and norms instead of their hashes. A
training or calibration bug (a wrong margin, a skipped clip, shifted thresholds) moves them by far more.
"""

from __future__ import annotations

import json
import math

from _golden_runs import GOLDEN, compute

TOLERANCE = {"rel_tol": 1e-4, "abs_tol": 1e-5}
HASH_KEYS = ("state", "best_state")  # sha256 of the weights: meaningful only between identical kernels


def _compare(want, got, where, exact):
    if isinstance(want, dict):
        assert set(want) == set(got), f"{where}: keys {sorted(set(want) ^ set(got))} differ"
        for k in want:
            if k in HASH_KEYS and not exact:
                continue
            _compare(want[k], got[k], f"{where}.{k}", exact)
    elif isinstance(want, list):
        assert len(want) == len(got), f"{where}: length {len(got)}, expected {len(want)}"
        for i, (a, b) in enumerate(zip(want, got)):
            _compare(a, b, f"{where}[{i}]", exact)
    elif isinstance(want, float) and not exact:
        assert math.isclose(want, got, **TOLERANCE), f"{where}: {got!r}, expected {want!r} (to {TOLERANCE})"
    else:
        assert want == got, f"{where}: {got!r}, expected {want!r}" + (" (bit-exact: same kernels)" if exact else "")


def test_fixed_seed_train_and_sweep_match_the_recorded_numbers():
    with open(GOLDEN) as f:
        want = json.load(f)
    got = compute()
    exact = want.pop("fingerprint") == got.pop("fingerprint")
    _compare(want, got, "golden", exact)
