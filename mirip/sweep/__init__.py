"""Ablation sweeps: many ranking heads trained together in one pass over the cached features.

``SweepGrid`` (grid.py) lists the configurations; ``StackedHeads`` (stacked.py) holds
the heads of one parameter shape as stacked tensors; ``train_group`` (engine.py)
trains them; ``SweepRunner`` (runner.py) drives a whole sweep under ``SweepSettings``
(settings.py) and writes its reports (report.py).
"""
