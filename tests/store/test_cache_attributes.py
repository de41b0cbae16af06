"""FeatureCache.set_attribute and guarded_write: a failed write is one CacheWriteError with the rows intact."""

from __future__ import annotations

import errno

import h5py
import numpy as np
import pytest

from mirip.store.cache import FeatureCache, open_cache
from mirip.store.cache_errors import CacheWriteError


FP = {"format_version": 3, "backbone": "x", "feature_dim": 4, "feature_dtype": "float32", "views": 0}


def test_set_attribute_is_stored_and_a_failed_one_is_one_write_error_with_the_rows_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "c.h5")
    cache = FeatureCache.create(path, FP)
    cache.append(["a.png", "b.png"], np.arange(8, dtype=np.float32).reshape(2, 4), [1, 2], [3, 4])
    cache.set_attribute("extract_config", '{"batch_size": 2}')
    cache.close()
    with h5py.File(path, "r") as h5:  # read back with h5py alone, not through the cache
        assert h5.attrs["extract_config"] == '{"batch_size": 2}'

    cache = open_cache(path, "a")

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.AttributeManager, "__setitem__", full)
    with pytest.raises(CacheWriteError, match="No space left on device") as info:
        cache.set_attribute("extract_config", "{}")
    monkeypatch.undo()
    assert info.value.committed == 2 and "2 rows are committed" in str(info.value)
    assert not cache.h5.id.valid, "a failed write closes the file"
    assert not list(tmp_path.glob("*.tmp-*")), "and removes the reserve"
    with h5py.File(path, "r") as h5:
        assert int(h5.attrs["num_rows"]) == 2 and h5.attrs["extract_config"] == '{"batch_size": 2}'
        np.testing.assert_array_equal(h5["features"][:], np.arange(8, dtype=np.float32).reshape(2, 4))


def test_guarded_write_turns_an_os_error_into_one_write_error(tmp_path):
    cache = FeatureCache.create(str(tmp_path / "c.h5"), FP)

    def fail():
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(CacheWriteError, match="Input/output error. 0 rows are committed"):
        cache.guarded_write(fail)
    assert not cache.h5.id.valid
