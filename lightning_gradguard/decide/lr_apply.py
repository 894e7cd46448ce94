"""Applying an LR scale: every param group steps with ``scale x`` its scheduler's LR, and only inside ``step``.

A step pre-hook multiplies each group's ``lr`` by the scale just before ``optimizer.step`` runs and a step
post-hook puts the scheduler's value back, so every scheduler (StepLR, CosineAnnealingLR, OneCycleLR,
ReduceLROnPlateau, ...) keeps computing its own schedule and the effective LR is always ``scale x scheduler LR``
(floored at ``min_lr``). A step the GradScaler skips never leaves a scaled LR behind. What the scale is, and
when it changes, is the detector's business (:class:`~lightning_gradguard.decide.lr_guard.LRGuard`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = ["ScaledLR"]

_S = TypeVar("_S", bound="ScaledLR")


class ScaledLR:
    """Applies :attr:`lr_scale` (given by a subclass) to the param groups of one attached optimizer."""

    min_lr: float

    def __init__(self) -> None:
        self._optimizer: torch.optim.Optimizer | None = None
        self._handles: list[RemovableHandle] = []
        # Scheduler values of each group while a step is in flight and the groups hold scaled LRs.
        self._saved: list[float | Tensor] | None = None
        self._in_step = False

    @property
    def lr_scale(self) -> float:
        """Factor applied on top of the scheduler's LR."""
        raise NotImplementedError

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The attached optimizer, if any."""
        return self._optimizer

    def attach(self: _S, optimizer: torch.optim.Optimizer) -> _S:
        """Apply the LR scale to ``optimizer`` from now on (step pre/post hooks); returns ``self``.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            RuntimeError: the guard is already attached to another optimizer.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._optimizer is optimizer:
            return self
        if self._optimizer is not None:
            raise RuntimeError("this LRGuard is already attached to another optimizer: call `detach()` first")
        self._optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        return self

    def detach(self) -> None:
        """Remove the hooks (restoring the scheduler's LRs if a step is in flight)."""
        self._restore()
        for h in self._handles:
            h.remove()
        self._handles = []
        self._optimizer = None

    def effective_lrs(self) -> list[float]:
        """The LR each param group of the attached optimizer steps with: ``lr_scale x`` its own LR.

        Raises:
            RuntimeError: no optimizer is attached.
        """
        if self._optimizer is None:
            raise RuntimeError("LRGuard.effective_lrs() needs an optimizer: call `attach(optimizer)` first")
        return [self._effective(lr, self.lr_scale) for lr in self._scheduler_lrs()]

    @contextlib.contextmanager
    def scheduler_lrs(self) -> Iterator[None]:
        """Within this block the param groups hold the scheduler's own LRs, even inside ``optimizer.step``.

        Lightning runs its hooks inside ``optimizer.step``, where the groups hold the scaled LR. A
        snapshot taken or restored in this block sees the scheduler's values; whatever the groups hold
        at its end is the scheduler's value for the rest of the step (the scale is applied on top again).
        Outside ``optimizer.step`` it changes nothing.
        """
        if not self._in_step or self._saved is None:
            yield
            return
        self._restore()
        try:
            yield
        finally:
            self._in_step = True
            self._apply_scale()

    def _scale_changed(self) -> None:
        """The scale changed: a step in flight steps with the new one."""
        if self._in_step:
            self._apply_scale()

    def _at_floor(self, new_scale: float) -> bool:
        """Every group already sits at its ``min_lr`` floor: scaling to ``new_scale`` would change no effective LR."""
        if self._optimizer is None:
            return False
        return all(self._effective(lr, self.lr_scale) <= self._effective(lr, new_scale) for lr in self._scheduler_lrs())

    def _effective(self, lr: float, scale: float) -> float:
        return max(lr * scale, min(self.min_lr, lr))

    def _scheduler_lrs(self) -> list[float]:
        assert self._optimizer is not None
        if self._saved is not None:
            values: list[float | Tensor] = self._saved
        else:
            values = [g["lr"] for g in self._optimizer.param_groups]
        return [float(v) for v in values]

    def _apply_scale(self) -> None:
        """Make every group hold its effective LR, remembering the scheduler's values."""
        opt = self._optimizer
        assert opt is not None
        if self._saved is None:
            self._saved = [g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"] for g in opt.param_groups]
        scale, floor = self.lr_scale, self.min_lr
        for g, own in zip(opt.param_groups, self._saved, strict=True):
            if isinstance(own, Tensor):
                g["lr"].copy_(torch.maximum(own * scale, own.clamp(max=floor)))
            else:
                g["lr"] = self._effective(own, scale)

    def _restore(self) -> None:
        opt, saved = self._optimizer, self._saved
        self._saved = None
        self._in_step = False
        if opt is None or saved is None:
            return
        for g, own in zip(opt.param_groups, saved, strict=False):
            if isinstance(own, Tensor) and isinstance(g["lr"], Tensor):
                g["lr"].copy_(own)
            else:
                g["lr"] = own

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # A step that raised never ran the post-hook: put the scheduler's values back first.
        self._restore()
        self._in_step = True
        if self.lr_scale != 1.0:
            self._apply_scale()

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._restore()
