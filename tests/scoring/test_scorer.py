"""Full-image mode from a checkpoint: parity with cached features, substitutions, refusals, batch scoring."""

from __future__ import annotations

import os

import pytest
import torch

from _inference_helpers import IMAGE_SIZE, make_cache_and_checkpoint, torch_threads
from conftest import save_tiny_backbone
from mirip.ml.backbones import RandomWeightsWarning
from mirip.scoring.scorer import Scorer, load_scorer
from mirip.store.cache import open_cache
from mirip.store.checkpoint import CheckpointError, load_checkpoint_file, save_checkpoint_file
from mirip.store.fingerprint import FingerprintMismatch


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def test_full_image_scores_equal_cached_feature_scores(trained):
    cache_path, ckpt, head, paths = trained
    scorer = load_scorer(ckpt, device="cpu")
    result = scorer.score_paths(paths, batch_size=3, progress=False)
    assert result.paths == paths and result.failures == []
    with open_cache(cache_path) as cache:
        feats = cache.load_features()
        assert cache.paths == [os.path.basename(p) for p in paths]
    with torch.no_grad():
        cached_scores = head.get_score(feats).reshape(-1)
    full = torch.tensor(result.scores)
    assert torch.allclose(full, cached_scores, atol=1e-5, rtol=1e-5), (full, cached_scores)
    assert full.std() > 1e-3  # a constant head would make parity meaningless
    # And directly on tensors, one image at a time vs a batch.
    one = scorer.score_tensor(scorer.preprocessor(paths[0])[None])
    assert torch.allclose(one, cached_scores[:1], atol=1e-5)


def test_parity_with_random_backbone_and_mean_pooling(tmp_path, image_dir):
    d, meta = image_dir
    # A random backbone built from a directory's config is seeded, so it rebuilds identically.
    backbone = save_tiny_backbone(tmp_path / "arch", seed=3)
    with pytest.warns(RandomWeightsWarning):
        cache, ckpt, head, paths = make_cache_and_checkpoint(backbone, str(d), list(meta["filename"])[:4],
                                                             str(tmp_path), random_init=True, pooling="mean")
    with pytest.warns(RandomWeightsWarning):
        scorer = load_scorer(ckpt, device="cpu")
    assert scorer.weights == "random" and scorer.model.feature_extractor.pooling == "mean"
    assert any("RANDOM" in n for n in scorer.notes)
    with open_cache(cache) as c:
        expected = head.get_score(c.load_features()).reshape(-1).detach()
    got = torch.tensor(scorer.score_paths(paths, progress=False).scores)
    assert torch.allclose(got, expected, atol=1e-5)


def test_model_is_rebuilt_from_checkpoint_alone(trained):
    _, ckpt, head, _ = trained
    scorer = load_scorer(ckpt, device="cpu")
    model = scorer.model
    assert (model.input_dim, model.hidden_dim, model.projector_output_dim) == (32, 16, 8)
    for k, v in head.head_state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert scorer.preprocessor.image_size == IMAGE_SIZE and scorer.weights == "pretrained"
    assert not model.training and scorer.notes == []
    info = scorer.describe()
    assert info["epoch"] == 3 and info["image_size"] == IMAGE_SIZE and info["precision"] == "fp32"
    assert isinstance(Scorer.from_checkpoint(ckpt, device="cpu"), Scorer)


@pytest.mark.parametrize("kwargs,field", [({"image_size": 112}, "image_size"), ({"pooling": "mean"}, "pooling"),
                                          ({"backbone": "facebook/dinov2-base"}, "backbone")])
def test_requests_that_change_features_are_refused_naming_the_field(trained, kwargs, field):
    _, ckpt, _, _ = trained
    with pytest.raises(FingerprintMismatch) as err:
        load_scorer(ckpt, device="cpu", **kwargs)
    assert field in err.value.fields and field in str(err.value)


def test_matching_requests_are_accepted(trained):
    _, ckpt, _, _ = trained
    scorer = load_scorer(ckpt, device="cpu", image_size=IMAGE_SIZE, pooling="cls")
    assert scorer.notes == []


