"""Full-image mode from a checkpoint alone: rebuild backbone + preprocessing + head, then score image files.

A checkpoint carries the head's weights and dims and the fingerprint of the
features it was trained on (``mirip.store.checkpoint``). From the fingerprint we
rebuild the same backbone (name, pretrained or seeded-random weights, pooling)
and the same ``Preprocessor`` (image size, resize mode, mean/std), so a freshly
scored image gets the score its cached feature would get through the same head.

Two substitutions are allowed, and announced in ``Scorer.notes``: a local
backbone directory in place of the checkpoint's backbone (e.g. a downloaded copy
of the hub model), and random weights in place of pretrained ones. Anything else
that would change the features (another hub backbone, image size or pooling) is
refused with a ``FingerprintMismatch`` naming the field.

A checkpoint written since calibrations were added also carries the score-to-tier
calibration fitted on its validation split and the training split's score quantiles
(``mirip.training.calibration``): ``Scorer.predict_tier(paths)`` turns a drawing into a
predicted tier, P(S), P(A), P(B), P(C) and a percentile among the training drawings.
An older checkpoint still scores; ``Scorer.calibration_note`` says why it has no tiers.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mirip.common.devices import check_precision, precision_choice, resolve_device
from mirip.common.feature_spec import FeatureSpec, FeatureSpecError, checkpoint_feature_spec, match_entries
from mirip.common.tiers import TIERS
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.openvino_engine import ENGINES
from mirip.ml.preprocessing import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, Preprocessor
from mirip.ml.ranking_model import PairwiseRankingModel, RankingHead
from mirip.store.checkpoint import CheckpointError, load_checkpoint_file
from mirip.store.fingerprint import (FingerprintMismatch, LEGACY_DEFAULTS, bank_layout, check_fingerprint,
                                     make_fingerprint)
from mirip.training.calibration import OrdinalCalibration, from_checkpoint
from mirip.training.calibration import CalibrationError
from mirip.training.typicality import TypicalityFit, flatten_unusual, typicality_from_checkpoint

# What scoring returns: scores with the files that failed, a comparison of two drawings, tier predictions.


@dataclass
class ScoreResult:
    """Scores of the images that could be read, and (path, reason) for those that could not."""

    paths: List[str]
    scores: List[float]
    failures: List[Tuple[str, str]] = field(default_factory=list)
    # Aligned with ``paths``: spread across an ensemble's members (None for one head), typicality in [0, 1]
    # and whether it is below the checkpoint's threshold (None without a typicality fit).
    score_std: Optional[List[float]] = None
    typicality: Optional[List[float]] = None
    unusual: Optional[List[bool]] = None
    member_scores: Optional[List[List[float]]] = None

    def extras(self) -> Dict[str, Dict[str, object]]:
        """path -> the per-drawing fields beside the score that this checkpoint can give."""
        cols = {"score_std": self.score_std, "typicality": self.typicality, "unusual": self.unusual}
        return {p: {k: v[i] for k, v in cols.items() if v is not None} for i, p in enumerate(self.paths)}

    def ranked(self) -> List[Tuple[int, str, float]]:
        """(rank, path, score), best first; rank 1 is the highest score, ties keep input order."""
        order = sorted(range(len(self.scores)), key=lambda i: -self.scores[i])
        return [(r + 1, self.paths[i], self.scores[i]) for r, i in enumerate(order)]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Comparison:
    path_a: str
    path_b: str
    score_a: float
    score_b: float
    # P(a is the better drawing) under the calibrated model (averaged over an ensemble's members); None
    # without a calibration.
    prob_a_better: Optional[float] = None
    score_std_a: Optional[float] = None
    score_std_b: Optional[float] = None
    typicality_a: Optional[float] = None
    typicality_b: Optional[float] = None

    @property
    def margin(self) -> float:
        return abs(self.score_a - self.score_b)

    @property
    def prediction(self) -> int:
        """1 if A is better, -1 if B is better, 0 for a tie (the seed's ``predict_pair`` convention)."""
        return 1 if self.score_a > self.score_b else -1 if self.score_a < self.score_b else 0

    @property
    def better(self) -> Optional[str]:
        return {1: self.path_a, -1: self.path_b}.get(self.prediction)


class CalibrationUnavailable(CalibrationError):
    """Tier predictions asked of a checkpoint that holds no score-to-tier calibration."""


@dataclass(frozen=True)
class TierPrediction:
    """One drawing: its score, most probable tier, P(tier) for S, A, B, C, and percentile among training drawings."""

    path: str
    score: float
    tier: str
    probabilities: Dict[str, float]
    percentile: Optional[float]
    # An unusual drawing's probabilities are pulled toward the validation split's tier shares (how far:
    # ``mirip.training.typicality.flatten_unusual``); None when the checkpoint has no typicality fit.
    typicality: Optional[float] = None
    unusual: Optional[bool] = None

    def as_row(self) -> Dict[str, object]:
        """The scores.csv columns: predicted_tier, p_S, p_A, p_B, p_C, percentile."""
        row: Dict[str, object] = {"predicted_tier": self.tier}
        row.update({f"p_{t}": self.probabilities[t] for t in TIERS})
        row["percentile"] = self.percentile
        return row


@dataclass
class TierPredictions:
    """Predictions of the images that could be read, and (path, reason) for those that could not."""

    predictions: List[TierPrediction]
    failures: List[Tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.predictions)

    def __iter__(self):
        return iter(self.predictions)


# How sure a score is. An ensemble checkpoint (``mirip.training.ensemble``) stores K heads trained on different
# seeds; its ``model_state_dict`` is the first member's, so a reader that knows nothing of ensembles still scores
# with one head. Scoring runs the backbone once and every member's projector and score head on the same
# features: the mean is the score, the standard deviation across members ``score_std``, and tier probabilities
# are the members' probabilities averaged.

@dataclass
class ScoreDetails:
    """Per drawing of a batch: mean score, spread across members (None for one head), typicality (None
    without a fit) and each member's score (K, B)."""

    scores: np.ndarray
    score_std: Optional[np.ndarray]
    typicality: Optional[np.ndarray]
    member_scores: np.ndarray


def ensemble_heads(ckpt: Dict[str, Any], head: Dict[str, Any], device) -> List[RankingHead]:
    """The checkpoint's further members as heads on ``device`` (empty for a single-head checkpoint)."""
    states = (ckpt.get("ensemble") or {}).get("member_states") or []
    heads = []
    for state in states[1:]:  # member 0 is model_state_dict, already in the scorer's model
        h = RankingHead(int(head["input_dim"]), int(head["projector_output_dim"]), float(head.get("margin", 1.0)),
                        int(head["hidden_dim"]), float(head.get("dropout", 0.1)))
        h.load_head_state_dict(state)
        heads.append(h.to(device).eval())
    return heads


@torch.inference_mode()
def score_features(heads, feats: torch.Tensor, fit: Optional[TypicalityFit]) -> ScoreDetails:
    """Every head's score of the same features, their mean and spread, and the features' typicality."""
    per = torch.stack([h.score_head(h.projector(feats)).reshape(-1).float().cpu() for h in heads]).double().numpy()
    std = per.std(axis=0, ddof=1) if len(heads) > 1 else None
    typ = fit.typicality(feats.double().cpu().numpy()) if fit is not None else None
    return ScoreDetails(per.mean(axis=0), std, typ, per)


def tier_probabilities(calibration: OrdinalCalibration, member_scores: np.ndarray) -> np.ndarray:
    """(B, 4) P(S)..P(C): each member's calibrated probabilities, averaged over members."""
    member_scores = np.atleast_2d(np.asarray(member_scores, dtype=np.float64))
    return np.mean([calibration.probabilities(row) for row in member_scores], axis=0)


def prior(calibration: OrdinalCalibration) -> np.ndarray:
    """P(S)..P(C) of the validation split the calibration was fitted on: what is known without looking."""
    counts = np.array([calibration.tier_counts.get(t, 0) for t in TIERS], dtype=np.float64)
    return counts / counts.sum() if counts.sum() > 0 else np.full(4, 0.25)


def flattened(calibration: OrdinalCalibration, probs: np.ndarray, typicality: Optional[np.ndarray],
              fit: Optional[TypicalityFit]) -> np.ndarray:
    """``probs`` with every unusual drawing's row pulled toward the prior (``flatten_unusual``)."""
    if fit is None or typicality is None:
        return probs
    out = np.array(probs, dtype=np.float64)
    p0 = prior(calibration)
    for i, t in enumerate(typicality):
        if t < fit.threshold:
            out[i] = flatten_unusual(out[i], p0, float(t), fit.threshold)
    return out


# Fields of the fingerprint that decide the features' numbers (besides the backbone's identity). Which entries
# (layers, poolings) the head sees comes from the checkpoint's feature spec, checked entry by entry.
FEATURE_FIELDS = ("patch_size", "image_size", "resize_mode", "mean", "std", "color_management")
BACKBONE_FIELDS = ("backbone", "pretrained", "random_init_seed", "backbone_family", "token_layout", "cls_pooling")
PathLike = Union[str, os.PathLike]


def _is_hub_id(name: str) -> bool:
    # "org/name" with no other separators and not a local directory.
    return not os.path.isdir(name) and name.count("/") <= 1 and not name.startswith((".", "/", "~"))


class _ImageFiles(Dataset):
    """Decodes one file per item; a failure becomes (index, None, reason) instead of an exception."""

    def __init__(self, paths: Sequence[str], preprocessor: Preprocessor):
        self.paths, self.preprocessor = list(paths), preprocessor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocessor(self.paths[i]), None
        except (FileNotFoundError, ImageReadError) as exc:
            return i, None, getattr(exc, "reason", None) or str(exc)
        except (OSError, ValueError, MemoryError) as exc:
            return i, None, f"{exc.__class__.__name__}: {exc}"


def _collate(items):
    good = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, r) for i, _, r in items if r is not None]
    idx = [i for i, _ in good]
    batch = torch.stack([t for _, t in good]) if good else None
    return idx, batch, bad


