"""hescape-study: contrastive H&E <-> expression studies."""

__version__ = "0.1.0"
