"""The full-batch L-BFGS that stage two's small maximum-likelihood fits share: the tier calibration
(``mirip.training.calibration_fit``) and the judges' reliabilities (``mirip.training.judge_reliability``).

torch's L-BFGS with a strong-Wolfe line search, in the parameters' own dtype (float64 there), restarted from
where it stopped while a restart still lowers the loss: one run ends at ``max_iter``, and a hard fit (a split
whose tiers the scores separate perfectly) needs more.
"""

from __future__ import annotations

from typing import Callable

import torch

RESTARTS = 5


def minimize_lbfgs(loss_fn: Callable[[], torch.Tensor], params: torch.Tensor, max_iter: int = 500) -> float:
    """Minimise ``loss_fn()`` (a scalar of ``params``, a leaf with ``requires_grad``) in place; the final loss."""
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    previous = loss = float("inf")
    for _ in range(RESTARTS):
        loss = float(opt.step(closure).detach())
        if previous - loss < 1e-12:
            break
        previous = loss
    return loss
