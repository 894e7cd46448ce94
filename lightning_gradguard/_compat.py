"""The one place where GradGuard touches private internals of Lightning and torch.

Every use of an underscore name of torch or Lightning (a function, an attribute, a class) goes through a
helper here that names the internal it uses, so an upgrade that renames one breaks one function here. The
helpers assume what the supported versions (``pyproject.toml``: torch 2.13+, Lightning 2.6+) provide; the
defaults they keep are answers of those versions, not fallbacks for older ones: a GradScaler's ``_scale`` is
``None`` before its first step, an optimizer without a fused step has no ``_step_supports_amp_scaling``, and a
scaler handed to ``Guard`` need only have GradScaler's public methods.

The ``torch._foreach_*`` helpers call the fused kernels directly: every backend has them (torch registers a
per-tensor implementation for the devices without a fused one), so there is no second path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

StrategyKind = Literal["fsdp1", "deepspeed", "other"]


def should_accumulate(trainer: Any) -> bool:
    """Whether the current batch is inside a gradient-accumulation window (``epoch_loop._should_accumulate()``)."""
    return bool(trainer.fit_loop.epoch_loop._should_accumulate())


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


def foreach_norm(tensors: list[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """L2 norm of each tensor, computed in ``dtype`` when given (``torch._foreach_norm``: one fused kernel)."""
    return list(torch._foreach_norm(tensors, 2.0, dtype=dtype))


def foreach_mul(tensors: list[Tensor], factor: float) -> list[Tensor]:
    """A new tensor per input, ``t * factor`` (``torch._foreach_mul``; with ``1.0``: fresh copies in one kernel)."""
    return list(torch._foreach_mul(tensors, factor))


def foreach_mul_(tensors: list[Tensor], factor: float) -> None:
    """Multiply each tensor in place by ``factor`` (``torch._foreach_mul_``)."""
    torch._foreach_mul_(tensors, factor)


def foreach_copy_(targets: list[Tensor], sources: list[Tensor], non_blocking: bool = False) -> None:
    """Copy each source into the target at the same position, in place (``torch._foreach_copy_``).

    ``non_blocking``: queue device-to-host copies into pinned targets without waiting for them.
    """
    torch._foreach_copy_(targets, sources, non_blocking=non_blocking)


def foreach_sub_(tensors: list[Tensor], others: list[Tensor]) -> None:
    """Subtract each of ``others`` from the tensor at the same position, in place (``torch._foreach_sub_``)."""
    torch._foreach_sub_(tensors, others)


def persistent_buffers(module: torch.nn.Module) -> list[Tensor]:
    """The buffers ``module`` itself registered (not its children's) that its ``state_dict`` saves, in order.

    Reads ``module._buffers`` minus ``module._non_persistent_buffers_set``: torch has no public way to tell a
    persistent buffer from a non-persistent one.
    """
    skip = module._non_persistent_buffers_set
    return [buf for name, buf in module._buffers.items() if buf is not None and name not in skip]


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


def drop_bound_log_methods(callback: Any) -> None:
    """Forget the model's ``log`` / ``log_dict`` that Lightning binds onto every callback at fit start.

    Lightning's callback connector sets them as instance attributes (``_attach_model_logging_functions``),
    so a callback kept after the fit would keep the model alive through them.
    """
    for name in ("log", "log_dict"):
        callback.__dict__.pop(name, None)


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
