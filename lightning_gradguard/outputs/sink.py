"""Outputs of every front-end: the logged metrics, TensorBoard histograms, heatmap and text events.

A :class:`Reporter` is the write-only end of :class:`~lightning_gradguard.step.OptimizerStep`: it takes each
step's :class:`~lightning_gradguard.step.StepRecord` (and, after the optimizer step, its
:class:`~lightning_gradguard.step.UpdateRecord`) and writes what the record says is due: scalars through
``log_metrics`` (every Lightning logger, or a ``SummaryWriter``), histograms and the heatmap through the rich
writers (:func:`~lightning_gradguard.outputs.loggers.rich_writers`: TensorBoard, W&B, MLflow) or the
TensorBoard writer, text events through the TensorBoard writer, messages through the front-end's rank-zero
``warn`` / ``info`` and every event to the user's ``on_event`` hook. Only rank zero is given a writer, rich
writers, a ``log_metrics`` and the hook.

Nothing here decides, raises or changes decision state; the only engine state it touches is its own output
buffers (the aggregates since the last log step and the heatmap columns, at log steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning_gradguard.decide.engine import Engine, StepOutcome
from lightning_gradguard.events import GuardEvent, OnEvent
from lightning_gradguard.keys import tag
from lightning_gradguard.measure.updates import update_metrics
from lightning_gradguard.options import GuardOptions
from lightning_gradguard.outputs.alerts import event_json
from lightning_gradguard.outputs.heatmap import HeatmapFigure
from lightning_gradguard.outputs.tensorboard import EventLog, layer_norm_extremes, threshold_band, write_histograms

if TYPE_CHECKING:  # the records are the step's (a higher layer); only their type is needed here
    from lightning_gradguard.records import StepRecord, UpdateRecord

__all__ = ["Reporter", "dashboard_metrics", "step_metrics"]

LogMetrics = Callable[[dict[str, float], int], None]
Say = Callable[[str], None]


def step_metrics(engine: Engine, outcome: StepOutcome, scaler_enabled: bool, layer_norms: bool) -> dict[str, float]:
    """The scalars logged at a log step (see ``docs/logged-keys.md``), from the outcome and the aggregates."""
    i, interval, counters = engine.index, engine.interval, engine.counters
    metrics = {
        tag("global_norm", i): outcome.global_norm,
        tag("global_norm_max", i): interval.norm_max,
        tag("global_norm_mean", i): interval.norm_sum / interval.finite if interval.finite else math.nan,
        tag("steps", i): float(interval.steps),
        tag("skipped", i): float(interval.skipped),
        tag("skipped_total", i): float(counters.skipped_total),
    }
    if scaler_enabled:
        metrics[tag("scaler_skipped", i)] = float(interval.scaler_skipped)
    if engine.policy is not None:
        if outcome.threshold is not None:
            metrics[tag("threshold", i)] = outcome.threshold
        if outcome.post_clip_norm is not None:
            metrics[tag("post_clip_norm", i)] = outcome.post_clip_norm
        metrics[tag("clipped", i)] = float(outcome.clipped)
        metrics[tag("clip_rate", i)] = interval.clipped / interval.finite if interval.finite else 0.0
        metrics[tag("clipped_total", i)] = float(counters.clipped_total)
    if engine.lr_guard is not None:
        metrics[tag("lr_scale", i)] = engine.lr_guard.lr_scale
        metrics[tag("lr", i)] = engine.lr_guard.effective_lrs()[0]
    if layer_norms:
        for layer, norm in outcome.stats.layer_norms().items():
            metrics[tag("layer_norm/{layer}", i, layer)] = norm
    metrics.update(dashboard_metrics(engine, outcome))
    return metrics


def dashboard_metrics(engine: Engine, outcome: StepOutcome) -> dict[str, float]:
    """The dashboard's extra scalars of a log step: ``loss``, the ``band/*`` triple, the layer-norm extremes."""
    i, metrics = engine.index, {}
    if outcome.loss is not None:
        metrics[tag("loss", i)] = outcome.loss
    if engine.policy is not None:
        band = threshold_band(outcome.global_norm, outcome.post_clip_norm, outcome.threshold)
        metrics.update((tag(name, i), value) for name, value in band.items())
    extremes = layer_norm_extremes(outcome.stats.layer_norms())
    metrics.update((tag(name, i), value) for name, value in extremes.items())
    return metrics


