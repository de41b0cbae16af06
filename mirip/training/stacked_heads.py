"""K ranking heads of one shape, their parameters stacked along a leading K axis and trained in one pass.

Each head is exactly a ``RankingHead`` (Projector + score head): built the same
way (``torch.manual_seed(seed)`` then ``RankingHead(...)``), so its initial
weights are the ones a single run would start from. The forward pass runs all
heads at once: the first layer as one wide GEMM over the shared input, the rest
as batched matmuls. The loss is the sum of the heads' own mean losses, so each
head's gradient is exactly the gradient of its own loss.

What stays per head:

- optimizer: one ``torch.optim.AdamW`` whose K param groups hold *aliases* of
  the stacked storage (``head_params(k)``), so each head has its own lr, weight
  decay, moments and step count, with torch's own AdamW arithmetic;
- schedule: one ``CosineAnnealingLR`` on that optimizer steps every group's lr
  from its own base lr, as K separate runs would;
- gradient clipping: each head's own total norm (``clip_grad_norm_per_head``);
- dropout: each head keeps its own RNG state, restored before and saved after
  each of its dropout draws, so its masks are the ones the same head would draw
  training alone (on CPU exactly; the state swap is exact on CUDA too, where the
  draw is a fused kernel);
- early stopping: a stopped head gets no gradient, so AdamW leaves it untouched.

The optimizers are in ``mirip.training.stacked_optim``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mirip.ml.ranking_model import OFFSET_PARAMETERS, RankingHead, zero_offset_gradient

# RankingHead parameter names, in its state-dict order (also the order its optimizer sees them).
PARAM_NAMES = (
    "projector.net.0.weight", "projector.net.0.bias",  # Linear(D, H)
    "projector.net.1.weight", "projector.net.1.bias",  # LayerNorm(H)
    "projector.net.4.weight", "projector.net.4.bias",  # Linear(H, P)
    "projector.net.5.weight", "projector.net.5.bias",  # LayerNorm(P)
    "score_head.0.weight", "score_head.0.bias",        # Linear(P, 1)
)
LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, which the Projector uses


def _get_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def build_head(input_dim: int, projector_dim: int, margin: float, hidden_dim: int, dropout: float, seed: int,
               device: torch.device) -> tuple:
    """(head, device_rng, cpu_rng): a RankingHead seeded as a single run seeds it, and the RNG states right after.

    ``device_rng`` is where the head's dropout stream starts on ``device``; ``cpu_rng`` is the CPU stream
    (the same thing on CPU). The global RNG is left as it was.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        head = RankingHead(input_dim, projector_dim, margin, hidden_dim, dropout)
        cpu_state = torch.get_rng_state()
        state = _get_rng_state(device)
    return head.to(device), state, cpu_state


