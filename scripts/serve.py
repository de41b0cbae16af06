"""Serve trained heads over HTTP for the app: score, compare and explain drawings sent as uploads.

The same as `mirip serve` (see `mirip serve --help`); kept so that `python scripts/serve.py` works as documented.
"""

from mirip.cli.main import leave
from mirip.cli.serve import main

if __name__ == "__main__":
    leave(main())
