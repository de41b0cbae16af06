"""The package's shape: folders in pipeline order, each importing only the folders below it; every name
imported from the module that defines it; the seed's import paths are the real homes of its classes.

Import checks that depend on what an import pulls in run in a fresh interpreter, where ``sys.modules`` shows
it (this process has imported everything already)."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mirip"
VOCAB = PACKAGE / "common" / "feature_spec.py"
# The README's code map, bottom to top: a module imports its own folder and the folders below it, never above.
LAYERS = ("common", "demo", "ml", "store", "extract", "training", "sweep", "judging", "scoring", "serve", "bench", "cli")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _modules():
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _folder(module: str) -> str:
    parts = module.split(".")
    assert len(parts) >= 2 and parts[1] in LAYERS, f"{module} is in no folder of the code map"
    return parts[1]


def _mirip_imports(tree):
    """(module, name or None, line) for every import of mirip in the tree, those inside functions too."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mirip":
            for alias in node.names:
                yield node.module, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mirip":
                    yield alias.name, None, node.lineno


def _defined(tree) -> set:
    """Names a module defines itself: functions, classes and assignments (not imports), at any top level."""
    names = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    visit(block)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return names


def _fresh(code: str):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _loaded(prefixes) -> str:
    return ("import json, sys; print(json.dumps(sorted(m for m in sys.modules "
            f"if any(m == p or m.startswith(p + '.') for p in {tuple(prefixes)!r}))))")


def test_the_package_is_folders_in_the_code_maps_order():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert entries == sorted(LAYERS + ("__init__.py",)), "mirip/ holds only its folders and __init__.py"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Code map", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `mirip/(\w+)/`", section, flags=re.M)
    assert tuple(rows) == LAYERS, f"the README's code map lists {rows}"


def test_each_folder_init_is_a_docstring():
    for folder in LAYERS:
        tree = ast.parse((PACKAGE / folder / "__init__.py").read_text(encoding="utf-8"))
        assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), f"mirip/{folder}/__init__.py"


def test_no_module_imports_a_folder_above_its_own():
    wrong = []
    for module, path in _modules().items():
        if module == "mirip":
            continue
        own = LAYERS.index(_folder(module))
        for target, name, line in _mirip_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if target == "mirip":
                continue
            if LAYERS.index(_folder(target)) > own:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (above {_folder(module)})")
    assert not wrong, "\n".join(wrong)


def test_every_name_is_imported_from_the_module_that_defines_it():
    modules = _modules()
    defined = {m: _defined(ast.parse(p.read_text(encoding="utf-8"))) for m, p in modules.items()}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "tests").rglob("*.py")):
        for target, name, line in _mirip_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if name is None or f"{target}.{name}" in modules or (target, name) == ("mirip", "__version__"):
                continue
            if name not in defined.get(target, set()):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {name} from {target}, which does not define it")
            elif name.startswith("_") and path.is_relative_to(PACKAGE):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: the private {name} from {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_lists_names_it_does_not_define():
    wrong = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                extra = set(ast.literal_eval(node.value)) - _defined(tree)
                wrong += [f"{module}.__all__ names {n}" for n in sorted(extra)]
    assert not wrong, "\n".join(wrong)


def test_the_seeds_import_paths_are_the_homes_of_its_classes():
    """Each class of the README's API table is defined in the module the table names."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## The Python API", 1)[1].split("```", 1)[0]
    rows = re.findall(r"^\| (.+?) \| `(mirip[\w.]+)` \|$", table, flags=re.M)
    assert len(rows) == 9, rows
    for names, module_name in rows:
        module = importlib.import_module(module_name)
        for name in re.findall(r"`(\w+)`", names):
            assert getattr(module, name).__module__ == module_name, f"{name} is defined elsewhere than {module_name}"


def test_the_vocabulary_imports_nothing_above_it():
    tree = ast.parse(VOCAB.read_text(encoding="utf-8"))
    assert [m for m, _, _ in _mirip_imports(tree)] == []
    got = _fresh("import torch\nimport mirip.common.feature_spec as v\n"
                 "x = torch.arange(12.0).reshape(4, 3)\n"
                 "v.apply_entry_scales(x, [1, 2], v.entry_scales(x, [1, 2], [0, 2]))\n"
                 "v.checkpoint_feature_spec({'fingerprint': {'pooling': 'mean'}})\n"
                 + _loaded([f"mirip.{f}" for f in LAYERS[1:]]))
    assert got == [], f"the vocabulary pulled in upper layers: {got}"


def test_the_extractor_imports_no_part_of_stage_one():
    got = _fresh("import mirip.ml.feature_extractor, mirip.ml.ranking_model\n" + _loaded(["mirip.extract"]))
    assert got == [], f"importing the model layer pulled in stage one: {got}"


def test_training_and_scoring_commands_import_nothing_of_stage_one():
    for command in ("train", "sweep", "evaluate", "score"):
        got = _fresh(f"import mirip.cli.{command}\n" + _loaded(["mirip.extract"]))
        assert got == [], f"mirip.cli.{command} pulled in stage one: {got}"


def test_pooling_names_are_spelt_out_only_in_the_vocabulary():
    """No module but the vocabulary binds a tuple of pooling names at module level (the copies that drift)."""
    names = {"cls", "mean", "std", "cls_mean"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == VOCAB:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            value = getattr(node, "value", None)
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(value, (ast.Tuple, ast.List)):
                items = [e.value for e in value.elts if isinstance(e, ast.Constant)]
                if len(items) >= 2 and len(items) == len(value.elts) and set(items) <= names:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


# Import name -> the distribution pyproject.toml declares it under (dependencies or a user-facing extra).
DECLARED_IMPORTS = {"torch": "torch", "transformers": "transformers", "pandas": "pandas", "PIL": "pillow",
                    "h5py": "h5py", "numpy": "numpy", "tqdm": "tqdm", "matplotlib": "matplotlib", "wandb": "wandb",
                    "fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart", "httpx": "httpx",
                    "selenium": "selenium", "openvino": "openvino",
                    # installed by a declared package that requires it
                    "huggingface_hub": "transformers", "starlette": "fastapi"}


def test_the_library_imports_only_what_pyproject_declares_for_users():
    """Every third-party import in mirip/ is a dependency or a user-facing extra, never the tests' own tools
    (scipy, the reference the rank metrics are tested against, is a dev extra: a plain install lacks it)."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    deps = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    extras = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    user_extras = "\n".join(line for line in extras.splitlines() if not line.startswith("dev"))
    undeclared = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top == "mirip" or top in sys.stdlib_module_names:
                    continue
                dist = DECLARED_IMPORTS.get(top)
                if dist is None or f'"{dist}' not in deps + user_extras:
                    undeclared.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not undeclared, "imports of packages pyproject.toml does not declare for users:\n" + "\n".join(undeclared)
