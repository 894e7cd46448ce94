"""Rollback trigger: decide from per-step host values, identical on every rank, when to roll back.

:class:`RollbackTrigger` is fed once per optimizer step with values every rank reads identically (the loss and
the non-finite / skipped flags, already reduced across ranks) and answers a :class:`RollbackDecision`: roll back
now (and why, with the evidence), or whether the step was healthy enough for a snapshot to be taken. It counts
rollbacks and the steps they cost (:class:`RollbackRecord`), and after ``max_rollbacks`` rollbacks answers a
:class:`RecoveryError` instead.

Nothing here imports Lightning.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_gradguard._checks import check_int, is_number, python_scalar
from lightning_gradguard._state import config_text, constructor_config
from lightning_gradguard.decide.lr_guard import START_LOSS_STEPS
from lightning_gradguard.errors import RecoveryError

__all__ = ["TRIGGERS", "RecoveryError", "RollbackDecision", "RollbackRecord", "RollbackTrigger", "TriggerState"]

Trigger = Literal["nonfinite_grad", "nonfinite_loss", "loss_runaway", "loss_climb", "nonfinite_state"]
#: The names a rollback's trigger can take.
TRIGGERS: tuple[str, ...] = ("nonfinite_grad", "nonfinite_loss", "loss_runaway", "loss_climb", "nonfinite_state")
#: The triggers that are evidence of a too-high LR: their rollback lowers it.
LOSS_TRIGGERS: tuple[str, ...] = ("loss_runaway", "loss_climb")
#: A run has learned once its loss-climb median fell below this fraction of where it started; the check then
#: stops (a run that learned and diverges later meets the runaway check).
CLIMB_LEARNED_RATIO = 0.5
#: The loss-climb check looks at the first this many losses of the run, and of each trajectory a rollback restarts
#: (a too-high LR climbs within 10-20 steps; a longer watch only adds chances for noise to look like a climb).
CLIMB_HORIZON = 100


@dataclass(frozen=True)
class RollbackDecision:
    """What :meth:`RollbackTrigger.update` decided for one optimizer step.

    Attributes:
        step: the step passed to :meth:`RollbackTrigger.update`.
        rollback: restore the snapshot now (every rank reads the same inputs, so every rank agrees).
        trigger: why (one of :data:`TRIGGERS`), ``None`` when ``rollback`` is false.
        message: one line for the event log and the warning (empty when nothing happened).
        evidence: the numbers behind the decision (loss, running median and MAD, threshold, streaks).
        snapshot_ok: the step was healthy (finite loss and gradients, not skipped, loss not above the
            runaway threshold, no streak running): a snapshot may be taken now.
        error: set instead of a rollback once ``max_rollbacks`` rollbacks were spent.
        reason: what fired, in words (no step, no remedy), when something fired.
        first_bad: the first step of the trouble that fired (the start of the streak, the first loss above
            the runaway threshold); a snapshot taken before it holds state known to be good.
    """

    step: int
    rollback: bool = False
    trigger: str | None = None
    message: str = ""
    evidence: Mapping[str, float | int | str] = field(default_factory=dict)
    snapshot_ok: bool = False
    error: RecoveryError | None = None
    first_bad: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class RollbackRecord:
    """One rollback: at ``step``, because of ``trigger``, the state of ``restored_to`` was restored.

    ``counted`` is false for a rollback taken while the run had little history (it does not use up
    ``max_rollbacks``).
    """

    step: int
    trigger: str
    restored_to: int
    counted: bool = True

    @property
    def steps_lost(self) -> int:
        """Optimizer steps whose work the rollback discarded."""
        return max(0, self.step - self.restored_to)


@dataclass
class TriggerState:
    """What :meth:`RollbackTrigger.state_dict` saves: the rollbacks so far, the loss window and the streaks.

    Attributes:
        history: every rollback so far, oldest first.
        losses: ``(step, loss)`` of the finite losses the running level is computed from.
        recent: ``(step, above)`` of the last ``runaway_steps`` losses: whether each was above the threshold.
        nonfinite_streak: consecutive steps with non-finite gradients (optimizer 0).
        nonfinite_loss_streak: consecutive steps with a non-finite loss.
        other_streaks: the non-finite streaks of the other optimizers, by index.
        start: the first ``START_LOSS_STEPS`` finite losses of the run (where it started).
        climb: ``(step, loss)`` of the last ``climb_steps`` finite losses (the loss-climb check).
        learned: the median of ``climb`` fell below ``CLIMB_LEARNED_RATIO`` of the start once (the check is off).
        climb_seen: finite losses observed since the run started or the last rollback (the check stops at
            ``CLIMB_HORIZON``).
    """

    history: list[RollbackRecord] = field(default_factory=list)
    losses: deque[tuple[int, float]] = field(default_factory=deque)
    recent: deque[tuple[int, bool]] = field(default_factory=deque)
    nonfinite_streak: int = 0
    nonfinite_loss_streak: int = 0
    other_streaks: dict[int, int] = field(default_factory=dict)
    start: list[float] = field(default_factory=list)
    climb: deque[tuple[int, float]] = field(default_factory=deque)
    learned: bool = False
    climb_seen: int = 0

    @classmethod
    def fresh(cls, runaway_window: int, runaway_steps: int, climb_steps: int = 0) -> TriggerState:
        """A fresh state whose windows fit a trigger with this ``runaway_window``, ``runaway_steps`` and
        ``climb_steps``."""
        return cls(
            losses=deque(maxlen=runaway_window),
            recent=deque(maxlen=max(1, runaway_steps)),
            climb=deque(maxlen=max(1, climb_steps)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The state as primitives (with the derived ``rollbacks_total`` and ``steps_lost``, for readers)."""
        others = [[i, n] for i, n in sorted(self.other_streaks.items()) if n]
        return {
            **({"other_streaks": others} if others else {}),
            "version": 1,
            "history": [[r.step, r.trigger, r.restored_to, *(() if r.counted else (False,))] for r in self.history],
            "losses": [[s, v] for s, v in self.losses],
            "recent": [[s, a] for s, a in self.recent],
            "nonfinite_streak": self.nonfinite_streak,
            "nonfinite_loss_streak": self.nonfinite_loss_streak,
            "start": list(self.start),
            "climb": [[s, v] for s, v in self.climb],
            "learned": self.learned,
            "climb_seen": self.climb_seen,
            "rollbacks_total": len(self.history),
            "steps_lost": sum(r.steps_lost for r in self.history),
        }

    def read(self, saved: Mapping[str, Any]) -> TriggerState:
        """This (fresh) state with the values of :meth:`to_dict`'s output; keys it lacks keep their fresh values,
        the derived and unknown keys are ignored."""
        self.history = [
            RollbackRecord(int(h[0]), str(h[1]), int(h[2]), bool(h[3]) if len(h) > 3 else True)
            for h in saved.get("history", [])
        ]
        self.losses.extend((int(s), float(v)) for s, v in saved.get("losses", []))
        self.recent.extend((int(s), bool(a)) for s, a in saved.get("recent", []))
        self.nonfinite_streak = int(saved.get("nonfinite_streak", 0))
        self.nonfinite_loss_streak = int(saved.get("nonfinite_loss_streak", 0))
        self.other_streaks = {int(i): int(n) for i, n in saved.get("other_streaks", [])}
        self.start = [float(v) for v in saved.get("start", [])]
        self.climb.extend((int(s), float(v)) for s, v in saved.get("climb", []))
        self.learned = bool(saved.get("learned", False))
        self.climb_seen = int(saved.get("climb_seen", 0))
        return self


