"""The path-list repair, unit by unit, on caches written with synthetic features (no extraction).

``FeatureCache.stored_paths`` / ``damaged_path_rows`` / ``stored_path_checksums`` / ``rewrite_paths`` and
``mirip.extract.run.repair_path_list``: damage is made with h5py alone, expected checksums are
``zlib.crc32`` of the bytes, never the cache's own helpers.
"""

from __future__ import annotations

import zlib

import h5py
import numpy as np
import pytest

from mirip.extract.plan import PathRepair, repair_path_list
from mirip.store.cache import FeatureCache, open_cache, write_cache
from mirip.store.cache_errors import CacheDamaged, CacheError

# Two entries of 4 columns each: a checksum per entry and row.
FP = {"format_version": 3, "backbone": "x", "feature_dim": 8, "feature_dtype": "float32", "views": 0,
      "feature_entries": ["cls@-1", "mean@-1"]}
NAMES = [f"img_{i}.png" for i in range(6)]


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _cache(tmp_path, names=NAMES) -> str:
    path = str(tmp_path / "c.h5")
    feats = np.arange(len(names) * 8, dtype=np.float32).reshape(len(names), 8)
    write_cache(path, FP, names, feats, sizes=[100 + i for i in range(len(names))],
                mtimes=[200 + i for i in range(len(names))])
    return path


def _raw(path) -> dict:
    with h5py.File(path, "r") as h5:
        n = int(h5.attrs["num_rows"])
        out = {k: h5[k][:n] for k in ("features", "source_size", "source_mtime_ns", "checksums", "path_checksums")}
        out["paths"] = [p.decode() for p in h5["paths"][:n]]
    return out


def _poke(path, name, row, value) -> None:
    with h5py.File(path, "r+") as h5:
        h5[name][row] = value


def _same(a: dict, b: dict) -> None:
    assert a["paths"] == b["paths"]
    for k in ("features", "source_size", "source_mtime_ns", "checksums", "path_checksums"):
        np.testing.assert_array_equal(a[k], b[k])


# --- FeatureCache --------------------------------------------------------------------------------
def test_stored_paths_are_the_committed_rows_as_text_even_when_damaged(tmp_path):
    path = _cache(tmp_path)
    _poke(path, "paths", 2, "garbage")
    with h5py.File(path, "r+") as h5:  # a slot past the committed rows is not a row
        h5["paths"].resize((max(h5["paths"].shape[0], 7),))
        h5["paths"][6] = "uncommitted.png"
    with open_cache(path) as cache:
        stored = cache.stored_paths()
        assert stored == NAMES[:2] + ["garbage"] + NAMES[3:]
        assert all(type(p) is str for p in stored)
        with pytest.raises(CacheDamaged):
            cache.paths


class _Unreadable:
    """An h5py file whose path list cannot be read, the way a damaged heap fails."""

    def __init__(self, h5, exc):
        self.h5, self.exc, self.attrs = h5, exc, h5.attrs

    def __getitem__(self, name):
        if name == "paths":
            raise self.exc
        return self.h5[name]

    def __contains__(self, name):
        return name in self.h5


@pytest.mark.parametrize("exc, shown", [(OSError("bad heap index\nsecond line"), "bad heap index"),
                                        (RuntimeError(""), "RuntimeError"), (KeyError("paths"), "'paths'"),
                                        (ValueError("v"), "v"),
                                        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
                                         "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte")])
def test_an_unreadable_path_list_is_one_line_naming_the_file(tmp_path, exc, shown):
    path = _cache(tmp_path)
    with open_cache(path) as cache:
        real = cache.h5
        cache.h5 = _Unreadable(real, exc)
        try:
            with pytest.raises(CacheError) as info:
                cache.stored_paths()
        finally:
            cache.h5 = real
    assert str(info.value) == (
        f"the path list of feature cache {path} is damaged and cannot be read ({shown}), so no row can be matched "
        "to its image; re-extract it (scripts/extract.py --overwrite) or restore it from a backup")


