"""Trainer: the training-step contract, determinism, exact resume, checkpoints, early stopping, full-image mode."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from mirip.ml.preprocessing import Preprocessor
from mirip.ml.ranking_model import PairwiseRankingModel, RankingHead
from mirip.store.checkpoint import CheckpointError, load_checkpoint_file
from mirip.training.config import TrainingConfig
from mirip.training.datasets.pair_sampling import sample_pairs
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset, PairwiseDataset, image_pair_loader
from mirip.training.evaluator import Evaluator
from mirip.training.trainer import Trainer

from _stage2_helpers import (best_pairwise_accuracy, fake_fingerprint, signal_direction, single_thread,
                             tiered_features)

DIM = 12
_one_thread = pytest.fixture(autouse=True)(single_thread)


def _config(tmp_path=None, **kw) -> TrainingConfig:
    base = dict(device="cpu", max_epochs=4, pairs_per_epoch=200, eval_pairs=300, batch_size=32, learning_rate=1e-3,
                seed=3, checkpoint_dir=str(tmp_path) if tmp_path else "", save_every_n_epochs=2,
                scheduler_t_max=4)
    base.update(kw)
    return TrainingConfig(**base)


def _data(cfg: TrainingConfig, per_tier=20, seed=0):
    feats, ranks, _ = tiered_features(per_tier, DIM, seed=seed)
    feats = torch.from_numpy(feats)
    n = len(ranks)
    train_rows, val_rows = np.arange(0, n, 2), np.arange(1, n, 2)
    train = FeaturePairDataset(feats, ranks[train_rows], rows=train_rows, num_pairs=cfg.pairs_per_epoch,
                               batch_size=cfg.batch_size, seed=cfg.seed, balance=cfg.pair_balance)
    val = FeaturePairDataset(feats, ranks[val_rows], rows=val_rows, num_pairs=cfg.eval_pairs,
                             batch_size=cfg.batch_size, seed=cfg.seed)
    return feats, ranks, train_rows, val_rows, train, val


def _head(cfg: TrainingConfig) -> RankingHead:
    torch.manual_seed(cfg.seed)
    return RankingHead(DIM, projector_output_dim=8, hidden_dim=16, dropout=0.1)


def _fit(cfg, **trainer_kw):
    *_, train, val = _data(cfg)
    trainer = Trainer(_head(cfg), cfg, progress=False, **trainer_kw)
    return trainer, trainer.fit(train, val)


def test_same_seed_gives_identical_history():
    cfg = _config()
    (t1, h1), (t2, h2) = _fit(cfg), _fit(cfg)
    assert h1 == h2 and len(h1["train_loss"]) == 4 and len(h1["val_acc"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(t1.model.state_dict().values(), t2.model.state_dict().values()))
    _, h3 = _fit(_config(seed=4))
    assert h3["train_loss"] != h1["train_loss"]


def _naive_scores(p: dict, x: torch.Tensor, dropout: float, train: bool) -> torch.Tensor:
    """The seed's head written out by hand: Linear -> LayerNorm -> GELU -> Dropout -> Linear -> LayerNorm -> Linear."""

    def layer_norm(h, weight, bias, eps=1e-5):
        mean = h.mean(dim=1, keepdim=True)
        var = ((h - mean) ** 2).mean(dim=1, keepdim=True)
        return (h - mean) / torch.sqrt(var + eps) * weight + bias

    h = x @ p["projector.net.0.weight"].T + p["projector.net.0.bias"]
    h = layer_norm(h, p["projector.net.1.weight"], p["projector.net.1.bias"])
    h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
    if train and dropout > 0:
        # torch's own dropout, one mask over the whole batch from the global stream (as the head's forward draws it).
        h = torch.nn.functional.dropout(h, dropout, training=True)
    h = h @ p["projector.net.4.weight"].T + p["projector.net.4.bias"]
    h = layer_norm(h, p["projector.net.5.weight"], p["projector.net.5.bias"])
    return (h @ p["score_head.0.weight"].T + p["score_head.0.bias"]).reshape(-1)


def _checked_pairs(ranks, first, second, labels):
    """The explicit pairs of one epoch, each checked by hand: two tiers, label +1 exactly when the first is better."""
    pairs = []
    for a, b, y in zip(first.tolist(), second.tolist(), labels.tolist()):
        assert ranks[a] != ranks[b], f"same-tier pair ({a}, {b})"
        assert y == (1 if ranks[a] > ranks[b] else -1), f"pair ({a}, {b}) labelled {y}"
        pairs.append((a, b, y))
    assert sum(y == 1 for *_, y in pairs) == len(pairs) // 2
    return pairs


