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
    "GradClip": "frontends.lightning",
    "GradGuard": "frontends.lightning",
    "GradGuardError": "decide.engine",
    "GradMonitor": "frontends.lightning",
    "NonFiniteGradientsError": "decide.engine",
    "GuardEngine": "decide.engine",
    "StepOutcome": "decide.engine",
    "GuardEvent": "events",
    "FabricGuard": "frontends.loop",
    "Guard": "frontends.loop",
    "GradientDiagnostics": "decide.diagnostics",
    "Verdict": "decide.diagnostics",
    "LRGuard": "decide.lr_guard",
    "LRReduction": "decide.lr_guard",
    "AutoPolicy": "decide.policies",
    "FixedPolicy": "decide.policies",
    "PercentilePolicy": "decide.policies",
    "ThresholdPolicy": "decide.policies",
    "ZScorePolicy": "decide.policies",
    "make_policy": "decide.policies",
    "GradStats": "measure.stats",
    "UpdateStats": "measure.updates",
    "UpdateTracker": "measure.updates",
    "UpdateVerdict": "decide.diagnostics",
    "event_json": "outputs.alerts",
    "event_record": "outputs.alerts",
    "rich_writers": "outputs.loggers",
    "RecoveryError": "recovery.rollback",
    "RollbackTrigger": "recovery.rollback",
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
    from lightning_gradguard.decide.diagnostics import GradientDiagnostics, UpdateVerdict, Verdict
    from lightning_gradguard.decide.engine import GradGuardError, GuardEngine, NonFiniteGradientsError, StepOutcome
    from lightning_gradguard.decide.lr_guard import LRGuard, LRReduction
    from lightning_gradguard.decide.policies import (
        AutoPolicy,
        FixedPolicy,
        PercentilePolicy,
        ThresholdPolicy,
        ZScorePolicy,
        make_policy,
    )
    from lightning_gradguard.events import GuardEvent
    from lightning_gradguard.frontends.lightning import GradClip, GradGuard, GradMonitor
    from lightning_gradguard.frontends.loop import FabricGuard, Guard
    from lightning_gradguard.measure.stats import GradStats
    from lightning_gradguard.measure.updates import UpdateStats, UpdateTracker
    from lightning_gradguard.outputs.alerts import event_json, event_record
    from lightning_gradguard.outputs.loggers import rich_writers
    from lightning_gradguard.recovery.rollback import RecoveryError, RollbackTrigger


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_gradguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_gradguard.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
