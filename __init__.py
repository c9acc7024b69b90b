"""vtprune: training-free visual token pruning for VLMs, as compositions of pluggable stages."""

from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
