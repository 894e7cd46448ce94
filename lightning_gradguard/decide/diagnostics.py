"""Plain-language gradient diagnostics: vanishing, exploding, dead and non-finite layers.

:class:`GradientDiagnostics` is a pure object (no Lightning, no torch): it is fed the pre-clip L2
gradient norm and the element count of every layer at each log step and answers the *new*
:class:`Verdict` objects, each with a message that names the layer, the measure and the threshold,
and a remedy that fits the verdict. The GradGuard callback feeds it during training and the
``gradguard report`` command replays it over the norms stored in the event files.

The measure
-----------
Vanishing gradients are judged on the **per-element RMS** of the layer's gradient,
``rms = l2_norm / sqrt(numel)``. The L2 norm grows with the square root of the layer size, so it
cannot compare a 784x100 input layer with a 100x10 output layer: in the popular 10-layer Tanh
network the first layer's L2 norm is only 5-50x below the last layer's although its RMS is 30-60x
below it. Where the element count of a layer is unknown (``numels`` lacks it, or it is 0) the L2
norm itself is used and the message says so. Every rule looks at the **median of the layer's last
``window`` observations** (fewer at the start of training), so one noisy log step neither raises
nor ends a verdict.

Rules (defaults in brackets)
----------------------------
* ``vanishing``: median RMS more than ``vanishing_ratio`` [1e4] times smaller than the largest median
  RMS of any layer at that log step, or below ``vanishing_floor`` [0: off]. The default is relative only:
  multiplying the loss by any k leaves the verdicts unchanged, and a converged model whose every layer
  has a tiny gradient is not vanishing (its layers keep their proportions).
* ``exploding``: the current L2 norm above ``exploding_ceiling`` [off: an absolute level is in the loss's
  units, and a healthy raw-target regression has norms of 1e4], or above the layer's first norm and more than
  ``exploding_ratio`` [1000] times the median of the layer's own previous ``window`` finite observations (at
  least 3 of them; a baseline of zero does not count; not while a passed training loss is below a tenth of the
  first loss: a model that fits its data gets norms lifted by hard batches), or, when the training loss is
  passed, the run is blowing up: the loss is more than ``blowup_loss_ratio`` [2] times the first loss observed
  (a positive one) and the layer's norm is more than ``blowup_growth`` [2] times its own first observed norm.
  Norms of a blown-up run rarely reach an absolute ceiling (a tanh char-RNN at 30x its LR: 2-5 against 0.7 at
  step 0, while its loss went from 4.6 to 8-25 nats; a 10-layer tanh MLP on the digits: its output layer 7.7
  against 1.1, its loss 2.3 to 80), and a healthy run's loss never doubles its first value, so the pair names
  the layers of a run that blew up and stays silent on healthy runs whose norms grow (measured on
  ``benchmarks/bench_outcomes.py``, see ``docs/diagnostics.md``).
* ``dead``: the norm is exactly zero now and the median is zero, over two observations at least (a layer
  with parameters that require grad whose gradient never moves; at the first observation alone, the layers
  below a zero-initialised output layer have exactly-zero gradients too, and come to life at the next
  step). A layer whose median is zero gets no ``vanishing`` verdict (it is dead, or coming back to life).
* ``nonfinite``: the norm is NaN or infinite (judged on the current observation alone; such
  observations never enter the history).

Each verdict is reported once per layer and episode: an episode of a kind ends once its condition
has been false on ``window`` consecutive observations of the layer; a later recurrence is a new
episode and is reported again.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lightning_gradguard._checks import check_int
from lightning_gradguard._checks import check_number as _check_positive
from lightning_gradguard._state import state_from_dict

__all__ = ["KINDS", "REMEDIES", "GradientDiagnostics", "Verdict", "VerdictKind"]

VerdictKind = Literal["vanishing", "exploding", "dead", "nonfinite"]
KINDS: tuple[VerdictKind, ...] = ("vanishing", "exploding", "dead", "nonfinite")

_MIN_BASELINE = 3  # previous observations the exploding jump rule needs before it can fire
#: The jump rule stays silent at a step whose training loss is below this fraction of the first loss: a model
#: that fits its training set (an RMSprop classifier on breast-cancer features, loss 0.69 -> 1e-4) has layer norms
#: of 1e-5, and a batch it still gets wrong (loss 0.03) lifts one by 3e4x, past its first norm. That is a hard
#: batch on a converged run, not an explosion (which raises the loss, and meets the blow-up rule).
_SETTLED_LOSS_RATIO = 0.1

REMEDIES: dict[str, str] = {
    "vanishing": (
        "use a non-saturating activation (ReLU, GELU, SiLU) instead of sigmoid/tanh, initialise for it "
        "(Kaiming for ReLU-like, Xavier/Glorot for tanh), add normalisation (BatchNorm, LayerNorm) or "
        "residual connections so the gradient has a short path to the early layers; if every layer is "
        "small, check that the loss is not saturated or scaled down."
    ),
    "exploding": (
        "clip gradients (GradGuard's clipping or a lower max_norm), lower the learning rate or lengthen "
        "its warmup, add normalisation (LayerNorm, BatchNorm) and check the initialisation (weights much "
        "larger than 1/sqrt(fan_in)); under fp16 use bf16 or a GradScaler."
    ),
    "dead": (
        "check that the layer's output reaches the loss (not detached, not multiplied by zero, not cut "
        "off by a frozen or unused branch); for dead ReLU units use LeakyReLU/GELU, a lower learning "
        "rate or a fresh initialisation; if the layer is meant to be frozen, set requires_grad=False."
    ),
    "nonfinite": (
        "find the first NaN/inf (torch.autograd.set_detect_anomaly), guard log, division and sqrt with "
        "an epsilon, lower the learning rate, clip gradients, and under fp16 use bf16 or a GradScaler; "
        "GradGuard skips such optimizer steps by default."
    ),
}


@dataclass(frozen=True)
class Verdict:
    """One diagnosis of one layer.

    Attributes:
        layer: layer name as passed to :meth:`GradientDiagnostics.observe`.
        kind: ``"vanishing"``, ``"exploding"``, ``"dead"`` or ``"nonfinite"``.
        step: the step passed to :meth:`~GradientDiagnostics.observe` when the verdict was made.
        value: the measured value behind the verdict: median per-element RMS (or L2 norm when the
            element count is unknown) for ``vanishing``, the L2 norm for ``exploding``, ``0.0`` for
            ``dead``, the non-finite norm for ``nonfinite``.
        message: plain-language description naming the layer, the measure and the threshold.
        remedy: what usually fixes it.
    """

    layer: str
    kind: VerdictKind
    step: int
    value: float
    message: str
    remedy: str


class _Layer:
    """Per-layer state: recent finite L2 norms, element count, open episodes and totals."""

    __slots__ = ("active", "first", "history", "numel", "records")

    def __init__(self, window: int) -> None:
        self.history: deque[float] = deque(maxlen=window)
        self.first = 0.0  # the first finite positive norm observed: the layer's early level
        self.numel = 0
        # kind -> consecutive observations without the condition, for each open episode
        self.active: dict[str, int] = {}
        # kind -> {"episodes", "first_step", "last_step", "value", "message"}
        self.records: dict[str, dict[str, Any]] = {}


@dataclass
class LayerState:
    """One layer's saved diagnostics (:class:`_Layer` as plain values).

    Attributes:
        history: recent finite L2 norms.
        first: the first finite positive norm observed.
        numel: gradient element count.
        active: kind -> consecutive observations without the condition, for each open episode.
        records: kind -> ``{"episodes", "first_step", "last_step", "value", "message"}``.
    """

    history: list[float] = field(default_factory=list, metadata={"item": float})
    first: float = 0.0
    numel: int = 0
    active: dict[str, int] = field(default_factory=dict, metadata={"item": int})
    records: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"item": dict})


@dataclass
class DiagnosticsState:
    """What :meth:`GradientDiagnostics.state_dict` saves.

    Attributes:
        version: this format's version.
        observations: log steps observed.
        first_step: the first of them (``None`` before any).
        last_step: the last of them (``None`` before any).
        first_loss: the first positive training loss observed.
        layers: each layer's :class:`LayerState`.
    """

    version: int = 1
    observations: int = 0
    first_step: int | None = None
    last_step: int | None = None
    first_loss: float | None = None
    layers: dict[str, LayerState] = field(
        default_factory=dict, metadata={"item": lambda saved: state_from_dict(LayerState(), saved)[0]}
    )


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, with an ``s`` unless the count is one: ``plural(1, "log step")`` -> ``'1 log step'``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class GradientDiagnostics:
    """Per-layer verdicts from a stream of gradient norms (pure, no torch needed).

    Args:
        vanishing_floor: a layer whose median per-element RMS gradient is below this is vanishing,
            ``>= 0``. The default, ``0``, disables this absolute rule: an absolute floor depends on the
            units of the loss (a loss x 1e-4 moves every gradient 4 decades down) and fires on every layer
            of a model that has converged. Set it (e.g. 1e-8, Adam's default ``eps``) when the loss has
            known units and an absolute floor is wanted.
        vanishing_ratio: a layer whose median RMS is more than this many times smaller than the
            largest median RMS of any layer is vanishing. ``math.inf`` disables the relative rule.
        exploding_ceiling: a layer whose L2 norm exceeds this is exploding (same units as a clip
            threshold). The default, ``math.inf``, disables this absolute rule: healthy norms depend on the
            loss's units (a raw-target regression runs at 1e4); set it when the units are known.
        exploding_ratio: a layer whose L2 norm exceeds this many times the median of its own previous
            ``window`` finite norms, and its own first observed norm, is exploding. ``math.inf`` disables the
            jump rule.
        window: observations (log steps) per layer behind the medians; also the number of healthy
            observations that end an episode.
        blowup_loss_ratio: the run is blowing up when the loss passed to :meth:`observe` exceeds this
            many times the first positive loss observed, ``> 1``; ``math.inf`` disables the rule.
        blowup_growth: while the run blows up, a layer whose L2 norm exceeds this many times its own
            first observed norm is exploding, ``> 1``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.

    Example:

        diag = GradientDiagnostics()
        for v in diag.observe(0, {"fc1": 2e-9, "fc2": 0.4}, {"fc1": 78400, "fc2": 1000}):
            print(v.message, "Remedy:", v.remedy)
    """

    def __init__(
        self,
        vanishing_floor: float = 0.0,
        vanishing_ratio: float = 1e4,
        exploding_ceiling: float = math.inf,
        exploding_ratio: float = 1000.0,
        window: int = 10,
        blowup_loss_ratio: float = 2.0,
        blowup_growth: float = 2.0,
    ) -> None:
        self.vanishing_floor = _check_positive("vanishing_floor", vanishing_floor, 0.0, True, "a finite number >= 0")
        if math.isinf(self.vanishing_floor):
            raise ValueError(f"`vanishing_floor` must be a finite number >= 0, got {vanishing_floor!r}")
        self.vanishing_ratio = _check_positive("vanishing_ratio", vanishing_ratio, 1.0, False, "> 1")
        self.exploding_ceiling = _check_positive("exploding_ceiling", exploding_ceiling, 0.0, False, "> 0")
        self.exploding_ratio = _check_positive("exploding_ratio", exploding_ratio, 1.0, False, "> 1")
        self.window = check_int("window", window, 1)
        self.blowup_loss_ratio = _check_positive("blowup_loss_ratio", blowup_loss_ratio, 1.0, False, "> 1")
        self.blowup_growth = _check_positive("blowup_growth", blowup_growth, 1.0, False, "> 1")
        self._first_loss: float | None = None
        self._layers: dict[str, _Layer] = {}
        self._observations = 0
        self._first_step: int | None = None
        self._last_step: int | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vanishing_floor={self.vanishing_floor!r}, "
            f"vanishing_ratio={self.vanishing_ratio!r}, exploding_ceiling={self.exploding_ceiling!r}, "
            f"exploding_ratio={self.exploding_ratio!r}, window={self.window!r}, "
            f"blowup_loss_ratio={self.blowup_loss_ratio!r}, blowup_growth={self.blowup_growth!r})"
        )

    # ------------------------------------------------------------------ observe
    def observe(
        self, step: int, norms: Mapping[str, float], numels: Mapping[str, int], loss: float | None = None
    ) -> list[Verdict]:
        """Feed one log step; return the verdicts that are new at this step.

        Args:
            step: the training step (used in messages and as :attr:`Verdict.step`).
            norms: pre-clip L2 gradient norm of every layer, in model order (NaN/inf where the
                layer's gradient is non-finite).
            numels: element count of each layer; a layer missing here (or with 0) is judged on its
                L2 norm instead of its per-element RMS.
            loss: the training loss at this step, if known: evidence that the run is blowing up (the
                first positive loss observed is the reference).

        Returns:
            The verdicts of this step, in layer order (each kind once per layer and episode).
        """
        step = int(step)
        self._observations += 1
        if self._first_step is None:
            self._first_step = step
        self._last_step = step
        current, baselines = self._record(norms, numels)
        blowup = 0.0  # the loss as a multiple of the first loss, while the run blows up
        settled = False  # the loss is far below the first loss: the run fits its data
        if loss is not None and math.isfinite(loss):
            if self._first_loss is None and loss > 0.0:
                self._first_loss = float(loss)
            elif self._first_loss is not None and loss > self.blowup_loss_ratio * self._first_loss:
                blowup = float(loss) / self._first_loss
            settled = self._first_loss is not None and loss < _SETTLED_LOSS_RATIO * self._first_loss

        # The level of every finite layer: median of its window, on the per-element measure.
        levels: dict[str, float] = {
            name: self._measure(name, statistics.median(self._layers[name].history))
            for name, value in current.items()
            if math.isfinite(value)
        }
        reference_name, reference = None, 0.0
        for name, level in levels.items():
            if level > reference:
                reference_name, reference = name, level

        verdicts: list[Verdict] = []
        for name, value in current.items():
            layer = self._layers[name]
            if not math.isfinite(value):
                self._update(layer, name, "nonfinite", True, step, value, verdicts)
                continue  # nothing is known about the other kinds at this step
            self._update(layer, name, "nonfinite", False, step, value, verdicts)
            level = levels[name]
            # Two observations at least: at step 0 every layer below a zero-initialised one (a zero-init output
            # head or residual projection, a common recipe) has an exactly-zero gradient, and comes to life next.
            dead = value == 0.0 and len(layer.history) >= 2 and statistics.median(layer.history) == 0.0
            self._update(layer, name, "dead", dead, step, 0.0, verdicts)
            vanishing = (
                not dead
                and level > 0.0
                and (
                    level < self.vanishing_floor
                    or (name != reference_name and level * self.vanishing_ratio < reference)
                )
            )
            self._update(layer, name, "vanishing", vanishing, step, level, verdicts, reference_name, reference)
            baseline = baselines.get(name)
            grown = blowup > 0.0 and layer.first > 0.0 and value > self.blowup_growth * layer.first
            # The jump rule also needs a norm above the layer's first one: a converged model's norms fall by
            # decades, and a batch it still gets wrong lifts one back by more than `exploding_ratio` while it
            # stays far below where training started. Nor does it fire while the loss is far below its first value
            # (`_SETTLED_LOSS_RATIO`): a converged model's hard batch can lift a norm past its first one.
            jumped = (
                baseline is not None and value > self.exploding_ratio * baseline and value > layer.first and not settled
            )
            exploding = value > self.exploding_ceiling or jumped or grown
            jump_ref = baseline or 0.0
            other = None
            if grown and value <= self.exploding_ceiling and not (jump_ref and value > self.exploding_ratio * jump_ref):
                jump_ref, other = layer.first, f"loss x{blowup:.3g}"
            self._update(layer, name, "exploding", exploding, step, value, verdicts, other, jump_ref)
        return verdicts

    def _record(
        self, norms: Mapping[str, float], numels: Mapping[str, int]
    ) -> tuple[dict[str, float], dict[str, float | None]]:
        """Add one step's norms to each layer's history; the norms, and each finite layer's prior median."""
        current: dict[str, float] = {}
        baselines: dict[str, float | None] = {}
        for name, raw in norms.items():
            value = float(raw)
            layer = self._layers.get(name)
            if layer is None:
                layer = self._layers[name] = _Layer(self.window)
            numel = int(numels.get(name, 0) or 0)
            if numel > 0:
                layer.numel = numel
            current[name] = value
            if math.isfinite(value):
                previous = [v for v in layer.history if v > 0.0]
                baselines[name] = (
                    statistics.median(previous) if len(previous) >= min(_MIN_BASELINE, self.window) else None
                )
                layer.history.append(value)
                if layer.first == 0.0 and value > 0.0:
                    layer.first = value
        return current, baselines

    def _measure(self, name: str, l2: float) -> float:
        numel = self._layers[name].numel
        return l2 / math.sqrt(numel) if numel > 0 else l2

    def _update(
        self,
        layer: _Layer,
        name: str,
        kind: VerdictKind,
        condition: bool,
        step: int,
        value: float,
        verdicts: list[Verdict],
        other: str | None = None,
        reference: float = 0.0,
    ) -> None:
        if not condition:
            if kind in layer.active:
                layer.active[kind] += 1
                if layer.active[kind] >= self.window:
                    del layer.active[kind]
            return
        record = layer.records.get(kind)
        if kind in layer.active:
            layer.active[kind] = 0
            if record is not None:
                record["last_step"] = step
            return
        layer.active[kind] = 0
        verdict = Verdict(
            layer=name,
            kind=kind,
            step=step,
            value=value,
            message=self._message(layer, name, kind, step, value, other, reference),
            remedy=REMEDIES[kind],
        )
        if record is None:
            layer.records[kind] = {
                "episodes": 1,
                "first_step": step,
                "last_step": step,
                "value": value,
                "message": verdict.message,
            }
        else:
            record["episodes"] += 1
            record["last_step"] = step
        verdicts.append(verdict)

    def _message(
        self,
        layer: _Layer,
        name: str,
        kind: VerdictKind,
        step: int,
        value: float,
        other: str | None,
        reference: float,
    ) -> str:
        n = len(layer.history)
        over = f"median over {n} log step{'s' if n != 1 else ''}"
        if kind == "nonfinite":
            return f"Layer '{name}' has a non-finite gradient (L2 norm {value}) at step {step}."
        if kind == "dead":
            return (
                f"Layer '{name}' is dead: its gradient is exactly zero at step {step} (L2 norm 0, {over} "
                "also 0) although it has parameters that require grad."
            )
        if kind == "exploding":
            if value > self.exploding_ceiling:
                return (
                    f"Layer '{name}' has an exploding gradient: L2 norm {value:.3g} at step {step} is above "
                    f"exploding_ceiling={self.exploding_ceiling:g}."
                )
            if other is not None:  # the blow-up rule: `other` describes the loss, `reference` is the first norm
                return (
                    f"Layer '{name}' has an exploding gradient: L2 norm {value:.3g} at step {step} is "
                    f"{value / reference:.3g}x its first observed norm {reference:.3g} while the training loss "
                    f"is {other[len('loss x') :]}x its first value: the run is blowing up "
                    f"(blowup_growth={self.blowup_growth:g}, blowup_loss_ratio={self.blowup_loss_ratio:g})."
                )
            return (
                f"Layer '{name}' has an exploding gradient: L2 norm {value:.3g} at step {step} is "
                f"{value / reference:.3g}x the median {reference:.3g} of its previous log steps "
                f"(exploding_ratio={self.exploding_ratio:g})."
            )
        measure = (
            "per-element RMS gradient (L2 norm / sqrt(numel))"
            if layer.numel > 0
            else "L2 gradient norm (element count unknown, so layer size is not accounted for)"
        )
        reasons = []
        if value < self.vanishing_floor:
            reasons.append(f"below vanishing_floor={self.vanishing_floor:.3g}")
        if other is not None and other != name and value * self.vanishing_ratio < reference:
            reasons.append(
                f"{reference / value:.3g}x smaller than that of layer '{other}' ({reference:.3g}), "
                f"beyond vanishing_ratio={self.vanishing_ratio:.3g}"
            )
        return (
            f"Layer '{name}' has a vanishing gradient at step {step}: its {measure} is {value:.3g} "
            f"({over}), {' and '.join(reasons)}."
        )

    # ------------------------------------------------------------------ summary
    def summary(self) -> str:
        """End-of-fit summary: the layers with verdicts, episode counts and remedies.

        Returns:
            Several lines of text; ``""`` when nothing was observed.
        """
        if not self._observations:
            return ""
        flagged = [(name, layer) for name, layer in self._layers.items() if layer.records]
        if self._first_step == self._last_step:
            span = f"step {self._first_step}"
        else:
            span = f"steps {self._first_step}-{self._last_step}"
        head = (
            f"{plural(len(self._layers), 'layer')} over {plural(self._observations, 'log step')} ({span}): "
            f"{len(flagged)} with verdicts"
        )
        if not flagged:
            return f"{head}; no vanishing, exploding, dead or non-finite gradients."
        lines = [f"{head}."]
        kinds_seen: list[str] = []
        for name, layer in flagged:
            parts = []
            for kind in KINDS:
                rec = layer.records.get(kind)
                if rec is None:
                    continue
                if kind not in kinds_seen:
                    kinds_seen.append(kind)
                episodes = rec["episodes"]
                first, last = rec["first_step"], rec["last_step"]
                span = f"step {first}" if first == last else f"steps {first}-{last}"
                parts.append(f"{kind} ({plural(episodes, 'episode')}, {span})")
            lines.append(f"  {name}: {', '.join(parts)}")
        lines.append("Remedies:")
        for kind in KINDS:
            if kind in kinds_seen:
                lines.append(f"  {kind}: {REMEDIES[kind]}")
        return "\n".join(lines)

    def records(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per layer and kind: ``episodes``, ``first_step``, ``last_step``, first ``value`` and ``message``."""
        return {
            name: {kind: dict(rec) for kind, rec in layer.records.items()}
            for name, layer in self._layers.items()
            if layer.records
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The :class:`DiagnosticsState`, as primitives only (loads with ``torch.load(weights_only=True)``)."""
        layers = {
            name: LayerState(
                history=list(layer.history),
                first=layer.first,
                numel=layer.numel,
                active=dict(layer.active),
                records={kind: dict(rec) for kind, rec in layer.records.items()},
            )
            for name, layer in self._layers.items()
        }
        return asdict(
            DiagnosticsState(
                observations=self._observations,
                first_step=self._first_step,
                last_step=self._last_step,
                first_loss=self._first_loss,
                layers=layers,
            )
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; keys it lacks keep a fresh instance's values."""
        saved, _ = state_from_dict(DiagnosticsState(), state)
        self._observations = saved.observations
        self._first_step, self._last_step, self._first_loss = saved.first_step, saved.last_step, saved.first_loss
        self._layers = {}
        for name, layer_state in saved.layers.items():
            layer = _Layer(self.window)
            layer.history.extend(layer_state.history)
            layer.first, layer.numel = layer_state.first, layer_state.numel
            layer.active, layer.records = layer_state.active, layer_state.records
            self._layers[name] = layer


# ---------------------------------------------------------------------- update-to-weight ratio verdicts
#
# Pure functions over the log10 update-to-weight ratios of :mod:`lightning_gradguard.measure.updates`
# (``log10(||w_after - w_before|| / ||w_after||)`` per layer, at log steps). The caller keeps each
# layer's last few ratios and reports a verdict once per episode, as for the gradient verdicts.
#
# Bands (measured by ``benchmarks/update_ratio_bands.py``: the quickstart's MLP on the digits, 300
# steps, a ratio every 5 steps): healthy runs (Adam at LR 1e-3, SGD+momentum at LR 0.05) keep every
# layer's median between -2.6 and -1.8, single log steps between -3.0 and -1.4; at 30x the LR the
# medians of the first 30 steps are -1.3 to -0.9 with single steps up to -0.3 (SGD then diverges to 10%
# accuracy); a layer at LR 1e-7 sits at -6.0 while the others stay at -2.3. The widely used rule of
# thumb puts Adam-style training around -3 (larger models sit lower than this small MLP).
# Wired into GradGuard (median of the last 5 log steps at log_every_n_steps=10), healthy demo runs came
# closer: the quickstart's output layer reached a median of -1.53 between steps 20 and 60, the last layer
# of examples/vanishing.py's BatchNorm-ReLU net (SGD+momentum, LR 0.05) -1.38; the LR-too-high examples
# (lr_too_high.py / alerts.py at SGD LR 0.2, fabric_loop.py at LR 0.5) sit at -0.6 to -0.1. Hence -1.0.

UpdateVerdictKind = Literal["lr_too_high", "not_learning"]

UPDATE_RATIO_HIGH = -1.0
"""A layer whose median log10 update-to-weight ratio is above this moves too fast (each step changes
its weights by more than 10% of their norm)."""
UPDATE_RATIO_LOW = -5.0
"""A layer whose median log10 update-to-weight ratio is below this is not learning (each step changes its
weights by less than 1e-5 of their norm)."""
UPDATE_RATIO_GAP = 3.0
"""A layer whose median is this many decades below the median over all layers is not learning either."""
UPDATE_RATIO_MIN_OBSERVATIONS = 3

UPDATE_REMEDIES: dict[str, str] = {
    "lr_too_high": (
        "lower the learning rate (or this layer's param group LR), lengthen the warmup, or clip "
        "gradients; with Adam-style optimizers a log10 update-to-weight ratio around -3 is the usual target."
    ),
    "not_learning": (
        "check that the layer's param group LR is not tiny or zero, that it is in the optimizer at all, "
        "that weight decay does not dominate its update and that its gradient is not vanishing (see the "
        "gradient verdicts); if it is meant to be frozen, set requires_grad=False."
    ),
}


@dataclass(frozen=True)
class UpdateVerdict:
    """One diagnosis of one layer from its update-to-weight ratio.

    Attributes:
        layer: layer name.
        kind: ``"lr_too_high"`` or ``"not_learning"``.
        step: the step the verdict was made at.
        value: the median log10 update-to-weight ratio behind the verdict.
        message: plain-language description naming the layer, the measure and the band.
        remedy: what usually fixes it.
    """

    layer: str
    kind: UpdateVerdictKind
    step: int
    value: float
    message: str
    remedy: str


def _ratio_medians(ratios: Mapping[str, Sequence[float]], min_observations: int) -> dict[str, float]:
    out = {}
    for layer, values in ratios.items():
        usable = [v for v in values if not math.isnan(v) and v != math.inf]
        if len(usable) >= min_observations:
            out[layer] = statistics.median(usable)
    return out


def _fraction(log10_ratio: float) -> str:
    return "0" if log10_ratio == -math.inf else f"{10.0**log10_ratio:.2g}"


def lr_too_high_verdicts(
    step: int,
    ratios: Mapping[str, Sequence[float]],
    high: float = UPDATE_RATIO_HIGH,
    min_observations: int = UPDATE_RATIO_MIN_OBSERVATIONS,
) -> list[UpdateVerdict]:
    """ "LR too high for <layer>": layers whose median log10 update-to-weight ratio is above ``high``.

    Args:
        step: the current step (goes into the verdicts).
        ratios: layer -> its recent log10 update-to-weight ratios (oldest first; NaN ignored).
        high: upper edge of the usual band, see :data:`UPDATE_RATIO_HIGH`.
        min_observations: layers with fewer usable ratios get no verdict.

    Example:

        >>> [v.layer for v in lr_too_high_verdicts(10, {"a": [-1.0, -0.8, -1.2], "b": [-3.0, -2.9, -3.1]})]
        ['a']
    """
    verdicts = []
    for layer, median in _ratio_medians(ratios, min_observations).items():
        if median > high:
            n = len(ratios[layer])
            message = (
                f"LR too high for layer '{layer}' at step {step}: each optimizer step changes its weights by "
                f"{_fraction(median)} of their norm (median log10 update-to-weight ratio {median:+.2f} over "
                f"{n} log steps, above {high:+g}; about -3 is usual for Adam-style training)."
            )
            verdicts.append(UpdateVerdict(layer, "lr_too_high", step, median, message, UPDATE_REMEDIES["lr_too_high"]))
    return verdicts


def not_learning_verdicts(
    step: int,
    ratios: Mapping[str, Sequence[float]],
    low: float = UPDATE_RATIO_LOW,
    gap: float = UPDATE_RATIO_GAP,
    min_observations: int = UPDATE_RATIO_MIN_OBSERVATIONS,
) -> list[UpdateVerdict]:
    """ "<layer> is not learning": median log10 ratio below ``low``, or ``gap`` decades below the layers' median.

    A zero update (``-inf``) counts as the lowest possible ratio.

    Args:
        step: the current step (goes into the verdicts).
        ratios: layer -> its recent log10 update-to-weight ratios (oldest first; NaN ignored).
        low: absolute floor, see :data:`UPDATE_RATIO_LOW`.
        gap: decades below the median over all layers' medians, see :data:`UPDATE_RATIO_GAP`
            (needs at least two layers).
        min_observations: layers with fewer usable ratios get no verdict.

    Example:

        >>> ratios = {"a": [-2.5, -2.4, -2.6], "b": [-6.0, -5.9, -6.1], "c": [-2.2, -2.3, -2.1]}
        >>> [v.layer for v in not_learning_verdicts(10, ratios)]
        ['b']
    """
    medians = _ratio_medians(ratios, min_observations)
    overall = statistics.median(medians.values()) if len(medians) >= 2 else math.nan
    verdicts = []
    for layer, median in medians.items():
        reasons = []
        if median < low:
            reasons.append(f"below {low:+g}")
        if math.isfinite(overall) and median < overall - gap:
            reasons.append(f"more than {gap:g} decades below the median over all layers ({overall:+.2f})")
        if not reasons:
            continue
        n = len(ratios[layer])
        message = (
            f"Layer '{layer}' is not learning at step {step}: each optimizer step changes its weights by "
            f"{_fraction(median)} of their norm (median log10 update-to-weight ratio {median:+.2f} over {n} log "
            f"steps, {' and '.join(reasons)})."
        )
        verdicts.append(UpdateVerdict(layer, "not_learning", step, median, message, UPDATE_REMEDIES["not_learning"]))
    return verdicts


__all__ += [
    "UPDATE_RATIO_GAP",
    "UPDATE_RATIO_HIGH",
    "UPDATE_RATIO_LOW",
    "UPDATE_REMEDIES",
    "UpdateVerdict",
    "lr_too_high_verdicts",
    "not_learning_verdicts",
]
