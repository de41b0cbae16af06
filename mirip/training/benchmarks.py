"""The seed's ``training.benchmarks`` import path: ``PerformanceBenchmarks`` and ``set_seed``.

The benchmarks themselves live with the others in ``mirip.bench`` (``mirip.bench.performance``).
"""

from mirip.bench.machine import device_name
from mirip.bench.performance import PerformanceBenchmarks
from mirip.seeding import set_seed

__all__ = ["PerformanceBenchmarks", "set_seed", "device_name"]
