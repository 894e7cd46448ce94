"""GradGuard: per-layer gradient monitoring, adaptive clipping, non-finite step skipping and an LR guard.

Everything happens in ``on_before_optimizer_step``, once per optimizer step: the gradients are
complete (all micro-batches of an accumulation window, synchronised across ranks), unscaled by the
AMP GradScaler (except for fused optimizers, handled below) and not yet clipped by Lightning.

Per step, GradGuard makes one pass over the gradients (:class:`~lightning_gradguard.measure.stats.GradStats`),
at most one collective (:func:`~lightning_gradguard.measure.distributed.reduce_stats`) and one device-to-host
transfer; every decision is then taken on the host from that one vector, identically on every rank.

This module is the Lightning glue only: the options (declared and checked in :mod:`lightning_gradguard.options`),
setup checks, and hooks that hand each optimizer step to :class:`~lightning_gradguard.step.OptimizerStep` (decisions
by the per-optimizer :class:`~lightning_gradguard.decide.engine.Engine`, outputs by the
:class:`~lightning_gradguard.outputs.sink.Reporter`). The read-only views it shares with ``Guard`` are in
``frontends/_views.py``; the checkpoint state around the engines (loading, adopting, messages) in
``frontends/_checkpoint.py``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_gradguard._checks import ClipName, OnNonFinite
from lightning_gradguard._compat import (
    drop_bound_log_methods,
    scaler_scale,
    should_accumulate,
    steps_scaled_gradients,
    strategy_kind,
    warn_at_caller,
)
from lightning_gradguard.decide.diagnostics import GradientDiagnostics
from lightning_gradguard.decide.engine import Engine, optimizer_parameters, parameter_signature
from lightning_gradguard.decide.lr_guard import LRGuard
from lightning_gradguard.decide.policies import ThresholdPolicy
from lightning_gradguard.errors import GradGuardError
from lightning_gradguard.events import OnEvent
from lightning_gradguard.forensics.tracker import BatchContext
from lightning_gradguard.frontends._checkpoint import (
    CallbackState,
    adopt_checkpoint_state,
    config_summary,
    describe,
    describe_clip,
    version_2_state_key,
)
from lightning_gradguard.frontends._views import GuardViews
from lightning_gradguard.keys import tag
from lightning_gradguard.measure.stats import GroupBy
from lightning_gradguard.options import BatchIds, GuardOptions, option_names
from lightning_gradguard.outputs.loggers import rich_writers
from lightning_gradguard.outputs.sink import Reporter
from lightning_gradguard.outputs.tensorboard import EventLog, dashboard_layout, find_writer
from lightning_gradguard.recovery.rollback import Recovery, RollbackTrigger
from lightning_gradguard.step import OptimizerStep

__all__ = ["GradClip", "GradGuard", "GradMonitor"]


class GradGuard(GuardViews, Callback):
    r"""Keeps gradients healthy: per-layer norms and histograms, adaptive clipping, non-finite skipping, LR guard.

    Add it with one line, ``Trainer(callbacks=[GradGuard()])``. At every optimizer step it computes the
    pre-clip gradient norm of every layer in one pass, clips to a threshold that tunes itself from the
    run's own norm history, skips steps whose gradients are non-finite, and lowers the learning rate
    when clipping keeps saturating. Scalars reach every Lightning logger; histograms and the heatmap go to
    every logger that takes them (TensorBoard, W&B; MLflow the heatmap); the "GradGuard" custom-scalars
    dashboard and text events go to TensorBoard; every event also goes to ``on_event``.

    Args:
        clip: threshold policy: ``"auto"`` (default), ``"fixed"`` (needs ``max_norm``; same as
            ``gradient_clip_val``), ``"percentile"``, ``"zscore"``, a
            :class:`~lightning_gradguard.decide.policies.ThresholdPolicy` instance, or ``None`` to only monitor.
        max_norm: the threshold for ``clip="fixed"``; a cap on the threshold of adaptive policies.
        on_nonfinite: ``"skip"`` the optimizer step (weights and optimizer state untouched),
            ``"raise"`` an error, or ``"warn"`` and step anyway.
        max_consecutive_skips: with ``"skip"``, stop training with an error after this many
            consecutive skipped steps.
        lr_guard: ``True`` for the default :class:`~lightning_gradguard.decide.lr_guard.LRGuard`, an instance
            to configure it, or ``False`` to disable it. Needs clipping (``clip`` not ``None``).
        group_by: how parameters are grouped into layers: ``"module"`` (owning module, default),
            ``"param"``, an ``int`` module depth, or a callable ``param_name -> layer_name``.
        log_every_n_steps: log cadence in optimizer steps; ``None`` uses ``Trainer(log_every_n_steps)``.
        log_layer_norms: log one scalar per layer (``layer_norm/{layer}``).
        histogram_every_n_steps: per-layer gradient histograms every this many optimizer steps (``0``: none).
        histogram_bins: equal-width bins per histogram.
        diagnostics: ``True`` for the default :class:`~lightning_gradguard.decide.diagnostics.GradientDiagnostics`
            (vanishing, exploding, dead and non-finite layers), an instance, or ``False``.
        heatmap_every_n_steps: write the layer x step heatmap image every this many optimizer steps
            (and at the end of training); ``0`` disables it. Needs matplotlib.
        log_update_ratios: log each layer's weight norm and log10 update-to-weight ratio at log steps and
            judge them at diagnose steps ("LR too high for <layer>", "<layer> is not learning"); costs a copy
            of the weights at those steps (``docs/diagnostics.md``).
        on_event: called on rank zero with every :class:`~lightning_gradguard.events.GuardEvent` before it is
            logged (``docs/alerts.md``); if it raises, GradGuard warns once and training continues.
        rollback: recovery (``docs/recovery.md``): ``True`` (default; off without the LR guard) for the default
            :class:`~lightning_gradguard.recovery.trigger.RollbackTrigger`, an instance (always honoured), or
            ``False``. When it fires (non-finite gradients on 3 consecutive steps, a non-finite loss, a loss run
            away), every rank restores the last good snapshot and skips the step.
        snapshot_every_n_steps: snapshot the last good state in host memory every this many optimizer steps.
        diagnose_every_n_steps: run the per-layer diagnostics and judge the update-to-weight ratios every this
            many optimizer steps (a cadence of its own: the log cadence only decides what is written).
        incidents: record every incident (skip, rollback, stop, LR cut, norm or loss spike): leading layers,
            epoch and batch, the steps before it; ``incidents.jsonl`` beside the logs (``docs/forensics.md``).
        replay: re-run a non-finite or spiking step's batch from the same weights: *reproducible* (put on the
            skip list) or *transient*. One forward and backward per incident (not under manual optimization
            or gradient accumulation).
        batch_ids: ``batch -> sequence`` of sample ids (e.g. dataset indices), read at incidents.
        skip_list: an earlier run's ``skip_list.json``: the listed batches' steps are dropped (matched by
            sample ids when ``batch_ids`` is given, else by epoch and batch index).

    Raises:
        TypeError: an argument of the wrong type (the message names it, the allowed values and what it got).
        ValueError: an argument out of range (the message names it, the allowed values and what it got).
        GradGuardError: at setup, a conflicting Trainer setting, e.g. ``gradient_clip_val`` together
            with GradGuard clipping.
        NonFiniteGradientsError: during training, per ``on_nonfinite`` / ``max_consecutive_skips``.
        RecoveryError: during training, when recovery would roll back more than ``max_rollbacks`` times.

    Example:

        from lightning import Trainer
        from lightning_gradguard import GradGuard

        trainer = Trainer(callbacks=[GradGuard()])
    """

    def __init__(
        self,
        clip: ClipName | ThresholdPolicy | None = "auto",
        max_norm: float | None = None,
        on_nonfinite: OnNonFinite = "skip",
        max_consecutive_skips: int = 25,
        lr_guard: bool | LRGuard = True,
        group_by: GroupBy = "module",
        log_every_n_steps: int | None = None,
        log_layer_norms: bool = True,
        histogram_every_n_steps: int = 100,
        histogram_bins: int = 64,
        diagnostics: bool | GradientDiagnostics = True,
        heatmap_every_n_steps: int = 1000,
        log_update_ratios: bool = True,
        on_event: OnEvent | None = None,
        rollback: bool | RollbackTrigger = True,
        snapshot_every_n_steps: int = 100,
        diagnose_every_n_steps: int = 50,
        incidents: bool = True,
        replay: bool = False,
        batch_ids: BatchIds | None = None,
        skip_list: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self._options = GuardOptions.from_arguments(locals())  # checked; numpy scalars as Python numbers
        self._engines: dict[int, Engine] = {}  # id(optimizer) -> engine
        self._reporter = Reporter(self._options, warn=_rank_zero_warn_at_caller, info=rank_zero_info)
        self._state = CallbackState(self._reporter)
        self._scaler: Any | None = None
        self._monitor_only = False
        self._loss_sum: Tensor | None = None  # training loss since the last optimizer step (loss, LR guard)
        self._loss_count = 0
        self._recovery: Recovery | None = self._options.recovery()
        self._forensics = self._options.forensics()
        self._batch: tuple[int, int, Any] | None = None  # (epoch, batch index, batch) of the step in progress
        self._step = OptimizerStep(
            self._reporter,
            log_every=self._options.log_every(),
            diagnose_every=self._options.diagnose_every_n_steps,
            histogram_every=self._options.histogram_every_n_steps,
            heatmap_every=self._options.heatmap_every_n_steps,
            recovery=self._recovery,
            forensics=self._forensics,
        )
        self._last_trainer: weakref.ref[Trainer] | None = None  # the Trainer of the last fit (never kept alive)

    # ------------------------------------------------------------------ public read-only views
    #: Tells several GradGuards of one class in one Trainer apart in checkpoints (``docs/state.md``): set a
    #: different one on each before building the Trainer.
    name: str | None = None

    @property
    def options(self) -> GuardOptions:
        """The checked options this GradGuard was constructed with (read-only)."""
        return self._options

    @property
    def on_event(self) -> OnEvent | None:
        """The ``on_event`` hook; may be replaced before ``fit`` (it is handed to the outputs at setup)."""
        return self._options.on_event

    @on_event.setter
    def on_event(self, hook: OnEvent | None) -> None:
        self._options = replace(self._options, on_event=hook)

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: its identity, the class name, with ``[name]`` when
        :attr:`name` is set (``"GradGuard"``, ``"GradMonitor"``, ``"GradGuard[fold-b]"``)."""
        key = type(self).__qualname__
        return key if self.name is None else f"{key}[{self.name}]"

    def _engine_list(self) -> list[Engine]:
        return sorted(self._engines.values(), key=lambda e: e.index)

    def _recovery_in_use(self) -> Recovery | None:
        return self._recovery

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._start_fit(trainer)
        _refuse_shared_tags(trainer)
        self._reporter.on_event = self.on_event if getattr(trainer, "is_global_zero", True) else None
        self._monitor_only = _monitor_only(trainer, self._options, self._reporter)
        self._step.log_every = self._options.log_every(getattr(trainer, "log_every_n_steps", 0))
        if self._forensics is not None:  # incidents.jsonl and skip_list.json beside the logs, on rank zero
            self._forensics.set_log_dir(_log_dir(trainer) if getattr(trainer, "is_global_zero", True) else None)
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaler_enabled = self._scaler is not None and self._scaler.is_enabled()
        self._reporter.scaler_enabled = self._step.scaler_enabled = scaler_enabled

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._state.final = None
        _connect_outputs(self._reporter, trainer)
        for optimizer in trainer.optimizers:
            self._step.attach(self._engine_for(trainer, pl_module, optimizer), optimizer)  # again after a teardown
        self._state.report_unused(self._engines.values())
        if self._recovery is not None and not self._monitor_only:
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            modules, stateful = _callback_state(trainer, pl_module)
            self._recovery.attach(pl_module, list(trainer.optimizers), schedulers, modules=modules, stateful=stateful)
        if self._reporter.writer is not None:
            self._reporter.writer.add_custom_scalars(dashboard_layout([e.index for e in self._engine_list()]))

    def _start_fit(self, trainer: Trainer) -> None:
        """Forget the previous fit: its engines are keyed by optimizers (and hold parameters) that are gone."""
        previous = self._last_trainer() if self._last_trainer is not None else None
        carried = self._state.start_fit(
            self._engines.values(), continued=previous is trainer and trainer.global_step > 0
        )
        self._engines = {}
        self._loss_sum, self._loss_count = None, 0
        self._reporter.events = EventLog()
        self._reporter.last_global_step = {}
        if not carried:  # rollback counters belong to one run, like the engines
            self._recovery = self._step.recovery = self._options.recovery()
        self._last_trainer = _weak_ref(trainer)

    def _engine_for(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> Engine:
        engine = self._engines.get(id(optimizer))
        if engine is not None:
            return engine
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), len(self._engines))
        engine = self._options.engine(index, optimizer_parameters(pl_module, optimizer), self._monitor_only)
        engine.signature = parameter_signature(optimizer)
        self._state.apply_pending(engine)
        if engine.lr_guard is not None:
            engine.lr_guard.attach(optimizer)
        self._step.attach(engine, optimizer)
        self._engines[id(optimizer)] = engine
        return engine

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for engine in self._engines.values():
            if engine.lr_guard is not None:
                engine.lr_guard.detach()
            engine.stats.release()  # the counters, history and views stay; the parameters may go
        self._step.detach()
        # Nothing of this fit may keep the Trainer or the model alive (k folds with one GradGuard).
        self._reporter.writer, self._reporter.log_metrics, self._scaler = None, None, None
        self._reporter.rich_writers = None
        if self._recovery is not None:
            self._recovery.snapshot = None  # host copies and references of this fit's model and optimizers
        drop_bound_log_methods(self)  # the model's `log` / `log_dict`, which Lightning sets on every callback
        self._loss_sum, self._loss_count = None, 0

    # ------------------------------------------------------------------ the step
    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        """Keep the loss on the device (it reaches the host with the step's statistics): the mean unscaled loss of
        the step's micro-batches (Lightning divides each by ``accumulate_grad_batches``: multiplied back)."""
        if self._monitor_only:
            return
        value = loss.detach().float().reshape(())
        accumulate = getattr(trainer, "accumulate_grad_batches", 1)
        if pl_module.automatic_optimization and accumulate > 1:
            value = value * accumulate
        scale = scaler_scale(self._scaler)
        if scale is not None:
            value = value / scale.to(value.device)  # Lightning hands the hook the AMP-scaled loss
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._forensics is not None:  # the batch in progress (a reference), for incident records and replays
            self._batch = (trainer.current_epoch, batch_idx, batch)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._monitor_only and should_accumulate(trainer):
            return  # DeepSpeed calls this hook on every micro-batch: read complete gradients only
        loss, count = self._loss_sum, self._loss_count
        if loss is not None and count > 1:
            loss = loss / count  # the mean of the micro-batches' losses
        self._loss_sum, self._loss_count = None, 0
        self._step.run(
            self._engine_for(trainer, pl_module, optimizer),
            optimizer,
            lambda: optimizer_parameters(pl_module, optimizer),
            list(self._engines.values()),
            global_step=trainer.global_step,
            loss=loss,
            amp_scale=scaler_scale(self._scaler) if steps_scaled_gradients(optimizer) else None,
            context=_batch_context(self._batch, self._options.replay, trainer, pl_module) if self._forensics else None,
        )

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # a later checkpoint: no flush
        self._state.final = {str(e.index): e.state_dict() for e in self._engines.values()}
        for engine in self._engines.values():
            self._step.end(engine, trainer.global_step)

    # ------------------------------------------------------------------ state (kept in frontends/_checkpoint.py)
    @override
    def state_dict(self) -> dict[str, Any]:
        """Everything that affects future decisions, as Python primitives: per optimizer, the counters, the clip
        policy's history, the LR guard's and the diagnostics' state (``docs/state.md`` lists every key)."""
        config = config_summary(type(self).__qualname__, self._options)
        forensics = {"forensics": self._forensics.state_dict()} if self._forensics is not None else {}
        return self._state.state_dict(self._engines.values(), config, self._recovery) | forensics

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, also from earlier versions or a differently configured GradGuard;
        each difference and what is done about it is reported once (``docs/state.md``)."""
        self._state.load_state_dict(state_dict, self._engines.values(), self._recovery)
        if self._forensics is not None:
            self._forensics.load_state_dict(state_dict.get("forensics") or {})  # the skip list a resumed run honours

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """When the checkpoint holds no state under :attr:`state_key`: load the state of state version 2 or the
        only unclaimed GradGuard state, or start fresh with a message (the rules: ``docs/state.md``)."""
        family = [_state_keys(cb) for cb in getattr(trainer, "callbacks", []) if isinstance(cb, GradGuard)]
        states = checkpoint.get("callbacks") or {}
        adopt_checkpoint_state(states, _state_keys(self), family, self.load_state_dict, self._state.say)


FSDP1_MESSAGE = (
    "GradGuard does not support Lightning's FSDPStrategy (FSDP1): its gradients are plain-tensor pieces "
    "of flattened parameters, so per-layer norms and clip decisions would be wrong. Shard with FSDP2 "
    "instead: ModelParallelStrategy with torch.distributed.fsdp.fully_shard applied in configure_model "
    "(see docs/distributed.md)."
)
DEEPSPEED_NOTICE = (
    "DeepSpeed owns gradient clipping and overflow handling; GradGuard only monitors "
    "(no clipping, skipping or LR guard), at gradient-accumulation boundaries."
)
NO_TENSORBOARD_NOTICE = (
    "no TensorBoardLogger attached; the dashboard layout and the text events are TensorBoard-only and are "
    "skipped (scalars go to every logger, histograms and the heatmap to those that take them, events also "
    "to the console and to `on_event`)."
)


def _monitor_only(trainer: Trainer, options: GuardOptions, reporter: Reporter) -> bool:
    """Whether the Trainer's strategy leaves GradGuard only monitoring (DeepSpeed, with a notice); refuses FSDP1 and
    ``Trainer(gradient_clip_val)`` together with GradGuard clipping (both would clip)."""
    kind = strategy_kind(trainer.strategy)
    if kind == "fsdp1":
        raise GradGuardError(FSDP1_MESSAGE)
    if kind == "deepspeed":
        reporter.notice_once("deepspeed", DEEPSPEED_NOTICE)
        return True
    if trainer.gradient_clip_val and (options.clip is not None):
        clip_val, clip = trainer.gradient_clip_val, describe(options.clip)
        raise GradGuardError(
            f"Trainer(gradient_clip_val={clip_val!r}) and GradGuard(clip={clip!r}) would both clip "
            "the gradients. Remove `gradient_clip_val` from the Trainer (GradGuard(clip='fixed', "
            f"max_norm={clip_val!r}) reproduces it), or pass GradGuard(clip=None) to only monitor."
        )
    return False


def _state_keys(callback: GradGuard) -> tuple[str, str]:
    """A callback's state key and the key checkpoints of state version 2 hold its state under."""
    return callback.state_key, version_2_state_key(callback, callback.options)


