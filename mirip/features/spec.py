"""The feature-spec vocabulary under its older name: everything here is ``mirip.feature_spec``'s.

The vocabulary moved to the bottom layer (``mirip/feature_spec.py``) so that the extractor in ``mirip.ml``
can use it without importing stage one; this module keeps every import of ``mirip.features.spec`` working.
"""

from mirip.feature_spec import (BANK_POOLINGS, CLS_POOLINGS, DEFAULT_SPEC, ENTRY_POOLINGS, EXTRACT_POOLINGS,
                                FEATURE_NORMS, POOLINGS, Entry, FeatureSpec, FeatureSpecError, apply_entry_scales,
                                bank_entries, canonical_spec, checkpoint_feature_spec, default_spec, entry_dim,
                                entry_scales, format1_entry, match_entries, parse_entry, resolve_feature_norm,
                                resolve_layer)

__all__ = ["POOLINGS", "EXTRACT_POOLINGS", "CLS_POOLINGS", "entry_dim", "format1_entry", "FEATURE_NORMS",
           "resolve_feature_norm", "entry_scales", "apply_entry_scales", "checkpoint_feature_spec",
           "BANK_POOLINGS", "ENTRY_POOLINGS", "DEFAULT_SPEC", "Entry", "FeatureSpec", "FeatureSpecError",
           "bank_entries", "canonical_spec", "default_spec", "match_entries", "parse_entry", "resolve_layer"]
