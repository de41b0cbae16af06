"""Evaluator: pairwise accuracy of a ranking model, and the detailed report (per tier pair, Spearman, Kendall).

Given a score-to-tier calibration (``mirip.training.calibration``), the detailed report also
holds the tier figures: tier accuracy, mean absolute tier error, the 4x4 confusion
matrix and the expected calibration error (named in the report).

Datasets that can list their images (``FeaturePairDataset``, ``PairwiseDataset``)
are scored one image at a time - each image once, however many pairs it is in -
and every metric is read off those scores. A ``DataLoader`` over such a dataset
is honoured: when its sampler or ``drop_last`` yields only some pairs (or some
twice), the pair metrics count exactly the pairs it would yield. Any other loader
of ``(x1, x2, labels)`` batches still gets the seed's keys, computed pair by pair.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from mirip.common.devices import resolve_device
from mirip.training.bootstrap import with_interval
from mirip.training.calibration import OrdinalCalibration
from mirip.training.calibration_metrics import tier_metrics
from mirip.training.metrics import score_metrics


def _dataset_of(loader: Any) -> Any:
    return getattr(loader, "dataset", loader)


def can_score_images(loader: Any) -> bool:
    ds = _dataset_of(loader)
    return all(hasattr(ds, a) for a in ("image_batches", "pair_arrays", "ranks"))


def loader_pair_indices(loader: Any, num_pairs: int) -> Optional[np.ndarray]:
    """The pair indices a DataLoader would yield, in order; None when it yields every pair exactly once."""
    if not isinstance(loader, DataLoader):
        return None  # the dataset itself (FeaturePairDataset is its own loader): all of its pairs
    sampler, batches = loader.sampler, loader.batch_sampler
    every_pair = isinstance(sampler, SequentialSampler) or (
        isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == num_pairs)
    whole_batches = batches is None or (type(batches) is BatchSampler and (
        not batches.drop_last or num_pairs % batches.batch_size == 0))
    if every_pair and whole_batches:
        return None  # order does not change any metric; skip drawing a permutation
    indices = [i for batch in batches for i in batch] if batches is not None else list(sampler)
    return np.asarray(indices, dtype=np.int64)


@torch.no_grad()
def score_images(model: nn.Module, dataset: Any, device: str, batch_size: Optional[int] = None) -> np.ndarray:
    """One score per image of the dataset, in its image order (model in eval mode)."""
    model.eval()
    batch_size = batch_size or getattr(dataset, "SCORE_BATCH", 64)
    scores = np.empty(dataset.num_images, dtype=np.float64)
    for idx, inputs in dataset.image_batches(batch_size):
        scores[idx] = model.get_score(inputs.to(device)).reshape(-1).double().cpu().numpy()
    return scores


class Evaluator:
    """``Evaluator(model, device=None)``: ``evaluate``, ``evaluate_detailed``, ``predict_pair``."""

    def __init__(self, model: nn.Module, device: Optional[str] = None, *, score_batch_size: Optional[int] = None,
                 calibration: Optional[OrdinalCalibration] = None):
        self.device = resolve_device(device if device is not None else getattr(model, "device", None))
        self.model = model.to(self.device)
        self.score_batch_size = score_batch_size
        self.calibration = calibration

    def _pairwise(self, dataloader: Iterable) -> Tuple[int, int]:
        """(correct, total) pair by pair, for loaders that cannot list their images."""
        self.model.eval()
        correct = total = 0
        with torch.no_grad():
            for x1, x2, labels in dataloader:
                s1, s2 = self.model(x1.to(self.device), x2.to(self.device))
                labels = torch.as_tensor(labels, device=self.device)
                correct += int((torch.sign(s1 - s2).reshape(-1) == labels.to(s1.dtype).reshape(-1)).sum())
                total += int(labels.numel())
        return correct, total

    def evaluate(self, dataloader: Iterable) -> float:
        """Pairwise accuracy in [0, 1]; a tie counts as wrong."""
        return float(self.evaluate_detailed(dataloader)["accuracy"])

    def evaluate_detailed(self, dataloader: Iterable) -> Dict[str, Any]:
        """The seed's accuracy / total_pairs / correct_predictions, plus tier_pair_accuracy
        ({"S-A": {"accuracy", "pairs"}, ...}), spearman and kendall (scores vs tiers) and num_images.

        With a calibration (and a dataset that lists its images) it adds the tier figures: tier_accuracy,
        tier_mae (mean absolute tier error), majority_tier / majority_tier_accuracy (always predicting the
        commonest tier of these images), confusion_matrix ({"tiers", "rows", "columns", "counts"}: rows true,
        columns predicted, S..C), calibration_error ({"name", "bins", "value"}: the expected calibration
        error), ranked_probability_score, reliability (bins) and calibration_fitted_on.

        Pair metrics count the pairs the loader yields (a sampler's subset, ``drop_last``); Spearman,
        Kendall, num_images and the tier figures cover every image of the dataset."""
        extractor = getattr(self.model, "feature_extractor", None)
        follow = getattr(_dataset_of(dataloader), "follow_backbone", None)
        if extractor is not None and callable(follow):
            follow(extractor)  # a default image transform takes the scored backbone's normalisation
        if can_score_images(dataloader):
            ds = _dataset_of(dataloader)
            first, second, labels = ds.pair_arrays()
            subset = loader_pair_indices(dataloader, len(labels))
            if subset is not None:
                first, second, labels = first[subset], second[subset], labels[subset]
            scores = score_images(self.model, ds, self.device, self.score_batch_size)
            metrics = score_metrics(scores, ds.ranks, first, second, labels)
            if self.calibration is not None:
                tiers = tier_metrics(self.calibration.probabilities(scores), ds.ranks)
                tiers.pop("num_images")
                metrics.update(tiers, calibration_fitted_on=self.calibration.fitted_on)
            return metrics
        correct, total = self._pairwise(dataloader)
        return {
            "accuracy": correct / total if total else float("nan"),
            "total_pairs": total,
            "correct_predictions": correct,
            "tier_pair_accuracy": {},
            "spearman": float("nan"),
            "kendall": float("nan"),
            "num_images": None,
        }

    @torch.no_grad()
    def predict_pair(self, img1: torch.Tensor, img2: torch.Tensor) -> Tuple[int, float, float]:
        """(prediction, score1, score2): 1 when img1 is better, -1 when worse, 0 on an exact tie."""
        self.model.eval()
        s1, s2 = self.model(img1.to(self.device), img2.to(self.device))
        a, b = float(s1.reshape(-1)[0]), float(s2.reshape(-1)[0])
        return (1 if a > b else -1 if a < b else 0), a, b


def format_metrics(metrics: Dict[str, Any], baseline: Optional[Dict[str, Any]] = None, title: str = "") -> str:
    """A plain-text table of a detailed report, with the linear baseline in a second column when given.

    Every figure names what it rests on: the distinct image pairs (sampling repeats pairs of a small split, so
    the sampled count alone overstates the evidence) and the images."""
    distinct, images = metrics.get("distinct_pairs"), metrics.get("num_images")
    of_pairs = f" ({distinct} distinct pairs)" if distinct is not None else ""
    of_images = f", {images} images" if images is not None else ""
    rows = [(f"pairwise accuracy{of_pairs}", "accuracy"), ("pairs sampled (repeats included)", "total_pairs"),
            ("distinct pairs", "distinct_pairs"), ("correct (of the sampled)", "correct_predictions"),
            (f"Spearman (score vs tier{of_images})", "spearman"), (f"Kendall tau-b (score vs tier{of_images})", "kendall"),
            ("images", "num_images")]
    if distinct is None:
        rows.remove(("distinct pairs", "distinct_pairs"))

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if v != v else f"{v:.4f}"
        return str(v)

    def cell(figures: Dict[str, Any], key: str, interval: Any = None) -> str:
        value = figures.get(key)
        bounds = interval if interval is not None else (figures.get("intervals") or {}).get(key)
        return with_interval(value, bounds) if bounds and isinstance(value, float) else fmt(value)

    header = ["metric", "model"] + (["linear baseline"] if baseline else [])
    table = [header]
    for label, key in rows:
        table.append([label, cell(metrics, key)] + ([cell(baseline, key)] if baseline else []))
    for pair, entry in (metrics.get("tier_pair_accuracy") or {}).items():
        base = (baseline or {}).get("tier_pair_accuracy", {}).get(pair, {})
        counts = (f"{entry['distinct_pairs']} distinct pairs, {entry['pairs']} sampled" if "distinct_pairs" in entry
                  else f"{entry['pairs']} pairs")
        pair_ci = ((metrics.get("intervals") or {}).get("tier_pair_accuracy") or {}).get(pair)
        base_ci = (((baseline or {}).get("intervals") or {}).get("tier_pair_accuracy") or {}).get(pair)
        table.append([f"  {pair} ({counts})", cell(entry, "accuracy", pair_ci)]
                     + ([cell(base, "accuracy", base_ci)] if baseline else []))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    evidence = (f"{images} images, {distinct} distinct cross-tier pairs ({metrics.get('total_pairs')} sampled, "
                "repeats included)" if distinct is not None and images is not None else "")
    lines = [f"{title} {evidence}" if title else evidence] if title or evidence else []
    for i, r in enumerate(table):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if metrics.get("intervals"):
        ci = metrics["intervals"]
        unit = ci["unit"].replace("group:", "groups of column ")
        lines.append(f"[low, high]: {100 * ci['level']:g}% bootstrap interval, {ci['resamples']} resamples of the "
                     f"{ci['units']} {unit}{'s' if unit == 'image' else ''} (another draw of drawings like these "
                     "would land inside it that often)")
    if "tier_accuracy" in metrics:
        lines += ["", format_tier_metrics(metrics)]
    return "\n".join(lines)


def format_tier_metrics(tiers: Dict[str, Any]) -> str:
    """Tier accuracy against the majority baseline, mean absolute tier error, calibration error, confusion matrix."""
    if not tiers.get("num_images") or "tier_accuracy" not in tiers:
        return "tier prediction: no images"
    cal = tiers["calibration_error"]
    ci = tiers.get("intervals") or {}
    lines = [
        f"tier prediction (calibration fitted on the {tiers.get('calibration_fitted_on', '?')} split), "
        f"{tiers['num_images']} images:",
        f"  tier accuracy {with_interval(tiers['tier_accuracy'], ci.get('tier_accuracy'))}  (always predicting the commonest tier here, "
        f"{tiers['majority_tier']}: {tiers['majority_tier_accuracy']:.4f})",
        f"  mean absolute tier error {tiers['tier_mae']:.4f}",
        f"  {cal['name']}, {cal['bins']} bins: {with_interval(cal['value'], ci.get('calibration_error'))}",
        f"  ranked probability score {tiers['ranked_probability_score']:.4f} (0 is perfect)",
        "  confusion matrix (rows: true tier, columns: predicted tier):",
    ]
    names = tiers["confusion_matrix"]["tiers"]
    counts = tiers["confusion_matrix"]["counts"]
    width = max(4, max(len(str(c)) for row in counts for c in row) + 1)
    lines.append("      " + "".join(t.rjust(width) for t in names))
    for t, row in zip(names, counts):
        lines.append(f"    {t} " + "".join(str(c).rjust(width) for c in row))
    return "\n".join(lines)
