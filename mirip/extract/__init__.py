"""Stage one: the frozen backbone over every image once, its features written to the cache.

    config -> plan -> reader -> mapper -> writer (pipeline), under torchrun (distributed); run ties them together.
"""
