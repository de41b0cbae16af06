"""mirip: a pairwise ranking model for drawings, trained in two stages.

Stage one caches frozen DINOv2 features once (``mirip.extract``); stage two
trains the Projector and score head on them (``mirip.training``). Full-image
mode (``mirip.ml.ranking_model.PairwiseRankingModel``) scores new drawings.
"""

__version__ = "0.1.0"
