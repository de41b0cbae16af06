"""Run mirip's benchmarks and write benchmark.json + benchmark.md.

The same as `mirip benchmark` (see `mirip benchmark --help`); kept so that `python scripts/benchmark.py` works as documented.
"""

from mirip.cli.benchmark import main
from mirip.cli.main import leave

if __name__ == "__main__":
    leave(main())
