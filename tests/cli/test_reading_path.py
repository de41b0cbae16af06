"""How many library files a maintainer must open to follow one score from ``scripts/score.py`` to the CSV.

A file counts when a Python function defined in it runs while ``mirip.cli.score.main`` scores a folder: that is
the code a reader steps through. A module's import-time body (module and class statements) does not count, since
reading a call path never needs it; nor do ``mirip/cli/`` files, the command line itself. Every module is
imported before measuring, so lazy imports inside ``main`` cannot blur the two. Threads started during the call
(the image decoders) are followed too.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading

import numpy as np
import pytest

from _inference_helpers import make_tiered_images, torch_threads

import mirip
from mirip.store.checkpoint import load_checkpoint_file, save_checkpoint_file
from mirip.training.calibration_fit import fit_ordinal, make_score_reference

score = importlib.import_module("mirip.cli.score")

LIBRARY = os.path.dirname(os.path.abspath(mirip.__file__))
CLI = os.path.join(LIBRARY, "cli")
# The issue asks for 12 (it counted 19 then). Measured now, with a calibration and a percentile reference as train.py
# writes them: 13 - the 12 of a score with its tier and percentile, plus the typicality check (training/typicality.py)
# that came after the count was set. This bound keeps the path from growing back.
MAX_FILES = 13


def library_files_run(call) -> set:
    """The mirip/ files (not mirip/cli/) with a function that runs during ``call()``, relative to mirip/."""
    files = set()

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        # Module and class bodies have no fresh locals; functions, lambdas, generators and comprehensions do.
        if not code.co_flags & inspect.CO_NEWLOCALS:
            return
        path = os.path.abspath(code.co_filename)
        if path.startswith(LIBRARY + os.sep) and not path.startswith(CLI + os.sep):
            files.add(os.path.relpath(path, LIBRARY))

    # Images are decoded on worker threads: their code is on the path too.
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        rc = call()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    assert rc == 0
    return files


@pytest.fixture
def three_images(trained, tmp_path):
    """Three drawings the checkpoint was trained on, copied into a folder of their own."""
    folder = tmp_path / "drawings"
    make_tiered_images(tmp_path / "all")
    folder.mkdir()
    for name in ("img_0.png", "img_3.png", "img_6.png"):
        os.replace(tmp_path / "all" / name, folder / name)
    return folder


@pytest.fixture
def calibrated(trained, tmp_path):
    """The trained checkpoint with a score-to-tier calibration and a percentile reference, as scripts/train.py
    writes them, so the tier
    columns' code is on the path too."""
    ckpt = load_checkpoint_file(trained[1])
    ckpt["calibration"] = fit_ordinal(np.linspace(-2.0, 2.0, 8), np.repeat([0, 1, 2, 3], 2)).to_dict()
    ckpt["score_reference"] = make_score_reference(np.linspace(-2.0, 2.0, 8), np.repeat([0, 1, 2, 3], 2)).to_dict()
    path = str(tmp_path / "calibrated.pt")
    save_checkpoint_file(path, ckpt)
    return path


def test_a_score_reads_through_few_library_files(calibrated, three_images, tmp_path):
    ckpt = calibrated
    argv = ["--checkpoint", ckpt, str(three_images), "--output", str(tmp_path / "scores.csv"),
            "--device", "cpu", "--batch-size", "2", "--no-progress"]
    with torch_threads(1):
        files = library_files_run(lambda: score.main(argv))
    written = (tmp_path / "scores.csv").read_text()
    assert "predicted_tier" in written and "percentile" in written
    listing = "\n  ".join(sorted(files))
    assert len(files) <= MAX_FILES, f"a score runs code in {len(files)} library files:\n  {listing}"
    # The measurement itself: the files every score must pass through are seen.
    assert {"scoring/scorer.py", "store/checkpoint.py", "ml/ranking_model.py", "training/calibration.py"} <= files, listing
