"""Several trained heads on one loaded backbone: one backbone pass, every head's score.

Heads trained on one feature cache (a sweep's best and the current model, say) read entries of the same
bank. The first checkpoint loads the backbone; each further one is rebuilt around that same backbone
module (``load_scorer(share_backbone=...)``), refused with the mismatching field when its fingerprint says
its features came from another backbone or preprocessing. Scoring runs the backbone once for the union of
the heads' entries and gives each head its own entries, in its order and with its scales: the very numbers
its own ``Scorer`` would compute.

With the OpenVINO engine (``--engine openvino``) that one pass over the union runs compiled
(``mirip.ml.openvino_engine``); the torch backbone stays loaded for ``/explain``, which needs its gradients.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch

from mirip.common.feature_spec import FeatureSpec
from mirip.common.tiers import TIERS
from mirip.ml.openvino_engine import ENGINES, attach_openvino
from mirip.scoring.scorer import SHARED, Scorer, engine_notes, load_scorer, score_features
from mirip.store.fingerprint import check_fingerprint, fingerprint_sha256


def head_identity(scorer: Scorer, name: str) -> dict:
    """What a response says about the head behind a score."""
    ext = scorer.model.feature_extractor
    return {"head": name, "checkpoint": os.path.basename(scorer.checkpoint_path or ""),
            "feature_spec": str(FeatureSpec.from_entries(ext.entry_names)),
            "fingerprint_sha256": fingerprint_sha256(scorer.fingerprint), "weights": scorer.weights,
            "backbone": ext.info.name, "image_size": scorer.preprocessor.image_size,
            "calibrated": scorer.has_tiers, "ensemble_members": len(scorer.heads),
            # What the head knows of its training set (the typicality fit); a note when it knows nothing.
            "training_set": (scorer.typicality.summary() if scorer.typicality is not None
                             else {"note": scorer.typicality_note})}


def _names(paths: Sequence[str]) -> List[str]:
    """Head names: the checkpoints' file names, made unique with their parent folder where they collide."""
    base = [os.path.basename(p) for p in paths]
    return [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), b) if base.count(b) > 1 else b
            for p, b in zip(paths, base)]


class HeadSet:
    """The heads a service scores with; ``scorers[0]`` is the primary one (its preprocessing is everyone's)."""

    def __init__(self, scorers: Sequence[Scorer], names: Optional[Sequence[str]] = None, engine: str = "torch",
                 engine_cache: Optional[str] = None, engine_precision: Optional[str] = None):
        if not scorers:
            raise ValueError("no checkpoint to serve")
        self.scorers = list(scorers)
        self.names = list(names) if names else _names([s.checkpoint_path or f"head{i}"
                                                       for i, s in enumerate(self.scorers)])
        self.primary = self.scorers[0]
        self.preprocessor = self.primary.preprocessor
        for scorer in self.scorers[1:]:  # one batch, one preprocessing: every head must expect the same pixels
            check_fingerprint(scorer.preprocessor.config(), self.preprocessor.config(), ignore=(),
                              what=f"checkpoint {scorer.checkpoint_path}", **SHARED)
        ext = self.primary.model.feature_extractor
        union = list(dict.fromkeys(n for s in self.scorers for n in s.model.feature_extractor.entry_names))
        # One extractor over the shared backbone that reads every head's entries in one pass (unscaled).
        self._union = ext if union == ext.entry_names and ext.entry_scales is None else ext.sharing_backbone(union)
        self.engine = engine
        if engine == "openvino":
            if self._union is ext:  # the primary scorer's own extractor stays torch
                self._union = ext.sharing_backbone(union)
            self.engine_info = attach_openvino(self._union, self.preprocessor.image_size, engine_cache,
                                               engine_precision)
            for scorer in self.scorers:
                scorer.notes += engine_notes(scorer.fingerprint or {}, self._union)
        elif engine != "torch":
            raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")

    @classmethod
    def load(cls, checkpoints: Sequence[str], engine: str = "torch", engine_cache: Optional[str] = None,
             **kwargs) -> "HeadSet":
        """Load the first checkpoint's backbone and every checkpoint's head onto it (``load_scorer``'s kwargs);
        ``engine`` "openvino" runs the heads' shared pass compiled (``precision`` is then the plugin's hint)."""
        if not checkpoints:
            raise ValueError("give at least one checkpoint")
        hint = None
        if engine == "openvino":  # the torch copy is converted in fp32; the plugin picks (or is told) its own
            hint, kwargs = kwargs.get("precision"), {**kwargs, "precision": "fp32"}
        first = load_scorer(checkpoints[0], **kwargs)
        shared = {k: v for k, v in kwargs.items() if k in ("backbone", "random_init")}
        rest = [load_scorer(p, share_backbone=first.model.feature_extractor, **shared) for p in checkpoints[1:]]
        return cls([first, *rest], _names(list(checkpoints)), engine, engine_cache, hint)

    @property
    def scoring_extractor(self):
        """The extractor whose one pass feeds every head (with its engine, if any)."""
        return self._union

    def identities(self) -> List[dict]:
        return [head_identity(s, n) for s, n in zip(self.scorers, self.names)]

    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor) -> List[List[Dict[str, object]]]:
        """A preprocessed (B, 3, H, W) batch: per image, per head (in head order) a dict of its ``score``,
        ``members`` (each ensemble member's score), and where the head has them ``score_std`` and
        ``typicality``. Each is computed image by image, so it does not depend on the batch."""
        feats = self._union.extract_entries(images)
        per_head = []
        for scorer in self.scorers:
            ext = scorer.model.feature_extractor
            parts = [feats[n] for n in ext.entry_names]
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            if ext._scale is not None:
                x = x * ext._scale.to(x.device)
            d = score_features(scorer.heads, x, scorer.typicality)
            rows = []
            for j in range(len(d.scores)):
                row: Dict[str, object] = {"score": float(d.scores[j]), "members": d.member_scores[:, j].tolist()}
                if d.score_std is not None:
                    row["score_std"] = float(d.score_std[j])
                if d.typicality is not None:
                    row["typicality"] = float(d.typicality[j])
                rows.append(row)
            per_head.append(rows)
        return [list(image) for image in zip(*per_head)]

    def tier_fields(self, head: int, scored: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
        """Per scored image (``score_batch``'s dicts of this head): predicted tier, P(S)..P(C) (averaged over
        an ensemble's members, pulled toward the prior for an unusual drawing), percentile, and the unusual
        flag; or a note when the head has no calibration."""
        scorer = self.scorers[head]
        flags = [{"unusual": bool(s["typicality"] < scorer.typicality.threshold)} if "typicality" in s else {}
                 for s in scored]
        if not scorer.has_tiers:
            return [{"predicted_tier": None, **{f"p_{t}": None for t in TIERS}, "percentile": None,
                     "calibration_note": scorer.calibration_note, **f} for f in flags]
        typ = [s["typicality"] for s in scored] if scorer.typicality is not None else None
        preds = scorer.tiers_for_scores([""] * len(scored), [s["score"] for s in scored], typ,
                                        [s["members"] for s in scored])
        return [{"predicted_tier": p.tier, **{f"p_{t}": p.probabilities[t] for t in TIERS},
                 "percentile": p.percentile, **f} for p, f in zip(preds, flags)]
