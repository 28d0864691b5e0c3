"""Error types that cross package boundaries, kept at the bottom of the import graph.

`ConfigError` is raised by the training configuration (dermfast.train.config, which re-exports it) and by checks
that the tools below training share with it (dermfast.evaluate.require_sklearn, called by the fine-tune and
distill stages): defined here, neither side imports the other to name it.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value or file: reported as one line by the CLI (exit code 2)."""
