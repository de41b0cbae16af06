"""The suggest command's work: score every drawing of the metadata with one checkpoint or several (an
ensemble's members), count the judgments each already has, and write the pairs ``suggest_pairs`` picks as a
judgments CSV with the winner left blank for the teacher, plus P(a better) and the reason."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from mirip.common.feature_spec import apply_entry_scales, checkpoint_feature_spec
from mirip.common.judgments import JUDGMENT_COLUMNS, read_judgments
from mirip.judging.suggest import SPREAD_COMPONENTS, SUGGEST_WINDOW, spread_embedding, suggest_pairs
from mirip.ml.ranking_model import RankingHead
from mirip.store.checkpoint import load_checkpoint_file
from mirip.training.calibration import from_checkpoint, logistic_difference_cdf
from mirip.training.judged_pairs import all_scores
from mirip.training.run_data import load_bank_features, read_metadata

SUGGESTION_COLUMNS = JUDGMENT_COLUMNS + ("p_a_better", "reason")


@dataclass
class SuggestConfig:
    """One suggestion run's choices."""

    checkpoints: List[str]
    features: str
    metadata: str
    output: str
    judgments: Optional[str] = None
    count: int = 50
    window: int = SUGGEST_WINDOW
    components: int = SPREAD_COMPONENTS  # principal axes of the features the pairs spread over; 0: none
    seed: int = 0
    filename_column: str = "filename"
    tier_column: str = "tier"
    encoding: Optional[str] = None


def checkpoint_features(checkpoint: str, features: str, names: List[str]):
    """(the checkpoint, the cached features of ``names`` as its head reads them)."""
    ckpt = load_checkpoint_file(checkpoint)
    if ckpt.get("head") is None:
        raise ValueError(f"{checkpoint} has no head dims (key 'head'); it was not written by mirip's Trainer")
    feats, _, _, dims = load_bank_features(features, names, checkpoint_feature_spec(ckpt), ckpt.get("fingerprint"),
                                           ignore_layout=True)
    return ckpt, apply_entry_scales(feats.float(), dims, ckpt.get("feature_scales"))


def member_scores(checkpoint: str, features: str, names: List[str]):
    """(scores of ``names`` under one checkpoint's head, its calibration slope or None)."""
    ckpt, feats = checkpoint_features(checkpoint, features, names)
    head = RankingHead(**ckpt["head"])
    head.load_head_state_dict(ckpt["model_state_dict"])
    calibration, _, _ = from_checkpoint(ckpt, checkpoint)
    return all_scores(head, feats), (calibration.slope if calibration is not None else None)


def ensemble_scores(checkpoints: List[str], features: str, names: List[str]):
    """(scores of ``names``, (members, N), one row per checkpoint; score difference -> P(a better) under the
    members' mean calibration slope (1 where none is calibrated); the checkpoints without a calibration)."""
    members, slopes = zip(*(member_scores(c, features, names) for c in checkpoints))
    known = [s for s in slopes if s is not None]
    slope = float(np.mean(known)) if known else 1.0
    uncalibrated = [c for c, s in zip(checkpoints, slopes) if s is None]

    def probability(d):
        return logistic_difference_cdf(slope * d)

    return np.stack(members), probability, uncalibrated


def suggest_from_files(cfg: SuggestConfig, log=print) -> Dict[str, Any]:
    """Score, count, choose, write ``cfg.output``; a summary of what was done."""
    if cfg.count <= 0:
        raise ValueError(f"--count must be positive, got {cfg.count}")
    if cfg.components < 0:
        raise ValueError(f"--spread-components must be 0 (off) or more, got {cfg.components}")
    meta = read_metadata(cfg.metadata, cfg.filename_column, cfg.tier_column, cfg.encoding)
    names = meta[cfg.filename_column].astype(str).tolist()
    members, probability, _ = ensemble_scores(cfg.checkpoints, cfg.features, names)
    at = {n: i for i, n in enumerate(names)}
    counts = np.zeros(len(names))
    judged = set()
    if cfg.judgments:
        frame = read_judgments(cfg.judgments, encoding=cfg.encoding, known=names)
        for a, b in zip(frame["a"], frame["b"]):
            counts[at[a]] += 1
            counts[at[b]] += 1
            judged.add(frozenset((at[a], at[b])))
    embedding = None
    if cfg.components > 0:
        embedding = spread_embedding(checkpoint_features(cfg.checkpoints[0], cfg.features, names)[1].numpy(),
                                     cfg.components)
    log(f"scored {len(names)} drawings with {len(members)} checkpoint(s); {len(judged)} distinct pairs already judged")
    picks = suggest_pairs(members, counts, judged, cfg.count, probability=probability,
                          rng=np.random.default_rng(cfg.seed), window=cfg.window, embedding=embedding)
    write_suggestions(cfg.output, [(names[i], names[j], reason, p) for i, j, reason, p in picks])
    shown = np.bincount(np.array([[i, j] for i, j, _, _ in picks]).reshape(-1), minlength=len(names)) if picks \
        else np.zeros(len(names), dtype=int)
    return {"pairs": len(picks), "drawings": int((shown > 0).sum()), "most_per_drawing": int(shown.max()),
            "output": cfg.output, "mean_p_a_better_distance": float(np.mean([abs(p - 0.5) for *_, p in picks]))
            if picks else None}


def write_suggestions(path: str, rows) -> None:
    """A judgments CSV with the winner blank (the teacher fills in a, b or tie), P(a better) and the reason."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(SUGGESTION_COLUMNS)
        for a, b, reason, p in rows:
            writer.writerow([a, b, "", "", "", f"{p:.4f}", reason])
