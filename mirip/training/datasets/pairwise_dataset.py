"""Pairs of drawings for training and evaluation: on image files (the seed's PairwiseDataset) or on cached features.

Both share the pair semantics of ``mirip.training.datasets.pair_sampling``:
cross-tier pairs only, label 1 when the first item is the better drawing and
-1 otherwise, both labels equally frequent, drawn afresh per epoch from
(seed, epoch) via ``set_epoch``, never enumerating all O(N^2) pairs.

``FeaturePairDataset`` is built for speed: the feature matrix is held once
(on the CPU or the GPU) and each *item is a whole batch*, gathered by tensor
indexing. It is its own loader - iterate it, or hand it to ``Trainer.fit`` -
and it never touches the global torch RNG (a ``DataLoader`` draws a base seed
from it on every ``iter()``, which would shift dropout masks).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mirip.common.tiers import rank_to_tier, tier_ranks
from mirip.ml.preprocessing import Preprocessor, load_image
from mirip.store.cache import FeatureCache, open_cache
from mirip.training.datasets.pair_sampling import BALANCES, all_cross_tier_pairs, count_cross_tier_pairs, sample_pairs

# PairwiseDataset's default length: every cross-tier pair for small sets, capped so large sets stay O(N).
DEFAULT_MAX_PAIRS = 10_000

Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_pairable(ranks: np.ndarray, what: str = "dataset") -> None:
    """A clear error when the tiers present cannot form a single cross-tier pair."""
    present = sorted({int(r) for r in np.asarray(ranks).tolist()}, reverse=True)
    if len(present) < 2:
        found = ", ".join(f"{rank_to_tier(r)} ({int((np.asarray(ranks) == r).sum())} images)" for r in present) or "no images"
        raise ValueError(f"{what} cannot form pairs: it needs drawings of at least two different tiers, found {found}")


class _PairSampler:
    """The per-epoch pair arrays shared by both datasets."""

    def __init__(self, ranks: np.ndarray, num_pairs: int, seed: int, balance: str, epoch: int, what: str,
                 each_once: bool = False):
        if balance not in BALANCES:
            raise ValueError(f"unknown pair balance {balance!r}; use one of {', '.join(BALANCES)}")
        if int(num_pairs) <= 0:
            raise ValueError(f"num_pairs must be positive, got {num_pairs}")
        check_pairable(ranks, what)
        self.ranks = np.asarray(ranks, dtype=np.int64)
        self.num_pairs, self.seed, self.balance = int(num_pairs), int(seed), balance
        # When every cross-tier pair fits in the pairs asked for, use each exactly once (no repeats, none missed).
        self.each_once = each_once and count_cross_tier_pairs(self.ranks) <= self.num_pairs
        if self.each_once:
            self.num_pairs = count_cross_tier_pairs(self.ranks)
        self.epoch = -1
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            if self.each_once:
                self.first, self.second, self.labels = all_cross_tier_pairs(self.ranks, self.seed, self.epoch)
                return
            self.first, self.second, self.labels = sample_pairs(
                self.ranks, self.num_pairs, seed=self.seed, epoch=self.epoch, balance=self.balance
            )


class PairwiseDataset(Dataset):
    """Pairs of image files: ``dataset[i] -> (img1, img2, label)`` as in the seed.

    ``len(dataset)`` is the number of pairs per epoch: ``num_pairs`` when given,
    else every cross-tier pair for small sets, capped at ``DEFAULT_MAX_PAIRS``
    (10,000). When the set's cross-tier pairs are no more than that, each is used
    exactly once per epoch (in a shuffled order and orientation, labels balanced)
    and the length is their count; otherwise pairs are sampled (with replacement).
    Both are drawn from ``seed`` and the epoch; ``set_epoch(e)`` draws epoch ``e``'s pairs. With ``transform=None`` images go
    through ``mirip.ml.preprocessing.Preprocessor`` (768 px, whole drawing kept);
    any callable taking a PIL image (a torchvision ``Compose``) may be passed.

    The default transform normalises with ImageNet mean/std, which is right for DINOv2 only. Given a
    ``backbone`` (a ``DINOv2FeatureExtractor`` or a full-image ``PairwiseRankingModel``), or once
    ``follow_backbone`` is called - ``Trainer`` and ``Evaluator`` do that for the full-image model they run -
    the default transform takes that backbone's family mean/std and patch size (SigLIP 0.5/0.5, CLIP its own
    statistics), exactly what extraction and full-image scoring use. A transform passed in is never changed.
    """

    SCORE_BATCH = 16  # images per forward when scoring each image once

    def __init__(
        self,
        metadata: pd.DataFrame,
        image_dir: str,
        transform: Optional[Callable] = None,
        tier_column: str = "tier",
        filename_column: str = "filename",
        *,
        num_pairs: Optional[int] = None,
        seed: int = 42,
        epoch: int = 0,
        balance: str = "tier_pair",
        backbone=None,
    ):
        if filename_column not in metadata.columns:
            raise ValueError(
                f"metadata has no filename column {filename_column!r} (columns: {', '.join(map(str, metadata.columns))})"
            )
        self.metadata = metadata.reset_index(drop=True)
        self.image_dir = str(image_dir)
        self.transform = transform if transform is not None else Preprocessor()
        self.default_transform = transform is None  # only a default transform may follow the backbone
        self.tier_column, self.filename_column = tier_column, filename_column
        ranks = tier_ranks(metadata, tier_column)
        self.paths = [os.path.join(self.image_dir, str(f)) for f in metadata[filename_column]]
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"Image not found: {missing[0]}{more}")
        if num_pairs is None:
            num_pairs = max(1, min(count_cross_tier_pairs(ranks), DEFAULT_MAX_PAIRS))
        self._pairs = _PairSampler(ranks, num_pairs, seed, balance, epoch, what="PairwiseDataset", each_once=True)
        if backbone is not None:
            self.follow_backbone(backbone)

    def follow_backbone(self, backbone) -> bool:
        """Point the default transform at ``backbone``'s preprocessing (its family's mean/std and patch size).

        ``backbone``: a ``DINOv2FeatureExtractor`` or a model holding one as ``feature_extractor``. Image size
        and resize mode stay as they are, except that a backbone which cannot interpolate its position
        embeddings gets its native size. Returns whether the transform changed; a transform the caller
        passed in is left alone (False)."""
        extractor = getattr(backbone, "feature_extractor", backbone)
        if not self.default_transform or not callable(getattr(extractor, "preprocessor", None)):
            return False
        current = self.transform
        size = current.image_size
        try:
            extractor.check_image_size(size)
        except ValueError:
            size = extractor.family.native_image_size(extractor.backbone.config)
        wanted = extractor.preprocessor(size, current.resize_mode, draft=current.draft,
                                        max_pixels=current.max_pixels, color_management=current.color_management)
        if wanted == current:
            return False
        self.transform = wanted
        return True

    @property
    def ranks(self) -> np.ndarray:
        return self._pairs.ranks

    @property
    def num_images(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self._pairs.set_epoch(epoch)

    def pair_arrays(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first, second, labels) image indices of this epoch's pairs."""
        return self._pairs.first, self._pairs.second, self._pairs.labels

    def load(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        if isinstance(self.transform, Preprocessor):
            return self.transform(path)  # path in: lets JPEG decoding downscale early
        return self.transform(load_image(path))

    def image_batches(self, batch_size: int) -> Iterator[Tuple[np.ndarray, torch.Tensor]]:
        """(indices, images) over every image once, for scoring each image a single time."""
        for start in range(0, self.num_images, batch_size):
            idx = np.arange(start, min(start + batch_size, self.num_images))
            yield idx, torch.stack([self.load(int(i)) for i in idx])

    def __len__(self) -> int:
        return self._pairs.num_pairs

    def __getitem__(self, idx: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"pair index {idx} out of range for {len(self)} pairs")
        first, second, labels = self.pair_arrays()
        return self.load(int(first[idx])), self.load(int(second[idx])), int(labels[idx])


def image_pair_loader(dataset: PairwiseDataset, batch_size: int = 32, num_workers: int = 0, seed: int = 42,
                      pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over image pairs in the dataset's (already random) pair order.

    It has its own seeded generator, so iterating it never draws from the global torch
    RNG that dropout uses; workers decode images in parallel.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(int(seed)), persistent_workers=False,
    )


class FeaturePairDataset(Dataset):
    """Pairs of cached features, one *batch* per item: ``dataset[b] -> (f1 (B, D), f2 (B, D), labels (B,))``.

    ``features`` is the (M, D) matrix (float32 or float16, CPU or GPU; batches come out
    as float32); ``rows`` picks this split's images from it (default: all), so train,
    val and test can share one matrix without copies. ``ranks`` (S=3 ... C=0) are
    per image of the split. Epoch ``e``'s pairs are ``sample_pairs(ranks, num_pairs,
    seed, e, balance)``, cut into consecutive batches of ``batch_size`` (the last
    one partial). ``names`` (the image paths) make error messages point at files.
    """

    SCORE_BATCH = 4096

    def __init__(
        self,
        features: torch.Tensor,
        ranks: Union[np.ndarray, Sequence[int]],
        *,
        rows: Optional[Union[np.ndarray, torch.Tensor]] = None,
        num_pairs: int = 10_000,
        batch_size: int = 32,
        seed: int = 42,
        epoch: int = 0,
        balance: str = "tier_pair",
        names: Optional[Sequence[str]] = None,
        check_finite: bool = True,
        what: str = "feature dataset",
    ):
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            raise ValueError(f"features must be a (N, D) tensor, got {getattr(features, 'shape', type(features))}")
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.features = features
        self.device = features.device
        rows_t = torch.arange(features.shape[0]) if rows is None else torch.from_numpy(np.array(rows, dtype=np.int64))
        ranks = np.asarray(ranks, dtype=np.int64)
        if len(ranks) != len(rows_t):
            raise ValueError(f"{what}: {len(ranks)} ranks for {len(rows_t)} images")
        if len(rows_t) and (int(rows_t.min()) < 0 or int(rows_t.max()) >= features.shape[0]):
            raise IndexError(f"{what}: rows out of range for a feature matrix of {features.shape[0]} rows")
        self.rows = rows_t.to(self.device)
        self.names = list(names) if names is not None else None
        self.what = what
        if check_finite:
            self._check_finite()
        self.batch_size = int(batch_size)
        self._pairs = _PairSampler(ranks, num_pairs, seed, balance, epoch, what=what)
        self._gather_index()

    @classmethod
    def from_cache(
        cls,
        cache: Union[str, FeatureCache],
        metadata: pd.DataFrame,
        *,
        filename_column: str = "filename",
        tier_column: str = "tier",
        expected_fingerprint: Optional[Mapping] = None,
        device: str = "cpu",
        feature: Optional[str] = None,
        **kwargs,
    ) -> "FeaturePairDataset":
        """One split straight from a cache file: tiers checked, rows looked up, features loaded once.

        ``feature``: the feature spec to read (``cls@-4,-3,-2,-1+mean@-1``); None: the cache's default spec
        (its only entry, else ``cls@-1``). No per-entry scaling is applied here."""
        owned = isinstance(cache, str)
        cache = open_cache(cache) if owned else cache
        try:
            if expected_fingerprint is not None:
                cache.check_fingerprint(expected_fingerprint)
            ranks = tier_ranks(metadata, tier_column)
            if filename_column not in metadata.columns:
                raise ValueError(f"metadata has no filename column {filename_column!r}")
            names = [str(f) for f in metadata[filename_column]]
            spec = feature or cache.default_spec
            features = torch.from_numpy(cache.features(cache.rows_for(names), spec=spec)).to(device)
        finally:
            if owned:
                cache.close()
        return cls(features, ranks, names=names, **kwargs)

    def _check_finite(self) -> None:
        bad = []
        for start in range(0, len(self.rows), 65_536):  # chunked: no full float32 copy of a huge fp16 matrix
            chunk = self.features.index_select(0, self.rows[start:start + 65_536])
            finite = torch.isfinite(chunk).all(dim=1)
            bad.extend((start + torch.nonzero(~finite).flatten()).tolist())
        if bad:
            label = (lambda i: f"{i} ({self.names[i]})") if self.names else str
            shown = ", ".join(label(i) for i in bad[:10]) + (f" ... ({len(bad)} in all)" if len(bad) > 10 else "")
            raise ValueError(f"{self.what}: NaN or infinite features in {len(bad)} image(s), rows {shown}; "
                             "re-extract those images")

    def _gather_index(self) -> None:
        # Per epoch, once: image indices -> matrix rows, on the feature device, so a batch is two index_selects.
        first, second, labels = self.pair_arrays()
        self._first = self.rows[torch.from_numpy(first).to(self.device)]
        self._second = self.rows[torch.from_numpy(second).to(self.device)]
        self._labels = torch.from_numpy(labels).to(self.device)

    @property
    def ranks(self) -> np.ndarray:
        return self._pairs.ranks

    @property
    def num_images(self) -> int:
        return len(self.rows)

    @property
    def num_pairs(self) -> int:
        return self._pairs.num_pairs

    @property
    def epoch(self) -> int:
        return self._pairs.epoch

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self._pairs.epoch:
            self._pairs.set_epoch(epoch)
            self._gather_index()

    def pair_arrays(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first, second, labels) as indices into this split's images, for the current epoch."""
        return self._pairs.first, self._pairs.second, self._pairs.labels

    def epoch_index(self) -> torch.Tensor:
        """This epoch's pairs as one (3, P) int64 tensor on the feature device: matrix rows of the first and
        second image, and the labels. Batch ``b`` is columns ``[b * batch_size, (b + 1) * batch_size)``."""
        return torch.stack([self._first, self._second, self._labels])

    def image_features(self, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Features of this split's images [start, stop) as float32, for scoring each image once."""
        return self.features.index_select(0, self.rows[start:stop]).float()

    def image_batches(self, batch_size: int) -> Iterator[Tuple[np.ndarray, torch.Tensor]]:
        for start in range(0, self.num_images, batch_size):
            stop = min(start + batch_size, self.num_images)
            yield np.arange(start, stop), self.image_features(start, stop)

    def __len__(self) -> int:
        return math.ceil(self._pairs.num_pairs / self.batch_size)

    def __getitem__(self, b: int) -> Batch:
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} out of range for {len(self)} batches")
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        f1 = self.features.index_select(0, self._first[sl])
        f2 = self.features.index_select(0, self._second[sl])
        return f1.float(), f2.float(), self._labels[sl]

    def __iter__(self) -> Iterator[Batch]:
        for b in range(len(self)):
            yield self[b]
