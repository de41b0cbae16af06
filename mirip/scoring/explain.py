"""Where a drawing's score comes from: a per-patch attribution map, from the trained head back to the patch grid.

The score is ``s = f(x)``: ``f`` the head (Projector + score head), ``x`` the feature spec's entries
concatenated, each entry a pooling of one block's tokens (through the family's final norm, times its entry
scale). The map distributes ``s(drawing) - s(blank page)`` over the patch grid, in score units: positive
cells lift the score, negative ones drag it down. The blank page (a white canvas, the padding's colour, at
the scorer's image size) is the reference because a drawing is marks on paper.

Two steps:

1. **Head -> entries**, integrated gradients on the head input from the blank page's features ``x0`` to
   ``x``: ``A_d = (x - x0)_d * mean_k df/dx_d(x0 + a_k (x - x0))`` over ``steps`` midpoints ``a_k``. Its sum
   is ``f(x) - f(x0)`` up to the quadrature error (``Explanation.quadrature_gap``). Only the small head
   runs ``steps`` times, never the backbone. This is where the head's nonlinearity (LayerNorm, GELU) is
   handled: the first Linear layer alone is exactly decomposable per patch, the rest is not, and integrated
   gradients is the attribution that still sums to the score difference.
2. **Entries -> patches**:

   - ``mean@L``: ``x = mean_i p_i`` (``p_i`` the normed patch tokens of block L), so
     ``x - x0 = mean_i (p_i - x0)`` and patch ``i`` gets ``(p_i - x0) . g / N``. Exact: the cells sum to the
     entry's share of step 1 (no approximation beyond step 1's quadrature).
   - ``std@L``: per channel, ``sigma = sum_i (p_i - mu)^2 / (N sigma)`` (an identity), so patch ``i`` gets
     ``sum_c g_c ((p_ic - mu_c)^2 / (N sigma_c) - x0_c / N)``. Exact in the same sense.
   - ``cls@L`` (the CLS token; SigLIP: its attention-pooling head): the CLS token reaches the patches through
     attention, nonlinearly (and in DINO / CLIP it is not a function of block L's own output patches at
     all), so the patch tokens *entering* block L get gradient x (input - blank page's input) of ``g . cls``.
     First order, not exact: what the CLS token itself brings into block L (gathered by earlier blocks) is
     credited to no patch; ``Explanation.unassigned`` says how much of the score that is.

CLS and register tokens never enter the grid (the family's token layout says where patches start). The grid
is the backbone's: ``image_size // patch_size`` per side. With the default ``pad`` resize, cells that fall on
the white padding stay in ``map`` (they are part of the mean the head sees) and are False in ``content``;
``padding_share`` says how much of the map's absolute mass fell on them, and overlays show only the drawing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mirip.common.feature_spec import PATCH_POOLINGS
from mirip.ml.families import block_output
from mirip.ml.preprocessing import ImageReadError, PAPER_WHITE, resize, source_size, to_tensor

EXACT_POOLINGS = PATCH_POOLINGS  # exact per-patch attribution (see the module docstring)


class _Stop(Exception):
    """Raised after the deepest block the spec reads: later blocks would be wasted work."""


@dataclass
class Explanation:
    """One drawing's attribution map (plain data: numpy arrays and numbers, ready for JSON or a service).

    ``map``: (grid_h, grid_w) float32, score units, sums to ``score - baseline_score - unassigned -
    quadrature_gap``. ``content``: (grid_h, grid_w) bool, False on padding cells. ``content_box``: the
    drawing's box inside the backbone's input, in pixels (left, top, right, bottom); ``source_box``: the part
    of the original image that box shows (all of it, except for ``center_crop``)."""

    path: str
    score: float
    baseline_score: float
    map: np.ndarray
    content: np.ndarray
    patch_size: int
    image_size: Tuple[int, int]  # the original, upright (width, height)
    content_box: Tuple[int, int, int, int]
    source_box: Tuple[int, int, int, int]
    exact: bool                  # every entry mean/std: the cells sum exactly to step 1's attribution
    methods: Dict[str, str]      # entry -> how its share reached the patches
    unassigned: float            # score share of cls entries credited to no patch (0 when exact)
    quadrature_gap: float        # f(x) - f(x0) - sum of step 1's attribution

    @property
    def grid(self) -> Tuple[int, int]:
        return tuple(self.map.shape)

    @property
    def padding_share(self) -> float:
        """Share of the map's absolute mass on padding cells (white paper, not the drawing)."""
        total = float(np.abs(self.map).sum())
        return float(np.abs(self.map[~self.content]).sum()) / total if total else 0.0

    def to_dict(self) -> dict:
        return {"path": self.path, "score": self.score, "baseline_score": self.baseline_score,
                "grid": list(self.grid), "map": self.map.tolist(), "content": self.content.tolist(),
                "patch_size": self.patch_size, "image_size": list(self.image_size),
                "content_box": list(self.content_box), "source_box": list(self.source_box), "exact": self.exact,
                "methods": dict(self.methods), "unassigned": self.unassigned,
                "quadrature_gap": self.quadrature_gap, "padding_share": self.padding_share}


