"""Full-image mode from a checkpoint: scores, tiers and percentiles for image files, heatmaps and the HTML report.
"""
