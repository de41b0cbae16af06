"""Stage two: the seed's training modules (config, trainer, evaluator, datasets, benchmarks) and what a run on
cached features adds: its data, metrics, the ridge baseline and the score-to-tier calibration.
"""
