"""Models: an image file or upload to the backbone's input (``preprocessing``), backbone families and their
loading, and the seed's frozen ``DINOv2FeatureExtractor``, ``Projector`` and ``PairwiseRankingModel``.
"""
