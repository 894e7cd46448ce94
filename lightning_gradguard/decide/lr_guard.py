"""LR guard: lower the learning rate when clipping keeps saturating, the norm level rises or the loss stalls.

:class:`LRGuard` watches every optimizer step through three channels (a norm that approaches the clip threshold,
a norm level that rises above its slow reference, and a flat loss while the weights move fast: see
``docs/lr-guard.md`` for the rules and the measurements behind them) and, when the evidence holds, multiplies
its LR scale by ``factor``. The scale is applied to the optimizer by
:class:`~lightning_gradguard.decide.lr_apply.ScaledLR` (the scheduler's own values stay untouched). Its state is
one :class:`LRGuardState`.

Example:

    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> guard = LRGuard(patience=3).attach(opt)
    >>> for step in range(5):
    ...     event = guard.update(step=step, norm=0.95, threshold=1.0)
    >>> guard.lr_scale, guard.num_reductions
    (0.5, 1)
    >>> guard.effective_lrs()
    [0.05]
    >>> opt.param_groups[0]["lr"]  # the scheduler's own value, untouched outside step()
    0.1
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_gradguard._checks import check_bool, check_int
from lightning_gradguard._checks import check_float as _check_float
from lightning_gradguard._state import config_text, constructor_config, state_from_dict, state_to_dict
from lightning_gradguard.decide.lr_apply import ScaledLR

__all__ = ["LRGuard", "LRGuardState", "LRReduction"]


#: Number of recent steps whose median log-norm is the "current level" of the rise channel.
LEVEL_WINDOW = 31
#: Horizon (steps) of the slow EMA reference of the log-norm level.
LOSS_HORIZON = 100  # steps of training loss kept to judge whether the loss still improves
REFERENCE_HORIZON = 256
#: The rise channel stays silent until this many steps have been observed.
REFERENCE_WARMUP = 32
#: A rise must also exceed this many standard errors of the windowed median.
RISE_Z = 5.0
#: The loss diverges when its recent median exceeds this many times its median at the start of the horizon.
DIVERGING_LOSS_RATIO = 1.5
#: Steps behind the running loss level that the "loss rose above its best" test compares.
RISE_LOSS_WINDOW = 25
#: The loss has risen when its running level (median of the last 25 steps) exceeds this many times the
#: lowest running level seen so far. Measured on the outcomes benchmark (``GradClip("auto")``, no LR guard):
#: sane-LR runs peak at 1.2-1.44x (a ReLU IRNN whose loss is noise around the trivial baseline) and 1.69x
#: (a digits MLP near a loss of 0.1); a digits MLP at 10x its LR climbs from 0.53 to 1.6 (3x) before it
#: blows up.
RISEN_LOSS_RATIO = 2.0
#: A run has learned when its running loss level is below this fraction of its first loss (the ReLU IRNN of the
#: outcomes benchmark: 1.1 -> 0.17 within 10 steps; ``examples/lr_too_high.py`` stays at 0.7 from its start).
LEARNED_LOSS_RATIO = 0.5
#: The stall channel checks every this many steps (its loss windows are this long, too) ...
STALL_EVERY = 25
#: ... from this step on (two full loss windows).
STALL_START = 50
#: ... and stays silent while clipping bound more than this share of the last ``STALL_EVERY`` steps ...
STALL_MAX_CLIP_SHARE = 0.5
#: A step follows the gradient when its norm is at most this many times the effective LR times the RMS of the
#: last ``STALL_EVERY`` post-clip gradient norms (SGD: 1; momentum 0.9: at most 10); the stall channel then needs
#: a run that has not learned yet (see :meth:`LRGuard.stall_check`).
STALL_MIN_GAIN = 10.0
#: ... and, before it has learned, a run whose loss once rose above this many times where it started: its running
#: level (median of ``RISE_LOSS_WINDOW`` steps) above the median of its first ``START_LOSS_STEPS`` losses. A run
#: that sits at its first loss before it learns (a plateau: tanh and sigmoid MLPs under SGD peak at 0.8-1.3x) has
#: not started yet, and a cut would keep it there; an SGD LR that is too high first throws the loss up (the
#: digits MLP at 10x and 30x its LR and the RNN at 30x, at their stall cuts: 3.3-15x).
STALL_OVERSHOOT_RATIO = 2.0
#: The losses whose median is where a run started.
START_LOSS_STEPS = 3

# sd of the median of n normal samples ~ 1.2533 * sigma / sqrt(n); sigma ~ 1.4826 * MAD.
_MEDIAN_SE = 1.2533 / math.sqrt(LEVEL_WINDOW)
_MAD_TO_SIGMA = 1.4826 / 0.977  # 0.977: mean of 1.4826 * MAD over 31 normal samples (measured)
_TINY = 1e-300

Reason = Literal["approach", "rise", "stall"]


@dataclass(frozen=True)
class LRReduction:
    """One LR reduction decided by :meth:`LRGuard.update`, with its evidence.

    Attributes:
        step: the step passed to :meth:`LRGuard.update` that triggered the reduction.
        reason: ``"approach"`` if most of the last ``patience`` steps approached the threshold,
            ``"rise"`` if the norm level rose above its long-run reference, ``"stall"`` if the loss
            stalled while the weights moved fast (:meth:`LRGuard.stall_check`).
        lr_scale_before: :attr:`LRGuard.lr_scale` before the reduction.
        lr_scale: :attr:`LRGuard.lr_scale` after it.
        num_reductions: reductions so far, this one included.
        norm: pre-clip norm of the triggering step.
        threshold: clip threshold of the triggering step (``None`` while the policy warms up).
        center: the policy's typical level at the triggering step (``None`` for the fixed policy).
        recent_norms: the last (up to 31) pre-clip norms, oldest first.
        level: median of ``recent_norms``.
        reference: slow reference of the norm level the rise was measured against.
        approaching_steps: how many of the last ``patience`` steps approached the threshold.
        risen_steps: how many of them had a norm level above the reference.
        patience: the guard's ``patience``.
        old_lrs: effective LR of each param group before (empty when no optimizer is attached).
        new_lrs: effective LR of each param group after (empty when no optimizer is attached).
        loss_recent: median training loss of the most recent steps (``None`` without losses).
        loss_before: median training loss at the start of the loss horizon (up to 100 steps back).
        update_ratio: the stall channel's global update-to-weight ratio (``None`` for the norm channels).
        update_gain: the stall channel's :meth:`LRGuard.stall_gain` (``None`` when unknown or for the norm
            channels).
    """

    step: int
    reason: Reason
    lr_scale_before: float
    lr_scale: float
    num_reductions: int
    norm: float
    threshold: float | None
    center: float | None
    recent_norms: tuple[float, ...]
    level: float
    reference: float
    approaching_steps: int
    risen_steps: int
    patience: int
    old_lrs: tuple[float, ...]
    new_lrs: tuple[float, ...]
    loss_recent: float | None = None
    loss_before: float | None = None
    update_ratio: float | None = None
    update_gain: float | None = None

    def message(self) -> str:
        """One human-readable line with the evidence, for a log message or a TensorBoard text event."""
        parts = [
            f"LR guard: step {self.step}: LR scale {self.lr_scale_before:.4g} -> {self.lr_scale:.4g}"
            f" (reduction {self.num_reductions})."
        ]
        if self.reason == "stall":
            parts.append(
                f"The weights moved by {self.update_ratio or 0.0:.3g} of their norm in one step while the training"
                f" loss stopped improving (median of the last {STALL_EVERY} steps {self.loss_recent or 0.0:.4g},"
                f" of the {STALL_EVERY} before {self.loss_before or 0.0:.4g}): the step size is too large."
            )
            if self.update_gain is not None:
                parts.append(
                    f"The step was {self.update_gain:.3g}x a plain gradient step at this LR"
                    + (
                        ": the optimizer's step size does not follow the gradient, so clipping cannot bound it."
                        if self.update_gain > STALL_MIN_GAIN
                        else ", on a run that has not learned yet and whose loss once rose above"
                        f" {STALL_OVERSHOOT_RATIO:g}x where it started."
                    )
                )
        else:
            thr = "none (warming up)" if self.threshold is None else f"{self.threshold:.4g}"
            parts += [
                f"{self.approaching_steps} of the last {self.patience} steps approached the clip threshold"
                f" and {self.risen_steps} had a norm level above its long-run reference"
                f" (level {self.level:.4g} vs reference {self.reference:.4g},"
                f" x{self.level / max(self.reference, _TINY):.3g}).",
                f"Norm {self.norm:.4g}, threshold {thr}; recent norms: "
                + ", ".join(f"{n:.3g}" for n in self.recent_norms)
                + ".",
            ]
            if self.loss_recent is not None and self.loss_before is not None:
                parts.append(
                    f"The training loss is not improving (median {self.loss_before:.4g} -> {self.loss_recent:.4g})."
                )
        if self.old_lrs:
            parts.append(
                "LR " + ", ".join(f"{a:.4g} -> {b:.4g}" for a, b in zip(self.old_lrs, self.new_lrs, strict=True)) + "."
            )
        return " ".join(parts)

    def __str__(self) -> str:
        return self.message()


def _flags(pair: Any) -> tuple[bool, bool]:
    return bool(pair[0]), bool(pair[1])


def _level_window() -> deque[Any]:
    return deque(maxlen=LEVEL_WINDOW)


def _stall_window() -> deque[Any]:
    return deque(maxlen=STALL_EVERY)


@dataclass
class LRGuardState:
    """What :meth:`LRGuard.state_dict` saves: the LR scale and the detector's windows, each a plain value.

    Attributes:
        lr_scale: the factor on top of the scheduler's LR.
        num_reductions: reductions so far.
        cooldown_left: steps before the norm channels may reduce again.
        streak: ``(approaching, risen)`` of each of the current run of pressing steps (``patience`` at most).
        num_obs: steps observed by the rise channel.
        window: log-norms of the last ``LEVEL_WINDOW`` steps.
        norms: pre-clip norms of the last ``LEVEL_WINDOW`` steps.
        reference: slow reference of the log-norm level.
        dispersion: running MAD of the log-norm window.
        losses: recent training losses (the loss horizon).
        best_loss: lowest running loss level (median of ``RISE_LOSS_WINDOW`` steps) so far (saved as ``None``
            while there is none).
        first_loss: the first finite loss observed.
        learned: the running loss level has fallen below ``LEARNED_LOSS_RATIO`` of the first loss.
        start_loss: the median of the first ``START_LOSS_STEPS`` losses (``None`` until there are as many).
        peak_loss_ratio: the highest running loss level so far, as a multiple of ``start_loss``.
        recent_clipped: whether each of the last ``STALL_EVERY`` steps was clipped.
        recent_applied_norms: each of the last ``STALL_EVERY`` steps' post-clip gradient norm.
    """

    lr_scale: float = 1.0
    num_reductions: int = 0
    cooldown_left: int = 0
    streak: deque[tuple[bool, bool]] = field(default_factory=deque, metadata={"item": _flags})
    num_obs: int = 0
    window: deque[float] = field(default_factory=_level_window, metadata={"item": float})
    norms: deque[float] = field(default_factory=_level_window, metadata={"item": float})
    reference: float = 0.0
    dispersion: float = 0.0
    losses: deque[float] = field(default_factory=deque, metadata={"item": float})
    best_loss: float = math.inf
    first_loss: float | None = None
    learned: bool = False
    start_loss: float | None = None
    peak_loss_ratio: float = 0.0
    recent_clipped: deque[bool] = field(default_factory=_stall_window, metadata={"item": bool})
    recent_applied_norms: deque[float] = field(default_factory=_stall_window, metadata={"item": float})

    @classmethod
    def fresh(cls, patience: int) -> LRGuardState:
        """A fresh state whose windows fit a guard with this ``patience``."""
        return cls(
            streak=deque(maxlen=patience), losses=deque(maxlen=max(LOSS_HORIZON, 2 * patience, RISE_LOSS_WINDOW))
        )


_median = statistics.median


class LRGuard(ScaledLR):
    """Detects saturating clipping and scales the learning rate of one optimizer down.

    Call :meth:`update` once per optimizer step whose gradients are finite and not skipped, after the
    clip decision, with the pre-clip global norm, the threshold in force and the policy's center.
    Attach the optimizer with :meth:`attach` so the reductions take effect.

    Args:
        approach_ratio: a step approaches the threshold when its norm has used this fraction of the
            headroom between the policy's center (``0`` without one) and the threshold, in ``(0, 1]``.
        patience: consecutive pressing steps (approaching, or norm level risen) that trigger a
            reduction, ``>= 2`` so an isolated spike never does.
        factor: multiplier of the LR scale at each reduction, in ``(0, 1)``.
        cooldown: steps after a reduction during which no further reduction happens, ``>= 0``.
        min_lr: floor of the effective LR of every group, ``>= 0``; a group whose scheduler LR is
            already below it keeps the scheduler's LR.
        max_reductions: stop reducing after this many reductions (``None``: no limit), ``>= 1``.
        rise_ratio: the norm level (median of the last 31 steps) must exceed the slow reference by
            this factor (and by five standard errors) to count as risen, ``> 1``; ``None`` disables
            the rise channel, leaving only the approach rule.
        stall_update_ratio: the stall channel (:meth:`stall_check`) cuts the LR when a step moves the
            weights by more than this fraction of their norm while the loss has stopped improving,
            ``> 0``; ``None`` disables it. Needs the training loss.
        require_stalled_loss: when the caller passes the training loss to :meth:`update`, act only
            while the loss has stopped improving (median of the last quarter of up to 100 recent losses
            not below the median of the first quarter). Growing norms with a falling loss are healthy early
            training. Without losses (``loss=None``) the guard judges by the norms alone. A loss whose
            recent median exceeds 1.5x that of the first quarter is diverging: the guard then needs only
            ``patience // 2`` pressing steps and ignores the cooldown. ``False`` leaves the loss out of
            every decision.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.

    Example:

        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> guard = LRGuard(patience=2, cooldown=0).attach(opt)
        >>> _ = guard.update(step=0, norm=1.0, threshold=1.0)
        >>> guard.update(step=1, norm=1.0, threshold=1.0).lr_scale
        0.5
        >>> opt.step(); sched.step()
        >>> opt.param_groups[0]["lr"], guard.effective_lrs()
        (0.5, [0.25])
    """

    def __init__(
        self,
        approach_ratio: float = 0.9,
        patience: int = 10,
        factor: float = 0.5,
        cooldown: int = 100,
        min_lr: float = 0.0,
        max_reductions: int | None = None,
        rise_ratio: float | None = 2.0,
        require_stalled_loss: bool = True,
        stall_update_ratio: float | None = 0.005,
    ) -> None:
        self.approach_ratio = _check_float("approach_ratio", approach_ratio, 0.0, 1.0, True, False)
        self.patience = check_int("patience", patience, 2)
        self.factor = _check_float("factor", factor, 0.0, 1.0, True, True)
        self.cooldown = check_int("cooldown", cooldown, 0)
        self.min_lr = _check_float("min_lr", min_lr, 0.0, math.inf, False, True)
        self.max_reductions = None if max_reductions is None else check_int("max_reductions", max_reductions, 1)
        self.rise_ratio = (
            None if rise_ratio is None else _check_float("rise_ratio", rise_ratio, 1.0, math.inf, True, True)
        )
        self._log_rise = 0.0 if self.rise_ratio is None else math.log(self.rise_ratio)
        self.require_stalled_loss = check_bool("require_stalled_loss", require_stalled_loss)
        self.stall_update_ratio = (
            None
            if stall_update_ratio is None
            else _check_float("stall_update_ratio", stall_update_ratio, 0.0, math.inf, True, True)
        )

        super().__init__()
        self._reset_state()

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self._s = LRGuardState.fresh(self.patience)

    @property
    def lr_scale(self) -> float:
        """Factor applied on top of the scheduler's LR (``1.0`` until the first reduction)."""
        return self._s.lr_scale

    @property
    def num_reductions(self) -> int:
        """Number of reductions so far."""
        return self._s.num_reductions

    def state_dict(self) -> dict[str, Any]:
        """The :class:`LRGuardState`, as primitives (floats, ints, bools, lists)."""
        return state_to_dict(self._s)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: keys it lacks keep a fresh guard's values, keys that
        :class:`LRGuardState` does not declare are ignored."""
        self._s, _ = state_from_dict(LRGuardState.fresh(self.patience), state_dict)
        s = self._s
        if "start_loss" not in state_dict and len(s.losses) < (s.losses.maxlen or 0):
            # A state saved before the start was kept: its loss record still holds the run from its first step.
            values = list(s.losses)
            if len(values) >= START_LOSS_STEPS:
                s.start_loss = _median(values[:START_LOSS_STEPS])
            if s.start_loss is not None and s.start_loss > 0.0:
                levels = [_median(values[i - RISE_LOSS_WINDOW : i]) for i in range(RISE_LOSS_WINDOW, len(values) + 1)]
                s.peak_loss_ratio = max((level / s.start_loss for level in levels), default=0.0)

    # -------------------------------------------------------------- detection

    def _rise_margin(self) -> float:
        sigma = _MAD_TO_SIGMA * self._s.dispersion
        return max(self._log_rise, RISE_Z * _MEDIAN_SE * sigma)

    def update(
        self,
        *,
        step: int,
        norm: float,
        threshold: float | None,
        center: float | None = None,
        loss: float | None = None,
        prior: bool = False,
    ) -> LRReduction | None:
        """Observe one optimizer step; reduce the LR scale when the evidence has held long enough.

        Args:
            step: the global step (only reported in the reduction record).
            norm: pre-clip global gradient norm of the step (finite).
            threshold: clip threshold in force for the step, computed before observing it; ``None``
                while the policy warms up without a cap.
            center: the policy's typical norm level (EMA mean, window median); ``None`` when it has
                none (fixed policy), which measures the approach from ``0``.
            loss: the step's training loss, if known. With ``require_stalled_loss`` the guard does not
                act while the loss is still improving (median of the last quarter of up to 100 recent
                losses below the median of the first quarter): norms that grow while the loss falls are
                healthy early training, not a step size that is too large.
            prior: the threshold is not learnt from this run's history (``auto``'s ceiling while it binds: a
                multiple of the run's first norms, see
                :meth:`~lightning_gradguard.decide.policies.ThresholdPolicy.threshold_is_prior`). Norms that press
                such a threshold are no evidence of a too-high LR on their own: a healthy run whose norms grow presses
                it step after step. They count only while the training loss diverges or has risen to more than twice
                its lowest running level so far (the loss is then the evidence, the norms say where to act).

        Returns:
            The reduction, with its evidence, if this step triggered one; else ``None``.
        """
        norm = float(norm)
        if not math.isfinite(norm):
            return None
        risen_loss = self._observe_loss(loss)
        self._observe_applied(norm, threshold)
        approaching = self._approaches(norm, threshold, center)
        level, risen = self._observe_level(norm)
        losses = self._loss_medians()
        # A loss well above where it was is a run that diverges: act on half the evidence, cooldown or not.
        diverging = (
            self.require_stalled_loss
            and loss is not None
            and losses is not None
            and losses[1] > DIVERGING_LOSS_RATIO * losses[0]
        )
        if prior and not (diverging or risen_loss):
            approaching = False  # a threshold not learnt from the run's history is no evidence on its own
        if self._s.cooldown_left > 0:
            self._s.cooldown_left -= 1
            if not diverging:
                return None
        if not (approaching or risen):
            self._s.streak.clear()
            return None
        self._s.streak.append((approaching, risen))
        if len(self._s.streak) < (max(2, self.patience // 2) if diverging else self.patience):
            return None
        if self.max_reductions is not None and self._s.num_reductions >= self.max_reductions:
            return None
        if self.require_stalled_loss and loss is not None and (losses is None or losses[1] < losses[0]):
            # The loss still improves, or too few losses to tell yet: keep the streak, judge again next step.
            return None
        return self._reduce(step, norm, threshold, center, level, losses)

    def _observe_loss(self, loss: float | None) -> bool:
        """Record the step's loss (the loss gate, the stall channel); returns whether the running loss level has
        risen to more than ``RISEN_LOSS_RATIO`` times its lowest level so far."""
        if loss is None or not math.isfinite(loss):
            return False
        s = self._s
        s.losses.append(float(loss))
        if s.first_loss is None:
            s.first_loss = float(loss)
        if s.start_loss is None and len(s.losses) == START_LOSS_STEPS:
            s.start_loss = _median(s.losses)
        if len(s.losses) < RISE_LOSS_WINDOW:
            return False
        level_now = _median(list(s.losses)[-RISE_LOSS_WINDOW:])
        if s.start_loss is not None and s.start_loss > 0.0:
            s.peak_loss_ratio = max(s.peak_loss_ratio, level_now / s.start_loss)
        risen_loss = level_now > RISEN_LOSS_RATIO * s.best_loss > 0.0
        s.best_loss = min(s.best_loss, level_now)
        if s.first_loss > 0.0 and level_now < LEARNED_LOSS_RATIO * s.first_loss:
            s.learned = True
        return risen_loss

    def _observe_applied(self, norm: float, threshold: float | None) -> None:
        """Record whether the step was clipped and its post-clip norm (the stall channel's clip share and gain)."""
        applied = norm if threshold is None or not norm > threshold else float(threshold)
        self._s.recent_clipped.append(applied < norm)
        self._s.recent_applied_norms.append(applied)

    def _approaches(self, norm: float, threshold: float | None, center: float | None) -> bool:
        """Channel 1: the norm has used ``approach_ratio`` of the headroom between the center and the threshold."""
        if threshold is None or not math.isfinite(threshold) or not threshold > 0.0:
            return False
        c = 0.0
        if center is not None and math.isfinite(center) and 0.0 <= center < threshold:
            c = float(center)
        return norm >= c + self.approach_ratio * (float(threshold) - c)

    def _observe_level(self, norm: float) -> tuple[float, bool]:
        """Channel 2: the level (median of recent log-norms) against a slow reference; returns the level and
        whether it has risen above the reference."""
        s = self._s
        s.window.append(math.log(max(norm, _TINY)))
        s.norms.append(norm)
        s.num_obs += 1
        level = _median(s.window)
        if s.num_obs == 1:
            s.reference = level
        risen = False
        if self.rise_ratio is not None and s.num_obs > REFERENCE_WARMUP:
            risen = level - s.reference > self._rise_margin()
        a = max(1.0 / s.num_obs, 1.0 / REFERENCE_HORIZON)
        s.reference += a * (level - s.reference)
        if len(s.window) >= 3:
            mad = _median(abs(v - level) for v in s.window)
            b = max(1.0 / max(s.num_obs - 2, 1), 1.0 / REFERENCE_HORIZON)
            s.dispersion += b * (mad - s.dispersion)
        return level, risen

    def stall_due(self, step: int) -> bool:
        """Whether :meth:`stall_check` wants the update ratio of optimizer step ``step`` (every
        ``STALL_EVERY`` steps from ``STALL_START``, while the channel is on)."""
        return self.stall_update_ratio is not None and step >= STALL_START and step % STALL_EVERY == 0

    def stall_gain(self, update_norm: float) -> float | None:
        """How many times farther the optimizer moved the weights (``update_norm``, the L2 norm of their change
        over one step) than a plain gradient step would: ``update_norm / (lr x rms)`` with ``lr`` the largest
        effective LR of the attached optimizer's groups and ``rms`` the root mean square of the last
        ``STALL_EVERY`` post-clip gradient norms. ``None`` without an attached optimizer or recent norms; ``inf``
        when the weights move while the LR or the gradients are zero."""
        if self._optimizer is None or not self._s.recent_applied_norms or not math.isfinite(update_norm):
            return None
        lr = max(self.effective_lrs(), default=0.0)
        rms = math.sqrt(sum(x * x for x in self._s.recent_applied_norms) / len(self._s.recent_applied_norms))
        step_size = lr * rms
        if not math.isfinite(step_size):
            return None
        return update_norm / step_size if step_size > 0.0 else (math.inf if update_norm > 0.0 else 0.0)

    def stall_check(self, *, step: int, update_ratio: float, update_norm: float | None = None) -> LRReduction | None:
        """The stall channel: cut the LR when the weights move fast and the loss has stopped improving.

        Call it after ``optimizer.step()`` of a step for which :meth:`stall_due` is true, with that step's
        global update-to-weight ratio (the L2 norm of the change of all weights over the L2 norm of the
        weights before it). It reduces when all hold: the ratio exceeds ``stall_update_ratio``; the median
        training loss of the last ``STALL_EVERY`` steps (this one included) is not below the median of the
        ``STALL_EVERY`` steps before; clipping bound at most half of the last ``STALL_EVERY`` steps; the step's
        gain (:meth:`stall_gain` of ``update_norm``) exceeds ``STALL_MIN_GAIN`` (the step size does not follow
        the gradient) or, when it does follow it, the run has not learned yet (its running loss level never fell
        below ``LEARNED_LOSS_RATIO`` of its first loss) and its loss once rose above ``STALL_OVERSHOOT_RATIO``
        times where it started (a run still on a plateau at its first loss has not started, it has not stalled);
        and ``max_reductions`` is not reached. Without
        ``update_norm`` or an attached optimizer the gain is unknown and the other conditions decide alone (the
        engine always passes it).
        The norm channels' cooldown does not hold it back (each check compares a window that lies after the
        previous check), and a reduction restarts that cooldown.

        Returns:
            The reduction, with its evidence, or ``None``.
        """
        limit = self.stall_update_ratio
        if limit is None or not self.stall_due(step) or not math.isfinite(update_ratio):
            return None
        if len(self._s.losses) < 2 * STALL_EVERY or len(self._s.recent_clipped) < STALL_EVERY:
            return None
        values = list(self._s.losses)
        recent, before = _median(values[-STALL_EVERY:]), _median(values[-2 * STALL_EVERY : -STALL_EVERY])
        clip_share = sum(self._s.recent_clipped) / len(self._s.recent_clipped)
        if update_ratio <= limit or recent < before or clip_share > STALL_MAX_CLIP_SHARE:
            return None
        gain = None if update_norm is None else self.stall_gain(update_norm)
        if gain is not None and gain <= STALL_MIN_GAIN and self._s.learned:
            return None  # the step follows the gradient of a run that has learned: clipping's case, not ours
        if gain is not None and gain <= STALL_MIN_GAIN and not self._s.peak_loss_ratio > STALL_OVERSHOOT_RATIO:
            return None  # plain steps on a loss that never rose above its start: a plateau, not a too-high LR
        if self._s.learned and not recent > RISEN_LOSS_RATIO * self._s.best_loss:
            return None  # a run that learned and sits near its best loss has converged, not stalled
        if self.max_reductions is not None and self._s.num_reductions >= self.max_reductions:
            return None
        before_scale = self._s.lr_scale
        if self._at_floor(before_scale * self.factor):
            return None
        old_lrs = tuple(self.effective_lrs()) if self._optimizer is not None else ()
        self.force_reduction()
        self._s.num_reductions += 1
        return LRReduction(
            step=int(step),
            reason="stall",
            lr_scale_before=before_scale,
            lr_scale=self._s.lr_scale,
            num_reductions=self._s.num_reductions,
            norm=self._s.norms[-1] if self._s.norms else math.nan,
            threshold=None,
            center=None,
            recent_norms=tuple(self._s.norms),
            level=math.exp(_median(self._s.window)) if self._s.window else math.nan,
            reference=math.exp(self._s.reference),
            approaching_steps=0,
            risen_steps=0,
            patience=self.patience,
            old_lrs=old_lrs,
            new_lrs=tuple(self.effective_lrs()) if self._optimizer is not None else (),
            loss_recent=recent,
            loss_before=before,
            update_ratio=float(update_ratio),
            update_gain=gain,
        )

    def _loss_medians(self) -> tuple[float, float] | None:
        """(median loss at the start of the loss horizon, median loss now), once ``2 * patience`` exist.

        The two windows are the first and last quarter of up to ``LOSS_HORIZON`` (100) recent losses
        (at least ``patience`` steps each), so per-batch noise does not decide and a loss that fell over
        the last ~100 steps counts as improving.
        """
        n = len(self._s.losses)
        if n < 2 * self.patience:
            return None
        values = list(self._s.losses)
        k = max(self.patience, n // 4)
        return _median(values[:k]), _median(values[-k:])

    def _reduce(
        self,
        step: int,
        norm: float,
        threshold: float | None,
        center: float | None,
        level: float,
        losses: tuple[float, float] | None = None,
    ) -> LRReduction | None:
        n_approach = sum(1 for a, _ in self._s.streak if a)
        n_risen = sum(1 for _, r in self._s.streak if r)
        self._s.streak.clear()
        old_lrs = tuple(self.effective_lrs()) if self._optimizer is not None else ()
        new_scale = self._s.lr_scale * self.factor
        if self._at_floor(new_scale):
            self._s.cooldown_left = self.cooldown
            return None
        before = self._s.lr_scale
        self._s.lr_scale = new_scale
        self._s.num_reductions += 1
        self._s.cooldown_left = self.cooldown
        reference = self._s.reference
        # Re-base the slow reference: the current level is the new normal after the reduction.
        self._s.reference = level
        self._scale_changed()
        new_lrs = tuple(self.effective_lrs()) if self._optimizer is not None else ()
        return LRReduction(
            step=int(step),
            reason="approach" if n_approach >= n_risen else "rise",
            lr_scale_before=before,
            lr_scale=new_scale,
            num_reductions=self._s.num_reductions,
            norm=norm,
            threshold=None if threshold is None else float(threshold),
            center=None if center is None else float(center),
            recent_norms=tuple(self._s.norms),
            level=math.exp(level),
            reference=math.exp(reference),
            approaching_steps=n_approach,
            risen_steps=n_risen,
            patience=self.patience,
            old_lrs=old_lrs,
            new_lrs=new_lrs,
            loss_recent=None if losses is None else losses[1],
            loss_before=None if losses is None else losses[0],
        )

    def loss_improving(self) -> bool | None:
        """Whether the training loss still improves: the median of the last quarter of up to ``LOSS_HORIZON`` recent
        losses is below the median of the first quarter (the gate of :meth:`update`); ``None`` with too few losses."""
        losses = self._loss_medians()
        return None if losses is None else losses[1] < losses[0]

    def observe_overshoot(self, ratio: float) -> None:
        """Record that the loss rose to ``ratio`` times where the run started, seen by someone else (recovery's loss
        triggers, whose rollback discards the steps that showed it): evidence for the stall channel that the run's
        LR threw its loss up (see ``STALL_OVERSHOOT_RATIO``)."""
        if math.isfinite(ratio):
            self._s.peak_loss_ratio = max(self._s.peak_loss_ratio, float(ratio))

    def force_reduction(self, factor: float | None = None) -> tuple[float, float]:
        """Lower the LR scale now, whatever the detector says (GradGuard calls it after a rollback).

        The cut goes through :attr:`lr_scale`, like every reduction, so an LR scheduler does not undo it.
        It is not counted against ``max_reductions`` (it is recovery's decision, not the detector's),
        restarts the cooldown and clears the pressing streak.

        Args:
            factor: multiply the scale by this, in ``(0, 1)``; ``None`` uses the guard's :attr:`factor`.

        Returns:
            ``(lr_scale_before, lr_scale_after)``.

        Example:

            >>> guard = LRGuard(factor=0.5)
            >>> guard.force_reduction()
            (1.0, 0.5)
        """
        factor = self.factor if factor is None else _check_float("factor", factor, 0.0, 1.0, True, True)
        before = self._s.lr_scale
        self._s.lr_scale = before * factor
        self._s.cooldown_left = self.cooldown
        self._s.streak.clear()
        self._scale_changed()
        return before, self._s.lr_scale

    def config(self) -> dict[str, Any]:
        """The constructor's arguments, as plain values: what the engine saves with the state and compares on load."""
        return constructor_config(self, LRGuard)

    def __repr__(self) -> str:
        return config_text(type(self).__name__, self.config())
