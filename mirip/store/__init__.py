"""What the stages hand each other: the feature fingerprint, the HDF5 feature cache and the checkpoint file.
"""
