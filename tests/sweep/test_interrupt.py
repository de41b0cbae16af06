"""Long sweeps: the cost line before the long part, a clean stop on Ctrl-C or SIGTERM, reruns, CPU threads."""

from __future__ import annotations

import json
import os
import re
import signal

import pandas as pd
import pytest
import torch

from mirip.cli import sweep as sweep_script
from mirip.sweep import cost
from mirip.training import stacked_training as engine
from mirip.sweep.cost import EpochTimer, cost_line, estimate_seconds, format_duration
from mirip.sweep.threads import idle_cores

from _sweep_helpers import one_thread, write_synthetic

FAST = ["--max-epochs", "3", "--pairs-per-epoch", "64", "--eval-pairs", "120", "--batch-size", "16",
        "--early-stopping-patience", "0", "--device", "cpu", "--no-progress", "--threads", "1"]
# Two groups (hidden 8 and 16) of two heads (two margins): 3 validations per group.
GRID = ["--margin", "0.5", "1.0", "--hidden-dim", "8", "16", "--projector-dim", "4", "--seeds", "0"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture
def args(tmp_path):
    features, metadata = write_synthetic(tmp_path, n=80, dim=12)
    out = tmp_path / "sweep"
    return out, ["--features", features, "--metadata", metadata, "--output-dir", str(out), *GRID, *FAST]


def _stop_at_validation(monkeypatch, number: int, stop) -> None:
    """Run ``stop()`` inside training, at the ``number``-th validation (1-based) of the sweep."""
    real, calls = engine._validate, []

    def validate(*a, **k):
        calls.append(1)
        if len(calls) == number:
            stop()
        return real(*a, **k)

    monkeypatch.setattr(engine, "_validate", validate)


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def _send_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("stop", [_raise_keyboard_interrupt, _send_sigterm], ids=["ctrl-c", "sigterm"])
def test_interrupt_keeps_finished_heads_in_one_line_and_a_rerun_continues(args, monkeypatch, capsys, stop):
    out, argv = args
    _stop_at_validation(monkeypatch, 5, stop)  # the second epoch of the second group
    assert sweep_script.main(argv) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.strip() == (f"interrupted: 2 of 4 configuration(s) finished and kept in {out} (results.csv); "
                                    "run the same command again to continue")
    done = sorted(os.listdir(out / "results"))
    assert len(done) == 2 and len(pd.read_csv(out / "results.csv")) == 2
    first = {f: (out / "results" / f).read_text() for f in done}
    monkeypatch.undo()
    assert sweep_script.main(argv) == 0
    assert "2 already finished, 2 to train" in capsys.readouterr().out
    assert {f: (out / "results" / f).read_text() for f in done} == first  # kept, not retrained
    assert len(pd.read_csv(out / "results.csv")) == 4


def test_an_interrupt_before_anything_finished_lets_other_settings_start_afresh(args, monkeypatch, capsys):
    out, argv = args
    _stop_at_validation(monkeypatch, 2, _raise_keyboard_interrupt)
    assert sweep_script.main(argv) == 130
    assert "0 of 4 configuration(s) finished" in capsys.readouterr().err
    assert json.loads((out / "sweep.json").read_text())["fixed"]["max_epochs"] == 3
    monkeypatch.undo()
    assert sweep_script.main(argv + ["--max-epochs", "2"]) == 0  # smaller settings: nothing to mix them with
    assert "starting afresh" in capsys.readouterr().out
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4 and (table.max_epochs == 2).all() and (table.epochs_run == 2).all()


def test_other_settings_over_finished_results_need_overwrite(args, capsys):
    out, argv = args
    assert sweep_script.main(argv) == 0
    capsys.readouterr()
    assert sweep_script.main(argv + ["--max-epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "4 finished configuration(s)" in err and "max_epochs: was 3, now 2" in err and "--overwrite" in err
    assert (pd.read_csv(out / "results.csv").max_epochs == 3).all()  # refused: nothing touched
    assert sweep_script.main(argv + ["--max-epochs", "2", "--overwrite"]) == 0
    assert "--overwrite: removing 4 finished configuration(s)" in capsys.readouterr().out
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4 and (table.epochs_run == 2).all()
    for name in os.listdir(out / "results"):  # every stored result is the new settings' own
        assert json.loads((out / "results" / name).read_text())["row"]["max_epochs"] == 2


# --- the cost line -------------------------------------------------------------------------------
def test_cost_estimate_scales_the_timed_epoch_to_every_head_and_epoch():
    # 108 equal heads, the first group of 12 took 4.2 s an epoch: 9 such groups x 100 epochs.
    assert estimate_seconds(4.2, 12 * 500, [500] * 108, 100) == pytest.approx(9 * 4.2 * 100)
    # Unequal heads: each costs in proportion to its size, at the timed group's seconds per size unit.
    sizes = [100, 100, 300, 300, 300]
    assert estimate_seconds(2.0, 200, sizes, 10) == pytest.approx(sum(2.0 / 200 * s * 10 for s in sizes))
    assert [format_duration(s) for s in (12, 600, 14 * 3600, 3 * 86400)] == ["12 s", "10 min", "14 h", "3.0 days"]
    line = cost_line(108, 100, 14 * 3600, "cpu")
    assert line.startswith("cost: 108 head(s) x 100 epochs: about 14 h on this CPU") and "Ctrl-C" in line


def test_the_timed_epoch_is_the_second_one_not_the_warm_up(monkeypatch):
    ticks = iter([0.0, 10.0, 12.0, 14.5])  # setup + a slow first epoch, then 2 s and 2.5 s epochs
    monkeypatch.setattr(cost.time, "perf_counter", lambda: next(ticks))
    timer = EpochTimer(max_epochs=3)
    assert [timer.epoch_end(e) for e in range(3)] == [None, 2.0, None]
    ticks = iter([0.0, 10.0])
    assert EpochTimer(max_epochs=1).epoch_end(0) == 10.0  # one epoch only: that one, setup included


def test_the_cost_line_comes_before_the_first_head_finishes_with_the_whole_sweep(args, monkeypatch, capsys):
    out, argv = args
    def timed(self, epoch):  # the first group's second epoch took 2.0 s
        if epoch == 1 and not getattr(self, "seen", False):
            self.seen = True
            return 2.0
        return None

    monkeypatch.setattr(EpochTimer, "epoch_end", timed)
    assert sweep_script.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    cost_lines = [i for i, ln in enumerate(lines) if ln.startswith("cost: ")]
    first_done = next(i for i, ln in enumerate(lines) if ln.startswith("[1/4]"))
    assert len(cost_lines) == 1 and cost_lines[0] < first_done
    # Naive: a head's multiply-adds per pair are in*h + h*p + p; the first group (the first head's hidden)
    # took 2.0 s for an epoch of its two heads; every head runs 3 epochs.
    size = {8: 12 * 8 + 8 * 4 + 4, 16: 12 * 16 + 16 * 4 + 4}
    first_hidden = int(re.search(r"hidden=(\d+)", lines[first_done]).group(1))
    expected = 2.0 / (2 * size[first_hidden]) * (2 * size[8] + 2 * size[16]) * 3
    assert lines[cost_lines[0]] == f"cost: 4 head(s) x 3 epochs: about {round(expected)} s on this CPU"


# --- threads -------------------------------------------------------------------------------------
def test_idle_cores_leave_the_loaded_ones_alone():
    assert [idle_cores(2, load) for load in (0.0, 0.4, 0.6, 1.0, 5.8)] == [2, 2, 1, 1, 1]
    assert idle_cores(16, 3.2) == 13 and idle_cores(4, 0.0) == 4


def test_a_cpu_sweep_trains_on_the_idle_cores_only(args, monkeypatch, capsys):
    out, argv = args
    argv = [a for a in argv if a not in ("--threads", "1")]
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 1.0, 1.0))  # one core taken by another process
    seen = []
    real = engine._validate
    monkeypatch.setattr(engine, "_validate", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    assert sweep_script.main(argv) == 0
    assert set(seen) == {1}
    assert "threads: 1 thread(s): 2 core(s) usable, load average 1.6" in capsys.readouterr().out
