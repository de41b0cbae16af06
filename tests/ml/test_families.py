"""Backbone families: per-family facts, hooks, final norm + pooling parity, strict loading, shipped configs."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from _family_helpers import PREFIX_TOKENS, TINY_FAMILIES, save_tiny, save_tiny_full
from mirip.ml import backbones, families
from mirip.ml.backbones import (IncompleteWeightsError, RandomWeightsWarning, count_parameters, load_backbone,
                                shipped_config)
from mirip.ml.families import FAMILIES, UnsupportedBackboneError, family_for, tap_blocks

VISION_TYPES = list(TINY_FAMILIES)
FAMILY_OF = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2_with_registers", "dinov3_vit": "dinov3_vit",
             "siglip_vision_model": "siglip", "clip_vision_model": "clip"}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    dirs = {t: save_tiny(root / t, t) for t in VISION_TYPES}
    dirs["clip"] = save_tiny_full(root / "clip-full", "clip")
    dirs["siglip"] = save_tiny_full(root / "siglip-full", "siglip")
    return dirs


def _reference(directory, model_type):
    """The model loaded by plain transformers, independently of mirip's loader."""
    if model_type in ("clip", "siglip"):
        full = getattr(transformers, {"clip": "CLIPModel", "siglip": "SiglipModel"}[model_type])
        return full.from_pretrained(directory).vision_model.eval()
    return getattr(transformers, TINY_FAMILIES[model_type][0]).from_pretrained(directory).eval()