# The score bias and the last LayerNorm's bias shift both scores of a pair alike: their true gradient is zero and
# the rounding noise Adam normalises differs between two ways of writing the same sums (see test_sweep_stacked).
PAIR_INVARIANT = ("projector.net.5.bias", "score_head.0.bias")


def test_trainer_follows_the_training_step_contract():
    """A naive loop over explicit pairs, written without the library's loss, forward or clipping, equals the Trainer."""
    cfg = _config(max_epochs=3, early_stopping_patience=5, batch_size=24)
    trainer, history = _fit(cfg)
    feats, ranks, train_rows, val_rows, *_ = _data(cfg)
    model = _head(cfg)  # the same init as the Trainer's model; its parameters become plain leaf tensors
    p = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    drop, margin, clip = model.dropout, model.margin, cfg.gradient_clip_norm
    opt = torch.optim.AdamW(list(p.values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.scheduler_t_max, eta_min=cfg.scheduler_eta_min)
    tr_ranks, va_ranks = ranks[train_rows].tolist(), ranks[val_rows].tolist()
    val_pairs = _checked_pairs(va_ranks, *sample_pairs(ranks[val_rows], cfg.eval_pairs, seed=cfg.seed, epoch=0))
    losses, accs, val_accs = [], [], []
    for epoch in range(cfg.max_epochs):
        pairs = _checked_pairs(tr_ranks, *sample_pairs(ranks[train_rows], cfg.pairs_per_epoch, seed=cfg.seed,
                                                       epoch=epoch, balance=cfg.pair_balance))
        total_loss, correct = 0.0, 0
        for s in range(0, len(pairs), cfg.batch_size):
            batch = pairs[s:s + cfg.batch_size]
            x = feats[[int(train_rows[a]) for a, _, _ in batch] + [int(train_rows[b]) for _, b, _ in batch]]
            scores = _naive_scores(p, x, drop, train=True)
            pair_losses = []
            for i, (_, _, y) in enumerate(batch):
                s1, s2 = scores[i], scores[len(batch) + i]
                pair_losses.append(torch.clamp(-y * (s1 - s2) + margin, min=0.0))
                correct += int((1 if s1 > s2 else -1 if s1 < s2 else 0) == y)  # a tie is wrong
            loss = sum(pair_losses) / len(batch)
            for t in p.values():
                t.grad = None
            loss.backward()
            norm = sum(float((t.grad.double() ** 2).sum()) for t in p.values()) ** 0.5
            with torch.no_grad():
                for t in p.values():
                    t.grad *= min(1.0, clip / (norm + 1e-6))
            opt.step()
            total_loss += float(loss.detach()) * len(batch)
        with torch.no_grad():
            sv = _naive_scores(p, feats[val_rows], drop, train=False).tolist()
        val_accs.append(sum((sv[a] - sv[b]) * y > 0 for a, b, y in val_pairs) / len(val_pairs))
        sched.step()
        losses.append(total_loss / len(pairs))
        accs.append(correct / len(pairs))
    assert history["train_loss"] == pytest.approx(losses, rel=1e-5)
    assert history["train_acc"] == accs
    assert history["val_acc"] == val_accs
    ours = trainer.model.state_dict()
    for name, t in p.items():
        if name not in PAIR_INVARIANT:
            # fused AdamW vs the for-loop one, and another order of the same sums: a few 1e-6 apart after 3 epochs.
            # fused AdamW vs the for-loop one and another order of the same sums: up to ~2e-5 apart after 3 epochs
            # (Adam divides by sqrt(v), so noise in tiny gradients becomes visible), where a changed step moves 1e-3.
            torch.testing.assert_close(ours[name], t.detach(), rtol=1e-4, atol=1e-4, msg=name)
    with torch.no_grad():
        a, b = trainer.model.eval().get_score(feats).reshape(-1), _naive_scores(p, feats, drop, train=False)
    torch.testing.assert_close(a - a.mean(), b - b.mean(), rtol=1e-4, atol=1e-4)


def test_resume_equals_uninterrupted_run(tmp_path):
    full_cfg = _config(tmp_path / "full", max_epochs=6, scheduler_t_max=6)
    full, full_hist = _fit(full_cfg)

    # The same run stopped after 3 epochs (max_epochs=3), then a fresh process resumes from last.pt.
    part_cfg = _config(tmp_path / "part", max_epochs=3, scheduler_t_max=6)
    _fit(part_cfg)
    torch.manual_seed(12345)  # whatever the global RNG did in between must not matter
    resume_cfg = _config(tmp_path / "part", max_epochs=6, scheduler_t_max=6)
    *_, train, val = _data(resume_cfg)
    resumed = Trainer(_head(resume_cfg), resume_cfg, progress=False)
    ckpt = resumed.load_checkpoint(str(tmp_path / "part" / "last.pt"))
    assert ckpt["epoch"] == 3 and resumed.epoch == 3
    hist = resumed.fit(train, val)
    assert hist == full_hist
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.best_epoch == full.best_epoch and resumed.best_accuracy == full.best_accuracy


def test_checkpoint_files_and_contents(tmp_path):
    cfg = _config(tmp_path, max_epochs=4)
    fp = fake_fingerprint(DIM)
    trainer, _ = _fit(cfg, fingerprint=fp, extra={"run_config": {"note": "x"}})
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "checkpoint_epoch_2.pt", "checkpoint_epoch_4.pt", "last.pt"]
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(raw["model_state_dict"]) == set(trainer.model.head_state_dict())
    assert all(k.startswith(("projector.", "score_head.")) for k in raw["model_state_dict"])
    assert raw["fingerprint"] == fp and raw["backbone"] is None and raw["epoch"] == 4
    assert raw["head"] == {"input_dim": DIM, "hidden_dim": 16, "projector_output_dim": 8, "dropout": 0.1, "margin": 1.0}
    assert raw["config"]["seed"] == 3 and raw["run_config"] == {"note": "x"}
    best = load_checkpoint_file(tmp_path / "best.pt")
    assert best["epoch"] == trainer.best_epoch and best["accuracy"] == trainer.best_accuracy
    head = RankingHead(**best["head"])
    head.load_head_state_dict(best["model_state_dict"])
    trainer.restore_best()
    for k, v in head.head_state_dict().items():
        assert torch.equal(v, trainer.model.head_state_dict()[k])