@dataclass
class ExplainResult:
    explanations: List[Explanation]
    failures: List[Tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.explanations)

    def __iter__(self):
        return iter(self.explanations)

    def __getitem__(self, path) -> Explanation:
        """The explanation of ``path`` as it was passed to ``explain``. Not by position: a file that cannot be
        read has no explanation, so the positions of the others would shift."""
        if isinstance(path, (int, slice)):
            raise TypeError("an ExplainResult is looked up by path, not position (an unreadable file has no "
                            "explanation, so positions shift): result['a.jpg'], or iterate over it")
        key = os.fspath(path)
        found = next((e for e in self.explanations if os.fspath(e.path) == key), None)
        if found is not None:
            return found
        reason = dict(self.failures).get(key)
        raise KeyError(f"{key}: could not be read ({reason})" if reason else f"{key} was not among the explained files")


def input_geometry(width: int, height: int, size: int, mode: str, patch: int):
    """(content_box in the backbone's input, source_box in the original): where the drawing lands (``resize``)."""
    seen = max(patch, (size // patch) * patch)
    if mode == "stretch":
        return (0, 0, seen, seen), (0, 0, width, height)
    if mode == "center_crop":
        scale = size / min(width, height)
        nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        box = (left / scale, top / scale, (left + seen) / scale, (top + seen) / scale)
        return (0, 0, seen, seen), tuple(int(round(v)) for v in box)
    scale = seen / max(width, height)
    nw, nh = max(1, round(width * scale)), max(1, round(height * scale))
    x0, y0 = (seen - nw) // 2, (seen - nh) // 2
    return (x0, y0, x0 + nw, y0 + nh), (0, 0, width, height)


def scale_box(box, size: Tuple[int, int], to: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """A box given on a picture of ``size`` moved onto the same picture at size ``to`` (a draft decode of a
    JPEG is the file shrunk by a power of two, rounded up: proportional, not an exact factor)."""
    sx, sy = to[0] / size[0], to[1] / size[1]
    return tuple(int(round(v * s)) for v, s in zip(box, (sx, sy, sx, sy)))


def content_cells(box: Tuple[int, int, int, int], grid: Tuple[int, int], patch: int) -> np.ndarray:
    """True for cells at least half covered by the drawing's box."""
    gh, gw = grid
    def cover(lo, hi, n):
        starts = np.arange(n) * patch
        return (np.clip(np.minimum(starts + patch, hi) - np.maximum(starts, lo), 0, None) / patch) >= 0.5
    return cover(box[1], box[3], gh)[:, None] & cover(box[0], box[2], gw)[None, :]


class _Files(Dataset):
    """A file -> (index, tensor, (decoded size, file's upright size), None) or (index, None, None, reason)."""

    def __init__(self, paths: Sequence[str], preprocessor):
        self.paths, self.pre = list(paths), preprocessor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = self.pre.load(self.paths[i])
            t = to_tensor(resize(img, self.pre.image_size, self.pre.resize_mode, self.pre.patch_size),
                          self.pre.mean, self.pre.std)
            return i, t, (img.size, source_size(img)), None
        except (FileNotFoundError, ImageReadError) as exc:
            return i, None, None, getattr(exc, "reason", None) or str(exc)
        except (OSError, ValueError, MemoryError) as exc:
            return i, None, None, f"{exc.__class__.__name__}: {exc}"


def _collate(items):
    good = [it for it in items if it[1] is not None]
    bad = [(i, r) for i, t, _, r in items if t is None]
    batch = torch.stack([t for _, t, _, _ in good]) if good else None
    return [i for i, *_ in good], batch, [s for _, _, s, _ in good], bad


class Explainer:
    """Attribution maps for a ``mirip.scoring.scorer.Scorer`` (see the module docstring for the method)."""

    def __init__(self, scorer, steps: int = 32):
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        self.scorer, self.steps = scorer, int(steps)
        self.model = scorer.model
        self.ext = scorer.model.feature_extractor
        self.pre = scorer.preprocessor
        self._baseline = None

    # -- the backbone pass ---------------------------------------------------------------------------------
    def _tokens(self, images: torch.Tensor):
        """Run the backbone once: {block: normed tokens (detached)}, and for blocks a cls entry reads,
        {block: (entering tokens leaf, cls of block output with its graph)}."""
        ext, fam = self.ext, self.ext.family
        blocks, norm = fam.blocks(ext.backbone), fam.final_norm(ext.backbone)
        want = {b for b in ext.entry_blocks}
        cls_blocks = {b for e, b in zip(ext.entries, ext.entry_blocks) if e.pooling in ("cls", "cls_mean")}
        deepest = max(want)
        normed, leaves, cls = {}, {}, {}

        def pre_hook(b):
            def hook(module, args, kwargs):
                # A leaf that requires grad: the cls entry's gradient stops at the tokens entering block b.
                if args:
                    leaves[b] = args[0].detach().requires_grad_(True)
                    return (leaves[b],) + tuple(args[1:]), kwargs
                leaves[b] = kwargs["hidden_states"].detach().requires_grad_(True)
                return args, {**kwargs, "hidden_states": leaves[b]}
            return hook

        def post_hook(b):
            def hook(module, args, output):
                tokens = norm(block_output(output))
                if b in cls_blocks:
                    cls[b] = fam.cls(ext.backbone, tokens)
                normed[b] = tokens.detach()
                if b == deepest:
                    raise _Stop
                # Cut the graph here, so deeper blocks run without building one.
                if isinstance(output, (tuple, list)):
                    return (output[0].detach(),) + tuple(output[1:])
                return output.detach()
            return hook

        handles = [blocks[b - 1].register_forward_pre_hook(pre_hook(b), with_kwargs=True) for b in cls_blocks]
        handles += [blocks[b - 1].register_forward_hook(post_hook(b)) for b in want]
        images = images.to(ext.device, dtype=ext.weight_dtype)
        try:
            with torch.enable_grad() if cls_blocks else torch.no_grad(), ext._autocast():
                fam.forward(ext.backbone, images)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return normed, leaves, cls

    def _features(self, normed, cls) -> List[torch.Tensor]:
        """The spec's entries (B, dim) each, scaled, as ``extract`` computes them."""
        ext, out = self.ext, []
        scales = ext.entry_scales or [1.0] * len(ext.entries)
        for e, b, s in zip(ext.entries, ext.entry_blocks, scales):
            if e.pooling == "cls":
                v = cls[b]
            elif e.pooling == "cls_mean":
                v = torch.cat([cls[b], ext.layout.patch_tokens(normed[b]).mean(1)], dim=1)
            else:
                v = ext._pool(normed[b], e.pooling)
            out.append(v.detach().float() * s)
        return out

    # -- head -> entries -----------------------------------------------------------------------------------
    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.score_head(self.model.projector(x)).reshape(-1)

    def _integrated_gradients(self, x: torch.Tensor, x0: torch.Tensor):
        """Path-averaged gradient (B, D), f(x) and f(x0)."""
        head_dtype = next(self.model.projector.parameters()).dtype
        alphas = (torch.arange(self.steps, dtype=torch.float32, device=x.device) + 0.5) / self.steps
        path = x0[None, None] + alphas[None, :, None] * (x - x0[None])[:, None]  # (B, K, D)
        with torch.enable_grad():
            p = path.reshape(-1, x.shape[1]).to(head_dtype).detach().requires_grad_(True)
            grad, = torch.autograd.grad(self._head(p).sum(), p)
        with torch.no_grad():
            fx, fx0 = self._head(x.to(head_dtype)).float(), self._head(x0[None].to(head_dtype)).float()
        return grad.float().reshape(x.shape[0], self.steps, -1).mean(1), fx, fx0

    def baseline(self):
        """The blank page's (features per entry, tokens per block, entering tokens per cls block), once."""
        if self._baseline is None:
            size = self.pre.image_size
            from PIL import Image

            blank = to_tensor(Image.new("RGB", (size, size), PAPER_WHITE), self.pre.mean, self.pre.std)[None]
            normed, leaves, cls = self._tokens(blank)
            feats = self._features(normed, cls)
            self._baseline = ([f[0] for f in feats], {b: t[0].float() for b, t in normed.items()},
                              {b: t[0].detach().float() for b, t in leaves.items()})
        return self._baseline

    # -- entries -> patches --------------------------------------------------------------------------------
    def _spread(self, pooling: str, g: torch.Tensor, x0: torch.Tensor, patches: torch.Tensor, scale: float):
        """(B, N) cell contributions of a mean/std entry whose step-1 gradient is g (B, dim)."""
        n = patches.shape[1]
        if pooling == "mean":
            return torch.einsum("bnd,bd->bn", patches * scale - x0, g) / n
        mu = patches.mean(1, keepdim=True)
        sigma = patches.std(1, correction=0, keepdim=True)
        share = torch.where(sigma > 0, (patches - mu) ** 2 / (n * sigma.clamp_min(1e-30)), torch.zeros_like(patches))
        return torch.einsum("bnd,bd->bn", share * scale - x0 / n, g)

    def _cls_cells(self, g: torch.Tensor, cls_out: torch.Tensor, leaf: torch.Tensor, leaf0: torch.Tensor,
                   retain: bool) -> torch.Tensor:
        """(B, N): gradient x (input - blank input) of g . cls on the patch tokens entering the block."""
        grad, = torch.autograd.grad((cls_out.float() * g).sum(), leaf, retain_graph=retain)
        lay = self.ext.layout
        return (lay.patch_tokens(grad.float()) * lay.patch_tokens(leaf.detach().float() - leaf0[None])).sum(-1)

    def explain_batch(self, images: torch.Tensor) -> List[dict]:
        """Per image: map (grid), score, baseline score, unassigned share, quadrature gap, methods."""
        ext = self.ext
        base_feats, _, base_leaves = self.baseline()
        normed, leaves, cls = self._tokens(images)
        feats = self._features(normed, cls)
        x, x0 = torch.cat(feats, 1), torch.cat(base_feats, 0).to(feats[0].device)
        g, fx, fx0 = self._integrated_gradients(x, x0)
        step1 = ((x - x0[None]) * g).sum(1)
        scales = ext.entry_scales or [1.0] * len(ext.entries)
        hidden = ext.info.hidden_size
        cells, unassigned, methods, start = 0, torch.zeros_like(fx), {}, 0
        pending = [b for e, b in zip(ext.entries, ext.entry_blocks) if e.pooling in ("cls", "cls_mean")]
        for k, (e, b, s, dim) in enumerate(zip(ext.entries, ext.entry_blocks, scales, ext.entry_dims)):
            ge, x0e = g[:, start:start + dim], x0[start:start + dim]
            part = ((feats[k] - x0e[None]) * ge).sum(1)
            patches = ext.layout.patch_tokens(normed[b].float())
            if e.pooling in EXACT_POOLINGS:
                cells = cells + self._spread(e.pooling, ge, x0e, patches, s)
                methods[e.name] = "exact"
            else:
                gc = ge[:, :hidden] * s
                pending.remove(b)
                c = self._cls_cells(gc, cls[b], leaves[b], base_leaves[b], retain=b in pending)
                if e.pooling == "cls_mean":
                    c = c + self._spread("mean", ge[:, hidden:], x0e[hidden:], patches, s)
                cells = cells + c
                unassigned = unassigned + part - c.sum(1)
                methods[e.name] = "gradient x input on the tokens entering block %d (first order)" % b
            start += dim
        gh, gw = (int(v) // ext.patch_size for v in images.shape[2:])
        if cells.shape[1] != gh * gw:
            raise RuntimeError(f"{ext.info.name}: {cells.shape[1]} patch tokens for a {gh}x{gw} grid "
                               f"({tuple(images.shape[2:])} px, patch {ext.patch_size}); the token layout is wrong")
        grid = cells.detach().reshape(-1, gh, gw).cpu().numpy().astype(np.float32)
        gap = (fx - fx0 - step1).detach().cpu()
        return [{"map": grid[i], "score": float(fx[i]), "baseline_score": float(fx0[0]),
                 "unassigned": float(unassigned[i]), "quadrature_gap": float(gap[i]), "methods": methods}
                for i in range(len(grid))]

    def explain_paths(self, paths: Sequence[str], batch_size: int = 8, num_workers: int = 0,
                      progress: bool = True) -> ExplainResult:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        paths = [os.fspath(p) for p in paths]
        loader = DataLoader(_Files(paths, self.pre), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=_collate)
        done: Dict[int, Explanation] = {}
        failures: Dict[int, str] = {}
        bar = tqdm(total=len(paths), desc="explain", unit="img", disable=not progress)
        for idx, batch, sizes, bad in loader:
            failures.update(bad)
            if batch is not None:
                for i, size, r in zip(idx, sizes, self.explain_batch(batch)):
                    done[i] = self._wrap(paths[i], size, r)
            bar.update(len(idx) + len(bad))
        bar.close()
        return ExplainResult([done[i] for i in sorted(done)], [(paths[i], failures[i]) for i in sorted(failures)])

    def explain_images(self, images: Sequence[Tuple[str, Image.Image]], batch_size: int = 8) -> List[Explanation]:
        """Explanations of images already decoded (uploads to the service), each named by its given name;
        nothing is read from disk. The pixels go through the scorer's own preprocessing, as files do."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        out: List[Explanation] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            batch = torch.stack([self.pre(img) for _, img in chunk])
            results = self.explain_batch(batch)
            out.extend(self._wrap(name, (img.size, source_size(img)), r) for (name, img), r in zip(chunk, results))
        return out

    def _wrap(self, path: str, sizes, r: dict) -> Explanation:
        """``sizes``: (the decoded picture's, the file's upright). The backbone saw the decoded one; the outputs
        describe the file, which is what a viewer reopens."""
        p, (decoded, upright) = self.ext.patch_size, sizes
        box, source = input_geometry(decoded[0], decoded[1], self.pre.image_size, self.pre.resize_mode, p)
        return Explanation(path=path, score=r["score"], baseline_score=r["baseline_score"], map=r["map"],
                           content=content_cells(box, r["map"].shape, p), patch_size=p, image_size=tuple(upright),
                           content_box=box, source_box=scale_box(source, decoded, upright),
                           exact=all(m == "exact" for m in r["methods"].values()), methods=r["methods"],
                           unassigned=r["unassigned"], quadrature_gap=r["quadrature_gap"])
