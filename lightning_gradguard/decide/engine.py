"""The guard itself, free of Lightning: per-optimizer decisions from one step's reduced statistics.

A :class:`Engine` owns everything GradGuard keeps for one optimizer: the gradient statistics, the
clip policy, the LR guard, the diagnostics, the counters, the aggregates since the last log step and
the heatmap buffer. One optimizer step is three calls:

1. :meth:`Engine.measure` - one pass over the gradients, at most one collective, one
   device-to-host transfer (the loss and the AMP scale ride in the same vector);
2. :meth:`Engine.decide` - host only: threshold, clip coefficient, skip / raise / warn, streaks,
   LR guard, counters; returns an immutable :class:`StepOutcome`;
3. :func:`apply_outcome` - scale the gradients or drop them (the LR scale is applied by the LR guard's
   optimizer hooks).

:class:`~lightning_gradguard.step.OptimizerStep` sequences these calls (with recovery, the diagnostics of
:meth:`Engine.diagnose` and the update ratios) for every front-end, so the Lightning callback, the
Fabric adapter and the plain PyTorch :class:`~lightning_gradguard.Guard` take bit-identical decisions on
the same gradients.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard._state import config_differs, config_text, version_2_config
from lightning_gradguard.decide.diagnostics import (
    GradientDiagnostics,
    UpdateVerdict,
    Verdict,
    lr_too_high_verdicts,
    not_learning_verdicts,
)
from lightning_gradguard.decide.lr_guard import LRGuard, LRReduction
from lightning_gradguard.decide.policies import ThresholdPolicy
from lightning_gradguard.errors import GradGuardError, NonFiniteGradientsError
from lightning_gradguard.events import GuardEvent
from lightning_gradguard.keys import log10_norm
from lightning_gradguard.measure.distributed import reduce_histograms, reduce_stats
from lightning_gradguard.measure.stats import GradStats, HistogramData, StepStats
from lightning_gradguard.measure.updates import UpdateStats, UpdateTracker, log10_update_ratio

__all__ = [
    "STATE_VERSION",
    "Counters",
    "Engine",
    "GradGuardError",
    "Interval",
    "NonFiniteGradientsError",
    "StepOutcome",
    "apply_outcome",
    "optimizer_parameters",
    "parameter_signature",
]

#: Version of the state format (:meth:`Engine.state_dict`, wrapped by every front-end).
STATE_VERSION = 3
_HEATMAP_COLUMNS = 512  # bounded memory: past this, keep every other column
#: Diagnose steps of update-to-weight ratios kept per layer for the update verdicts (their medians), and the
#: verdict-free diagnose steps after which an update verdict's episode ends (a recurrence is reported again).
UPDATE_WINDOW = 5
#: A layer whose first measured step moved it by more than its norm started at (near) zero (a LoRA factor
#: initialised to zero): its update ratios are judged only once its norm is no longer built by its own recent
#: updates, i.e. its norm before the oldest of its last ``UPDATE_REFERENCE`` diagnose steps is at least
#: ``UPDATE_OWN_SHARE`` of its norm now.
UPDATE_REFERENCE = 4 * UPDATE_WINDOW
UPDATE_OWN_SHARE = 0.5
#: A layer whose param group's effective LR is below this fraction of the largest effective LR the group has had
#: (an LR schedule annealing it, a warm restart's trough, the LR guard's cuts) moves slowly on purpose: it gets no
#: "not learning" verdict. A layer whose LR is tiny from the start still gets one.
UPDATE_LR_DECAYED = 0.1


@dataclass
class Interval:
    """Aggregates since the last log step, so nothing between two log steps is lost."""

    steps: int = 0
    finite: int = 0
    norm_sum: float = 0.0
    norm_max: float = 0.0
    clipped: int = 0
    skipped: int = 0
    scaler_skipped: int = 0


@dataclass
class Counters:
    """Totals since the start of training (saved with the state)."""

    steps: int = 0
    clipped_total: int = 0
    skipped_total: int = 0
    scaler_skipped_total: int = 0
    consecutive_skips: int = 0


@dataclass(frozen=True)
class StepOutcome:
    """What the guard decided at one optimizer step.

    Attributes:
        step: this optimizer's step index (0-based, counted by the guard).
        stats: the step's host-side statistics (unscaled).
        global_norm: pre-clip global gradient norm (``nan``/``inf`` when non-finite).
        loss: mean loss of the step's micro-batches, when it was measured.
        threshold: the clip threshold in force (``None`` when not clipping or while warming up).
        coefficient: the factor the gradients are multiplied by when ``clipped``, else ``None``.
        post_clip_norm: the global norm after clipping (``None`` when not clipping).
        clipped: the gradients are to be scaled by ``coefficient``.
        skipped: the gradients are to be dropped (the optimizer step does nothing).
        scaler_skipped: non-finite under an active AMP GradScaler, which skips the step itself.
        error: set when training must stop (raise it after the step is accounted and logged).
        lr_reduction: the LR guard's reduction at this step, if any.
        events: what is to be reported about this step.
    """

    step: int
    stats: StepStats
    global_norm: float
    loss: float | None = None
    threshold: float | None = None
    coefficient: float | None = None
    post_clip_norm: float | None = None
    clipped: bool = False
    skipped: bool = False
    scaler_skipped: bool = False
    error: str | None = None
    lr_reduction: LRReduction | None = None
    events: tuple[GuardEvent, ...] = ()


def _shown(layers: list[str], limit: int = 5) -> str:
    return ", ".join(layers[:limit]) + (f" and {len(layers) - limit} more" if len(layers) > limit else "")


@dataclass
class Engine:
    """Everything GradGuard keeps for one optimizer, and the decisions it takes from it.

    Args:
        index: the optimizer's index (keys its logged names and its saved state).
        stats: the gradient statistics over the optimizer's parameters.
        policy: the clip policy, or ``None`` to only monitor.
        lr_guard: the LR guard (needs ``policy``), or ``None``.
        diagnostics: the per-layer diagnostics, or ``None``.
        on_nonfinite: ``"skip"``, ``"raise"`` or ``"warn"``.
        max_consecutive_skips: with ``"skip"``, stop after this many consecutive skipped steps.
        monitor_only: never change training (non-finite steps are reported, stepped through).

    Example::

        engine = Engine(0, GradStats(model.named_parameters()), make_policy("auto"), None, None)
        stats, loss, scale = engine.measure(loss=loss.detach())
        outcome = engine.decide(stats, loss=loss)
        apply_outcome(engine, outcome)
    """

    index: int
    stats: GradStats
    policy: ThresholdPolicy | None
    lr_guard: LRGuard | None
    diagnostics: GradientDiagnostics | None
    on_nonfinite: str = "skip"
    max_consecutive_skips: int = 25
    monitor_only: bool = False
    counters: Counters = field(default_factory=Counters)
    interval: Interval = field(default_factory=Interval)
    last: StepOutcome | None = None
    heatmap_steps: list[int] = field(default_factory=list)
    heatmap_columns: list[list[float]] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    updates: UpdateTracker | None = None
    log_updates: bool = True  # per-layer update ratios (log and diagnose steps); False: for the LR guard only
    update_ratios: dict[str, deque[float]] = field(default_factory=dict)
    update_episodes: dict[tuple[str, str], int] = field(default_factory=dict)
    update_references: dict[str, deque[float]] = field(default_factory=dict)  # layers that started at zero
    update_verdicts: list[UpdateVerdict] = field(default_factory=list)
    update_lrs: dict[str, float] = field(default_factory=dict)  # each layer's effective LR at the last measured step
    update_lr_peaks: dict[str, float] = field(default_factory=dict)  # the largest effective LR each layer has had
    signature: tuple[int, ...] | None = None  # parameter_signature() of the optimizer the stats were built for
    state_finite: bool = True  # the last measure()'s state check (module buffers) was finite on every rank

    # ------------------------------------------------------------------ the step
    def sync_parameters(
        self, optimizer: torch.optim.Optimizer, named_parameters: Callable[[], Iterable[tuple[str, Tensor]]]
    ) -> bool:
        """Regroup when the optimizer's parameters changed since the last step; call it before :meth:`measure`.

        A layer unfrozen during training (``requires_grad`` set back, ``BaseFinetuning``,
        ``optimizer.add_param_group``) must be measured, clipped and checked like the others. The check is
        cheap: the length of each param group, and a gradient on a parameter left out as frozen; only a
        change regroups (``named_parameters()`` is then called). Identical on every rank.

        Returns:
            Whether the parameters were regrouped.
        """
        signature = parameter_signature(optimizer)
        if self.signature is None:
            self.signature = signature
        if signature == self.signature and not self.stats.untracked_have_grads():
            return False
        old_layers = list(self.stats.layers)
        self.stats = GradStats(named_parameters(), self.stats.group_by)
        self.signature = signature
        if self.updates is not None:  # the weight copies must cover the new parameters (and only those)
            self.updates = UpdateTracker(self.stats, keep_buffers=self.updates.keep_buffers)
        if self.stats.layers != old_layers and self.heatmap_columns:
            # keep the heatmap rows by layer name; a layer new to the heatmap is NaN (grey) before now
            position = {name: i for i, name in enumerate(old_layers)}
            self.heatmap_columns = [
                [col[position[name]] if name in position else math.nan for name in self.stats.layers]
                for col in self.heatmap_columns
            ]
        return True

    def measure(
        self, loss: Tensor | None = None, amp_scale: Tensor | None = None, state_check: Tensor | None = None
    ) -> tuple[StepStats, float | None, float | None]:
        """One pass over the gradients, one collective, one transfer: ``(stats, loss, amp_scale)`` on the host.

        Args:
            loss: a scalar tensor (the mean unscaled loss of the step), sent in the same vector.
            amp_scale: the GradScaler's scale when the gradients are still scaled (fused optimizers).
            state_check: a scalar that is non-finite when the training state outside the gradients is
                (recovery's module-buffer check); its reduced verdict is left in :attr:`state_finite`.
        """
        extras = [e for e in (amp_scale, loss) if e is not None]
        vector = self.stats.squared_norms(extras=[*extras, *((state_check,) if state_check is not None else ())])
        vector = reduce_stats(vector, self.stats.sharded_layers)
        stats = self.stats.read(vector, num_extras=len(extras) + (state_check is not None))
        self.state_finite = True
        if state_check is not None:
            self.state_finite = math.isfinite(stats.extras[-1])
            stats = StepStats(stats.layers, stats.sq_norms, stats.extras[:-1])
        scale = stats.extras[0] if amp_scale is not None else None
        return stats, (stats.extras[-1] if loss is not None else None), scale

    def decide(
        self,
        stats: StepStats,
        *,
        loss: float | None = None,
        amp_scale: float | None = None,
        scaler_enabled: bool = False,
    ) -> StepOutcome:
        """Decide one optimizer step from its reduced statistics, and account it.

        Args:
            stats: the step's statistics (:meth:`measure`); identical on every rank.
            loss: the step's loss, evidence for the LR guard.
            amp_scale: the loss scale when the statistics were measured on still-scaled gradients.
            scaler_enabled: an active AMP GradScaler skips non-finite steps itself.
        """
        step = self.counters.steps
        if amp_scale is not None:
            inv = 1.0 / (amp_scale**2)
            stats = StepStats(stats.layers, [v * inv for v in stats.sq_norms], stats.extras)
        base = StepOutcome(step=step, stats=stats, global_norm=stats.global_norm, loss=loss)
        if stats.finite:
            self.counters.consecutive_skips = 0
            outcome = self._clip(base)
        else:
            outcome = self._nonfinite(base, scaler_enabled)
        self._account(outcome)
        self.counters.steps += 1
        self.last = outcome
        return outcome

    def _clip(self, base: StepOutcome) -> StepOutcome:
        policy = self.policy
        if policy is None:
            return base
        norm, coef = base.global_norm, None
        threshold = policy.threshold()
        if threshold is not None and norm > threshold:
            # torch's clip_grad_norm_ divides by norm + 1e-6; an epsilon relative to the threshold is the same at a
            # threshold of 1 and keeps the clipped norm at the threshold whatever the units of the loss.
            coef = threshold / (norm + 1e-6 * threshold)
        center = policy.center()  # the typical level the threshold was computed from, before this norm
        prior = policy.threshold_is_prior()
        policy.observe(norm)
        reduction: LRReduction | None = None
        events: tuple[GuardEvent, ...] = ()
        if self.lr_guard is not None:
            reduction = self.lr_guard.update(
                step=base.step, norm=norm, threshold=threshold, center=center, loss=base.loss, prior=prior
            )
            if reduction is not None:
                evidence = {
                    "norm": norm,
                    "lr_scale_before": reduction.lr_scale_before,
                    "lr_scale": reduction.lr_scale,
                    "reason": reduction.reason,
                }
                if threshold is not None:
                    evidence["threshold"] = threshold
                events = (GuardEvent("lr_reduction", base.step, str(reduction), evidence=evidence),)
        return replace(
            base,
            threshold=threshold,
            coefficient=coef,
            post_clip_norm=norm if coef is None else norm * coef,
            clipped=coef is not None,
            lr_reduction=reduction,
            events=events,
        )

    def _nonfinite(self, base: StepOutcome, scaler_enabled: bool) -> StepOutcome:
        step, layers = base.step, base.stats.nonfinite_layers
        shown, evidence = _shown(layers), {"global_norm": str(base.global_norm)}
        if scaler_enabled:
            # fp16 AMP: the GradScaler skips this step itself and lowers its loss scale. Not an explosion.
            return self._scaler_skipped(base)
        if self.monitor_only or self.on_nonfinite == "warn":
            text = f"non-finite gradients at step {step} in {shown}; stepping anyway"
            return replace(base, events=(GuardEvent("nonfinite", step, text, tuple(layers), evidence),))
        if self.on_nonfinite == "raise":
            message = (
                f"GradGuard: non-finite gradients at optimizer step {step} in layer(s) {shown}. "
                "Use GradGuard(on_nonfinite='skip') to skip such steps, lower the learning rate, or check the "
                "loss and inputs for NaN/inf."
            )
            return replace(base, error=message)
        self.counters.consecutive_skips += 1
        streak = self.counters.consecutive_skips
        text = f"skipped optimizer step {step}: non-finite gradients in {shown}"
        event = GuardEvent("skipped", step, text, tuple(layers), {**evidence, "consecutive_skips": streak})
        error: str | None = None
        if streak >= self.max_consecutive_skips:
            error = (
                f"GradGuard: {streak} consecutive optimizer steps had non-finite "
                f"gradients (last in layer(s) {shown}); training cannot make progress. Lower the learning rate, "
                "check the data and loss for NaN/inf, or use a more stable precision (bf16-mixed / 32-true). "
                "Raise `max_consecutive_skips` to tolerate longer streaks."
            )
        return replace(base, skipped=True, error=error, events=(event,))

    def _scaler_skipped(self, base: StepOutcome) -> StepOutcome:
        """A step the AMP GradScaler skips: routine, unless it goes on long enough to show no progress."""
        if self.monitor_only or self.on_nonfinite == "warn":
            return replace(base, scaler_skipped=True)
        self.counters.consecutive_skips += 1
        streak = self.counters.consecutive_skips
        error: str | None = None
        if streak >= self.max_consecutive_skips:
            error = (
                f"GradGuard: the AMP GradScaler skipped {streak} consecutive optimizer steps (non-finite gradients "
                f"at every loss scale it tried, last in layer(s) {_shown(base.stats.nonfinite_layers)}); training "
                "cannot make progress. Check the loss and inputs for NaN/inf (a NaN loss is NaN at any scale), "
                "lower the learning rate, or use bf16-mixed. Raise `max_consecutive_skips` to tolerate longer streaks."
            )
        return replace(base, scaler_skipped=True, error=error)

    def _account(self, outcome: StepOutcome) -> None:
        interval, counters, norm = self.interval, self.counters, outcome.global_norm
        interval.steps += 1
        if math.isfinite(norm):
            interval.finite += 1
            interval.norm_sum += norm
            interval.norm_max = max(interval.norm_max, norm)
        else:
            interval.norm_max = norm if math.isnan(norm) else math.inf
        interval.clipped += outcome.clipped
        interval.skipped += outcome.skipped
        interval.scaler_skipped += outcome.scaler_skipped
        counters.clipped_total += outcome.clipped
        counters.skipped_total += outcome.skipped
        counters.scaler_skipped_total += outcome.scaler_skipped

    # ------------------------------------------------------------------ diagnose and log steps
    def diagnose(self, outcome: StepOutcome) -> tuple[GuardEvent, ...]:
        """At a diagnose step: the diagnostics' verdicts on the step's per-layer norms, as events."""
        if self.diagnostics is None or outcome.scaler_skipped:
            return ()  # a GradScaler overflow is routine fp16 loss scaling, not a verdict on a layer
        norms = outcome.stats.layer_norms()
        numels = dict(zip(self.stats.layers, self.stats.numels, strict=True))
        # a layer frozen during training has no gradient: not a dead layer (checked on zero norms only)
        frozen = self.stats.frozen_layers(i for i, v in enumerate(norms.values()) if v == 0.0)
        if frozen:
            norms = {name: v for name, v in norms.items() if name not in frozen}
        events = []
        for verdict in self.diagnostics.observe(outcome.step, norms, numels, loss=outcome.loss):
            self.verdicts.append(verdict)
            text = f"{verdict.message} Remedy: {verdict.remedy}"
            events.append(GuardEvent("verdict", verdict.step, text, (verdict.layer,), {"value": verdict.value}))
        return tuple(events)

    def close_interval(self, outcome: StepOutcome, global_step: int, heatmap: bool) -> None:
        """At a log step, once the metrics are written: reset the aggregates and record the heatmap column."""
        self.interval = Interval()
        if heatmap:
            self.heatmap_steps.append(global_step)
            # NaN (grey) for non-finite
            self.heatmap_columns.append([log10_norm(v) for v in outcome.stats.layer_norms().values()])
            if len(self.heatmap_steps) > _HEATMAP_COLUMNS:
                self.heatmap_steps = self.heatmap_steps[::2]
                self.heatmap_columns = self.heatmap_columns[::2]

    # ------------------------------------------------------------------ update-to-weight ratios
    def wants_updates(self, step: int, log_step: bool, diagnose_step: bool) -> bool:
        """Whether optimizer step ``step`` measures its update: a log or diagnose step with update ratios on, or
        a step whose update the LR guard's stall channel checks (:meth:`LRGuard.stall_due`)."""
        if self.updates is None:
            return False
        if (log_step or diagnose_step) and self.log_updates:
            return True
        return self.lr_guard is not None and self.lr_guard.stall_due(step)

    def snapshot_updates(self, outcome: StepOutcome) -> bool:
        """Before ``optimizer.step()`` of a step that :meth:`wants_updates`: copy the weights the step will move.

        Nothing is copied (and an older copy is dropped) when the step is skipped or left to the AMP
        GradScaler, or when update tracking is off. Returns whether a copy waits for :meth:`close_updates`.
        """
        tracker = self.updates
        if tracker is None:
            return False
        if outcome.skipped or outcome.scaler_skipped or outcome.error is not None:
            tracker.discard()
            return False
        tracker.snapshot()
        return True

    def close_updates(
        self, step: int, record_ratios: bool = True, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[UpdateStats, tuple[GuardEvent, ...]] | None:
        """After ``optimizer.step()``: the per-layer update and weight norms since :meth:`snapshot_updates`.

        Reduced across ranks only where some layer is sharded (SUM of the shards' squared norms, one
        collective; replicas hold the same weights on every rank and need none). The log10 ratios feed
        the update verdicts ("LR too high for <layer>", "<layer> is not learning"), each reported once per
        layer and episode.

        The global ratio (all layers together) feeds the LR guard's stall channel at the steps it checks
        (:meth:`LRGuard.stall_check`); a reduction it decides comes back as an ``"lr_reduction"`` event. The
        weights are the same on every rank (replicas) or reduced (shards), so every rank decides alike.

        A layer whose param group's effective LR has been scheduled down to below ``UPDATE_LR_DECAYED`` of the
        largest it has had gets no "not learning" verdict: its small updates are the schedule's doing.

        Args:
            step: this optimizer's step index of the snapshot (for the verdicts).
            record_ratios: whether the step is a diagnose step: only those record per-layer ratios for the verdicts.
            optimizer: the optimizer that stepped; its param groups give each layer's effective LR (the LR
                guard's scale included). Without it no layer counts as scheduled down.

        Returns:
            ``(stats, events)``, or ``None`` without a pending snapshot.
        """
        tracker = self.updates
        if tracker is None or not tracker.pending:
            return None
        vector = tracker.squared_norms()
        sharded = self.stats.sharded_layers
        if any(sharded):
            vector = reduce_stats(vector, list(sharded) * 3)
        stats = tracker.read(vector)
        events = self._stall_check(step, stats)
        if not (record_ratios and self.log_updates):
            return stats, events
        if optimizer is not None:
            self._record_lrs(optimizer)
        for layer, update, weight, start in zip(
            stats.layers, stats.update_norms, stats.weight_norms, stats.start_norms, strict=True
        ):
            if not (weight > 0.0 or not math.isfinite(weight)):
                continue  # no touched weights (the layers of UpdateStats.log10_ratios)
            if layer not in self.update_ratios and start < update:
                self.update_references[layer] = deque(maxlen=UPDATE_REFERENCE)  # started at (near) zero
            reference = self.update_references.get(layer)
            judged = True
            if reference is not None:
                # Its norm is its own recent updates: it moves by a large fraction of it whatever the LR.
                reference.append(start)
                judged = reference[0] >= UPDATE_OWN_SHARE * weight
            ratio = log10_update_ratio(update, weight) if judged else math.nan
            self.update_ratios.setdefault(layer, deque(maxlen=UPDATE_WINDOW)).append(ratio)
        if self.diagnostics is None:
            return stats, events
        return stats, events + self._update_verdicts(step)

    def _record_lrs(self, optimizer: torch.optim.Optimizer) -> None:
        """Each layer's effective LR now (the largest over the param groups its parameters are in), and its peak."""
        lrs: list[float] = [float(g["lr"]) for g in optimizer.param_groups]
        guard = self.lr_guard
        if guard is not None and guard.optimizer is optimizer:
            lrs = guard.effective_lrs()
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        layers = self.stats.layers
        now: dict[str, float] = {}
        for param, index in zip(self.stats.params, self.stats._param_layer, strict=True):
            group = group_of.get(id(param))
            if group is not None:
                name = layers[index]
                now[name] = max(now.get(name, 0.0), lrs[group])
        for name, lr in now.items():
            if math.isfinite(lr):
                self.update_lr_peaks[name] = max(self.update_lr_peaks.get(name, 0.0), lr)
        self.update_lrs = now

    def _scheduled_down(self, layer: str) -> bool:
        """Whether the layer's effective LR is below ``UPDATE_LR_DECAYED`` of the largest it has had."""
        lr, peak = self.update_lrs.get(layer), self.update_lr_peaks.get(layer, 0.0)
        return lr is not None and peak > 0.0 and lr < UPDATE_LR_DECAYED * peak

    def _stall_check(self, step: int, stats: UpdateStats) -> tuple[GuardEvent, ...]:
        guard = self.lr_guard
        if guard is None or not guard.stall_due(step):
            return ()
        weight = math.sqrt(sum(w * w for w in stats.weight_norms))
        if not weight > 0.0:
            return ()
        update = math.sqrt(sum(u * u for u in stats.update_norms))
        ratio = update / weight
        reduction = guard.stall_check(step=step, update_ratio=ratio, update_norm=update)
        if reduction is None:
            return ()
        evidence = {
            "update_ratio": ratio,
            "lr_scale_before": reduction.lr_scale_before,
            "lr_scale": reduction.lr_scale,
            "reason": reduction.reason,
        }
        if reduction.update_gain is not None:
            evidence["update_gain"] = reduction.update_gain
        return (GuardEvent("lr_reduction", step, str(reduction), evidence=evidence),)

    def _update_verdicts(self, step: int) -> tuple[GuardEvent, ...]:
        ratios = {layer: list(values) for layer, values in self.update_ratios.items()}
        n = UPDATE_WINDOW  # a verdict needs a full window: early steps move small fresh weights fast
        slow = [v for v in not_learning_verdicts(step, ratios, min_observations=n) if not self._scheduled_down(v.layer)]
        fast = lr_too_high_verdicts(step, ratios, min_observations=n)
        if fast and self.lr_guard is not None and self.lr_guard.loss_improving():
            # A layer that moves fast while the training loss still falls is learning fast: a tanh MLP on a plateau
            # moves its small output layer by 10 % per step at a sane SGD LR as it starts to learn.
            fast = []
        found = fast + slow
        now = {(v.layer, v.kind) for v in found}
        for key in list(self.update_episodes):
            if key not in now:
                self.update_episodes[key] += 1
                if self.update_episodes[key] >= UPDATE_WINDOW:
                    del self.update_episodes[key]  # the episode is over
        events = []
        for verdict in found:
            key = (verdict.layer, verdict.kind)
            new = key not in self.update_episodes
            self.update_episodes[key] = 0
            if new:
                self.update_verdicts.append(verdict)
                text = f"{verdict.message} Remedy: {verdict.remedy}"
                evidence = {"value": verdict.value, "verdict": verdict.kind}
                events.append(GuardEvent("verdict", step, text, (verdict.layer,), evidence))
        return tuple(events)

    def histograms(self, bins: int) -> dict[str, HistogramData]:
        """Per-layer gradient histograms (two more collectives where some layer is sharded; every rank calls)."""
        sharded = any(self.stats.sharded_layers)
        ranges = self.stats.histogram_ranges()
        if sharded:
            ranges = reduce_histograms(ranges)
        counts = self.stats.histogram_counts(ranges, bins)
        if sharded:
            counts = reduce_histograms(ranges, counts, self.stats.sharded_layers)
        return self.stats.read_histograms(ranges, counts)

    def heatmap_grid(self) -> list[list[float]]:
        """The heatmap buffer as rows (layers) x columns (log steps) of ``log10`` norms."""
        return [[col[r] for col in self.heatmap_columns] for r in range(len(self.stats.layers))]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This optimizer's state as primitives (the ``guards[i]`` entry of the format in ``docs/state.md``)."""
        state: dict[str, Any] = {
            "counters": asdict(self.counters),
            "interval": asdict(self.interval),
            "layers": list(self.stats.layers),
            "numels": list(self.stats.numels),
            "heatmap_steps": list(self.heatmap_steps),
            "heatmap_columns": [list(c) for c in self.heatmap_columns],
        }
        if self.policy is not None:
            state["policy"] = self.policy.state_dict()
        if self.lr_guard is not None:
            state["lr_guard"] = self.lr_guard.state_dict()
            state["lr_guard_config"] = self.lr_guard.config()
        if self.diagnostics is not None:
            state["diagnostics"] = self.diagnostics.state_dict()
        if self.update_ratios:
            state["update_ratios"] = {layer: list(values) for layer, values in self.update_ratios.items()}
            state["update_episodes"] = [[layer, kind, n] for (layer, kind), n in self.update_episodes.items()]
            state["update_references"] = {layer: list(values) for layer, values in self.update_references.items()}
        if self.update_lr_peaks:
            state["update_lr_peaks"] = dict(self.update_lr_peaks)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> list[str]:
        """Apply a saved state (versions 1 to 3); returns the differences found and what was done about each."""
        self.counters = _restore_fields(Counters, state.get("counters"))
        self.interval = _restore_fields(Interval, state.get("interval"))
        layers, now = state.get("layers"), list(self.stats.layers)
        columns = [list(c) for c in state.get("heatmap_columns", [])]
        same_layers = layers == now if layers is not None else all(len(c) == len(now) for c in columns)
        numels = state.get("numels")
        saved_numel = None if numels is None else sum(int(n) for n in numels)
        same_params = saved_numel is None or saved_numel == sum(self.stats.numels)
        differences: list[str] = []
        if same_layers:
            self.heatmap_steps = list(state.get("heatmap_steps", []))
            self.heatmap_columns = columns
        else:
            saved_desc = f"{len(layers)}: {_names(layers)}" if layers is not None else "other layers"
            differences.append(
                f"layers differ (saved {saved_desc}; now {len(now)}: {_names(now)}): per-layer state (diagnostics, "
                "heatmap) starts fresh"
            )
        if not same_params:
            differences.append(
                f"parameters differ (saved {saved_numel} gradient elements, now {sum(self.stats.numels)}): the saved "
                "norm statistics describe another model, so the clip policy and the LR guard's detector start fresh "
                "(the LR scale, cooldown and counters are kept)"
            )
        differences += self._load_policy(state.get("policy"), same_params)
        differences += self._load_lr_guard(state, same_params)
        saved_diag = state.get("diagnostics")
        if self.diagnostics is not None and isinstance(saved_diag, Mapping) and same_layers:
            self.diagnostics.load_state_dict(dict(saved_diag))
        saved_ratios = state.get("update_ratios")
        if isinstance(saved_ratios, Mapping) and same_layers:
            self.update_ratios = {
                str(k): deque((float(v) for v in vs), maxlen=UPDATE_WINDOW) for k, vs in saved_ratios.items()
            }
            self.update_episodes = {(str(e[0]), str(e[1])): int(e[2]) for e in state.get("update_episodes", [])}
            self.update_references = {
                str(k): deque((float(v) for v in vs), maxlen=UPDATE_REFERENCE)
                for k, vs in state.get("update_references", {}).items()
            }
        saved_peaks = state.get("update_lr_peaks")  # absent in older states: the peaks start from the next LRs
        if isinstance(saved_peaks, Mapping) and same_layers:
            self.update_lr_peaks = {str(k): float(v) for k, v in saved_peaks.items()}
        return differences

    def _load_policy(self, saved: Any, same_params: bool) -> list[str]:
        policy = self.policy
        if policy is not None and isinstance(saved, Mapping) and same_params:
            differences = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    policy.load_state_dict(dict(saved))
                except ValueError:
                    differences.append(
                        f"clip policy differs (saved {saved.get('name')!r}, now {policy.name!r}): "
                        f"the {policy.name!r} policy starts fresh and warms up again"
                    )
            return differences + [str(w.message) for w in caught]
        if policy is None and isinstance(saved, Mapping):
            return [
                f"the checkpoint has clip-policy state ({saved.get('name')!r}) but this GradGuard does not clip: "
                "ignored"
            ]
        if policy is not None and saved is None and self.counters.steps:
            return ["the checkpoint has no clip-policy state (saved without clipping): the policy starts fresh"]
        return []

    def _load_lr_guard(self, state: Mapping[str, Any], same_params: bool) -> list[str]:
        saved, lr_guard = state.get("lr_guard"), self.lr_guard
        if lr_guard is not None and isinstance(saved, Mapping):
            if not same_params:
                saved = {k: saved[k] for k in ("lr_scale", "num_reductions", "cooldown_left") if k in saved}
            lr_guard.load_state_dict(saved)
            saved_config, config = state.get("lr_guard_config"), lr_guard.config()
            if isinstance(saved_config, str):  # version 2
                saved_config = version_2_config(saved_config) or {"configuration": saved_config}
            if isinstance(saved_config, Mapping) and config_differs(saved_config, config, type(lr_guard)().config()):
                name = type(lr_guard).__name__
                return [
                    f"LR guard configuration differs (saved {config_text(name, saved_config)}, now {lr_guard!r}): "
                    f"keeping the current configuration, continuing from the saved LR scale {lr_guard.lr_scale:g} "
                    "and history"
                ]
        elif lr_guard is None and isinstance(saved, Mapping) and float(saved.get("lr_scale", 1.0)) != 1.0:
            return [
                f"the checkpoint has LR scale {float(saved['lr_scale']):g} from an LR guard, which is disabled now: "
                "the optimizer steps with the scheduler's LR again"
            ]
        elif lr_guard is not None and saved is None and self.counters.steps:
            return ["the checkpoint has no LR-guard state (saved without it): the LR guard starts fresh"]
        return []


def apply_outcome(engine: Engine, outcome: StepOutcome) -> None:
    """Act on the gradients as decided: scale them by the clip coefficient, or drop them (skip)."""
    if outcome.skipped:
        for param in engine.stats.params:
            param.grad = None
    elif outcome.coefficient is not None:
        engine.stats.scale_(outcome.coefficient)


def _names(names: list[str], shown: int = 6) -> str:
    return ", ".join(map(str, names[:shown])) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _restore_fields(cls: type[Any], saved: Any) -> Any:
    """A dataclass from saved fields: missing ones take their defaults, unknown (newer) ones are ignored."""
    fields = asdict(cls())
    if isinstance(saved, Mapping):
        fields.update({k: type(fields[k])(v) for k, v in saved.items() if k in fields})
    return cls(**fields)


def parameter_signature(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """The number of parameters in each param group: changes with ``add_param_group`` (cheap: one len per group)."""
    return tuple(len(group["params"]) for group in optimizer.param_groups)


def optimizer_parameters(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, Tensor]]:
    """The optimizer's parameters with their names in ``module``, in the module's order (``param_{i}`` if unnamed)."""
    named = list(module.named_parameters())
    names = {id(p): n for n, p in named}
    order = {id(p): i for i, (_, p) in enumerate(named)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    params.sort(key=lambda p: order.get(id(p), len(order)))
    return [(names.get(id(p), f"param_{i}"), p) for i, p in enumerate(params)]