_ADVICE = (
    "What to try: lower the learning rate or lengthen its warmup; clip harder (a lower `max_norm`, or the "
    "'fixed' policy); look at the batches right before the steps named above (a poisoned batch repeats "
    "after every rollback); use bf16 or fp32 where fp16 overflows; if weights turned non-finite while "
    "gradients were finite, suspect the hardware. If the loss rose for a legitimate reason (a new data "
    "mix, a loss weight that ramps up), raise `runaway_rel` or set `runaway_steps=0` (`climb_steps=0` for a loss that "
    "climbs from its start); to allow more attempts raise `max_rollbacks`."
)


class RollbackTrigger:
    """Decide from per-step host values, identical on every rank, when to roll back.

    Fed once per optimizer step with values already reduced across ranks, it fires on:

    * ``"nonfinite_grad"``: non-finite gradients on ``nonfinite_steps`` consecutive steps (skipping
      handles an isolated one; a run of them means the weights or the optimizer state are broken).
      Steps the AMP GradScaler skips are its business: pass ``nonfinite=False`` for them;
    * ``"nonfinite_loss"``: a non-finite loss on ``nonfinite_loss_steps`` consecutive steps;
    * ``"loss_runaway"``: the loss ran away from its robust running level. The level is the median
      ``M`` of the last ``runaway_window`` finite losses that were not themselves above the threshold,
      the spread their median absolute deviation ``MAD``. A loss is *above* when
      ``loss > M + max(runaway_mad * MAD, runaway_rel * |M|, runaway_min_margin)`` (while the window
      holds ``n < runaway_steps`` losses, ``runaway_rel`` is scaled by ``runaway_steps / n``); the trigger fires
      when more than half of the last ``runaway_steps`` losses were above. The level exists from the
      first loss on (the untrained model's), so a run that diverges in its first steps is caught too.
      The defaults (more than double the level *and* more than 10 MADs above it, on a majority of
      10 steps) sit far outside the batch-to-batch noise of healthy training, while a blow-up crosses
      them within steps. Losses above the threshold never enter the window, so a blow-up cannot
      drag the level up;
    * ``"loss_climb"``: a run that has not learned yet climbed away from where it started: the median of
      its last ``climb_steps`` finite losses, and that of their newer half (so that an early spike the run
      already came back from does not count), are above ``climb_ratio`` times the median of its first
      ``START_LOSS_STEPS`` (3). An LR that is too high from the first step raises the loss steadily rather than
      in a jump (a 10-layer tanh MLP at 10x its SGD LR: 2.9 to 16-30 within 20 steps), and the runaway
      check's level climbs with it. On the outcomes benchmark the 10-step median of such runs (the MLP at
      10x and 30x, a tanh RNN at 30x) reached 6.4-11.5x the start; every other run and every configuration
      of the healthy zoo stayed below 1.6x. The check watches the first ``CLIMB_HORIZON`` (100) losses of the
      run and of each trajectory a rollback restarts; it stops for good once the median has fallen below half
      the start (the run learned; a later divergence is the runaway check's), and a loss that starts at or
      below zero turns it off.

    Each trigger is turned off by setting its step count to ``0``. A step is healthy (a snapshot may
    be taken) when it fired nothing, had finite loss and gradients, was not skipped, none of the
    last ``runaway_steps`` losses was above the threshold, and the loss-climb median is not above halfway
    to ``climb_ratio``.

    After ``max_rollbacks`` rollbacks the next trigger answers a :class:`RecoveryError` naming every
    rollback, its trigger and step, and what to try.

    The state (counters, history, loss window, streaks) is a dict of primitives that loads with
    ``torch.load(weights_only=True)``; it is *not* part of the snapshot, so a rollback does not undo it.

    Args:
        nonfinite_steps: consecutive non-finite-gradient steps that trigger a rollback (``0``: never).
        nonfinite_loss_steps: consecutive non-finite losses that trigger a rollback (``0``: never).
        runaway_steps: the runaway check looks at the last ``runaway_steps`` losses and fires when more
            than half of them are above the threshold (``0``: never).
        runaway_window: finite losses the running level is computed from.
        runaway_mad: MADs above the median a loss must be.
        runaway_rel: fraction of ``|median|`` above the median a loss must be.
        runaway_min_margin: absolute floor of the margin (loss units), for losses near zero.
        climb_steps: losses whose median the loss-climb check compares with the start (``0``: never).
        climb_ratio: the loss-climb check fires above this many times the start, ``> 1``.
        max_rollbacks: rollbacks allowed per run; the next trigger answers :class:`RecoveryError`.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.

    Example:

        >>> trigger = RollbackTrigger(nonfinite_steps=2)
        >>> trigger.update(0, loss=2.3, nonfinite=False).snapshot_ok
        True
        >>> trigger.update(1, loss=2.2, nonfinite=True).rollback
        False
        >>> decision = trigger.update(2, loss=2.2, nonfinite=True)
        >>> decision.rollback, decision.trigger
        (True, 'nonfinite_grad')
        >>> trigger.record_rollback(decision, restored_to=0).steps_lost
        2
    """

    def __init__(
        self,
        *,
        nonfinite_steps: int = 3,
        nonfinite_loss_steps: int = 3,
        runaway_steps: int = 10,
        runaway_window: int = 200,
        runaway_mad: float = 10.0,
        runaway_rel: float = 1.0,
        runaway_min_margin: float = 1e-3,
        climb_steps: int = 10,
        climb_ratio: float = 3.0,
        max_rollbacks: int = 3,
    ) -> None:
        self.nonfinite_steps = check_int("nonfinite_steps", nonfinite_steps, 0)
        self.nonfinite_loss_steps = check_int("nonfinite_loss_steps", nonfinite_loss_steps, 0)
        self.runaway_steps = check_int("runaway_steps", runaway_steps, 0)
        self.runaway_window = check_int("runaway_window", runaway_window, 1)
        self.runaway_mad = _check_nonneg("runaway_mad", runaway_mad)
        self.runaway_rel = _check_nonneg("runaway_rel", runaway_rel)
        self.runaway_min_margin = _check_nonneg("runaway_min_margin", runaway_min_margin)
        self.climb_steps = check_int("climb_steps", climb_steps, 0)
        self.climb_ratio = _check_nonneg("climb_ratio", climb_ratio)
        if not self.climb_ratio > 1.0:
            raise ValueError(f"`climb_ratio` must be a float > 1, got {climb_ratio!r}")
        self.max_rollbacks = check_int("max_rollbacks", max_rollbacks, 1)
        self._s = TriggerState.fresh(self.runaway_window, self.runaway_steps, self.climb_steps)
        self._sorted: list[float] = []  # the loss window's values, sorted: the median in O(1)

    # ---------------------------------------------------------------- counters

    @property
    def rollbacks_total(self) -> int:
        """Rollbacks recorded so far."""
        return len(self._s.history)

    @property
    def rollbacks_counted(self) -> int:
        """Rollbacks that count against ``max_rollbacks`` (those taken with little history do not)."""
        return sum(1 for r in self._s.history if r.counted)

    @property
    def steps_lost(self) -> int:
        """Optimizer steps discarded by all rollbacks so far."""
        return sum(r.steps_lost for r in self._s.history)

    @property
    def history(self) -> tuple[RollbackRecord, ...]:
        """Every rollback so far, oldest first."""
        return tuple(self._s.history)

    def level(self) -> tuple[float, float, float] | None:
        """``(median, MAD, threshold)`` of the runaway check now; ``None`` before the first finite loss."""
        if not self._s.losses:
            return None
        median = self._median()
        mad = statistics.median(abs(v - median) for v in self._sorted)
        margin = max(self.runaway_mad * mad, self._rel() * abs(median), self.runaway_min_margin)
        return median, mad, median + margin

    def _rel(self) -> float:
        """``runaway_rel``, widened while the window holds fewer than ``runaway_steps`` losses.

        With ``n`` losses the relative margin is ``runaway_rel * runaway_steps / n``: a level read from
        one or two batches is not trusted to within a factor of two (a low first batch would otherwise
        keep every later, ordinary loss out of the window), while a divergence, orders of magnitude
        above, still fires in the first steps.
        """
        n = len(self._s.losses)
        return self.runaway_rel * max(1.0, self.runaway_steps / n) if n else self.runaway_rel

    def _median(self) -> float:
        n = len(self._sorted)
        return self._sorted[n // 2] if n % 2 else 0.5 * (self._sorted[n // 2 - 1] + self._sorted[n // 2])

    def _is_above(self, loss: float) -> bool:
        """``loss > threshold``, computing the MAD only when the cheap lower bound of the margin is passed."""
        if not self._sorted:
            return False
        median = self._median()
        if loss <= median + max(self._rel() * abs(median), self.runaway_min_margin):
            return False
        level = self.level()
        return level is not None and loss > level[2]

    def _push_loss(self, step: int, loss: float) -> None:
        if len(self._s.losses) == self._s.losses.maxlen:
            _, old = self._s.losses[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._s.losses.append((step, loss))
        bisect.insort(self._sorted, loss)

    def _set_losses(self, items: list[tuple[int, float]]) -> None:
        self._s.losses.clear()
        self._sorted.clear()
        for s, v in items:
            self._push_loss(s, v)

    def _runaway_count(self) -> int:
        return sum(1 for _, above in self._s.recent if above)

    def _observe_climb(self, step: int, loss: float) -> float | None:
        """Record a finite loss for the loss-climb check (and the start, from the first ones); returns :meth:`climb`
        after it."""
        s = self._s
        if len(s.start) < START_LOSS_STEPS:
            s.start.append(loss)
        s.climb_seen += 1
        if s.learned:
            return None
        s.climb.append((step, loss))
        ratio = self.climb()
        if ratio is not None and ratio < CLIMB_LEARNED_RATIO:
            s.learned = True
            s.climb.clear()
            return None
        return ratio

    def climb(self) -> float | None:
        """How far the loss climbed from where the run started: the lower of the median of the last
        ``climb_steps`` losses and the median of their newer half, over where the run started (the median of its
        first ``START_LOSS_STEPS`` losses); ``None`` while the check has no full window, once the run has learned, after
        ``CLIMB_HORIZON`` losses, or when the start is not positive."""
        s = self._s
        if not self.climb_steps or s.learned or s.climb_seen > CLIMB_HORIZON:
            return None
        if len(s.start) < START_LOSS_STEPS or len(s.climb) < self.climb_steps:
            return None
        start = statistics.median(s.start)
        if not start > 0.0:
            return None
        values = [v for _, v in s.climb]
        # The lower of the window's median and its newer half's: a loss that is still up there now, not an early
        # spike the run already came back from (an RMSprop classifier at a high LR: 0.67 -> 145 -> 1.0 in 6 steps).
        return min(statistics.median(values), statistics.median(values[len(values) // 2 :])) / start

    # ---------------------------------------------------------------- decision

    def update(
        self,
        step: int,
        loss: float | None = None,
        nonfinite: bool = False,
        skipped: bool = False,
        source: int = 0,
    ) -> RollbackDecision:
        """Feed one optimizer step and decide.

        Args:
            step: the optimizer step (any increasing counter, e.g. ``trainer.global_step``).
            loss: the step's training loss, reduced across ranks; ``None`` turns the loss checks off
                for this step.
            nonfinite: the step's gradients are non-finite on some rank (reduced).
            skipped: the optimizer step is skipped for any reason (GradGuard, the GradScaler).
            source: the optimizer the step belongs to. Each optimizer has its own non-finite streak and
                any of them fires; the loss checks read the loss of optimizer ``0`` only.
        """
        step = int(step)
        if source != 0:
            return self._update_other(step, int(source), nonfinite, skipped)
        loss_finite = loss is None or math.isfinite(loss)
        self._s.nonfinite_streak = self._s.nonfinite_streak + 1 if nonfinite else 0
        self._s.nonfinite_loss_streak = 0 if loss_finite else self._s.nonfinite_loss_streak + 1
        above = False
        level: tuple[float, float, float] | None = None
        if self.climb_steps and loss is not None and loss_finite:
            climb = self._observe_climb(step, float(loss))
        else:
            climb = self.climb()  # no new loss: what the last one left
        if loss is not None and loss_finite:
            above = self._is_above(float(loss))
            if above:
                level = self.level()  # the evidence: median, MAD, threshold
            else:
                self._push_loss(step, float(loss))
            if self.runaway_steps:
                self._s.recent.append((step, above))
        n_above = self._runaway_count() if self.runaway_steps else 0

        evidence: dict[str, float | int | str] = {
            "nonfinite_streak": self._s.nonfinite_streak,
            "nonfinite_loss_streak": self._s.nonfinite_loss_streak,
            "runaway_above": n_above,
            "rollbacks_total": self.rollbacks_total,
        }
        if loss is not None:
            evidence["loss"] = float(loss)
        if above and level is not None:
            evidence.update(median=level[0], mad=level[1], threshold=level[2])

        trigger, what = self._fired(loss, n_above, level, climb, evidence)
        if trigger is None:
            healthy = loss_finite and not nonfinite and not skipped and n_above == 0 and not self._others_bad()
            healthy = healthy and (climb is None or climb <= (1.0 + self.climb_ratio) / 2)
            return RollbackDecision(step=step, evidence=evidence, snapshot_ok=healthy)
        if trigger == "nonfinite_grad":
            first_bad = step - self._s.nonfinite_streak + 1
        elif trigger == "nonfinite_loss":
            first_bad = step - self._s.nonfinite_loss_streak + 1
        elif trigger == "loss_climb":
            # the first loss of the window above where the run started (the steps of the start are good)
            start = statistics.median(self._s.start)
            first_bad = next((s for s, v in self._s.climb if v > start), self._s.climb[0][0])
        else:
            first_bad = min((s for s, above in self._s.recent if above), default=step)
        return self.fire(step, trigger, what, evidence, first_bad)

    def _others_bad(self) -> bool:
        return any(self._s.other_streaks.values())

    def _update_other(self, step: int, source: int, nonfinite: bool, skipped: bool) -> RollbackDecision:
        """A step of an optimizer other than the first: only its non-finite streak is followed."""
        streak = self._s.other_streaks.get(source, 0) + 1 if nonfinite else 0
        self._s.other_streaks[source] = streak
        evidence: dict[str, float | int | str] = {
            "nonfinite_streak": streak,
            "optimizer": source,
            "rollbacks_total": self.rollbacks_total,
        }
        if 0 < self.nonfinite_steps <= streak:
            what = f"non-finite gradients of optimizer {source} on {streak} consecutive steps"
            return self.fire(step, "nonfinite_grad", what, evidence, step - streak + 1)
        return RollbackDecision(step=step, evidence=evidence, snapshot_ok=not (nonfinite or skipped))

    def fire(
        self,
        step: int,
        trigger: str,
        what: str,
        evidence: Mapping[str, float | int | str] | None = None,
        first_bad: int | None = None,
    ) -> RollbackDecision:
        """A rollback decision for ``trigger`` at ``step`` (``what``: the evidence in words).

        Answers a :class:`RecoveryError` in ``error`` instead once ``max_rollbacks`` counted rollbacks
        were spent. Used by :meth:`update`, and by a front-end for a trigger it detects itself
        (``"nonfinite_state"``: non-finite module buffers that cannot be repaired in place).
        """
        step = int(step)
        evidence = dict(evidence or {})
        first_bad = step if first_bad is None else int(first_bad)
        if self.rollbacks_counted >= self.max_rollbacks:
            error = RecoveryError(self._error_message(step, trigger, what))
            return RollbackDecision(
                step=step,
                trigger=trigger,
                message=str(error),
                evidence=evidence,
                error=error,
                first_bad=first_bad,
                reason=what,
            )
        message = f"step {step}: {what}: rolling back to the last good snapshot"
        return RollbackDecision(
            step=step,
            rollback=True,
            trigger=trigger,
            message=message,
            evidence=evidence,
            first_bad=first_bad,
            reason=what,
        )

    def decline(self, decision: RollbackDecision) -> None:
        """Forget the trouble that fired ``decision`` without a rollback (the front-end skips or clips instead).

        The streaks start again; after a runaway the loss level is learned again from the losses to come,
        so the run is judged from where it now is.
        """
        self._s.nonfinite_streak = self._s.nonfinite_loss_streak = 0
        self._s.other_streaks.clear()
        self._s.recent.clear()
        if decision.trigger == "loss_runaway":
            self._set_losses([])
        if decision.trigger == "loss_climb":
            self._s.climb.clear()

    def _fired(
        self,
        loss: float | None,
        n_above: int,
        level: tuple[float, float, float] | None,
        climb: float | None,
        evidence: dict[str, float | int | str],
    ) -> tuple[Trigger | None, str]:
        """The trigger that fires now (``None`` if none) and what it saw (``climb``: :meth:`climb` now); a runaway or a
        climb adds its figures to ``evidence``."""
        if 0 < self.nonfinite_steps <= self._s.nonfinite_streak:
            return "nonfinite_grad", f"non-finite gradients on {self._s.nonfinite_streak} consecutive steps"
        if 0 < self.nonfinite_loss_steps <= self._s.nonfinite_loss_streak:
            return "nonfinite_loss", f"non-finite loss ({loss}) on {self._s.nonfinite_loss_streak} consecutive step(s)"
        if self.runaway_steps and 2 * n_above > self.runaway_steps and (level := level or self.level()):
            evidence.update(median=level[0], mad=level[1], threshold=level[2])
            return "loss_runaway", (
                f"loss {_fmt(loss)}: {n_above} of the last {self.runaway_steps} losses above {level[2]:.4g} "
                f"(running median {level[0]:.4g}, MAD {level[1]:.3g})"
            )
        if climb is not None and climb > self.climb_ratio:
            start = statistics.median(self._s.start)
            evidence.update(climb=climb, start=start)
            return "loss_climb", (
                f"the loss climbed from where the run started: the medians of the last {self.climb_steps} losses "
                f"and of the last {self.climb_steps - self.climb_steps // 2} are at least {climb * start:.4g}, "
                f"{climb:.3g}x where the run started, {start:.4g} (climb_ratio={self.climb_ratio:g}), on a run "
                "that has not learned yet"
            )
        return None, ""

    def record_rollback(self, decision: RollbackDecision, restored_to: int, counted: bool = True) -> RollbackRecord:
        """Count the rollback ``decision`` asked for, now that the state of step ``restored_to`` is back.

        Resets the streaks and forgets the losses observed after ``restored_to`` (they belong to the
        discarded trajectory).

        Args:
            decision: the decision that asked for the rollback.
            restored_to: the step of the restored snapshot.
            counted: whether the rollback uses up one of ``max_rollbacks`` (a front-end passes ``False``
                for a rollback taken while the run had little history).
        """
        if not decision.rollback or decision.trigger is None:
            raise ValueError(f"`decision` did not ask for a rollback: {decision!r}")
        restored_to = check_int("restored_to", restored_to, 0)
        record = RollbackRecord(
            step=decision.step, trigger=decision.trigger, restored_to=restored_to, counted=bool(counted)
        )
        self._s.history.append(record)
        self._s.nonfinite_streak = self._s.nonfinite_loss_streak = 0
        self._s.other_streaks.clear()
        self._s.recent.clear()
        self._set_losses([(s, v) for s, v in self._s.losses if s <= restored_to])
        self._s.climb.clear()  # the attempt from the restored snapshot is watched from its own first loss
        self._s.climb_seen = 0
        return record

    def _error_message(self, step: int, trigger: str, what: str) -> str:
        lines = [
            f"GradGuard recovery gave up at step {step}: {what} ({trigger}), after {self.rollbacks_total} "
            f"rollback(s) (max_rollbacks={self.max_rollbacks}, {self.rollbacks_counted} counted), "
            f"{self.steps_lost} step(s) lost:"
        ]
        lines += [
            f"  rollback {i}: at step {r.step} ({r.trigger}) restored step {r.restored_to}"
            for i, r in enumerate(self._s.history, 1)
        ]
        lines.append(_ADVICE)
        return "\n".join(lines)

    # ------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The :class:`TriggerState`: counters, history, loss window and streaks (primitives only)."""
        return self._s.to_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; keys it lacks keep their defaults."""
        self._s = TriggerState.fresh(self.runaway_window, self.runaway_steps, self.climb_steps).read(state_dict)
        self._set_losses(list(self._s.losses))
        if "start" not in state_dict and self.climb_steps:
            # A state saved before the loss-climb check: its runaway window holds the run's finite losses from
            # the start (up to `runaway_window`), which is what the check would have seen.
            for step, loss in self._s.losses:
                self._observe_climb(step, loss)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments, as plain values."""
        return constructor_config(self, RollbackTrigger)

    def __repr__(self) -> str:
        return config_text(type(self).__name__, self.config())


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _check_nonneg(name: str, value: Any) -> float:
    plain = python_scalar(value)
    if not is_number(plain):
        raise TypeError(f"`{name}` must be a float >= 0, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(plain) and plain >= 0):
        raise ValueError(f"`{name}` must be a finite float >= 0, got {value!r}")
    return float(plain)