def test_damaged_path_rows_are_the_rows_whose_text_fails_its_crc(tmp_path):
    path = _cache(tmp_path)
    with open_cache(path) as cache:
        assert cache.damaged_path_rows() == []
    _poke(path, "paths", 1, "img_l.png")
    _poke(path, "path_checksums", 4, np.uint32(_crc(NAMES[4]) ^ 0x10))
    with open_cache(path) as cache:
        assert cache.damaged_path_rows() == [1, 4]
        # A list given is checked instead of the stored one (the caller read it already).
        assert cache.damaged_path_rows(list(NAMES)) == [4]
        assert cache.damaged_path_rows(NAMES[:3]) == []
        assert cache.damaged_path_rows(["x"] + NAMES[1:4]) == [0]
    with h5py.File(path, "r+") as h5:  # format 1/2: no checksums, nothing is verified
        del h5["checksums"]
    with open_cache(path) as cache:
        assert cache.damaged_path_rows() == [] and cache.damaged_path_rows(["x"]) == []


def test_stored_path_checksums_are_what_each_path_was_when_written(tmp_path):
    path = _cache(tmp_path)
    _poke(path, "paths", 3, "damaged")
    with open_cache(path) as cache:
        got = cache.stored_path_checksums([3, 0, 5])
        assert got.dtype == np.uint32 and got.tolist() == [_crc(NAMES[3]), _crc(NAMES[0]), _crc(NAMES[5])]
        assert cache.stored_path_checksums(np.array([2])).tolist() == [_crc(NAMES[2])]
        empty = cache.stored_path_checksums([])
        assert empty.dtype == np.uint32 and empty.shape == (0,)
    with h5py.File(path, "r+") as h5:  # a slot past the committed rows is not a row: no stale checksum from it
        h5["path_checksums"].resize((max(h5["path_checksums"].shape[0], 8),))
        h5["path_checksums"][6] = 123
    with open_cache(path) as cache:
        with pytest.raises(IndexError):
            cache.stored_path_checksums([6])


def test_rewrite_paths_gives_rows_a_path_and_marks_only_them_damaged(tmp_path):
    path = _cache(tmp_path)
    before = _raw(path)
    _poke(path, "paths", 1, "zz1")
    _poke(path, "paths", 4, "zz4")
    with FeatureCache.open(path, "a") as cache:
        assert cache.damaged_path_rows() == [1, 4]
        cache.rewrite_paths([4, 1], ["new_4.png", NAMES[1]])
        assert cache.paths == [NAMES[0], NAMES[1], NAMES[2], NAMES[3], "new_4.png", NAMES[5]]  # not a stale copy
        assert cache.index["new_4.png"] == 4
    after = _raw(path)
    others = [0, 2, 3, 5]
    for k in ("features", "source_size", "source_mtime_ns", "checksums", "path_checksums"):
        np.testing.assert_array_equal(after[k][others], before[k][others])
    np.testing.assert_array_equal(after["features"], before["features"])  # features are kept, not trusted
    assert after["path_checksums"][[1, 4]].tolist() == [_crc(NAMES[1]), _crc("new_4.png")]
    assert after["source_size"][[1, 4]].tolist() == [-1, -1] and after["source_mtime_ns"][[1, 4]].tolist() == [-1, -1]
    for r in (1, 4):
        for e, (a, b) in enumerate(((0, 4), (4, 8))):  # every entry's checksum fails, by a flipped low bit
            crc = zlib.crc32(np.ascontiguousarray(after["features"][r, a:b]).tobytes())
            assert int(after["checksums"][r, e]) == crc ^ 1, (r, e)
    with open_cache(path) as cache:
        assert cache.damaged_path_rows() == [] and cache.damaged_rows() == [1, 4]
        with pytest.raises(CacheDamaged) as info:
            cache.features()
        assert info.value.rows == [1, 4]
        assert cache.source_facts()[0].tolist() == [100, -1, 102, 103, -1, 105]


def test_rewrite_paths_refuses_mismatched_repeated_or_out_of_range_input_and_writes_nothing(tmp_path):
    path = _cache(tmp_path)
    before = _raw(path)
    with FeatureCache.open(path, "a") as cache:
        for rows, paths in (([1, 2], ["a"]), ([1], ["a", "b"]), ([1, 2], ["a", "a"]), ([1, 1], ["a", "b"])):
            with pytest.raises(ValueError) as info:
                cache.rewrite_paths(rows, paths)
            assert str(info.value) == "rewrite_paths needs distinct rows and distinct paths, one path per row"
        for rows in ([6], [-1], [0, 6], [-1, 2]):
            with pytest.raises(IndexError) as info:
                cache.rewrite_paths(rows, [f"p{i}" for i in range(len(rows))])
            assert str(info.value) == "row out of range for cache with 6 rows"
        cache.rewrite_paths([], [])
        cache.rewrite_paths([0, 5], [NAMES[0], NAMES[5]])  # the edges are in range
    after = _raw(path)
    assert after["source_size"].tolist() == [-1, 101, 102, 103, 104, -1]
    after["source_size"][[0, 5]] = before["source_size"][[0, 5]]
    after["source_mtime_ns"][[0, 5]] = before["source_mtime_ns"][[0, 5]]
    after["checksums"][[0, 5]] ^= np.uint32(1)
    _same(after, before)