def _refuse_shared_tags(trainer: Trainer) -> None:
    """Two GradGuard-family callbacks logging to the same loggers would write the same tags at the same steps."""
    family = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, GradGuard)]
    if len(family) < 2 or not trainer.loggers:
        return
    names = " and ".join(f"{type(cb).__name__}(clip={describe_clip(cb.options.clip)!r})" for cb in family)
    raise GradGuardError(
        f"{names} in one Trainer would write the same tags ({tag('global_norm')}, ...) to the same loggers at "
        "the same steps, each overwriting the other. Use one: GradGuard monitors everything GradMonitor does, "
        "and GradGuard(clip=None) only monitors."
    )


def _connect_outputs(reporter: Reporter, trainer: Trainer) -> None:
    """Hand the Trainer's loggers to the outputs (rank zero writes), with a notice for what they cannot take."""
    reporter.writer = find_writer(trainer.loggers) if trainer.is_global_zero else None
    reporter.log_metrics = _logger_sink(trainer) if trainer.is_global_zero else None
    reporter.rich_writers = None
    if trainer.is_global_zero:
        writers, notices = rich_writers(trainer.loggers)
        reporter.rich_writers = writers
        for notice in notices:
            reporter.notice_once(notice, notice.removeprefix("GradGuard: "))
    if trainer.is_global_zero and reporter.writer is None and trainer.loggers:
        reporter.notice_once("no-tensorboard", NO_TENSORBOARD_NOTICE)


