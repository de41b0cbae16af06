"""End-to-end training of a non-DINOv2 backbone normalises pixels with that backbone's family statistics.

A ``PairwiseDataset`` left on its default transform follows the backbone the Trainer (or Evaluator) runs; the
expected pixels are computed here by hand from the PIL image (pad-resize, /255, family mean/std), never with
mirip's preprocessing.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from _family_helpers import save_tiny
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.preprocessing import Preprocessor
from mirip.ml.ranking_model import PairwiseRankingModel
from mirip.training.config import TrainingConfig
from mirip.training.datasets.pairwise_dataset import PairwiseDataset, image_pair_loader
from mirip.training.evaluator import Evaluator
from mirip.training.trainer import Trainer

# Published statistics, written out here rather than read from mirip.ml.families.
FAMILY_STATS = {
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def naive_pixels(path, mean, std, size=768, patch=14) -> torch.Tensor:
    """The whole drawing fitted into the patch-aligned part of a white square, bicubic, then normalised."""
    img = Image.open(path).convert("RGB")
    seen = (size // patch) * patch
    w, h = img.size
    scale = seen / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((seen - nw) // 2, (seen - nh) // 2))
    arr = np.asarray(canvas, dtype=np.float64) / 255.0
    out = np.empty((3, size, size), dtype=np.float64)
    for c in range(3):
        out[c] = (arr[:, :, c] - mean[c]) / std[c]
    return torch.from_numpy(out).float()


def _model(directory, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return PairwiseRankingModel(str(directory), projector_output_dim=8, device="cpu", hidden_dim=16, **kw)


def _record_inputs(model):
    seen = []
    model.feature_extractor.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("model_type", sorted(FAMILY_STATS))
def test_end_to_end_training_normalises_with_the_backbones_family_values(image_dir, tmp_path, model_type):
    directory, meta = image_dir
    backbone = save_tiny(tmp_path / model_type, model_type)
    mean, std = FAMILY_STATS[model_type]
    ds = PairwiseDataset(meta, str(directory), num_pairs=4, seed=3)  # no transform: the default
    assert ds.transform == Preprocessor()  # on its own the dataset keeps the documented default (ImageNet)
    model = _model(backbone)
    seen = _record_inputs(model)
    cfg = TrainingConfig(batch_size=4, max_epochs=1, pairs_per_epoch=4, eval_pairs=4, device="cpu", seed=3,
                         checkpoint_dir="")
    logs = []
    Trainer(model, cfg, progress=False, log=logs.append).fit(image_pair_loader(ds, batch_size=4, seed=3))
    assert len(seen) == 1 and seen[0].shape == (8, 3, 768, 768)
    first, second, _ = ds.pair_arrays()
    for row, image in enumerate(list(first) + list(second)):
        path = directory / meta.filename[int(image)]
        torch.testing.assert_close(seen[0][row], naive_pixels(path, mean, std), atol=2e-6, rtol=0)
        wrong = naive_pixels(path, *IMAGENET)
        assert (seen[0][row] - wrong).abs().max() > 0.05  # the ImageNet-normalised pixels are clearly different
    assert any("follows the" in line and "backbone" in line for line in logs)

    # Scoring the same dataset afterwards sees the same pixels.
    seen.clear()
    Evaluator(model, "cpu").evaluate(ds)
    by_image = torch.cat(seen)
    torch.testing.assert_close(by_image[0], naive_pixels(directory / meta.filename[0], mean, std), atol=2e-6, rtol=0)


def test_evaluating_first_also_follows_the_backbone(image_dir, tmp_path):
    directory, meta = image_dir
    model = _model(save_tiny(tmp_path / "clip", "clip_vision_model"))
    seen = _record_inputs(model)
    ds = PairwiseDataset(meta, str(directory), num_pairs=4, seed=1)
    Evaluator(model, "cpu").evaluate(ds)
    mean, std = FAMILY_STATS["clip_vision_model"]
    torch.testing.assert_close(torch.cat(seen)[3], naive_pixels(directory / meta.filename[3], mean, std),
                               atol=2e-6, rtol=0)


def test_a_transform_passed_in_is_never_replaced(image_dir, tmp_path):
    directory, meta = image_dir
    model = _model(save_tiny(tmp_path / "siglip", "siglip_vision_model"))
    mine = Preprocessor(image_size=28)
    ds = PairwiseDataset(meta, str(directory), transform=mine, num_pairs=4, seed=3)
    cfg = TrainingConfig(batch_size=4, max_epochs=1, pairs_per_epoch=4, device="cpu", checkpoint_dir="")
    Trainer(model, cfg, progress=False, log=lambda _m: None).fit(image_pair_loader(ds, batch_size=4))
    assert ds.transform is mine and ds.follow_backbone(model) is False


def test_backbone_argument_and_what_follows(image_dir, tmp_path, tiny_backbone):
    directory, meta = image_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        siglip = DINOv2FeatureExtractor(save_tiny(tmp_path / "s", "siglip_vision_model"), device="cpu")
        dinov2 = DINOv2FeatureExtractor(tiny_backbone, device="cpu")
    ds = PairwiseDataset(meta, str(directory), backbone=siglip)
    t = ds.transform
    assert (t.mean, t.std, t.image_size, t.resize_mode, t.patch_size) == ((0.5,) * 3, (0.5,) * 3, 768, "pad", 14)
    # DINOv2's own values are the default's: nothing changes.
    assert PairwiseDataset(meta, str(directory)).follow_backbone(dinov2) is False
    # A backbone that cannot interpolate its position embeddings gets its native size instead of 768.
    plain = siglip.backbone.forward
    siglip.backbone.forward = lambda pixel_values: plain(pixel_values=pixel_values)  # no interpolate_pos_encoding
    with pytest.raises(ValueError, match="accepts only 28x28"):
        siglip.check_image_size(768)
    ds = PairwiseDataset(meta, str(directory))
    assert ds.follow_backbone(siglip) is True and ds.transform.image_size == 28
