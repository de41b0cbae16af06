"""Stage one: the HDF5 feature cache (``cache``) and the extraction pipeline that fills it (``extract``).

    from mirip.features import ExtractConfig, extract_features, open_cache
    summary = extract_features(ExtractConfig(image_dir="data/images", metadata="data/metadata.csv"))
    with open_cache(summary.output) as cache:
        features, rows = cache.load_features(), cache.index

The feature-spec vocabulary these modules share with ``mirip.ml`` lives below both, in ``mirip.feature_spec``
(``mirip.features.spec`` re-exports it), so the extractor never imports this package.
"""

from mirip.features.cache import CacheError, FeatureCache, open_cache, write_cache
from mirip.features.extract import ExtractConfig, ExtractSummary, extract_features

__all__ = ["CacheError", "FeatureCache", "open_cache", "write_cache", "ExtractConfig", "ExtractSummary",
           "extract_features"]
