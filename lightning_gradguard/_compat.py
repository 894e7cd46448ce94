"""The one place where GradGuard touches private internals of Lightning and torch.

Each helper names the internal it reads and falls back to the safe answer when it is missing, so an
upgrade that renames one breaks one function here, not the decisions.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

StrategyKind = Literal["fsdp1", "deepspeed", "other"]


def should_accumulate(trainer: Any) -> bool:
    """Whether the current batch is inside a gradient-accumulation window (Lightning's private check)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    check = getattr(epoch_loop, "_should_accumulate", None)
    return bool(check()) if callable(check) else False


def scaler_scale(scaler: Any) -> Tensor | None:
    """The GradScaler's current loss scale tensor (``_scale``; ``None`` before its first use or when disabled)."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else None


def steps_scaled_gradients(optimizer: Any) -> bool:
    """Whether ``optimizer`` unscales inside its own step (fused optimizers: ``_step_supports_amp_scaling``).

    Lightning and GradScaler skip ``unscale_`` for them, so their gradients are still scaled before the step.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def strategy_kind(strategy: Any) -> StrategyKind:
    """``"fsdp1"`` for Lightning's FSDPStrategy, ``"deepspeed"`` for DeepSpeedStrategy, else ``"other"``."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        return "fsdp1"
    if isinstance(strategy, DeepSpeedStrategy):
        return "deepspeed"
    return "other"


def fabric_strategy_kind(strategy: Any) -> StrategyKind:
    """:func:`strategy_kind` for Lightning Fabric's strategies."""
    from lightning.fabric.strategies.deepspeed import DeepSpeedStrategy
    from lightning.fabric.strategies.fsdp import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        return "fsdp1"
    if isinstance(strategy, DeepSpeedStrategy):
        return "deepspeed"
    return "other"


def foreach_norm(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """L2 norm of each tensor: fused ``torch._foreach_norm`` where supported, else one norm per tensor."""
    foreach = getattr(torch, "_foreach_norm", None)
    if foreach is not None:
        try:
            return list(foreach(list(tensors), 2.0) if dtype is None else foreach(list(tensors), 2.0, dtype=dtype))
        except (RuntimeError, NotImplementedError, TypeError):
            pass  # e.g. a device or dtype without a fused kernel
    return [torch.linalg.vector_norm(t, 2.0, dtype=dtype) for t in tensors]


def grads_still_scaled(scaler: Any, optimizer: Any) -> bool:
    """Whether an enabled GradScaler has not yet unscaled ``optimizer``'s gradients this step.

    Reads the scaler's per-optimizer stage (``_per_optimizer_states``, ``OptState.UNSCALED`` after
    ``scaler.unscale_(optimizer)``); without that record the gradients are taken as still scaled.
    """
    if scaler is None or not scaler.is_enabled():
        return False
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, "_per_optimizer_states", None)
    record = states.get(id(optimizer)) if isinstance(states, Mapping) else None
    return not (isinstance(record, Mapping) and record.get("stage") is OptState.UNSCALED)


def unwrap_model(model: Any) -> Any:
    """The user's module inside DDP / DataParallel / Fabric wrappers (FSDP2 modules are their own)."""
    from lightning.fabric.wrappers import _FabricModule
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel | DataParallel | _FabricModule):
            model = model.module
        else:
            return model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Fabric's ``_FabricOptimizer`` (its public ``optimizer`` attribute)."""
    from lightning.fabric.wrappers import _FabricOptimizer

    return optimizer.optimizer if isinstance(optimizer, _FabricOptimizer) else optimizer


def foreach_mul_(tensors: Sequence[Tensor], factor: float) -> None:
    """Multiply each tensor in place: fused ``torch._foreach_mul_`` where supported, else one by one."""
    foreach = getattr(torch, "_foreach_mul_", None)
    if foreach is not None:
        try:
            foreach(list(tensors), factor)
            return
        except (RuntimeError, NotImplementedError, TypeError):
            pass
    for t in tensors:
        t.mul_(factor)


@functools.lru_cache(maxsize=1)
def _internal_prefixes() -> tuple[str, ...]:
    """Source directories whose frames a warning skips: this package, Lightning (and its utilities), torch."""
    import importlib.util
    import os

    dirs = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(torch.__file__)]
    for name in ("lightning", "lightning_utilities", "pytorch_lightning", "lightning_fabric"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(os.path.abspath(spec.origin)))
    return tuple(os.path.join(d, "") for d in dirs)


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside GradGuard, Lightning and torch (``sys._getframe``).

    The warning then shows the user's line (the ``trainer.fit(...)`` call, the ``guard.before_optimizer_step``
    call) instead of a line of GradGuard's own source.
    """
    import sys
    import warnings

    prefixes = _internal_prefixes()
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(prefixes):
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    warnings.warn(message, category, stacklevel=level + 1)