def _callback_state(trainer: Trainer, pl_module: LightningModule) -> tuple[list[torch.nn.Module], list[Callback]]:
    """The other callbacks' training state a rollback restores: their modules and their ``state_dict``.

    Modules held by a callback (weight averaging's averaged model) are snapshotted with the model; the
    ``state_dict`` of every callback that has one is too, except the callbacks whose state records the
    world outside the training state (files a ``Checkpoint`` wrote, the wall-clock time a ``Timer``
    counted: a rollback does not undo those) or the optimizer's param-group layout (``BaseFinetuning``:
    the snapshot restores the optimizers). The GradGuard family restores its own state itself.
    """
    from lightning.pytorch.callbacks import BaseFinetuning, Checkpoint, Timer

    modules: list[torch.nn.Module] = []
    stateful: list[Callback] = []
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, (GradGuard, Checkpoint, Timer, BaseFinetuning)):
            continue
        for value in vars(callback).values():
            if isinstance(value, torch.nn.Module) and value is not pl_module and all(value is not m for m in modules):
                modules.append(value)
        if type(callback).state_dict is not Callback.state_dict:
            stateful.append(callback)
    return modules, stateful


def _weak_ref(trainer: Trainer) -> weakref.ref[Trainer] | None:
    """A weak reference to the Trainer of this fit (never kept alive by GradGuard); ``None`` for stand-ins without."""
    try:
        return weakref.ref(trainer)
    except TypeError:  # a stand-in without weak references (tests)
        return None


