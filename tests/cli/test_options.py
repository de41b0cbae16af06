"""train.py and sweep.py take the same TrainingConfig options (one helper builds both), so they cannot drift."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from mirip.training.config import TrainingConfig

ROOT = Path(__file__).resolve().parents[2]


def _parser(name):
    module = importlib.import_module(f"mirip.cli.{name}")
    return module, module.build_parser()


def _options(parser):
    return {a.dest: (tuple(a.option_strings), tuple(a.choices) if a.choices else None, a.default)
            for a in parser._actions if a.option_strings}


def test_train_and_sweep_expose_each_training_field_alike():
    train_mod, train = _parser("train")
    sweep_mod, sweep = _parser("sweep")
    t, s = _options(train), _options(sweep)
    fields = [f.name for f in dataclasses.fields(TrainingConfig) if f.name != "checkpoint_dir"]
    for name in fields:
        assert name in t, f"train.py has no option for TrainingConfig.{name}"
        if name in sweep_mod.SKIPPED:  # a grid axis in a sweep (several values)
            continue
        assert s[name] == t[name], f"--{name.replace('_', '-')}: train {t[name]}, sweep {s[name]}"
    assert t["head_step"][1] == ("auto", "eager", "static", "graph")  # choices, not free text, in both


def test_both_build_the_same_training_config_from_the_same_flags(tmp_path):
    flags = ["--batch-size", "8", "--head-step", "static", "--pair-balance", "uniform", "--device", "cpu",
             "--no-wandb-enabled"]
    common = ["--features", "f.h5", "--metadata", "m.csv", "--output-dir", str(tmp_path)]
    train_mod, train = _parser("train")
    sweep_mod, sweep = _parser("sweep")
    run_cfg = train_mod.config_from_args(train.parse_args(common + flags))
    _, settings = sweep_mod.settings_from_args(sweep.parse_args(common + flags))
    a, b = run_cfg.training.to_dict(), settings.training.to_dict()
    for name in sweep_mod.SKIPPED:
        a.pop(name), b.pop(name)
    assert a == b and a["batch_size"] == 8 and a["head_step"] == "static"
