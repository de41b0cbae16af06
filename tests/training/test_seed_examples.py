"""The seed's training-side examples, run as written with imports mapped to mirip and .cuda() swapped for CPU.

The model is the full-image PairwiseRankingModel on a tiny local DINOv2, fed by plain DataLoaders over the
image-file PairwiseDataset, exactly as the seed's examples wire them.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import make_image
from mirip.ml.preprocessing import Preprocessor
from mirip.ml.ranking_model import PairwiseRankingModel
from mirip.training.config import TrainingConfig
from mirip.training.datasets.data_splitter import DataSplitter
from mirip.training.datasets.pairwise_dataset import PairwiseDataset
from mirip.training.evaluator import Evaluator
from mirip.training.trainer import Trainer


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """data/metadata.csv + data/images with 20 images, five per tier, relative to the working directory."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    rows = [{"filename": f"d{i:02d}.png", "tier": "SABC"[i % 4]} for i in range(20)]
    for i, row in enumerate(rows):
        make_image(images / row["filename"], size=(30, 30), seed=i)
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "metadata.csv", index=False)
    monkeypatch.chdir(tmp_path)  # the seed's paths are relative, and Trainer writes ./checkpoints
    return tmp_path


def test_seed_training_examples_run_as_written(data_dir, tiny_backbone):
    torch.set_num_threads(1)
    transform = Preprocessor(image_size=28)

    # DataSplitter example
    splitter = DataSplitter(train_ratio=0.8, val_ratio=0.1, test_ratio=0.1, stratify_column="tier")
    data = pd.read_csv("data/metadata.csv")
    train_df, val_df, test_df = splitter.split(data)
    assert (len(train_df), len(val_df), len(test_df)) == (16, 2, 2)

    # PairwiseDataset example
    metadata = pd.read_csv("data/metadata.csv")
    dataset = PairwiseDataset(metadata=metadata, image_dir="data/images", transform=transform)
    img1, img2, label = dataset[0]
    assert len(dataset) > 0 and img1.shape == (3, 28, 28) and label in (1, -1)

    # TrainingConfig / Trainer example (wandb left off: it is not installed in the test environment)
    model = PairwiseRankingModel(tiny_backbone, device="cpu")
    make = lambda df: DataLoader(PairwiseDataset(df, "data/images", transform=transform), batch_size=8)  # noqa: E731
    train_loader, val_loader, test_loader = make(train_df), make(pd.concat([val_df, test_df])), make(test_df)
    config = TrainingConfig(max_epochs=3, device="cpu")
    trainer = Trainer(model=model, config=config)
    history = trainer.fit(train_loader, val_loader)
    print(f"최종 학습 손실: {history['train_loss'][-1]:.4f}")
    print(f"최종 검증 정확도: {history['val_acc'][-1]:.2%}")
    assert set(history) >= {"train_loss", "val_loss", "train_acc", "val_acc"} and len(history["train_loss"]) == 3
    assert (data_dir / "checkpoints").is_dir()

    # Evaluator example
    evaluator = Evaluator(model=model, device="cpu")
    accuracy = evaluator.evaluate(test_loader)
    results = evaluator.evaluate_detailed(test_loader)
    print(f"정확한 예측: {results['correct_predictions']}/{results['total_pairs']}")
    assert 0.0 <= accuracy <= 1.0 and results["total_pairs"] == len(test_loader.dataset)
    assert results["accuracy"] == pytest.approx(results["correct_predictions"] / results["total_pairs"])
    prediction, s1, s2 = evaluator.predict_pair(img1[None], img2[None])
    assert prediction in (1, -1, 0) and isinstance(s1, float) and isinstance(s2, float)


def test_seed_config_example():
    config = TrainingConfig(learning_rate=1e-4, batch_size=32, max_epochs=100, wandb_enabled=True,
                            wandb_project="mirip-ranking")
    assert config.wandb_project == "mirip-ranking" and config.device == "cuda" and config.seed == 42
