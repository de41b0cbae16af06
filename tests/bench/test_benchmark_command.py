"""scripts/benchmark.py: a quick CPU run of the full-image benchmark writes benchmark.json and benchmark.md."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import pytest

from mirip.bench import full_image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED_KEYS = ("inference_time_per_pair", "inference_time_ms", "memory_usage_bytes", "memory_usage_mb",
             "memory_usage_gb", "device", "batch_size", "image_size", "meets_inference_requirement",
             "meets_memory_requirement", "requirements")


def _load_script():
    module = importlib.import_module("mirip.cli.benchmark")
    return module


bench_script = _load_script()


def _quick_args(backbone, out):
    return ["--only", "full_image", "--backbone", backbone, "--image-size", "28", "--quick", "--device", "cpu",
            "--output-dir", str(out), "--full-image-samples-per-epoch", "100", "--full-image-epochs", "3"]


@pytest.fixture
def restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_full_image_run_writes_json_and_markdown(tiny_backbone, tmp_path, capsys, restore_threads):
    out = tmp_path / "bench"
    assert bench_script.main(_quick_args(tiny_backbone, out) + ["--random-init", "--threads", "1"]) == 0
    data = json.loads((out / "benchmark.json").read_text())
    assert data["cpu_threads"] == 1
    assert data["backbone"] == tiny_backbone and data["weights"] == "random" and data["precision"] == "fp32"
    assert data["image_size"] == 28 and data["quick"] is True and data["machine"]["device"] == "cpu"
    assert data["machine"]["device_name"] and data["machine"]["date"]
    result = data["results"]["full_image"]
    for key in SEED_KEYS:
        assert key in result["report"], key
    assert result["report"]["batch_size"] == 4 and result["report"]["num_pairs"] == 5
    e = result["training_estimate"]
    assert e["num_epochs"] == 3 and e["samples_per_epoch"] == 100 and e["total_steps"] == 3 * 25
    assert e["speedup"] > 0 and result["reproducibility"]["reproducible"] is True
    assert set(result["meets_goals"]) == {"inference_goal", "memory_goal", "speedup_goal", "two_stage_time_goal"}

    md = (out / "benchmark.md").read_text()
    for text in ("| device name |", "| torch CPU threads | 1 |", "| backbone | " + tiny_backbone, "| weights | random", "| precision | fp32",
                 "| image size | 28 px", "Seed requirements: 100 ms per pair", "12 GB", "images/s",
                 "end to end (backbone in every step)", "two-stage total", "RANDOM"):
        assert text in md, text
    assert f"{result['report']['inference_time_ms']:.2f} ms" in md
    printed = capsys.readouterr().out
    assert "wrote" in printed and "benchmark.md" in printed


def test_pretrained_local_backbone_and_explicit_options(tiny_backbone, tmp_path, restore_threads):
    out = tmp_path / "b"
    assert bench_script.main(_quick_args(tiny_backbone, out) + ["--threads", "1", "--full-image-batch-size", "2",
                                                                "--full-image-num-pairs", "2"]) == 0
    data = json.loads((out / "benchmark.json").read_text())
    r = data["results"]["full_image"]
    assert data["weights"] == "pretrained" and r["report"]["batch_size"] == 2 and r["report"]["num_pairs"] == 2
    assert "RANDOM" not in (out / "benchmark.md").read_text()


def test_missing_and_failing_modules_are_reported(tiny_backbone, tmp_path, monkeypatch, capsys):
    broken = types.ModuleType("mirip.bench.always_fails")
    broken.add_arguments = lambda parser: parser.add_argument("--always-fails-flag", default="x")
    broken.to_markdown = lambda result: "never"

    def run(args):
        assert args.always_fails_flag == "x"
        raise RuntimeError("deliberate")

    broken.run = run
    monkeypatch.setitem(sys.modules, "mirip.bench.always_fails", broken)
    monkeypatch.setattr(bench_script, "BENCHMARKS", ("full_image", "always_fails", "not_written_yet"))
    out = tmp_path / "m"
    rc = bench_script.main(["--only", "always_fails,not_written_yet", "--device", "cpu", "--output-dir", str(out)])
    assert rc == 1
    data = json.loads((out / "benchmark.json").read_text())
    assert "RuntimeError: deliberate" in data["results"]["always_fails"]["error"]
    assert "does not exist" in data["skipped"]["not_written_yet"]
    md = (out / "benchmark.md").read_text()
    assert "FAILED: RuntimeError: deliberate" in md and "`not_written_yet` skipped" in md
    assert "[not_written_yet] skipped" in capsys.readouterr().out


def test_unknown_benchmark_name_is_an_error():
    with pytest.raises(SystemExit) as exc:
        bench_script.main(["--only", "full_image,nonsense"])
    assert exc.value.code == 2


def test_help_lists_module_options(capsys):
    with pytest.raises(SystemExit):
        bench_script.main(["--help"])
    text = capsys.readouterr().out
    assert "--full-image-batch-size" in text and "--random-init" in text and "--quick" in text


def test_to_markdown_of_module_result_marks_unmet_goals():
    result = {
        "backbone": "b", "weights": "pretrained", "parameters": 10, "image_size": 28, "precision": "fp32",
        "device": "cpu", "device_name": "cpu", "batch_size": 2, "quick": False, "model_build_seconds": 0.1,
        "training_memory_gb": 0.5, "goals": full_image.GOALS,
        "report": {"inference_time_ms": 150.0, "memory_usage_gb": 1.0, "images_per_second": 3.0, "batch_size": 2,
                   "requirements": {"max_inference_time_ms": 100.0, "max_memory_gb": 12.0},
                   "meets_inference_requirement": False, "meets_memory_requirement": True,
                   "memory_method": "peak_rss"},
        "training_estimate": {"num_epochs": 1, "samples_per_epoch": 10, "batch_size": 2, "total_steps": 5,
                              "num_images": 10, "end_to_end_step_seconds": 1.0, "end_to_end_seconds": 5.0,
                              "extraction_seconds_per_image": 0.5, "two_stage_extraction_seconds": 5.0,
                              "head_step_seconds": 0.001, "two_stage_head_seconds": 0.005,
                              "two_stage_seconds": 5.005, "speedup": 5.0 / 5.005, "target_training_hours": 6.0,
                              "meets_target_end_to_end": True, "meets_target_two_stage": True},
        "reproducibility": {"reproducible": True, "accuracy_difference": 0.0, "max_score_difference": 0.0},
        "meets_goals": {"inference_goal": False, "memory_goal": True, "speedup_goal": False,
                        "two_stage_time_goal": True},
    }
    md = full_image.to_markdown(result)
    assert "| inference per pair | 150.00 ms | 100 ms | 15 ms | **no** / **no** |" in md
    assert "Two-stage is **1x** faster" in md and "goal >= 100x: **no**" in md


# --- issue 12 items 12 and 13: defaults by device, partial results, Ctrl-C ----------------------------------
def _fake_benchmarks(monkeypatch, behaviours):
    """Replace the benchmark modules by fakes: name -> callable(args) returning a result or raising."""
    modules = {}
    for name, behaviour in behaviours.items():
        modules[name] = types.SimpleNamespace(add_arguments=lambda parser: None, run=behaviour,
                                              to_markdown=lambda result, n=name: f"### {n}\n\nok\n")
    monkeypatch.setattr(bench_script, "load_benchmarks", lambda names=None: (modules, {}))


def test_cpu_defaults_are_the_small_backbone_at_224(monkeypatch, tmp_path):
    seen = {}

    def record(args):
        seen.update(backbone=args.backbone, image_size=args.image_size)
        return {"ok": 1}

    _fake_benchmarks(monkeypatch, {"full_image": record})
    assert bench_script.main(["--only", "full_image", "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    assert seen == {"backbone": "facebook/dinov2-small", "image_size": 224}
    assert bench_script.device_defaults("cuda:0") == ("facebook/dinov2-large", 768)
    assert bench_script.main(["--only", "full_image", "--device", "cpu", "--backbone", "x", "--image-size", "56",
                              "--output-dir", str(tmp_path)]) == 0
    assert seen == {"backbone": "x", "image_size": 56}


def test_results_are_written_after_each_benchmark_and_ctrl_c_keeps_them(monkeypatch, tmp_path, capsys):
    seen_on_disk = {}

    def second(args):
        seen_on_disk.update(json.loads((tmp_path / "benchmark.json").read_text()))
        raise KeyboardInterrupt

    _fake_benchmarks(monkeypatch, {"full_image": lambda args: {"figure": 42}, "extraction": second,
                                   "training": lambda args: {"never": 1}})
    try:
        rc = bench_script.main(["--only", "full_image,extraction,training", "--device", "cpu",
                                "--output-dir", str(tmp_path)])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped benchmark.main (a traceback for the user)")
    assert rc == 130
    # While the second benchmark ran, the first one's figures were already on disk.
    assert seen_on_disk["results"] == {"full_image": {"figure": 42}}
    assert seen_on_disk["status"] == "running" and seen_on_disk["pending"] == ["extraction", "training"]
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["results"] == {"full_image": {"figure": 42}} and saved["status"] == "interrupted during extraction"
    assert "PARTIAL" in (tmp_path / "benchmark.md").read_text()
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err_lines) == 1 and "Traceback" not in captured.err
    assert "full_image" in err_lines[0] and "--only extraction,training" in err_lines[0]
    assert "[full_image] done" in captured.out and "[extraction] running (2 of 3)" in captured.out


@pytest.mark.slow
def test_quick_cpu_run_finishes_within_five_minutes(tmp_path):
    """The README's CPU smoke run: every benchmark, defaults for a CPU, under 5 minutes on 2 cores."""
    import subprocess
    import time

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--quick", "--random-init",
                           "--device", "cpu", "--output-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert data["status"] == "complete" and set(data["results"]) == {"full_image", "extraction", "training", "sweep"}
    assert data["backbone"] == "facebook/dinov2-small" and data["image_size"] == 224
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    if elapsed > 300 and load > 1.5:
        pytest.skip(f"took {elapsed:.0f} s on a machine loaded {load:.1f}x its cores: not a fair timing")
    assert elapsed < 300, f"--quick took {elapsed:.0f} s"


def test_quick_extraction_fits_its_default_bank_to_a_shallow_backbone(tiny_backbone, tmp_path, restore_threads):
    # The tiny backbone has 2 blocks: the default bank (-4..-1) must shrink to the blocks it has.
    out = tmp_path / "bench"
    rc = bench_script.main(["--only", "extraction", "--backbone", tiny_backbone, "--image-size", "28", "--quick",
                            "--device", "cpu", "--threads", "1", "--random-init", "--output-dir", str(out),
                            "--extract-images", "16", "--extract-source-size", "64", "--extract-rounds", "1"])
    assert rc == 0
    result = json.loads((out / "benchmark.json").read_text())["results"]["extraction"]
    assert "error" not in result
    from mirip.bench.extraction import bank_layers

    assert bank_layers(types.SimpleNamespace(extract_bank_layers=None), 2) == [-2, -1]
    assert bank_layers(types.SimpleNamespace(extract_bank_layers=None), 24) == [-4, -3, -2, -1]
    assert bank_layers(types.SimpleNamespace(extract_bank_layers=[-6]), 2) == [-6]  # as asked: refused later
