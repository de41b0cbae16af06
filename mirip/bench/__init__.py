"""Every benchmark of ``scripts/benchmark.py``, each beside its baseline in one run, and the GPU suite.

Nothing in the library imports this package: the seed's ``PerformanceBenchmarks`` lives with training
(``mirip.training.benchmarks``).
"""
