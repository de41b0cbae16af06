"""The shared vocabulary every stage speaks: feature specs, tiers and the metadata CSV, image paths,
atomic file writes, devices, plain values, the machine a run measured on.
"""
