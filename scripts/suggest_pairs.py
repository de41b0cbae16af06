"""Suggest the next pairs of drawings worth a teacher's judgment (comparative judgement).

The same as `mirip suggest` (see `mirip suggest --help`); kept so that `python scripts/suggest_pairs.py` works as documented.
"""

from mirip.cli.main import leave
from mirip.cli.suggest_pairs import main

if __name__ == "__main__":
    leave(main())
