"""Recovery: roll back to the last good training state when a trigger fires, or fall back to skipping.

Clipping and skipping act on gradients. Once the *weights* are non-finite or blown up, every later gradient is
bad too and only a rewind helps. :class:`Recovery` wires two Lightning-free pieces to GradGuard's engines:
:class:`~lightning_gradguard.recovery.snapshot.Snapshot` (the host copy of the training state) and
:class:`~lightning_gradguard.recovery.trigger.RollbackTrigger` (when to roll back). The protocol, once per
optimizer step, *before* the optimizer applies the step's gradients::

    decision = trigger.update(step, loss=loss, nonfinite=nonfinite, skipped=skipped)
    if decision.error is not None:
        raise decision.error                      # every rank, same step: no hang
    if decision.rollback and snapshot.step is not None:
        restored_to = snapshot.restore()          # drops this step's gradients too
        trigger.record_rollback(decision, restored_to)
        ...lower the LR (LR guard), skip this optimizer step...
    elif decision.snapshot_ok and step % every_n_steps == 0:
        snapshot.capture(step, extra=own_state)

Taking the snapshot at that point (after the step's loss and gradients were seen to be healthy, before
its update) stores exactly the weights that produced a healthy loss and finite gradients.

Nothing here imports Lightning.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard._checks import check_int
from lightning_gradguard.decide.engine import Engine, StepOutcome
from lightning_gradguard.events import GuardEvent
from lightning_gradguard.recovery.snapshot import Snapshot, _BufferGuard
from lightning_gradguard.recovery.trigger import (
    LOSS_TRIGGERS,
    TRIGGERS,
    RecoveryError,
    RollbackDecision,
    RollbackRecord,
    RollbackTrigger,
)

__all__ = [
    "SNAPSHOT_EVERY_N_STEPS",
    "TRIGGERS",
    "Recovery",
    "RecoveryError",
    "RollbackDecision",
    "RollbackRecord",
    "RollbackTrigger",
    "Snapshot",
]

#: Default snapshot interval (optimizer steps). Measured by ``benchmarks/bench_snapshot.py``: one capture costs
#: 2.5-7.4 % of a training step on CPU (1M-50M parameters, AdamW), so every 100 steps amortises to <= 0.08 %,
#: leaving room for GPUs, where the step is shorter and the copy is bound by host bandwidth.
SNAPSHOT_EVERY_N_STEPS = 100


class Recovery:
    """A :class:`RollbackTrigger` and two alternating :class:`Snapshot` slots wired to GradGuard's engines.

    The front-end calls :meth:`attach` once the model, optimizers and schedulers exist, passes
    :meth:`state_check` to :meth:`Engine.measure <lightning_gradguard.decide.engine.Engine.measure>`,
    then calls :meth:`after_decide` at every optimizer step, right after :meth:`Engine.decide
    <lightning_gradguard.decide.engine.Engine.decide>` and before
    :func:`~lightning_gradguard.decide.engine.apply_outcome`. Decisions are taken from reduced values (the loss,
    the non-finite flags, the buffer check), so every rank acts at the same step.

    * **Every optimizer drives.** Each optimizer's non-finite streak can fire; the loss of optimizer 0
      feeds the loss checks. A rollback restores the whole state: the model (parameters and persistent
      buffers), every optimizer, every scheduler, the further ``modules`` and ``stateful`` objects
      (other callbacks), and GradGuard's own state of every engine (clip policy, LR guard,
      diagnostics). Counters are never rolled back.
    * **Two slots.** Snapshots are taken at healthy steps that are due (the first healthy step, every
      power of two below ``every_n_steps``, every multiple of ``every_n_steps``), alternately into two
      slots. A rollback restores the newest slot older than the first bad step; a slot whose restore
      was followed by another trigger before any new snapshot is not restored again.
    * **The remedy follows the cause.** A non-finite fault is restored without touching the LR; the LR
      guard lowers the LR when a runaway loss fired, by its factor squared when a loss climb fired, or when
      the same trigger fires again within ``trigger.runaway_window`` steps of the previous rollback.
    * **Never a crash a run would have survived.** Rollbacks that restore a snapshot from the run's
      first ``every_n_steps`` steps do not count against ``max_rollbacks``. When no slot is left to
      restore, or ``max_rollbacks`` is spent, recovery falls back to skipping and clipping (and, for a
      runaway loss or a loss climb, one LR cut) and training goes on; it raises :class:`RecoveryError` only when the
      run cannot continue: the skip streak reached ``max_consecutive_skips`` after rollbacks were
      tried, or module buffers are non-finite with nothing to restore.
    * **Skipped steps leave no trace in buffers.** The persistent buffers are copied on the device
      after every decision (the values the next forward pass starts from) and put back when a step is
      skipped or the check finds them non-finite.

    Args:
        trigger: the trigger (its state is GradGuard's ``state_dict()["recovery"]``).
        every_n_steps: the snapshot interval (see above).
    """

    def __init__(self, trigger: RollbackTrigger, every_n_steps: int = SNAPSHOT_EVERY_N_STEPS) -> None:
        if not isinstance(trigger, RollbackTrigger):
            raise TypeError(f"`trigger` must be a RollbackTrigger, got {type(trigger).__name__}")
        self.trigger = trigger
        self.every_n_steps = check_int("snapshot_every_n_steps", every_n_steps, 1)
        self.snapshots: list[Snapshot] = []
        self.buffers: _BufferGuard | None = None
        self._failed: set[int] = set()  # slots whose restore was followed by a trigger before any new snapshot
        self._retried: set[int] = set()  # slots given a second attempt after a loss trigger (the LR was cut)
        self._last_slot: int | None = None
        self._captures_since_rollback = 0
        self._declined = False

    @property
    def snapshot(self) -> Snapshot | None:
        """The newest snapshot slot (``None`` before :meth:`attach` or after :meth:`release`)."""
        taken = [s for s in self.snapshots if s.step is not None]
        if taken:
            return max(taken, key=lambda s: s.step or 0)
        return self.snapshots[0] if self.snapshots else None

    @snapshot.setter
    def snapshot(self, value: None) -> None:
        if value is not None:
            raise TypeError("`snapshot` can only be set to None (release); use attach() to start snapshotting")
        self.release()

    def release(self) -> None:
        """Drop the snapshots and buffer copies (host memory and references to the model and optimizers)."""
        self.snapshots = []
        self.buffers = None

    def attach(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        schedulers: Any | Sequence[Any] | None = None,
        *,
        modules: Sequence[nn.Module] = (),
        stateful: Sequence[Any] = (),
    ) -> None:
        """Start snapshotting (drops any earlier snapshot).

        Args:
            model: the trained module.
            optimizers: every optimizer.
            schedulers: every LR scheduler.
            modules: further modules that belong to the training state (a weight-averaging callback's
                averaged model).
            stateful: further objects with ``state_dict`` / ``load_state_dict`` (other callbacks).
        """
        self.snapshots = [Snapshot(model, optimizers, schedulers, modules=modules, stateful=stateful) for _ in range(2)]
        self.buffers = _BufferGuard(model)
        self.buffers.save()
        self._failed.clear()
        self._retried.clear()
        self._last_slot = None
        self._captures_since_rollback = 0
        self._declined = False

    @property
    def nbytes(self) -> int:
        """Host bytes of both snapshot slots plus device bytes of the buffer copy."""
        return sum(s.nbytes for s in self.snapshots) + (self.buffers.nbytes if self.buffers else 0)

    def state_check(self) -> Tensor | None:
        """A scalar to send with the step's statistics: ``nan`` when a floating module buffer is non-finite."""
        return self.buffers.check() if self.buffers is not None else None

    def metrics(self) -> dict[str, float]:
        """``gradguard/rollbacks_total`` and ``gradguard/steps_lost``, for the log steps."""
        from lightning_gradguard.keys import tag

        return {
            tag("rollbacks_total"): float(self.trigger.rollbacks_total),
            tag("steps_lost"): float(self.trigger.steps_lost),
        }

    def _due(self, step: int) -> bool:
        newest = self.snapshot
        if newest is None or newest.step is None or newest.layout_changed:
            return True
        every = self.every_n_steps
        return step % every == 0 or (step < every and step & (step - 1) == 0)

    def _capture_slot(self, step: int) -> int:
        """The slot a capture overwrites: a failed one, an empty one, else the older one.

        Within the first ``every_n_steps`` steps the run's first snapshot is kept and the other slot
        takes the early captures: a runaway in the first steps can still go back to where the run began.
        """
        if self._failed:
            return min(self._failed)
        empty = [i for i, s in enumerate(self.snapshots) if s.step is None]
        if empty:
            return empty[0]
        by_age = sorted(range(len(self.snapshots)), key=lambda i: self.snapshots[i].step or 0)
        return by_age[-1] if step < self.every_n_steps else by_age[0]

    def _target(self, decision: RollbackDecision) -> int | None:
        """The slot to restore, ``None`` if none is left.

        The newest slot older than the first bad step that has not failed before. After a runaway loss
        the slot must also be known good: at least ``runaway_steps`` steps older than the first loss
        above the threshold (a loss can climb for a while before it crosses it); failing that, the
        oldest slot.
        """
        if self._last_slot is not None and self._captures_since_rollback == 0:
            # Restored, and trouble came back before any new snapshot: the snapshot failed. Once, a loss trigger
            # gets a second attempt from it: the rollback before cut the LR, so the attempt ran at a new LR (a
            # loss that ran away at 30x its LR can climb again at 15x). A third time is not an LR's doing (a
            # poisoned stretch of data met after every restore).
            if decision.trigger in LOSS_TRIGGERS and self._last_slot not in self._retried:
                self._retried.add(self._last_slot)
            else:
                self._failed.add(self._last_slot)
        first_bad = decision.step if decision.first_bad is None else decision.first_bad
        candidates = sorted(
            (
                i
                for i, s in enumerate(self.snapshots)
                if s.step is not None and s.step < first_bad and i not in self._failed
            ),
            key=lambda i: self.snapshots[i].step or 0,
            reverse=True,
        )
        if not candidates:
            return None
        if decision.trigger in LOSS_TRIGGERS:
            margin = self.trigger.runaway_steps
            proven = [i for i in candidates if (self.snapshots[i].step or 0) + margin <= first_bad]
            return proven[0] if proven else candidates[-1]
        return candidates[0]

    def after_decide(
        self, engine: Engine, outcome: StepOutcome, engines: Sequence[Engine]
    ) -> tuple[StepOutcome, RecoveryError | None]:
        """Feed the trigger; roll back, fall back, snapshot, or do nothing; returns the outcome to apply and any error.

        Args:
            engine: the engine that decided ``outcome`` (any optimizer's).
            outcome: what it decided.
            engines: every engine of the front-end (their own state is snapshotted and restored).

        Returns:
            ``(outcome, error)``: on a rollback the outcome is marked skipped, its streak error cleared and
            a ``"rollback"`` event added; ``error`` is a :class:`RecoveryError` to raise (every rank, same
            step) once the step has been reported, else ``None``.
        """
        if engine.monitor_only or not self.snapshots:
            return outcome, None
        step = outcome.step
        buffers = self.buffers
        state_bad = not engine.state_finite
        repaired = state_bad and buffers is not None and buffers.restore()
        # A step the AMP GradScaler skips is its calibration's business: its gradients are not counted
        # and a finite loss stays out of the runaway window. A non-finite loss is fed: the loss is
        # unscaled, so no loss scale can make it finite (a NaN loss is NaN at any scale).
        scaler = outcome.scaler_skipped
        loss = outcome.loss if engine.index == 0 else None
        if scaler and loss is not None and math.isfinite(loss):
            loss = None
        decision = self.trigger.update(
            step,
            loss=loss,
            nonfinite=(not outcome.stats.finite and not scaler) or state_bad,
            skipped=outcome.skipped or scaler or state_bad,
            source=engine.index,
        )
        if state_bad and not repaired and not decision.rollback and decision.error is None:
            what = "non-finite module buffers (e.g. BatchNorm statistics) with no finite copy to put back"
            decision = self.trigger.fire(step, "nonfinite_state", what, decision.evidence)
        # Escalation: a non-finite streak that reached `max_consecutive_skips` rolls back before it stops.
        streak_error = outcome.error is not None and engine.on_nonfinite == "skip"
        if streak_error and not decision.rollback and decision.error is None:
            streak = engine.counters.consecutive_skips
            what = f"{streak} consecutive steps with non-finite gradients"
            decision = self.trigger.fire(step, "nonfinite_grad", what, decision.evidence, step - streak + 1)
        if decision.rollback or decision.error is not None:
            if engine.on_nonfinite == "raise" and outcome.error is not None:
                return outcome, None
            slot = self._target(decision) if decision.error is None else None
            with _scheduler_lrs(engines):
                if slot is not None:
                    outcome = self._roll_back(decision, outcome, engines, slot)
                    self._save_buffers(True)
                    return outcome, None
                outcome, error = self._fall_back(decision, outcome, engines)
            self._save_buffers(not state_bad or repaired)
            return outcome, error
        if state_bad and not outcome.skipped and not scaler:
            text = (
                f"skipped optimizer step {step}: non-finite module buffers after the forward pass (e.g. BatchNorm "
                "statistics of a batch with a non-finite sample); buffers put back to their values before the step"
            )
            event = GuardEvent("skipped", step, text, evidence={"buffers_restored": int(repaired)})
            outcome = replace(outcome, skipped=True, clipped=False, coefficient=None, events=(*outcome.events, event))
            engine.counters.skipped_total += 1
            engine.interval.skipped += 1
        elif outcome.skipped and buffers is not None and not state_bad:
            buffers.restore()  # the step leaves no trace in the running statistics
        if decision.snapshot_ok:
            self._declined = False
        if engine.index == 0 and decision.snapshot_ok and not state_bad and self._due(step):
            slot = self._capture_slot(step)
            with _scheduler_lrs(engines):
                self.snapshots[slot].capture(step, extra={"engines": {str(e.index): _own_state(e) for e in engines}})
            self._failed.discard(slot)
            self._retried.discard(slot)
            self._captures_since_rollback += 1
        self._save_buffers(not state_bad or repaired)
        return outcome, None

    def _save_buffers(self, finite: bool) -> None:
        """Copy the buffers the next forward pass starts from (``finite``: they are known to be finite)."""
        if self.buffers is not None:
            self.buffers.finite_now = finite
            self.buffers.save()

    def _lower_lr(self, engines: Sequence[Engine], trigger: str | None = None) -> tuple[float, float] | None:
        """Cut the LR of every guarded optimizer by its guard's ``factor`` (squared after a loss climb: a loss that
        tripled from the start within steps is an LR that is several times too high)."""
        scales = [
            e.lr_guard.force_reduction(e.lr_guard.factor ** (2 if trigger == "loss_climb" else 1))
            for e in engines
            if e.lr_guard is not None
        ]
        return scales[0] if scales else None

    def _roll_back(
        self, decision: RollbackDecision, outcome: StepOutcome, engines: Sequence[Engine], slot: int
    ) -> StepOutcome:
        snapshot = self.snapshots[slot]
        assert snapshot.step is not None
        saved = snapshot.extra.get("engines", {})
        restored_to = snapshot.restore()
        history = self.trigger.history
        last = history[-1] if history else None
        again = (
            last is not None
            and last.trigger == decision.trigger
            and decision.step - last.step <= self.trigger.runaway_window
        )
        cut = decision.trigger in LOSS_TRIGGERS or again
        counted = restored_to >= self.every_n_steps
        record = self.trigger.record_rollback(decision, restored_to, counted=counted)
        self._last_slot = slot
        self._captures_since_rollback = 0
        self._declined = False
        overshoot = _overshoot(decision)
        for e in engines:
            _load_own_state(e, saved.get(str(e.index)))
            e.counters.consecutive_skips = 0
            if overshoot is not None and e.lr_guard is not None:
                e.lr_guard.observe_overshoot(overshoot)
        lr_scale = engines[0].lr_guard.lr_scale if engines and engines[0].lr_guard is not None else 1.0
        before = after = lr_scale
        if cut:
            scales = self._lower_lr(engines, decision.trigger)
            if scales is not None:
                before, after = scales
                lr_text = f"LR scale {before:.4g} -> {after:.4g}"
            else:
                lr_text = "LR unchanged (no LR guard)"
        else:
            lr_text = f"LR scale kept at {before:.4g} (a non-finite fault is not evidence of a too-high LR)"
        note = "" if counted else " (an early rollback: not counted against max_rollbacks)"
        message = (
            f"rollback {self.trigger.rollbacks_total}/{self.trigger.max_rollbacks}: {decision.message}; restored "
            f"step {restored_to} ({record.steps_lost} step(s) lost), {lr_text}, step {decision.step} skipped{note}"
        )
        evidence = dict(decision.evidence)
        evidence.update(
            trigger=str(decision.trigger),
            restored_to=restored_to,
            steps_lost=record.steps_lost,
            rollbacks_total=self.trigger.rollbacks_total,
            counted=int(counted),
            lr_scale_before=before,
            lr_scale=after,
        )
        event = GuardEvent("rollback", decision.step, message, evidence=evidence)
        return replace(
            outcome, skipped=True, clipped=False, coefficient=None, error=None, events=(*outcome.events, event)
        )

    def _fall_back(
        self, decision: RollbackDecision, outcome: StepOutcome, engines: Sequence[Engine]
    ) -> tuple[StepOutcome, RecoveryError | None]:
        """No rollback: skip (non-finite) or clip (runaway) and go on; raise only when the run cannot continue."""
        step = decision.step
        self.trigger.decline(decision)
        events = outcome.events
        if not self._declined:
            self._declined = True
            if decision.error is not None:
                why = f"max_rollbacks={self.trigger.max_rollbacks} spent"
            else:
                why = f"no snapshot from before step {decision.first_bad} left to restore"
            lr_text = ""
            if decision.trigger in LOSS_TRIGGERS:
                scales = self._lower_lr(engines)  # one cut by the factor: the loss went up, the cause is open
                if scales is not None:
                    lr_text = f", LR scale {scales[0]:.4g} -> {scales[1]:.4g}"
            message = (
                f"no rollback at step {step}: {decision.reason} ({decision.trigger}), but {why}; "
                f"training continues with skipping and clipping{lr_text}"
            )
            evidence = dict(decision.evidence)
            evidence.update(trigger=str(decision.trigger), rollbacks_total=self.trigger.rollbacks_total)
            events = (*events, GuardEvent("rollback", step, message, evidence=evidence))
        stop = outcome.error is not None and _stops_by_skipping(outcome)
        if decision.trigger == "nonfinite_state" or (stop and self.trigger.rollbacks_total > 0):
            what = decision.reason if not stop else f"{decision.reason}; {outcome.error}"
            error = RecoveryError(self.trigger._error_message(step, str(decision.trigger), what))
            return replace(outcome, skipped=True, error=None, events=events), error
        return replace(outcome, events=events), None


def _stops_by_skipping(outcome: StepOutcome) -> bool:
    """Whether ``outcome`` stops training through the skip streak (rather than ``on_nonfinite="raise"``)."""
    return outcome.skipped or outcome.scaler_skipped


@contextlib.contextmanager
def _scheduler_lrs(engines: Sequence[Engine]) -> Iterator[None]:
    """The param groups hold the schedulers' own LRs (not the LR guard's scaled ones) within the block."""
    with contextlib.ExitStack() as stack:
        for e in engines:
            if e.lr_guard is not None:
                stack.enter_context(e.lr_guard.scheduler_lrs())
        yield


def _own_state(engine: Engine) -> dict[str, Any]:
    """The parts of an engine's state a rollback puts back (the clip policy, LR guard and diagnostics)."""
    state: dict[str, Any] = {}
    if engine.policy is not None:
        state["policy"] = engine.policy.state_dict()
    if engine.lr_guard is not None:
        state["lr_guard"] = engine.lr_guard.state_dict()
    if engine.diagnostics is not None:
        state["diagnostics"] = engine.diagnostics.state_dict()
    return state


def _overshoot(decision: RollbackDecision) -> float | None:
    """How far a loss trigger saw the loss above its reference (the start for a climb, the running level for a
    runaway); ``None`` for the other triggers."""
    evidence = decision.evidence
    if decision.trigger == "loss_climb":
        return float(evidence.get("climb", math.nan))
    if decision.trigger == "loss_runaway" and float(evidence.get("median", 0.0)) > 0.0:
        return float(evidence.get("loss", math.nan)) / float(evidence["median"])
    return None


def _load_own_state(engine: Engine, state: Mapping[str, Any] | None) -> None:
    if not state:
        return
    if engine.policy is not None and "policy" in state:
        engine.policy.load_state_dict(dict(state["policy"]))
    if engine.lr_guard is not None and "lr_guard" in state:
        # The detector goes back to the snapshot; the LR scale does not: the cuts made since (by the
        # detector or by earlier rollbacks) stay, and the rollback's own cut comes on top. Nor does the
        # evidence that the loss once climbed far above its start: it is a fact about the run's LR, and the
        # stall channel needs it to go on cutting a restored run that stalls short of learning.
        saved = dict(state["lr_guard"])
        now = engine.lr_guard.state_dict()
        saved.update(
            lr_scale=now["lr_scale"],
            num_reductions=now["num_reductions"],
            peak_loss_ratio=max(float(saved.get("peak_loss_ratio", 0.0)), float(now["peak_loss_ratio"])),
        )
        engine.lr_guard.load_state_dict(saved)
    if engine.diagnostics is not None and "diagnostics" in state:
        # The norm windows go back to the snapshot (the blown-up norms leave the baselines); the account
        # of the run does not: the log steps observed, their span, open episodes and the verdict records
        # stay, so the end-of-fit summary still covers the whole run.
        diag = dict(state["diagnostics"])
        current = engine.diagnostics.state_dict()
        layers = {name: dict(layer) for name, layer in diag.get("layers", {}).items()}
        for name, now in current["layers"].items():
            merged = layers.setdefault(name, {"history": [], "numel": now["numel"]})
            merged.update(active=now["active"], records=now["records"])
        diag.update(
            observations=current["observations"],
            first_step=current["first_step"],
            last_step=current["last_step"],
            layers=layers,
        )
        engine.diagnostics.load_state_dict(diag)
