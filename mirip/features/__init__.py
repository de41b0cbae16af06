"""Stage one: the HDF5 feature cache (``cache``) and the extraction pipeline that fills it (``extract``).

    from mirip.features import ExtractConfig, extract_features, open_cache
    summary = extract_features(ExtractConfig(image_dir="data/images", metadata="data/metadata.csv"))
    with open_cache(summary.output) as cache:
        features, rows = cache.load_features(), cache.index

Names load lazily, so ``mirip.features.spec`` (imported by the extractor itself) does not pull in the
extraction pipeline, which imports the extractor.
"""

import importlib

_EXPORTS = {
    "CacheError": "mirip.features.cache", "FeatureCache": "mirip.features.cache", "open_cache": "mirip.features.cache",
    "write_cache": "mirip.features.cache", "ExtractConfig": "mirip.features.extract",
    "ExtractSummary": "mirip.features.extract", "extract_features": "mirip.features.extract",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mirip.features' has no attribute {name!r}")
