"""The judges' database: export the judged pairs as the CSV training reads.

The same as `mirip judgments` (see `mirip judgments --help`); kept so that `python scripts/judgments.py` works as documented.
"""

from mirip.cli.judgments import main
from mirip.cli.main import leave

if __name__ == "__main__":
    leave(main())
