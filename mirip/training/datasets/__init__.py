"""Pairs of drawings (on image files or cached features), their sampling, and image-level splits."""
