"""What a scoring run reads besides the checkpoint: image files found in folders, the metadata name of each
file, and which split of the checkpoint's run each drawing was in."""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from mirip.training.calibration_reference import names_sha256

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PathLike = Union[str, os.PathLike]


def match_paths(paths: Sequence[str], names: Sequence[str], roots: Sequence[str]) -> Dict[str, str]:
    """path -> metadata name: the path relative to one of ``roots`` (directories), else a unique basename."""
    by_name = {os.path.normpath(str(n)): str(n) for n in names}
    base_counts: Dict[str, int] = {}
    for n in by_name:
        base_counts[os.path.basename(n)] = base_counts.get(os.path.basename(n), 0) + 1
    by_base = {os.path.basename(n): orig for n, orig in by_name.items() if base_counts[os.path.basename(n)] == 1}
    out = {}
    for p in paths:
        rels = [os.path.normpath(os.path.relpath(p, r)) for r in roots if os.path.isdir(r)]
        name = next((by_name[r] for r in rels if r in by_name), None) or by_base.get(os.path.basename(p))
        if name is not None:
            out[p] = name
    return out


def split_membership(checkpoint: dict, metadata_path: str, encoding: Optional[str] = None
                     ) -> Tuple[Dict[str, str], Optional[str]]:
    """filename -> "train" / "val" / "test" as the checkpoint's run split ``metadata_path``, and a note.

    The split is rebuilt from the run config stored in the checkpoint. When the checkpoint records which
    images were its training split (``score_reference.images_sha256``) the rebuilt train split must match
    it, else ({}, why) is returned: the metadata is not the file the model was trained on.
    """
    from mirip.training.run_config import RunConfig
    from mirip.training.run_data import read_metadata
    from mirip.training.run_data import split_names

    run_cfg = checkpoint.get("run_config")
    if not run_cfg:
        return {}, "the checkpoint holds no run config, so which drawings it was trained on is unknown"
    try:
        cfg = RunConfig.from_dict({**run_cfg, "metadata": metadata_path})
        meta = read_metadata(metadata_path, cfg.filename_column, cfg.tier_column, encoding)
        # The run's split, without the images it left out because extraction could not read them.
        by_split = split_names(meta, cfg.splitter(), cfg.filename_column, checkpoint.get("excluded_images") or ())
    except (ValueError, KeyError, TypeError) as exc:
        return {}, f"the run's split could not be rebuilt from {metadata_path} ({exc})"
    out = {name: split for split, chosen in by_split.items() for name in chosen}
    expected = (checkpoint.get("score_reference") or {}).get("images_sha256")
    if expected is not None:
        train = by_split["train"]
        got = names_sha256(train)
        if got != expected:
            return {}, (f"{metadata_path} does not give the training split the checkpoint was trained on "
                        f"({len(train)} train images rebuilt, different names)")
        return out, None
    return out, "split rebuilt from the run config; not verified against the checkpoint"


def find_images(inputs: Iterable[PathLike], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Tuple[List[str], List[str]]:
    """Expand files and directories (recursively, image extensions only, sorted) into image paths.

    Returns (images, missing): a named file is always included (so a broken one is reported, not skipped);
    a path that does not exist goes to ``missing``.
    """
    images: List[str] = []
    missing: List[str] = []
    seen = set()
    exts = tuple(e.lower() for e in extensions)
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = []
            for root, dirs, files in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in files if f.lower().endswith(exts) and not f.startswith(".")]
            candidates = sorted(found)
        elif os.path.exists(item):
            candidates = [item]
        else:
            missing.append(item)
            continue
        for c in candidates:
            if c not in seen:
                seen.add(c)
                images.append(c)
    return images, missing
