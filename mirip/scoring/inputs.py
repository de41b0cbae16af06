"""What a scoring run reads besides the checkpoint and the images: the metadata name of each file, and which
split of the checkpoint's run each drawing was in."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from mirip.training.calibration import names_sha256


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


def split_membership(checkpoint: dict, metadata_path: Optional[str] = None, encoding: Optional[str] = None, *,
                     run_metadata: Optional[str] = None) -> Tuple[Dict[str, str], Optional[str]]:
    """filename -> "train" / "val" / "test" in the checkpoint's run, and a note (None: verified).

    The split is rebuilt with the run config stored in the checkpoint from the first of ``run_metadata``
    (the run's metadata, moved), the metadata file the run config names, and ``metadata_path``, whose
    rebuilt train split is the one the checkpoint records (``score_reference.images_sha256``). A file of
    other drawings (new ones with their tiers) splits differently, so it never stands in for the run's: its
    drawings are simply not in the run. A checkpoint without that record: the run's own file, unverified.
    ({}, why) when no file qualifies: which drawings the run saw is then unknown.
    """
    run_cfg = checkpoint.get("run_config")
    if not run_cfg:
        return {}, "the checkpoint holds no run config, so which drawings it was trained on is unknown"
    expected = (checkpoint.get("score_reference") or {}).get("images_sha256")
    run_files = [p for p in (run_metadata, run_cfg.get("metadata")) if p]
    reasons = []
    for path in _distinct(run_files + ([metadata_path] if metadata_path else [])):
        if not os.path.isfile(path):
            reasons.append(f"the run's metadata {path} is not found")
            continue
        own = path in run_files
        by_split, why = _rebuilt_split(checkpoint, run_cfg, path, run_cfg.get("encoding") if own else encoding)
        if by_split is None:
            reasons.append(why)
        elif expected is not None and names_sha256(by_split["train"]) == expected:
            return _by_name(by_split), None
        elif expected is None and own:
            return _by_name(by_split), (f"split rebuilt from {path} with the run config; not verified (the "
                                        "checkpoint predates the record of its training images)")
        elif expected is not None:
            reasons.append(f"{path} is not the run's metadata (its rebuilt train split differs from the "
                           "checkpoint's)")
        else:
            reasons.append(f"{path} cannot be checked against this older checkpoint")
    return {}, "; ".join(reasons or ["the run config names no metadata file"])


def _distinct(paths: Sequence[str]) -> List[str]:
    seen, out = set(), []
    for p in paths:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _rebuilt_split(checkpoint: dict, run_cfg: dict, path: str, encoding: Optional[str]
                   ) -> Tuple[Optional[Dict[str, List[str]]], Optional[str]]:
    """(split -> names as the run split ``path``, None), or (None, why it could not be rebuilt)."""
    # training code only when asked for
    from mirip.training.run_config import RunConfig
    from mirip.training.run_data import read_metadata, split_names

    try:
        cfg = RunConfig.from_dict({**run_cfg, "metadata": path})
        meta = read_metadata(path, cfg.filename_column, cfg.tier_column, encoding)
        # The run's split, without the images it left out because extraction could not read them.
        return split_names(meta, cfg.splitter(), cfg.filename_column, checkpoint.get("excluded_images") or ()), None
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"the run's split could not be rebuilt from {path} ({exc})"


def _by_name(by_split: Dict[str, List[str]]) -> Dict[str, str]:
    return {name: split for split, chosen in by_split.items() for name in chosen}