def test_best_pt_ships_without_resume_state_and_last_pt_keeps_it(tmp_path):
    cfg = _config(tmp_path, max_epochs=4)
    trainer, _ = _fit(cfg)
    best, last = (torch.load(tmp_path / f, weights_only=True) for f in ("best.pt", "last.pt"))
    resume_only = ("optimizer_state_dict", "scheduler_state_dict", "best_state_dict")
    assert not set(resume_only) & set(best), sorted(best)
    assert all(last.get(k) for k in resume_only)
    # Adam's exp_avg + exp_avg_sq and the best-so-far copy: three times the head's float32 bytes, gone from best.pt.
    head_bytes = sum(4 * p.numel() for p in trainer.model.parameters())
    assert os.path.getsize(tmp_path / "last.pt") - os.path.getsize(tmp_path / "best.pt") > 2.5 * head_bytes
    # best.pt still loads (scoring, evaluating, fine-tuning on), saying that it does not resume exactly.
    other = Trainer(_head(cfg), cfg, progress=False)
    with pytest.warns(UserWarning, match="resume from last.pt"):
        other.load_checkpoint(str(tmp_path / "best.pt"))
    trainer.restore_best()
    for k, v in other.model.head_state_dict().items():
        assert torch.equal(v, trainer.model.head_state_dict()[k])
    other.restore_best()  # with no best_state_dict in the file, the loaded weights are the best ones
    assert all(torch.equal(v, trainer.model.head_state_dict()[k]) for k, v in other.model.head_state_dict().items())


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_and_truncated_checkpoints_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "payload": _Exploit(str(marker))}, evil)
    cfg = _config()
    trainer = Trainer(_head(cfg), cfg, progress=False)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        trainer.load_checkpoint(str(evil))
    assert not marker.exists()
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(_Exploit(str(marker)), f)
    with pytest.raises(CheckpointError):
        trainer.load_checkpoint(str(tmp_path / "raw.pkl"))
    assert not marker.exists()
    trainer.save_checkpoint(str(tmp_path / "good.pt"), 1, 0.5)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        trainer.load_checkpoint(str(tmp_path / "cut.pt"))


def test_early_stopping_and_best_without_val():
    cfg = _config(max_epochs=10, early_stopping_patience=2, learning_rate=1e-12, scheduler_eta_min=0.0)
    *_, train, _ = _data(cfg)
    trainer = Trainer(_head(cfg), cfg, progress=False, log=lambda m: None)
    hist = trainer.fit(train)  # no val: train accuracy decides; lr ~0 and dropout noise, so it stalls
    assert trainer.stopped_early and trainer.epoch < 10
    assert hist["val_acc"] == [] and len(hist["train_acc"]) == trainer.epoch
    best = int(np.argmax(hist["train_acc"])) + 1  # first maximum: improvement must be strict
    assert trainer.best_epoch == best and trainer.epoch == best + 2