def test_local_directory_substitution_is_announced(trained, tmp_path):
    _, ckpt, _, paths = trained
    copy = save_tiny_backbone(tmp_path / "copy", seed=0)  # same weights, another place
    scorer = load_scorer(ckpt, device="cpu", backbone=copy)
    assert any("substituted local backbone directory" in n for n in scorer.notes)
    assert scorer.model.feature_extractor.info.name == copy
    reference = load_scorer(ckpt, device="cpu").score_paths(paths[:2], progress=False).scores
    assert scorer.score_paths(paths[:2], progress=False).scores == pytest.approx(reference, abs=1e-6)


def test_substituted_directory_with_other_architecture_is_refused(trained, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    _, ckpt, _, _ = trained
    wide = tmp_path / "wide"
    Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             patch_size=14, image_size=28)).save_pretrained(wide)
    with pytest.raises(FingerprintMismatch) as err:
        load_scorer(ckpt, device="cpu", backbone=str(wide))
    assert "feature_dim" in err.value.fields


def test_random_weights_substitution_is_announced(trained):
    _, ckpt, _, paths = trained
    with pytest.warns(RandomWeightsWarning):
        scorer = load_scorer(ckpt, device="cpu", random_init=True)
    assert scorer.weights == "random"
    assert any("substituted RANDOM weights" in n for n in scorer.notes)
    assert len(scorer.score_paths(paths[:2], progress=False)) == 2


def test_unreadable_files_are_collected_not_fatal(trained, tmp_path):
    _, ckpt, _, paths = trained
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    mixed = [paths[0], str(broken), paths[1], str(empty), str(tmp_path / "gone.png"), paths[2]]
    result = load_scorer(ckpt, device="cpu").score_paths(mixed, batch_size=2, progress=False)
    assert result.paths == [paths[0], paths[1], paths[2]]
    reasons = dict(result.failures)
    assert list(reasons) == [str(broken), str(empty), str(tmp_path / "gone.png")]
    assert "not a recognised image format" in reasons[str(broken)] and "empty" in reasons[str(empty)]
    assert "not found" in reasons[str(tmp_path / "gone.png")]
    ranked = result.ranked()
    assert [r for r, _, _ in ranked] == [1, 2, 3]
    assert [s for _, _, s in ranked] == sorted(result.scores, reverse=True)


def test_all_unreadable_batch(trained, tmp_path):
    _, ckpt, _, _ = trained
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    result = load_scorer(ckpt, device="cpu").score_paths([bad], progress=False)
    assert len(result) == 0 and len(result.failures) == 1


def test_compare(trained):
    _, ckpt, _, paths = trained
    scorer = load_scorer(ckpt, device="cpu")
    cmp = scorer.compare(paths[0], paths[1])
    s = scorer.score_paths(paths[:2], progress=False).scores
    assert (cmp.score_a, cmp.score_b) == pytest.approx(tuple(s), abs=1e-6)
    assert cmp.margin == pytest.approx(abs(s[0] - s[1]))
    assert cmp.better == (paths[0] if s[0] > s[1] else paths[1]) and cmp.prediction in (1, -1)


def test_checkpoint_without_fingerprint_needs_explicit_backbone_and_size(trained, tiny_backbone, tmp_path):
    _, ckpt, _, paths = trained
    payload = load_checkpoint_file(ckpt)
    payload["fingerprint"], payload["backbone"] = None, None
    bare = str(tmp_path / "bare.pt")
    save_checkpoint_file(bare, payload)
    with pytest.raises(CheckpointError, match="no feature fingerprint"):
        load_scorer(bare, device="cpu")
    scorer = load_scorer(bare, device="cpu", backbone=tiny_backbone, image_size=IMAGE_SIZE)
    assert any("NOT verified" in n for n in scorer.notes)
    reference = load_scorer(ckpt, device="cpu").score_paths(paths[:2], progress=False).scores
    assert scorer.score_paths(paths[:2], progress=False).scores == pytest.approx(reference, abs=1e-6)


def test_checkpoint_without_head_config_is_refused(trained, tmp_path):
    _, ckpt, _, _ = trained
    payload = load_checkpoint_file(ckpt)
    del payload["head"]
    bad = str(tmp_path / "nohead.pt")
    save_checkpoint_file(bad, payload)
    with pytest.raises(CheckpointError, match="no head config"):
        load_scorer(bad, device="cpu")
