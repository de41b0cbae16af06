"""Image paths as cache keys: one normalisation for every stage, and one rule for symbolic links.

A path listed in a metadata CSV (``./img.png``, ``sub//a.png``) becomes a clean
relative POSIX path, the key a cache row is found by; extraction and training both call ``normalize_relpath``,
so they agree on every name. Absolute paths and ``..`` escapes are refused.

Symbolic links: a link (to a file or a directory) is followed when its target lies inside the image
directory, and refused when it resolves outside it, just as ``..`` is - unless the caller allows it
(``--allow-outside-links``). The directory walk skips refused links and reports them; metadata naming
one is refused up front.
"""

from __future__ import annotations

import os
from typing import Optional

from mirip.common.metadata_csv import MetadataError


class PathEscapeError(ValueError):
    """A listed path that points outside the image directory."""


def normalize_relpath(path: str, where: str = "") -> str:
    """A listed path as a clean relative POSIX path; absolute paths and ``..`` escapes are refused."""
    where = f" ({where})" if where else ""
    if not isinstance(path, str) or not path.strip():
        raise MetadataError(f"empty image path{where}")
    if os.path.isabs(path) or path.startswith(("/", "\\")):
        raise PathEscapeError(f"absolute image path {path!r} refused{where}: paths must be relative to the image directory")
    norm = os.path.normpath(path).replace(os.sep, "/")
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise PathEscapeError(f"image path {path!r} escapes the image directory{where}")
    return norm


def outside_target(root: str, rel: str) -> Optional[str]:
    """Where ``root/rel`` really is when a symbolic link on the way takes it outside ``root``; else None."""
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(root, rel))
    return None if target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep) else target
