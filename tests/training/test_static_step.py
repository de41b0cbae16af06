"""The static-buffer head step (what a CUDA graph captures) against the eager loop, on CPU.

The graph itself needs CUDA (scripts/gpu_check.sh checks it there); what runs here is the
exact step function that gets captured, over the same static buffers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mirip.ml.ranking_model import RankingHead
from mirip.training.config import TrainingConfig
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.static_step import StaticStep, resolve_step_mode
from mirip.training.trainer import Trainer

from _sweep_helpers import one_thread

DIM = 24
# Biases that shift both scores of a pair equally: their true gradient is zero, the float one rounding noise
# that Adam blows up to lr-sized steps (see test_sweep_stacked.py); compared through centred scores instead.
PAIR_INVARIANT = ("projector.net.5.bias", "score_head.0.bias")


def _centred_scores(model, feats):
    model.eval()
    with torch.no_grad():
        s = model.get_score(feats).reshape(-1)
    return s - s.mean()


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny tensors: threads only spin-wait on each other on the shared 2-core machine
        yield


def _data(n=80, seed=0, dim=DIM, signal=0.7):
    rng = np.random.default_rng(seed)
    ranks = np.arange(n) % 4
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    feats[:, 0] += signal * ranks
    return torch.from_numpy(feats), ranks


def _trainer(mode, dropout=0.1, **cfg):
    torch.manual_seed(3)
    head = RankingHead(DIM, 8, margin=0.5, hidden_dim=16, dropout=dropout)
    config = TrainingConfig(device="cpu", head_step=mode, checkpoint_dir="", seed=3, learning_rate=3e-3,
                            gradient_clip_norm=0.05, scheduler_t_max=4, **cfg)
    return Trainer(head, config, progress=False, log=lambda m: None)


def _fit(mode, epochs=4, pairs=150, batch=32, dropout=0.1):
    feats, ranks = _data()
    train = FeaturePairDataset(feats, ranks[:60], rows=np.arange(0, 60), num_pairs=pairs, batch_size=batch, seed=3)
    val = FeaturePairDataset(feats, ranks[60:], rows=np.arange(60, 80), num_pairs=50, batch_size=batch, seed=3)
    trainer = _trainer(mode, dropout=dropout, max_epochs=epochs, early_stopping_patience=0)
    torch.manual_seed(11)  # dropout's stream, the same for both modes
    history = trainer.fit(train, val)
    return trainer, history


def test_step_modes_resolve_by_device():
    assert resolve_step_mode("auto", "cpu") == "eager"
    assert resolve_step_mode("auto", "cuda") == "eager"  # until the GPU check of the graph has passed
    assert resolve_step_mode("static", "cpu") == "static"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_step_mode("graph", "cpu")
    with pytest.raises(ValueError, match="unknown head step mode 'fast'"):
        resolve_step_mode("fast", "cpu")
    with pytest.raises(ValueError, match="unknown head step mode"):
        _trainer("fast")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_static_step_equals_the_eager_step_over_epochs(dropout):
    # 150 pairs at batch 32: four full batches and a partial one of 22 per epoch, so both buffer sizes run.
    eager, h_eager = _fit("eager", dropout=dropout)
    static, h_static = _fit("static", dropout=dropout)
    assert not eager.uses_static_step(FeaturePairDataset(*_data()))
    assert static._static is not None and sorted(static._static._buffers) == [22, 32]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        np.testing.assert_allclose(h_static[key], h_eager[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for (name, a), b in zip(eager.model.state_dict().items(), static.model.state_dict().values()):
        if name not in PAIR_INVARIANT:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    feats = _data()[0]
    torch.testing.assert_close(_centred_scores(static.model, feats), _centred_scores(eager.model, feats),
                               rtol=1e-5, atol=1e-6)
    # The optimizer moments too: the next step would agree as well.
    for (name, pa), pb in zip(eager.model.named_parameters(), static.params):
        if name in PAIR_INVARIANT:
            continue
        sa, sb = eager.optimizer.state[pa], static.optimizer.state[pb]
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert float(sb["step"]) == float(sa["step"]) == 4 * 5
    # The lr is a tensor the scheduler fills in place (what a captured AdamW reads every replay).
    assert torch.is_tensor(static.optimizer.param_groups[0]["lr"])


def test_the_static_step_really_steps():
    # Guard against a comparison that passes because neither path trained: weights moved from init.
    trainer, _ = _fit("static", epochs=1)
    torch.manual_seed(3)
    init = RankingHead(DIM, 8, margin=0.5, hidden_dim=16, dropout=0.1)
    moved = {name: float((a - b).detach().abs().max())
             for (name, a), b in zip(trainer.model.named_parameters(), init.parameters())}
    # Constant shifts of the score (the score bias, the last LayerNorm's bias) cancel in s1 - s2.
    assert min(v for k, v in moved.items() if k not in ("score_head.0.bias", "projector.net.5.bias")) > 1e-4, moved


def test_no_host_sync_inside_an_epoch(monkeypatch):
    """Host syncs in train_epoch must not grow with the number of steps (one read-out per epoch)."""
    calls = {"n": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            calls["n"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    def syncs_for(pairs):
        feats, ranks = _data()
        ds = FeaturePairDataset(feats, ranks, num_pairs=pairs, batch_size=8, seed=0)
        trainer = _trainer("static", dropout=0.1)
        trainer.train_epoch(ds)  # warm: buffers and optimizer state exist
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
                m.setattr(torch.Tensor, name, counting(name))
            calls["n"] = 0
            trainer.train_epoch(ds)
        return calls["n"]

    few, many = syncs_for(16), syncs_for(160)  # 2 steps vs 20 steps
    assert few == many <= 2, (few, many)


def test_static_checkpoint_is_plain_and_resumes_into_either_mode(tmp_path):
    feats, ranks = _data()
    ds = FeaturePairDataset(feats, ranks, num_pairs=64, batch_size=16, seed=0)
    trainer = _trainer("static")
    trainer.train_epoch(ds)
    trainer.scheduler.step()
    path = str(tmp_path / "s.pt")
    trainer.save_checkpoint(path, 1, 0.5)
    ckpt = torch.load(path, weights_only=True)
    group = ckpt["optimizer_state_dict"]["param_groups"][0]
    assert isinstance(group["lr"], float) and isinstance(group["initial_lr"], float)
    assert all(isinstance(x, float) for x in ckpt["scheduler_state_dict"]["base_lrs"])
    lr_tensor = trainer.optimizer.param_groups[0]["lr"]
    for mode in ("eager", "static"):
        other = _trainer(mode)
        other.load_checkpoint(path)
        got = other.optimizer.param_groups[0]
        assert float(got["lr"]) == pytest.approx(float(lr_tensor))
        assert got["capturable"] == (mode == "static")
        if mode == "static":
            assert torch.is_tensor(got["lr"])
        # Both continue with the same update.
        torch.manual_seed(5)
        other.train_epoch(ds)
        if mode == "eager":
            after_eager = {n: p.detach().clone() for n, p in other.model.named_parameters()}
        else:
            for n, p in other.model.named_parameters():
                if n not in PAIR_INVARIANT:
                    torch.testing.assert_close(p.detach(), after_eager[n], rtol=1e-5, atol=1e-6, msg=n)


def test_static_step_object_counts_warmup_then_runs_eagerly_on_cpu():
    runs = []
    step = StaticStep(lambda b: runs.append(int(b["x"].shape[0])), lambda n: {"x": torch.zeros(n)}, "cpu",
                      graphs=False)
    for n in (4, 4, 2, 4):
        step.run(n)
    assert runs == [4, 4, 2, 4] and step.captures == 0
    assert step.buffers(4) is step.buffers(4)
    with pytest.raises(ValueError, match="CUDA"):
        StaticStep(lambda b: None, lambda n: {}, "cpu", graphs=True)


# --- stacked sweep heads ---------------------------------------------------------------------------
def _group(head_step, optimizer="batched", dropout=(0.0, 0.3)):
    from mirip.training.stacked_training import train_group
    from mirip.sweep.grid import SweepGrid

    feats, ranks = _data(72, dim=10, signal=0.4)
    tr, va = np.arange(0, 48), np.arange(48, 72)
    tc = TrainingConfig(batch_size=16, max_epochs=5, pairs_per_epoch=100, eval_pairs=160, early_stopping_patience=2,
                        scheduler_t_max=4, device="cpu", checkpoint_dir="", head_step=head_step)
    train = FeaturePairDataset(feats, ranks[tr], rows=tr, num_pairs=100, batch_size=16, seed=3)
    val = FeaturePairDataset(feats, ranks[va], rows=va, num_pairs=160, batch_size=16, seed=3)
    grid = SweepGrid(margin=(0.1, 1.0), hidden_dim=(8,), projector_dim=(4,), learning_rate=(1e-3, 1e-2),
                     dropout=dropout, weight_decay=(0.01,), seed=(3,))
    return train_group(grid.configs(), train, val, tc, "cpu", optimizer=optimizer)


def test_stacked_static_step_equals_the_eager_stacked_step():
    """Eight heads, dropout on half, heads leaving the stack at different epochs (the stack is rebuilt)."""
    eager, static = _group("eager"), _group("static")
    assert len({o.epochs_run for o in eager}) > 1  # compaction happened
    for a, b in zip(eager, static):
        assert b.config == a.config and b.best_epoch == a.best_epoch and b.epochs_run == a.epochs_run
        assert b.history["train_acc"] == a.history["train_acc"], a.config.describe()
        assert b.history["val_acc"] == a.history["val_acc"], a.config.describe()
        assert b.history["lr"] == a.history["lr"]
        np.testing.assert_allclose(b.history["train_loss"], a.history["train_loss"], rtol=1e-5, atol=1e-6)
        for name, t in a.state.items():
            if name not in PAIR_INVARIANT:
                torch.testing.assert_close(b.state[name], t, rtol=1e-4, atol=1e-5, msg=name)
        sa, sb = a.optimizer_state["state"], b.optimizer_state["state"]
        assert [float(s["step"]) for s in sb.values()] == [float(s["step"]) for s in sa.values()]
        assert a.rng_state["torch"].equal(b.rng_state["torch"])  # the same dropout draws


def test_stacked_static_step_needs_the_batched_optimizer():
    with pytest.raises(ValueError, match="needs the batched optimizer"):
        _group("static", optimizer="fused")
    from mirip.training.stacked_training import group_step_mode

    tc = TrainingConfig(device="cuda")  # auto: eager until the graph is verified on a GPU
    assert group_step_mode(tc, "cuda", None) == "eager" and group_step_mode(tc, "cpu", None) == "eager"
    tc = TrainingConfig(device="cuda", head_step="graph")  # asked for: a graph, with the batched optimizer only
    assert group_step_mode(tc, "cuda", None) == "graph"
    with pytest.raises(ValueError, match="needs the batched optimizer"):
        group_step_mode(tc, "cuda", "fused")
    monkey = pytest.MonkeyPatch()
    from mirip.training import static_step

    monkey.setitem(static_step.AUTO_MODE, "cuda", "graph")  # what the GPU suite measures: auto as a graph
    try:
        tc = TrainingConfig(device="cuda")
        assert group_step_mode(tc, "cuda", None) == "graph" and group_step_mode(tc, "cuda", "fused") == "eager"
    finally:
        monkey.undo()


def test_capturable_batched_adamw_equals_the_plain_one():
    from mirip.training.stacked_heads import StackedHeads, build_head
    from mirip.training.stacked_optim import make_optimizer

    cpu = torch.device("cpu")
    runs = []
    for capturable in (False, True):
        stacked = StackedHeads([build_head(6, 3, 1.0, 5, 0.0, s, cpu)[0] for s in range(3)])
        opt = make_optimizer(stacked, [1e-3, 3e-2, 1e-1], [0.0, 0.01, 0.5], t_max=3, eta_min=1e-4, kind="batched",
                             capturable=capturable)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            for _ in range(4):
                for p in stacked.stacked:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step([True] * 3)
            opt.epoch_end()
        runs.append((stacked, opt))
    (a, oa), (b, ob) = runs
    assert ob.capturable and ob.step_count == oa.step_count == 12
    for pa, pb in zip(a.stacked, b.stacked):
        torch.testing.assert_close(pb.detach(), pa.detach(), rtol=1e-6, atol=1e-7)


def test_full_image_training_stays_eager(tiny_backbone):
    from mirip.ml.ranking_model import PairwiseRankingModel

    model = PairwiseRankingModel(tiny_backbone, device="cpu", projector_output_dim=4, hidden_dim=8)
    trainer = Trainer(model, TrainingConfig(device="cpu", head_step="static", checkpoint_dir=""), progress=False)
    assert trainer.step_mode == "eager" and not trainer.optimizer.param_groups[0]["capturable"]