def _batch_context(
    kept: tuple[int, int, Any] | None, replay: bool, trainer: Trainer, pl_module: LightningModule
) -> BatchContext | None:
    """The batch of this step and, with ``replay``, a closure that runs its training step again."""
    if kept is None:
        return None
    epoch, batch_idx, batch = kept
    closure, why = None, ""
    if not replay:
        why = "replay is off (GradGuard(replay=True) turns it on)"
    elif not pl_module.automatic_optimization:
        why = "manual optimization (the training step steps the optimizers itself)"
    elif getattr(trainer, "accumulate_grad_batches", 1) > 1:
        why = "gradient accumulation (the step's gradients span several batches)"
    else:
        closure = _replay_closure(trainer, batch, batch_idx)
    return BatchContext(epoch, batch_idx, batch, closure, module=pl_module, why_no_replay=why)


def _log_dir(trainer: Trainer) -> str | None:
    """The directory of the first logger that has one (TensorBoard's, CSV's), else ``None``: nothing is written
    to the working directory (``Trainer.log_dir`` falls back to it, and is a collective)."""
    for logger in getattr(trainer, "loggers", []):
        log_dir = getattr(logger, "log_dir", None)
        if isinstance(log_dir, (str, os.PathLike)):
            return str(log_dir)
    return None


