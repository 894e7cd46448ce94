"""GradGuard for a plain PyTorch training loop (and, through :class:`FabricGuard`, for Lightning Fabric).

``Guard(model, optimizer)`` takes the same options as :class:`~lightning_gradguard.GradGuard` and makes
the same decisions through the same :class:`~lightning_gradguard.decide.engine.Engine`; call
:meth:`Guard.before_optimizer_step` between ``loss.backward()`` and ``optimizer.step()``. See
``docs/plain-pytorch.md``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gradguard._checks import ClipName, OnNonFinite
from lightning_gradguard._compat import (
    fabric_strategy_kind,
    grads_still_scaled,
    scaler_scale,
    unwrap_model,
    unwrap_optimizer,
    warn_at_caller,
)
from lightning_gradguard.decide.diagnostics import GradientDiagnostics
from lightning_gradguard.decide.engine import (
    STATE_VERSION,
    Engine,
    StepOutcome,
    optimizer_parameters,
    parameter_signature,
)
from lightning_gradguard.decide.lr_guard import LRGuard
from lightning_gradguard.decide.policies import ThresholdPolicy
from lightning_gradguard.errors import GradGuardError
from lightning_gradguard.events import GuardEvent, OnEvent
from lightning_gradguard.forensics.tracker import BatchContext
from lightning_gradguard.frontends._views import GuardViews
from lightning_gradguard.measure.stats import GroupBy
from lightning_gradguard.options import BatchIds, GuardOptions
from lightning_gradguard.outputs.sink import Reporter
from lightning_gradguard.recovery.rollback import Recovery, RollbackTrigger
from lightning_gradguard.step import OptimizerStep

__all__ = ["FabricGuard", "Guard"]

log = logging.getLogger(__name__)


def _rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Guard(GuardViews):
    r"""GradGuard for one model and one optimizer in a plain PyTorch loop: clip, skip, LR guard, outputs.

    Call :meth:`before_optimizer_step` once per optimizer step, after ``loss.backward()`` (after the
    last micro-batch when accumulating) and before ``optimizer.step()``. It reads every gradient in one
    pass, makes at most one collective under ``torch.distributed`` (DDP, FSDP2) and one device-to-host
    transfer, then clips, skips (drops the gradients, so the optimizer step changes nothing) or stops,
    and lowers the LR through the LR guard's optimizer hooks.

    With ``torch.amp.GradScaler``, call ``scaler.unscale_(optimizer)`` first and pass ``scaler=``: non-finite
    steps are then left to the scaler (it skips them itself). Without ``unscale_`` (or with a fused
    optimizer) the gradients are still scaled; the guard divides its statistics by the scale and clips
    the scaled gradients to the equivalent threshold.

    Args:
        model: the model (DDP / DataParallel / Fabric wrappers are unwrapped for layer names).
        optimizer: the optimizer whose parameters are guarded.
        writer: a TensorBoard ``SummaryWriter`` for scalars, histograms, text events and the heatmap
            (used on rank zero only), or ``None``.
        scaler: the ``torch.amp.GradScaler`` in use, if any.
        scheduler: the LR scheduler you step (or a list of them; anything with ``state_dict`` and
            ``load_state_dict``), or ``None``. A rollback restores its state with the model's and the
            optimizer's, so the schedule continues from the snapshot's step; without it a rollback leaves
            the scheduler where it is.
        log_every_n_steps: log cadence in optimizer steps (default 50).
        clip: the clip policy; this and every other argument (``max_norm``, ``on_nonfinite``,
            ``max_consecutive_skips``, ``lr_guard``, ``group_by``, ``log_layer_norms``, ``histogram_every_n_steps``,
            ``histogram_bins``, ``diagnostics``, ``heatmap_every_n_steps``, ``log_update_ratios``, ``on_event``,
            ``rollback``, ``snapshot_every_n_steps``, ``diagnose_every_n_steps``, ``incidents``, ``replay``,
            ``batch_ids``, ``skip_list``) as for
            :class:`~lightning_gradguard.GradGuard`. Recovery snapshots ``model``, ``optimizer`` (param-group LRs
            included) and ``scheduler``.

    Raises:
        ValueError: an option out of range, with the same messages as GradGuard (the options are declared and
            checked in :class:`~lightning_gradguard.options.GuardOptions`).
        TypeError: ``model`` is not a ``torch.nn.Module``, ``optimizer`` not a ``torch.optim.Optimizer``,
            ``writer`` not a ``SummaryWriter``, ``scaler`` not a ``GradScaler``, ``scheduler`` not an LR
            scheduler (nor a list of them), or an option has the wrong type.
        NonFiniteGradientsError: from :meth:`before_optimizer_step`, per ``on_nonfinite`` /
            ``max_consecutive_skips`` (on every rank at the same step).
        RecoveryError: from :meth:`before_optimizer_step`, after ``max_rollbacks`` rollbacks.

    Example::

        guard = Guard(model, optimizer)
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            outcome = guard.before_optimizer_step(loss)
            optimizer.step()
            optimizer.zero_grad()
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
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
        writer: Any | None = None,
        scaler: Any | None = None,
        log_update_ratios: bool = True,
        on_event: OnEvent | None = None,
        rollback: bool | RollbackTrigger = True,
        snapshot_every_n_steps: int = 100,
        scheduler: Any | None = None,
        diagnose_every_n_steps: int = 50,
        incidents: bool = True,
        replay: bool = False,
        batch_ids: BatchIds | None = None,
        skip_list: str | os.PathLike[str] | None = None,
    ) -> None:
        model, optimizer = _checked_model(model), _checked_optimizer(optimizer)
        _check_writer(writer)
        _check_scaler(scaler)
        self._options = GuardOptions.from_arguments(locals())  # checked; numpy scalars as Python numbers
        self.optimizer = optimizer
        self.scaler = scaler
        self.schedulers: list[Any] = _schedulers(scheduler)
        self._module = unwrap_model(model)
        named = optimizer_parameters(self._module, self.optimizer)
        self.engine: Engine = self._options.engine(0, named, monitor_only=False)
        self.engine.signature = parameter_signature(self.optimizer)
        if self.engine.lr_guard is not None:
            self.engine.lr_guard.attach(self.optimizer)
        self.reporter = self._make_reporter(writer, scaler, on_event)
        self.recovery: Recovery | None = self._options.recovery()
        self._forensics = self._options.forensics()
        if self._forensics is not None and _rank_zero():
            self._forensics.set_log_dir(_log_dir(writer))  # incidents.jsonl beside the writer's event files
        self._step = OptimizerStep(
            self.reporter,
            log_every=self._options.log_every(),
            diagnose_every=self._options.diagnose_every_n_steps,
            histogram_every=self._options.histogram_every_n_steps,
            heatmap_every=self._options.heatmap_every_n_steps,
            recovery=self.recovery,
            scaler_enabled=self.reporter.scaler_enabled,
            forensics=self._forensics,
        )
        self._step.attach(self.engine, self.optimizer)  # update-to-weight ratios after optimizer.step()
        if self.recovery is not None:
            self.recovery.attach(model, self.optimizer, self.schedulers)

    def _make_reporter(self, writer: Any | None, scaler: Any | None, on_event: OnEvent | None) -> Reporter:
        """The outputs (rank zero writes), the dashboard layout written."""
        zero = _rank_zero()
        reporter = Reporter(
            self._options,
            warn=self._warn,
            info=self._info,
            writer=writer if zero else None,
            log_metrics=self._scalar_sink(writer) if zero and writer is not None else None,
            scaler_enabled=scaler is not None and scaler.is_enabled(),
            on_event=on_event if zero else None,
        )
        if reporter.writer is not None:
            from lightning_gradguard.outputs.tensorboard import dashboard_layout

            reporter.writer.add_custom_scalars(dashboard_layout([0]))
        return reporter

    # ------------------------------------------------------------------ outputs
    def _warn(self, text: str) -> None:
        if _rank_zero():
            warn_at_caller(text)

    def _info(self, text: str) -> None:
        if _rank_zero():
            log.info(text)

    @staticmethod
    def _scalar_sink(writer: Any) -> Any:
        def log_metrics(metrics: dict[str, float], step: int) -> None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)

        return log_metrics

    # ------------------------------------------------------------------ the step
    def before_optimizer_step(
        self,
        loss: Tensor | None = None,
        *,
        closure: Callable[[], Tensor | None] | None = None,
        batch: Any = None,
        batch_idx: int | None = None,
        epoch: int | None = None,
    ) -> StepOutcome:
        """Measure, decide and act on this step's gradients; returns what was decided.

        Args:
            loss: the step's (unscaled) training loss, logged as ``loss`` and evidence for the LR guard; it
                travels to the host with the gradient statistics (no extra synchronisation). ``None`` judges
                by norms alone.
            closure: with ``replay=True``: forward and backward of this step's batch (``loss.backward()``
                inside), returning the loss; called only at an incident, to tell a reproducible incident from
                a transient one (``docs/forensics.md``).
            batch: the step's batch, read by ``batch_ids`` at an incident.
            batch_idx: the batch's index within the epoch: named by incidents, matched by the skip list.
            epoch: the epoch.

        Returns:
            The :class:`~lightning_gradguard.decide.engine.StepOutcome` (threshold, coefficient, clipped, skipped...).

        Raises:
            NonFiniteGradientsError: training must stop (on every rank alike).
        """
        still_scaled = grads_still_scaled(self.scaler, self.optimizer)

        def record_inf_checks(outcome: StepOutcome) -> None:
            if outcome.skipped and still_scaled:
                _record_inf_checks(self.scaler, self.optimizer, nonfinite=not outcome.stats.finite)

        record = self._step.run(
            self.engine,
            self.optimizer,
            lambda: optimizer_parameters(self._module, self.optimizer),
            [self.engine],
            global_step=self.engine.counters.steps,
            loss=None if loss is None else loss.detach().float().reshape(()),
            amp_scale=scaler_scale(self.scaler) if still_scaled else None,
            on_applied=record_inf_checks,
            context=None
            if self._forensics is None
            else BatchContext(
                epoch,
                batch_idx,
                batch,
                closure if self._options.replay else None,
                module=self._module,
                why_no_replay="" if closure is not None else "no closure given to before_optimizer_step",
            ),
        )
        return record.outcome

    def close(self) -> None:
        """End of training: log the last interval, write the heatmap, remove the LR guard's hooks."""
        self._step.end(self.engine, self.engine.counters.steps)
        if self.engine.lr_guard is not None:
            self.engine.lr_guard.detach()
        self._step.detach()

    # ------------------------------------------------------------------ views and state
    @property
    def options(self) -> GuardOptions:
        """The checked options this guard was constructed with (read-only)."""
        return self._options

    def _engine_list(self) -> list[Engine]:
        return [self.engine]

    def _recovery_in_use(self) -> Recovery | None:
        return self.recovery

    def state_dict(self) -> dict[str, Any]:
        """The guard's state, in the same format as the callback's (``docs/state.md``)."""
        state = {
            "version": STATE_VERSION,
            "config": {"class": type(self).__qualname__},
            "guards": {"0": self.engine.state_dict()},
        }
        if self.recovery is not None:
            state["recovery"] = self.recovery.trigger.state_dict()
        if self._forensics is not None:
            state["forensics"] = self._forensics.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (also a GradGuard callback's state for optimizer 0)."""
        recovery = state_dict.get("recovery")
        if self.recovery is not None and isinstance(recovery, Mapping):
            self.recovery.trigger.load_state_dict(recovery)
        forensics = state_dict.get("forensics")
        if self._forensics is not None and isinstance(forensics, Mapping):
            self._forensics.load_state_dict(dict(forensics))
        state = (state_dict.get("guards") or {}).get("0")
        if isinstance(state, Mapping):
            differences = self.engine.load_state_dict(state)
            if differences:
                message = "the saved state does not fully match this Guard:\n- " + "\n- ".join(differences)
                self.reporter.emit(GuardEvent("state", self.engine.counters.steps, message), index=None)


def _log_dir(writer: Any | None) -> str | None:
    """The directory a ``SummaryWriter`` writes its event files to (``None`` without a writer)."""
    if writer is None:
        return None
    get = getattr(writer, "get_logdir", None)
    return str(get()) if callable(get) else getattr(writer, "log_dir", None)


#: What :class:`Guard` calls on a ``writer`` (``torch.utils.tensorboard.SummaryWriter`` and tensorboardX have them).
WRITER_METHODS = ("add_scalar", "add_custom_scalars", "add_histogram_raw", "add_image", "add_text", "flush")
#: What :class:`Guard` and the training loop call on a ``scaler`` (``torch.amp.GradScaler`` has them).
SCALER_METHODS = ("is_enabled", "scale", "unscale_", "step", "update")


def _received(value: Any) -> str:
    """``'net' (str)``, or ``a Sequential`` for an object whose repr is long: the "got ..." part of a message."""
    text = repr(value)
    if len(text) > 60 or "\n" in text:
        return f"a {type(value).__name__}"
    return f"{text} ({type(value).__name__})"


def _checked_model(model: Any) -> torch.nn.Module:
    """``model`` if it is a ``torch.nn.Module`` (DDP / Fabric wrappers included), else ``TypeError``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (the model being trained), got {_received(model)}")
    return model


def _checked_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer in ``optimizer`` (Fabric's wrapper unwrapped), else ``TypeError``."""
    unwrapped = unwrap_optimizer(optimizer)
    if not isinstance(unwrapped, torch.optim.Optimizer):
        hint = " (the model was passed as the optimizer?)" if isinstance(optimizer, torch.nn.Module) else ""
        raise TypeError(
            "`optimizer` must be a torch.optim.Optimizer instance (e.g. torch.optim.AdamW(model.parameters())), "
            f"got {_received(optimizer)}{hint}"
        )
    return unwrapped


def _missing(value: Any, methods: tuple[str, ...]) -> list[str]:
    return [name for name in methods if not callable(getattr(value, name, None))]


def _check_writer(writer: Any) -> None:
    """``TypeError`` unless ``writer`` is ``None`` or has the ``SummaryWriter`` methods the guard calls."""
    missing = [] if writer is None else _missing(writer, WRITER_METHODS)
    if missing:
        raise TypeError(
            "`writer` must be a TensorBoard SummaryWriter (torch.utils.tensorboard or tensorboardX) or None, got "
            f"{_received(writer)}, which lacks {', '.join(missing)}"
        )


def _check_scaler(scaler: Any) -> None:
    """``TypeError`` unless ``scaler`` is ``None`` or has the ``torch.amp.GradScaler`` methods in use."""
    missing = [] if scaler is None else _missing(scaler, SCALER_METHODS)
    if missing:
        raise TypeError(
            f"`scaler` must be a torch.amp.GradScaler or None, got {_received(scaler)}, "
            f"which lacks {', '.join(missing)}"
        )


def _record_inf_checks(scaler: Any, optimizer: torch.optim.Optimizer, nonfinite: bool) -> None:
    """Let ``scaler.step`` / ``scaler.update`` run after the guard dropped the gradients of a step.

    Both need the inf checks that ``scaler.unscale_(optimizer)`` records from the gradients (also for fused
    optimizers, which otherwise record them in ``scaler.step``); with every gradient dropped they would find
    none and raise. One gradient, on the smallest parameter, stands in for the dropped ones while ``unscale_``
    records them: non-finite if the step's gradients were (the scaler then skips the step and lowers its scale,
    as it would have), else zero (the optimizer then steps with no gradients: nothing changes).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    probe = min((p for p in params if p.grad is None), key=lambda p: p.numel(), default=None)
    if probe is not None:
        probe.grad = torch.full_like(probe, math.nan if nonfinite else 0.0)
    scaler.unscale_(optimizer)
    if probe is not None:
        probe.grad = None


def _schedulers(scheduler: Any) -> list[Any]:
    """``Guard(scheduler=...)`` as a list, checked: ``None``, one LR scheduler or a list / tuple of them."""
    found = [] if scheduler is None else list(scheduler) if isinstance(scheduler, list | tuple) else [scheduler]
    for sched in found:
        if not (callable(getattr(sched, "state_dict", None)) and callable(getattr(sched, "load_state_dict", None))):
            raise TypeError(
                "`scheduler` must be an LR scheduler (with `state_dict` and `load_state_dict`), a list of them or "
                f"None, got {type(sched).__name__}"
            )
    return found


class FabricGuard(Guard):
    r"""GradGuard for a Lightning Fabric loop: :class:`Guard` wired to the Fabric's loggers, precision and ranks.

    Fabric calls its callbacks only after the optimizer step (``on_after_optimizer_step``), too late to
    clip or skip, so the guard is called explicitly, as in a plain loop: ``fabric.backward(loss)``, then
    ``guard.before_optimizer_step(loss)``, then ``optimizer.step()``. Under a Fabric GradScaler
    (``precision="16-mixed"`` on CUDA) the gradients are still scaled at that point; the guard reads the
    scale and leaves non-finite steps to the scaler, as the callback does.

    Args:
        fabric: the ``lightning.fabric.Fabric``.
        model: the model returned by ``fabric.setup``.
        optimizer: the optimizer returned by ``fabric.setup`` (or ``fabric.setup_optimizers``).
        **options: :class:`Guard` / :class:`~lightning_gradguard.GradGuard` options (``writer`` defaults
            to the first TensorBoard logger of the Fabric; scalars also go to ``fabric.log_dict``).

    Raises:
        TypeError: ``fabric`` is not a ``lightning.fabric.Fabric`` (and the :class:`Guard` checks).
        GradGuardError: Fabric's FSDP (FSDP1) or DeepSpeed strategy.
    """

    def __init__(self, fabric: Any, model: torch.nn.Module, optimizer: Any, **options: Any) -> None:
        from lightning.fabric import Fabric

        if not isinstance(fabric, Fabric):
            raise TypeError(
                f"`fabric` must be a lightning.fabric.Fabric (FabricGuard(fabric, model, optimizer)), got "
                f"{_received(fabric)}"
            )
        kind = fabric_strategy_kind(fabric.strategy)
        if kind != "other":
            raise GradGuardError(
                f"FabricGuard does not support Fabric's {type(fabric.strategy).__name__}: "
                + (
                    "DeepSpeed owns clipping and overflow handling."
                    if kind == "deepspeed"
                    else "use FSDP2 (fully_shard)."
                )
            )
        from lightning.fabric.loggers.tensorboard import TensorBoardLogger

        if "writer" not in options:
            tb = next((lg for lg in fabric.loggers if isinstance(lg, TensorBoardLogger)), None)
            options["writer"] = tb.experiment if tb is not None and fabric.is_global_zero else None
        options.setdefault("scaler", getattr(fabric.strategy.precision, "scaler", None))
        super().__init__(model, optimizer, **options)
        if fabric.is_global_zero and fabric.loggers:
            fabric_log = fabric.log_dict

            def log_metrics(metrics: dict[str, float], step: int) -> None:
                fabric_log(metrics, step=step)  # TensorBoard scalars included, via Fabric's loggers

            self.reporter.log_metrics = log_metrics
