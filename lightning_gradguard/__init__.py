"""lightning_gradguard: PyTorch Lightning callbacks that keep gradients healthy.

``Trainer(callbacks=[GradGuard()])`` gives per-layer gradient norms and histograms in TensorBoard,
adaptive clipping, skipping of non-finite steps, an LR guard and plain-language diagnostics.
"""

from __future__ import annotations

__version__ = "0.1.0"

from lightning_gradguard.callbacks import (
    GradClip,
    GradGuard,
    GradGuardError,
    GradMonitor,
    NonFiniteGradientsError,
)
from lightning_gradguard.diagnostics import GradientDiagnostics, Verdict
from lightning_gradguard.lr_guard import LRGuard
from lightning_gradguard.policies import (
    FixedPolicy,
    PercentilePolicy,
    ThresholdPolicy,
    ZScorePolicy,
    make_policy,
)
from lightning_gradguard.stats import GradStats

__all__ = [
    "FixedPolicy",
    "GradClip",
    "GradGuard",
    "GradGuardError",
    "GradMonitor",
    "GradStats",
    "GradientDiagnostics",
    "LRGuard",
    "NonFiniteGradientsError",
    "PercentilePolicy",
    "ThresholdPolicy",
    "Verdict",
    "ZScorePolicy",
    "__version__",
    "make_policy",
]