def _replay_closure(trainer: Trainer, batch: Any, batch_idx: int) -> Callable[[], Tensor | None]:
    """Forward and backward of ``batch`` through the strategy (precision context, DDP/FSDP wrapper included)."""

    def closure() -> Tensor | None:
        output = trainer.strategy.training_step(batch, batch_idx)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor):
            return None  # the training step skipped this batch (returned None)
        loss.backward()
        return loss.detach()

    return closure


@rank_zero_only
def _rank_zero_warn_at_caller(message: str) -> None:
    """Rank-zero warning shown at the user's line (``trainer.fit``), not at a line of GradGuard's source."""
    warn_at_caller(message)


def _logger_sink(trainer: Trainer) -> Callable[[dict[str, float], int], None]:
    """``log_metrics`` for the Reporter: every logger of the trainer."""

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    return log_metrics


class GradMonitor(GradGuard):
    """GradGuard that only watches: norms, histograms, dashboard and diagnostics; never changes training.

    Non-finite gradients are reported (``on_nonfinite="warn"``), never skipped. Takes the monitoring
    arguments of :class:`GradGuard`.
    """

    def __init__(self, **kwargs: Any) -> None:
        for name in option_names(changes_training=True):
            if name in kwargs:
                raise TypeError(f"GradMonitor only monitors; `{name}` is not accepted (use GradGuard for it)")
        super().__init__(clip=None, lr_guard=False, on_nonfinite="warn", rollback=False, **kwargs)


class GradClip(GradGuard):
    """GradGuard for clipping and non-finite skipping only: no histograms, diagnostics, heatmap, ratios or LR guard.

    Args:
        clip: threshold policy, as for :class:`GradGuard` (must not be ``None``).
        max_norm: fixed threshold or cap, as for :class:`GradGuard`.
        **kwargs: other :class:`GradGuard` arguments.
    """

    def __init__(self, clip: ClipName | ThresholdPolicy = "auto", max_norm: float | None = None, **kwargs: Any) -> None:
        if clip is None:
            raise ValueError("`clip` must be a policy for GradClip, got None (use GradMonitor to only monitor)")
        kwargs.setdefault("histogram_every_n_steps", 0)
        kwargs.setdefault("diagnostics", False)
        kwargs.setdefault("heatmap_every_n_steps", 0)
        kwargs.setdefault("lr_guard", False)
        kwargs.setdefault("log_update_ratios", False)
        super().__init__(clip=clip, max_norm=max_norm, **kwargs)
