"""GradGuard: per-layer gradient monitoring, adaptive clipping, non-finite step skipping and an LR guard.

Everything happens in ``on_before_optimizer_step``, once per optimizer step: the gradients are
complete (all micro-batches of an accumulation window, synchronised across ranks), unscaled by the
AMP GradScaler (except for fused optimizers, handled below) and not yet clipped by Lightning.

Per step, GradGuard makes one pass over the gradients (:class:`~lightning_gradguard.measure.stats.GradStats`),
at most one collective (:func:`~lightning_gradguard.measure.distributed.reduce_stats`) and one device-to-host
transfer; every decision is then taken on the host from that one vector, identically on every rank.

This module is the Lightning glue only: the options (declared and checked in :mod:`lightning_gradguard.options`),
setup checks, and hooks that call the per-optimizer :class:`~lightning_gradguard.decide.engine.GuardEngine`
(decisions) and the :class:`~lightning_gradguard.outputs.sink.Reporter` (metrics, TensorBoard, messages).
"""

from __future__ import annotations

import copy
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
from lightning_gradguard.decide.diagnostics import GradientDiagnostics, Verdict
from lightning_gradguard.decide.engine import (
    STATE_VERSION,
    GuardEngine,
    StepOutcome,
    optimizer_parameters,
    parameter_signature,
)
from lightning_gradguard.decide.lr_guard import LRGuard
from lightning_gradguard.decide.policies import ThresholdPolicy
from lightning_gradguard.errors import GradGuardError
from lightning_gradguard.events import GuardEvent, OnEvent
from lightning_gradguard.forensics.incidents import Incident
from lightning_gradguard.forensics.tracker import BatchContext
from lightning_gradguard.keys import tag
from lightning_gradguard.measure.stats import GroupBy
from lightning_gradguard.options import BatchIds, GuardOptions, option_names
from lightning_gradguard.outputs.loggers import rich_writers
from lightning_gradguard.outputs.sink import Reporter
from lightning_gradguard.outputs.tensorboard import EventLog, dashboard_layout, find_writer
from lightning_gradguard.recovery.rollback import Recovery, RollbackTrigger
from lightning_gradguard.step import GuardStep

__all__ = ["GradClip", "GradGuard", "GradMonitor"]


