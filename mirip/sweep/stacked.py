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
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mirip.ml.ranking_model import RankingHead

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


OPTIMIZERS = ("auto", "fused", "batched", "plain")


def default_optimizer(device: torch.device) -> str:
    """CPU: AdamW is memory-bound, so one fused pass per head wins. GPU: kernel launches are the cost, so
    a handful of ops over the stacked tensors (whatever K) wins."""
    return "batched" if device.type == "cuda" else "fused"


def make_optimizer(model: StackedHeads, learning_rates: Sequence[float], weight_decays: Sequence[float],
                   t_max: int, eta_min: float, kind: Optional[str] = None, capturable: bool = False):
    """The stacked heads' AdamW + CosineAnnealingLR: ``fused`` / ``plain`` (torch's AdamW per head, fused kernel
    or the single-tensor loop a single run uses) or ``batched`` (the same arithmetic over the stacked tensors).
    ``capturable``: the batched form a CUDA graph can replay (``auto`` then means ``batched``)."""
    kind = kind or "auto"
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer kind {kind!r}; use one of {', '.join(OPTIMIZERS)}")
    if kind == "auto":
        kind = "batched" if capturable else default_optimizer(model.device)
    if capturable and kind != "batched":
        raise ValueError(f"a captured (static or graph) sweep step needs the batched optimizer, not {kind!r}")
    if kind == "batched":
        return BatchedAdamW(model, learning_rates, weight_decays, t_max, eta_min, capturable=capturable)
    return StackedOptimizer(model, learning_rates, weight_decays, t_max, eta_min, fused=(kind == "fused"))


def _check_lengths(model: StackedHeads, learning_rates, weight_decays) -> None:
    if len(learning_rates) != model.k or len(weight_decays) != model.k:
        raise ValueError(f"need {model.k} learning rates and weight decays, got "
                         f"{len(learning_rates)} and {len(weight_decays)}")


def _scheduler_subset(state: dict, keep: Sequence[int]) -> dict:
    out = dict(state)
    for key in ("base_lrs", "_last_lr"):
        if isinstance(state.get(key), list):
            out[key] = [state[key][k] for k in keep]
    return out


