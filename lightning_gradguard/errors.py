"""The errors GradGuard raises: one family, rooted at :class:`GradGuardError`.

Arguments are checked when a guard is constructed, with the built-in errors: ``TypeError`` for a value of
the wrong type, ``ValueError`` for a value of the right type outside what is allowed (each message names the
argument, the allowed values and what it got). Everything else GradGuard raises (at setup, during training,
and ``gradguard report``'s ``ReportError``) is a :class:`GradGuardError`, and a ``RuntimeError`` too, so
``except RuntimeError`` keeps catching it.
"""

from __future__ import annotations

__all__ = ["GradGuardError", "NonFiniteGradientsError", "RecoveryError"]


class GradGuardError(RuntimeError):
    """GradGuard cannot go on: the base of every error it raises besides argument errors.

    Raised directly for a setup GradGuard cannot work with: in the callback's ``setup`` (Lightning's FSDP1
    strategy, ``Trainer(gradient_clip_val=...)`` together with clipping, two GradGuard callbacks writing to
    the same loggers) and in ``FabricGuard``'s constructor (Fabric's FSDP1 or DeepSpeed strategy). During
    training its subclasses say why training stops: :class:`NonFiniteGradientsError` and
    :class:`RecoveryError`.
    """


class NonFiniteGradientsError(GradGuardError):
    """Raised on every rank, at the same step, when non-finite gradients stop training.

    Per ``on_nonfinite="raise"``, or after ``max_consecutive_skips`` consecutive skipped steps.
    """


class RecoveryError(GradGuardError):
    """Raised on every rank, at the same step, when a rollback trigger fires after ``max_rollbacks`` rollbacks."""
