"""Attribution checks and cost: the quadrant-damage sanity check, the deletion curve, explain vs score time.

A synthetic drawing (``mirip.demo.data.draw_picture``) gets tier-relevant damage (additive noise) in one
quadrant only; a head trained on cached-style features to rank undamaged above damaged drawings should then
put the map's negative mass in that quadrant. The deletion curve masks the most-attributed patches (painted
paper white, i.e. turned into the blank page the map is relative to) and compares the score change with
masking as many random patches.
"""

from __future__ import annotations

import time
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image

from mirip.demo.drawing import draw_picture
from mirip.ml.ranking_model import RankingHead


def damage_quadrant(img: Image.Image, quadrant: int, sigma: float, seed: int) -> Image.Image:
    """``img`` with Gaussian pixel noise of ``sigma`` (0-255 scale) in one quadrant (0..3: top-left, top-right,
    bottom-left, bottom-right)."""
    arr = np.asarray(img, dtype=np.float32).copy()
    h, w = arr.shape[:2]
    r, c = divmod(quadrant, 2)
    ys, xs = slice(r * h // 2, (r + 1) * h // 2), slice(c * w // 2, (c + 1) * w // 2)
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=arr[ys, xs].shape)
    arr[ys, xs] = np.clip(arr[ys, xs] + noise, 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def quadrant_set(n: int, size: int, seed: int = 0, sigma: float = 60.0):
    """n clean drawings and, for each, one damaged copy (quadrant i % 4): (clean, damaged, quadrants)."""
    clean, damaged, quads = [], [], []
    for i in range(n):
        img = draw_picture(np.random.default_rng([seed, i]), size)
        clean.append(img)
        damaged.append(damage_quadrant(img, i % 4, sigma, seed * 1000 + i))
        quads.append(i % 4)
    return clean, damaged, quads


def train_damage_head(extractor, preprocessor, clean: Sequence[Image.Image], damaged: Sequence[Image.Image],
                      steps: int = 300, seed: int = 0) -> RankingHead:
    """A head on the extractor's features trained with the margin loss to score clean above damaged."""
    with torch.no_grad():
        fc = extractor.extract(torch.stack([preprocessor(im) for im in clean]))
        fd = extractor.extract(torch.stack([preprocessor(im) for im in damaged]))
    torch.manual_seed(seed)
    head = RankingHead(input_dim=fc.shape[1], projector_output_dim=16, hidden_dim=32, dropout=0.0, margin=1.0)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    ones = torch.ones(len(fc))
    for _ in range(steps):
        s1, s2 = head(fc, fd)
        loss = head.compute_loss(s1, s2, ones)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def mask_cells(img: torch.Tensor, cells: Sequence[int], grid_w: int, patch: int, paper: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) input with the given grid cells (row-major indices) replaced by white paper."""
    out = img.clone()
    for k in cells:
        r, c = divmod(int(k), grid_w)
        out[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = paper[:, None, None]
    return out


def scorer_for(extractor, preprocessor, head: RankingHead):
    """A ``Scorer`` of ``extractor`` + a head trained on its features (no checkpoint needed)."""
    from mirip.scoring.scorer import Scorer
    from mirip.ml.ranking_model import PairwiseRankingModel

    model = PairwiseRankingModel(extractor.info.name, projector_output_dim=head.projector_output_dim,
                                 hidden_dim=head.hidden_dim, dropout=0.0, feature_extractor=extractor)
    model.load_head_state_dict(head.head_state_dict())
    return Scorer(model.to(extractor.device), preprocessor)


def quadrant_check(maps: Sequence[np.ndarray], quadrants: Sequence[int]) -> Dict[str, float]:
    """Share of each map's negative mass in its damaged quadrant (mean), and how often that quadrant holds most."""
    shares, hits = [], 0
    for m, q in zip(maps, quadrants):
        neg = np.clip(-np.asarray(m, dtype=np.float64), 0, None)
        gh, gw = neg.shape
        parts = [neg[:gh // 2, :gw // 2].sum(), neg[:gh // 2, gw // 2:].sum(),
                 neg[gh // 2:, :gw // 2].sum(), neg[gh // 2:, gw // 2:].sum()]
        total = sum(parts)
        shares.append(parts[q] / total if total else 0.0)
        hits += int(np.argmax(parts) == q)
    return {"negative_share_in_damaged_quadrant": float(np.mean(shares)), "hit_rate": hits / max(len(maps), 1),
            "images": len(maps)}


def deletion_curve(scorer, images: torch.Tensor, maps: Sequence[np.ndarray], fractions: Sequence[float],
                   random_draws: int = 8, seed: int = 0) -> List[Dict[str, float]]:
    """Mean score change when the top-k cells (by value, by -value, by |value|) or k random cells are painted
    paper white, for k = fraction x cells; |change| for |value| and random."""
    pre = scorer.preprocessor
    paper = ((torch.ones(3) - torch.tensor(pre.mean)) / torch.tensor(pre.std)).float()
    p = scorer.model.feature_extractor.patch_size
    base = scorer.score_tensor(images).numpy()
    rng = np.random.default_rng(seed)
    rows = []
    for f in fractions:
        out = {"fraction": float(f), "top_positive": [], "top_negative": [], "top_abs": [], "random_abs": []}
        for img, m, s0 in zip(images, maps, base):
            flat = np.asarray(m).reshape(-1)
            k = max(1, int(round(f * flat.size)))
            gw = m.shape[1]
            orders = {"top_positive": np.argsort(-flat)[:k], "top_negative": np.argsort(flat)[:k],
                      "top_abs": np.argsort(-np.abs(flat))[:k]}
            batch = [mask_cells(img, cells, gw, p, paper) for cells in orders.values()]
            batch += [mask_cells(img, rng.choice(flat.size, k, replace=False), gw, p, paper)
                      for _ in range(random_draws)]
            s = scorer.score_tensor(torch.stack(batch)).numpy() - s0
            out["top_positive"].append(s[0])
            out["top_negative"].append(s[1])
            out["top_abs"].append(abs(s[2]))
            out["random_abs"].append(float(np.mean(np.abs(s[3:]))))
        rows.append({k: (v if k == "fraction" else float(np.mean(v))) for k, v in out.items()})
    return rows


def time_explain(scorer, images: torch.Tensor, repeats: int, steps: int) -> Dict[str, float]:
    """Median ms per image of scoring and of explaining the same batch, interleaved in one run."""
    from mirip.scoring.explain import Explainer

    explainer = Explainer(scorer, steps=steps)
    explainer.explain_batch(images[:1])  # warm-up (and the blank page's features, made once per scorer)
    scorer.score_tensor(images[:1])
    score_t, explain_t = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        scorer.score_tensor(images)
        score_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        explainer.explain_batch(images)
        explain_t.append(time.perf_counter() - t)
    n = len(images)
    s, e = 1000 * float(np.median(score_t)) / n, 1000 * float(np.median(explain_t)) / n
    return {"score_ms_per_image": s, "explain_ms_per_image": e, "ratio": e / s, "batch": n, "repeats": repeats}


# -- scripts/benchmark.py --only explain -----------------------------------------------------------------------

def add_arguments(parser) -> None:
    g = parser.add_argument_group("explain: attribution maps (Scorer.explain) vs scoring, quadrant and deletion checks")
    g.add_argument("--explain-feature", nargs="+", default=["mean@-1", "cls@-1"], metavar="SPEC",
                   help="feature specs timed (each with its own head); the first drives the quadrant and "
                        "deletion checks")
    g.add_argument("--explain-train-images", type=int, default=None,
                   help="drawings (each clean + quadrant-damaged) the damage head is trained on (64; --quick 16)")
    g.add_argument("--explain-test-images", type=int, default=None, help="held-out damaged drawings (16; --quick 4)")
    g.add_argument("--explain-batch", type=int, default=8, help="images per timed batch")
    g.add_argument("--explain-repeats", type=int, default=None, help="timed batches, interleaved (5; --quick 2)")
    g.add_argument("--explain-steps", type=int, default=32, help="integrated-gradient steps of the head")
    g.add_argument("--explain-noise", type=float, default=100.0, help="damage: noise sigma (0-255) in one quadrant")


def _pick(args, name: str, full: int, quick: int) -> int:
    value = getattr(args, f"explain_{name}", None)
    return int(value) if value is not None else (quick if getattr(args, "quick", False) else full)


def run(args) -> dict:
    from mirip.ml.feature_extractor import DINOv2FeatureExtractor

    n_train, n_test = _pick(args, "train_images", 64, 16), _pick(args, "test_images", 16, 4)
    repeats = _pick(args, "repeats", 5, 2)
    clean, damaged, _ = quadrant_set(n_train, args.image_size, seed=1, sigma=args.explain_noise)
    _, test_imgs, test_q = quadrant_set(n_test, args.image_size, seed=7, sigma=args.explain_noise)
    out = {"specs": {}, "train_images": n_train, "test_images": n_test, "noise_sigma": args.explain_noise,
           "steps": args.explain_steps}
    for i, spec in enumerate(args.explain_feature):
        ext = DINOv2FeatureExtractor(args.backbone, device=args.device, random_init=args.random_init, entries=spec,
                                     precision=args.precision)
        pre = ext.preprocessor(args.image_size)
        scorer = scorer_for(ext, pre, train_damage_head(ext, pre, clean, damaged))
        batch = torch.stack([pre(im) for im in test_imgs])
        row = time_explain(scorer, batch[:args.explain_batch], repeats, args.explain_steps)
        if i == 0:
            from mirip.scoring.explain import Explainer

            res = Explainer(scorer, steps=args.explain_steps).explain_batch(batch)
            maps = [r["map"] for r in res]
            row["quadrant"] = quadrant_check(maps, test_q)
            row["deletion"] = deletion_curve(scorer, batch, maps, (0.05, 0.1, 0.25, 0.5))
            row["exact"] = all(m == "exact" for m in res[0]["methods"].values())
        out["specs"][spec] = row
    return out


def to_markdown(result: dict) -> str:
    lines = ["### explain", "",
             f"Held-out drawings with noise (sigma {result['noise_sigma']:g}) in one quadrant; heads trained on "
             f"{result['train_images']} clean/damaged pairs; {result['steps']} integrated-gradient steps.", "",
             "| spec | score ms/img | explain ms/img | explain / score |", "| --- | --- | --- | --- |"]
    for spec, r in result["specs"].items():
        lines.append(f"| `{spec}` | {r['score_ms_per_image']:.1f} | {r['explain_ms_per_image']:.1f} | "
                     f"{r['ratio']:.2f}x |")
    for spec, r in result["specs"].items():
        if "quadrant" not in r:
            continue
        q = r["quadrant"]
        lines += ["", f"Quadrant check (`{spec}`, {q['images']} images): {q['negative_share_in_damaged_quadrant']:.0%}"
                  f" of the map's negative mass in the damaged quadrant (chance 25%); that quadrant holds the most "
                  f"in {q['hit_rate']:.0%} of images.", "",
                  "Deletion (cells painted paper white; mean score change):", "",
                  "| cells masked | top positive | top negative | top \\|A\\|: \\|change\\| | random: \\|change\\| |",
                  "| --- | --- | --- | --- | --- |"]
        for d in r["deletion"]:
            lines.append(f"| {d['fraction']:.0%} | {d['top_positive']:+.3f} | {d['top_negative']:+.3f} | "
                         f"{d['top_abs']:.3f} | {d['random_abs']:.3f} |")
    return "\n".join(lines) + "\n"
