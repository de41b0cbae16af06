"""The stage-two optimizer step, without the per-step Python a tiny head cannot afford.

A ranking head's step (1024 -> 512 -> 256 -> 1, batch 32) is ~3 ms on one CPU core. Around the arithmetic,
``clip_grad_norm_`` + ``AdamW.step()`` spend a few hundred microseconds on Python: grouping tensors by
device, re-collecting optimizer state, profiler and hook wrappers, and a multiply by exactly 1 whenever the
gradient norm is under the limit. ``clip_and_step`` does the same arithmetic with less of that:

- clipping: the same total norm and coefficient as ``clip_grad_norm_``; on a CPU the multiply is skipped when
  the coefficient is 1 (reading it there costs nothing; on a GPU it would be a sync per step, so a GPU clips
  exactly as ``clip_grad_norm_`` does);
- the step: for a fused AdamW in its plain form (one parameter group, one device and dtype, no hooks, no grad
  scaler, not capturable, state already made by a first ordinary ``step()``), the same fused kernel is called
  directly with the same arguments ``AdamW.step()`` would pass it.

Both are bit-identical to ``clip_grad_norm_(params, max_norm); optimizer.step()`` (tested); anything out of
the plain form takes that ordinary path.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


def clip_grads(params: List[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_(params, max_norm)``, minus the multiply by exactly 1 on a CPU."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or any(g.device.type != "cpu" for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if not bool(max_norm / (total + 1e-6) >= 1.0):  # NaN norms take the multiply too, as before
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def _plain_fused_adamw(optimizer: torch.optim.Optimizer, params: List[torch.Tensor]) -> Optional[str]:
    """None when ``fused_adamw_step`` may stand in for ``optimizer.step()``; else why not."""
    if not callable(getattr(torch, "_fused_adamw_", None)):
        return "this torch has no fused AdamW kernel op"
    if type(optimizer) is not torch.optim.AdamW or len(optimizer.param_groups) != 1:
        return "not a single-group AdamW"
    group = optimizer.param_groups[0]
    if not group.get("fused") or group.get("capturable") or group.get("amsgrad") or group.get("differentiable"):
        return "not the plain fused form"
    if not group.get("decoupled_weight_decay", True) or isinstance(group["lr"], torch.Tensor):
        return "coupled weight decay or a tensor lr"
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        return "a grad scaler owns the step"
    if (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or _global_optimizer_pre_hooks or _global_optimizer_post_hooks):
        return "step hooks are registered"
    if len(group["params"]) != len(params) or any(a is not b for a, b in zip(group["params"], params)):
        return "other parameters"
    if len({(p.device, p.dtype) for p in params}) != 1 or any(p.grad is None or p.grad.is_sparse for p in params):
        return "mixed devices or dtypes, or a missing gradient"
    if any("step" not in optimizer.state.get(p, {}) for p in params):
        return "no state yet (the first step goes through AdamW.step)"
    return None


def fused_adamw_step(optimizer: torch.optim.Optimizer, params: List[torch.Tensor]) -> None:
    """``optimizer.step()`` of a plain fused AdamW: the kernel ``torch.optim.adam._fused_adam`` calls, with its
    arguments, minus the Python around it. Callers check ``_plain_fused_adamw`` first."""
    group = optimizer.param_groups[0]
    states = [optimizer.state[p] for p in params]
    steps = [s["step"] for s in states]
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    try:
        torch._fused_adamw_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=group["lr"],
                            beta1=float(beta1), beta2=float(beta2), weight_decay=group["weight_decay"],
                            eps=group["eps"], maximize=group["maximize"], grad_scale=None, found_inf=None)
    except TypeError:  # arguments refused before any arithmetic: leave the state as it was
        torch._foreach_sub_(steps, 1)
        raise


def clip_and_step(optimizer: torch.optim.Optimizer, params: List[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_(params, max_norm); optimizer.step()``, bit for bit, with less Python per step."""
    clip_grads(params, max_norm)
    if _plain_fused_adamw(optimizer, params) is None and not getattr(optimizer, "_mirip_public_step", False):
        try:
            fused_adamw_step(optimizer, params)
            return
        except TypeError:
            # A torch whose private kernel op takes other arguments: this optimizer uses the public step from now on.
            optimizer._mirip_public_step = True
    optimizer.step()
