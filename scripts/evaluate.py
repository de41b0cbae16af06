"""Evaluate a trained head on cached features: pairwise accuracy overall and per tier pair, Spearman, Kendall.

The same as `mirip evaluate` (see `mirip evaluate --help`); kept so that `python scripts/evaluate.py` works as documented.
"""

from mirip.cli.evaluate import main
from mirip.cli.main import leave

if __name__ == "__main__":
    leave(main())
