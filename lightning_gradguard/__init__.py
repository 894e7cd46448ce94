"""lightning_gradguard: PyTorch Lightning callbacks that keep gradients healthy.

``Trainer(callbacks=[GradGuard()])`` gives per-layer gradient norms and histograms in TensorBoard,
adaptive clipping, skipping of non-finite steps, an LR guard and plain-language diagnostics.

The names here are what users construct (the callbacks, the plain-loop and Fabric guards, the policies, the
LR guard, the rollback trigger, the diagnostics), read (events, step outcomes, verdicts) or catch (the
errors). Everything else lives in its module (``measure``, ``decide``, ``recovery``, ``outputs``).

Names are imported lazily, so ``gradguard report`` (which needs only tensorboard) starts without
importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GradGuard": "frontends.lightning",
    "GradMonitor": "frontends.lightning",
    "GradClip": "frontends.lightning",
    "Guard": "frontends.loop",
    "FabricGuard": "frontends.loop",
    "Incident": "forensics.incidents",
    "read_incidents": "forensics.incidents",
    "SkipList": "forensics.skiplist",
    "SkipSamples": "forensics.skiplist",
    "ThresholdPolicy": "decide.policies",
    "AutoPolicy": "decide.policies",
    "FixedPolicy": "decide.policies",
    "PercentilePolicy": "decide.policies",
    "ZScorePolicy": "decide.policies",
    "make_policy": "decide.policies",
    "LRGuard": "decide.lr_guard",
    "RollbackTrigger": "recovery.rollback",
    "GradientDiagnostics": "decide.diagnostics",
    "GuardEvent": "events",
    "StepOutcome": "decide.engine",
    "Verdict": "decide.diagnostics",
    "GradGuardError": "errors",
    "NonFiniteGradientsError": "errors",
    "RecoveryError": "errors",
}

__all__ = [
    "AutoPolicy",
    "FabricGuard",
    "FixedPolicy",
    "GradClip",
    "GradGuard",
    "GradGuardError",
    "GradMonitor",
    "GradientDiagnostics",
    "Guard",
    "GuardEvent",
    "Incident",
    "LRGuard",
    "NonFiniteGradientsError",
    "PercentilePolicy",
    "RecoveryError",
    "RollbackTrigger",
    "SkipList",
    "SkipSamples",
    "StepOutcome",
    "ThresholdPolicy",
    "Verdict",
    "ZScorePolicy",
    "__version__",
    "make_policy",
    "read_incidents",
]

if TYPE_CHECKING:
    from lightning_gradguard.decide.diagnostics import GradientDiagnostics, Verdict
    from lightning_gradguard.decide.engine import StepOutcome
    from lightning_gradguard.decide.lr_guard import LRGuard
    from lightning_gradguard.decide.policies import (
        AutoPolicy,
        FixedPolicy,
        PercentilePolicy,
        ThresholdPolicy,
        ZScorePolicy,
        make_policy,
    )
    from lightning_gradguard.errors import GradGuardError, NonFiniteGradientsError, RecoveryError
    from lightning_gradguard.events import GuardEvent
    from lightning_gradguard.forensics.incidents import Incident, read_incidents
    from lightning_gradguard.forensics.skiplist import SkipList, SkipSamples
    from lightning_gradguard.frontends.lightning import GradClip, GradGuard, GradMonitor
    from lightning_gradguard.frontends.loop import FabricGuard, Guard
    from lightning_gradguard.recovery.rollback import RollbackTrigger


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_gradguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_gradguard.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
