"""What one optimizer step produced, as data: the records the step hands to its sink, and the sink's protocol.

The step (:mod:`lightning_gradguard.step`) builds them; the outputs (:mod:`lightning_gradguard.outputs`) and the
front-ends read them. They sit below both, so neither imports the other to name them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lightning_gradguard.decide.engine import Engine, StepOutcome
from lightning_gradguard.events import GuardEvent
from lightning_gradguard.measure.updates import UpdateStats

__all__ = ["StepRecord", "StepSink", "UpdateRecord"]


@dataclass(frozen=True)
class StepRecord:
    """What happened at one optimizer step of one optimizer, as handed to the sink and returned to the front-end.

    Attributes:
        index: the optimizer's index.
        global_step: the front-end's step counter the outputs are written at.
        outcome: the decision, as applied (after recovery).
        log_step: scalars are written at this step.
        diagnose_step: the per-layer diagnostics judged this step.
        histogram_step: per-layer histograms are written at this step.
        heatmap_step: the heatmap image is written at this step.
        updates_pending: the weights were copied: :meth:`OptimizerStep.after_optimizer_step` reads the update.
        events: everything reported about the step, in order (the decision's, recovery's, the verdicts).
        recovery_metrics: recovery's counters, logged with the first optimizer's scalars at log steps.
        error: what stops training after the record is written, else ``None``.
    """

    index: int
    global_step: int
    outcome: StepOutcome
    log_step: bool = False
    diagnose_step: bool = False
    histogram_step: bool = False
    heatmap_step: bool = False
    updates_pending: bool = False
    events: tuple[GuardEvent, ...] = ()
    recovery_metrics: dict[str, float] | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class UpdateRecord:
    """The update of one optimizer step, read after ``optimizer.step()`` (:meth:`OptimizerStep.after_optimizer_step`).

    Attributes:
        index: the optimizer's index.
        step: the optimizer step the weights were copied at.
        global_step: the front-end's step counter at that step.
        log_step: the ratios are to be logged.
        stats: per-layer update and weight norms.
        events: the LR guard's stall cut and the update verdicts, if any.
    """

    index: int
    step: int
    global_step: int
    log_step: bool
    stats: UpdateStats
    events: tuple[GuardEvent, ...] = ()


class StepSink(Protocol):
    """Where records go: formats and writes them, never decides, raises or changes decision state."""

    def write(self, engine: Engine, record: StepRecord) -> None: ...

    def write_updates(self, engine: Engine, record: UpdateRecord) -> None: ...

    def end(
        self, engine: Engine, global_step: int, events: tuple[GuardEvent, ...], extra: dict[str, float] | None
    ) -> None: ...
