"""The optimizers of ``StackedHeads`` (``mirip.training.stacked_heads``): AdamW and
CosineAnnealingLR with each head's own lr, weight decay, moments, step count and schedule, as K separate
runs would have them: torch's AdamW over per-head param groups (``fused`` / ``plain``) or the same arithmetic
over the stacked tensors (``batched``, capturable by a CUDA graph). ``make_optimizer`` picks one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence

import torch

if TYPE_CHECKING:  # mirip.training.stacked_heads imports this module
    from mirip.training.stacked_heads import StackedHeads


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


def _merged_scheduler_state(states: Sequence[dict]) -> dict:
    """One scheduler state for K heads from K single runs' (the same epoch): their per-group lists side by side."""
    out = dict(states[0])
    for key in ("base_lrs", "_last_lr"):
        if isinstance(out.get(key), list):
            out[key] = [float(s[key][0]) for s in states]
    return out


def _saved_state(optimizer_state: dict, i: int):
    state = optimizer_state.get("state") or {}
    return state.get(i, state.get(str(i)))


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

    def load_head_states(self, optimizer_states: Sequence[dict], scheduler_states: Sequence[dict]) -> None:
        """Continue K single runs: head k takes ``optimizer_states[k]`` (a single head's AdamW state dict, as
        ``head_optimizer_state`` or a Trainer checkpoint holds it) and its scheduler state."""
        for k, saved in enumerate(optimizer_states):
            group = saved["param_groups"][0]
            for i, view in enumerate(self.views[k]):
                st = _saved_state(saved, i)
                if not st:
                    continue
                # As torch's load_state_dict casts: moments to the parameter, the step a float32 scalar (on the
                # parameter's device for the fused kernel).
                self.optimizer.state[view] = {
                    n: (t.to(device=view.device if self.fused else "cpu", dtype=torch.float32) if n == "step"
                        else t.to(device=view.device, dtype=view.dtype)) if torch.is_tensor(t) else t
                    for n, t in st.items()}
            self.optimizer.param_groups[k]["lr"] = float(group["lr"])
            self.optimizer.param_groups[k]["initial_lr"] = float(group.get("initial_lr", group["lr"]))
        self.scheduler.load_state_dict(_merged_scheduler_state(scheduler_states))

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

    def load_head_states(self, optimizer_states: Sequence[dict], scheduler_states: Sequence[dict]) -> None:
        """Continue K single runs (``StackedOptimizer.load_head_states``); they must have taken the same steps."""
        steps = set()
        for k, saved in enumerate(optimizer_states):
            for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
                st = _saved_state(saved, i)
                if st:
                    steps.add(int(float(st["step"])))
                    m[k].copy_(st["exp_avg"])
                    v[k].copy_(st["exp_avg_sq"])
            group = saved["param_groups"][0]
            self._placeholder.param_groups[k]["lr"] = float(group["lr"])
            self._placeholder.param_groups[k]["initial_lr"] = float(group.get("initial_lr", group["lr"]))
        if len(steps) > 1:
            raise ValueError(f"heads resumed into one batched optimizer must have taken the same steps, got {steps}")
        self.step_count = steps.pop() if steps else 0
        self.scheduler.load_state_dict(_merged_scheduler_state(scheduler_states))
        self._decay = None
        if self.capturable:
            self._lr64 = None
            self._per_epoch()

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