def _images(seed=0, size=28, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- recognising families ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type,family", [*FAMILY_OF.items(), ("siglip", "siglip"), ("clip", "clip")])
def test_family_for_each_model_type(model_type, family):
    assert family_for(model_type).name == family


@pytest.mark.parametrize("model_type", ["vit", "siglip2", None])
def test_unknown_model_type_is_refused_naming_supported(model_type):
    with pytest.raises(UnsupportedBackboneError) as err:
        family_for(model_type)
    for supported in ("dinov2", "dinov2_with_registers", "dinov3_vit", "siglip", "clip"):
        assert supported in str(err.value)
    if model_type == "siglip2":
        assert "fixed-resolution" in str(err.value)


def test_normalisation_per_family():
    assert FAMILIES["dinov2"].mean == (0.485, 0.456, 0.406) and FAMILIES["dinov3_vit"].std == (0.229, 0.224, 0.225)
    assert FAMILIES["siglip"].mean == (0.5, 0.5, 0.5) and FAMILIES["siglip"].std == (0.5, 0.5, 0.5)
    assert FAMILIES["clip"].mean == (0.48145466, 0.4578275, 0.40821073)
    assert FAMILIES["clip"].std == (0.26862954, 0.26130258, 0.27577711)
    assert "attention-pooling" in FAMILIES["siglip"].cls_meaning


# -- final norm + pooling equals the model's own output -------------------------------------------------------

@pytest.mark.parametrize("model_type", VISION_TYPES + ["clip", "siglip"])
def test_final_norm_of_last_block_pooled_as_cls_is_the_models_output(tiny_dirs, model_type):
    model, family, _ = backbones.load_model(tiny_dirs[model_type])
    model.eval()
    assert family.name == FAMILY_OF.get(model_type, model_type)
    reference = _reference(tiny_dirs[model_type], model_type)
    images = _images()
    with torch.no_grad(), tap_blocks(model, [-1], family) as taps:
        family.forward(model, images)
        normed = family.final_norm(model)(taps[-1])
        cls = family.cls(model, normed)
        out = reference(pixel_values=images)
    prefix = PREFIX_TOKENS[model_type]
    assert normed.shape == (2, prefix + 4, 32)  # 28 px / 14 px patches = 2 x 2 patches
    patches = family.patch_tokens(model, normed)
    assert patches.shape == (2, 4, 32)
    if model_type in ("clip_vision_model", "clip"):
        # CLIP's last_hidden_state is not post-layernormed; only the pooled CLS token is.
        ln = reference.post_layernorm
        naive = F.layer_norm(out.last_hidden_state, (32,), ln.weight, ln.bias, ln.eps)
        torch.testing.assert_close(cls, out.pooler_output, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(normed, naive, atol=1e-6, rtol=1e-5)
    elif model_type in ("siglip_vision_model", "siglip"):
        # No CLS token: cls is the attention-pooling head's output, transformers' pooler_output.
        torch.testing.assert_close(cls, out.pooler_output, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(normed, out.last_hidden_state, atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(cls, out.last_hidden_state[:, 0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cls, out.pooler_output, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(normed, out.last_hidden_state, atol=1e-6, rtol=1e-5)
    # mean of the patch tokens, from a hand-written prefix count, not the library's layout
    torch.testing.assert_close(patches.mean(dim=1), normed[:, prefix:].mean(dim=1))


@pytest.mark.parametrize("model_type", VISION_TYPES)
def test_hooks_see_exactly_the_requested_blocks(tiny_dirs, model_type):
    model, family, _ = backbones.load_model(tiny_dirs[model_type])
    model.eval()
    blocks = family.blocks(model)
    assert len(blocks) == 3
    # Naive reference: hook every block by hand and keep all outputs.
    seen, handles = {}, []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(
            lambda _m, _i, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
    images = _images(1)
    with torch.no_grad():
        family.forward(model, images)
    for h in handles:
        h.remove()
    with torch.no_grad(), tap_blocks(model, [0, -2], family) as taps:
        assert [len(b._forward_hooks) for b in blocks] == [1, 1, 0]  # only the requested blocks are hooked
        family.forward(model, images)
    assert sorted(taps) == [-2, 0]
    torch.testing.assert_close(taps[0], seen[0])
    torch.testing.assert_close(taps[-2], seen[1])
    assert not torch.allclose(taps[0], taps[-2])
    assert all(len(b._forward_hooks) == 0 for b in blocks)  # removed on exit


def test_tap_blocks_rejects_out_of_range_and_removes_hooks_on_error(tiny_dirs):
    model, family, _ = backbones.load_model(tiny_dirs["dinov2"])
    with pytest.raises(IndexError, match="3 blocks"):
        with tap_blocks(model, [3], family):
            pass
    with pytest.raises(RuntimeError):
        with tap_blocks(model, [0], family):
            raise RuntimeError("boom")
    assert all(len(b._forward_hooks) == 0 for b in family.blocks(model))


def test_siglip_without_head_has_no_cls(tmp_path):
    config = transformers.SiglipVisionConfig(**TINY_FAMILIES["siglip_vision_model"][2], vision_use_head=False)
    transformers.SiglipVisionModel(config).save_pretrained(tmp_path)
    model, family, _ = backbones.load_model(str(tmp_path))
    with pytest.raises(ValueError, match="no CLS token and no pooling head"):
        family.cls(model, torch.randn(1, 4, 32))


# -- image sizes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", VISION_TYPES)
def test_other_image_sizes_run_and_native_size_is_unchanged(tiny_dirs, model_type):
    model, family, _ = backbones.load_model(tiny_dirs[model_type])
    model.eval()
    family.check_image_size(model, 42, 56)
    with torch.no_grad():
        out = family.forward(model, torch.randn(1, 3, 42, 56)).last_hidden_state
        assert out.shape[1] == PREFIX_TOKENS[model_type] + 3 * 4
        images = _images(2)
        torch.testing.assert_close(family.forward(model, images).last_hidden_state,
                                   model(pixel_values=images).last_hidden_state)
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        family.check_image_size(model, 10)


def test_model_that_cannot_interpolate_names_the_accepted_size(tiny_dirs):
    class FixedSizeCLIP(transformers.CLIPVisionModel):
        def forward(self, pixel_values):  # no interpolate_pos_encoding, as in old transformers versions
            return super().forward(pixel_values=pixel_values)

    model = FixedSizeCLIP.from_pretrained(tiny_dirs["clip_vision_model"])
    family = FAMILIES["clip"]
    family.check_image_size(model, 28)
    with pytest.raises(ValueError, match="accepts only 28x28 images"):
        family.check_image_size(model, 56)


def test_describe_records_layout_for_the_fingerprint(tiny_dirs):
    model, family, _ = backbones.load_model(tiny_dirs["dinov2_with_registers"])
    facts = family.describe(model)
    assert facts["family"] == "dinov2_with_registers" and facts["patch_size"] == 14 and facts["num_blocks"] == 3
    assert facts["token_layout"] == {"num_prefix_tokens": 5, "cls_index": 0, "num_register_tokens": 4,
                                     "patch_size": 14}
    json.dumps(facts)  # plain values only
    siglip, fam, _ = backbones.load_model(tiny_dirs["siglip"])
    assert fam.describe(siglip)["cls"] == "attention_pool_head"
    assert fam.describe(siglip)["token_layout"]["cls_index"] == -1


# -- loading refuses silent wrong results ---------------------------------------------------------------------

def test_full_checkpoints_load_their_vision_tower_completely(tiny_dirs):
    for kind in ("clip", "siglip"):
        model, info = load_backbone(tiny_dirs[kind], allowed_families=None)
        assert info.family == kind and info.pretrained is True and info.hidden_size == 32 and info.patch_size == 14
        reference = _reference(tiny_dirs[kind], kind)
        images = _images(3)
        with torch.no_grad():
            torch.testing.assert_close(FAMILIES[kind].forward(model, images).pooler_output,
                                       reference(pixel_values=images).pooler_output)


def test_siglip_weights_under_a_dinov2_config_are_refused(tiny_dirs, tmp_path):
    # The silent failure this guards: SigLIP weights loaded as a DINOv2 with most weights random.
    d = tmp_path / "mislabelled"
    d.mkdir()
    (d / "model.safetensors").write_bytes(open(os.path.join(tiny_dirs["siglip_vision_model"], "model.safetensors"),
                                               "rb").read())
    (d / "config.json").write_text(open(os.path.join(tiny_dirs["dinov2"], "config.json")).read())
    with pytest.raises(IncompleteWeightsError) as err:
        load_backbone(str(d))
    message = str(err.value)
    assert "missing" in message and "embeddings.cls_token" in message
    assert "unexpected" in message and "embeddings.patch_embedding.weight" in message
    assert "embeddings.cls_token" in err.value.missing


def test_missing_vision_weight_is_refused_naming_it(tiny_dirs, tmp_path):
    src = tiny_dirs["clip"]
    d = tmp_path / "clip-missing"
    d.mkdir()
    state = load_file(os.path.join(src, "model.safetensors"))
    dropped = "vision_model.encoder.layers.1.mlp.fc1.weight"
    assert dropped in state
    del state[dropped]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(IncompleteWeightsError, match="encoder.layers.1.mlp.fc1.weight"):
        load_backbone(str(d), allowed_families=None)


def test_unexpected_vision_weight_is_refused(tiny_dirs, tmp_path):
    src = tiny_dirs["dinov3_vit"]
    d = tmp_path / "extra"
    d.mkdir()
    state = load_file(os.path.join(src, "model.safetensors"))
    state["embeddings.extra_token"] = torch.zeros(1, 1, 32)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(IncompleteWeightsError, match="unexpected.*embeddings.extra_token"):
        load_backbone(str(d), allowed_families=None)


def test_unsupported_model_type_directory_is_refused(tmp_path):
    transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64, image_size=28, patch_size=14)
                          ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedBackboneError, match="'vit'.*dinov2, dinov2_with_registers, dinov3_vit"):
        load_backbone(str(tmp_path))


def test_load_backbone_admits_every_family_unless_narrowed(tiny_dirs):
    # The extractor pools every family through its adapter (tests/extract/test_family_extraction.py), so the default
    # admits all of them; a caller may still narrow the choice.
    for kind in ("siglip", "clip_vision_model", "dinov3_vit"):
        assert load_backbone(tiny_dirs[kind])[1].family == FAMILY_OF.get(kind, kind)
        with pytest.raises(UnsupportedBackboneError, match="only dinov2 backbones are accepted"):
            load_backbone(tiny_dirs[kind], allowed_families=("dinov2",))
    model, info = load_backbone(tiny_dirs["dinov2"], allowed_families=("dinov2",))
    assert info.family == "dinov2"


def test_image_normalization_prefers_the_checkpoints_preprocessor_config(tiny_dirs, tmp_path):
    family = FAMILIES["dinov3_vit"]
    assert backbones.image_normalization(family, tiny_dirs["dinov3_vit"]) == (family.mean, family.std)
    assert backbones.image_normalization(FAMILIES["clip"], None) == (FAMILIES["clip"].mean, FAMILIES["clip"].std)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.43, 0.411, 0.296], "image_std": [0.213, 0.156, 0.143]}))  # DINOv3 SAT-493M
    assert backbones.image_normalization(family, str(tmp_path)) == ((0.43, 0.411, 0.296), (0.213, 0.156, 0.143))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5], "image_std": [0.5]}))
    with pytest.raises(ValueError, match="preprocessor_config.json: image_mean and image_std must each be 3"):
        backbones.image_normalization(family, str(tmp_path))


