"""Issue 12 item 9: README's commands run as written: the environment is activated, the download hint works,
and every `python scripts/...` command line parses with that script's own options."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _shell_lines() -> list:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = block.replace("\\\n", " ")
        lines += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return lines


def _script(name):
    """The command module that scripts/NAME.py wraps."""
    wrapper = (ROOT / "scripts" / f"{name}.py").read_text(encoding="utf-8")
    return importlib.import_module(re.search(r"^from (mirip\.cli\.\w+) import main$", wrapper, flags=re.M).group(1))


def test_environment_is_activated_before_the_first_python_command():
    lines = _shell_lines()
    first_python = next(i for i, line in enumerate(lines) if line.startswith("python "))
    activate = [i for i, line in enumerate(lines) if line.split("#")[0].strip() == "source .venv/bin/activate"]
    assert activate and activate[0] < first_python
    bootstrap = [i for i, line in enumerate(lines) if line.split("#")[0].strip() == "bash scripts/bootstrap.sh"]
    assert bootstrap and bootstrap[0] < activate[0]  # the venv exists before it is activated
    assert (ROOT / "scripts" / "bootstrap.sh").is_file()


def test_download_hint_uses_the_installed_hub_cli():
    from mirip.ml import backbones

    source = Path(backbones.__file__).read_text()
    for text, where in ((README, "README.md"), (source, "mirip/ml/backbones.py")):
        assert "huggingface-cli" not in text, where
        assert "hf download facebook/dinov2-large" in text or "`hf download " in text, where
    hf = Path(sys.executable).with_name("hf")
    if not hf.exists():
        pytest.skip(f"no hf command beside {sys.executable} (huggingface_hub not installed as a console script)")
    assert os.access(hf, os.X_OK)


@pytest.mark.parametrize("line", [line for line in _shell_lines() if line.startswith("python scripts/")])
def test_every_readme_command_parses(line):
    argv = shlex.split(line.split("  #")[0])
    name = Path(argv[1]).stem
    module = _script(name)
    parser = module.build_parser(module.load_benchmarks()[0]) if name == "benchmark" else module.build_parser()
    parser.parse_args(argv[2:])  # exits (SystemExit) on an unknown or malformed option
