"""Which ``mirip`` was imported: the package, or a folder of the same name that shadows it.

A folder named ``mirip`` without ``__init__.py`` (a clone of this repository, say) in the working directory
or on PYTHONPATH is found before an editable install's import hook, so ``import mirip`` yields an empty
namespace package while ``mirip.x`` submodules still load from the real package through that hook. Nothing
fails until something reads ``mirip.__version__``, with a message that names neither folder.
"""

from __future__ import annotations

import os
import sys
from typing import List

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def shadowing_folders() -> List[str]:
    """The folders the imported ``mirip`` was made of when it is not this package; [] when it is."""
    imported = sys.modules.get("mirip")
    if imported is None or getattr(imported, "__version__", None) is not None:
        return []
    folders = [os.path.abspath(p) for p in getattr(imported, "__path__", [])]
    return [p for p in folders if os.path.normcase(p) != os.path.normcase(PACKAGE_DIR)] or folders


def package_version() -> str:
    """mirip's version; an ImportError naming the shadowing folder and what to do, if ``mirip`` is not the package."""
    imported = sys.modules.get("mirip")
    version = getattr(imported, "__version__", None)
    if version is not None:
        return str(version)
    folders = ", ".join(shadowing_folders()) or "an unknown location"
    raise ImportError(
        f"`import mirip` found {folders}: a folder named mirip without __init__.py, not the mirip package "
        f"(which is {PACKAGE_DIR}). It shadows the package because Python searches the working directory (and "
        "PYTHONPATH) first. Run from another directory, or rename that folder (a clone of mirip: work inside "
        "it, not beside it)")
