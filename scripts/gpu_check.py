"""Measure every GPU speed figure beside its baseline in one run; write gpu_suite.json + gpu_suite.md.

The same as `mirip gpu-check` (see `mirip gpu-check --help`); kept so that `python scripts/gpu_check.py` works as documented.
"""

from mirip.cli.gpu_check import main
from mirip.cli.main import leave

if __name__ == "__main__":
    leave(main())
