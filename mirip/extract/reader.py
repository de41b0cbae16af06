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

from mirip.common.metadata_csv import MetadataError, csv_lines, read_metadata_csv
from mirip.common.paths import PathEscapeError, normalize_relpath, outside_target
from mirip.ml.preprocessing import ImageReadError, Preprocessor, resize

MISSING = -1  # size / mtime recorded for a file that does not exist


def image_extensions() -> Tuple[str, ...]:
    """Lower-case extensions PIL can open (``.jpg``, ``.png``, ``.tif`` ...), for walking a directory."""
    return tuple(sorted({ext.lower() for ext in Image.registered_extensions()}))


def read_metadata_frame(metadata: Union[str, os.PathLike, pd.DataFrame], encoding: Optional[str] = None
                        ) -> Tuple[pd.DataFrame, str]:
    """(the metadata as strings, a name for messages): a CSV read with ``read_metadata_csv``, or a DataFrame."""
    if isinstance(metadata, pd.DataFrame):
        return metadata, "metadata"
    name = os.fspath(metadata)
    return read_metadata_csv(name, encoding, dtype=str, keep_default_na=False), name


def read_metadata_paths(metadata: Union[str, os.PathLike, pd.DataFrame], filename_column: str = "filename",
                        encoding: Optional[str] = None, tier_column: Optional[str] = None) -> List[str]:
    """Relative image paths listed in a metadata CSV (or DataFrame), in file order, duplicates dropped.

    Every problem is found before any backbone work: a missing file, no rows, no filename
    column, empty cells, and paths escaping the image directory (all such rows are listed).
    With ``tier_column``, that column must exist and hold S/A/B/C, as training will require.
    """
    frame, name = read_metadata_frame(metadata, encoding)
    if filename_column not in frame.columns:
        cols = ", ".join(map(str, frame.columns)) or "none"
        raise MetadataError(f"{name} has no {filename_column!r} column (columns: {cols}); "
                            "pass --filename-column to name the column holding image paths")
    if len(frame) == 0:
        raise MetadataError(f"{name} has a {filename_column!r} column but no rows: nothing to extract")
    if tier_column:
        check_tier_column(frame, tier_column, name)
    paths, seen, problems = [], set(), []
    lines = csv_lines(frame) or {}
    for row, (label, value) in enumerate(frame[filename_column].items()):
        where = f"{name}, line {lines[label]}" if label in lines else f"{name}, row {row}"
        where += f", column {filename_column!r}"
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


def check_tier_column(frame: pd.DataFrame, tier_column: str, name: str) -> None:
    """The tier column exists and every value is S/A/B/C (what training needs), or a MetadataError naming the file."""
    from mirip.common.tiers import tier_ranks

    if tier_column not in frame.columns:
        cols = ", ".join(map(str, frame.columns)) or "none"
        raise MetadataError(f"{name} has no tier column {tier_column!r} (columns: {cols}); pass --tier-column to "
                            "name it, or --tier-column '' to extract images without tiers")
    try:
        tier_ranks(frame, tier_column, lines=csv_lines(frame))
    except ValueError as exc:
        raise MetadataError(f"{name}: {exc}") from None


def walk_image_dir(image_dir: Union[str, os.PathLike], allow_outside_links: bool = False,
                   skipped: Optional[Dict[str, str]] = None) -> List[str]:
    """Every image file under ``image_dir`` (recursively, hidden entries skipped), sorted, relative POSIX paths.

    Symbolic links: a link to a file is followed when its target lies inside ``image_dir``; a link that resolves
    outside it (file or directory) is skipped unless ``allow_outside_links``. A directory link pointing inside
    is skipped too (its images are listed under their real paths), as is one that would loop. Every skipped
    link is recorded in ``skipped`` (path -> reason) for the run's summary.
    """
    root = os.fspath(image_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image directory not found: {root}")
    skipped = {} if skipped is None else skipped
    exts, found, seen_dirs = image_extensions(), [], {os.path.realpath(root)}
    outside_note = "outside the image directory (pass --allow-outside-links to follow it)"

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel_dir = os.path.relpath(dirpath, root)
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            full, rel = os.path.join(dirpath, d), os.path.normpath(os.path.join(rel_dir, d)).replace(os.sep, "/")
            real = os.path.realpath(full)
            if os.path.islink(full):
                if outside_target(root, rel) is None:
                    skipped[rel] = (f"symbolic link to the directory {real}, inside the image directory: "
                                    "its images are listed under their own paths")
                    continue
                if not allow_outside_links:
                    skipped[rel] = f"symbolic link to the directory {real}, {outside_note}"
                    continue
                if real in seen_dirs:
                    skipped[rel] = f"symbolic link to the directory {real}, already walked (a loop)"
                    continue
            seen_dirs.add(real)
            keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts:
                rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                target = outside_target(root, rel)
                if target is not None and not allow_outside_links:
                    skipped[rel] = f"symbolic link to {target}, {outside_note}"
                else:
                    found.append(rel)
    if not found:
        raise FileNotFoundError(f"no image files found under {root} (looked for {', '.join(exts[:8])} ...)")
    return sorted(found)


def check_links(image_dir: Union[str, os.PathLike], paths: Sequence[str], where: str = "metadata") -> None:
    """Refuse listed paths that a symbolic link takes outside the image directory, naming every one."""
    root = os.fspath(image_dir)
    bad = [(rel, target) for rel in paths if (target := outside_target(root, rel)) is not None]
    if bad:
        shown = "\n  ".join(f"{rel} -> {target}" for rel, target in bad[:20])
        more = f"\n  ... ({len(bad)} in all)" if len(bad) > 20 else ""
        raise PathEscapeError(f"{len(bad)} image path(s) in {where} are symbolic links resolving outside the image "
                              f"directory {root}:\n  {shown}{more}\npass --allow-outside-links to follow them")


def list_images(image_dir: Union[str, os.PathLike], metadata=None, filename_column: str = "filename", *,
                encoding: Optional[str] = None, tier_column: Optional[str] = None, allow_outside_links: bool = False,
                skipped: Optional[Dict[str, str]] = None) -> List[str]:
    """The images of a run: those named in ``metadata``, or every image under ``image_dir``.

    The same link rule holds for both: links resolving outside ``image_dir`` are refused (metadata) or
    skipped and recorded in ``skipped`` (directory walk), unless ``allow_outside_links``.
    """
    if metadata is None:
        return walk_image_dir(image_dir, allow_outside_links, skipped)
    if not os.path.isdir(os.fspath(image_dir)):
        raise FileNotFoundError(f"image directory not found: {os.fspath(image_dir)}")
    paths = read_metadata_paths(metadata, filename_column, encoding, tier_column)
    if not allow_outside_links:
        check_links(image_dir, paths, "metadata" if isinstance(metadata, pd.DataFrame) else os.fspath(metadata))
    return paths


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