# -- random init -----------------------------------------------------------------------------------------------

def test_random_init_of_a_directory_is_seeded_and_keeps_the_callers_rng(tiny_dirs):
    with pytest.warns(RandomWeightsWarning):
        a, info = load_backbone(tiny_dirs["siglip"], random_init=True, allowed_families=None)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    b, _ = load_backbone(tiny_dirs["siglip"], random_init=True, allowed_families=None)
    assert torch.equal(state, torch.get_rng_state())
    assert info.family == "siglip" and info.pretrained is False and info.random_init_seed == 0
    assert type(a).__name__ == "SiglipVisionModel"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name,family", [("facebook/dinov2-with-registers-small", "dinov2_with_registers"),
                                         ("facebook/dinov3-vits16-pretrain-lvd1689m", "dinov3_vit")])
def test_small_shipped_architectures_build_offline(name, family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model, info = load_backbone(name, random_init=True, allowed_families=None)
    assert info.family == family and info.hidden_size == 384 and info.pretrained is False
    assert sum(p.numel() for p in model.parameters()) == count_parameters(backbones.shipped_config_dict(name))
    with torch.no_grad():
        out = FAMILIES[family].forward(model.eval(), torch.randn(1, 3, 64, 64))
    assert out.last_hidden_state.shape[1] == PREFIX_TOKENS[family] + (64 // info.patch_size) ** 2


def test_shipped_config_returns_the_vision_tower():
    clip = shipped_config("openai/clip-vit-large-patch14")
    assert type(clip).__name__ == "CLIPVisionConfig" and clip.hidden_size == 1024 and clip.patch_size == 14
    siglip2 = shipped_config("google/siglip2-so400m-patch16-512")
    assert type(siglip2).__name__ == "SiglipVisionConfig" and siglip2.image_size == 512 and siglip2.patch_size == 16
    with pytest.raises(ValueError, match="no built-in architecture.*openai/clip-vit-large-patch14"):
        shipped_config("someone/other-model")


# -- parameter counts against the published ones -------------------------------------------------------------

# (shipped name, count the full dual-tower model?, published parameters, relative tolerance, source)
PUBLISHED = [
    # facebookresearch/dinov2 README, "Pretrained backbones (with registers)": 21 M / 86 M / 300 M, rounded;
    # ViT-S is listed as 21 M for 22.06 M parameters, hence 6 % there.
    ("dinov2-with-registers-small", False, 21e6, 0.06, "dinov2 README"),
    ("dinov2-with-registers-base", False, 86e6, 0.015, "dinov2 README"),
    ("dinov2-with-registers-large", False, 300e6, 0.02, "dinov2 README"),
    # facebookresearch/dinov3 README, "ViT models pretrained on web dataset (LVD-1689M)": 21M / 86M / 300M.
    ("dinov3-vits16-pretrain-lvd1689m", False, 21e6, 0.035, "dinov3 README"),
    ("dinov3-vitb16-pretrain-lvd1689m", False, 85.7e6, 0.001, "timm vit_base_patch16_dinov3_qkvb card: 85.7 M"),
    ("dinov3-vitl16-pretrain-lvd1689m", False, 300e6, 0.015, "dinov3 README"),
    # google/siglip-so400m-patch14-384 model card: 878M params (both towers); timm's SigLIP So400m image
    # encoders with the attention-pooling head (vit_so400m_patch14_siglip_*.webli cards): 428M params.
    ("siglip-so400m-patch14-384", True, 878e6, 0.001, "HF model card"),
    ("siglip-so400m-patch14-384", False, 428e6, 0.002, "timm card"),
    # google/siglip2-so400m-patch16-512 model card (F32 safetensors): 1,136,556,698 parameters.
    ("siglip2-so400m-patch16-512", True, 1_136_556_698, 1e-4, "HF model card"),
    # openai/clip-vit-large-patch14 model card: 428M params (both towers).
    ("clip-vit-large-patch14", True, 428e6, 0.002, "HF model card"),
]


@pytest.mark.parametrize("name,full,published,tol,source", PUBLISHED)
def test_shipped_parameter_counts_match_published(name, full, published, tol, source):
    counted = count_parameters(backbones.shipped_config_dict(name), full=full)
    assert abs(counted - published) <= tol * published, f"{name}: {counted:,} vs {published:,.0f} ({source})"


@pytest.mark.parametrize("size,hidden", [("small", 384), ("base", 768), ("large", 1024)])
def test_registers_add_exactly_four_tokens_to_dinov2(size, hidden):
    plain = count_parameters(backbones.shipped_config_dict(f"dinov2-{size}"))
    assert count_parameters(backbones.shipped_config_dict(f"dinov2-with-registers-{size}")) == plain + 4 * hidden
    if size == "large":
        assert plain == 304_368_640  # facebook/dinov2-large, as built by the seed's tests


@pytest.mark.slow
@pytest.mark.parametrize("name", backbones.shipped_names())
def test_every_shipped_architecture_builds_at_random_init(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model, info = load_backbone(name, random_init=True, allowed_families=None)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(backbones.shipped_config_dict(name))
    assert info.family == families.family_for(backbones.shipped_config_dict(name)["model_type"]).name


def test_a_dinov2_classifier_checkpoint_gives_its_backbone(tmp_path):
    # The classifier head is the one part of a DINO checkpoint allowed to stay unused.
    config = transformers.Dinov2Config(**TINY_FAMILIES["dinov2"][2], num_labels=3)
    torch.manual_seed(0)
    full = transformers.Dinov2ForImageClassification(config).eval()
    full.save_pretrained(tmp_path)
    model, info = load_backbone(str(tmp_path))
    images = _images(4)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixel_values=images).pooler_output,
                                   full.dinov2(pixel_values=images).pooler_output)


@pytest.mark.parametrize("model_type,rename", [
    # DINOv3 hub checkpoints name blocks `layer.N.` (transformers 4.x); 5.x models keep them under `model.`
    # and rename on load (and save in the hub layout, so the tiny checkpoint already has it).
    ("dinov3_vit", lambda k: k.replace("model.layer.", "layer.")),
    # 4.x vision-only SigLIP/CLIP checkpoints keep every weight under `vision_model.`.
    ("siglip_vision_model", lambda k: "vision_model." + k),
    ("clip_vision_model", lambda k: "vision_model." + k),
])
def test_checkpoints_in_the_older_key_layout_load_completely(tiny_dirs, tmp_path, model_type, rename):
    src = tiny_dirs[model_type]
    state = load_file(os.path.join(src, "model.safetensors"))
    renamed = {rename(k): v for k, v in state.items()}
    if model_type == "dinov3_vit":
        assert any(k.startswith("layer.0.") for k in renamed) and not any(k.startswith("model.") for k in renamed)
    else:
        assert renamed.keys() != state.keys()
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    model, family, _ = backbones.load_model(str(tmp_path))
    reference = _reference(src, model_type)
    images = _images(5)
    with torch.no_grad():
        torch.testing.assert_close(family.forward(model.eval(), images).last_hidden_state,
                                   reference(pixel_values=images).last_hidden_state)
