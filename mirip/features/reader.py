"""Reader: which images to extract, and a Dataset that decodes them in DataLoader workers.

Paths are kept relative to the image directory with POSIX separators: that is
the key a cache row is found by, whatever machine or OS wrote it. A bad file is
never an exception here: the dataset returns its failure reason, so one broken
image cannot stop a run of a million.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from mirip.preprocessing import ImageReadError, Preprocessor, resize

MISSING = -1  # size / mtime recorded for a file that does not exist


class MetadataError(ValueError):
    """A metadata file that cannot be used; the message names the file, row and column."""


class PathEscapeError(ValueError):
    """A listed path that points outside the image directory."""


def image_extensions() -> Tuple[str, ...]:
    """Lower-case extensions PIL can open (``.jpg``, ``.png``, ``.tif`` ...), for walking a directory."""
    return tuple(sorted({ext.lower() for ext in Image.registered_extensions()}))


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


def read_metadata_paths(metadata: Union[str, os.PathLike, pd.DataFrame], filename_column: str = "filename") -> List[str]:
    """Relative image paths listed in a metadata CSV (or DataFrame), in file order, duplicates dropped.

    Every problem is found before any backbone work: a missing file, no rows, no filename
    column, empty cells, and paths escaping the image directory (all such rows are listed).
    """
    name = "metadata" if isinstance(metadata, pd.DataFrame) else os.fspath(metadata)
    if isinstance(metadata, pd.DataFrame):
        frame = metadata
    else:
        if not os.path.isfile(name):
            raise FileNotFoundError(f"metadata file not found: {name}")
        try:
            frame = pd.read_csv(name, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise MetadataError(f"metadata file {name} is empty (expected a CSV with a {filename_column!r} column)") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise MetadataError(f"metadata file {name} is not a readable CSV: {exc}") from None
    if filename_column not in frame.columns:
        cols = ", ".join(map(str, frame.columns)) or "none"
        raise MetadataError(f"{name} has no {filename_column!r} column (columns: {cols}); "
                            "pass --filename-column to name the column holding image paths")
    if len(frame) == 0:
        raise MetadataError(f"{name} has a {filename_column!r} column but no rows: nothing to extract")
    paths, seen, problems = [], set(), []
    for row, value in enumerate(frame[filename_column].tolist()):
        where = f"{name}, row {row} (line {row + 2}), column {filename_column!r}"
        try:
            rel = normalize_relpath(value if isinstance(value, str) else "", where)
        except (MetadataError, PathEscapeError) as exc:
            problems.append(exc)
            continue
        if rel not in seen:
            seen.add(rel)
            paths.append(rel)
    if problems:
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... ({len(problems)} in all)" if len(problems) > 20 else ""
        kind = PathEscapeError if any(isinstance(p, PathEscapeError) for p in problems) else MetadataError
        raise kind(f"{len(problems)} unusable image path(s) in {name}:\n  {shown}{more}")
    return paths


def walk_image_dir(image_dir: Union[str, os.PathLike]) -> List[str]:
    """Every image file under ``image_dir`` (recursively, hidden entries skipped), sorted, relative POSIX paths."""
    root = os.fspath(image_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image directory not found: {root}")
    exts, found = image_extensions(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts:
                found.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    if not found:
        raise FileNotFoundError(f"no image files found under {root} (looked for {', '.join(exts[:8])} ...)")
    return sorted(found)


def list_images(image_dir: Union[str, os.PathLike], metadata=None, filename_column: str = "filename") -> List[str]:
    """The images of a run: those named in ``metadata``, or every image under ``image_dir``."""
    if metadata is None:
        return walk_image_dir(image_dir)
    if not os.path.isdir(os.fspath(image_dir)):
        raise FileNotFoundError(f"image directory not found: {os.fspath(image_dir)}")
    return read_metadata_paths(metadata, filename_column)


def source_facts(image_dir: str, rel: str) -> Tuple[int, int]:
    """(size, mtime_ns) that tell whether a file changed since it was cached; MISSING for an absent file."""
    try:
        st = os.stat(os.path.join(image_dir, rel))
    except OSError:
        return MISSING, MISSING
    return int(st.st_size), int(st.st_mtime_ns)


# --- augmented views ---------------------------------------------------------------------------
def augment(img: Image.Image, view: int, key: str) -> Image.Image:
    """View ``view`` (1-based) of an image, deterministic in (path, view).

    View 1 is the mirror image; later views are crops keeping 70-90% of each side,
    placed by a generator seeded from the path, every other one mirrored too. The
    same file always gives the same views, so cached views are reproducible.
    """
    if view == 1:
        return ImageOps.mirror(img)
    rng = np.random.default_rng([zlib.crc32(key.encode()), view])
    w, h = img.size
    scale = rng.uniform(0.7, 0.9)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((left, top, left + cw, top + ch))
    return ImageOps.mirror(out) if view % 2 == 1 else out


# --- the dataset ---------------------------------------------------------------------------------
@dataclass
class ReadItem:
    """One image as the reader hands it on: a tensor (1 + views, 3, H, W), or the reason it has none."""

    index: int
    path: str
    size: int
    mtime_ns: int
    pixels: Optional[torch.Tensor]
    error: Optional[str]


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ImageReadError):
        return exc.reason
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return f"{exc.__class__.__name__}: {exc}"


class ImageFileDataset(Dataset):
    """``items[i]`` -> ReadItem; decoding and resizing run in whichever process calls it (DataLoader workers).

    With ``uint8=True`` the pixels stay 8-bit (normalised later on the GPU by ``mapper.Normalizer``):
    a quarter of the bytes through shared memory, pinning and the PCIe bus, and no float work in workers.
    """

    def __init__(self, image_dir: str, items: Sequence[Tuple[str, int, int]], preprocessor: Preprocessor,
                 views: int = 0, uint8: bool = False):
        self.image_dir, self.items, self.pre, self.views = os.fspath(image_dir), list(items), preprocessor, int(views)
        self.uint8 = uint8

    def __len__(self) -> int:
        return len(self.items)

    def pixels(self, img: Image.Image) -> torch.Tensor:
        if not self.uint8:
            return self.pre(img)
        p = self.pre
        arr = np.asarray(resize(img, p.image_size, p.resize_mode, p.patch_size), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def load(self, rel: str) -> torch.Tensor:
        img = self.pre.load(os.path.join(self.image_dir, rel))
        views = [img] + [augment(img, v, rel) for v in range(1, self.views + 1)]
        return torch.stack([self.pixels(v) for v in views])

    def __getitem__(self, i: int) -> ReadItem:
        rel, size, mtime = self.items[i]
        try:
            return ReadItem(i, rel, size, mtime, self.load(rel), None)
        except Exception as exc:  # any unreadable file becomes a recorded failure, never a crashed run
            return ReadItem(i, rel, size, mtime, None, failure_reason(exc))


@dataclass
class ReadBatch:
    """What the mapper gets: the readable images stacked, and the unreadable ones with their reasons."""

    paths: List[str]
    sizes: List[int]
    mtimes: List[int]
    pixels: Optional[torch.Tensor]  # (B * (1 + views), 3, H, W), image-major
    failed: Dict[str, Tuple[str, int, int]]

    def __len__(self) -> int:
        return len(self.paths) + len(self.failed)

    def pin_memory(self) -> "ReadBatch":
        # Called by the DataLoader's pin-memory thread (pin_memory=True): page-locked pixels make the
        # host-to-GPU copy asynchronous.
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def collate(items: Sequence[ReadItem]) -> ReadBatch:
    ok = [it for it in items if it.pixels is not None]
    pixels = torch.cat([it.pixels for it in ok]) if ok else None
    failed = {it.path: (it.error, it.size, it.mtime_ns) for it in items if it.pixels is None}
    return ReadBatch([it.path for it in ok], [it.size for it in ok], [it.mtime_ns for it in ok], pixels, failed)