# --- repair_path_list ----------------------------------------------------------------------------
def test_nothing_damaged_or_no_checksums_repairs_nothing(tmp_path):
    path = _cache(tmp_path)
    before = _raw(path)
    with FeatureCache.open(path, "a") as cache:
        assert repair_path_list(cache, NAMES + ["extra.png"]) == []
    _same(_raw(path), before)
    _poke(path, "paths", 2, "zz")
    with h5py.File(path, "r+") as h5:
        del h5["checksums"]
    with FeatureCache.open(path, "a") as cache:
        assert repair_path_list(cache, NAMES) == []
        assert cache.stored_paths()[2] == "zz"


def test_each_damaged_row_gets_its_own_image_back_by_checksum_then_text_then_reuse(tmp_path):
    path = _cache(tmp_path)
    before = _raw(path)
    _poke(path, "paths", 1, "img_l.png")  # text damaged: its stored checksum names img_1.png
    _poke(path, "path_checksums", 3, np.uint32(_crc(NAMES[3]) ^ 0xFF))  # checksum damaged: the text names it
    _poke(path, "paths", 5, "?")  # both damaged: neither tells
    _poke(path, "path_checksums", 5, np.uint32(7))
    listed = ["new_a.png", NAMES[5], "new_b.png"] + NAMES[::-1] + [NAMES[1]]  # order and repeats of a listing
    with FeatureCache.open(path, "a") as cache:
        repairs = repair_path_list(cache, listed, known_failed=["new_a.png"])
    # Row 5 takes the first listed image without a good row that did not fail before.
    assert repairs == [PathRepair(1, "img_l.png", NAMES[1], "checksum"), PathRepair(3, NAMES[3], NAMES[3], "text"),
                       PathRepair(5, "?", NAMES[5], "reused")]
    after = _raw(path)
    assert after["paths"] == NAMES
    assert after["path_checksums"].tolist() == [_crc(n) for n in NAMES]
    assert after["source_size"].tolist() == [100, -1, 102, -1, 104, -1]
    for k in ("features",):
        np.testing.assert_array_equal(after[k], before[k])
    np.testing.assert_array_equal(after["checksums"][[0, 2, 4]], before["checksums"][[0, 2, 4]])
    assert (after["checksums"][[1, 3, 5]] == (before["checksums"][[1, 3, 5]] ^ np.uint32(1))).all()


def test_a_row_neither_tells_takes_an_image_without_a_row_never_a_failed_or_held_one(tmp_path):
    path = _cache(tmp_path)
    _poke(path, "paths", 2, "??")
    _poke(path, "path_checksums", 2, np.uint32(_crc("??") ^ 1))
    _poke(path, "paths", 4, "!!")
    _poke(path, "path_checksums", 4, np.uint32(_crc("!!") ^ 1))
    with FeatureCache.open(path, "a") as cache:
        repairs = repair_path_list(cache, NAMES[:2] + ["bad.png", "x.png", NAMES[3], "y.png", "z.png"],
                                   known_failed=["bad.png", "z.png"])
    assert [(r.row, r.stored, r.path, r.how) for r in repairs] == [(2, "??", "x.png", "reused"),
                                                                 (4, "!!", "y.png", "reused")]
    assert _raw(path)["paths"] == [NAMES[0], NAMES[1], "x.png", NAMES[3], "y.png", NAMES[5]]


