"""One optimizer step of any front-end, in order: measure, decide, recover, apply, bookkeep, write.

:class:`OptimizerStep` owns the sequence; the Lightning callback, :class:`~lightning_gradguard.Guard` and
:class:`~lightning_gradguard.FabricGuard` translate their hooks into its two calls:

- :meth:`OptimizerStep.run`, between the backward pass and ``optimizer.step()``:

  1. sync the parameters (a layer unfrozen or a param group added regroups the statistics);
  2. measure: one fused pass over the gradients, at most one collective, one device-to-host transfer
     (the loss, the AMP scale and recovery's buffer check ride in the same vector);
  3. decide (:meth:`Engine.decide`): threshold, clip coefficient, skip / raise / warn, LR guard;
  4. recover (:meth:`Recovery.after_decide`): roll back, fall back, or take a snapshot;
  5. apply (:func:`apply_outcome`): scale or drop the gradients;
  6. bookkeep the decisions that are not the gradients': the per-layer diagnostics at diagnose steps,
     the weight copy for the update-to-weight ratios at the steps that need them;
  7. hand a :class:`StepRecord` to the sink (write-only), then raise ``NonFiniteGradientsError`` or
     ``RecoveryError`` if training must stop (on every rank at the same step: decided from the reduced
     vector).

- :meth:`OptimizerStep.after_optimizer_step`, from an optimizer step post-hook (:meth:`OptimizerStep.attach`):
  close the weight copy into update ratios, let the LR guard's stall channel judge the global ratio and
  the diagnostics the per-layer ratios, and hand the result to the sink.

On an ordinary step (neither a log step nor a diagnose, update or snapshot step) only steps 1-5 do work.
The sink may be ``None``: the decisions are the same without outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.decide.engine import Engine, NonFiniteGradientsError, StepOutcome, apply_outcome
from lightning_gradguard.forensics.tracker import BatchContext, Forensics, skip_listed
from lightning_gradguard.records import StepRecord, StepSink, UpdateRecord
from lightning_gradguard.recovery.rollback import Recovery

__all__ = ["OptimizerStep", "StepRecord", "StepSink", "UpdateRecord"]


class OptimizerStep:
    """The optimizer step of every front-end (see the module docstring for the sequence).

    Args:
        sink: the outputs (a :class:`~lightning_gradguard.outputs.sink.Reporter`), or ``None``.
        log_every: the log cadence, in optimizer steps.
        diagnose_every: the cadence of the per-layer diagnostics and the update verdicts, in optimizer steps.
        histogram_every: the histogram cadence (``0``: never).
        heatmap_every: the heatmap cadence (``0``: never).
        recovery: the front-end's :class:`~lightning_gradguard.recovery.rollback.Recovery`, or ``None``.
        scaler_enabled: an active AMP GradScaler skips non-finite steps itself.
    """

    def __init__(
        self,
        sink: StepSink | None,
        *,
        log_every: int = 50,
        diagnose_every: int = 50,
        histogram_every: int = 0,
        heatmap_every: int = 0,
        recovery: Recovery | None = None,
        scaler_enabled: bool = False,
        forensics: Forensics | None = None,
    ) -> None:
        self.sink = sink
        self.log_every = log_every
        self.diagnose_every = diagnose_every
        self.histogram_every = histogram_every
        self.heatmap_every = heatmap_every
        self.recovery = recovery
        self.scaler_enabled = scaler_enabled
        self.forensics = forensics
        self._pending: dict[int, tuple[int, bool, bool]] = {}  # index -> (global step, log step, diagnose step)
        self._hooks: dict[int, Any] = {}  # id(optimizer) -> step post-hook handle

    def run(
        self,
        engine: Engine,
        optimizer: torch.optim.Optimizer,
        named_parameters: Callable[[], Iterable[tuple[str, Tensor]]],
        engines: Sequence[Engine],
        *,
        global_step: int,
        loss: Tensor | None = None,
        amp_scale: Tensor | None = None,
        on_applied: Callable[[StepOutcome], None] | None = None,
        context: BatchContext | None = None,
    ) -> StepRecord:
        """One optimizer step of ``engine``; returns its record, or raises once it is written.

        Args:
            engine: the optimizer's engine.
            optimizer: the optimizer about to step.
            named_parameters: its parameters with their names (called only when they changed).
            engines: every engine of the front-end (recovery snapshots and restores them all).
            global_step: the front-end's step counter the outputs are written at.
            loss: the step's mean unscaled loss, a scalar tensor still on the device.
            amp_scale: the GradScaler's scale when the gradients are still scaled.
            on_applied: called with the outcome once it is applied (before anything is written).
            context: the batch of this step (epoch, index, the batch, a closure that re-runs it), for the
                incident records, replays and the skip list.
        """
        # 1-2. sync and measure: one pass, one collective, one transfer
        engine.sync_parameters(optimizer, named_parameters)
        recovery = self.recovery
        check = recovery.state_check() if recovery is not None else None
        stats, loss_value, scale_value = engine.measure(loss=loss, amp_scale=amp_scale, state_check=check)
        # 3. decide (a batch on the skip list is dropped), and spot an incident while the weights are its own
        outcome = engine.decide(stats, loss=loss_value, amp_scale=scale_value, scaler_enabled=self.scaler_enabled)
        forensics = self.forensics
        if forensics is not None:
            listed = forensics.listed(context)
            if listed is not None and context is not None:
                outcome = engine.last = skip_listed(engine, outcome, listed, context)
            forensics.replay(engine, outcome, context)
        # 4. recover
        failure: Exception | None = None
        if recovery is not None:
            outcome, failure = recovery.after_decide(engine, outcome, engines)
            engine.last = outcome
        # 5. apply
        apply_outcome(engine, outcome)
        if on_applied is not None:
            on_applied(outcome)
        # 6. bookkeeping at the steps that need it
        step = outcome.step
        log_step = step % self.log_every == 0
        diagnose_step = step % self.diagnose_every == 0
        events = outcome.events
        if diagnose_step:
            events += engine.diagnose(outcome)
        updates_pending = False
        if engine.wants_updates(step, log_step, diagnose_step) and engine.snapshot_updates(outcome):
            updates_pending = True
            self._pending[engine.index] = (global_step, log_step, diagnose_step)
        if outcome.error is not None:
            failure = NonFiniteGradientsError(outcome.error)
        if forensics is not None:
            incident = forensics.record(
                engine,
                outcome,
                optimizer,
                global_step=global_step,
                stopped=failure is not None,
                context=context,
                amp_scale=scale_value,
            )
            if incident is not None:
                events += (incident,)
        # 7. write, then stop if training must
        record = StepRecord(
            index=engine.index,
            global_step=global_step,
            outcome=outcome,
            log_step=log_step,
            diagnose_step=diagnose_step,
            histogram_step=bool(self.histogram_every) and step % self.histogram_every == 0,
            heatmap_step=bool(self.heatmap_every) and step > 0 and step % self.heatmap_every == 0,
            updates_pending=updates_pending,
            events=events,
            recovery_metrics=self._recovery_metrics(engine) if log_step else None,
            error=failure,
        )
        if self.sink is not None:
            self.sink.write(engine, record)
        if failure is not None:
            raise failure
        return record

    def after_optimizer_step(self, engine: Engine, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After ``optimizer.step()``: the update since the weight copy, the stall check and the update verdicts."""
        pending = self._pending.pop(engine.index, None)
        step = engine.last.step if engine.last is not None else 0
        diagnose_step = pending is not None and pending[2]
        closed = engine.close_updates(step, record_ratios=diagnose_step, optimizer=optimizer)
        if closed is None or pending is None:
            return
        stats, events = closed
        if self.forensics is not None:
            incident = self.forensics.record_update(engine, events, pending[0])
            if incident is not None:
                events += (incident,)
        if self.sink is not None:
            record = UpdateRecord(engine.index, step, pending[0], pending[1], stats, events)
            self.sink.write_updates(engine, record)

    def end(self, engine: Engine, global_step: int) -> None:
        """End of training: the diagnostics judge the last step if it was not a diagnose step; the sink writes
        the unfinished interval, those verdicts, the heatmap and the summary."""
        last = engine.last
        events = engine.diagnose(last) if last is not None and last.step % self.diagnose_every else ()
        if self.sink is not None:
            self.sink.end(engine, global_step, events, self._recovery_metrics(engine))

    def attach(self, engine: Engine, optimizer: torch.optim.Optimizer) -> None:
        """Read the update after each step of ``optimizer`` (a step post-hook), where updates are tracked."""
        if engine.updates is None or id(optimizer) in self._hooks:
            return

        def after(stepped: Any, _args: Any, _kwargs: Any) -> None:
            self.after_optimizer_step(engine, stepped)

        self._hooks[id(optimizer)] = optimizer.register_step_post_hook(after)

    def detach(self) -> None:
        """Remove the optimizer hooks of :meth:`attach` and forget pending weight copies."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._pending.clear()

    def _recovery_metrics(self, engine: Engine) -> dict[str, float] | None:
        if self.recovery is None or engine.index != 0:
            return None
        return self.recovery.metrics()
