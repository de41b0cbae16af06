"""Benchmarks of full-image mode (PerformanceBenchmarks) and the seed's ``set_seed``."""

from __future__ import annotations

from mirip.seeding import set_seed

__all__ = ["set_seed"]
