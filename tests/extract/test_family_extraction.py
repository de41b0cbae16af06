"""Every backbone family through the whole pipeline: the feature bank against plain transformers, extraction into
a cache, training on it, full-image parity from the checkpoint alone, and fingerprints that refuse mixing."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from _extract_helpers import extract, make_images, write_metadata
from _family_helpers import PREFIX_TOKENS, TINY_FAMILIES, save_tiny, save_tiny_full
from mirip.ml.families import BackboneFamily
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.ranking_model import RankingHead
from mirip.scoring.scorer import load_scorer
from mirip.store.cache import open_cache
from mirip.store.cache_errors import CacheError

ROOT = Path(__file__).resolve().parents[2]
# Every family, as a vision-only checkpoint and (CLIP, SigLIP) as a full dual-tower checkpoint.
KINDS = ["dinov2", "dinov2_with_registers", "dinov3_vit", "siglip_vision_model", "clip_vision_model", "siglip", "clip"]
# Written out by hand, from the model cards / the families' papers, not from mirip.
FAMILY = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2_with_registers", "dinov3_vit": "dinov3_vit",
          "siglip_vision_model": "siglip", "clip_vision_model": "clip", "siglip": "siglip", "clip": "clip"}
MEAN_STD = {"dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}
MEAN_STD["dinov2_with_registers"] = MEAN_STD["dinov3_vit"] = MEAN_STD["dinov2"]
FINAL_NORM = {"dinov2": "layernorm", "dinov2_with_registers": "layernorm", "dinov3_vit": "norm",
              "siglip": "post_layernorm", "clip": "post_layernorm"}
SIZE = 42  # not the tiny models' native 28: position embeddings must interpolate (or be RoPE)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-extraction")
    out = {t: save_tiny(root / t, t) for t in TINY_FAMILIES}
    out["clip"] = save_tiny_full(root / "clip-full", "clip")
    out["siglip"] = save_tiny_full(root / "siglip-full", "siglip")
    return out


@pytest.fixture(autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _reference(directory, kind):
    """The vision tower loaded by plain transformers, independently of mirip."""
    if kind in ("clip", "siglip"):
        full = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel}[kind]
        return full.from_pretrained(directory).vision_model.eval()
    return getattr(transformers, TINY_FAMILIES[kind][0]).from_pretrained(directory).eval()


def _naive_bank(directory, kind, images, blocks):
    """{name: (B, D)} for cls/mean/std at each 1-based block, from output_hidden_states and a hand-applied norm."""
    model = _reference(directory, kind)
    family = FAMILY[kind]
    kwargs = {"interpolate_pos_encoding": True} if family in ("clip", "siglip") else {}
    with torch.no_grad():
        out = model(pixel_values=images, output_hidden_states=True, **kwargs)
        ln = getattr(model, FINAL_NORM[family])
        prefix = PREFIX_TOKENS[kind]
        bank = {}
        for b in blocks:
            h = out.hidden_states[b]  # hidden_states[0] is the embeddings, [b] block b's output
            normed = F.layer_norm(h, (h.shape[-1],), ln.weight, ln.bias, ln.eps)
            bank[f"cls@{b}"] = model.head(normed) if family == "siglip" else normed[:, 0]
            bank[f"mean@{b}"] = normed[:, prefix:].mean(dim=1)
            bank[f"std@{b}"] = normed[:, prefix:].std(dim=1, correction=0)
    return bank, out


@pytest.mark.parametrize("kind", KINDS)
def test_feature_bank_of_every_family_equals_a_naive_computation(dirs, kind):
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    extractor = DINOv2FeatureExtractor(dirs[kind], device="cpu", layers=[1, -1], pooling=["cls", "mean", "std"])
    assert extractor.info.family == FAMILY[kind]
    got = extractor.extract_entries(images)
    naive, out = _naive_bank(dirs[kind], kind, images, blocks=[1, 3])
    for name, value in got.items():
        expected = naive[name.replace("@-1", "@3")]
        torch.testing.assert_close(value, expected, atol=2e-5, rtol=1e-4, msg=f"{kind} {name}")
    # cls@-1 is the family's own image feature: DINO's normed CLS, CLIP's pooler_output (post-layernormed
    # CLS), SigLIP's pooler_output (the attention-pooling head).
    own = out.pooler_output if FAMILY[kind] in ("clip", "siglip") else out.last_hidden_state[:, 0]
    torch.testing.assert_close(got["cls@-1"], own, atol=2e-5, rtol=1e-4)
    assert (extractor.mean, extractor.std) == MEAN_STD[FAMILY[kind]]


def _train_main():
    module = importlib.import_module("mirip.cli.train")
    return module.main


@pytest.mark.parametrize("kind", ["dinov2_with_registers", "dinov3_vit", "siglip", "clip"])
def test_extract_train_and_full_image_parity_for_each_family(dirs, kind, tmp_path):
    images = tmp_path / "images"
    names = make_images(images, 24)
    meta = write_metadata(tmp_path / "meta.csv", names)
    import pandas as pd

    frame = pd.read_csv(meta)
    frame["tier"] = [("S", "A", "B", "C")[i % 4] for i in range(len(frame))]
    frame.to_csv(meta, index=False)
    cache_path = tmp_path / "cache.h5"
    extract(images, cache_path, dirs[kind], image_size=SIZE, metadata=meta, layers=[-2, -1], pooling=["cls", "mean"])
    with open_cache(str(cache_path)) as cache:
        fp, paths = cache.fingerprint, list(cache.paths)
        assert cache.num_rows == 24
    mean, std = MEAN_STD[FAMILY[kind]]
    assert fp["backbone_family"] == FAMILY[kind]
    assert fp["mean"] == pytest.approx(mean) and fp["std"] == pytest.approx(std)
    assert fp["patch_size"] == 14
    assert fp["token_layout"]["num_prefix_tokens"] == PREFIX_TOKENS[kind]
    assert fp["cls_pooling"] == ("attention_pool_head" if FAMILY[kind] == "siglip" else "token")

    out = tmp_path / "run"
    rc = _train_main()(["--features", str(cache_path), "--metadata", meta, "--output-dir", str(out),
                        "--feature", "cls@-2,-1+mean@-1", "--max-epochs", "2", "--pairs-per-epoch", "64",
                        "--eval-pairs", "32", "--train-ratio", "0.5", "--val-ratio", "0.25", "--test-ratio", "0.25", "--hidden-dim", "16", "--projector-dim", "8", "--device", "cpu",
                        "--no-progress"])
    assert rc == 0
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["fingerprint"]["backbone_family"] == FAMILY[kind]

    # Full-image mode from the checkpoint alone: same family, same normalisation, same scores as the cache.
    scorer = load_scorer(str(out / "best.pt"), device="cpu")
    assert scorer.model.feature_extractor.info.family == FAMILY[kind]
    assert tuple(scorer.preprocessor.mean) == pytest.approx(mean)
    full = torch.tensor(scorer.score_paths([str(images / p) for p in paths], progress=False).scores)
    with open_cache(str(cache_path)) as cache:
        x = cache.load_features(dtype=torch.float32, spec="cls@-2,-1+mean@-1")
    if ckpt.get("feature_scales"):
        x = x * torch.cat([torch.full((32,), float(s)) for s in ckpt["feature_scales"]])
    head = RankingHead(**{k: ckpt["head"][k] for k in ("input_dim", "hidden_dim", "projector_output_dim",
                                                          "dropout")}).eval()
    head.load_head_state_dict(ckpt["model_state_dict"])
    with torch.no_grad():
        cached = head.get_score(x).reshape(-1)
    torch.testing.assert_close(full, cached, atol=1e-4, rtol=1e-4)
    assert cached.std() > 1e-4


def test_one_cache_refuses_a_second_family(dirs, tmp_path):
    images = tmp_path / "images"
    make_images(images, 4)
    cache_path = tmp_path / "cache.h5"
    backbone = tmp_path / "backbone"
    shutil.copytree(dirs["dinov2"], backbone)
    extract(images, cache_path, str(backbone), image_size=SIZE)
    # The same directory now holds a SigLIP: same backbone name, other family, other normalisation.
    shutil.rmtree(backbone)
    shutil.copytree(dirs["siglip_vision_model"], backbone)
    make_images(images, 2, start=4)
    with pytest.raises(CacheError) as err:
        extract(images, cache_path, str(backbone), image_size=SIZE)
    message = str(err.value)
    assert "backbone_family: the cache has 'dinov2', this command asks for 'siglip'" in message
    assert "token_layout: the cache has" in message and "this command asks for [0.5, 0.5, 0.5]" in message
    with open_cache(str(cache_path)) as cache:
        assert cache.num_rows == 4 and cache.fingerprint["backbone_family"] == "dinov2"


def test_a_size_the_backbone_cannot_take_is_refused_naming_the_accepted_one(dirs, tmp_path, monkeypatch):
    # transformers 5.x CLIP/SigLIP interpolate on request; older ones (no interpolate_pos_encoding) cannot.
    monkeypatch.setattr(BackboneFamily, "interpolates", lambda self, model: self.position_embeddings != "interpolated-on-request")
    images = tmp_path / "images"
    make_images(images, 2)
    with pytest.raises(ValueError, match=r"accepts only 28x28 images \(got 42x42\); use --image-size 28"):
        extract(images, tmp_path / "c.h5", dirs["clip"], image_size=SIZE)
    assert not (tmp_path / "c.h5").exists()
    extract(images, tmp_path / "c.h5", dirs["clip"], image_size=28)
    extract(images, tmp_path / "d.h5", dirs["dinov3_vit"], image_size=SIZE)  # RoPE: any size


def test_normalisation_from_the_directorys_preprocessor_config(dirs, tmp_path):
    backbone = tmp_path / "sat"
    shutil.copytree(dirs["dinov3_vit"], backbone)
    sat = ([0.43, 0.411, 0.296], [0.213, 0.156, 0.143])  # DINOv3 SAT-493M statistics
    (backbone / "preprocessor_config.json").write_text(json.dumps({"image_mean": sat[0], "image_std": sat[1]}))
    images = tmp_path / "images"
    names = make_images(images, 2)
    extract(images, tmp_path / "c.h5", str(backbone), image_size=SIZE)
    with open_cache(str(tmp_path / "c.h5")) as cache:
        fp = cache.fingerprint
        row = np.asarray(cache.load_features())[list(cache.paths).index(names[0])]
    assert fp["mean"] == pytest.approx(sat[0]) and fp["std"] == pytest.approx(sat[1])
    # The cached row is the model on pixels normalised by hand with those statistics.
    from PIL import Image

    from mirip.ml.preprocessing import resize

    img = resize(Image.open(images / names[0]).convert("RGB"), SIZE, "pad", 14)
    arr = (np.asarray(img, dtype=np.float32) / 255.0 - np.array(sat[0], np.float32)) / np.array(sat[1], np.float32)
    pixels = torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]
    model = _reference(str(backbone), "dinov3_vit")
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state[0, 0].numpy()
    np.testing.assert_allclose(row, expected, atol=2e-5, rtol=1e-4)


def test_siglip_without_pooling_head_is_refused_for_cls_at_construction(tmp_path):
    config = transformers.SiglipVisionConfig(**TINY_FAMILIES["siglip_vision_model"][2], vision_use_head=False)
    transformers.SiglipVisionModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no CLS token and no pooling head.*use mean or std pooling"):
        DINOv2FeatureExtractor(str(tmp_path), device="cpu")
    extractor = DINOv2FeatureExtractor(str(tmp_path), device="cpu", pooling="mean")
    assert extractor.extract(torch.randn(1, 3, 28, 28)).shape == (1, 32)
