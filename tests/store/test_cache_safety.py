"""Data safety of the feature cache: a full disk, silent corruption, two processes on one cache, leftovers.

Each test states the failure it guards against; each was seen to fail with its fix taken out.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from _extract_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from _extract_helpers import SIZE, extract, make_images, reference_features, write_metadata
from mirip.common.atomic import temp_prefix, write_atomic, write_atomic_with
from mirip.store.cache import FeatureCache, open_cache, write_cache
from mirip.store.cache_errors import CacheDamaged, CacheError, CacheInUse

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5


def _script(name):
    module = importlib.import_module(f"mirip.cli.{name}")
    return module


extract_script, train_script = _script("extract"), _script("train")


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("HDF5_USE_FILE_LOCKING", None)  # never disabled: the lock is what item 3 relies on
    return env


def _args(image_dir, output, backbone, batch_size: int = 2) -> list:
    return ["--image-dir", str(image_dir), "--output", str(output), "--backbone", backbone, "--image-size", str(SIZE),
            "--batch-size", str(batch_size), "--num-workers", "0", "--device", "cpu", "--no-progress"]


def _one_line_error(text: str) -> str:
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith("Loading weights")]
    assert "Traceback" not in text and "HDF5-DIAG" not in text, text
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 1. a full disk ------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs mounted inside the test (root only); skipped with the reason where it cannot be made."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small filesystem here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(directory, leave: int) -> Path:
    """Fill the filesystem of ``directory`` until ``leave`` bytes stay free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    filler = Path(directory) / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\1" * max(0, free - leave))
    return filler


def test_a_full_disk_stops_the_run_with_one_message_keeps_every_committed_row_and_the_rerun_continues(
        tiny_backbone, tmp_path, small_fs):
    images = tmp_path / "images"
    names = make_images(images, 40)
    output = small_fs / "cache.h5"
    # With 8 augmented views per image, a new 32 KiB chunk of views starts every 32 rows: the disk fills there.
    args = lambda: [sys.executable, str(ROOT / "scripts" / "extract.py"), *_args(images, output, tiny_backbone),  # noqa: E731
                    "--views", "8"]
    # A first run of 4 images (the cache exists, its first chunks are allocated), then a disk with almost no room.
    write_metadata(tmp_path / "first.csv", names[:4])
    extract(images, str(output), tiny_backbone, views=8, batch_size=2, metadata=str(tmp_path / "first.csv"))
    with open_cache(str(output), "a") as cache:
        reserve = cache._reserve_bytes()
    filler = _fill(small_fs, reserve + 24 * 1024)

    run = subprocess.run(args(), env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, (run.returncode, run.stderr)  # not 139 (a segfault), not a traceback
    line = _one_line_error(run.stderr)
    assert "No space left on device" in line and "rows are committed" in line and "rerun the same command" in line
    assert not list(small_fs.glob("*.tmp-*")), "the reserve file is removed"

    ref = reference_features(tiny_backbone, [images / n for n in names])
    with open_cache(str(output)) as cache:
        committed = cache.num_rows
        assert f"{committed} rows are committed" in line
        assert 4 <= committed < len(names), "the disk filled part-way"
        assert cache.damaged_rows() == []
        rows = [names.index(p) for p in cache.paths]
        np.testing.assert_allclose(cache.features(), ref[rows], atol=ATOL)  # no zero rows, no stale rows

    filler.unlink()  # space freed: the same command continues
    summary = extract(images, str(output), tiny_backbone, views=8, batch_size=2)
    assert summary.skipped_cached == committed and summary.extracted == len(names) - committed
    with open_cache(str(output)) as cache:
        assert cache.num_rows == len(names) and cache.damaged_rows() == []
        rows = [names.index(p) for p in cache.paths]
        np.testing.assert_allclose(cache.features(), ref[rows], atol=ATOL)


class _Full:
    """Makes h5py's flush fail as a full disk does, from the ``after``-th call on."""

    def __init__(self, monkeypatch, after: int):
        self.calls, self.after = 0, after
        real = h5py.File.flush

        def flush(h5):
            self.calls += 1
            if self.calls >= self.after:
                raise RuntimeError("Unable to synchronously flush file (file write failed: errno = 28, error "
                                   "message = 'No space left on device')")
            return real(h5)

        monkeypatch.setattr(h5py.File, "flush", flush)


def test_a_write_error_from_h5py_stops_extract_with_one_line_and_a_rerun_continues(
        tiny_backbone, tmp_path, monkeypatch, capsys):
    """The same logic as above without a mount: the error is injected where h5py reports it."""
    images = tmp_path / "images"
    names = make_images(images, 12)
    output = tmp_path / "cache.h5"
    # Two flushes per committed batch: the 4th batch's data flush fails (batches of 2: 6 rows committed).
    full = _Full(monkeypatch, after=7)
    rc = extract_script.main(_args(images, output, tiny_backbone))
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and "No space left on device" in line and "6 rows are committed" in line, line
    monkeypatch.undo()
    assert full.calls >= 7
    assert not list(tmp_path.glob("*.tmp-*"))
    with open_cache(str(output)) as cache:
        assert cache.num_rows == 6 and cache.damaged_rows() == []
    assert extract_script.main(_args(images, output, tiny_backbone)) == 0
    assert "skipped, cached:      6" in capsys.readouterr().out
    ref = reference_features(tiny_backbone, [images / n for n in names])
    with open_cache(str(output)) as cache:
        np.testing.assert_allclose(cache.features(), ref[[names.index(p) for p in cache.paths]], atol=ATOL)


def test_no_row_is_committed_before_its_features_are_fsynced(tmp_path, monkeypatch):
    """The row counter moves only after the rows' bytes are fsync'ed: an fsync that fails leaves it where it was."""
    fp = {"format_version": 3, "backbone": "x", "feature_dim": 4, "feature_dtype": "float32", "views": 0}
    path = str(tmp_path / "c.h5")
    cache = FeatureCache.create(path, fp)
    cache.append(["a.png"], np.ones((1, 4), np.float32), [1], [1])
    import mirip.store.cache as cache_module

    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cache_module.os, "fsync", failing_fsync)
    with pytest.raises(CacheError, match="1 rows are committed"):
        cache.append(["b.png"], np.full((1, 4), 2, np.float32), [1], [1])
    monkeypatch.setattr(cache_module.os, "fsync", real_fsync)
    assert calls, "appending fsyncs"
    with open_cache(path) as reopened:
        assert reopened.num_rows == 1 and reopened.paths == ["a.png"]