def test_config_checks_wandb_and_device_fallback():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        Trainer(_head(_config()), _config(batch_size=0))
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="wandb_enabled=True but wandb is not installed"):
            Trainer(_head(_config()), _config(wandb_enabled=True))
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="CUDA is not available"):
            trainer = Trainer(_head(_config()), _config(device="cuda"))
        assert trainer.device == "cpu"


def test_head_learns_close_to_the_bayes_accuracy():
    """Signal along one direction + Gaussian noise: the best possible pairwise accuracy is known in closed form."""
    sep, noise, dim = 1.0, 1.0, 8
    cfg = _config(max_epochs=15, pairs_per_epoch=4000, batch_size=64, learning_rate=1e-3, scheduler_t_max=15,
                  early_stopping_patience=5)
    feats, ranks, _ = tiered_features(1000, dim, sep, noise, seed=1)
    test_feats, test_ranks, _ = tiered_features(1000, dim, sep, noise, seed=2)
    val_mask = np.arange(len(ranks)) % 5 == 0
    train = FeaturePairDataset(torch.from_numpy(feats[~val_mask]), ranks[~val_mask], num_pairs=cfg.pairs_per_epoch,
                               batch_size=cfg.batch_size, seed=cfg.seed)
    val = FeaturePairDataset(torch.from_numpy(feats[val_mask]), ranks[val_mask], num_pairs=5000, seed=cfg.seed)
    test = FeaturePairDataset(torch.from_numpy(test_feats), test_ranks, num_pairs=20_000, seed=99)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(RankingHead(dim, 32, hidden_dim=64), cfg, progress=False, log=lambda m: None)
    trainer.fit(train, val)
    trainer.restore_best()
    acc = Evaluator(trainer.model, "cpu").evaluate(test)
    # The best possible score is the projection on the signal direction: on these very pairs it gets `oracle`,
    # which itself sits within sampling noise (~0.3 points for 20k pairs) of the closed-form Bayes accuracy.
    first, second, labels = test.pair_arrays()
    proj = test_feats @ signal_direction(dim)
    oracle = float((np.sign(proj[first] - proj[second]) == labels).mean())
    bayes = best_pairwise_accuracy(sep, noise)
    assert abs(oracle - bayes) < 0.01
    assert acc <= oracle + 0.01
    assert acc >= bayes - 0.02 and acc >= oracle - 0.02, f"head {acc:.4f}, oracle {oracle:.4f}, Bayes {bayes:.4f}"


def test_full_image_model_trains_with_the_same_trainer(image_dir, tiny_backbone, tmp_path):
    directory, meta = image_dir
    cfg = _config(tmp_path, max_epochs=2, batch_size=4, save_every_n_epochs=5)
    ds = PairwiseDataset(meta, str(directory), transform=Preprocessor(image_size=28), num_pairs=8, seed=cfg.seed)
    loader = image_pair_loader(ds, batch_size=cfg.batch_size, seed=cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(cfg.seed)
        model = PairwiseRankingModel(tiny_backbone, projector_output_dim=8, device="cpu", hidden_dim=16)
    backbone_before = {k: v.clone() for k, v in model.feature_extractor.state_dict().items()}
    trainer = Trainer(model, cfg, progress=False)
    hist = trainer.fit(loader, loader)
    assert len(hist["train_loss"]) == 2 and 0.0 <= hist["val_acc"][-1] <= 1.0
    assert all(torch.equal(v, model.feature_extractor.state_dict()[k]) for k, v in backbone_before.items())
    ckpt = load_checkpoint_file(tmp_path / "last.pt")
    assert ckpt["fingerprint"] is None and ckpt["backbone"]["hidden_size"] == 32
    assert all(k.startswith(("projector.", "score_head.")) for k in ckpt["model_state_dict"])
    assert "trainable_state_dict" not in ckpt
    detailed = Evaluator(model, "cpu").evaluate_detailed(loader)
    assert detailed["num_images"] == 8 and detailed["total_pairs"] == 8


def test_training_benchmark_runs_and_reports():
    import argparse

    from mirip.bench import training as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--training-images", "40", "--training-dim", "16", "--training-pairs", "64",
                              "--training-epochs", "2", "--training-throughput-pairs", "64",
                              "--training-repeats", "1", "--training-threads", "1"])
    args.device, args.quick = "cpu", True
    result = bench.run(args)
    assert result["full_run"]["epochs"] == 2 and result["full_run"]["wall_s"] > 0
    assert result["throughput"]["ratio"] == result["throughput"]["trainer_median"] / result["throughput"]["bare_median"]
    assert "ratio Trainer / bare" in bench.to_markdown(result)


