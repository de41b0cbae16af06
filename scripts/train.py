"""Train a ranking head on cached features (stage two) and report it on the held-out test split.

The same as `mirip train` (see `mirip train --help`); kept so that `python scripts/train.py` works as documented.
"""

from mirip.cli.main import leave
from mirip.cli.train import main

if __name__ == "__main__":
    leave(main())