class GradGuard(Callback):
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
        histogram_every_n_steps: write per-layer gradient histograms every this many optimizer steps;
            ``0`` disables them. The default, 100, keeps the amortised cost of the extra pass over
            the gradients well under 1% of a step while giving a few hundred histograms per run.
        histogram_bins: equal-width bins per histogram.
        diagnostics: ``True`` for the default :class:`~lightning_gradguard.decide.diagnostics.GradientDiagnostics`
            (vanishing, exploding, dead and non-finite layers), an instance, or ``False``.
        heatmap_every_n_steps: write the layer x step heatmap image every this many optimizer steps
            (and at the end of training); ``0`` disables it. Needs matplotlib.
        log_update_ratios: at log steps, log each layer's weight norm and log10 update-to-weight ratio
            (``weight_norm/{layer}``, ``update_ratio/{layer}``), and at diagnose steps let the diagnostics judge
            them ("LR too high for <layer>", "<layer> is not learning"). Costs a copy of the weights at those steps,
            plus every 25 steps from step 50 for the LR guard's stall channel (which measures the global
            update ratio whether or not this is on; ``LRGuard(stall_update_ratio=None)`` turns it off).
        on_event: called on rank zero with every :class:`~lightning_gradguard.events.GuardEvent` (skipped
            step, LR reduction, verdict, notice), right before it is logged; forward it to Slack, W&B alerts
            or a pager (see ``docs/alerts.md``). If it raises, GradGuard warns once and training continues.
        rollback: recovery (``docs/recovery.md``): ``True`` (default) for the default
            :class:`~lightning_gradguard.recovery.rollback.RollbackTrigger`, an instance to configure it, or
            ``False`` to turn it off. When it fires (non-finite gradients on 3 consecutive steps, a
            non-finite loss, a loss run away from its running level), every rank restores the last good
            snapshot, the LR guard lowers the LR and the step is skipped. ``True`` needs the LR guard (it
            means off when ``clip=None`` or ``lr_guard=False``); a ``RollbackTrigger`` passed explicitly
            is always honoured (without an LR guard, rollbacks do not lower the LR).
        snapshot_every_n_steps: keep a snapshot of the last good state (weights, optimizer and
            scheduler state, GradGuard's own state) in host memory every this many optimizer steps.
        diagnose_every_n_steps: run the per-layer diagnostics and judge the update-to-weight ratios every this
            many optimizer steps (a cadence of its own: the log cadence only decides what is written).
        incidents: record every incident (a skipped, rolled-back or stopped step, an LR cut, a norm or loss
            spike): which layers led, on which epoch and batch, the window of steps before it; one JSON line each
            in ``incidents.jsonl`` beside the logs, an ``"incident"`` event, and ``gradguard report`` tells the
            story (``docs/forensics.md``). Costs no device work on steps without an incident.
        replay: at a non-finite or spiking step, re-run the training step on the same batch from the same
            weights and classify the incident as *reproducible* (the batch with this state; it goes on the skip
            list, which a resumed run honours) or *transient*. Costs one forward and backward pass per incident;
            not available under manual optimization or gradient accumulation.
        batch_ids: ``batch -> sequence`` of sample identifiers (e.g. dataset indices returned by the dataset),
            read at incidents; the incident and the skip list name the samples.
        skip_list: the ``skip_list.json`` an earlier run wrote beside its logs: this run drops the optimizer
            step of every batch listed there (by epoch and batch index), e.g. when it restarts from a checkpoint
            taken before the incident. A run resumed from a later checkpoint honours its own list without it.

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
        self._guards: dict[int, GuardEngine] = {}  # id(optimizer) -> engine
        self._pending_state: dict[int, dict[str, Any]] = {}
        self._final_state: dict[str, dict[str, Any]] | None = None  # as it was before the end-of-fit flush
        self._saved_config: dict[str, Any] = {}
        self._reporter = Reporter(self._options, warn=_rank_zero_warn_at_caller, info=rank_zero_info)
        self._scaler: Any | None = None
        self._monitor_only = False
        self._loss_sum: Tensor | None = None  # training loss since the last optimizer step (loss, LR guard)
        self._loss_count = 0
        self._recovery: Recovery | None = self._options.recovery()
        self._forensics = self._options.forensics()
        self._batch: tuple[int, int, Any] | None = None  # (epoch, batch index, batch) of the step in progress
        self._step = GuardStep(
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

    def _version_2_state_key(self) -> str:
        """The key checkpoints of state version 2 hold this callback's state under (built from the configuration)."""
        options = self._options
        return self._generate_state_key(
            clip=_describe_clip(options.clip), max_norm=options.max_norm, group_by=_describe(options.group_by)
        )

    @property
    def threshold(self) -> float | None:
        """Clip threshold in force at the last step of the first optimizer (``None`` if not clipping)."""
        engine = self._first_engine()
        return engine.last.threshold if engine and engine.last else None

    @property
    def last_outcome(self) -> StepOutcome | None:
        """What was decided at the last step of the first optimizer (``None`` before the first step)."""
        engine = self._first_engine()
        return engine.last if engine else None

    @property
    def clipped_steps(self) -> int:
        """Steps clipped so far (all optimizers)."""
        return sum(g.counters.clipped_total for g in self._guards.values())

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients so far (all optimizers)."""
        return sum(g.counters.skipped_total for g in self._guards.values())

    @property
    def verdicts(self) -> list[Verdict]:
        """Diagnostic verdicts reported so far (vanishing, exploding, dead, non-finite layers), in order."""
        engines = sorted(self._guards.values(), key=lambda g: g.index)
        pairs = [(v.step, g.index, v) for g in engines for v in g.verdicts]  # stable: each engine's own order kept
        return [v for _, _, v in sorted(pairs, key=lambda p: (p[0], p[1]))]

    @property
    def lr_scale(self) -> float:
        """Factor the LR guard applies to the first optimizer's learning rates (1.0 when it never acted)."""
        engine = self._first_engine()
        return engine.lr_guard.lr_scale if engine and engine.lr_guard else 1.0

    @property
    def rollbacks_total(self) -> int:
        """Rollbacks to the last good snapshot so far (0 when recovery is off)."""
        return self._recovery.trigger.rollbacks_total if self._recovery is not None else 0

    @property
    def steps_lost(self) -> int:
        """Optimizer steps whose work the rollbacks discarded so far."""
        return self._recovery.trigger.steps_lost if self._recovery is not None else 0

    def _first_engine(self) -> GuardEngine | None:
        return min(self._guards.values(), key=lambda g: g.index, default=None)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._start_fit(trainer)
        self._refuse_shared_tags(trainer)
        self._reporter.on_event = self.on_event if getattr(trainer, "is_global_zero", True) else None
        kind = strategy_kind(trainer.strategy)
        if kind == "fsdp1":
            raise GradGuardError(FSDP1_MESSAGE)
        self._monitor_only = kind == "deepspeed"
        if self._monitor_only:
            self._reporter.notice_once("deepspeed", DEEPSPEED_NOTICE)
        elif trainer.gradient_clip_val and (self._options.clip is not None):
            clip_val, clip = trainer.gradient_clip_val, _describe(self._options.clip)
            raise GradGuardError(
                f"Trainer(gradient_clip_val={clip_val!r}) and GradGuard(clip={clip!r}) would both clip "
                "the gradients. Remove `gradient_clip_val` from the Trainer (GradGuard(clip='fixed', "
                f"max_norm={clip_val!r}) reproduces it), or pass GradGuard(clip=None) to only monitor."
            )
        self._step.log_every = self._options.log_every(getattr(trainer, "log_every_n_steps", 0))
        if self._forensics is not None:  # incidents.jsonl and skip_list.json beside the logs, written on rank zero
            zero = getattr(trainer, "is_global_zero", True)
            self._forensics.set_log_dir(getattr(trainer, "log_dir", None) if zero else None)
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaler_enabled = self._scaler is not None and self._scaler.is_enabled()
        self._reporter.scaler_enabled = self._step.scaler_enabled = scaler_enabled

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._final_state = None
        reporter = self._reporter
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
        for optimizer in trainer.optimizers:
            self._step.attach(self._guard_for(trainer, pl_module, optimizer), optimizer)  # again after a teardown
        self._report_unused_state()
        if self._recovery is not None and not self._monitor_only:
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            modules, stateful = _callback_state(trainer, pl_module)
            self._recovery.attach(pl_module, list(trainer.optimizers), schedulers, modules=modules, stateful=stateful)
        if reporter.writer is not None:
            reporter.writer.add_custom_scalars(dashboard_layout(sorted(g.index for g in self._guards.values())))

    def _refuse_shared_tags(self, trainer: Trainer) -> None:
        """Two GradGuard-family callbacks logging to the same loggers would write the same tags at the same steps."""
        family = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, GradGuard)]
        if len(family) < 2 or not trainer.loggers:
            return
        names = " and ".join(f"{type(cb).__name__}(clip={_describe_clip(cb.options.clip)!r})" for cb in family)
        raise GradGuardError(
            f"{names} in one Trainer would write the same tags ({tag('global_norm')}, ...) to the same loggers at "
            "the same steps, each overwriting the other. Use one: GradGuard monitors everything GradMonitor does, "
            "and GradGuard(clip=None) only monitors."
        )

    def _start_fit(self, trainer: Trainer) -> None:
        """Forget the previous fit: its engines are keyed by optimizers (and hold parameters) that are gone.

        A new fit starts fresh, or from the checkpoint Lightning loads after ``setup`` (or from a state
        loaded by hand before the first fit). The same Trainer fitted again (``global_step > 0``: training
        continues) continues from the end of the last fit, as it would from a checkpoint saved there.
        """
        previous = self._last_trainer() if self._last_trainer is not None else None
        carried: dict[int, dict[str, Any]] = {}
        if previous is trainer and trainer.global_step > 0 and (self._guards or self._final_state):
            carried = {int(k): v for k, v in self.state_dict()["guards"].items()}
        elif not self._guards and self._final_state is None:
            carried = self._pending_state  # loaded by hand (``load_state_dict``) before the first fit
        self._guards = {}
        self._pending_state = carried
        self._final_state = None
        self._loss_sum, self._loss_count = None, 0
        self._reporter.events = EventLog()
        self._reporter.last_global_step = {}
        if not carried:  # rollback counters belong to one run, like the engines
            self._recovery = self._step.recovery = self._options.recovery()
        try:
            self._last_trainer = weakref.ref(trainer)
        except TypeError:  # a stand-in without weak references (tests)
            self._last_trainer = None

    def _guard_for(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> GuardEngine:
        guard = self._guards.get(id(optimizer))
        if guard is not None:
            return guard
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), len(self._guards))
        guard = self._options.engine(index, optimizer_parameters(pl_module, optimizer), self._monitor_only)
        guard.signature = parameter_signature(optimizer)
        pending = self._pending_state.pop(index, None)
        if pending is not None:
            self._report_differences(guard, guard.load_state_dict(pending))
        if guard.lr_guard is not None:
            guard.lr_guard.attach(optimizer)
        self._step.attach(guard, optimizer)
        self._guards[id(optimizer)] = guard
        return guard

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for guard in self._guards.values():
            if guard.lr_guard is not None:
                guard.lr_guard.detach()
            guard.stats.release()  # the counters, history and views stay; the parameters may go
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
        """Keep the loss on the device; it reaches the host with the step's statistics (no extra sync).

        Under automatic optimization Lightning divides each micro-batch's loss by ``accumulate_grad_batches``
        before this hook; it is multiplied back, so the step's loss is the mean of its micro-batch losses.
        """
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
        """Keep the batch of the step in progress (a reference) for the incident records and replays."""
        if self._forensics is not None:
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
            self._guard_for(trainer, pl_module, optimizer),
            optimizer,
            lambda: optimizer_parameters(pl_module, optimizer),
            list(self._guards.values()),
            global_step=trainer.global_step,
            loss=loss,
            amp_scale=scaler_scale(self._scaler) if steps_scaled_gradients(optimizer) else None,
            context=self._batch_context(trainer, pl_module) if self._forensics is not None else None,
        )

    def _batch_context(self, trainer: Trainer, pl_module: LightningModule) -> BatchContext | None:
        """The batch of this step and, with ``replay``, a closure that runs its training step again."""
        if self._batch is None:
            return None
        epoch, batch_idx, batch = self._batch
        closure, why = None, ""
        if not self._options.replay:
            why = "replay is off (GradGuard(replay=True) turns it on)"
        elif not pl_module.automatic_optimization:
            why = "manual optimization (the training step steps the optimizers itself)"
        elif getattr(trainer, "accumulate_grad_batches", 1) > 1:
            why = "gradient accumulation (the step's gradients span several batches)"
        else:
            closure = _replay_closure(trainer, batch, batch_idx)
        return BatchContext(epoch, batch_idx, batch, closure, module=pl_module, why_no_replay=why)

    @property
    def incidents(self) -> list[Incident]:
        """The incidents recorded in this process so far (``docs/forensics.md``); empty with ``incidents=False``."""
        return self._forensics.incidents if self._forensics is not None else []

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A checkpoint saved after fit resumes as if training had not ended here (no end-of-fit flush).
        self._final_state = {str(g.index): g.state_dict() for g in self._guards.values()}
        for guard in self._guards.values():
            self._step.end(guard, trainer.global_step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Everything that affects future decisions, as Python primitives (see ``docs/state.md``).

        Per optimizer: counters, interval aggregates, heatmap buffer, layer names and sizes, the clip
        policy's history, the LR guard's scale, cooldown and detector, the diagnostics' per-layer history.
        State loaded but not yet applied (no step taken since) is saved as loaded.
        """
        guards = dict(self._pending_state_items())
        if self._final_state is not None:
            guards.update(self._final_state)
        else:
            guards.update((str(g.index), g.state_dict()) for g in self._guards.values())
        state = {"version": STATE_VERSION, "config": self._config_summary(), "guards": guards}
        if self._recovery is not None:
            state["recovery"] = self._recovery.trigger.state_dict()
        if self._forensics is not None:
            state["forensics"] = self._forensics.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, also from earlier versions (missing keys start fresh).

        State saved by a differently configured GradGuard (other clip policy, other layers, LR guard or
        diagnostics switched on or off) is applied where it still means the same thing; each difference
        and what is done about it is reported once, with a rank-zero warning.
        """
        self._final_state = None
        version = state_dict.get("version", 1)
        if isinstance(version, int) and version > STATE_VERSION:
            self._say(
                "state",
                f"the checkpoint's GradGuard state has version {version}, newer than this version "
                f"({STATE_VERSION}); loading the parts this version knows and ignoring the rest.",
            )
        saved = state_dict.get("config")
        self._saved_config = dict(saved) if isinstance(saved, Mapping) else {}
        recovery = state_dict.get("recovery")
        if self._recovery is not None and isinstance(recovery, Mapping):
            self._recovery.trigger.load_state_dict(recovery)
        forensics = state_dict.get("forensics")
        if self._forensics is not None and isinstance(forensics, Mapping):
            self._forensics.load_state_dict(dict(forensics))  # the skip list a resumed run honours
        for key, state in (state_dict.get("guards") or {}).items():
            index = int(key)
            guard = next((g for g in self._guards.values() if g.index == index), None)
            if guard is None:
                self._pending_state[index] = state
            else:
                self._report_differences(guard, guard.load_state_dict(state))

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Say what happens when the checkpoint holds no state under this GradGuard's :attr:`state_key`.

        Lightning loads a callback's state only under its exact key. If the key is missing, the state saved under
        this configuration's key of state version 2 is loaded; else the only GradGuard state no other callback of
        this Trainer claims is adopted (the configuration changed between the runs: its differences are reported
        on load); otherwise this GradGuard starts fresh, with an info message (GradGuard added to an existing run)
        or a warning naming the other states.
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # Lightning loads it
        version_2_key = self._version_2_state_key()
        if version_2_key in states:  # the same configuration, saved under the key of state version 2
            self.load_state_dict(copy.deepcopy(states[version_2_key]))
            return
        ours = {str(k): v for k, v in states.items() if _is_gradguard_state(v)}
        callbacks: list[Callback] = list(getattr(trainer, "callbacks", []))
        family = [cb for cb in callbacks if isinstance(cb, GradGuard)]
        claimed = {cb.state_key for cb in family} | {cb._version_2_state_key() for cb in family}
        unclaimed = {k: v for k, v in ours.items() if k not in claimed}
        homeless = [cb for cb in family if not {cb.state_key, cb._version_2_state_key()} & states.keys()]
        if len(unclaimed) == 1 and len(homeless) == 1:
            key, state = next(iter(unclaimed.items()))
            self._say(
                "state",
                f"the checkpoint has no state under this GradGuard's key {self.state_key!r}; loading "
                f"the GradGuard state saved under {key!r} instead (the GradGuard was configured differently).",
            )
            self.load_state_dict(copy.deepcopy(state))
            return
        fresh = "starting with fresh GradGuard state: counters at 0, the clip policy warms up again, LR scale 1.0."
        if not ours:
            self._say(
                "notice",
                "the checkpoint holds no GradGuard state (GradGuard was added to an existing run, or "
                f"the checkpoint predates it); {fresh}",
            )
        else:
            self._say(
                "state",
                f"none of the GradGuard states in the checkpoint ({', '.join(sorted(ours))}) matches "
                f"this GradGuard's key {self.state_key!r}; {fresh}",
            )

    def _pending_state_items(self) -> list[tuple[str, dict[str, Any]]]:
        return [(str(index), state) for index, state in sorted(self._pending_state.items())]

    def _config_summary(self) -> dict[str, Any]:
        """The configuration, as primitives, saved for messages (never used to restore anything)."""
        options = self._options
        lr_guard = options.lr_guard_template
        return {
            "class": type(self).__qualname__,
            "clip": _describe_clip(options.clip),
            "max_norm": options.max_norm,
            "group_by": _describe(options.group_by),
            "on_nonfinite": options.on_nonfinite,
            "lr_guard": None if lr_guard is None else lr_guard.config(),
            "diagnostics": options.diagnostics_template is not None,
        }

    def _say(self, kind: str, message: str) -> None:
        """A message about the saved state, as a :class:`GuardEvent` (console only, not TensorBoard text)."""
        self._reporter.emit(GuardEvent(kind, 0, message), index=None)

    def _report_differences(self, guard: GuardEngine, differences: list[str]) -> None:
        if not differences:
            return
        saved = self._saved_config
        origin = f" (saved by {saved.get('class', 'GradGuard')}(clip={saved.get('clip')!r}))" if saved else ""
        self._say(
            "state",
            f"the checkpoint's state for optimizer {guard.index} does not fully match this GradGuard"
            f"{origin}:\n- " + "\n- ".join(differences),
        )

    def _report_unused_state(self) -> None:
        """Warn about state saved for optimizers this run does not have (called once the guards exist)."""
        if not self._pending_state:
            return
        have = sorted(g.index for g in self._guards.values())
        self._say(
            "state",
            f"the checkpoint has GradGuard state for optimizer(s) {sorted(self._pending_state)}, but this "
            f"run has optimizer(s) {have}; that state is ignored.",
        )
        self._pending_state.clear()


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


@rank_zero_only
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


def _rank_zero_warn_at_caller(message: str) -> None:
    """Rank-zero warning shown at the user's line (``trainer.fit``), not at a line of GradGuard's source."""
    warn_at_caller(message)


def _logger_sink(trainer: Trainer) -> Callable[[dict[str, float], int], None]:
    """``log_metrics`` for the Reporter: every logger of the trainer."""

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    return log_metrics


def _describe(value: Any) -> str:
    """Short stable description of an argument, for messages and the state key."""
    if value is None or isinstance(value, str | int | float):
        return str(value)
    return getattr(value, "__name__", type(value).__name__)


def _describe_clip(clip: Any) -> str:
    """A policy instance by its configuration (``AutoPolicy(z_thresh=3.0, ...)``); a name as is."""
    return repr(clip) if isinstance(clip, ThresholdPolicy) else _describe(clip)


def _is_gradguard_state(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("guards"), Mapping) and "version" in value


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