class Reporter:
    """Writes the records of one front-end's steps to its outputs.

    Args:
        options: the guard's options (histogram bins, layer norms, heatmap).
        warn: rank-zero warning (receives the full text, ``"GradGuard: ..."``).
        info: rank-zero information.
        writer: a TensorBoard ``SummaryWriter`` (rank zero only), or ``None``.
        log_metrics: ``(metrics, step) -> None`` for the scalars (rank zero only), or ``None``.
        scaler_enabled: whether an active AMP GradScaler is in use (adds ``scaler_skipped``).
        on_event: the user's hook, called with every event (rank zero only), or ``None``. An exception
            it raises is reported once as a warning and training continues.
        rich_writers: writers for histograms and images (:func:`~lightning_gradguard.outputs.loggers.rich_writers`);
            ``None`` sends them to ``writer``.
    """

    def __init__(
        self,
        options: GuardOptions,
        warn: Say,
        info: Say,
        writer: Any | None = None,
        log_metrics: LogMetrics | None = None,
        scaler_enabled: bool = False,
        on_event: OnEvent | None = None,
        rich_writers: list[Any] | None = None,
    ) -> None:
        self.options = options
        self.warn, self.info = warn, info
        self.writer = writer
        self.log_metrics = log_metrics
        self.scaler_enabled = scaler_enabled
        self.on_event = on_event
        self.rich_writers = rich_writers
        self._notified: set[str] = set()
        self._hook_failed = False
        self.events = EventLog()  # text events, one TensorBoard entry per step and tag
        self.last_global_step: dict[int, int] = {}  # engine index -> global step of its last optimizer step
        # engine index -> the figure its heatmaps are drawn into: one pixel buffer however many are written
        self._heatmap_figures: dict[int, HeatmapFigure] = {}

    def notice_once(self, key: str, message: str) -> None:
        """A one-off setup notice (``message`` without the ``"GradGuard: "`` prefix), once per key."""
        if key not in self._notified:
            self._notified.add(key)
            self.emit(GuardEvent("notice", 0, message), index=None)

    def emit(self, event: GuardEvent, index: int | None) -> None:
        """Hand ``event`` to the ``on_event`` hook, print it (warning or information) and, for a
        step event, queue it as TensorBoard text: its message under ``events``, its JSON record
        (:func:`~lightning_gradguard.outputs.alerts.event_json`) under ``event_records``.

        The events of one step are written together, as one entry (TensorBoard's Text tab shows one entry
        per step and tag), once a later step has an event or at :meth:`flush_events`.
        """
        self.forward(event)
        (self.warn if event.is_warning else self.info)(event.text)
        if self.writer is not None and index is not None:
            self.events.add(tag("events", index), event.step, event.message, self.writer)
            self.events.add(tag("event_records", index), event.step, event_json(event), self.writer)

    def flush_events(self) -> None:
        """Write the queued text events, then flush the writer (end of training, before raising)."""
        self.events.flush(self.writer)
        if self.writer is not None:
            self.writer.flush()

    def forward(self, event: GuardEvent) -> None:
        """Call the ``on_event`` hook; an exception in it is warned about once and does not stop training."""
        hook = self.on_event
        if hook is None:
            return
        try:
            hook(event)
        except Exception as exc:  # the user's code: never let an alert channel kill a training run
            if not self._hook_failed:
                self._hook_failed = True
                self.warn(
                    f"GradGuard: the on_event hook raised {type(exc).__name__}: {exc} (on a {event.kind!r} event at "
                    f"step {event.step}); training continues, and further errors of the hook are not reported."
                )

    def write(self, engine: Engine, record: StepRecord) -> None:
        """The events of a step, then the outputs its record says are due; flushes when training stops."""
        self.last_global_step[engine.index] = record.global_step
        for event in record.events:
            self.emit(event, engine.index)
        if record.log_step:
            self.scalars(engine, record.outcome, record.global_step, record.recovery_metrics)
        if record.histogram_step:
            self.histograms(engine, record.global_step)
        if record.heatmap_step:
            self.heatmap(engine, record.global_step)
        if record.error is not None:
            self.flush_events()

    def write_updates(self, engine: Engine, record: UpdateRecord) -> None:
        """After the optimizer step: ``weight_norm/*`` and ``update_ratio/*`` at log steps, and the events."""
        if self.log_metrics is not None and record.log_step and engine.log_updates:
            self.log_metrics(update_metrics(record.stats, engine.index), record.global_step)
        for event in record.events:
            self.emit(event, engine.index)

    def scalars(
        self, engine: Engine, outcome: StepOutcome, global_step: int, extra: dict[str, float] | None = None
    ) -> None:
        """Log the scalars (``extra``: recovery's counters), then start the next interval and heatmap column."""
        if self.log_metrics is not None:
            metrics = step_metrics(engine, outcome, self.scaler_enabled, self.options.log_layer_norms)
            if extra:
                metrics.update(extra)
            self.log_metrics(metrics, global_step)
        engine.close_interval(outcome, global_step, heatmap=bool(self.options.heatmap_every_n_steps))

    def histograms(self, engine: Engine, global_step: int) -> None:
        """Per-layer histograms (every rank computes them: sharded layers need collectives)."""
        histograms = engine.histograms(self.options.histogram_bins)
        if self.rich_writers is not None:
            for rich in self.rich_writers:
                rich.histograms(engine.index, global_step, histograms)
        elif self.writer is not None:
            write_histograms(self.writer, engine.index, global_step, histograms)

    def heatmap(self, engine: Engine, global_step: int) -> None:
        """The layer x step heatmap image, once there are two columns."""
        if (self.writer is None and not self.rich_writers) or len(engine.heatmap_steps) < 2:
            return
        figure = self._heatmap_figures.get(engine.index)
        if figure is None:
            figure = self._heatmap_figures[engine.index] = HeatmapFigure()
        try:
            image = figure.render(engine.stats.layers, engine.heatmap_steps, engine.heatmap_grid())
        except ImportError as exc:
            self.notice_once("heatmap", f"heatmap skipped ({exc}).")
            return
        name = tag("heatmap", engine.index)
        if self.rich_writers is not None:
            for rich in self.rich_writers:
                rich.image(name, image, global_step)
        elif self.writer is not None:
            self.writer.add_image(name, image, global_step, dataformats="HWC")

    def end(
        self,
        engine: Engine,
        global_step: int,
        events: tuple[GuardEvent, ...] = (),
        extra: dict[str, float] | None = None,
    ) -> None:
        """End of training: log an unfinished interval, the last ``events``, the heatmap, the diagnostics summary.

        The unfinished interval is logged at the global step of the engine's last optimizer step (the
        front-end's ``global_step`` is one past it by then); ``global_step`` is used before any step.
        """
        global_step = self.last_global_step.get(engine.index, global_step)
        last = engine.last
        if last is not None and engine.interval.steps:
            self.scalars(engine, last, global_step, extra if engine.index == 0 else None)
        for event in events:
            self.emit(event, engine.index)
        if self.options.heatmap_every_n_steps:
            self.heatmap(engine, global_step)
        if engine.diagnostics is not None:
            summary = engine.diagnostics.summary()
            if summary:
                self.emit(GuardEvent("summary", engine.counters.steps, f"diagnostics summary:\n{summary}"), index=None)
        self.flush_events()
