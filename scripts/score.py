"""Score drawings with a trained head in full-image mode (backbone + head), write a CSV and an HTML report.

The same as `mirip score` (see `mirip score --help`); kept so that `python scripts/score.py` works as documented.
"""

from mirip.cli.main import leave
from mirip.cli.score import main

if __name__ == "__main__":
    leave(main())
