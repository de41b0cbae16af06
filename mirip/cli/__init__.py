"""The ``mirip`` command and its subcommands; the scripts under ``scripts/`` are thin wrappers over these.
"""
