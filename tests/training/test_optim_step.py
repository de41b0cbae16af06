"""Contracts of ``mirip.training.optim_step`` beyond the trainer's bit-identity test.

Every reference is torch's own ``clip_grad_norm_`` + ``AdamW.step()`` on a copy of the same model, never
mirip's helpers; "no multiply" is read from the gradient's version counter, which every in-place op bumps.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from mirip.training.optim_step import _plain_fused_adamw, clip_and_step, clip_grads


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))


def _backward(model: torch.nn.Module, scale: float = 1.0, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 6, generator=gen) * scale
    model.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()


def _naive_norm(model: torch.nn.Module) -> float:
    """The 2-norm of all gradients, in float64, by a loop."""
    return sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()) ** 0.5


def test_clip_grads_matches_clip_grad_norm_and_skips_only_the_multiply_by_one():
    for scale, max_norm in ((1.0, 1e-3), (3.0, 0.5), (1.0, 1e6), (10.0, 2.0)):
        ours, ref = _model(), _model()
        _backward(ours, scale)
        _backward(ref, scale)
        versions = [p.grad._version for p in ours.parameters()]
        total = _naive_norm(ours)
        clip_grads(list(ours.parameters()), max_norm)
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), max_norm)
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(a.grad, b.grad), (scale, max_norm)
        touched = [p.grad._version != v for p, v in zip(ours.parameters(), versions)]
        if total < max_norm:
            assert not any(touched), "a norm under the limit leaves the gradients alone on a CPU"
        else:
            assert all(touched)
            assert abs(_naive_norm(ours) - max_norm) < 1e-4 * max_norm  # clipped to the limit


def test_clip_grads_at_a_coefficient_of_exactly_one_does_not_multiply():
    model = _model()
    _backward(model)
    grads = [p.grad for p in model.parameters()]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    max_norm = float(total + 1e-6)  # the float32 coefficient max_norm / (total + 1e-6) is exactly 1
    assert float(max_norm / (total + 1e-6)) == 1.0
    versions = [g._version for g in grads]
    before = [g.clone() for g in grads]
    clip_grads(list(model.parameters()), max_norm)
    assert [g._version for g in grads] == versions
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


def test_clip_grads_at_a_norm_just_over_the_limit_multiplies():
    # max_norm == total: the coefficient max_norm / (total + 1e-6) is just under 1, so torch multiplies.
    ours, ref = _model(), _model()
    _backward(ours)
    _backward(ref)
    max_norm = float(torch.nn.utils.get_total_norm([p.grad for p in ours.parameters()], 2.0))
    versions = [p.grad._version for p in ours.parameters()]
    before = [p.grad.clone() for p in ours.parameters()]
    clip_grads(list(ours.parameters()), max_norm)
    torch.nn.utils.clip_grad_norm_(list(ref.parameters()), max_norm)
    assert all(p.grad._version != v for p, v in zip(ours.parameters(), versions))
    assert any(not torch.equal(p.grad, b) for p, b in zip(ours.parameters(), before))
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_gradients_off_the_cpu_are_clipped_without_reading_the_norm_on_the_host():
    # The meta device stands in for a GPU: a tensor there has no value, so any host read (bool, float) raises,
    # as a GPU would block on a sync. clip_grad_norm_ itself never reads it.
    model = torch.nn.Linear(3, 2, device="meta")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    clip_grads(list(model.parameters()), 1.0)
    assert all(p.grad.device.type == "meta" for p in model.parameters())


def test_clip_grads_with_no_gradient_or_a_partial_one():
    model = _model()
    params = list(model.parameters())
    clip_grads(params, 1.0)  # no gradients at all: nothing to do, no error
    assert all(p.grad is None for p in params)
    ref = copy.deepcopy(model)
    _backward(model, 5.0)
    _backward(ref, 5.0)
    params[0].grad = None
    list(ref.parameters())[0].grad = None
    clip_grads(params, 0.1)
    torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.1)
    for a, b in zip(params, ref.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_a_nan_gradient_norm_takes_the_multiply_as_clip_grad_norm_does():
    ours, ref = _model(), _model()
    for m in (ours, ref):
        _backward(m)
        list(m.parameters())[1].grad[0] = float("nan")
    clip_grads(list(ours.parameters()), 1.0)
    torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(list(ours.parameters())[0].grad).all()  # NaN * finite coefficient spreads to every grad


def _opt(params, **kw):
    kw = {"lr": 1e-2, "fused": True, **kw}
    return torch.optim.AdamW(params, **kw)


def _run_pair(make_opt, steps: int = 4, max_norm: float = 0.05, setup=None):
    """Train two copies, one through clip_and_step and one through clip_grad_norm_ + step; compare every bit."""
    ours, ref = _model(), _model()
    opts = [make_opt(list(m.parameters())) for m in (ours, ref)]
    if setup is not None:
        for o in opts:
            setup(o)
    for step in range(steps):
        _backward(ours, 1.0 + step, seed=step)
        _backward(ref, 1.0 + step, seed=step)
        clip_and_step(opts[0], list(ours.parameters()), max_norm)
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), max_norm)
        opts[1].step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    s0, s1 = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    assert s0.keys() == s1.keys()
    for k in s1:
        for key in s1[k]:
            assert torch.equal(s0[k][key], s1[k][key]), (k, key)
    return opts[0], list(ours.parameters())


@pytest.mark.parametrize("kw", [
    dict(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.3, lr=3e-2),
    dict(betas=(0.9, 0.5), eps=1e-1, weight_decay=0.0, lr=1e-1, maximize=True),
])
def test_the_direct_fused_step_equals_adamw_step_bit_for_bit(kw):
    opt, params = _run_pair(lambda p: _opt(p, **kw))
    assert _plain_fused_adamw(opt, params) is None  # after the first step, the direct kernel call ran
    assert int(opt.state[params[0]]["step"]) == 4


def test_the_direct_step_is_taken_only_once_state_exists():
    model = _model()
    params = list(model.parameters())
    opt = _opt(params)
    _backward(model)
    assert _plain_fused_adamw(opt, params) == "no state yet (the first step goes through AdamW.step)"
    clip_and_step(opt, params, 1.0)
    assert _plain_fused_adamw(opt, params) is None
    # State for all but one parameter is still "no state".
    opt.state.pop(params[2])
    assert _plain_fused_adamw(opt, params) == "no state yet (the first step goes through AdamW.step)"


class _MyAdamW(torch.optim.AdamW):
    pass


def _primed(make_opt=_opt):
    """An optimizer in the plain form after one ordinary step, its model and parameters (gradients set)."""
    model = _model()
    params = list(model.parameters())
    opt = make_opt(params)
    _backward(model)
    opt.step()
    _backward(model, 2.0)
    assert _plain_fused_adamw(opt, params) is None
    return opt, model, params


def test_every_departure_from_the_plain_form_is_named_and_takes_adamw_step():
    def check(opt, params, reason):
        assert _plain_fused_adamw(opt, params) == reason

    # Optimizer classes and groups.
    for make in (lambda p: torch.optim.Adam(p, lr=1e-2, fused=True), lambda p: _MyAdamW(p, lr=1e-2, fused=True),
                 lambda p: torch.optim.AdamW([{"params": p[:2]}, {"params": p[2:]}], lr=1e-2, fused=True)):
        model = _model()
        params = list(model.parameters())
        check(make(params), params, "not a single-group AdamW")
    # Group flags.
    for key, value in (("fused", False), ("fused", None), ("capturable", True), ("amsgrad", True),
                       ("differentiable", True)):
        opt, _, params = _primed()
        opt.param_groups[0][key] = value
        check(opt, params, "not the plain fused form")
    opt, _, params = _primed()
    opt.param_groups[0]["decoupled_weight_decay"] = False
    check(opt, params, "coupled weight decay or a tensor lr")
    opt, _, params = _primed()
    opt.param_groups[0]["lr"] = torch.tensor(1e-2)
    check(opt, params, "coupled weight decay or a tensor lr")
    for attr in ("grad_scale", "found_inf"):
        opt, _, params = _primed()
        setattr(opt, attr, torch.ones(()))
        check(opt, params, "a grad scaler owns the step")
    # Hooks: the optimizer's own and the global ones.
    hook = lambda *a, **k: None  # noqa: E731
    for register in (lambda o: o.register_step_pre_hook(hook), lambda o: o.register_step_post_hook(hook),
                     lambda o: register_optimizer_step_pre_hook(hook),
                     lambda o: register_optimizer_step_post_hook(hook)):
        opt, _, params = _primed()
        handle = register(opt)
        try:
            check(opt, params, "step hooks are registered")
        finally:
            handle.remove()
        check(opt, params, None)
    # Parameters: fewer, more, another order, another tensor.
    opt, model, params = _primed()
    check(opt, params[:-1], "other parameters")
    check(opt, params + [torch.nn.Parameter(torch.zeros(1))], "other parameters")
    check(opt, params[::-1], "other parameters")
    check(opt, params[:-1] + [torch.nn.Parameter(params[-1].detach().clone())], "other parameters")
    # Gradients and dtypes.
    opt, model, params = _primed()
    params[1].grad = None
    check(opt, params, "mixed devices or dtypes, or a missing gradient")
    opt, model, params = _primed()
    params[1].grad = params[1].grad.to_sparse()
    check(opt, params, "mixed devices or dtypes, or a missing gradient")
    opt, model, params = _primed()
    params[3].data = params[3].data.double()
    params[3].grad = params[3].grad.double()
    check(opt, params, "mixed devices or dtypes, or a missing gradient")


def test_a_global_hook_sends_clip_and_step_through_adamw_step():
    calls = []
    handle = register_optimizer_step_post_hook(lambda o, a, k: calls.append(o))
    try:
        _run_pair(lambda p: _opt(p), steps=3)
    finally:
        handle.remove()
    assert len(calls) == 6  # both copies, every step: the hook ran, so AdamW.step ran


@pytest.mark.parametrize("kw", [dict(amsgrad=True), dict(fused=False, foreach=False), dict(weight_decay=0.5)])
def test_clip_and_step_off_the_plain_form_equals_adamw_step(kw):
    _run_pair(lambda p: _opt(p, **kw), steps=3)


def test_coupled_weight_decay_takes_the_ordinary_step():
    def coupled(o):
        o.param_groups[0]["decoupled_weight_decay"] = False
        o.param_groups[0]["weight_decay"] = 0.2

    opt, params = _run_pair(lambda p: _opt(p), steps=3, setup=coupled)
    assert _plain_fused_adamw(opt, params) == "coupled weight decay or a tensor lr"


def test_a_group_without_the_decoupled_flag_is_adamw_s_own_decoupled_decay():
    # Torch releases before AdamW recorded ``decoupled_weight_decay`` in its groups: AdamW always decoupled.
    opt, _, params = _primed()
    del opt.param_groups[0]["decoupled_weight_decay"]
    assert _plain_fused_adamw(opt, params) is None


def test_the_plain_form_skips_adamw_step_after_the_first_step():
    model = _model()
    params = list(model.parameters())
    opt = _opt(params)
    real_step, calls = opt.step, []
    opt.step = lambda *a, **k: calls.append(1) or real_step(*a, **k)  # counts the ordinary path
    for i in range(4):
        _backward(model, seed=i)
        clip_and_step(opt, params, 1.0)
    assert len(calls) == 1 and int(opt.state[params[0]]["step"]) == 4
