"""Write a procedurally drawn demo dataset (images + metadata.csv).

The same as `mirip demo` (see `mirip demo --help`); kept so that `python scripts/make_demo_data.py` works as documented.
"""

from mirip.cli.demo import main
from mirip.cli.main import leave

if __name__ == "__main__":
    leave(main())
