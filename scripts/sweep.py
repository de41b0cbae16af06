"""Ablation sweep over margin, dims, learning rate, dropout and weight decay: many heads trained together.

The same as `mirip sweep` (see `mirip sweep --help`); kept so that `python scripts/sweep.py` works as documented.
"""

from mirip.cli.main import leave
from mirip.cli.sweep import main

if __name__ == "__main__":
    leave(main())