def default_decode_threads() -> int:
    # PIL's decode and resize release the GIL: a few threads keep a bf16 forward fed without loader processes.
    return max(1, min(4, os.cpu_count() or 1))


def _threaded_batches(files: _ImageFiles, batch_size: int, threads: int, ahead: int = 2):
    """``_collate``d batches in file order, decoded by ``threads`` threads up to ``ahead`` batches before the one
    being scored; a file that fails is reported in its own batch, as with a DataLoader."""
    with ThreadPoolExecutor(threads, thread_name_prefix="mirip-decode") as pool:
        pending: deque = deque()
        for start in range(0, len(files), batch_size):
            pending.append([pool.submit(files.__getitem__, i)
                            for i in range(start, min(start + batch_size, len(files)))])
            if len(pending) > ahead:
                yield _collate([f.result() for f in pending.popleft()])
        while pending:
            yield _collate([f.result() for f in pending.popleft()])


class Scorer:
    """A full-image ``PairwiseRankingModel`` plus the ``Preprocessor`` its head was trained with."""

    def __init__(self, model: PairwiseRankingModel, preprocessor: Preprocessor, fingerprint: Optional[dict] = None,
                 notes: Sequence[str] = (), checkpoint: Optional[dict] = None, checkpoint_path: Optional[str] = None,
                 members: Sequence[torch.nn.Module] = ()):
        self.model = model.eval()
        self.preprocessor = preprocessor
        self.fingerprint = fingerprint
        self.notes = list(notes)
        self.checkpoint = checkpoint or {}
        self.checkpoint_path = checkpoint_path
        self.calibration, self.score_reference, self.calibration_note = from_checkpoint(
            self.checkpoint, checkpoint_path or "(none given)")
        # Every head scored: the model's own, then an ensemble checkpoint's further members.
        self.heads = [self.model, *members]
        self.typicality, self.typicality_note = typicality_from_checkpoint(self.checkpoint,
                                                                            checkpoint_path or "(none given)")
        self.compile_info = None  # a mirip.ml.compiled.CompileInfo once ``compile`` was called

    def compile(self, batch_size: int = 16, *, backend: str = "inductor", mode: Optional[str] = None,
                warmup: bool = True):
        """Opt-in: score through a backbone compiled at one fixed batch size (``torch.compile`` mode
        "reduce-overhead", i.e. CUDA graphs, on CUDA; the default mode on CPU). Every batch is padded or split
        to ``batch_size``, so one graph serves them all; scores equal the eager ones within the precision's
        tolerance. With ``warmup`` the compiling call runs now (``compile_info.compile_seconds``). A feature
        spec that reads intermediate blocks cannot compile: it scores eager and ``compile_info.reason`` says
        why. Returns the ``CompileInfo``."""
        from mirip.ml.compiled import compile_full_image

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.compile_info = compile_full_image(
            self.model.feature_extractor, batch_size=batch_size, backend=backend, mode=mode,
            image_size=self.preprocessor.image_size if warmup else None)
        return self.compile_info

    @property
    def has_tiers(self) -> bool:
        """True when the checkpoint carries a score-to-tier calibration (see ``calibration_note`` otherwise)."""
        return self.calibration is not None

    @classmethod
    def from_checkpoint(cls, path: PathLike, **kwargs) -> "Scorer":
        return load_scorer(path, **kwargs)

    @property
    def device(self) -> str:
        return self.model.device

    @property
    def pretrained(self) -> bool:
        return bool(self.model.feature_extractor.info.pretrained)

    @property
    def weights(self) -> str:
        """'pretrained' or 'random', as written into every output file."""
        return "pretrained" if self.pretrained else "random"

    def describe(self) -> Dict[str, object]:
        ext = self.model.feature_extractor
        return {
            "checkpoint": self.checkpoint_path,
            "backbone": ext.info.name,
            "weights": self.weights,
            "image_size": self.preprocessor.image_size,
            "resize_mode": self.preprocessor.resize_mode,
            "pooling": ext.pooling,
            "feature_spec": str(FeatureSpec.from_entries(ext.entry_names)),
            "precision": runs_in(ext)[1],
            "engine": runs_in(ext)[0],
            "device": str(self.device),
            "epoch": self.checkpoint.get("epoch"),
            "accuracy": self.checkpoint.get("accuracy"),
            "ensemble_members": len(self.heads),
            "typicality": (f"Mahalanobis distance to the {self.typicality.num_train} training drawings' features; "
                           f"unusual below a typicality of {self.typicality.threshold:.0%} "
                           "(log-normal tail of the validation distances)"
                           if self.typicality is not None else self.typicality_note),
        }

    @torch.inference_mode()
    def score_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (B,) for a preprocessed (B, 3, H, W) batch (an ensemble's: the members' mean)."""
        if len(self.heads) == 1:
            return self.model.get_score(images).reshape(-1).float().cpu()
        return torch.from_numpy(self.score_details(images).scores).float()

    @torch.inference_mode()
    def score_details(self, images: torch.Tensor) -> ScoreDetails:
        """Mean score, spread across members, typicality and members' scores of a preprocessed batch."""
        return score_features(self.heads, self.model.embed(images), self.typicality)

    def score_paths(self, paths: Iterable[PathLike], batch_size: int = 16, num_workers: int = 0,
                    progress: bool = True, decode_threads: Optional[int] = None) -> ScoreResult:
        """Score image files in batches; unreadable files are collected as (path, reason), not raised.

        With ``num_workers`` 0 the files are decoded by ``decode_threads`` threads (default: the CPU count, at
        most 4; 1 decodes in this thread) ahead of the forward; ``num_workers`` > 0 uses DataLoader processes."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        threads = default_decode_threads() if decode_threads is None else int(decode_threads)
        if threads <= 0:
            raise ValueError(f"decode_threads must be positive, got {decode_threads}")
        paths = [os.fspath(p) for p in paths]
        files = _ImageFiles(paths, self.preprocessor)
        if num_workers == 0 and threads > 1:
            loader = _threaded_batches(files, batch_size, threads)
        else:
            loader = DataLoader(files, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                                pin_memory=str(self.device).startswith("cuda"))
        rows: Dict[int, Tuple] = {}
        failures: Dict[int, str] = {}
        bar = tqdm(total=len(paths), desc="score", unit="img", disable=not progress)
        for idx, batch, bad in loader:
            failures.update(bad)
            if batch is not None:
                d = self.score_details(batch)
                for j, i in enumerate(idx):
                    rows[i] = (float(d.scores[j]), None if d.score_std is None else float(d.score_std[j]),
                               None if d.typicality is None else float(d.typicality[j]),
                               d.member_scores[:, j].tolist())
            bar.update(len(idx) + len(bad))
        bar.close()
        ok = sorted(rows)

        def column(k: int) -> Optional[list]:
            return [rows[i][k] for i in ok] if ok and rows[ok[0]][k] is not None else None

        typ = column(2) if self.typicality is not None else None
        return ScoreResult([paths[i] for i in ok], [rows[i][0] for i in ok],
                           [(paths[i], failures[i]) for i in sorted(failures)],
                           score_std=column(1) if len(self.heads) > 1 else None, typicality=typ,
                           unusual=None if typ is None else [bool(u) for u in self.typicality.unusual(typ)],
                           member_scores=column(3))

    def explain(self, paths: Iterable[PathLike], batch_size: int = 8, num_workers: int = 0, steps: int = 32,
                progress: bool = True):
        """Where each drawing's score comes from: an ``ExplainResult`` of ``mirip.scoring.explain.Explanation`` (a
        per-patch map of score - blank-page score, numpy, plus the grid's geometry), unreadable files as
        (path, reason). Exact per patch for mean/std entries, first order for cls ones (``mirip.scoring.explain``)."""
        return self._explainer_for(steps).explain_paths(list(paths), batch_size=batch_size,
                                                        num_workers=num_workers, progress=progress)

    def explain_images(self, images: Sequence[Tuple[str, object]], batch_size: int = 8, steps: int = 32):
        """``explain`` for decoded PIL images given as (name, image): a list of ``Explanation``."""
        return self._explainer_for(steps).explain_images(list(images), batch_size=batch_size)

    def _explainer_for(self, steps: int):
        from mirip.scoring.explain import Explainer

        if getattr(self, "_explainer", None) is None or self._explainer.steps != steps:
            self._explainer = Explainer(self, steps=steps)  # keeps the blank page's features between calls
        return self._explainer

    def compare(self, path_a: PathLike, path_b: PathLike) -> Comparison:
        """Score two drawings in one batch; raises ImageReadError / FileNotFoundError naming a bad file.

        With a calibration, ``prob_a_better`` is P(a's latent quality > b's) under the calibrated model."""
        a, b = os.fspath(path_a), os.fspath(path_b)
        d = self.score_details(torch.stack([self.preprocessor(a), self.preprocessor(b)]))
        p = (float(sum(self.calibration.prob_first_better(m[0], m[1]) for m in d.member_scores) / len(self.heads))
             if self.calibration is not None else None)
        std = [None, None] if d.score_std is None else [float(x) for x in d.score_std]
        typ = [None, None] if d.typicality is None else [float(x) for x in d.typicality]
        return Comparison(a, b, float(d.scores[0]), float(d.scores[1]), p, std[0], std[1], typ[0], typ[1])

    def tiers_for_scores(self, paths: Sequence[str], scores: Sequence[float],
                         typicality: Optional[Sequence[float]] = None,
                         member_scores: Optional[Sequence[Sequence[float]]] = None) -> List[TierPrediction]:
        """Tier predictions for scores already computed (e.g. by ``score_paths``). With ``member_scores`` (per
        drawing, each member's score) the probabilities are the members' averaged; with ``typicality`` an
        unusual drawing's probabilities are pulled toward the prior (``flattened``)."""
        if self.calibration is None:
            raise CalibrationUnavailable(self.calibration_note)
        if not len(scores):
            return []
        probs = (tier_probabilities(self.calibration, list(zip(*member_scores))) if member_scores is not None
                 else self.calibration.probabilities(scores))
        fit = self.typicality if typicality is not None else None
        probs = flattened(self.calibration, probs, typicality, fit)
        pct = (self.score_reference.percentile(scores).tolist() if self.score_reference is not None
               else [None] * len(scores))
        out = []
        for i, (path, score, p, q) in enumerate(zip(paths, scores, probs, pct)):
            tier = TIERS[int(max(range(4), key=lambda j: p[j]))]
            typ = None if fit is None else float(typicality[i])
            out.append(TierPrediction(str(path), float(score), tier, {t: float(p[j]) for j, t in enumerate(TIERS)},
                                      None if q is None else float(q), typ,
                                      None if typ is None else bool(typ < fit.threshold)))
        return out

    def predict_tier(self, paths: Iterable[PathLike], batch_size: int = 16, num_workers: int = 0,
                     progress: bool = True) -> TierPredictions:
        """Predicted tier, P(S), P(A), P(B), P(C) and percentile among the training drawings, per image file.

        Raises ``CalibrationUnavailable`` (with the reason) for a checkpoint without a calibration;
        unreadable files are collected as (path, reason), not raised."""
        if self.calibration is None:
            raise CalibrationUnavailable(self.calibration_note)
        result = self.score_paths(paths, batch_size=batch_size, num_workers=num_workers, progress=progress)
        return TierPredictions(self.tiers_for_scores(result.paths, result.scores, result.typicality,
                                                     result.member_scores), result.failures)


# A backbone rebuilt for scoring that differs from the checkpoint's: the checkpoint holds the truth.
REBUILT = {"holder": "expected", "asker": "the backbone this command built",
           "fix": "pass --backbone a local directory holding the backbone the checkpoint was trained with"}
# A checkpoint that would share a backbone already loaded for another one (several heads in one service).
SHARED = {"holder": "expected", "asker": "the backbone already loaded for the first checkpoint",
          "fix": "serve this checkpoint from its own process: heads share one backbone only when their features "
                 "come from the same backbone and preprocessing"}


def _fingerprint_from(ckpt: dict, path: str, backbone: Optional[str], image_size: Optional[int],
                      notes: List[str]) -> dict:
    """The checkpoint's fingerprint; an old/foreign checkpoint without one needs the caller's backbone + image size."""
    fp = ckpt.get("fingerprint")
    if fp:
        return dict(fp)
    info = ckpt.get("backbone") or {}
    name = backbone or info.get("name")
    if not name or image_size is None:
        raise CheckpointError(
            f"checkpoint {path} has no feature fingerprint, so the backbone and preprocessing it was trained with are "
            "unknown; pass the backbone and image size explicitly (--backbone, --image-size)"
        )
    notes.append("checkpoint has no feature fingerprint: using the backbone and image size given; "
                 "that they match the training features is NOT verified")
    return {"backbone": name, "pretrained": bool(info.get("pretrained", True)), "image_size": int(image_size),
            "resize_mode": "pad", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "pooling": "cls",
            "patch_size": int(info.get("patch_size", 14)), "random_init_seed": info.get("random_init_seed", -1)}


def load_scorer(
    checkpoint_path: PathLike,
    *,
    backbone: Optional[str] = None,
    random_init: Optional[bool] = None,
    image_size: Optional[int] = None,
    pooling: Optional[str] = None,
    device: Optional[str] = None,
    precision: Optional[str] = None,
    share_backbone: Optional[DINOv2FeatureExtractor] = None,
    engine: str = "torch",
    engine_cache: Optional[str] = None,
) -> Scorer:
    """Rebuild the full-image model a checkpoint was trained for.

    ``backbone``: a local directory substitutes for the checkpoint's backbone (announced); a different hub
    id is refused. ``random_init``: True substitutes random weights for pretrained ones (announced); None
    follows the checkpoint. ``image_size`` / ``pooling``: if given, must equal the checkpoint's (else refused,
    naming the field). ``precision`` defaults to the precision the checkpoint's features were made in (fp32 or
    bf16), else the chip's (``mirip.common.devices.precision_choice``).
    ``share_backbone``: an extractor already loaded (another checkpoint's) whose backbone module this scorer uses
    instead of loading its own; its fingerprint must agree with this checkpoint's, else ``FingerprintMismatch`` names the field.
    ``engine``: "torch", or "openvino" (``mirip.ml.openvino_engine``: the backbone + bank compiled for the CPU, its
    IR cached under ``engine_cache``; ``precision`` is then the plugin's hint, the torch copy converted is fp32).
    A checkpoint trained on features of one engine scores with the other (features agree to cos >= 0.9999,
    measured; announced in ``notes``).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "openvino" and share_backbone is not None:
        raise ValueError("an OpenVINO engine is attached to a whole backbone's bank, not to a shared one "
                         "(mirip.serve.heads.HeadSet attaches it to the heads' union)")
    path = os.fspath(checkpoint_path)
    ckpt = load_checkpoint_file(path)
    what = f"checkpoint {path}"
    notes: List[str] = []
    fp = _fingerprint_from(ckpt, path, backbone, image_size, notes)
    head = ckpt.get("head")
    if not head or "input_dim" not in head:
        raise CheckpointError(f"{what} has no head config ('head' with input_dim, hidden_dim, projector_output_dim, "
                              "dropout, margin); it was not written by a mirip trainer")

    requested = {k: v for k, v in (("image_size", image_size), ("pooling", pooling)) if v is not None}
    check_fingerprint(fp, requested, what=what, ignore=(), only=requested, holder="expected", fix=(
        "leave out " + " and ".join(f"--{k.replace('_', '-')}" for k in requested)
        + ": the checkpoint's values are used by default"))

    name, rand, substituted = _backbone_choice(fp, backbone, random_init, what, notes)

    spec = FeatureSpec.parse(checkpoint_feature_spec(ckpt))
    wording = REBUILT
    if share_backbone is not None:
        extractor, wording = share_backbone.sharing_backbone(spec), SHARED
    else:
        device = resolve_device(device)
        torch_precision = ("fp32" if engine == "openvino" else
                           precision_choice(device, precision, fp.get("precision"))[0])
        extractor = DINOv2FeatureExtractor(name, device=device, random_init=rand, entries=spec,
                                           precision=check_precision(torch_precision))
    extractor.set_entry_scales(ckpt.get("feature_scales"))
    preprocessor = _preprocessor_from(fp, extractor)
    extractor.check_image_size(preprocessor.image_size)
    rebuilt = make_fingerprint(extractor, preprocessor)
    compare = [k for k in FEATURE_FIELDS + BACKBONE_FIELDS if k in fp and k not in substituted]
    check_fingerprint(fp, rebuilt, what=what, ignore=(), only=compare, **wording)
    if int(head["input_dim"]) != extractor.output_dim:
        raise FingerprintMismatch({"feature_dim": (int(head["input_dim"]), extractor.output_dim)}, what, **wording)
    _check_spec_blocks(spec, fp, extractor, what, wording)
    if engine == "openvino":  # after every check: a checkpoint refused costs no conversion
        from mirip.ml.openvino_engine import attach_openvino

        attach_openvino(extractor, preprocessor.image_size, engine_cache, precision)
    notes += engine_notes(fp, extractor)

    model = _model_with_head(name, head, ckpt["model_state_dict"], extractor)
    return Scorer(model, preprocessor, fingerprint=fp, notes=notes, checkpoint=ckpt, checkpoint_path=path,
                  members=ensemble_heads(ckpt, head, extractor.device))


def runs_in(extractor: DINOv2FeatureExtractor) -> Tuple[str, str]:
    """(engine, precision) an extractor's features are computed in."""
    if extractor.engine is not None:
        return "openvino", extractor.engine.info.precision
    return "torch", extractor.precision


def engine_notes(fp: dict, extractor: DINOv2FeatureExtractor) -> List[str]:
    """What differs between how a checkpoint's features were made and how they are computed now: allowed
    (features agree within the precision's tolerance; across engines to cos >= 0.9999, measured) and said."""
    engine, precision = runs_in(extractor)
    notes = []
    if fp.get("precision") and fp["precision"] != precision:
        notes.append(f"features were made in {fp['precision']}, scoring runs in {precision}: "
                     "scores agree within that precision's tolerance")
    made = fp.get("engine", LEGACY_DEFAULTS["engine"])
    if made != engine:
        notes.append(f"features were made with the {made} engine, scoring runs on {engine}: features agree to "
                     "cos >= 0.9999 (measured, docs/benchmarks.md), so the head's scores hold")
    return notes


def _backbone_choice(fp: dict, backbone: Optional[str], random_init: Optional[bool], what: str,
                     notes: List[str]) -> Tuple[str, bool, List[str]]:
    """(backbone to load, random weights?, fingerprint fields substituted): the checkpoint's unless a local
    directory or random weights were asked for, each substitution announced in ``notes``."""
    trained_name, trained_pretrained = str(fp["backbone"]), bool(fp.get("pretrained", True))
    name, substituted = trained_name, []
    if backbone is not None:
        name = os.path.expanduser(str(backbone))
        if name.rstrip("/") != trained_name.rstrip("/"):
            if not os.path.isdir(name):
                if _is_hub_id(name):
                    raise FingerprintMismatch({"backbone": (trained_name, name)}, what, holder="expected",
                                              fix="leave out --backbone, or pass a local directory holding the "
                                                  "checkpoint's backbone")
                raise FileNotFoundError(f"backbone directory {name!r} does not exist")
            notes.append(f"substituted local backbone directory {name} for the checkpoint's backbone {trained_name}")
            substituted.append("backbone")
    rand = (not trained_pretrained) if random_init is None else bool(random_init)
    if rand != (not trained_pretrained):
        substituted += ["pretrained", "random_init_seed"]
        if rand:
            notes.append(f"substituted RANDOM weights for the pretrained backbone {trained_name}: "
                         "scores carry no learned meaning")
        else:
            notes.append("substituted pretrained weights for the random backbone the head was trained on: "
                         "scores will not match training")
    if rand:
        notes.append("the backbone has RANDOM (untrained) weights: scores only exercise the pipeline")
    return name, rand, substituted


def _preprocessor_from(fp: dict, extractor: DINOv2FeatureExtractor) -> Preprocessor:
    """The preprocessing the checkpoint's features were made with, from its fingerprint."""
    return Preprocessor(
        image_size=int(fp["image_size"]), resize_mode=fp.get("resize_mode", "pad"),
        mean=tuple(fp.get("mean", IMAGENET_MEAN)), std=tuple(fp.get("std", IMAGENET_STD)),
        patch_size=int(fp.get("patch_size", extractor.patch_size)),
        # A head trained on features made before ICC conversion existed scores images the way they were read.
        color_management=fp.get("color_management", LEGACY_DEFAULTS["color_management"]),
    )


def _model_with_head(name: str, head: dict, state: dict, extractor: DINOv2FeatureExtractor) -> PairwiseRankingModel:
    """The checkpoint's head (dims from its ``head`` config, weights from ``state``) on ``extractor``."""
    model = PairwiseRankingModel(
        name, projector_output_dim=int(head["projector_output_dim"]), margin=float(head.get("margin", 1.0)),
        hidden_dim=int(head["hidden_dim"]), dropout=float(head.get("dropout", 0.1)), feature_extractor=extractor,
    )
    model.load_head_state_dict(state)
    # The head's tensors came from map_location="cpu"; move them to where the backbone lives.
    model.to(extractor.device)
    return model


def _check_spec_blocks(spec: FeatureSpec, fp: dict, extractor: DINOv2FeatureExtractor, what: str,
                       wording: dict = REBUILT) -> None:
    """The rebuilt backbone reads the same blocks and widths the training cache recorded for the spec's entries."""
    names, blocks, dims, num_layers = bank_layout(fp)
    try:
        picked = match_entries(spec, names, blocks, num_layers, where=f"the cache {what} was trained on")
    except FeatureSpecError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    if blocks is not None:
        trained = [int(blocks[i]) for i in picked]
        if trained != list(extractor.entry_blocks):
            raise FingerprintMismatch({"feature_entry_blocks": (trained, list(extractor.entry_blocks))}, what, **wording)
    trained_dims = [int(dims[i]) for i in picked]
    if all(trained_dims) and trained_dims != list(extractor.entry_dims):  # 0: unknown (no fingerprint)
        raise FingerprintMismatch({"feature_entry_dims": (trained_dims, list(extractor.entry_dims))}, what, **wording)


__all__ = ["Scorer", "load_scorer", "FEATURE_FIELDS", "BACKBONE_FIELDS", "REBUILT", "SHARED"]
