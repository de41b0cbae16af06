"""The one installed command: ``mirip COMMAND``, and the scripts that stay as thin wrappers over it."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirip.cli.main import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_command_in_pipeline_order(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    positions = [out.index(f"\n  {name} ") for name in COMMANDS]
    assert positions == sorted(positions)
    assert main([]) == 0


def test_a_subcommand_runs_its_modules_main_with_the_rest_of_argv(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    assert "usage: mirip train" in capsys.readouterr().out


def test_an_unknown_command_is_refused_with_the_list(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "extract" in err


def test_every_command_module_has_a_parser_and_main():
    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.main) and callable(module.build_parser), name


def test_the_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'mirip = "mirip.cli.main:run"' in text


def test_scripts_are_thin_wrappers_over_the_commands():
    modules = {m for m, _ in COMMANDS.values()}
    for path in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        wrapped = {n.module for n in imports} - {"mirip.cli.main"}
        assert len(imports) == 2 and len(wrapped) == 1 and wrapped <= modules, f"{path.name} wraps one command"
        assert "sys.path" not in path.read_text(encoding="utf-8"), path.name
        assert len(tree.body) == 4, f"{path.name}: docstring, two imports and the __main__ guard"


def test_a_script_runs_as_a_user_starts_it():
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--features" in run.stdout
