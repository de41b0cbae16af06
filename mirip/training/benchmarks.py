"""The seed's ``PerformanceBenchmarks``: full-image mode's time and memory, and the training-time estimate.

Imported by the seed's path ``mirip.training.benchmarks`` (with ``set_seed``).

Every figure is measured on synthetic inputs of the requested size: per-pair
inference time after warm-up, peak memory at a batch (on CUDA the caching
allocator's peak, on CPU the process's peak RSS, reset before each measurement
where Linux allows it), and step times from which the training-time estimate
is extrapolated. The estimate compares the two ways of training: end to end
(the backbone runs on both images of every pair in every step, as the seed
assumed) and two-stage (extract every image once, then train the head alone
on cached features).
"""

from __future__ import annotations

import ctypes
import gc
import math
import random
import platform
import resource
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from mirip.common.devices import device_type, resolve_device
from mirip.common.machine import device_name

__all__ = ["PerformanceBenchmarks", "set_seed"]

GB = 1024 ** 3
MB = 1024 ** 2


def _rss_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def _release_free_heap() -> None:
    # Freed memory that glibc keeps mapped would be reused without raising RSS, hiding what a
    # measurement needs; hand it back first so the peak counts the measured work's own pages.
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); elsewhere the peak is the process's lifetime peak.
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PerformanceBenchmarks:
    """Speed, memory and reproducibility of a full-image ``PairwiseRankingModel`` (or a head on features)."""

    MAX_INFERENCE_TIME_SECONDS = 0.1
    MAX_MEMORY_GB = 12.0
    TARGET_TRAINING_HOURS = 6.0

    def __init__(self, model: nn.Module, device: Optional[str] = None):
        self.model = model
        self.device = resolve_device(device if device is not None else getattr(model, "device", None))
        model.to(self.device)
        # The extractor moves its inputs to its own recorded device; keep it in step with where the model now is.
        for owner in (model, getattr(model, "feature_extractor", None)):
            if owner is not None and hasattr(owner, "device"):
                owner.device = self.device
        self.memory_method = "cuda_max_memory_allocated" if self._cuda else "peak_rss"
        self.last_training_estimate: Optional[Dict[str, Any]] = None
        self.last_reproducibility: Optional[Dict[str, Any]] = None

    # --- helpers -------------------------------------------------------------------------------
    @property
    def _cuda(self) -> bool:
        return device_type(self.device) == "cuda"

    @property
    def precision(self) -> str:
        ext = getattr(self.model, "feature_extractor", None)
        return getattr(ext, "precision", "fp32")

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)  # CPU-GPU sync point: kernels are asynchronous

    def _inputs(self, batch: int, image_size: int) -> torch.Tensor:
        """Synthetic images (B, 3, S, S), or (B, D) features for a head-only model."""
        if hasattr(self.model, "feature_extractor"):
            return torch.randn(batch, 3, image_size, image_size, device=self.device)
        return torch.randn(batch, int(getattr(self.model, "input_dim")), device=self.device)

    @contextmanager
    def _peak_memory(self, out: Dict[str, int]):
        """Measures the peak memory of the block into ``out['bytes']``."""
        if self._cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_rss_peak():
            self.memory_method = "peak_rss_lifetime"
        yield
        self._sync()
        out["bytes"] = int(torch.cuda.max_memory_allocated(self.device) if self._cuda else _rss_peak_bytes())

    def _timed(self, fn: Callable[[], Any], warmup: int, repeats: int) -> List[float]:
        for _ in range(warmup):
            fn()
        self._sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            self._sync()
            times.append(time.perf_counter() - t0)
        return times

    def _trainable(self) -> List[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters to benchmark a training step with")
        return params

    @contextmanager
    def _restored(self):
        """Training benchmarks take real optimizer steps; put the weights and mode back afterwards."""
        was_training = self.model.training
        saved = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n in saved:
                        p.copy_(saved[n])
                    p.grad = None
            self.model.train(was_training)

    def _train_step_fn(self, batch_size: int, image_size: int) -> Callable[[], None]:
        """One seed-style step on a batch of pairs: forward both images, margin loss, backward, clip, AdamW."""
        params = self._trainable()
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        x1, x2 = self._inputs(batch_size, image_size), self._inputs(batch_size, image_size)
        labels = torch.ones(batch_size, device=self.device)
        labels[::2] = -1

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            s1, s2 = self.model(x1, x2)
            loss = self.model.compute_loss(s1, s2, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

        return step

    # --- the seed's methods --------------------------------------------------------------------
    def measure_inference_time(self, num_pairs: int = 100, warmup_iterations: int = 10, image_size: int = 768) -> float:
        """Mean seconds to score one pair (two images, batch of one pair), after ``warmup_iterations`` pairs."""
        if num_pairs <= 0:
            raise ValueError(f"num_pairs must be positive, got {num_pairs}")
        self.model.eval()
        x1, x2 = self._inputs(1, image_size), self._inputs(1, image_size)
        with torch.inference_mode():
            times = self._timed(lambda: self.model(x1, x2), warmup_iterations, num_pairs)
        return sum(times) / len(times)

    def measure_memory_usage(self, batch_size: int = 32, image_size: int = 768) -> int:
        """Peak bytes while scoring one batch of ``batch_size`` images (weights included)."""
        self.model.eval()
        out: Dict[str, int] = {}
        with self._peak_memory(out), torch.inference_mode():
            self.model.get_score(self._inputs(batch_size, image_size))
        return out["bytes"]

    def measure_training_memory(self, batch_size: int = 32, image_size: int = 768) -> float:
        """Peak GB during one end-to-end training step on ``batch_size`` pairs (optimizer state included)."""
        out: Dict[str, int] = {}
        with self._restored():
            self.model.train()
            with self._peak_memory(out):
                self._train_step_fn(batch_size, image_size)()
        return out["bytes"] / GB

    def measure_throughput(self, batch_size: int = 32, image_size: int = 768, iterations: int = 3,
                           warmup_iterations: int = 1) -> float:
        """Images per second when scoring batches of ``batch_size`` images."""
        self.model.eval()
        x = self._inputs(batch_size, image_size)
        with torch.inference_mode():
            times = self._timed(lambda: self.model.get_score(x), warmup_iterations, iterations)
        return batch_size / statistics.median(times)

    def training_time_estimate(
        self, num_epochs: int = 100, samples_per_epoch: int = 10000, batch_size: int = 32, *,
        image_size: int = 768, num_images: Optional[int] = None, extraction_batch_size: Optional[int] = None,
        timed_steps: int = 3, warmup_steps: int = 1, head_steps: int = 50,
    ) -> Dict[str, Any]:
        """End-to-end vs two-stage training time, extrapolated from measured step times.

        ``samples_per_epoch`` pairs per epoch in steps of ``batch_size`` pairs. End to end, every step runs the
        backbone on both images of every pair. Two-stage extracts ``num_images`` images once (default: as many
        as pairs per epoch, i.e. a dataset the size of an epoch) and then trains the head on cached features
        for the same number of steps. Image decoding is not included in either (it would add to end to end).
        """
        if min(num_epochs, samples_per_epoch, batch_size) <= 0:
            raise ValueError("num_epochs, samples_per_epoch and batch_size must be positive")
        num_images = int(num_images if num_images is not None else samples_per_epoch)
        extraction_batch_size = int(extraction_batch_size or 2 * batch_size)
        steps_per_epoch = math.ceil(samples_per_epoch / batch_size)
        total_steps = num_epochs * steps_per_epoch

        with self._restored():
            self.model.train()
            e2e_step = statistics.median(self._timed(self._train_step_fn(batch_size, image_size), warmup_steps,
                                                     timed_steps))
        extract_per_image = self._extraction_seconds_per_image(extraction_batch_size, image_size, warmup_steps,
                                                               timed_steps)
        head_step, head_method = self._head_step_seconds(batch_size, head_steps)

        e2e = total_steps * e2e_step
        extraction = num_images * extract_per_image
        head = total_steps * head_step
        two_stage = extraction + head
        self.last_training_estimate = {
            "num_epochs": num_epochs, "samples_per_epoch": samples_per_epoch, "batch_size": batch_size,
            "image_size": image_size, "num_images": num_images, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "extraction_batch_size": extraction_batch_size,
            "end_to_end_step_seconds": e2e_step, "extraction_seconds_per_image": extract_per_image,
            "head_step_seconds": head_step, "head_step_measured_with": head_method,
            "end_to_end_seconds": e2e, "end_to_end_hours": e2e / 3600,
            "two_stage_extraction_seconds": extraction, "two_stage_head_seconds": head,
            "two_stage_seconds": two_stage, "two_stage_hours": two_stage / 3600,
            "speedup": e2e / two_stage if two_stage > 0 else float("inf"),
            "meets_target_end_to_end": e2e / 3600 <= self.TARGET_TRAINING_HOURS,
            "meets_target_two_stage": two_stage / 3600 <= self.TARGET_TRAINING_HOURS,
            "target_training_hours": self.TARGET_TRAINING_HOURS,
        }
        return self.last_training_estimate

    def estimate_training_time(self, num_epochs: int = 100, samples_per_epoch: int = 10000,
                               batch_size: int = 32, **kwargs: Any) -> float:
        """Hours to train end to end (the seed's assumption); the two-stage figure and the ratio are in
        ``last_training_estimate`` (see ``training_time_estimate`` for the keyword options)."""
        return self.training_time_estimate(num_epochs, samples_per_epoch, batch_size, **kwargs)["end_to_end_hours"]

    def _extraction_seconds_per_image(self, batch: int, image_size: int, warmup: int, repeats: int) -> float:
        extractor = getattr(self.model, "feature_extractor", None)
        if extractor is None:
            return 0.0  # a head-only model has nothing to extract
        x = self._inputs(batch, image_size)
        return statistics.median(self._timed(lambda: extractor.extract(x), warmup, repeats)) / batch

    def _head_step_seconds(self, batch_size: int, steps: int) -> Tuple[float, str]:
        """Seconds per stage-two step, and how it was measured.

        Stage two's own ``Trainer.train_epoch`` over a ``FeaturePairDataset`` (pairs gathered by tensor
        indexing from an in-memory feature matrix).
        """
        from mirip.ml.ranking_model import RankingHead

        dims = self.model.head_config() if hasattr(self.model, "head_config") else {}
        head = RankingHead(**dims).to(self.device)
        features = torch.randn(4096, head.input_dim, device=self.device)
        warmup = max(1, min(10, steps))
        from mirip.training.config import TrainingConfig
        from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
        from mirip.training.trainer import Trainer

        ranks = (torch.arange(features.shape[0]) % 4).numpy()
        config = TrainingConfig(device=str(self.device), batch_size=batch_size, checkpoint_dir="", seed=0)
        trainer = Trainer(head, config, progress=False)

        def epoch(num_steps: int, seed: int) -> float:
            data = FeaturePairDataset(features, ranks, num_pairs=num_steps * batch_size, batch_size=batch_size,
                                      seed=seed)
            self._sync()
            t0 = time.perf_counter()
            trainer.train_epoch(data)  # ends by reading the loss: synchronised
            return time.perf_counter() - t0

        epoch(warmup, seed=0)
        return epoch(steps, seed=1) / steps, "Trainer.train_epoch on FeaturePairDataset"

    def validate_reproducibility(self, dataloader: Iterable, seed: int = 42, num_runs: int = 2) -> Tuple[bool, float]:
        """Evaluate ``num_runs`` times from ``set_seed(seed)``; (all runs agree, largest accuracy difference).

        Agreement means equal pairwise accuracy and scores equal within the precision's tolerance; the
        per-run accuracies and the largest score difference are kept in ``last_reproducibility``.
        """
        if num_runs < 2:
            raise ValueError(f"num_runs must be at least 2 to compare runs, got {num_runs}")
        accuracies, score_runs = [], []
        for _ in range(num_runs):
            set_seed(seed)
            acc, scores = self._pairwise_accuracy(dataloader)
            accuracies.append(acc)
            score_runs.append(scores)
        acc_diff = max(accuracies) - min(accuracies)
        score_diff = max(float((s - score_runs[0]).abs().max()) if s.numel() else 0.0 for s in score_runs)
        tolerance = 1e-5 if self.precision == "fp32" else 1e-2
        ok = acc_diff == 0.0 and score_diff <= tolerance
        self.last_reproducibility = {"accuracies": accuracies, "accuracy_difference": acc_diff,
                                     "max_score_difference": score_diff, "score_tolerance": tolerance,
                                     "seed": seed, "num_runs": num_runs, "reproducible": ok}
        return ok, acc_diff

    @torch.inference_mode()
    def _pairwise_accuracy(self, dataloader: Iterable) -> Tuple[float, torch.Tensor]:
        self.model.eval()
        correct, total, scores = 0, 0, []
        for batch in dataloader:
            img1, img2, labels = batch[0], batch[1], batch[2]
            s1, s2 = self.model(img1.to(self.device), img2.to(self.device))
            labels = torch.as_tensor(labels, device=self.device).reshape(-1)
            # A tie predicts neither image, so it counts as wrong (the seed's predict_pair returns 0).
            pred = torch.sign(s1.reshape(-1) - s2.reshape(-1))
            correct += int((pred == labels.to(pred.dtype)).sum())
            total += labels.numel()
            scores.append(torch.cat([s1.reshape(-1), s2.reshape(-1)]).float().cpu())
        if total == 0:
            raise ValueError("dataloader yielded no pairs")
        return correct / total, torch.cat(scores)

    def run_full_benchmark(self, batch_size: int = 32, image_size: int = 768, *, num_pairs: int = 100,
                           warmup_iterations: int = 10, throughput_iterations: int = 3) -> Dict[str, Any]:
        """The seed's report (every seed key), plus throughput, device name, precision and memory method."""
        per_pair = self.measure_inference_time(num_pairs, warmup_iterations, image_size)
        memory = self.measure_memory_usage(batch_size, image_size)
        images_per_second = self.measure_throughput(batch_size, image_size, iterations=throughput_iterations)
        return {
            "inference_time_per_pair": per_pair,
            "inference_time_ms": per_pair * 1000.0,
            "memory_usage_bytes": memory,
            "memory_usage_mb": memory / MB,
            "memory_usage_gb": memory / GB,
            "device": str(self.device),
            "batch_size": batch_size,
            "image_size": image_size,
            "meets_inference_requirement": per_pair <= self.MAX_INFERENCE_TIME_SECONDS,
            "meets_memory_requirement": memory / GB <= self.MAX_MEMORY_GB,
            "requirements": {
                "max_inference_time_ms": self.MAX_INFERENCE_TIME_SECONDS * 1000.0,
                "max_memory_gb": self.MAX_MEMORY_GB,
            },
            "images_per_second": images_per_second,
            "device_name": device_name(str(self.device)),
            "precision": self.precision,
            "memory_method": self.memory_method,
            "num_pairs": num_pairs,
            "warmup_iterations": warmup_iterations,
        }

def set_seed(seed: int = 42) -> None:
    """Seed Python, NumPy, torch (CPU and every CUDA device) and make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    # Deterministic kernels cost some speed; the seed's contract is identical results.
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
