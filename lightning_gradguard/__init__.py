"""lightning_gradguard: PyTorch Lightning callbacks that keep gradients healthy."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