class StackedOptimizer:
    """torch's AdamW + CosineAnnealingLR for K stacked heads, one param group (own lr, weight decay, state) per head."""

    def __init__(self, model: StackedHeads, learning_rates: Sequence[float], weight_decays: Sequence[float],
                 t_max: int, eta_min: float, fused: Optional[bool] = None):
        _check_lengths(model, learning_rates, weight_decays)
        self.model = model
        self.t_max, self.eta_min = t_max, eta_min
        self.views = [model.head_params(k) for k in range(model.k)]
        groups = [{"params": v, "lr": float(lr), "weight_decay": float(wd)}
                  for v, lr, wd in zip(self.views, learning_rates, weight_decays)]
        if fused is None:
            fused = model.device.type in ("cpu", "cuda")
        self.fused = bool(fused)
        self.kind = "fused" if self.fused else "plain"
        self.optimizer = torch.optim.AdamW(groups, fused=self.fused) if self.fused else torch.optim.AdamW(
            groups, foreach=False)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=t_max, eta_min=eta_min)

    def step(self, active: Sequence[bool]) -> None:
        """An AdamW step for the active heads; stopped heads get no gradient and so are not touched."""
        for k, on in enumerate(active):
            for view, p in zip(self.views[k], self.model.stacked):
                view.grad = p.grad[k] if on else None
        self.optimizer.step()
        for v in self.views:
            for view in v:
                view.grad = None

    def epoch_end(self) -> None:
        self.scheduler.step()

    def lrs(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def head_optimizer_state(self, k: int) -> dict:
        """Head k's AdamW state in ``torch.optim.AdamW(head.parameters()).state_dict()`` form, on CPU."""
        group = {n: v for n, v in self.optimizer.param_groups[k].items() if n != "params"}
        # Loaded into a plain AdamW, these flags would override its own choice of kernel.
        group.update(fused=None, foreach=None, params=list(range(len(self.views[k]))))
        state = {}
        for i, view in enumerate(self.views[k]):
            if view in self.optimizer.state:
                state[i] = {n: t.detach().to("cpu", copy=True) if torch.is_tensor(t) else t
                            for n, t in self.optimizer.state[view].items()}
        return {"state": state, "param_groups": [group]}

    def head_scheduler_state(self, k: int) -> dict:
        """Head k's CosineAnnealingLR state as a single run's scheduler would hold it."""
        return _scheduler_subset(self.scheduler.state_dict(), [k])

    def select(self, model: StackedHeads, keep: Sequence[int]) -> "StackedOptimizer":
        """This optimizer for ``model``, a stack of heads ``keep``: moments, steps, lrs and schedule carried over."""
        groups = self.optimizer.param_groups
        new = StackedOptimizer(model, [groups[k]["initial_lr"] for k in keep],
                               [groups[k]["weight_decay"] for k in keep], self.t_max, self.eta_min, fused=self.fused)
        for j, k in enumerate(keep):
            for old_view, new_view in zip(self.views[k], new.views[j]):
                old = self.optimizer.state.get(old_view)
                if old:
                    new.optimizer.state[new_view] = {n: t.clone() if torch.is_tensor(t) else t for n, t in old.items()}
        new.scheduler.load_state_dict(_scheduler_subset(self.scheduler.state_dict(), keep))
        for j, k in enumerate(keep):
            # The cosine schedule is recursive in the group's current lr: carry it over as it is.
            new.optimizer.param_groups[j]["lr"] = groups[k]["lr"]
        return new


class BatchedAdamW:
    """AdamW over the stacked (K, ...) tensors themselves, per-head lr and weight decay broadcast along K.

    The arithmetic of torch's single-tensor AdamW, op for op (scalars computed in double, as Python does), in
    about seven ops per tensor whatever K. The learning-rate schedule is torch's CosineAnnealingLR, run on
    placeholder parameters (one group per head), so it is exactly a single run's schedule.

    ``capturable``: the step count, bias corrections and per-head lr / decay factors live in device tensors
    updated in place (the step count by the step, the rest once per epoch), so a CUDA graph that captured
    ``step`` replays it correctly; the arithmetic is the same, the scalars computed in double on the device.
    """

    kind = "batched"
    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(self, model: StackedHeads, learning_rates: Sequence[float], weight_decays: Sequence[float],
                 t_max: int, eta_min: float, capturable: bool = False):
        _check_lengths(model, learning_rates, weight_decays)
        self.model = model
        self.t_max, self.eta_min = t_max, eta_min
        self.weight_decays = [float(w) for w in weight_decays]
        self.capturable = bool(capturable)
        self._step_count = 0
        self._step_t = torch.zeros((), dtype=torch.float64, device=model.device) if capturable else None
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in model.stacked]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in model.stacked]
        self._placeholder = torch.optim.SGD(
            [{"params": [torch.zeros(0, requires_grad=True)], "lr": float(lr)} for lr in learning_rates], lr=1.0)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self._placeholder, T_max=t_max, eta_min=eta_min)
        self._decay = None  # per-epoch (K,) tensors, rebuilt when the lrs change
        self._lr64 = None

    @property
    def step_count(self) -> int:
        # Capturable: the device counter is the truth (replays of a captured step never run this Python).
        return int(self._step_t) if self._step_t is not None else self._step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._step_count = int(value)
        if self._step_t is not None:
            self._step_t.fill_(float(value))

    def lrs(self) -> List[float]:
        return [g["lr"] for g in self._placeholder.param_groups]

    def _per_epoch(self) -> None:
        dev = self.model.device
        lr = torch.tensor(self.lrs(), dtype=torch.float64, device=dev)
        wd = torch.tensor(self.weight_decays, dtype=torch.float64, device=dev)
        decay = (1 - lr * wd).to(self.model.stacked[0].dtype)
        if self.capturable and self._lr64 is not None:
            self._lr64.copy_(lr)  # in place: a captured step reads these very tensors
            self._decay.copy_(decay)
        else:
            self._lr64, self._decay = lr, decay

    @torch.no_grad()
    def step(self, active: Sequence[bool]) -> None:
        if not all(active):
            raise ValueError("BatchedAdamW steps every head of its stack; rebuild the stack without stopped heads")
        if self._decay is None:
            self._per_epoch()
        beta1, beta2 = self.betas
        dtype = self.model.stacked[0].dtype
        if self.capturable:
            self._step_t.add_(1)
            bc1 = 1 - torch.pow(beta1, self._step_t)
            bc2_sqrt = (1 - torch.pow(beta2, self._step_t)).sqrt().to(dtype)
        else:
            self._step_count += 1
            bc1 = 1 - beta1 ** self._step_count
            bc2_sqrt = (1 - beta2 ** self._step_count) ** 0.5
        neg_step = (-(self._lr64 / bc1)).to(dtype)
        k = self.model.k
        params = list(self.model.stacked)
        grads = [p.grad for p in params]
        shapes = [(k,) + (1,) * (p.dim() - 1) for p in params]
        # foreach ops: one multi-tensor kernel per op on CUDA where shapes match; per-tensor ops (the same
        # arithmetic as torch's single-tensor AdamW, op for op) on CPU and where a per-head factor broadcasts.
        torch._foreach_mul_(params, [self._decay.view(sh) for sh in shapes])
        torch._foreach_lerp_(self.exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(self.exp_avg_sq, beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_mul(self.exp_avg, [neg_step.view(sh) for sh in shapes])
        torch._foreach_div_(update, denom)
        torch._foreach_add_(params, update)  # p + (-step_size * m) / denom, as addcdiv_ does

    def epoch_end(self) -> None:
        self._placeholder.step()  # no gradients: a no-op that keeps the scheduler's step-order check quiet
        self.scheduler.step()
        if self.capturable:
            self._per_epoch()
        else:
            self._decay = None

    def head_optimizer_state(self, k: int) -> dict:
        template = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=self.lrs()[k],
                                    weight_decay=self.weight_decays[k]).state_dict()["param_groups"][0]
        group = dict(template, initial_lr=self._placeholder.param_groups[k]["initial_lr"],
                     params=list(range(len(self.exp_avg))))
        state = {}
        if self.step_count:
            for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
                state[i] = {"step": torch.tensor(float(self.step_count)), "exp_avg": m[k].detach().to("cpu", copy=True),
                            "exp_avg_sq": v[k].detach().to("cpu", copy=True)}
        return {"state": state, "param_groups": [group]}

    def head_scheduler_state(self, k: int) -> dict:
        return _scheduler_subset(self.scheduler.state_dict(), [k])

    def select(self, model: StackedHeads, keep: Sequence[int]) -> "BatchedAdamW":
        groups = self._placeholder.param_groups
        new = BatchedAdamW(model, [groups[k]["initial_lr"] for k in keep], [self.weight_decays[k] for k in keep],
                           self.t_max, self.eta_min, capturable=self.capturable)
        idx = torch.tensor(list(keep), device=model.device)
        new.step_count = self.step_count
        new.exp_avg = [m.index_select(0, idx) for m in self.exp_avg]
        new.exp_avg_sq = [v.index_select(0, idx) for v in self.exp_avg_sq]
        new.scheduler.load_state_dict(_scheduler_subset(self.scheduler.state_dict(), keep))
        for j, k in enumerate(keep):
            new._placeholder.param_groups[j]["lr"] = groups[k]["lr"]
        return new
