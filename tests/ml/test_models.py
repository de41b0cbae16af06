"""The seed's model API: extractor, projector, ranking model, loss, freezing, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mirip.ml.backbones import RandomWeightsWarning, load_backbone, shipped_config
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.projector import Projector
from mirip.ml.ranking_model import PairwiseRankingModel, RankingHead
from mirip.training.benchmarks import set_seed


def test_seed_extractor_example(tiny_backbone):
    # Seed example with the import mapped and .cuda() swapped for the available device.
    extractor = DINOv2FeatureExtractor(tiny_backbone, device="cpu")
    images = torch.randn(4, 3, 56, 56)
    features = extractor.extract(images)
    assert features.shape == torch.Size([4, extractor.output_dim]) and extractor.output_dim == 32
    assert extractor.device == "cpu"
    assert torch.equal(extractor(images), features)


def test_seed_projector_example():
    projector = Projector(input_dim=1024, output_dim=256)
    embeddings = projector(torch.randn(4, 1024))
    assert embeddings.shape == torch.Size([4, 256])
    layers = [type(m) for m in projector.net]
    assert layers == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Dropout, nn.Linear, nn.LayerNorm]
    assert (projector.hidden_dim, projector.dropout) == (512, 0.1)


def test_seed_ranking_model_example(tiny_backbone):
    model = PairwiseRankingModel(tiny_backbone, device="cpu")
    img1, img2 = torch.randn(4, 3, 56, 56), torch.randn(4, 3, 56, 56)
    score1, score2 = model(img1, img2)
    assert score1.shape == score2.shape == torch.Size([4, 1])
    labels = torch.tensor([1, -1, 1, -1])
    loss = model.compute_loss(score1, score2, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert isinstance(model.feature_extractor, DINOv2FeatureExtractor)
    assert isinstance(model.projector, Projector) and isinstance(model.score_head, nn.Sequential)
    assert isinstance(model.loss_fn, nn.MarginRankingLoss) and model.loss_fn.margin == 1.0
    assert model.get_score(img1).shape == (4, 1)


def test_default_signatures():
    import inspect

    sig = inspect.signature(PairwiseRankingModel.__init__).parameters
    assert sig["backbone_name"].default == "facebook/dinov2-large"
    assert sig["projector_output_dim"].default == 256
    assert sig["freeze_backbone"].default is True and sig["margin"].default == 1.0 and sig["device"].default is None
    ext = inspect.signature(DINOv2FeatureExtractor.__init__).parameters
    assert ext["model_name"].default == "facebook/dinov2-large" and ext["device"].default is None


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0])
def test_loss_matches_naive_loop(dtype, tol, margin):
    head = RankingHead(input_dim=8, margin=margin)
    g = torch.Generator().manual_seed(1)
    s1, s2 = torch.randn(16, 1, generator=g, dtype=dtype), torch.randn(16, 1, generator=g, dtype=dtype)
    labels = torch.where(torch.rand(16, generator=g) > 0.5, 1, -1)
    naive = sum(max(0.0, -int(y) * (a.item() - b.item()) + margin) for a, b, y in zip(s1, s2, labels)) / 16
    got = head.compute_loss(s1, s2, labels)
    ref = nn.MarginRankingLoss(margin=margin)(s1.view(-1), s2.view(-1), labels.to(dtype))
    assert abs(got.item() - naive) < tol * 10 and torch.allclose(got, ref, atol=tol)


def test_loss_zero_when_no_violation():
    head = RankingHead(input_dim=8, margin=1.0)
    s1, s2 = torch.tensor([[5.0], [0.0]]), torch.tensor([[1.0], [4.0]])
    assert head.compute_loss(s1, s2, torch.tensor([1, -1])).item() == 0.0


def test_gradients_flow_only_into_head_when_frozen(tiny_backbone):
    model = PairwiseRankingModel(tiny_backbone, device="cpu")
    model.train()
    assert not model.feature_extractor.backbone.training  # frozen backbone stays in eval mode
    s1, s2 = model(torch.randn(2, 3, 28, 28), torch.randn(2, 3, 28, 28))
    model.compute_loss(s1, s2, torch.tensor([1, -1])).backward()
    assert all(p.grad is None for p in model.feature_extractor.parameters())
    head = [p for n, p in model.named_parameters() if n.startswith(("projector.", "score_head."))]
    assert head and all(p.grad is not None for p in head)
    assert all(not p.requires_grad for p in model.feature_extractor.parameters())


def test_unfrozen_backbone_gets_gradients(tiny_backbone):
    model = PairwiseRankingModel(tiny_backbone, device="cpu", freeze_backbone=False)
    s1, s2 = model(torch.randn(2, 3, 28, 28), torch.randn(2, 3, 28, 28))
    model.compute_loss(s1, s2, torch.tensor([1, -1])).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.feature_extractor.parameters())


def test_head_state_dict_moves_between_forms(tiny_backbone):
    full = PairwiseRankingModel(tiny_backbone, device="cpu", margin=0.5).eval()
    head = RankingHead(**full.head_config()).eval()
    head.load_head_state_dict(full.head_state_dict())
    assert set(head.state_dict()) == set(full.head_state_dict())
    images = torch.randn(3, 3, 28, 28)
    features = full.feature_extractor.extract(images)
    assert torch.allclose(head.get_score(features), full.get_score(images), atol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [torch.randn(3, 28, 28), torch.randn(1, 1, 28, 28), torch.randn(1, 4, 28, 28), torch.zeros(1, 3, 28, 28, dtype=torch.uint8)],
)
def test_bad_image_tensors_name_expected_shape(tiny_backbone, bad):
    extractor = DINOv2FeatureExtractor(tiny_backbone, device="cpu")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        extractor.extract(bad)


def test_bad_feature_shape_for_head():
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        RankingHead(input_dim=8).get_score(torch.randn(2, 9))


@pytest.mark.slow  # ~10 s on 2 cores; the meta-device parameter counts of tests/ml/test_families.py run by default
def test_dinov2_large_builds_offline_with_random_weights():
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
        model, info = load_backbone("facebook/dinov2-large", random_init=True)
    assert sum(p.numel() for p in model.parameters()) == 304_368_640
    assert info.pretrained is False and info.hidden_size == 1024 and info.patch_size == 14


@pytest.mark.parametrize("name,hidden", [("dinov2-small", 384), ("dinov2-base", 768), ("facebook/dinov2-giant", 1536)])
def test_shipped_configs(name, hidden):
    assert shipped_config(name).hidden_size == hidden


def test_random_weights_are_reproducible(tmp_path):
    a, _ = load_backbone("facebook/dinov2-small", random_init=True)
    torch.manual_seed(123)  # the caller's RNG must not matter ...
    b, _ = load_backbone("facebook/dinov2-small", random_init=True)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    state = torch.get_rng_state()
    load_backbone("facebook/dinov2-small", random_init=True)
    assert torch.equal(state, torch.get_rng_state())  # ... nor be changed


def test_unknown_model_name_says_what_to_do():
    with pytest.raises(OSError, match="random_init=True"):
        load_backbone("facebook/dinov2-nonexistent")
    with pytest.raises(ValueError, match="no built-in architecture"):
        load_backbone("someone/other-model", random_init=True)


def test_missing_directory_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(str(tmp_path / "missing" / "dir"))


def test_pooling_and_precision_options(tiny_backbone):
    images = torch.randn(2, 3, 28, 28)
    cls = DINOv2FeatureExtractor(tiny_backbone, device="cpu")
    both = DINOv2FeatureExtractor(tiny_backbone, device="cpu", pooling="cls_mean")
    assert both.output_dim == 64 and torch.allclose(both.extract(images)[:, :32], cls.extract(images), atol=1e-6)
    bf16 = DINOv2FeatureExtractor(tiny_backbone, device="cpu", precision="bf16")
    out = bf16.extract(images)
    assert out.dtype == torch.float32 and torch.allclose(out, cls.extract(images), atol=0.1)
    assert cls.precision == "fp32"
    with pytest.raises(ValueError, match="pooling"):
        DINOv2FeatureExtractor(tiny_backbone, device="cpu", pooling="max")


def test_cuda_request_without_cuda_falls_back(tiny_backbone):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        extractor = DINOv2FeatureExtractor(tiny_backbone, device="cuda")
    assert extractor.device == "cpu"


def test_set_seed_example():
    set_seed(42)
    tensor1 = torch.randn(10, 10)
    set_seed(42)
    tensor2 = torch.randn(10, 10)
    assert torch.allclose(tensor1, tensor2)
    assert torch.backends.cudnn.deterministic