@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e6, 0.0])
def test_clip_and_step_is_bit_identical_to_clip_grad_norm_then_step(max_norm):
    """The CPU shortcut (no multiply when the coefficient is 1) changes no bit against torch's own clipping,
    over steps where clipping is active and steps where it is not."""
    from mirip.training.optim_step import _plain_fused_adamw, clip_and_step

    torch.manual_seed(0)
    ours, ref = RankingHead(48), RankingHead(48)
    ref.load_state_dict(ours.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01, betas=(0.8, 0.95), fused=True)
            for m in (ours, ref)]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5) for o in opts]
    gen = torch.Generator().manual_seed(1)
    clipped = 0
    for step in range(12):
        x1, x2 = torch.randn(8, 48, generator=gen) * (1 + step), torch.randn(8, 48, generator=gen)
        labels = torch.ones(8)
        for model, opt, mine in ((ours, opts[0], True), (ref, opts[1], False)):
            model.eval()
            opt.zero_grad(set_to_none=True)
            model.compute_loss(*model(x1, x2), labels).backward()
            if mine:
                clip_and_step(opt, list(model.parameters()), max_norm)
                assert _plain_fused_adamw(opt, list(model.parameters())) is None  # the direct kernel call ran
            else:
                clipped += float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)) > max_norm
                opt.step()
        if step % 3 == 2:
            for sched in scheds:
                sched.step()  # the lr changes between steps
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(a.grad, b.grad), name
    mine, theirs = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    for k in theirs:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(mine[k][key], theirs[k][key]), (k, key)
    if max_norm == 1e6:
        assert clipped == 0
    elif max_norm <= 1e-3:
        assert clipped == 12


def test_clip_and_step_keeps_step_hooks_and_other_optimizers_on_the_ordinary_path():
    from mirip.training.optim_step import clip_and_step

    torch.manual_seed(0)
    model = RankingHead(16)
    params = list(model.parameters())
    calls = []
    for opt in (torch.optim.AdamW(params, lr=1e-2, fused=True), torch.optim.AdamW(params, lr=1e-2, foreach=False)):
        handle = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o))
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model.compute_loss(*model(torch.randn(4, 16), torch.randn(4, 16)), torch.ones(4)).backward()
            clip_and_step(opt, params, 1.0)
        handle.remove()
    assert len(calls) == 6  # every step of both went through AdamW.step (hooks run there)


def test_clip_and_step_falls_back_to_adamw_step_when_the_private_kernel_refuses_its_arguments(monkeypatch):
    """Another torch's ``_fused_adamw_`` with other arguments: the step counts are left as they were and the
    public step runs instead, so the result still equals clip_grad_norm_ + AdamW.step bit for bit."""
    import sys

    from mirip.training.optim_step import clip_and_step

    torch.manual_seed(0)
    ours, ref = RankingHead(24), RankingHead(24)
    ref.load_state_dict(ours.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (ours, ref)]
    real, calls = torch._fused_adamw_, []

    def picky(*args, **kwargs):
        # Refuses the argument set mirip passes (as another torch's op might); AdamW.step's own call works.
        if sys._getframe(1).f_globals["__name__"] == "mirip.training.optim_step":
            calls.append("refused")
            raise TypeError("_fused_adamw_() got an unexpected keyword argument")
        calls.append("public")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", picky)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        x1, x2 = torch.randn(6, 24, generator=gen), torch.randn(6, 24, generator=gen)
        for model, opt, mine in ((ours, opts[0], True), (ref, opts[1], False)):
            model.eval()
            opt.zero_grad(set_to_none=True)
            model.compute_loss(*model(x1, x2), torch.ones(6)).backward()
            if mine:
                clip_and_step(opt, list(model.parameters()), 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
                opt.step()
    assert calls.count("refused") == 1  # tried once, then the public step for good
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    for sa, sb in zip(opts[0].state.values(), opts[1].state.values()):
        assert torch.equal(sa["step"], sb["step"]) and torch.equal(sa["exp_avg"], sb["exp_avg"])