# --- 2. silent corruption ------------------------------------------------------------------------
def _flip(path, offset: int, count: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in data))


def _row_offset(path, row: int, entry_width: int) -> int:
    """File offset of ``row``'s first entry in the features dataset (its chunk, then the row within it)."""
    with h5py.File(path, "r") as h5:
        ds = h5["features"]
        rows_per_chunk = ds.chunks[0]
        info = ds.id.get_chunk_info_by_coord((row // rows_per_chunk * rows_per_chunk, 0))
        return info.byte_offset + (row % rows_per_chunk) * ds.chunks[1] * ds.dtype.itemsize


def test_flipped_feature_bytes_are_refused_naming_the_rows_and_extract_repairs_them(tiny_backbone, tmp_path, capsys):
    images = tmp_path / "images"
    names = make_images(images, 10)
    write_metadata(tmp_path / "meta.csv", names)
    output = str(tmp_path / "cache.h5")
    extract(images, output, tiny_backbone)
    with open_cache(output) as cache:
        good = cache.features()
        width = cache.dim
        bad_rows = [cache.row_of("img_003.png"), cache.row_of("img_007.png")]
    for row in bad_rows:
        _flip(output, _row_offset(output, row, width) + 8)

    with open_cache(output) as cache:
        with pytest.raises(CacheDamaged) as info:
            cache.features()
        assert sorted(info.value.rows) == sorted(bad_rows)
        assert "img_003.png" in str(info.value) and "img_007.png" in str(info.value)
        assert cache.damaged_rows() == sorted(bad_rows)
        np.testing.assert_array_equal(cache.features([0, 1]), good[[0, 1]])  # healthy rows still read
        with pytest.raises(CacheDamaged):
            cache.features([bad_rows[0]])
        with pytest.raises(CacheDamaged):
            cache.load_features(spec=cache.default_spec)
    # Training refuses in one line, naming the rows.
    rc = train_script.main(["--features", output, "--metadata", str(tmp_path / "meta.csv"),
                            "--output-dir", str(tmp_path / "run"), "--max-epochs", "1", "--device", "cpu",
                            "--no-progress"])
    line = _one_line_error(capsys.readouterr().err)
    assert rc != 0 and "damaged" in line and "img_003.png" in line

    # extract repairs them instead of reporting them cached.
    summary = extract(images, output, tiny_backbone)
    assert summary.repaired == 2 and summary.extracted == 2 and summary.skipped_cached == len(names) - 2
    assert "2 damaged row(s) re-extracted" in summary.to_text()
    with open_cache(output) as cache:
        assert cache.damaged_rows() == []
        np.testing.assert_allclose(cache.features(), good, atol=ATOL)


def _object_header_offsets(path) -> list:
    data = Path(path).read_bytes()
    found, start = [], 0
    while (i := data.find(b"OHDR", start)) >= 0:
        found.append(i)
        start = i + 1
    return found


def _read_everything(path) -> None:
    with open_cache(path) as cache:
        cache.fingerprint, cache.paths, cache.features(), cache.failures(), cache.source_facts()


def test_a_damaged_object_header_or_path_list_gives_one_line_naming_the_file(tmp_path, capsys):
    path = str(tmp_path / "c.h5")
    fp = {"format_version": 3, "backbone": "x", "feature_dim": 4, "feature_dtype": "float32", "views": 0}
    names = [f"img_{i:03d}.png" for i in range(20)]
    write_cache(path, fp, names, np.arange(80, dtype=np.float32).reshape(20, 4))
    headers = _object_header_offsets(path)
    assert len(headers) >= 5  # root group, features, paths, ... (HDF5's checksummed v2 object headers)
    for offset in headers:
        copy = str(tmp_path / f"damaged-{offset}.h5")
        shutil.copy(path, copy)
        _flip(copy, offset + 12, 8)
        with pytest.raises(CacheError) as info:
            _read_everything(copy)
        message = str(info.value)
        assert copy in message and "\n" not in message, message
    # A changed character in the path list: the row is named; the heap's own header broken: one line.
    data = Path(path).read_bytes()
    copy = tmp_path / "renamed.h5"
    copy.write_bytes(data.replace(b"img_011.png", b"img_0l1.png"))
    with pytest.raises(CacheDamaged, match=r"path list .* damaged at row\(s\) 11"):
        _read_everything(str(copy))
    gcol = data.find(b"GCOL")
    copy = tmp_path / "heap.h5"
    copy.write_bytes(data[:gcol] + b"XXXX" + data[gcol + 4:])
    with pytest.raises(CacheError, match="damaged") as info:
        _read_everything(str(copy))
    assert str(copy) in str(info.value)
    # ... and the scripts print that one line, not a traceback.
    rc = train_script.main(["--features", str(copy), "--metadata", str(write_metadata(tmp_path / "m.csv", names)),
                            "--output-dir", str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    assert rc != 0 and str(copy) in _one_line_error(capsys.readouterr().err)


def _raw(path) -> dict:
    """Every dataset of a cache file, read with h5py alone."""
    with h5py.File(path, "r") as h5:
        out = {name: h5[name][()] for name in ("features", "paths", "source_size", "source_mtime_ns", "checksums",
                                                "path_checksums")}
    out["paths"] = [p.decode() for p in out["paths"]]
    return out


def _raw_write(path, name, row, value) -> None:
    with h5py.File(path, "r+") as h5:
        h5[name][row] = value


def test_a_damaged_path_entry_gets_its_path_back_and_only_its_row_is_re_extracted(tiny_backbone, tmp_path, capsys):
    images = tmp_path / "images"
    names = make_images(images, 10)
    meta = write_metadata(tmp_path / "meta.csv", names)
    output = str(tmp_path / "cache.h5")
    args = _args(images, output, tiny_backbone, batch_size=4) + ["--metadata", meta]
    assert extract_script.main(args) == 0
    capsys.readouterr()
    before = _raw(output)
    row = before["paths"].index("img_003.png")
    _raw_write(output, "paths", row, "img_0O3.png")  # one character changed; its checksum left as it was
    with pytest.raises(CacheDamaged, match=rf"damaged at row\(s\) {row}\b.*rerun scripts/extract.py"):
        open_cache(output).paths

    assert extract_script.main(args) == 0
    text = capsys.readouterr().out
    assert f"row {row} ('img_0O3.png') -> img_003.png (named by its stored checksum)" in text, text
    assert "path list: 1 damaged entry" in text and "extracted:            1 (" in text, text
    after = _raw(output)
    others = [r for r in range(len(names)) if r != row]
    assert after["paths"] == before["paths"]
    for name in ("features", "checksums", "source_size", "source_mtime_ns", "path_checksums"):
        assert after[name].shape == before[name].shape
        np.testing.assert_array_equal(after[name][others], before[name][others])  # bit-identical
    # Only that row was re-extracted: it was marked stale (facts -1) and written again by the re-extraction.
    assert (after["source_size"][row], after["source_mtime_ns"][row]) == (before["source_size"][row],
                                                                          before["source_mtime_ns"][row])
    np.testing.assert_allclose(after["features"][row], before["features"][row], atol=ATOL)
    with open_cache(output) as cache:
        assert cache.damaged_rows() == [] and cache.paths == before["paths"]
        np.testing.assert_allclose(cache.features(), before["features"], atol=ATOL)


def test_path_repairs_when_the_checksum_or_both_are_damaged_and_when_the_row_cannot_be_told(
        tiny_backbone, tmp_path, capsys):
    images = tmp_path / "images"
    names = make_images(images, 8)
    output = str(tmp_path / "cache.h5")
    extract(images, output, tiny_backbone)
    before = _raw(output)
    # The checksum is the damaged part: the stored text names the image.
    _raw_write(output, "path_checksums", 2, np.uint32(before["path_checksums"][2] ^ 0xFF))
    # Text and checksum both damaged: the row's image is the one listed image left without a row.
    _raw_write(output, "paths", 5, "garbage")
    _raw_write(output, "path_checksums", 5, np.uint32(12345))
    with open_cache(output) as cache:
        assert cache.damaged_path_rows() == [2, 5]
    summary = extract(images, output, tiny_backbone)
    assert [(r.row, r.path, r.how) for r in summary.paths_repaired] == [
        (2, before["paths"][2], "text"), (5, before["paths"][5], "reused")]
    assert summary.extracted == 2 and summary.skipped_cached == 6
    with open_cache(output) as cache:
        assert cache.damaged_rows() == [] and cache.paths == before["paths"]
        np.testing.assert_allclose(cache.features(), before["features"], atol=ATOL)

    # Between giving a row its path back and re-extracting it, the row reads as damaged, never as valid.
    with FeatureCache.open(output, "a") as cache:
        cache.rewrite_paths([4], [before["paths"][4]])
    with open_cache(output) as cache:
        assert cache.paths == before["paths"] and cache.source_facts()[0][4] == -1
        with pytest.raises(CacheDamaged) as info:
            cache.features()
        assert info.value.rows == [4]
    assert extract(images, output, tiny_backbone).repaired == 1

    # A damaged row whose image is not listed in this run, and no listed image without a row: said, not guessed.
    _raw_write(output, "paths", 7, "zzz")
    damaged = _raw(output)
    listed = [n for n in names if n != before["paths"][7]]
    rc = extract_script.main(_args(images, output, tiny_backbone)
                             + ["--metadata", write_metadata(tmp_path / "fewer.csv", listed)])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and "row(s) 7 ('zzz')" in line and "cannot be told" in line and "--overwrite" in line, line
    assert "Nothing was changed" in line
    after = _raw(output)
    for name, value in damaged.items():
        np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(value))


# --- 3. two processes on one cache ---------------------------------------------------------------
def test_a_cache_held_by_another_process_is_named_in_use_and_never_unlocked(tiny_backbone, tmp_path, capsys):
    images = tmp_path / "images"
    make_images(images, 4)
    output = tmp_path / "cache.h5"
    extract(images, str(output), tiny_backbone)
    with open_cache(str(output)) as cache:
        before = (cache.paths, cache.features())
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\n"
                               f"f = h5py.File({str(output)!r}, 'a')\nprint('ready', flush=True)\ntime.sleep(60)"],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert os.environ.get("HDF5_USE_FILE_LOCKING", "TRUE").upper() != "FALSE"
        rc = extract_script.main(_args(images, output, tiny_backbone))
        line = _one_line_error(capsys.readouterr().err)
        assert rc == 2 and "in use by another process" in line and "--output" in line, line
        with pytest.raises(CacheInUse):
            open_cache(str(output))
        with pytest.raises(CacheInUse):  # --overwrite does not pull the file from under the other process
            FeatureCache.create(str(output), {"format_version": 3, "feature_dim": 4}, overwrite=True)
    finally:
        holder.kill()
        holder.wait()
    with open_cache(str(output)) as cache:
        assert cache.paths == before[0] and np.array_equal(cache.features(), before[1])
    assert extract_script.main(_args(images, output, tiny_backbone)) == 0


# --- 4. leftovers of interrupted atomic writes ---------------------------------------------------
def test_stale_temp_files_are_removed_and_a_live_writers_are_kept(tiny_backbone, tmp_path):
    images = tmp_path / "images"
    make_images(images, 3)
    output = tmp_path / "cache.h5"
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = temp_prefix("x").split(".tmp-")[1].split("-")[0]
        stale = [tmp_path / f"cache.h5.tmp-{host}-{dead}-h5", tmp_path / f"cache.h5.tmp-{host}-{dead}-reserve",
                 tmp_path / f"cache.h5.tmp-{dead}", tmp_path / f".cache.h5.json.tmp-{host}-{dead}-abc123"]
        kept = [tmp_path / f"cache.h5.tmp-{host}-{live.pid}-h5", tmp_path / "cache.h5.tmp-otherhost-1-h5",
                tmp_path / "notes.tmp-x"]
        for p in stale + kept:
            p.write_bytes(b"partial")
        extract(images, str(output), tiny_backbone)
        assert [p.name for p in stale if p.exists()] == []
        assert [p.name for p in kept if not p.exists()] == []
        # A checkpoint's leftovers go the same way on its next write.
        ckpt = tmp_path / "best.pt"
        leftover = tmp_path / f".best.pt.tmp-{host}-{dead}-zz9"
        leftover.write_bytes(b"half a checkpoint")
        write_atomic(ckpt, "new")
        assert not leftover.exists() and ckpt.read_text() == "new"
    finally:
        live.kill()
        live.wait()


def test_a_failed_write_removes_its_own_temp_file(tmp_path, monkeypatch):
    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        write_atomic_with(tmp_path / "best.pt", boom)
    assert list(tmp_path.iterdir()) == []

    def build_fails(tmp, fingerprint):
        Path(tmp).write_bytes(b"half a cache")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FeatureCache, "_build", staticmethod(build_fails))
    with pytest.raises(OSError):
        FeatureCache.create(str(tmp_path / "cache.h5"), {"format_version": 3, "feature_dim": 4})
    assert list(tmp_path.iterdir()) == []


def test_appending_over_path_slots_a_killed_run_left_dangling_works(tmp_path):
    """A kill mid-flush can leave the path chunk on disk but not the heap holding its strings; the next append
    must still work (HDF5 fails to overwrite such slots: "bad heap index")."""
    fp = {"format_version": 3, "backbone": "x", "feature_dim": 4, "feature_dtype": "float32", "views": 0}
    path, ahead = tmp_path / "c.h5", tmp_path / "ahead.h5"
    write_cache(str(path), fp, [f"img_{i}.png" for i in range(5)], np.zeros((5, 4), np.float32))
    shutil.copy(path, ahead)
    with open_cache(str(ahead), "a") as cache:
        cache.append([f"img_{i}.png" for i in range(5, 10)], np.ones((5, 4), np.float32), [0] * 5, [0] * 5)
    with h5py.File(ahead, "r") as h5:
        mask, raw = h5["paths"].id.read_direct_chunk((0,))
    with h5py.File(path, "a") as h5:  # the chunk reached the disk, the strings it points to did not
        h5["paths"].id.write_direct_chunk((0,), raw, mask)
    with open_cache(str(path), "a") as cache:
        assert cache.paths == [f"img_{i}.png" for i in range(5)]
        cache.append(["new_a.png", "new_b.png"], np.full((2, 4), 2, np.float32), [1, 1], [1, 1])
    with open_cache(str(path)) as cache:
        assert cache.paths == [f"img_{i}.png" for i in range(5)] + ["new_a.png", "new_b.png"]
        assert cache.damaged_rows() == [] and cache.features()[5:].tolist() == [[2.0] * 4] * 2


def test_checksums_are_per_entry_so_reading_some_entries_checks_just_those(tmp_path):
    fp = {"format_version": 3, "backbone": "x", "feature_dim": 8, "feature_dtype": "float16", "views": 0,
          "feature_entries": ["cls@-1", "mean@-1"]}  # no feature_entry_dims: two entries of 4 columns
    path = str(tmp_path / "c.h5")
    feats = np.arange(48, dtype=np.float32).reshape(6, 8)
    write_cache(path, fp, [f"img_{i}.png" for i in range(6)], feats)
    with h5py.File(path, "r+") as h5:  # a changed value, checksums untouched: what a flipped bit does
        h5["features"][3, 5] = 99
    with open_cache(path) as cache:
        np.testing.assert_array_equal(cache.features(spec="cls@-1"), feats[:, :4])
        with pytest.raises(CacheDamaged, match=r"3 \(img_3.png\)") as info:
            cache.features(spec="mean@-1")
        assert info.value.rows == [3]
        with pytest.raises(CacheDamaged):
            cache.features([5, 3, 0])
        assert cache.damaged_rows() == [3]
