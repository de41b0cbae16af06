"""An ensemble of ranking heads in one checkpoint, and whether its spread means something.

Format (what ``mirip.scoring.scorer`` reads): ``ensemble = {"member_states": [head state per member],
"seeds": [...], "member_val_accuracy": [...]}``; ``model_state_dict`` is member 0's, so a reader that knows
nothing of ensembles still scores with one head. The calibration and the score reference of an ensemble
checkpoint are fitted on the members' mean score, which is the ensemble's score.

``uncertainty_report`` answers the question a user of ``score_std`` has: are the pairs the ensemble is sure
about the ones it gets right? It splits a split's pairs into the more and the less certain half and gives
each half's accuracy. A pair's certainty is ``|mean_a - mean_b| / sqrt(std_a^2 + std_b^2)``: how many
spreads apart the two scores are (for one head, with no spread: ``|score_a - score_b|``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from mirip.ml.ranking_model import RankingHead
from mirip.training.evaluator import score_images
from mirip.training.typicality import TypicalityFit, dataset_features


class EnsembleHead(nn.Module):
    """K RankingHeads of one shape scoring as one: ``get_score`` is the members' mean."""

    def __init__(self, members: Sequence[RankingHead]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def get_score(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.get_score(x) for m in self.members]).mean(dim=0)

    def head_config(self) -> dict:
        return self.members[0].head_config()


def head_from_state(head: Dict[str, Any], state: Dict[str, Any]) -> RankingHead:
    model = RankingHead(int(head["input_dim"]), int(head["projector_output_dim"]), float(head.get("margin", 1.0)),
                        int(head["hidden_dim"]), float(head.get("dropout", 0.1)))
    model.load_head_state_dict(state)
    return model.eval()


def checkpoint_members(ckpt: Dict[str, Any]) -> List[RankingHead]:
    """Every head of a checkpoint: an ensemble's members, or its one head."""
    states = (ckpt.get("ensemble") or {}).get("member_states") or [ckpt["model_state_dict"]]
    return [head_from_state(ckpt["head"], s) for s in states]


def ensemble_keys(states: Sequence[Dict[str, Any]], seeds: Sequence[int],
                  val_accuracy: Sequence[float]) -> Dict[str, Any]:
    """The checkpoint keys of an ensemble; ``model_state_dict`` is left to the caller (member 0's)."""
    if not len(states) == len(seeds) == len(val_accuracy):
        raise ValueError(f"{len(states)} member states, {len(seeds)} seeds, {len(val_accuracy)} accuracies")
    return {"ensemble": {"member_states": list(states), "seeds": [int(s) for s in seeds],
                         "member_val_accuracy": [float(a) for a in val_accuracy]}}


def pair_certainty(member_scores: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per pair: how many score spreads apart its two drawings are (one head: the score gap)."""
    mean = member_scores.mean(axis=0)
    gap = np.abs(mean[first] - mean[second])
    if member_scores.shape[0] < 2:
        return gap
    std = member_scores.std(axis=0, ddof=1)
    return gap / np.maximum(np.sqrt(std[first] ** 2 + std[second] ** 2), 1e-12)


def _accuracy(scores: np.ndarray, first: np.ndarray, second: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.sign(scores[first] - scores[second]) == labels))


def uncertainty_report(members: Sequence[nn.Module], dataset, device: str,
                       fit: Optional[TypicalityFit] = None) -> Dict[str, Any]:
    """Accuracy of the ensemble, of each member, and on the more vs the less certain half of ``dataset``'s
    pairs; with a typicality fit, how typical the split's drawings are."""
    per = np.stack([score_images(m, dataset, device) for m in members])
    first, second, labels = dataset.pair_arrays()
    labels = np.asarray(labels, dtype=np.float64)
    certainty = pair_certainty(per, first, second)
    order = np.argsort(-certainty, kind="stable")
    half = len(order) // 2
    sure, unsure = order[:half], order[len(order) - half:]
    mean = per.mean(axis=0)
    members_acc = [_accuracy(s, first, second, labels) for s in per]
    report: Dict[str, Any] = {
        "members": len(members), "pairs": int(len(labels)),
        "certainty": "score gap in score spreads" if len(members) > 1 else "score gap (one head: no spread)",
        "accuracy": _accuracy(mean, first, second, labels), "member_accuracy": members_acc,
        "mean_member_accuracy": float(np.mean(members_acc)),
        "most_certain_half_accuracy": _accuracy(mean, first[sure], second[sure], labels[sure]),
        "least_certain_half_accuracy": _accuracy(mean, first[unsure], second[unsure], labels[unsure]),
    }
    if len(members) > 1:
        std = per.std(axis=0, ddof=1)
        report.update(score_std_mean=float(std.mean()), score_std_max=float(std.max()))
    if fit is not None:
        report["typicality"] = typicality_summary(fit, dataset_features(dataset))
    return report


def typicality_summary(fit: TypicalityFit, features: np.ndarray) -> Dict[str, Any]:
    t = fit.typicality(features)
    return {"images": int(len(t)), "mean": float(t.mean()), "median": float(np.median(t)), "min": float(t.min()),
            "unusual": int(fit.unusual(t).sum()), "threshold": fit.threshold}


def format_uncertainty(report: Dict[str, Any]) -> str:
    """The report in a few console lines."""
    lines = [f"uncertainty on {report['pairs']} pairs ({report['members']} head(s); certainty: "
             f"{report['certainty']}): most certain half accuracy {report['most_certain_half_accuracy']:.4f}, "
             f"least certain half {report['least_certain_half_accuracy']:.4f}"]
    if report["members"] > 1:
        lines.append(f"ensemble accuracy {report['accuracy']:.4f} vs its members' mean "
                     f"{report['mean_member_accuracy']:.4f} (members "
                     + ", ".join(f"{a:.4f}" for a in report["member_accuracy"])
                     + f"); score_std mean {report['score_std_mean']:.4f}, max {report['score_std_max']:.4f}")
    typ = report.get("typicality")
    if typ:
        lines.append(f"typicality of these {typ['images']} drawings: median {typ['median']:.3f}, min {typ['min']:.3f}; "
                     f"{typ['unusual']} flagged unusual (below {typ['threshold']:.0%})")
    return "\n".join(lines)
