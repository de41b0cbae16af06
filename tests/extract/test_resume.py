"""Stage one across processes: kill -9 and resume, torchrun with 2 ranks, and merging rank parts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from _extract_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from _extract_helpers import SIZE, extract, make_images, noise_image, touch_later
from mirip.extract.distributed import leftover_parts, merge_parts, part_path
from mirip.store.cache import FeatureCache, open_cache, write_cache

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# The processes below extract a feature bank (both blocks of the tiny model x three poolings): a bank's one
# features dataset is committed by the same row counter, and the single-vector cache is its one-entry case.
BANK_ARGS = ["--layers", "-2", "-1", "--pooling", "cls", "mean", "std"]
BANK = dict(layers=[-2, -1], pooling=["cls", "mean", "std"])


def _args(image_dir, output, backbone, batch_size: int = 1) -> list:
    return ["--image-dir", str(image_dir), "--output", str(output), "--backbone", backbone, "--image-size", str(SIZE),
            "--batch-size", str(batch_size), "--num-workers", "0", "--device", "cpu", "--no-progress", *BANK_ARGS]


def _kill_when(output, backbone, image_dir, at_least: int, timeout: float = 120.0) -> int:
    """Run the extractor until ``at_least`` rows are committed, then SIGKILL it; returns the rows committed.

    The writer pauses itself there (MIRIP_TEST_PAUSE_WRITER, read by mirip.extract.writer) and says so in a flag
    file, so the kill lands at that count however slow or loaded the machine is; the reader and mapper threads keep
    running meanwhile, as they would at any moment of a real kill.
    """
    flag = Path(str(output) + f".paused-{at_least}")
    env = dict(_env(), MIRIP_TEST_PAUSE_WRITER=f"{at_least}:{flag}")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "extract.py"), *_args(image_dir, output, backbone)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while not (flag.exists() and flag.read_text()):
            if proc.poll() is not None:
                pytest.fail(f"extractor ended (rc={proc.returncode}) before {at_least} rows were committed: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                pytest.fail(f"extractor did not commit {at_least} rows in {timeout:.0f} s")
            time.sleep(0.05)  # only waits for the flag: how long this takes does not change what is tested
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with h5py.File(output, "r") as h5:
            return int(h5.attrs["num_rows"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# ~20 s, but resuming after kill -9 is a promise the README makes: it runs by default.
def test_kill_9_at_any_moment_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_backbone):
    d = tmp_path / "images"
    n = 200
    names = make_images(d, n)
    extract(d, tmp_path / "ref.h5", tiny_backbone, **BANK)
    out = tmp_path / "killed.h5"
    seen = [_kill_when(out, tiny_backbone, d, at_least) for at_least in (1, 60, 130)]
    assert seen == [1, 60, 130]  # batch size 1: the writer paused at exactly that count
    summary = extract(d, out, tiny_backbone, **BANK)
    assert summary.skipped_cached >= seen[-1] and summary.extracted == n - summary.skipped_cached
    with open_cache(str(out)) as cache, open_cache(str(tmp_path / "ref.h5")) as ref:
        assert cache.num_rows == n and cache.paths == names and len(set(cache.paths)) == n
        assert len(cache.entries) == 6 and cache.dim == 6 * 32
        np.testing.assert_allclose(cache.features(), ref.features(), atol=ATOL)
        np.testing.assert_array_equal(cache.source_facts()[0], ref.source_facts()[0])


def _torchrun(image_dir, output, backbone, nproc: int = 2) -> subprocess.CompletedProcess:
    # Port 0: the rendezvous store binds a free port itself and hands it to the ranks. Picking a "free" port here
    # and passing it on would race with anything else that binds one in between.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", str(ROOT / "scripts" / "extract.py"), *_args(image_dir, output, backbone, 3)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _assert_same_cache(a_path, b_path, same_order: bool = True) -> None:
    with open_cache(str(a_path)) as a, open_cache(str(b_path)) as b:
        if same_order:
            assert a.paths == b.paths
        assert sorted(a.paths) == sorted(b.paths) and len(set(b.paths)) == len(b.paths)
        rows = b.rows_for(a.paths)
        np.testing.assert_allclose(a.features(), b.features(rows), atol=ATOL)
        for x, y in zip(a.source_facts(), b.source_facts()):
            np.testing.assert_array_equal(x, y[rows])
        assert a.failure_records() == b.failure_records()
        assert a.fingerprint == b.fingerprint


# ~25 s (two torchrun launches): by default too, since multi-process extraction has no other test.
def test_torchrun_two_ranks_give_the_same_cache_as_one_process(tmp_path, tiny_backbone):
    d = tmp_path / "images"
    make_images(d, 11)
    (d / "broken.png").write_bytes(b"not a png")
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    extract(d, one, tiny_backbone, batch_size=3, **BANK)
    done = _torchrun(d, two, tiny_backbone)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "extracted:            11" in done.stdout and "6 entries: cls@-2, cls@-1, mean@-2" in done.stdout and "broken.png" in done.stdout
    _assert_same_cache(one, two)
    assert leftover_parts(str(two)) == []
    # Second round: new images and a changed one; ranks append and replace through the merge.
    make_images(d, 3, start=11)
    noise_image(seed=77).save(d / "img_004.png")
    touch_later(d / "img_004.png")
    extract(d, one, tiny_backbone, batch_size=3, **BANK)
    done = _torchrun(d, two, tiny_backbone)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "extracted:            4 (1 changed files re-extracted)" in done.stdout
    _assert_same_cache(one, two)


def test_a_write_error_on_one_rank_stops_every_rank_with_one_line_and_a_rerun_continues(tmp_path, tiny_backbone):
    """Rank 1 meets a full disk (MIRIP_TEST_WRITE_ERROR, read by mirip.extract.writer) after 2 committed rows.
    Before, rank 0 waited at the next collective until torchrun killed it (SIGTERM, no message, exit -15; under
    a launcher that does not, for the 12-hour timeout). Now both ranks leave on their own, each with the same
    one line naming rank 1 and its error, exit status 2, and a rerun continues from every committed row."""
    d = tmp_path / "images"
    make_images(d, 24)
    out, logs = tmp_path / "out.h5", tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", "--log-dir", str(logs), "--redirects", "3",
           str(ROOT / "scripts" / "extract.py"), *_args(d, out, tiny_backbone, 1)]
    # A hang would be a failure, never a stuck suite: the run takes seconds (mostly start-up).
    done = subprocess.run(cmd, env=dict(_env(), MIRIP_TEST_WRITE_ERROR="1:2"), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode != 0
    # torchrun sends SIGTERM to the ranks still running once the first one exits (and logs that it did); every
    # rank it reports must have exited with status 2 by itself, none by the signal (-15).
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", done.stderr)
    assert codes and set(codes) == {"2"} and "Signal 15" not in done.stderr, done.stderr[-3000:]
    for rank in (0, 1):
        [log] = list(logs.glob(f"**/attempt_0/{rank}/stderr.log"))
        text = log.read_text()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
        assert ("extraction stopped on all 2 ranks because rank 1 of 2 failed: writing feature cache "
                f"{part_path(str(out), 1, 2)} failed: the disk holding it is full") in errors[0], errors[0]
        assert "2 rows are committed and intact" in errors[0] and "rerun the same command" in errors[0]
    assert list(tmp_path.glob("*.tmp-*")) == []  # every cache, parts included, was closed cleanly
    committed = 0
    for part in leftover_parts(str(out)):
        with open_cache(part) as cache:
            committed += cache.num_rows
            cache.features()  # what is committed verifies
    with open_cache(part_path(str(out), 1, 2)) as cache:
        assert cache.num_rows == 2
    # The rerun merges the parts and extracts only the rest.
    summary = extract(d, out, tiny_backbone, batch_size=3, **BANK)
    assert summary.extracted == 24 - committed and summary.skipped_cached == committed
    extract(d, tmp_path / "ref.h5", tiny_backbone, batch_size=3, **BANK)
    _assert_same_cache(tmp_path / "ref.h5", out, same_order=False)
    assert leftover_parts(str(out)) == []


def _FakeGather(others):
    """What all_gather_object would give every rank: each rank's outcome, this one's included."""

    def gather(ctx, value):
        out = list(others)
        out.insert(ctx.rank, value)
        return out
    return gather


def test_settle_gives_every_rank_the_same_one_line_naming_the_failed_ranks(monkeypatch):
    from mirip.store.cache_errors import CacheWriteError
    from mirip.extract.distributed import DistContext, RankFailed, StopRequested

    monkeypatch.setattr("signal.signal", lambda *a: None)  # settle shields the process from SIGTERM; not here
    barriers = []
    monkeypatch.setattr(DistContext, "barrier", lambda self: barriers.append(self.rank))
    ctx = DistContext(rank=0, world_size=3)
    monkeypatch.setattr(DistContext, "gather", _FakeGather([("ok", 1), ("ok", 2)]))
    assert ctx.settle(0) == [0, 1, 2]
    full = CacheWriteError("writing feature cache c.h5 failed: the disk holding it is full", 5)
    monkeypatch.setattr(DistContext, "gather", _FakeGather([("failed", str(full)), ("stopped", None)]))
    with pytest.raises(RankFailed) as info:
        ctx.settle(None, StopRequested())
    assert str(info.value) == ("extraction stopped on all 3 ranks because rank 1 of 3 failed: writing feature "
                               "cache c.h5 failed: the disk holding it is full")
    assert info.value.failed == [(1, str(full))]
    # This rank failed too; a rank whose error is a bug keeps its traceback.
    monkeypatch.setattr(DistContext, "gather", _FakeGather([("failed", "x"), ("ok", 2)]))
    with pytest.raises(RankFailed, match=r"ranks 0, 1 of 3 failed: rank 0: OSError: \[Errno 5\] I/O; rank 1: x"):
        ctx.settle(None, OSError(5, "I/O"))
    with pytest.raises(KeyError):
        ctx.settle(None, KeyError("bug"))
    monkeypatch.setattr(DistContext, "gather", _FakeGather([("stopped", None), ("ok", 2)]))
    with pytest.raises(RankFailed, match="no rank reported an error"):
        ctx.settle(None, StopRequested())
    assert barriers == [0, 0, 0, 0]  # before leaving, every failed settle waits until all ranks ignore SIGTERM


def test_a_stop_request_ends_a_ranks_pipeline_with_its_committed_rows_intact(tmp_path, tiny_backbone, monkeypatch):
    import torch.distributed as dist

    from _extract_helpers import config
    from mirip.extract.distributed import DistContext, StopRequested
    from mirip.extract.run import build_models
    from mirip.extract.pipeline import run_pipeline
    from mirip.store.fingerprint import make_fingerprint

    # The flag travels through the process group's store; a HashStore stands in for torchrun's.
    store = dist.HashStore()
    monkeypatch.setattr(DistContext, "_store", staticmethod(lambda: store))
    failing, other = DistContext(rank=1, world_size=2), DistContext(rank=0, world_size=2)
    assert not other.stop_requested()
    failing.request_stop("disk full")
    assert other.stop_requested() and failing.stop_requested()
    assert DistContext(rank=0, world_size=1).stop_requested() is False  # one process: no flag, no store

    d = tmp_path / "images"
    names = make_images(d, 8)
    cfg = config(d, tmp_path / "c.h5", tiny_backbone, batch_size=1)
    extractor, pre = build_models(cfg, "cpu")
    asked = []
    stop_after = lambda: asked.append(1) or len(asked) > 3  # noqa: E731 - stop before the 4th batch is read
    with FeatureCache.create(str(tmp_path / "c.h5"), make_fingerprint(extractor, pre)) as cache:
        with pytest.raises(StopRequested):
            run_pipeline([(n, 1, 1) for n in names], cache, extractor, pre, cfg, progress=False,
                         should_stop=stop_after)
    with open_cache(str(tmp_path / "c.h5")) as cache:
        assert cache.paths == names[:3]  # every batch read before the stop is committed, nothing after
        ref = extract(d, tmp_path / "ref.h5", tiny_backbone)
        with open_cache(str(tmp_path / "ref.h5")) as r:
            np.testing.assert_allclose(cache.features(), r.features(r.rows_for(names[:3])), atol=ATOL)
    assert ref.extracted == 8


def _fp(dim=4):
    return {"format_version": 1, "backbone": "x", "feature_dim": dim, "feature_dtype": "float32", "views": 0}


def test_merge_orders_rows_replaces_known_paths_and_combines_failures(tmp_path):
    out = str(tmp_path / "main.h5")
    f = np.arange(40, dtype=np.float32).reshape(10, 4)
    write_cache(out, _fp(), ["b", "old"], f[:2], sizes=[1, 1], mtimes=[1, 1])
    with FeatureCache.create(part_path(out, 0, 2), _fp()) as p0:
        p0.append(["c", "old"], f[2:4], [2, 2], [2, 2])
    with FeatureCache.create(part_path(out, 1, 2), _fp()) as p1:
        p1.append(["a"], f[4:5], [3], [3])
        p1.set_failures({"bad": ("not a recognised image format", 5, 5)})
    with FeatureCache.open(out, "a") as cache:
        merged = merge_parts(cache, leftover_parts(out), order={"a": 0, "old": 1, "c": 2})
        assert merged == 3
        assert cache.paths == ["b", "old", "a", "c"]
        np.testing.assert_array_equal(cache.features(), np.stack([f[0], f[3], f[4], f[2]]))
        assert cache.source_facts()[0].tolist() == [1, 2, 3, 2]
        assert cache.failures() == {"bad": "not a recognised image format"}
    assert leftover_parts(out) == []


def test_leftover_parts_of_a_killed_distributed_run_are_merged_by_the_next_run(tmp_path, tiny_backbone):
    d = tmp_path / "images"
    names = make_images(d, 5)
    ref = tmp_path / "ref.h5"
    extract(d, ref, tiny_backbone)
    out = tmp_path / "out.h5"
    with open_cache(str(ref)) as r:
        feats, (sizes, mtimes), fp = r.features(), r.source_facts(), r.fingerprint
    # As a killed 2-rank run leaves it: the main cache has nothing yet, the rank parts a few rows.
    FeatureCache.create(str(out), fp, overwrite=True).close()
    with FeatureCache.create(part_path(str(out), 1, 2), fp) as part:
        part.append([names[3], names[1]], feats[[3, 1]], sizes[[3, 1]], mtimes[[3, 1]])
    summary = extract(d, out, tiny_backbone)
    assert (summary.extracted, summary.skipped_cached) == (3, 2)
    _assert_same_cache(ref, out, same_order=False)  # merged rows come first; the path -> feature map is the same
    assert leftover_parts(str(out)) == []
