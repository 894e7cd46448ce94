"""GradGuard: per-layer gradient monitoring, adaptive clipping, non-finite step skipping and an LR guard.

Everything happens in ``on_before_optimizer_step``, once per optimizer step: the gradients are
complete (all micro-batches of an accumulation window, synchronised across ranks), unscaled by the
AMP GradScaler (except for fused optimizers, handled below) and not yet clipped by Lightning.

Per step, GradGuard makes one pass over the gradients (:class:`~lightning_gradguard.stats.GradStats`),
at most one collective (:func:`~lightning_gradguard.distributed.reduce_stats`) and one device-to-host
transfer; every decision is then taken on the host from that one vector, identically on every rank.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradguard._validation import check_int
from lightning_gradguard.diagnostics import GradientDiagnostics, Verdict
from lightning_gradguard.distributed import reduce_histograms, reduce_stats
from lightning_gradguard.keys import tag
from lightning_gradguard.lr_guard import LRGuard
from lightning_gradguard.policies import ThresholdPolicy, make_policy
from lightning_gradguard.stats import GradStats, GroupBy, StepStats
from lightning_gradguard.tensorboard import dashboard_layout, find_writer, write_histograms

__all__ = ["GradClip", "GradGuard", "GradGuardError", "GradMonitor", "NonFiniteGradientsError"]

log = logging.getLogger(__name__)

ClipName = Literal["auto", "fixed", "percentile", "zscore"]
OnNonFinite = Literal["skip", "raise", "warn"]
_CLIP_NAMES = ("auto", "fixed", "percentile", "zscore")
_ON_NONFINITE = ("skip", "raise", "warn")


class GradGuardError(RuntimeError):
    """A setting GradGuard cannot work with (raised at setup, before any step)."""


class NonFiniteGradientsError(RuntimeError):
    """Raised on every rank, at the same step, when non-finite gradients stop training."""


@dataclass
class _Interval:
    """Aggregates since the last log step, so nothing between two log steps is lost."""

    steps: int = 0
    finite: int = 0
    norm_sum: float = 0.0
    norm_max: float = 0.0
    clipped: int = 0
    skipped: int = 0
    scaler_skipped: int = 0


@dataclass
class _Counters:
    steps: int = 0
    clipped_total: int = 0
    skipped_total: int = 0
    scaler_skipped_total: int = 0
    consecutive_skips: int = 0


@dataclass
class _StepRecord:
    """What happened at one step, as logged."""

    step: int
    stats: StepStats
    global_norm: float
    threshold: float | None = None
    post_clip_norm: float | None = None
    clipped: bool = False
    skipped: bool = False
    scaler_skipped: bool = False
    error: str | None = None  # raised after the step has been accounted and logged
    loss: float | None = None  # mean training loss of the step's micro-batches, when the LR guard wants it


@dataclass
class _Guard:
    """Everything GradGuard keeps for one optimizer."""

    index: int
    stats: GradStats
    policy: ThresholdPolicy | None
    lr_guard: LRGuard | None
    diagnostics: GradientDiagnostics | None
    counters: _Counters = field(default_factory=_Counters)
    interval: _Interval = field(default_factory=_Interval)
    last: _StepRecord | None = None
    heatmap_steps: list[int] = field(default_factory=list)
    heatmap_columns: list[list[float]] = field(default_factory=list)


class GradGuard(Callback):
    r"""Keeps gradients healthy: per-layer norms and histograms, adaptive clipping, non-finite skipping, LR guard.

    Add it with one line, ``Trainer(callbacks=[GradGuard()])``. At every optimizer step it computes the
    pre-clip gradient norm of every layer in one pass, clips to a threshold that tunes itself from the
    run's own norm history, skips steps whose gradients are non-finite, and lowers the learning rate
    when clipping keeps saturating. Scalars reach every Lightning logger; histograms, the "GradGuard"
    custom-scalars dashboard, text events and the heatmap go to TensorBoard.

    Args:
        clip: threshold policy: ``"auto"`` (default), ``"fixed"`` (needs ``max_norm``; same as
            ``gradient_clip_val``), ``"percentile"``, ``"zscore"``, a
            :class:`~lightning_gradguard.policies.ThresholdPolicy` instance, or ``None`` to only monitor.
        max_norm: the threshold for ``clip="fixed"``; a cap on the threshold of adaptive policies.
        on_nonfinite: ``"skip"`` the optimizer step (weights and optimizer state untouched),
            ``"raise"`` an error, or ``"warn"`` and step anyway.
        max_consecutive_skips: with ``"skip"``, stop training with an error after this many
            consecutive skipped steps.
        lr_guard: ``True`` for the default :class:`~lightning_gradguard.lr_guard.LRGuard`, an instance
            to configure it, or ``False`` to disable it. Needs clipping (``clip`` not ``None``).
        group_by: how parameters are grouped into layers: ``"module"`` (owning module, default),
            ``"param"``, an ``int`` module depth, or a callable ``param_name -> layer_name``.
        log_every_n_steps: log cadence in optimizer steps; ``None`` uses ``Trainer(log_every_n_steps)``.
        log_layer_norms: log one scalar per layer (``layer_norm/{layer}``).
        histogram_every_n_steps: write per-layer gradient histograms every this many optimizer steps;
            ``0`` disables them. The default, 100, keeps the amortised cost of the extra pass over
            the gradients well under 1% of a step while giving a few hundred histograms per run.
        histogram_bins: equal-width bins per histogram.
        diagnostics: ``True`` for the default :class:`~lightning_gradguard.diagnostics.GradientDiagnostics`
            (vanishing, exploding, dead and non-finite layers), an instance, or ``False``.
        heatmap_every_n_steps: write the layer x step heatmap image every this many optimizer steps
            (and at the end of training); ``0`` disables it. Needs matplotlib.

    Raises:
        ValueError: an argument out of range (the message names it, the allowed values and what it got).
        GradGuardError: at setup, a conflicting Trainer setting, e.g. ``gradient_clip_val`` together
            with GradGuard clipping.
        NonFiniteGradientsError: during training, per ``on_nonfinite`` / ``max_consecutive_skips``.

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
    ) -> None:
        super().__init__()
        if clip is not None and not isinstance(clip, ThresholdPolicy) and clip not in _CLIP_NAMES:
            raise ValueError(f"`clip` must be one of {', '.join(_CLIP_NAMES)}, a ThresholdPolicy or None, got {clip!r}")
        if max_norm is not None and (
            isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or not 0 < max_norm < math.inf
        ):
            raise ValueError(f"`max_norm` must be a finite number > 0 or None, got {max_norm!r}")
        # Builds a throwaway policy so that policy-level errors (e.g. "fixed" without max_norm) show now.
        make_policy(clip, max_norm)
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"`on_nonfinite` must be one of {', '.join(_ON_NONFINITE)}, got {on_nonfinite!r}")
        check_int("max_consecutive_skips", max_consecutive_skips, 1)
        if not isinstance(lr_guard, bool | LRGuard):
            raise ValueError(f"`lr_guard` must be True, False or an LRGuard instance, got {lr_guard!r}")
        if not (callable(group_by) or group_by in ("module", "param") or isinstance(group_by, int)):
            raise ValueError(f"`group_by` must be 'module', 'param', an int depth >= 1 or a callable, got {group_by!r}")
        if isinstance(group_by, int) and not isinstance(group_by, bool):
            check_int("group_by", group_by, 1)
        if log_every_n_steps is not None:
            check_int("log_every_n_steps", log_every_n_steps, 1)
        check_int("histogram_every_n_steps", histogram_every_n_steps, 0)
        check_int("histogram_bins", histogram_bins, 1)
        check_int("heatmap_every_n_steps", heatmap_every_n_steps, 0)
        if not isinstance(diagnostics, bool | GradientDiagnostics):
            raise ValueError(
                f"`diagnostics` must be True, False or a GradientDiagnostics instance, got {diagnostics!r}"
            )
        self.clip = clip
        self.max_norm = max_norm
        self.on_nonfinite: OnNonFinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        if clip is None and isinstance(lr_guard, LRGuard):
            raise ValueError("`lr_guard` needs clipping: pass `clip` (e.g. 'auto') or `lr_guard=False`")
        self._lr_guard_template: LRGuard | None = None
        if clip is not None and lr_guard is not False:
            self._lr_guard_template = LRGuard() if lr_guard is True else lr_guard
        self.group_by = group_by
        self.log_every_n_steps = log_every_n_steps
        self.log_layer_norms = log_layer_norms
        self.histogram_every_n_steps = histogram_every_n_steps
        self.histogram_bins = histogram_bins
        self._diagnostics_template = GradientDiagnostics() if diagnostics is True else diagnostics or None
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self._guards: dict[int, _Guard] = {}  # id(optimizer) -> guard
        self._pending_state: dict[int, dict[str, Any]] = {}
        self._final_state: dict[str, dict[str, Any]] | None = None  # as it was before the end-of-fit flush
        self._saved_config: dict[str, Any] = {}
        self._writer: Any | None = None
        self._log_every = log_every_n_steps or 50
        self._scaler: Any | None = None
        self._monitor_only = False
        self._notified: set[str] = set()
        self._verdicts: list[Verdict] = []
        self._loss_sum: Tensor | None = None  # training loss since the last optimizer step (LR guard evidence)
        self._loss_count = 0

    # ------------------------------------------------------------------ public read-only views
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            clip=_describe_clip(self.clip), max_norm=self.max_norm, group_by=_describe(self.group_by)
        )

    @property
    def threshold(self) -> float | None:
        """Clip threshold in force at the last step of the first optimizer (``None`` if not clipping)."""
        guard = self._first_guard()
        return guard.last.threshold if guard and guard.last else None

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
        return list(self._verdicts)

    @property
    def lr_scale(self) -> float:
        """Factor the LR guard applies to the first optimizer's learning rates (1.0 when it never acted)."""
        guard = self._first_guard()
        return guard.lr_guard.lr_scale if guard and guard.lr_guard else 1.0

    def _first_guard(self) -> _Guard | None:
        return min(self._guards.values(), key=lambda g: g.index, default=None)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__.lower()
        if strategy == "fsdpstrategy":
            raise GradGuardError(
                "GradGuard does not support Lightning's FSDPStrategy (FSDP1): its gradients are plain-tensor pieces "
                "of flattened parameters, so per-layer norms and clip decisions would be wrong. Shard with FSDP2 "
                "instead: ModelParallelStrategy with torch.distributed.fsdp.fully_shard applied in configure_model "
                "(see docs/distributed.md)."
            )
        self._monitor_only = "deepspeed" in strategy
        if self._monitor_only:
            self._info_once(
                "deepspeed",
                "GradGuard: DeepSpeed owns gradient clipping and overflow handling; GradGuard only monitors "
                "(no clipping, skipping or LR guard), at gradient-accumulation boundaries.",
            )
        elif trainer.gradient_clip_val and (self.clip is not None):
            clip_val = trainer.gradient_clip_val
            raise GradGuardError(
                f"Trainer(gradient_clip_val={clip_val!r}) and GradGuard(clip={_describe(self.clip)!r}) would both clip "
                "the gradients. Remove `gradient_clip_val` from the Trainer (GradGuard(clip='fixed', "
                f"max_norm={clip_val!r}) reproduces it), or pass GradGuard(clip=None) to only monitor."
            )
        self._log_every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 0) or 50
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._final_state = None
        self._writer = find_writer(trainer.loggers) if trainer.is_global_zero else None
        if trainer.is_global_zero and self._writer is None and trainer.loggers:
            self._info_once(
                "no-tensorboard",
                "GradGuard: no TensorBoardLogger attached; scalars go to your loggers, but histograms, the "
                "dashboard layout, text events and the heatmap are skipped.",
            )
        for optimizer in trainer.optimizers:
            self._guard_for(trainer, pl_module, optimizer)
        self._report_unused_state()
        if self._writer is not None:
            self._writer.add_custom_scalars(dashboard_layout(sorted(g.index for g in self._guards.values())))

    def _guard_for(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> _Guard:
        guard = self._guards.get(id(optimizer))
        if guard is not None:
            return guard
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), len(self._guards))
        names = {id(p): n for n, p in pl_module.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        order = {id(p): i for i, (_, p) in enumerate(pl_module.named_parameters())}
        params.sort(key=lambda p: order.get(id(p), len(order)))
        named = [(names.get(id(p), f"param_{i}"), p) for i, p in enumerate(params)]
        policy = None if self._monitor_only else make_policy(copy.deepcopy(self.clip), self.max_norm)
        lr_guard = None if self._monitor_only or policy is None else copy.deepcopy(self._lr_guard_template)
        guard = _Guard(
            index=index,
            stats=GradStats(named, self.group_by),
            policy=policy,
            lr_guard=lr_guard,
            diagnostics=copy.deepcopy(self._diagnostics_template),
        )
        pending = self._pending_state.pop(index, None)
        if pending is not None:
            self._report_differences(guard, _load_guard_state(guard, pending))
        if guard.lr_guard is not None:
            guard.lr_guard.attach(optimizer)
        self._guards[id(optimizer)] = guard
        return guard

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for guard in self._guards.values():
            if guard.lr_guard is not None:
                guard.lr_guard.detach()

    # ------------------------------------------------------------------ the step
    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        """Keep the loss on the device; it reaches the host with the step's statistics (no extra sync)."""
        if self._lr_guard_template is None or self._monitor_only:
            return
        value = loss.detach().float().reshape(())
        scale = getattr(self._scaler, "_scale", None) if self._scaler is not None else None
        if isinstance(scale, Tensor) and self._scaler.is_enabled():  # type: ignore[union-attr]
            value = value / scale.to(value.device)  # Lightning hands the hook the AMP-scaled loss
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._monitor_only and trainer.fit_loop.epoch_loop._should_accumulate():
            return  # DeepSpeed calls this hook on every micro-batch: read complete gradients only
        guard = self._guard_for(trainer, pl_module, optimizer)
        step = guard.counters.steps
        # Extras ride in the same vector: one collective and one device-to-host transfer for everything.
        scale = self._fused_amp_scale(optimizer)
        extras = [] if scale is None else [scale]
        has_loss = self._loss_sum is not None
        if self._loss_sum is not None:
            extras.append(self._loss_sum / self._loss_count)
            self._loss_sum, self._loss_count = None, 0
        vector = guard.stats.squared_norms(extras=extras)
        vector = reduce_stats(vector, guard.stats.sharded_layers)
        stats = guard.stats.read(vector, num_extras=len(extras))
        loss = stats.extras[-1] if has_loss else None
        if scale is not None:
            inv = 1.0 / (stats.extras[0] ** 2)
            stats = StepStats(stats.layers, [v * inv for v in stats.sq_norms])
        record = _StepRecord(step=step, stats=stats, global_norm=stats.global_norm, loss=loss)
        if stats.finite:
            guard.counters.consecutive_skips = 0
            self._clip(guard, record)
        else:
            self._nonfinite(trainer, guard, record)
        self._account(guard, record)
        guard.counters.steps += 1
        global_step = trainer.global_step
        if step % self._log_every == 0:
            self._log(trainer, guard, record, global_step)
        if self.histogram_every_n_steps and step % self.histogram_every_n_steps == 0:
            self._histograms(guard, global_step)
        if self.heatmap_every_n_steps and step and step % self.heatmap_every_n_steps == 0:
            self._heatmap(guard, global_step)
        if record.error is not None:
            # Decided from the reduced vector, so every rank raises here at the same step.
            if self._writer is not None:
                self._writer.flush()
            raise NonFiniteGradientsError(record.error)

    def _fused_amp_scale(self, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """The loss scale when gradients are still scaled in the hook (fused optimizers skip ``unscale_``)."""
        scaler = self._scaler
        if scaler is None or not scaler.is_enabled() or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return None
        scale: Tensor | None = getattr(scaler, "_scale", None)
        return scale

    def _clip(self, guard: _Guard, record: _StepRecord) -> None:
        policy = guard.policy
        if policy is None:
            return
        norm = record.global_norm
        threshold = policy.threshold()
        record.threshold = threshold
        record.post_clip_norm = norm
        if threshold is not None and norm > threshold:
            coef = threshold / (norm + 1e-6)
            guard.stats.scale_(coef)
            record.clipped = True
            record.post_clip_norm = norm * coef
        center = policy.center()  # the typical level the threshold was computed from, before this norm
        policy.observe(norm)
        if guard.lr_guard is not None:
            reduction = guard.lr_guard.update(
                step=record.step, norm=norm, threshold=threshold, center=center, loss=record.loss
            )
            if reduction is not None:
                self._event(guard, record.step, str(reduction), warn=True)

    def _nonfinite(self, trainer: Trainer, guard: _Guard, record: _StepRecord) -> None:
        layers = record.stats.nonfinite_layers
        shown = ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")
        if self._scaler is not None and self._scaler.is_enabled():
            # fp16 AMP: the GradScaler skips this step itself and lowers its loss scale. Not an explosion.
            record.scaler_skipped = True
            return
        if self._monitor_only or self.on_nonfinite == "warn":
            self._event(
                guard,
                record.step,
                f"non-finite gradients at step {record.step} in {shown}; stepping anyway",
                warn=True,
            )
            return
        if self.on_nonfinite == "raise":
            record.error = (
                f"GradGuard: non-finite gradients at optimizer step {record.step} in layer(s) {shown}. "
                "Use GradGuard(on_nonfinite='skip') to skip such steps, lower the learning rate, or check the "
                "loss and inputs for NaN/inf."
            )
            return
        for param in guard.stats.params:
            param.grad = None
        record.skipped = True
        guard.counters.consecutive_skips += 1
        self._event(guard, record.step, f"skipped optimizer step {record.step}: non-finite gradients in {shown}")
        if guard.counters.consecutive_skips >= self.max_consecutive_skips:
            record.error = (
                f"GradGuard: {guard.counters.consecutive_skips} consecutive optimizer steps had non-finite "
                f"gradients (last in layer(s) {shown}); training cannot make progress. Lower the learning rate, "
                "check the data and loss for NaN/inf, or use a more stable precision (bf16-mixed / 32-true). "
                "Raise `max_consecutive_skips` to tolerate longer streaks."
            )

    def _account(self, guard: _Guard, record: _StepRecord) -> None:
        interval, counters = guard.interval, guard.counters
        interval.steps += 1
        if math.isfinite(record.global_norm):
            interval.finite += 1
            interval.norm_sum += record.global_norm
            interval.norm_max = max(interval.norm_max, record.global_norm)
        else:
            interval.norm_max = record.global_norm if math.isnan(record.global_norm) else math.inf
        interval.clipped += record.clipped
        interval.skipped += record.skipped
        interval.scaler_skipped += record.scaler_skipped
        counters.clipped_total += record.clipped
        counters.skipped_total += record.skipped
        counters.scaler_skipped_total += record.scaler_skipped
        guard.last = record

    # ------------------------------------------------------------------ outputs
    def _metrics(self, guard: _Guard, record: _StepRecord) -> dict[str, float]:
        i, interval, counters = guard.index, guard.interval, guard.counters
        metrics = {
            tag("global_norm", i): record.global_norm,
            tag("global_norm_max", i): interval.norm_max,
            tag("global_norm_mean", i): interval.norm_sum / interval.finite if interval.finite else math.nan,
            tag("steps", i): float(interval.steps),
            tag("skipped", i): float(interval.skipped),
            tag("skipped_total", i): float(counters.skipped_total),
        }
        if self._scaler is not None and self._scaler.is_enabled():
            metrics[tag("scaler_skipped", i)] = float(interval.scaler_skipped)
        if guard.policy is not None:
            if record.threshold is not None:
                metrics[tag("threshold", i)] = record.threshold
            if record.post_clip_norm is not None:
                metrics[tag("post_clip_norm", i)] = record.post_clip_norm
            metrics[tag("clipped", i)] = float(record.clipped)
            metrics[tag("clip_rate", i)] = interval.clipped / interval.finite if interval.finite else 0.0
            metrics[tag("clipped_total", i)] = float(counters.clipped_total)
        if guard.lr_guard is not None:
            metrics[tag("lr_scale", i)] = guard.lr_guard.lr_scale
            metrics[tag("lr", i)] = guard.lr_guard.effective_lrs()[0]
        if self.log_layer_norms:
            for layer, norm in record.stats.layer_norms().items():
                metrics[tag("layer_norm/{layer}", i, layer)] = norm
        return metrics

    def _log(self, trainer: Trainer, guard: _Guard, record: _StepRecord, global_step: int) -> None:
        metrics = self._metrics(guard, record)
        guard.interval = _Interval()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=global_step)
        norms = record.stats.layer_norms()
        if self.heatmap_every_n_steps:
            guard.heatmap_steps.append(global_step)
            guard.heatmap_columns.append([math.log10(v) if v > 0 else -math.inf for v in norms.values()])
            if len(guard.heatmap_steps) > 512:  # bounded memory: keep every other column
                guard.heatmap_steps = guard.heatmap_steps[::2]
                guard.heatmap_columns = guard.heatmap_columns[::2]
        if guard.diagnostics is not None:
            numels = dict(zip(guard.stats.layers, guard.stats.numels, strict=True))
            for verdict in guard.diagnostics.observe(record.step, norms, numels):
                self._verdict(guard, verdict)

    def _histograms(self, guard: _Guard, global_step: int) -> None:
        sharded = any(guard.stats.sharded_layers)
        ranges = guard.stats.histogram_ranges()
        if sharded:
            ranges = reduce_histograms(ranges)
        counts = guard.stats.histogram_counts(ranges, self.histogram_bins)
        if sharded:
            counts = reduce_histograms(ranges, counts, guard.stats.sharded_layers)
        if self._writer is None:
            return
        write_histograms(self._writer, guard.index, global_step, guard.stats.read_histograms(ranges, counts))

    def _heatmap(self, guard: _Guard, global_step: int) -> None:
        if self._writer is None or len(guard.heatmap_steps) < 2:
            return
        try:
            from lightning_gradguard.heatmap import render_heatmap

            columns = guard.heatmap_columns
            grid = [[col[r] for col in columns] for r in range(len(guard.stats.layers))]
            image = render_heatmap(guard.stats.layers, guard.heatmap_steps, grid)
        except ImportError as exc:
            self._info_once("heatmap", f"GradGuard: heatmap skipped ({exc}).")
            return
        self._writer.add_image(tag("heatmap", guard.index), image, global_step, dataformats="HWC")

    def _event(self, guard: _Guard, step: int, text: str, warn: bool = False) -> None:
        (rank_zero_warn if warn else rank_zero_info)(f"GradGuard: {text}")
        if self._writer is not None:
            self._writer.add_text(tag("events", guard.index), text, step)

    def _verdict(self, guard: _Guard, verdict: Verdict) -> None:
        self._verdicts.append(verdict)
        self._event(guard, verdict.step, f"{verdict.message} Remedy: {verdict.remedy}", warn=True)

    def _info_once(self, key: str, message: str) -> None:
        if key not in self._notified:
            self._notified.add(key)
            rank_zero_info(message)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A checkpoint saved after fit resumes as if training had not ended here (no end-of-fit flush).
        self._final_state = {str(g.index): _guard_state(g) for g in self._guards.values()}
        for guard in self._guards.values():
            last = guard.last
            if last is not None and guard.interval.steps:
                self._log(trainer, guard, last, trainer.global_step)
            if self.heatmap_every_n_steps:
                self._heatmap(guard, trainer.global_step)
            if guard.diagnostics is not None and trainer.is_global_zero:
                summary = guard.diagnostics.summary()
                if summary:
                    rank_zero_info(f"GradGuard diagnostics summary:\n{summary}")
        if self._writer is not None:
            self._writer.flush()

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
            guards.update((str(g.index), _guard_state(g)) for g in self._guards.values())
        return {"version": _STATE_VERSION, "config": self._config_summary(), "guards": guards}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, also from earlier versions (missing keys start fresh).

        State saved by a differently configured GradGuard (other clip policy, other layers, LR guard or
        diagnostics switched on or off) is applied where it still means the same thing; each difference
        and what is done about it is reported once, with a rank-zero warning.
        """
        self._final_state = None
        version = state_dict.get("version", 1)
        if isinstance(version, int) and version > _STATE_VERSION:
            rank_zero_warn(
                f"GradGuard: the checkpoint's GradGuard state has version {version}, newer than this version "
                f"({_STATE_VERSION}); loading the parts this version knows and ignoring the rest."
            )
        saved = state_dict.get("config")
        self._saved_config = dict(saved) if isinstance(saved, Mapping) else {}
        for key, state in (state_dict.get("guards") or {}).items():
            index = int(key)
            guard = next((g for g in self._guards.values() if g.index == index), None)
            if guard is None:
                self._pending_state[index] = state
            else:
                self._report_differences(guard, _load_guard_state(guard, state))

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Say what happens when the checkpoint holds no state under this GradGuard's :attr:`state_key`.

        Lightning loads a callback's state only under its exact key. If the key is missing, the only
        GradGuard state no other callback of this Trainer claims is adopted (the configuration changed
        between the runs: its differences are reported on load); otherwise this GradGuard starts fresh,
        with an info message (GradGuard added to an existing run) or a warning naming the other states.
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or self._legacy_state_key in states:
            return
        ours = {str(k): v for k, v in states.items() if _is_gradguard_state(v)}
        callbacks: list[Callback] = list(getattr(trainer, "callbacks", []))
        claimed = {cb.state_key for cb in callbacks} | {str(cb._legacy_state_key) for cb in callbacks}
        unclaimed = {k: v for k, v in ours.items() if k not in claimed}
        homeless = [cb for cb in callbacks if isinstance(cb, GradGuard) and cb.state_key not in states]
        if len(unclaimed) == 1 and len(homeless) == 1:
            key, state = next(iter(unclaimed.items()))
            rank_zero_warn(
                f"GradGuard: the checkpoint has no state under this GradGuard's key {self.state_key!r}; loading "
                f"the GradGuard state saved under {key!r} instead (the GradGuard was configured differently)."
            )
            self.load_state_dict(copy.deepcopy(state))
            return
        fresh = "starting with fresh GradGuard state: counters at 0, the clip policy warms up again, LR scale 1.0."
        if not ours:
            rank_zero_info(
                "GradGuard: the checkpoint holds no GradGuard state (GradGuard was added to an existing run, or "
                f"the checkpoint predates it); {fresh}"
            )
        else:
            rank_zero_warn(
                f"GradGuard: none of the GradGuard states in the checkpoint ({', '.join(sorted(ours))}) matches "
                f"this GradGuard's key {self.state_key!r}; {fresh}"
            )

    def _pending_state_items(self) -> list[tuple[str, dict[str, Any]]]:
        return [(str(index), state) for index, state in sorted(self._pending_state.items())]

    def _config_summary(self) -> dict[str, Any]:
        """The configuration, as primitives, saved for messages (never used to restore anything)."""
        lr_guard = self._lr_guard_template
        return {
            "class": type(self).__qualname__,
            "clip": _describe_clip(self.clip),
            "max_norm": self.max_norm,
            "group_by": _describe(self.group_by),
            "on_nonfinite": self.on_nonfinite,
            "lr_guard": None if lr_guard is None else repr(lr_guard),
            "diagnostics": self._diagnostics_template is not None,
        }

    def _report_differences(self, guard: _Guard, differences: list[str]) -> None:
        if not differences:
            return
        saved = self._saved_config
        origin = f" (saved by {saved.get('class', 'GradGuard')}(clip={saved.get('clip')!r}))" if saved else ""
        rank_zero_warn(
            f"GradGuard: the checkpoint's state for optimizer {guard.index} does not fully match this GradGuard"
            f"{origin}:\n- " + "\n- ".join(differences)
        )

    def _report_unused_state(self) -> None:
        """Warn about state saved for optimizers this run does not have (called once the guards exist)."""
        if not self._pending_state:
            return
        have = sorted(g.index for g in self._guards.values())
        rank_zero_warn(
            f"GradGuard: the checkpoint has GradGuard state for optimizer(s) {sorted(self._pending_state)}, but this "
            f"run has optimizer(s) {have}; that state is ignored."
        )
        self._pending_state.clear()


_STATE_VERSION = 2


def _describe(value: Any) -> str:
    """Short stable description of an argument, for messages and the state key."""
    if value is None or isinstance(value, str | int | float):
        return str(value)
    return getattr(value, "__name__", type(value).__name__)


def _describe_clip(clip: Any) -> str:
    """A policy instance by its configuration (``AutoPolicy(z_thresh=3.0, ...)``); a name as is."""
    return repr(clip) if isinstance(clip, ThresholdPolicy) else _describe(clip)


def _names(names: list[str], shown: int = 6) -> str:
    return ", ".join(map(str, names[:shown])) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _is_gradguard_state(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("guards"), Mapping) and "version" in value


def _restore_fields(cls: type[Any], saved: Any) -> Any:
    """A dataclass from saved fields: missing ones take their defaults, unknown (newer) ones are ignored."""
    fields = asdict(cls())
    if isinstance(saved, Mapping):
        fields.update({k: type(fields[k])(v) for k, v in saved.items() if k in fields})
    return cls(**fields)


def _guard_state(guard: _Guard) -> dict[str, Any]:
    state: dict[str, Any] = {
        "counters": asdict(guard.counters),
        "interval": asdict(guard.interval),
        "layers": list(guard.stats.layers),
        "numels": list(guard.stats.numels),
        "heatmap_steps": list(guard.heatmap_steps),
        "heatmap_columns": [list(c) for c in guard.heatmap_columns],
    }
    if guard.policy is not None:
        state["policy"] = guard.policy.state_dict()
    if guard.lr_guard is not None:
        state["lr_guard"] = guard.lr_guard.state_dict()
        state["lr_guard_config"] = repr(guard.lr_guard)
    if guard.diagnostics is not None:
        state["diagnostics"] = guard.diagnostics.state_dict()
    return state


def _load_guard_state(guard: _Guard, state: Mapping[str, Any]) -> list[str]:
    """Apply ``state`` to ``guard``; returns the differences found and what was done about each."""
    differences: list[str] = []
    guard.counters = _restore_fields(_Counters, state.get("counters"))
    guard.interval = _restore_fields(_Interval, state.get("interval"))
    layers, now = state.get("layers"), list(guard.stats.layers)
    columns = [list(c) for c in state.get("heatmap_columns", [])]
    same_layers = layers == now if layers is not None else all(len(c) == len(now) for c in columns)
    numels = state.get("numels")
    saved_numel = None if numels is None else sum(int(n) for n in numels)
    same_params = saved_numel is None or saved_numel == sum(guard.stats.numels)
    if same_layers:
        guard.heatmap_steps = list(state.get("heatmap_steps", []))
        guard.heatmap_columns = columns
    else:
        saved_desc = f"{len(layers)}: {_names(layers)}" if layers is not None else "other layers"
        differences.append(
            f"layers differ (saved {saved_desc}; now {len(now)}: {_names(now)}): per-layer state (diagnostics, "
            "heatmap) starts fresh"
        )
    if not same_params:
        differences.append(
            f"parameters differ (saved {saved_numel} gradient elements, now {sum(guard.stats.numels)}): the saved "
            "norm statistics describe another model, so the clip policy and the LR guard's detector start fresh "
            "(the LR scale, cooldown and counters are kept)"
        )

    saved_policy = state.get("policy")
    if guard.policy is not None and isinstance(saved_policy, Mapping) and same_params:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                guard.policy.load_state_dict(dict(saved_policy))
            except ValueError:
                differences.append(
                    f"clip policy differs (saved {saved_policy.get('name')!r}, now {guard.policy.name!r}): "
                    f"the {guard.policy.name!r} policy starts fresh and warms up again"
                )
        differences.extend(str(w.message) for w in caught)
    elif guard.policy is None and isinstance(saved_policy, Mapping):
        differences.append(
            f"the checkpoint has clip-policy state ({saved_policy.get('name')!r}) but this GradGuard does not clip: "
            "ignored"
        )
    elif guard.policy is not None and saved_policy is None and guard.counters.steps:
        differences.append("the checkpoint has no clip-policy state (saved without clipping): the policy starts fresh")

    saved_lr = state.get("lr_guard")
    if guard.lr_guard is not None and isinstance(saved_lr, Mapping):
        if not same_params:
            saved_lr = {k: saved_lr[k] for k in ("lr_scale", "num_reductions", "cooldown_left") if k in saved_lr}
        guard.lr_guard.load_state_dict(saved_lr)
        saved_config, config = state.get("lr_guard_config"), repr(guard.lr_guard)
        if saved_config is not None and saved_config != config:
            differences.append(
                f"LR guard configuration differs (saved {saved_config}, now {config}): keeping the current "
                f"configuration, continuing from the saved LR scale {guard.lr_guard.lr_scale:g} and history"
            )
    elif guard.lr_guard is None and isinstance(saved_lr, Mapping) and float(saved_lr.get("lr_scale", 1.0)) != 1.0:
        differences.append(
            f"the checkpoint has LR scale {float(saved_lr['lr_scale']):g} from an LR guard, which is disabled now: "
            "the optimizer steps with the scheduler's LR again"
        )
    elif guard.lr_guard is not None and saved_lr is None and guard.counters.steps:
        differences.append("the checkpoint has no LR-guard state (saved without it): the LR guard starts fresh")

    saved_diag = state.get("diagnostics")
    if guard.diagnostics is not None and isinstance(saved_diag, Mapping) and same_layers:
        guard.diagnostics.load_state_dict(dict(saved_diag))
    return differences


class GradMonitor(GradGuard):
    """GradGuard that only watches: norms, histograms, dashboard and diagnostics; never changes training.

    Non-finite gradients are reported (``on_nonfinite="warn"``), never skipped. Takes the monitoring
    arguments of :class:`GradGuard`.
    """

    def __init__(self, **kwargs: Any) -> None:
        for name in ("clip", "max_norm", "lr_guard", "on_nonfinite", "max_consecutive_skips"):
            if name in kwargs:
                raise ValueError(f"GradMonitor only monitors; `{name}` is not accepted (use GradGuard for it)")
        super().__init__(clip=None, lr_guard=False, on_nonfinite="warn", **kwargs)


class GradClip(GradGuard):
    """GradGuard for clipping and non-finite skipping only: no histograms, diagnostics, heatmap or LR guard.

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
        super().__init__(clip=clip, max_norm=max_norm, **kwargs)