def test_an_image_named_by_one_row_is_not_given_to_another(tmp_path):
    path = _cache(tmp_path)
    # Row 1's text was damaged (its checksum names img_1.png); row 4's checksum was damaged into img_1.png's,
    # and its text says img_1.png too: img_1.png goes to the first, row 4 keeps its own text, img_4.png.
    _poke(path, "paths", 1, "img_I.png")
    _poke(path, "path_checksums", 4, np.uint32(_crc(NAMES[1])))
    with FeatureCache.open(path, "a") as cache:
        assert cache.damaged_path_rows() == [1, 4]
        repairs = repair_path_list(cache, NAMES)
    assert [(r.row, r.path, r.how) for r in repairs] == [(1, NAMES[1], "checksum"), (4, NAMES[4], "text")]
    # A damaged text that is another row's image is never taken by the text rule.
    path2 = _cache(tmp_path / "two")
    _poke(path2, "paths", 2, NAMES[1])  # now reads img_1.png, which row 1 holds (good)
    with FeatureCache.open(path2, "a") as cache:
        repairs = repair_path_list(cache, NAMES)
    assert [(r.row, r.path, r.how) for r in repairs] == [(2, NAMES[2], "checksum")]
    # Two damaged rows whose texts both read the same free image: the first takes it, the second is reused.
    path3 = _cache(tmp_path / "three")
    for r in (2, 3):
        _poke(path3, "paths", r, "free.png")
        _poke(path3, "path_checksums", r, np.uint32(r))
    with FeatureCache.open(path3, "a") as cache:
        repairs = repair_path_list(cache, NAMES + ["free.png", "spare.png"])
    assert [(r.row, r.path, r.how) for r in repairs] == [(2, "free.png", "text"), (3, NAMES[2], "reused")]


# A known CRC-32 collision: two different listed names with one checksum.
TWINS = ("plumless", "buckeroo")


def test_a_checksum_two_listed_images_share_names_neither(tmp_path):
    a, b = TWINS
    assert a != b and _crc(a) == _crc(b)
    names = NAMES[:3] + [a]
    path = _cache(tmp_path, names)
    _poke(path, "paths", 3, "damaged")  # its stored checksum is a's, and b's too
    with FeatureCache.open(path, "a") as cache:
        repairs = repair_path_list(cache, NAMES[:3] + [b, a])
    assert [(r.row, r.path, r.how) for r in repairs] == [(3, b, "reused")]  # first free one, not by checksum


def test_rows_that_cannot_be_told_are_refused_naming_them_and_nothing_is_written(tmp_path):
    path = _cache(tmp_path)
    _poke(path, "paths", 4, "lost")
    _poke(path, "path_checksums", 4, np.uint32(1))
    before = _raw(path)
    for listed, failed in ((NAMES[:4] + NAMES[5:] + NAMES[:2], ()), (NAMES[:4] + ["gone.png"], ["gone.png"])):
        with FeatureCache.open(path, "a") as cache:
            with pytest.raises(CacheError) as info:
                repair_path_list(cache, listed, known_failed=failed)
        n = len(dict.fromkeys(listed))
        assert str(info.value) == (
            f"the path list of feature cache {path} is damaged at row(s) 4 ('lost'), and which image these rows "
            f"belong to cannot be told: none of the {n} images listed in this run matches their stored checksum, "
            "and every listed image already has a row to keep. Nothing was changed. Rerun with --metadata / "
            "--image-dir listing every image this cache was made from (the rows are then given their paths back "
            "and re-extracted), or --overwrite to re-extract the whole cache, or restore it from a backup")
        _same(_raw(path), before)


def test_more_than_ten_rows_that_cannot_be_told_are_counted(tmp_path):
    names = [f"n{i:02d}.png" for i in range(13)]
    path = _cache(tmp_path, names)
    for r in range(12):
        _poke(path, "paths", r, f"?{r}")
        _poke(path, "path_checksums", r, np.uint32(r))
    with FeatureCache.open(path, "a") as cache:
        with pytest.raises(CacheError) as info:
            repair_path_list(cache, [names[12], "spare.png"])
    shown = ", ".join(f"{r} ('?{r}')" for r in range(1, 11))
    assert f"damaged at row(s) {shown} ... (11 in all), and which" in str(info.value)
    assert "none of the 2 images listed" in str(info.value)
    with FeatureCache.open(path, "a") as cache:  # exactly ten: no count
        with pytest.raises(CacheError) as info:
            repair_path_list(cache, [names[12], "s1.png", "s2.png"])
    shown = ", ".join(f"{r} ('?{r}')" for r in range(2, 12))
    assert f"damaged at row(s) {shown}, and which" in str(info.value)


def test_path_repairs_describe_themselves():
    assert PathRepair(3, "img_0O3.png", "img_003.png", "checksum").describe() == (
        "row 3 ('img_0O3.png') -> img_003.png (named by its stored checksum)")
    assert PathRepair(0, "a.png", "a.png", "text").describe() == "row 0 ('a.png') -> a.png (named by the stored text)"
    assert PathRepair(12, "?", "b.png", "reused").describe() == (
        "row 12 ('?') -> b.png (its own image unknown, reused for an image without a row)")
