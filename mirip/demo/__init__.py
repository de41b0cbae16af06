"""The demo dataset: procedurally drawn still lifes degraded into tiers S > A > B > C.
"""
