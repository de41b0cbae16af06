"""The CPU precision follows the chip (probe mocked both ways), the cross-precision rule, parallel decoding."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from conftest import make_image
from mirip.common import devices
from mirip.common.devices import CPU_BF16_ENV, announce_precision, precision_choice
from mirip.extract.config import ExtractConfig
from mirip.extract.run import choose_precision, open_for_append
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.preprocessing import Preprocessor
from mirip.scoring.scorer import load_scorer
from mirip.store.cache import write_cache
from mirip.store.cache_errors import CacheError
from mirip.store.fingerprint import make_fingerprint


@pytest.fixture
def chip(monkeypatch):
    """``chip(amx=..., avx512_bf16=...)`` mocks torch's CPU probes (the suite's pin on the probe lifted)."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)

    def set_flags(amx: bool = False, avx512_bf16: bool = False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    return set_flags


@pytest.mark.parametrize("amx, avx512_bf16, expected, units", [
    (False, False, "fp32", None), (True, False, "bf16", "AMX"), (False, True, "bf16", "AVX512-BF16"),
    (True, True, "bf16", "AMX")])
def test_cpu_default_follows_the_chips_bf16_units(chip, amx, avx512_bf16, expected, units):
    chip(amx=amx, avx512_bf16=avx512_bf16)
    precision, why = precision_choice("cpu")
    assert precision == expected
    assert (units in why) if units else ("without AMX or AVX512-BF16" in why)
    assert precision_choice("cuda")[0] == "bf16"  # a GPU's default does not depend on the CPU
    assert precision_choice("cpu", "fp32") == ("fp32", "asked for with --precision")


def test_environment_overrides_the_probe(chip, monkeypatch):
    chip(amx=True)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert precision_choice("cpu")[0] == "fp32"
    chip(amx=False)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert precision_choice("cpu")[0] == "bf16"


def test_a_torch_without_the_probe_keeps_fp32(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    assert precision_choice("cpu")[0] == "fp32"


def test_extractor_default_precision_on_each_chip(chip, tiny_backbone):
    chip(amx=False)
    assert DINOv2FeatureExtractor(tiny_backbone, device="cpu").precision == "fp32"
    chip(amx=True)
    ext = DINOv2FeatureExtractor(tiny_backbone, device="cpu")
    assert ext.precision == "bf16" and next(ext.backbone.parameters()).dtype == torch.bfloat16


def test_choice_is_announced_once(chip, monkeypatch):
    chip(avx512_bf16=True)
    monkeypatch.setattr(devices, "_ANNOUNCED", set())
    said = []
    assert announce_precision("cpu", print_fn=said.append) == "bf16"
    announce_precision("cpu", print_fn=said.append)
    assert len(said) == 1 and "bf16" in said[0] and "AVX512-BF16" in said[0]


def _fp32_cache(tiny_backbone, tmp_path):
    ext = DINOv2FeatureExtractor(tiny_backbone, device="cpu", precision="fp32")
    fp = make_fingerprint(ext, Preprocessor(image_size=28))
    return write_cache(str(tmp_path / "c.h5"), fp, ["a.png"], np.zeros((1, ext.output_dim), np.float32)), ext


def test_extraction_into_an_existing_cache_keeps_its_precision(chip, tiny_backbone, tmp_path):
    cache, ext = _fp32_cache(tiny_backbone, tmp_path)
    chip(amx=True)  # the chip's default would be bf16
    config = ExtractConfig(image_dir=str(tmp_path), output=cache, backbone=tiny_backbone, image_size=28)
    resolved, why = choose_precision(config)
    assert resolved.precision == "fp32" and cache in why
    assert choose_precision(ExtractConfig(image_dir=str(tmp_path), output=str(tmp_path / "new.h5"),
                                          backbone=tiny_backbone, image_size=28))[0].precision == "bf16"
    # Asked for explicitly, the other precision is refused at the append, naming the field.
    bf16 = make_fingerprint(DINOv2FeatureExtractor(tiny_backbone, device="cpu", precision="bf16"),
                            Preprocessor(image_size=28))
    with pytest.raises(CacheError, match="precision: the cache has 'fp32'"):
        open_for_append(cache, bf16, overwrite=False)


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_scoring_follows_the_precision_the_heads_features_were_made_in(chip, trained, capsys):
    """On a bf16 chip an fp32-trained head still scores in fp32 unless --precision says otherwise: bf16 scoring
    of fp32 features changed 5% of the demo's tiers (docs/benchmarks.md)."""
    from mirip.cli import score

    _, ckpt, _, paths = trained
    chip(amx=True)  # the chip's default would be bf16
    assert precision_choice("cpu", None, "fp32")[0] == "fp32"
    assert precision_choice("cpu", None, "bf16")[0] == "bf16"
    assert precision_choice("cpu", None, None)[0] == "bf16"  # no head: the chip's
    assert precision_choice("cpu", "bf16", "fp32")[0] == "bf16"  # asked for
    assert load_scorer(ckpt, device="cpu").model.feature_extractor.precision == "fp32"
    asked = load_scorer(ckpt, device="cpu", precision="bf16")
    assert asked.model.feature_extractor.precision == "bf16"
    assert any("features were made in fp32, scoring runs in bf16" in n for n in asked.notes)
    devices._ANNOUNCED.clear()
    assert score.main(["--checkpoint", ckpt, paths[0], "--device", "cpu", "--no-progress"]) == 0
    assert "precision: fp32 on cpu (the precision the checkpoint's features were made in" in capsys.readouterr().out


def test_fp32_checkpoint_scored_in_bf16_is_announced_and_agrees(trained):
    _, ckpt, _, paths = trained
    fp32 = load_scorer(ckpt, device="cpu", precision="fp32")
    bf16 = load_scorer(ckpt, device="cpu", precision="bf16")
    assert not any("precision" in n or "made in" in n for n in fp32.notes)
    assert any("features were made in fp32, scoring runs in bf16" in n for n in bf16.notes)
    a = np.array(fp32.score_paths(paths, progress=False).scores)
    b = np.array(bf16.score_paths(paths, progress=False).scores)
    assert _spearman(a, b) >= 0.9
    assert np.max(np.abs(a - b)) <= 0.05 * (np.ptp(a) + 1e-6)


@pytest.fixture
def scoring_set(trained, tmp_path):
    """13 paths: good files with a corrupt, an empty and a missing one among them."""
    _, ckpt, _, paths = trained
    extra = [make_image(tmp_path / f"x{i}.png", size=(30 + i, 40), seed=100 + i) for i in range(4)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    mixed = paths[:3] + [str(broken)] + extra[:2] + [str(tmp_path / "gone.png")] + paths[3:6] + [str(empty)] + extra[2:]
    return load_scorer(ckpt, device="cpu", precision="fp32"), mixed


def test_parallel_decoding_matches_serial_order_scores_and_failures(scoring_set):
    scorer, mixed = scoring_set
    decode, threads = scorer.preprocessor, set()

    def slow_early(path):  # early files decode slowest, so threads finish out of order
        threads.add(threading.current_thread().name)
        time.sleep(0.002 * (len(mixed) - mixed.index(path)))
        return decode(path)

    scorer.preprocessor = slow_early
    parallel = scorer.score_paths(mixed, batch_size=3, decode_threads=4, progress=False)
    scorer.preprocessor = decode
    assert any(name.startswith("mirip-decode") for name in threads)
    good = [p for p in mixed if os.path.isfile(p) and os.path.getsize(p) and not p.endswith("broken.jpg")]
    # The reference: each good file scored alone, decoded in this thread.
    alone = [scorer.score_tensor(decode(p)[None]).item() for p in good]
    assert parallel.paths == good
    assert parallel.scores == pytest.approx(alone, abs=1e-5)
    serial = scorer.score_paths(mixed, batch_size=3, decode_threads=1, progress=False)
    assert parallel.paths == serial.paths and parallel.failures == serial.failures
    assert [p for p, _ in parallel.failures] == [p for p in mixed if p not in good]


def test_default_decoding_uses_threads(scoring_set, monkeypatch):
    scorer, mixed = scoring_set
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    decode, threads = scorer.preprocessor, set()

    def record(path):
        threads.add(threading.current_thread().name)
        return decode(path)

    scorer.preprocessor = record
    try:
        scorer.score_paths(mixed, batch_size=3, progress=False)
    finally:
        scorer.preprocessor = decode
    assert threads and all(name.startswith("mirip-decode") for name in threads)
    with pytest.raises(ValueError, match="decode_threads must be positive"):
        scorer.score_paths(mixed, decode_threads=0, progress=False)
