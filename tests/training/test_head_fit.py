"""train.py's head training (HeadFit: the stacked engine with one head) against the seed's Trainer, and its resume."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mirip.ml.ranking_model import RankingHead
from mirip.store.checkpoint import load_checkpoint_file
from mirip.training.config import TrainingConfig
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.head_config import HeadConfig
from mirip.training.head_fit import HeadFit
from mirip.training.trainer import Trainer

from _stage2_helpers import single_thread, tiered_features

DIM = 12
_one_thread = pytest.fixture(autouse=True)(single_thread)
# Both shift every score by one constant (their gradient is exactly zero): compared through the scores.
PAIR_INVARIANT = ("projector.net.5.bias", "score_head.0.bias")


def _config(directory=None, **kw) -> TrainingConfig:
    # A high lr and a low clip norm so clipping acts; patience 2 so early stopping can end the run.
    base = dict(device="cpu", max_epochs=6, pairs_per_epoch=200, eval_pairs=300, batch_size=32, learning_rate=3e-3,
                gradient_clip_norm=0.5, seed=3, checkpoint_dir=str(directory) if directory else "",
                save_every_n_epochs=2, scheduler_t_max=6, early_stopping_patience=2)
    base.update(kw)
    return TrainingConfig(**base)


def _head(cfg: TrainingConfig) -> HeadConfig:
    return HeadConfig(margin=0.5, hidden_dim=16, projector_dim=8, learning_rate=cfg.learning_rate, dropout=0.2,
                      weight_decay=cfg.weight_decay, seed=cfg.seed)


def _data(cfg: TrainingConfig):
    feats, ranks, _ = tiered_features(20, DIM, seed=0)
    feats = torch.from_numpy(feats)
    n = len(ranks)
    tr, va = np.arange(0, n, 2), np.arange(1, n, 2)
    train = FeaturePairDataset(feats, ranks[tr], rows=tr, num_pairs=cfg.pairs_per_epoch, batch_size=cfg.batch_size,
                               seed=cfg.seed, balance=cfg.pair_balance)
    val = FeaturePairDataset(feats, ranks[va], rows=va, num_pairs=cfg.eval_pairs, batch_size=cfg.batch_size,
                             seed=cfg.seed)
    return feats, train, val


def _head_fit(cfg: TrainingConfig, resume_from=None) -> HeadFit:
    _, train, val = _data(cfg)
    fit = HeadFit(_head(cfg), DIM, cfg, progress=False, log=lambda m: None)
    if resume_from:
        fit.load_checkpoint(resume_from)
    fit.fit(train, val)
    return fit


def _trainer(cfg: TrainingConfig, resume_from=None) -> Trainer:
    _, train, val = _data(cfg)
    h = _head(cfg)
    torch.manual_seed(cfg.seed)  # the Trainer's contract: the caller seeds the head's init
    model = RankingHead(DIM, h.projector_dim, h.margin, h.hidden_dim, h.dropout)
    trainer = Trainer(model, cfg, progress=False, log=lambda m: None)
    if resume_from:
        trainer.load_checkpoint(resume_from)
    trainer.fit(train, val)
    return trainer


def _centred_scores(state, feats) -> torch.Tensor:
    head = RankingHead(DIM, 8, 0.5, 16, 0.2).eval()
    head.load_head_state_dict(state)
    with torch.no_grad():
        s = head.get_score(feats).reshape(-1)
    return s - s.mean()


def _assert_close_runs(a_hist, a_state, b_hist, b_state, feats) -> None:
    assert a_hist["train_acc"] == b_hist["train_acc"] and a_hist["val_acc"] == b_hist["val_acc"]
    assert a_hist["lr"] == b_hist["lr"]
    np.testing.assert_allclose(a_hist["train_loss"], b_hist["train_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a_hist["val_loss"], b_hist["val_loss"], rtol=1e-5, atol=1e-6)
    for name, value in a_state.items():
        if name not in PAIR_INVARIANT:
            torch.testing.assert_close(value, b_state[name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(_centred_scores(a_state, feats), _centred_scores(b_state, feats), rtol=1e-4, atol=1e-5)


def test_train_py_path_agrees_with_the_trainer(tmp_path):
    """The old path (Trainer) and the new one (the engine with one head) on the same data: the same epochs, the
    same accuracies, weights and losses equal to float rounding, and the same checkpoint files."""
    feats, _, _ = _data(_config())
    new = _head_fit(_config(tmp_path / "new"))
    old = _trainer(_config(tmp_path / "old"))
    assert (new.epoch, new.best_epoch, new.best_accuracy, new.stopped_early) == \
        (old.epoch, old.best_epoch, old.best_accuracy, old.stopped_early)
    assert 1 < new.best_epoch and new.epoch <= 6
    _assert_close_runs(new.history, new.model.head_state_dict(), old.history, old.model.head_state_dict(), feats)
    new.restore_best()
    old.restore_best()
    _assert_close_runs(new.history, new.model.head_state_dict(), old.history, old.model.head_state_dict(), feats)
    assert sorted(os.listdir(tmp_path / "new")) == sorted(os.listdir(tmp_path / "old"))
    for name in os.listdir(tmp_path / "new"):
        a, b = load_checkpoint_file(tmp_path / "new" / name), load_checkpoint_file(tmp_path / "old" / name)
        assert set(a) == set(b), name
        assert (a["epoch"], a["best_epoch"], a["accuracy"], a["head"]) == (b["epoch"], b["best_epoch"], b["accuracy"],
                                                                          b["head"]), name
        if "rng_state" in a:  # the dropout stream stands where the single run's global RNG stood
            assert torch.equal(a["rng_state"]["torch"], b["rng_state"]["torch"]), name


@pytest.mark.parametrize("step", ["eager", "static"])
def test_resume_equals_the_uninterrupted_run(tmp_path, step):
    full = _head_fit(_config(tmp_path / "full", head_step=step, early_stopping_patience=0))
    _head_fit(_config(tmp_path / "part", head_step=step, early_stopping_patience=0, max_epochs=3))
    torch.manual_seed(12345)  # whatever the global RNG did in between must not matter
    resumed = _head_fit(_config(tmp_path / "part", head_step=step, early_stopping_patience=0),
                        resume_from=str(tmp_path / "part" / "last.pt"))
    assert resumed.history == full.history
    assert (resumed.epoch, resumed.best_epoch, resumed.best_accuracy) == (full.epoch, full.best_epoch, full.best_accuracy)
    for name, value in full.model.head_state_dict().items():
        assert torch.equal(value, resumed.model.head_state_dict()[name]), name
    full.restore_best()
    resumed.restore_best()
    for name, value in full.model.head_state_dict().items():
        assert torch.equal(value, resumed.model.head_state_dict()[name]), name


def test_a_trainer_last_pt_resumes_in_the_engine_and_back(tmp_path):
    """Old runs keep going: a Trainer's last.pt continues under HeadFit (and HeadFit's under the Trainer)."""
    feats, _, _ = _data(_config())
    cfg = dict(early_stopping_patience=0)
    full = _head_fit(_config(tmp_path / "full", **cfg))
    _trainer(_config(tmp_path / "old", max_epochs=3, **cfg))
    from_trainer = _head_fit(_config(tmp_path / "old", **cfg), resume_from=str(tmp_path / "old" / "last.pt"))
    _assert_close_runs(from_trainer.history, from_trainer.model.head_state_dict(), full.history,
                       full.model.head_state_dict(), feats)
    _head_fit(_config(tmp_path / "new", max_epochs=3, **cfg))
    back = _trainer(_config(tmp_path / "new", **cfg), resume_from=str(tmp_path / "new" / "last.pt"))
    _assert_close_runs(back.history, back.model.head_state_dict(), full.history, full.model.head_state_dict(), feats)


def test_a_finished_run_resumes_to_nothing_and_best_pt_is_refused(tmp_path):
    done = _head_fit(_config(tmp_path, max_epochs=3, early_stopping_patience=0))
    again = _head_fit(_config(tmp_path, max_epochs=3, early_stopping_patience=0), resume_from=str(tmp_path / "last.pt"))
    assert again.history == done.history and again.epoch == 3
    for name, value in done.model.head_state_dict().items():
        assert torch.equal(value, again.model.head_state_dict()[name]), name
    with pytest.raises(ValueError, match="resume from the run's last.pt"):
        HeadFit(_head(_config()), DIM, _config(), progress=False).load_checkpoint(str(tmp_path / "best.pt"))


def test_without_a_val_split_the_train_accuracy_picks_the_best_epoch_as_in_the_trainer(tmp_path):
    feats, train, _ = _data(_config())
    new = HeadFit(_head(_config()), DIM, _config(tmp_path / "new"), progress=False, log=lambda m: None)
    new.fit(train, None)
    _, train, _ = _data(_config())
    torch.manual_seed(3)
    h = _head(_config())
    old = Trainer(RankingHead(DIM, h.projector_dim, h.margin, h.hidden_dim, h.dropout), _config(tmp_path / "old"),
                  progress=False, log=lambda m: None)
    old.fit(train, None)
    assert new.history["val_acc"] == [] == old.history["val_acc"]
    assert (new.best_epoch, new.best_accuracy, new.epoch) == (old.best_epoch, old.best_accuracy, old.epoch)
    assert new.best_accuracy == max(new.history["train_acc"])


def test_a_run_that_stopped_early_stays_stopped_on_resume(tmp_path):
    done = _head_fit(_config(tmp_path, max_epochs=12, scheduler_t_max=12, early_stopping_patience=1))
    assert done.stopped_early and done.epoch < 12
    again = _head_fit(_config(tmp_path, max_epochs=12, scheduler_t_max=12, early_stopping_patience=1),
                      resume_from=str(tmp_path / "last.pt"))
    assert again.stopped_early and again.history == done.history and again.epoch == done.epoch
