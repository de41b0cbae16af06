"""The extraction benchmark runs end to end on a tiny backbone (a smoke test; the figures come from real runs)."""

from __future__ import annotations

import argparse

from _extract_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from mirip.bench import extraction, memory


def test_benchmark_measures_pipeline_and_bare_backbone(tiny_backbone, tmp_path):
    parser = argparse.ArgumentParser()
    extraction.add_arguments(parser)
    args = parser.parse_args(["--extract-images", "12", "--extract-batch-size", "4", "--extract-bare-batches", "2",
                              "--extract-num-workers", "0", "--extract-source-size", "64",
                              "--extract-bank-layers", "-2", "-1"])
    args.backbone, args.random_init, args.image_size, args.device, args.quick = tiny_backbone, False, 28, "cpu", True
    result = extraction.run(args)
    assert result["pipeline"]["images"] == 12 and result["pipeline_small"]["images"] == 4
    assert result["bare_images_per_s"] > 0 and result["pipeline"]["images_per_s"] > 0
    assert result["ratio"] == result["pipeline"]["images_per_s"] / result["bare_images_per_s"]
    assert result["pipeline"]["peak_rss_total_mb"] > 0 and "peak_pss_total_mb" in result["pipeline"]
    text = extraction.to_markdown(result)
    assert "ratio pipeline / bare" in text and "peak RSS" in text and "peak PSS" in text
    bank = result["bank"]  # the bank runs in the same rounds: 2 layers x cls, mean, std of the 32-d tiny model
    assert len(bank["entries"]) == 6 and bank["feature_dim"] == 6 * 32 and bank["pipeline"]["images"] == 12
    assert bank["time_ratio"] > 0 and len(bank["time_ratio_runs"]) == extraction.DEFAULTS["rounds"][1]  # --quick rounds
    assert bank["bytes_per_image"] > bank["single_bytes_per_image"] > 0
    assert "time bank / single vector" in text and "cache bytes per image" in text


def test_standalone_entry_point_has_help(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        extraction.main(["--help"])
    assert exit_info.value.code == 0
    assert "--extract-images" in capsys.readouterr().out


def test_pss_counts_pages_shared_with_a_forked_worker_once(tmp_path):
    """RSS summed over a parent and its forked child counts the pages they share twice; PSS splits them."""
    import os
    import signal

    import numpy as np
    import pytest

    if not os.path.exists(f"/proc/{os.getpid()}/smaps_rollup") or not hasattr(os, "fork"):
        pytest.skip("needs Linux /proc/<pid>/smaps_rollup and fork")
    shared = np.ones(64 * 2**20 // 8)  # 64 MiB, touched: resident in the parent before the fork
    pid = os.fork()
    if pid == 0:  # the child only keeps the inherited pages mapped
        signal.pause()
        os._exit(0)
    try:
        import time

        time.sleep(0.2)
        me = os.getpid()
        rss = memory._rss_bytes(me) + memory._rss_bytes(pid)
        pss = memory._pss_bytes(me) + memory._pss_bytes(pid)
        assert pid in memory._children(me)
        assert 0 < pss < rss - 48 * 2**20, (rss / 2**20, pss / 2**20)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    del shared
