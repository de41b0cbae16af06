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


def _python_block(marker: str) -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if marker in b]
    assert len(blocks) == 1, f"one README python block with {marker!r}"
    return blocks[0]


def test_the_seed_snippet_runs_where_there_is_no_gpu(tiny_backbone, monkeypatch):
    """As written, but with the tiny offline backbone in place of facebook/dinov2-large."""
    import torch

    from mirip.ml import ranking_model

    class Tiny(ranking_model.PairwiseRankingModel):
        def __init__(self, **kwargs):
            super().__init__(tiny_backbone, **kwargs)

    monkeypatch.setattr(ranking_model, "PairwiseRankingModel", Tiny)
    namespace: dict = {}
    exec(_python_block("PairwiseRankingModel("), namespace)
    assert namespace["score1"].numel() == 4 and torch.isfinite(namespace["loss"])
    assert str(namespace["score1"].device).startswith(namespace["device"])


@pytest.fixture
def demo_checkpoint(tiny_backbone, tmp_path, monkeypatch):
    """runs/demo/train/best.pt (calibrated), a.jpg and b.jpg in the working directory, as the snippet expects."""
    import numpy as np

    from _inference_helpers import make_cache_and_checkpoint, make_tiered_images
    from conftest import make_image
    from mirip.training.calibration_fit import fit_ordinal
    from mirip.training.calibration_fit import make_score_reference
    from mirip.store.checkpoint import load_checkpoint_file, save_checkpoint_file
    from mirip.scoring.scorer import load_scorer

    meta = make_tiered_images(tmp_path / "images")
    run = tmp_path / "runs" / "demo" / "train"
    run.mkdir(parents=True)
    _, path, _, paths = make_cache_and_checkpoint(tiny_backbone, str(tmp_path / "images"), list(meta["filename"]),
                                                  str(run))
    scores = load_scorer(path, device="cpu").score_paths(paths, progress=False).scores
    ranks = np.array(["CBAS".index(t) for t in meta["tier"]])
    ckpt = load_checkpoint_file(path)
    ckpt.update(calibration=fit_ordinal(scores, ranks).to_dict(),
                score_reference=make_score_reference(scores, ranks).to_dict())
    save_checkpoint_file(path, ckpt)
    make_image(tmp_path / "a.jpg", size=(60, 40), seed=1, fmt="JPEG")
    make_image(tmp_path / "b.jpg", size=(40, 60), seed=2, fmt="JPEG")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_scoring_snippet_runs_as_written(demo_checkpoint):
    from mirip.scoring.explain import Explanation, ExplainResult

    namespace: dict = {}
    exec(_python_block("load_scorer("), namespace)
    maps = namespace["maps"]
    assert isinstance(maps, ExplainResult) and [e.path for e in maps] == ["a.jpg", "b.jpg"]
    assert isinstance(maps["a.jpg"], Explanation) and namespace["where"] is maps.explanations[0].map
    assert namespace["where"].shape == maps.explanations[0].grid
    assert len(namespace["result"]) == 2 and namespace["pair"].better in ("a.jpg", "b.jpg")
    with pytest.raises(TypeError, match="by path, not position"):
        maps[0]


def test_an_unreadable_file_is_named_when_its_explanation_is_asked_for(demo_checkpoint):
    from mirip.scoring.scorer import load_scorer

    (demo_checkpoint / "bad.jpg").write_bytes(b"not a picture")
    maps = load_scorer("runs/demo/train/best.pt", device="cpu").explain(["bad.jpg", "a.jpg"], progress=False)
    assert [e.path for e in maps] == ["a.jpg"] and maps["a.jpg"].path == "a.jpg"
    with pytest.raises(KeyError, match="bad.jpg: could not be read"):
        maps["bad.jpg"]


# An editable install's import hook as setuptools writes it: consulted after the path search, it maps the
# children of mirip to the real package, so a folder named mirip found on sys.path wins for mirip itself.
SHADOWED = """
import sys
from importlib.machinery import PathFinder

class EditableFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        parent, _, _ = fullname.rpartition(".")
        if parent == "mirip":
            return PathFinder.find_spec(fullname, path=[{package!r}])
        return None

sys.path[:] = [p for p in sys.path if p not in ("", {root!r})]
sys.path.insert(0, {shadow_parent!r})
# right after the path search: before any editable hook this environment has for mirip (it may point elsewhere)
sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, EditableFinder)
import mirip
assert getattr(mirip, "__file__", None) is None, "the folder did not shadow the package: nothing to test"
assert mirip.__path__[0] == {shadow!r}
try:
    import {module}
except ImportError as exc:
    print("ImportError:", exc)
else:
    print("imported")
"""


@pytest.mark.parametrize("module", ["mirip.store.fingerprint", "mirip.store.checkpoint"])
def test_a_folder_named_mirip_that_shadows_the_package_is_named(tmp_path, module):
    import subprocess

    clone = tmp_path / "mirip"  # a clone of the repository: no __init__.py at its top
    (clone / "scripts").mkdir(parents=True)
    code = SHADOWED.format(package=str(ROOT / "mirip"), root=str(ROOT), shadow_parent=str(tmp_path),
                           shadow=str(clone), module=module)
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ImportError:"), done.stdout
    assert str(clone) in done.stdout and str(ROOT / "mirip") in done.stdout
    assert "Run from another directory, or rename that folder" in done.stdout


def _written_by(line: str) -> list:
    """The paths a README command line writes (files, or a file inside each output directory)."""
    argv = shlex.split(line.split("  #")[0])
    name = Path(argv[1]).stem
    module = _script(name)
    parser = module.build_parser(module.load_benchmarks()[0]) if name == "benchmark" else module.build_parser()
    args = parser.parse_args(argv[2:])
    files = [getattr(args, k) for k in ("output", "html", "json") if getattr(args, k, None)]
    dirs = [getattr(args, k) for k in ("output_dir", "explain") if getattr(args, k, None)]
    if name == "score" and args.images and not args.output:
        files.append("scores.csv")  # score.py's default
    if name == "extract" and not args.output:
        dirs.append(args.cache_dir)
    return [str(f) for f in files] + [os.path.join(str(d), "written.file") for d in dirs]


def test_what_the_readme_examples_write_is_ignored_by_git():
    import shutil
    import subprocess

    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = [p for line in _shell_lines() if line.startswith("python scripts/") for p in _written_by(line)]
    written += [os.path.join(d, "written.file") for d in re.findall(r"--local-dir (\S+?)`", README)]
    assert "scores.csv" in written and any(p.startswith("heatmaps") for p in written)  # the parse found them
    not_ignored = [p for p in written
                   if subprocess.run([git, "check-ignore", "-q", "--no-index", p], cwd=ROOT).returncode != 0]
    assert not not_ignored, f"README examples write these, and .gitignore does not ignore them: {not_ignored}"
