"""What a user reads when a file or a flag is wrong: every bad row at once, by the line an editor shows."""

from __future__ import annotations

import re

import pytest

from mirip.common.metadata_csv import MetadataError
from mirip.extract.reader import read_metadata_paths
from mirip.training.run_data import read_metadata

# Line numbers below are counted by hand in the text (the header is line 1).
MIXED = ("filename,tier\n"         # 1
         "a.png,S\n"               # 2
         "b.png,D\n"               # 3
         "c.png,Z\n"               # 4
         "\n"                      # 5: blank, skipped by the CSV reader
         "d.png,\n"                # 6: empty tier
         "\"e\nwith newline.png\",a\n"  # 7-8: a quoted name spans two lines; 'a' is A
         "f.png, b \n"             # 9: padded, is B
         "g.png,SS\n")             # 10


def test_every_bad_tier_is_reported_by_file_line(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text(MIXED)
    with pytest.raises(ValueError) as info:
        read_metadata(str(path))
    assert str(info.value) == (
        f"{path}: Invalid tier value in 4 of 7 row(s), column 'tier': line 3: 'D'; line 4: 'Z'; line 6: empty; "
        "line 10: 'SS'. Use one of S/A/B/C (lower case and surrounding spaces are accepted)")
    # Extraction checks the same column before any backbone loads, and says the same.
    with pytest.raises(MetadataError) as info:
        read_metadata_paths(str(path), tier_column="tier")
    assert "line 3: 'D'; line 4: 'Z'; line 6: empty; line 10: 'SS'" in str(info.value)


def test_lower_case_and_padded_tiers_are_accepted(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("filename,tier\na.png, s\nb.png,a \nc.png,B\nd.png,c\n")
    assert read_metadata(str(path))["tier"].tolist() == [" s", "a ", "B", "c"]  # kept as written, read as S A B C


def test_many_bad_tiers_show_twenty_and_the_count(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("filename,tier\n" + "".join(f"i{k}.png,X{k}\n" for k in range(25)) + "z.png,S\n")
    with pytest.raises(ValueError) as info:
        read_metadata(str(path))
    message = str(info.value)
    assert "Invalid tier value in 25 of 26 row(s)" in message
    assert "line 2: 'X0'" in message and "line 21: 'X19'" in message and "line 22: 'X20'" not in message
    assert "... and 5 more" in message


def test_empty_filenames_and_duplicates_are_named_by_line(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("filename,tier\na.png,S\n,A\nb.png,B\n\n,C\n")
    with pytest.raises(ValueError, match=r"empty 'filename' on line 3, line 6$"):
        read_metadata(str(path))
    path.write_text("filename,tier\na.png,S\nb.png,A\n\n./a.png,B\n")
    with pytest.raises(ValueError, match=r"a\.png on line 2, line 5\)"):
        read_metadata(str(path))


def _score_script():
    from mirip.cli import score

    return score


def test_a_flag_that_contradicts_the_checkpoint_says_to_drop_it(tmp_path, capsys):
    """The checkpoint holds the truth, the flag is what is wrong: say so, in the one wording every mismatch uses."""
    from mirip.store.checkpoint import save_checkpoint_file

    ckpt = tmp_path / "head.pt"
    save_checkpoint_file(ckpt, {"model_state_dict": {}, "head": {"input_dim": 8},
                                "fingerprint": {"backbone": "org/none", "image_size": 112, "pooling": "cls"}})
    images = tmp_path / "images"
    images.mkdir()
    assert _score_script().main(["--checkpoint", str(ckpt), str(images), "--image-size", "224",
                                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert (f"checkpoint {ckpt} fingerprint does not match: image_size: the checkpoint has 112, this command asks "
            "for 224; to fix: leave out --image-size: the checkpoint's values are used by default") in err


def test_a_cache_that_differs_from_the_checkpoint_names_both(tmp_path):
    """evaluate: the cache is the stored side, the checkpoint is what asks."""
    import numpy as np

    from mirip.store.checkpoint import save_checkpoint_file
    from mirip.store.cache import write_cache
    from mirip.store.fingerprint import FingerprintMismatch
    from mirip.training.run import evaluate_checkpoint

    fp = {"backbone": "b", "image_size": 28, "feature_dim": 4, "feature_dtype": "float32"}
    cache = write_cache(str(tmp_path / "c.h5"), fp, ["a.png", "b.png"], np.zeros((2, 4), dtype=np.float32))
    meta = tmp_path / "m.csv"
    meta.write_text("filename,tier\na.png,S\nb.png,C\n")
    ckpt = tmp_path / "head.pt"
    save_checkpoint_file(ckpt, {"model_state_dict": {}, "fingerprint": dict(fp, image_size=56), "config": {},
                                "head": {"input_dim": 4}})
    with pytest.raises(FingerprintMismatch) as info:
        evaluate_checkpoint(str(ckpt), cache, str(meta))
    assert str(info.value) == (
        f"feature cache {cache} fingerprint does not match: image_size: the cache has 28, checkpoint {ckpt} asks "
        "for 56; to fix: evaluate on the cache the checkpoint was trained on, or on one extracted with the "
        "checkpoint's settings")


def test_printed_metrics_state_distinct_pairs_and_images():
    """10 sampled pairs over 4 images that are only 3 different pairs: the table must say 3, and 4 images."""
    import numpy as np

    from mirip.training.evaluator import format_metrics
    from mirip.training.metrics import score_metrics

    scores = np.array([3.0, 2.0, 1.0, 0.0])
    ranks = np.array([3, 2, 1, 0])  # S A B C
    pairs = [(0, 1), (1, 0), (0, 1), (0, 1), (2, 3), (3, 2), (2, 3), (0, 3), (3, 0), (0, 3)]
    first, second = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    labels = np.where(ranks[first] > ranks[second], 1, -1)
    naive = {frozenset(p) for p in pairs}  # counted independently of the library
    metrics = score_metrics(scores, ranks, first, second, labels)
    assert metrics["total_pairs"] == 10 and metrics["distinct_pairs"] == len(naive) == 3
    assert metrics["tier_pair_accuracy"]["S-A"] == {"accuracy": 1.0, "pairs": 4, "distinct_pairs": 1}
    assert metrics["tier_pair_accuracy"]["S-C"]["distinct_pairs"] == 1
    text = format_metrics(metrics, metrics, title="test split:")
    assert text.splitlines()[0] == "test split: 4 images, 3 distinct cross-tier pairs (10 sampled, repeats included)"
    assert "pairwise accuracy (3 distinct pairs)" in text and "Spearman (score vs tier, 4 images)" in text
    assert "S-A (1 distinct pairs, 4 sampled)" in text and "B-C (1 distinct pairs, 3 sampled)" in text
    assert not re.search(r"^pairs +10", text, re.M)  # the sampled count is never shown as bare "pairs"


def _summary(vals):
    import pandas as pd

    from mirip.sweep.report import aggregate

    rows = [{"margin": m, "hidden_dim": 256, "projector_dim": 128, "learning_rate": 1e-3, "dropout": 0.1,
             "weight_decay": 0.01, "feature": "cls@-1", "seed": 0, "val_acc": v, "test_acc": 0.5, "spearman": 0.1,
             "best_epoch": 1, "wall_time_s": 1.0, "checkpoint": f"m{m}.pt"} for m, v in vals]
    return aggregate(pd.DataFrame(rows))


def test_a_winner_tied_on_validation_says_so_and_how_the_tie_was_broken():
    from mirip.sweep.report import summary_markdown, tie_note

    table = _summary([(0.1, 0.97), (0.5, 0.98), (1.0, 0.98000001), (2.0, 0.98)])
    note = tie_note(table)
    assert note.startswith("The winner ties 2 other configuration(s) at val 0.9800 (")
    assert "margin=0.5 " in note and "margin=2 " in note and "margin=0.1" not in note
    assert "tie was broken by the unrounded mean validation accuracy, then the order of results.csv" in note
    assert table["margin"].iloc[0] == 1.0  # the unrounded best leads
    assert note in summary_markdown(table)
    alone = _summary([(0.1, 0.97), (0.5, 0.98)])
    assert tie_note(alone) == "" and "ties" not in summary_markdown(alone)


def test_heatmap_colour_range_stays_in_0_1_and_never_magnifies_seed_noise():
    import numpy as np

    from mirip.sweep.report import MIN_COLOUR_SPAN, colour_range

    lo, hi = colour_range(np.array([0.98, 0.98, 0.98]), np.array([0.0015, 0.0015, 0.0015]))  # all cells tie
    assert lo <= 0.98 <= hi and hi - lo == pytest.approx(MIN_COLOUR_SPAN)
    lo, hi = colour_range(np.array([0.980, 0.983]), np.array([0.01, 0.01]))  # a difference below the seeds' std
    assert hi - lo == pytest.approx(0.04) and lo <= 0.980 and hi >= 0.983
    lo, hi = colour_range(np.array([0.995, 1.0]), np.array([0.02, 0.02]))  # near the top: shifted, not past 1
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.92)
    assert colour_range(np.array([0.2, 0.9]), np.array([np.nan, np.nan])) == pytest.approx((0.2, 0.9))


def test_tiles_name_the_subfolder_when_names_repeat():
    from mirip.scoring.report_html import display_names

    names = display_names(["/data/new/a/x.png", "/data/new/b/x.png", "/data/new/y.png"])
    assert names == {"/data/new/a/x.png": "a/x.png", "/data/new/b/x.png": "b/x.png", "/data/new/y.png": "y.png"}
    assert display_names(["/d/only.png"]) == {"/d/only.png": "only.png"}


def test_report_header_says_the_accuracy_is_validation_accuracy():
    from mirip.scoring.report_html import render_html

    page = render_html([{"path": "/d/a.png", "score": 1.0, "rank": 1}], {}, info={"epoch": 3, "accuracy": 0.99})
    assert "<td>val pairwise accuracy (chose the epoch)</td><td>0.99</td>" in page and "<td>accuracy</td>" not in page


def test_warnings_print_as_one_plain_line(capsys):
    import warnings

    from mirip.cli.options import plain_warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        plain_warnings()
        warnings.warn("backbone weights are RANDOM")
    assert capsys.readouterr().err == "warning: backbone weights are RANDOM\n"  # no file:line, no source line


def test_extract_defaults_follow_the_device(capsys):
    from mirip.cli import extract as script

    args = script.build_parser().parse_args(["--image-dir", "x", "--device", "cpu"])
    script._device_defaults(args)
    assert (args.backbone, args.image_size) == ("facebook/dinov2-small", 224)
    assert "defaults on a CPU: --backbone facebook/dinov2-small --image-size 224" in capsys.readouterr().out
    args = script.build_parser().parse_args(["--image-dir", "x", "--device", "cuda", "--image-size", "518"])
    script._device_defaults(args)
    assert (args.backbone, args.image_size) == ("facebook/dinov2-large", 518)
