"""Stacked heads equal the same heads trained alone by the Trainer: forward, clipping, optimizer, whole runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mirip.ml.ranking_model import RankingHead
from mirip.training.stacked_training import _compact, train_group
from mirip.sweep.grid import SweepGrid
from mirip.training.stacked_heads import PARAM_NAMES, StackedHeads, build_head, clip_grad_norm_per_head
from mirip.training.stacked_optim import make_optimizer
from mirip.training.config import TrainingConfig
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.trainer import Trainer

from _sweep_helpers import one_thread

CPU = torch.device("cpu")
# The score bias and the last LayerNorm's bias shift both scores of a pair equally, so their true gradient is
# exactly zero; in floats it is rounding noise, which Adam (g / (sqrt(v) + eps)) blows up to lr-sized steps in
# either run. They never change a score difference, a loss or an accuracy, so they are compared separately.
PAIR_INVARIANT = ("projector.net.5.bias", "score_head.0.bias")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _data(n: int = 72, dim: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    ranks = np.arange(n) % 4
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    feats[:, 0] += 0.4 * ranks
    return torch.from_numpy(feats), ranks


def _datasets(feats, ranks, tc: TrainingConfig, seed: int):
    tr, va = np.arange(0, 48), np.arange(48, 72)
    train = FeaturePairDataset(feats, ranks[tr], rows=tr, num_pairs=tc.pairs_per_epoch, batch_size=tc.batch_size,
                               seed=seed, balance=tc.pair_balance)
    val = FeaturePairDataset(feats, ranks[va], rows=va, num_pairs=tc.eval_pairs, batch_size=tc.batch_size,
                             seed=seed, balance=tc.pair_balance)
    return train, val


def _alone(cfg, feats, ranks, tc, checkpoint_dir: str = ""):
    """The configuration trained by itself, exactly as scripts/train.py trains it."""
    c = dataclasses.replace(tc, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, seed=cfg.seed,
                            checkpoint_dir=checkpoint_dir)
    torch.manual_seed(cfg.seed)
    head = RankingHead(feats.shape[1], cfg.projector_dim, cfg.margin, cfg.hidden_dim, cfg.dropout)
    trainer = Trainer(head, c, progress=False, log=lambda msg: None)
    train, val = _datasets(feats, ranks, c, cfg.seed)
    history = trainer.fit(train, val)
    return trainer, history


def test_forward_equals_each_head_alone():
    x = torch.randn(20, 10)
    heads = [build_head(10, 4, m, 8, 0.0, s, CPU)[0] for m, s in ((0.5, 0), (1.0, 1), (2.0, 2))]
    stacked = StackedHeads(heads).eval()
    with torch.no_grad():
        scores = stacked(x)
        for k, h in enumerate(heads):
            torch.testing.assert_close(scores[k], h.eval().get_score(x).reshape(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="share input, hidden and projector dims"):
        StackedHeads([heads[0], build_head(10, 5, 1.0, 8, 0.0, 0, CPU)[0]])


def test_loss_uses_each_heads_margin():
    heads = [build_head(6, 3, m, 5, 0.0, 0, CPU)[0] for m in (0.0, 0.7, 3.0)]
    stacked = StackedHeads(heads)
    s1, s2 = torch.randn(3, 9), torch.randn(3, 9)
    labels = torch.tensor([1, -1, 1, 1, -1, -1, 1, -1, 1])
    losses = stacked.pair_losses(s1, s2, labels)
    for k, h in enumerate(heads):
        torch.testing.assert_close(losses[k], h.compute_loss(s1[k][:, None], s2[k][:, None], labels))


def test_clip_per_head_equals_clip_grad_norm():
    heads = [build_head(6, 3, 1.0, 5, 0.0, s, CPU)[0] for s in range(3)]
    stacked = StackedHeads(heads)
    scales = (100.0, 1.0, 1e-3)  # one head far above the max norm, one near, one far below
    for p in stacked.stacked:
        p.grad = torch.randn_like(p) * torch.tensor(scales).view((3,) + (1,) * (p.dim() - 1))
    alone = []
    for k, h in enumerate(heads):
        for name, p in h.named_parameters():
            p.grad = stacked.stacked[PARAM_NAMES.index(name)].grad[k].clone()
        alone.append(torch.nn.utils.clip_grad_norm_(h.parameters(), 1.0))
    norms = clip_grad_norm_per_head(stacked.stacked, 1.0)
    torch.testing.assert_close(norms, torch.stack(alone))
    for k, h in enumerate(heads):
        for name, p in h.named_parameters():
            torch.testing.assert_close(stacked.stacked[PARAM_NAMES.index(name)].grad[k], p.grad)


@pytest.mark.parametrize("kind", ["plain", "fused", "batched"])
def test_optimizer_equals_adamw_per_head(kind):
    """Per-head lr, weight decay, moments and cosine schedule; a head that stops leaves the stack mid-run."""
    heads = [build_head(6, 3, 1.0, 5, 0.0, s, CPU)[0] for s in range(3)]
    lrs, wds = [1e-3, 3e-2, 1e-1], [0.0, 0.01, 0.5]
    stacked = StackedHeads(heads)
    opt = make_optimizer(stacked, lrs, wds, t_max=3, eta_min=1e-4, kind=kind)
    assert opt.kind == kind
    refs = [torch.optim.AdamW(h.parameters(), lr=lr, weight_decay=wd) for h, lr, wd in zip(heads, lrs, wds)]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3, eta_min=1e-4) for o in refs]
    gen = torch.Generator().manual_seed(0)
    live = [0, 1, 2]
    for epoch in range(4):
        for _ in range(3):
            for p in stacked.stacked:
                p.grad = torch.randn(p.shape, generator=gen)
            for slot, k in enumerate(live):
                for name, p in heads[k].named_parameters():
                    p.grad = stacked.stacked[PARAM_NAMES.index(name)].grad[slot].clone()
                refs[k].step()
            opt.step([True] * len(live))
        opt.epoch_end()
        for s in scheds:
            s.step()
        assert opt.lrs() == [refs[k].param_groups[0]["lr"] for k in live]
        if epoch == 0:  # head 1 stops: the stack and its optimizer continue with heads 0 and 2
            for slot, k in enumerate(live):
                heads[k].load_head_state_dict(stacked.head_state_dict(slot))
            stacked, opt = _compact(stacked, opt, [0, 2])
            live = [0, 2]
            for slot, k in enumerate(live):  # the references carry on from the stack's weights
                with torch.no_grad():
                    for name, p in heads[k].named_parameters():
                        p.copy_(stacked.stacked[PARAM_NAMES.index(name)][slot])
    tol = dict(rtol=0, atol=0) if kind == "plain" else dict(rtol=1e-5, atol=1e-6)
    for slot, k in enumerate(live):
        for name, p in heads[k].named_parameters():
            torch.testing.assert_close(stacked.stacked[PARAM_NAMES.index(name)].detach()[slot], p.detach(), **tol)
    state = opt.head_optimizer_state(1)  # head 2, in a single run's optimizer format
    fresh = torch.optim.AdamW(RankingHead(6, 3, 1.0, 5, 0.0).parameters(), lr=1.0)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == refs[2].param_groups[0]["lr"]
    assert fresh.param_groups[0]["weight_decay"] == 0.5
    first = fresh.state[fresh.param_groups[0]["params"][0]]
    assert int(first["step"]) == 12
    torch.testing.assert_close(first["exp_avg"], refs[2].state[next(heads[2].parameters())]["exp_avg"], **tol)
    assert opt.head_scheduler_state(1)["base_lrs"] == [1e-1]


@pytest.mark.parametrize("kind", ["plain", "fused", "batched"])
def test_stacked_group_equals_trainer_alone(kind, tmp_path):
    """The acceptance test: every head of a stacked group ends exactly where the Trainer alone ends."""
    feats, ranks = _data()
    tc = TrainingConfig(batch_size=16, max_epochs=5, pairs_per_epoch=96, eval_pairs=160, early_stopping_patience=2,
                        scheduler_t_max=4, device="cpu", checkpoint_dir="")
    grid = SweepGrid(margin=(0.1, 1.0), hidden_dim=(8,), projector_dim=(4,), learning_rate=(1e-3, 1e-2),
                     dropout=(0.0, 0.3), weight_decay=(0.01,), seed=(3,))
    configs = grid.configs()
    train, val = _datasets(feats, ranks, tc, seed=3)
    finished_order = []
    outcomes = train_group(configs, train, val, tc, "cpu", optimizer=kind,
                           on_finished=lambda o: finished_order.append(o.config))
    assert [o.config for o in outcomes] == configs and sorted(finished_order, key=configs.index) == configs
    # Heads stopped at different epochs, so the stack was rebuilt mid-run at least once.
    assert len({o.epochs_run for o in outcomes}) > 1
    tight = dict(rtol=1e-5, atol=1e-6) if kind == "plain" else dict(rtol=1e-4, atol=1e-5)
    for i, (cfg, out) in enumerate(zip(configs, outcomes)):
        trainer, history = _alone(cfg, feats, ranks, tc, checkpoint_dir=str(tmp_path / str(i)))
        assert out.best_epoch == trainer.best_epoch, cfg.describe()
        assert out.epochs_run == trainer.epoch and out.stopped_early == trainer.stopped_early, cfg.describe()
        assert out.history["val_acc"] == history["val_acc"], cfg.describe()
        assert out.history["train_acc"] == history["train_acc"], cfg.describe()
        assert out.history["lr"] == history["lr"], cfg.describe()
        np.testing.assert_allclose(out.history["train_loss"], history["train_loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.history["val_loss"], history["val_loss"], rtol=1e-5, atol=1e-6)
        assert out.best_val_acc == trainer.best_accuracy
        for name in PARAM_NAMES:
            if name not in PAIR_INVARIANT:
                torch.testing.assert_close(out.state[name], trainer.best_state[name], **tight,
                                           msg=f"{cfg.describe()} {name}")
        # Those two biases only add one constant to every score: scores less their mean agree.
        ours, theirs = RankingHead(**out.head_config).eval(), trainer.model.eval()
        ours.load_head_state_dict(out.state)
        trainer.restore_best()
        with torch.no_grad():
            a, b = ours.get_score(feats).reshape(-1), theirs.get_score(feats).reshape(-1)
        torch.testing.assert_close(a - a.mean(), b - b.mean(), **tight)
        # At its best epoch the head's dropout stream stands where the single run's global RNG stood then: what
        # the single run's best.pt stores for an exact resume (for dropout 0 too: the stream after the init).
        best = torch.load(tmp_path / str(i) / "best.pt", weights_only=True)
        assert best["epoch"] == out.best_epoch
        assert torch.equal(out.rng_state["torch"], best["rng_state"]["torch"]), cfg.describe()
    assert any(o.best_epoch > 1 for o, c in zip(outcomes, configs) if c.dropout > 0)  # a stream that moved


def test_dropout_masks_follow_each_heads_own_stream():
    """Two heads with the same seed but different dropout draw what each would draw alone."""
    x = torch.randn(12, 6)
    heads, states = zip(*[build_head(6, 3, 1.0, 5, p, 7, CPU)[:2] for p in (0.5, 0.2)])
    stacked = StackedHeads(heads, states).train()
    before = torch.get_rng_state()
    scores = stacked(x)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    for k, (h, p) in enumerate(zip(heads, (0.5, 0.2))):
        torch.manual_seed(7)
        RankingHead(6, 3, 1.0, 5, p)  # advance the stream exactly as the head's init did
        want = h.train().get_score(x).reshape(-1)
        torch.testing.assert_close(scores[k], want, rtol=1e-5, atol=1e-6)