class StackedHeads(nn.Module):
    """K RankingHeads with equal (input, hidden, projector) dims, stored as (K, ...) parameters."""

    def __init__(self, heads: Sequence[RankingHead], rng_states: Optional[Sequence[torch.Tensor]] = None):
        super().__init__()
        if not heads:
            raise ValueError("StackedHeads needs at least one head")
        dims = {(h.input_dim, h.hidden_dim, h.projector_output_dim) for h in heads}
        if len(dims) != 1:
            raise ValueError(f"stacked heads must share input, hidden and projector dims; got {sorted(dims)}")
        self.input_dim, self.hidden_dim, self.projector_dim = dims.pop()
        self.k = len(heads)
        self.device = next(heads[0].parameters()).device
        states = [h.state_dict() for h in heads]
        # A ParameterList keeps the stacked tensors registered (``.to``, ``parameters()``) under plain indices.
        self.stacked = nn.ParameterList(
            [nn.Parameter(torch.stack([s[name].detach() for s in states]).contiguous()) for name in PARAM_NAMES]
        )
        for name in OFFSET_PARAMETERS:  # as in each RankingHead: the pairwise loss leaves them no gradient
            zero_offset_gradient(self.stacked[PARAM_NAMES.index(name)])
        self.margins = torch.tensor([h.margin for h in heads], dtype=torch.float32, device=self.device)
        self.dropouts = [float(h.dropout) for h in heads]
        self.head_configs = [h.head_config() for h in heads]
        self.rng_states = list(rng_states) if rng_states is not None else [None] * self.k
        if any(p > 0 for p in self.dropouts) and any(s is None for s in self.rng_states):
            raise ValueError("heads with dropout > 0 need their RNG states (see build_head)")

    # --- per-head views --------------------------------------------------------------------------
    def head_params(self, k: int) -> List[nn.Parameter]:
        """Head k's parameters as leaves that alias the stacked storage (an optimizer updates them in place)."""
        return [nn.Parameter(p.data[k]) for p in self.stacked]

    def head_state_dict(self, k: int) -> Dict[str, torch.Tensor]:
        """Head k in ``RankingHead.head_state_dict()`` form, copied to CPU."""
        return {name: p.detach()[k].to("cpu", copy=True) for name, p in zip(PARAM_NAMES, self.stacked)}

    def to_ranking_head(self, k: int) -> RankingHead:
        cfg = self.head_configs[k]
        head = RankingHead(cfg["input_dim"], cfg["projector_output_dim"], cfg["margin"], cfg["hidden_dim"],
                           cfg["dropout"])
        head.load_head_state_dict(self.head_state_dict(k))
        return head

    # --- forward ---------------------------------------------------------------------------------
    def _dropout_scale(self, n: int) -> Optional[torch.Tensor]:
        """(K, n, H) keep-masks scaled by 1/(1-p), drawn per head from that head's own RNG stream."""
        if not self.training or not any(p > 0 for p in self.dropouts):
            return None
        ones = torch.ones(n, self.hidden_dim, device=self.device)
        outer = _get_rng_state(self.device)
        scales = []
        for k, p in enumerate(self.dropouts):
            if p == 0:
                scales.append(ones)  # F.dropout with p=0 draws nothing; neither do we
                continue
            _set_rng_state(self.rng_states[k], self.device)
            # F.dropout on ones gives mask / (1 - p) and consumes the RNG exactly as on the real activations.
            scales.append(F.dropout(ones, p, training=True))
            self.rng_states[k] = _get_rng_state(self.device)
        _set_rng_state(outer, self.device)
        return torch.stack(scales)

    def forward(self, x: torch.Tensor, dropout_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores of every head for every row of ``x`` (N, D): shape (K, N).

        ``dropout_scale``: the (K, N, H) masks drawn beforehand (``_dropout_scale``); a step captured in a
        CUDA graph takes them from a static buffer, since swapping RNG states cannot be captured."""
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected features of shape (N, {self.input_dim}), got {tuple(x.shape)}")
        w1, b1, g1, be1, w2, b2, g2, be2, w3, b3 = self.stacked
        k, n, h, p = self.k, x.shape[0], self.hidden_dim, self.projector_dim
        # All heads' first layers as one wide GEMM: the shared input is read once.
        z = F.linear(x, w1.view(k * h, -1), b1.view(k * h)).view(n, k, h).transpose(0, 1)  # (K, N, H)
        z = F.layer_norm(z, (h,), eps=LAYERNORM_EPS) * g1.unsqueeze(1) + be1.unsqueeze(1)
        z = F.gelu(z)
        scale = self._dropout_scale(n) if dropout_scale is None else dropout_scale
        if scale is not None:
            z = z * scale
        z = torch.baddbmm(b2.unsqueeze(1), z, w2.transpose(1, 2))  # (K, N, P)
        z = F.layer_norm(z, (p,), eps=LAYERNORM_EPS) * g2.unsqueeze(1) + be2.unsqueeze(1)
        return torch.baddbmm(b3.unsqueeze(1), z, w3.transpose(1, 2)).squeeze(-1)  # (K, N)

    def pair_losses(self, s1: torch.Tensor, s2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each head's MarginRankingLoss (mean over the batch) with its own margin: shape (K,)."""
        y = labels.to(dtype=s1.dtype).unsqueeze(0)
        return (-y * (s1 - s2) + self.margins.unsqueeze(1)).clamp_min(0).mean(dim=1)


@torch.no_grad()
def clip_grad_norm_per_head(stacked: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for each head on its own: returns the K total norms (before clipping).

    Same arithmetic as torch's: norm of the per-tensor 2-norms, then grads *= min(max_norm / (norm + 1e-6), 1).
    """
    grads = [p.grad for p in stacked]
    k = grads[0].shape[0]
    per_tensor = torch.stack([torch.linalg.vector_norm(g.reshape(k, -1), 2, dim=1) for g in grads])
    total = torch.linalg.vector_norm(per_tensor, 2, dim=0)
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, [coef.view((k,) + (1,) * (g.dim() - 1)) for g in grads])
    return total


