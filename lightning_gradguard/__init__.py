"""lightning_gradguard: PyTorch Lightning callbacks that keep gradients healthy.

``Trainer(callbacks=[GradGuard()])`` gives per-layer gradient norms and histograms in TensorBoard,
adaptive clipping, skipping of non-finite steps, an LR guard and plain-language diagnostics.

Names are imported lazily, so ``gradguard report`` (which needs only tensorboard) starts without
importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GradClip": "callbacks",
    "GradGuard": "callbacks",
    "GradGuardError": "engine",
    "GradMonitor": "callbacks",
    "NonFiniteGradientsError": "engine",
    "GuardEngine": "engine",
    "StepOutcome": "engine",
    "GuardEvent": "events",
    "FabricGuard": "guard",
    "Guard": "guard",
    "GradientDiagnostics": "diagnostics",
    "Verdict": "diagnostics",
    "LRGuard": "lr_guard",
    "LRReduction": "lr_guard",
    "AutoPolicy": "policies",
    "FixedPolicy": "policies",
    "PercentilePolicy": "policies",
    "ThresholdPolicy": "policies",
    "ZScorePolicy": "policies",
    "make_policy": "policies",
    "GradStats": "stats",
    "UpdateStats": "updates",
    "UpdateTracker": "updates",
    "UpdateVerdict": "diagnostics",
    "event_json": "alerts",
    "event_record": "alerts",
    "rich_writers": "loggers",
    "RecoveryError": "recovery",
    "RollbackTrigger": "recovery",
}

__all__ = [
    "AutoPolicy",
    "FabricGuard",
    "FixedPolicy",
    "GradClip",
    "GradGuard",
    "GradGuardError",
    "GradMonitor",
    "GradStats",
    "GradientDiagnostics",
    "Guard",
    "GuardEngine",
    "GuardEvent",
    "LRGuard",
    "LRReduction",
    "NonFiniteGradientsError",
    "PercentilePolicy",
    "RecoveryError",
    "RollbackTrigger",
    "StepOutcome",
    "ThresholdPolicy",
    "UpdateStats",
    "UpdateTracker",
    "UpdateVerdict",
    "Verdict",
    "ZScorePolicy",
    "__version__",
    "event_json",
    "event_record",
    "make_policy",
    "rich_writers",
]

if TYPE_CHECKING:
    from lightning_gradguard.alerts import event_json, event_record
    from lightning_gradguard.callbacks import GradClip, GradGuard, GradMonitor
    from lightning_gradguard.diagnostics import GradientDiagnostics, UpdateVerdict, Verdict
    from lightning_gradguard.engine import GradGuardError, GuardEngine, NonFiniteGradientsError, StepOutcome
    from lightning_gradguard.events import GuardEvent
    from lightning_gradguard.guard import FabricGuard, Guard
    from lightning_gradguard.loggers import rich_writers
    from lightning_gradguard.lr_guard import LRGuard, LRReduction
    from lightning_gradguard.policies import (
        AutoPolicy,
        FixedPolicy,
        PercentilePolicy,
        ThresholdPolicy,
        ZScorePolicy,
        make_policy,
    )
    from lightning_gradguard.recovery import RecoveryError, RollbackTrigger
    from lightning_gradguard.stats import GradStats
    from lightning_gradguard.updates import UpdateStats, UpdateTracker


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_gradguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_gradguard.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
