"""Stage one: cache frozen DINOv2 features of every image in an HDF5 file.

The same as `mirip extract` (see `mirip extract --help`); kept so that `python scripts/extract.py` works as documented.
"""

from mirip.cli.extract import main
from mirip.cli.main import leave

if __name__ == "__main__":
    leave(main())
