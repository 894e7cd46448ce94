"""Clip-threshold policies: pure objects that turn a run's gradient-norm history into a clip threshold.

A policy sees the pre-clip global gradient norm of every finite optimizer step and answers the threshold for
the *next* step from history only, so the current step's own norm can never lift its own threshold. The
caller's protocol, once per optimizer step with a finite norm::

    thr = policy.threshold()          # None: do not clip this step
    if thr is not None and norm > thr:
        scale gradients by thr / (norm + 1e-6 * thr)
    policy.observe(norm)              # after the clip decision

Non-finite norms are ignored by ``observe`` (they never enter the history). Every policy keeps bounded
memory whatever the run length, costs a few Python float operations per step, and round-trips through
``state_dict`` / ``load_state_dict`` (primitives only, loadable with ``torch.load(weights_only=True)``).

This module imports neither torch nor Lightning.
"""

from __future__ import annotations

import abc
import bisect
import math
import statistics
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from lightning_gradguard._checks import CLIP_NAMES, check_int
from lightning_gradguard._checks import check_open_unit as _check_open_unit
from lightning_gradguard._checks import check_positive_real as _check_positive
from lightning_gradguard._checks import check_real as _check_real
from lightning_gradguard._state import state_from_dict

__all__ = [
    "POLICY_NAMES",
    "AutoPolicy",
    "FixedPolicy",
    "PercentilePolicy",
    "ThresholdPolicy",
    "ZScorePolicy",
    "make_policy",
]

POLICY_NAMES: tuple[str, ...] = CLIP_NAMES  # declared once, in _checks
_STATE_VERSION = 1


# -------------------------------------------------------------------------------------------------- state
@dataclass
class PercentileState:
    """:class:`PercentilePolicy`'s saved state: the recent norms and the steps observed (``None``: as many as the
    norms, in states that predate the count)."""

    history: list[float] = field(default_factory=list, metadata={"item": float})
    steps: int | None = None


@dataclass
class ZScoreState:
    """:class:`ZScorePolicy`'s saved state: the EMA mean and variance (``None`` while warming up), the warmup norms
    and the steps observed."""

    mean: float | None = None
    var: float | None = None
    warmup: list[float] = field(default_factory=list, metadata={"item": float})
    steps: int = 0


@dataclass
class AutoState:
    """:class:`AutoPolicy`'s saved state: the robust level, variance and slope (``None`` while warming up), the
    warmup norms, the steps observed, the ceiling, the recent norms that press it and the first norms that anchor
    it."""

    level: float | None = None
    var: float | None = None
    slope: float = 0.0
    warmup: list[float] = field(default_factory=list, metadata={"item": float})
    steps: int = 0
    ceiling: float | None = None
    recent: list[float] = field(default_factory=list, metadata={"item": float})
    anchor: list[float] = field(default_factory=list, metadata={"item": float})


# --------------------------------------------------------------------------------------------- validation
def _check_max_norm(value: Any) -> float | None:
    if value is None:
        return None
    return _check_positive("max_norm", value)


def _valid_norm(norm: float) -> bool:
    return math.isfinite(norm) and norm >= 0.0


# ------------------------------------------------------------------------------------------------- base
class ThresholdPolicy(abc.ABC):
    """Base class of clip-threshold policies.

    Subclasses set ``name`` and implement :meth:`threshold`, :meth:`center`, :meth:`observe` and the state
    helpers :meth:`_config`, :meth:`_state`, :meth:`_load_state`.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def threshold(self) -> float | None:
        """Threshold for the current step, computed from history only.

        Returns:
            The clip threshold, or ``None`` when this step must not be clipped (warmup without a
            ``max_norm`` cap). During warmup with ``max_norm`` set, ``max_norm``.
        """

    @abc.abstractmethod
    def center(self) -> float | None:
        """The policy's notion of the typical norm level now; ``None`` when unknown."""

    def threshold_is_prior(self) -> bool:
        """Whether the threshold in force is a prior (set, not learnt from this run's history of norms).

        The LR guard does not read a norm that presses such a threshold as a step size that is too large,
        unless the loss diverges too (see :meth:`lightning_gradguard.LRGuard.update`). ``False`` by default.
        """
        return False

    @abc.abstractmethod
    def observe(self, norm: float) -> None:
        """Record this step's pre-clip global norm, after the clip decision.

        Non-finite (and negative) norms are ignored and never enter the history.
        """

    @abc.abstractmethod
    def _config(self) -> dict[str, Any]:
        """Constructor arguments, as primitives."""

    @abc.abstractmethod
    def _state(self) -> dict[str, Any]:
        """Mutable state, as primitives."""

    @abc.abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore mutable state; keys may be missing (added later) and take their defaults."""

    def state_dict(self) -> dict[str, Any]:
        """Policy state: Python primitives only, including the configuration.

        Returns:
            A dict with ``name``, ``version``, ``config`` and the policy's own state keys.
        """
        return {"name": self.name, "version": _STATE_VERSION, "config": self._config(), **self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Missing keys take their defaults. A configuration that differs from this instance's is reported
        with a warning; this instance keeps its own configuration and continues from the loaded history.

        Raises:
            ValueError: if ``state`` was saved by a different policy type.
        """
        saved_name = state.get("name", self.name)
        if saved_name != self.name:
            raise ValueError(
                f"cannot load a `{saved_name}` policy state into a `{self.name}` policy; "
                f"pass clip={saved_name!r} to resume this checkpoint"
            )
        saved_config = state.get("config")
        if isinstance(saved_config, dict):
            own = self._config()
            diff = {k: (saved_config[k], v) for k, v in own.items() if k in saved_config and saved_config[k] != v}
            if diff:
                details = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in sorted(diff.items()))
                warnings.warn(
                    f"`{self.name}` clip policy configuration differs from the checkpoint ({details}); "
                    "keeping the current configuration and continuing from the saved history",
                    UserWarning,
                    stacklevel=2,
                )
        self._load_state(state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"


# ------------------------------------------------------------------------------------------------ fixed
class FixedPolicy(ThresholdPolicy):
    """Constant threshold, parity with ``torch.nn.utils.clip_grad_norm_(max_norm=...)``.

    Args:
        max_norm: the threshold, > 0.

    Raises:
        TypeError, ValueError: on an invalid ``max_norm``.

    Example:

        >>> FixedPolicy(1.0).threshold()
        1.0
    """

    name: ClassVar[str] = "fixed"

    def __init__(self, max_norm: float) -> None:
        self.max_norm = _check_positive("max_norm", max_norm)

    def threshold(self) -> float | None:
        return self.max_norm

    def center(self) -> float | None:
        return None

    def observe(self, norm: float) -> None:
        return None

    def _config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        return None


# ------------------------------------------------------------------------------------------- percentile
class PercentilePolicy(ThresholdPolicy):
    """AutoClip-style threshold: the ``percentile``-th percentile of the last ``window`` norms.

    The history is a ring buffer of raw pre-clip norms plus a sorted copy, so each step costs one
    ``bisect`` insertion and removal. Percentiles interpolate linearly between order statistics (numpy's
    default). On a stationary stream the clip rate is about ``1 - percentile / 100``.

    Args:
        percentile: percentile of the window used as threshold, in (0, 100].
        window: number of most recent norms kept, >= 1.
        warmup_steps: observed steps before the policy clips on its own, >= 1.
        max_norm: optional cap; the threshold never exceeds it, and it is the threshold during warmup.

    Raises:
        TypeError, ValueError: on an invalid argument.
    """

    name: ClassVar[str] = "percentile"

    def __init__(
        self,
        percentile: float = 95.0,
        window: int = 1000,
        warmup_steps: int = 25,
        max_norm: float | None = None,
    ) -> None:
        self.percentile = _check_real("percentile", percentile)
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"`percentile` must be in (0, 100], got {percentile!r}")
        self.window = check_int("window", window, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 1)
        self.max_norm = _check_max_norm(max_norm)
        self._history: deque[float] = deque(maxlen=self.window)
        self._sorted: list[float] = []
        self._steps = 0

    def _quantile(self, q: float) -> float:
        values = self._sorted
        pos = q * (len(values) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(values) - 1)
        frac = pos - lo
        return values[lo] + (values[hi] - values[lo]) * frac

    def threshold(self) -> float | None:
        if self._steps < self.warmup_steps or not self._sorted:
            return self.max_norm
        thr = self._quantile(self.percentile / 100.0)
        return thr if self.max_norm is None else min(thr, self.max_norm)

    def center(self) -> float | None:
        if not self._sorted:
            return None
        return self._quantile(0.5)

    def observe(self, norm: float) -> None:
        if not _valid_norm(norm):
            return
        value = float(norm)
        if len(self._history) == self.window:
            oldest = self._history[0]
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._history.append(value)
        bisect.insort(self._sorted, value)
        self._steps += 1

    def _config(self) -> dict[str, Any]:
        return {
            "percentile": self.percentile,
            "window": self.window,
            "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm,
        }

    def _state(self) -> dict[str, Any]:
        return asdict(PercentileState(history=list(self._history), steps=self._steps))

    def _load_state(self, state: dict[str, Any]) -> None:
        saved, _ = state_from_dict(PercentileState(), state)
        history = saved.history[-self.window :]
        self._history = deque(history, maxlen=self.window)
        self._sorted = sorted(history)
        self._steps = len(history) if saved.steps is None else saved.steps


# ----------------------------------------------------------------------------------------------- zscore
class ZScorePolicy(ThresholdPolicy):
    """ZClip-style threshold: EMA mean and variance of the norm, clip when the z-score exceeds ``z_thresh``.

    After ``warmup_steps`` observations the mean ``mu`` and (population) variance ``var`` of the warmup
    norms initialise the statistics. Then, each step::

        threshold = mu + z_thresh * sqrt(var)
        g = min(norm, threshold)                    # the clipped value feeds the EMA
        mu = alpha * mu + (1 - alpha) * g
        var = alpha * var + (1 - alpha) * (g - mu) ** 2

    On a stationary Gaussian stream the nominal clip rate is ``P(Z > z_thresh)`` (0.6 % at 2.5); feeding back
    clipped values and EMA noise make it about 1-2 % in practice, more on heavy-tailed streams.

    Args:
        alpha: EMA decay, in (0, 1).
        z_thresh: z-score above which a norm is clipped, > 0.
        warmup_steps: observed steps before the policy clips on its own, >= 1.
        max_norm: optional cap; the threshold never exceeds it, and it is the threshold during warmup.

    Raises:
        TypeError, ValueError: on an invalid argument.
    """

    name: ClassVar[str] = "zscore"

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float | None = None,
    ) -> None:
        self.alpha = _check_open_unit("alpha", alpha)
        self.z_thresh = _check_positive("z_thresh", z_thresh)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 1)
        self.max_norm = _check_max_norm(max_norm)
        self._warmup: list[float] = []
        self._mean: float | None = None
        self._var: float | None = None
        self._steps = 0

    def _raw_threshold(self) -> float | None:
        if self._mean is None or self._var is None:
            return None
        return self._mean + self.z_thresh * math.sqrt(self._var)

    def threshold(self) -> float | None:
        thr = self._raw_threshold()
        if thr is None:
            return self.max_norm
        return thr if self.max_norm is None else min(thr, self.max_norm)

    def center(self) -> float | None:
        return self._mean

    def observe(self, norm: float) -> None:
        if not _valid_norm(norm):
            return
        value = float(norm)
        self._steps += 1
        if self._mean is None or self._var is None:
            self._warmup.append(value)
            if len(self._warmup) >= self.warmup_steps:
                n = len(self._warmup)
                mean = sum(self._warmup) / n
                self._mean = mean
                self._var = sum((x - mean) ** 2 for x in self._warmup) / n
                self._warmup = []
            return
        thr = self._raw_threshold()  # the statistics ignore the max_norm cap
        if thr is not None and value > thr:
            value = thr
        a = self.alpha
        self._mean = a * self._mean + (1.0 - a) * value
        self._var = a * self._var + (1.0 - a) * (value - self._mean) ** 2

    def _config(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm,
        }

    def _state(self) -> dict[str, Any]:
        return asdict(ZScoreState(mean=self._mean, var=self._var, warmup=list(self._warmup), steps=self._steps))

    def _load_state(self, state: dict[str, Any]) -> None:
        saved, _ = state_from_dict(ZScoreState(), state)
        self._mean, self._var, self._warmup, self._steps = saved.mean, saved.var, saved.warmup, saved.steps


# ------------------------------------------------------------------------------------------------- auto
def _huber_consistency(c: float) -> float:
    """``E[clamp(Z, -c, c) ** 2]`` for a standard normal ``Z``: turns a winsorized variance into sigma**2."""
    pdf = math.exp(-0.5 * c * c) / math.sqrt(2.0 * math.pi)
    inside = math.erf(c / math.sqrt(2.0))
    return inside - 2.0 * c * pdf + c * c * (1.0 - inside)


class AutoPolicy(ThresholdPolicy):
    """The default: a ceiling set from the run's own first norms, under a robust, trend-following z-score of
    the log-norm. Every number it compares is a ratio of the run's norms, so a loss multiplied by ``k`` gives
    thresholds multiplied by ``k`` and the same decisions.

    The threshold is ``min(ceiling, adaptive, max_norm)``; any part may be absent (``None`` from all: no clip).

    **Ceiling** (protection from the second step). Over the first ``anchor_steps`` finite norms it is
    ``prior_ratio`` times their median so far; then it holds until ``hold_steps`` norms have been observed, so
    a run whose LR makes its norms grow fast is clipped at its own early level while no statistic of its
    norms can be trusted yet. From then on it moves with the norm level, by at most x2 per ``open_steps``
    steps: up while the median of the last 32 norms exceeds 0.7x the ceiling, down while that median is below
    0.35x it. So it never follows a norm that jumps, follows a decay as it follows a rise, and on a stationary
    stream stays between 1.43x and 2.86x the median norm however long the run. Step 0 is never clipped by it:
    nothing says yet what a large norm is for this run. ``prior_norm`` (with ``prior_ratio=None``) starts it at
    an absolute value instead, for users who know their units; ``prior_ratio=None`` and ``prior_norm=None``
    remove it (the adaptive part alone, which does not clip during its warmup).

    **Adaptive part.** Gradient norms are positive, multiplicative and heavy-tailed, so the statistics live in
    log space, where a 100x decay is a straight line and a lognormal stream is Gaussian. With ``l = log(norm)``:

    * level ``m``, slope ``s`` and variance ``v`` are EMAs; the forecast of the next log-norm is
      ``f = m + lag * s`` with ``lag = alpha / (1 - alpha)`` (the EMA's own lag, so a steady decay is
      followed without delay);
    * each step's residual is winsorized, ``e = clamp(l - f, -w, w)`` with ``w = min(1.5 * sigma, log
      max_ratio)``, so a spike moves the statistics no more than an ordinary 1.5-sigma step;
    * ``m += s + (1 - alpha) * e``; ``s`` is an EMA (decay ``(1 + alpha) / 2``) of the change of ``m``;
      ``v`` is an EMA (same decay) of ``e ** 2``, and ``sigma = max(sqrt(v / kappa), 0.05)`` where
      ``kappa`` makes the winsorized variance consistent for Gaussian log-norms;
    * ``adaptive = exp(f + clamp(z_thresh * sigma, log(min_ratio), log(max_ratio)))``, ``center = exp(f)``.

    The ``min_ratio`` floor (4x the typical norm) keeps ordinary steps of light-tailed streams unclipped
    when the norm level moves faster than the statistics can follow. Warmup uses the median and MAD of the
    first ``warmup_steps`` log-norms, so a spike during warmup does not poison the initial statistics. Norms
    of exactly 0 carry no information in log space and are ignored.

    Target clip rate of the adaptive part on a stationary lognormal stream of log-sd ``sigma``:
    ``P(Z > h / sigma)`` with ``h = clamp(z_thresh * sigma, log min_ratio, log max_ratio)``: practically 0
    below ``sigma`` 0.35 (the 4x floor), 0.8 % where ``z_thresh`` rules (``sigma`` 0.58-0.81), and
    ``P(norm > 7 x typical)`` (2.6 % at ``sigma`` 1) for heavy tails. Where the ceiling binds, the steps above
    1.43-2.86x the median norm are clipped too. See ``docs/policies.md`` for the outcomes behind every constant.

    Args:
        z_thresh: threshold in standard deviations of the log-norm, > 0.
        max_ratio: the adaptive threshold never exceeds ``max_ratio`` times the typical norm, > 1.
        min_ratio: the adaptive threshold is never below ``min_ratio`` times the typical norm, in
            [1, max_ratio].
        alpha: EMA decay of the level, in (0, 1); variance and slope use ``(1 + alpha) / 2``.
        warmup_steps: observed steps before the adaptive part clips, >= 1.
        max_norm: optional cap; the threshold never exceeds it.
        prior_norm: an absolute starting ceiling, > 0 (only with ``prior_ratio=None``), or ``None``.
        hold_steps: observed steps before the ceiling starts to move, >= 0.
        open_steps: steps per doubling (or halving) of the ceiling while it moves, >= 1.
        prior_ratio: the starting ceiling as a multiple of the median of the run's first norms, > 0, or
            ``None`` (then ``prior_norm`` decides).
        anchor_steps: how many first finite norms set the relative ceiling, >= 1.

    Raises:
        TypeError, ValueError: on an invalid argument.

    Example:

        >>> p = AutoPolicy()
        >>> p.threshold() is None  # step 0: nothing is known of this run's norms yet
        True
        >>> p.observe(3.0)
        >>> p.threshold()  # from the second step: 2x the first norm
        6.0
        >>> AutoPolicy(prior_norm=1.0, prior_ratio=None).threshold()  # an absolute ceiling, opt-in
        1.0
    """

    name: ClassVar[str] = "auto"

    _HUBER_C: ClassVar[float] = 1.5
    _MIN_SIGMA: ClassVar[float] = 0.05
    _MAD_TO_SIGMA: ClassVar[float] = 1.482602218505602
    _PRESS: ClassVar[float] = 0.7  # the ceiling opens while the median recent norm exceeds this share of it
    _CLOSE: ClassVar[float | None] = 0.35  # ... and closes while it is below this share (None: drift up instead)
    _PRESS_WINDOW: ClassVar[int] = 32
    _DRIFT_STEPS: ClassVar[int] = 1024  # steps per doubling of the ceiling while the norms do not press it

    def __init__(
        self,
        z_thresh: float = 2.4,
        max_ratio: float = 7.0,
        min_ratio: float = 4.0,
        alpha: float = 0.98,
        warmup_steps: int = 25,
        max_norm: float | None = None,
        prior_norm: float | None = None,
        hold_steps: int = 80,
        open_steps: int = 32,
        prior_ratio: float | None = 2.0,
        anchor_steps: int = 8,
    ) -> None:
        self.z_thresh = _check_positive("z_thresh", z_thresh)
        self.max_ratio = _check_real("max_ratio", max_ratio)
        if self.max_ratio <= 1.0:
            raise ValueError(f"`max_ratio` must be > 1, got {max_ratio!r}")
        self.alpha = _check_open_unit("alpha", alpha)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 1)
        self.max_norm = _check_max_norm(max_norm)
        self.min_ratio = _check_real("min_ratio", min_ratio)
        if not 1.0 <= self.min_ratio <= self.max_ratio:
            raise ValueError(f"`min_ratio` must be in [1, max_ratio={self.max_ratio!r}], got {min_ratio!r}")
        self.prior_norm = None if prior_norm is None else _check_positive("prior_norm", prior_norm)
        self.prior_ratio = None if prior_ratio is None else _check_positive("prior_ratio", prior_ratio)
        if self.prior_norm is not None and self.prior_ratio is not None:
            raise ValueError(
                f"`prior_norm` ({prior_norm!r}) and `prior_ratio` ({prior_ratio!r}) both set the starting ceiling;"
                " pass `prior_ratio=None` for an absolute ceiling, or `prior_norm=None` for one relative to the"
                " run's first norms"
            )
        self.anchor_steps = check_int("anchor_steps", anchor_steps, 1)
        self.hold_steps = check_int("hold_steps", hold_steps, 0)
        self.open_steps = check_int("open_steps", open_steps, 1)
        self._open = 2.0 ** (1.0 / self.open_steps)
        self._drift = 2.0 ** (1.0 / self._DRIFT_STEPS)
        self._ceiling = self.prior_norm  # with `prior_ratio`: None until the first norm anchors it
        self._recent: deque[float] = deque(maxlen=self._PRESS_WINDOW)
        self._anchor: list[float] = []  # the first norms, which set a relative ceiling
        self._log_ratio = math.log(self.max_ratio)
        self._log_min_ratio = math.log(self.min_ratio)
        self._slow = 0.5 * (1.0 + self.alpha)
        self._lag = self.alpha / (1.0 - self.alpha)
        self._kappa = _huber_consistency(self._HUBER_C)
        self._warmup: list[float] = []
        self._level: float | None = None
        self._var: float | None = None
        self._slope = 0.0
        self._steps = 0

    def _sigma(self, var: float) -> float:
        return max(math.sqrt(var / self._kappa), self._MIN_SIGMA)

    def _adaptive(self) -> float | None:
        if self._level is None or self._var is None:
            return None
        forecast = self._level + self._lag * self._slope
        headroom = min(max(self.z_thresh * self._sigma(self._var), self._log_min_ratio), self._log_ratio)
        return math.exp(forecast + headroom)

    def threshold(self) -> float | None:
        limits = [x for x in (self._adaptive(), self._ceiling, self.max_norm) if x is not None]
        return min(limits) if limits else None

    def center(self) -> float | None:
        if self._level is None:
            return None
        return math.exp(self._level + self._lag * self._slope)

    @property
    def _has_ceiling(self) -> bool:
        return self.prior_norm is not None or self.prior_ratio is not None

    def threshold_is_prior(self) -> bool:
        """True while the ceiling is the binding limit, not the adaptive part or ``max_norm``: the ceiling is
        set from a few early norms (or an absolute ``prior_norm``), not learnt from the run's history, and a
        healthy run whose norms grow presses it on most steps."""
        if self._ceiling is None:
            return False
        adaptive = self._adaptive()
        if self.max_norm is not None and self.max_norm <= self._ceiling:
            return False
        return adaptive is None or self._ceiling < adaptive

    def observe(self, norm: float) -> None:
        if not _valid_norm(norm) or norm == 0.0:
            return
        x = math.log(norm)
        self._steps += 1
        self._update_ceiling(float(norm))
        if self._level is None or self._var is None:
            self._warmup.append(x)
            if len(self._warmup) >= self.warmup_steps:
                med = statistics.median(self._warmup)
                mad = statistics.median(abs(y - med) for y in self._warmup) * self._MAD_TO_SIGMA
                self._level = med
                self._var = max(mad, self._MIN_SIGMA) ** 2 * self._kappa
                self._slope = 0.0
                self._warmup = []
            return
        sigma = self._sigma(self._var)
        w = min(self._HUBER_C * sigma, self._log_ratio)
        resid = x - (self._level + self._lag * self._slope)
        resid = min(max(resid, -w), w)
        new_level = self._level + self._slope + (1.0 - self.alpha) * resid
        self._slope = self._slow * self._slope + (1.0 - self._slow) * (new_level - self._level)
        self._level = new_level
        self._var = self._slow * self._var + (1.0 - self._slow) * resid * resid

    def _update_ceiling(self, norm: float) -> None:
        """Anchor (relative prior), hold, then open while the recent norms press the ceiling, else drift up."""
        if not self._has_ceiling:
            return
        self._recent.append(norm)
        if self.prior_ratio is not None and len(self._anchor) < self.anchor_steps:
            # The ceiling is `prior_ratio` x the median of the run's first norms (at most `anchor_steps`), so it
            # carries the run's own units: a loss x k gives thresholds x k and the same decisions.
            self._anchor.append(norm)
            self._ceiling = self.prior_ratio * statistics.median(self._anchor)
            return
        if self._ceiling is None or self._steps <= self.hold_steps:
            return
        level = statistics.median(self._recent)
        if level > self._PRESS * self._ceiling:
            self._ceiling *= self._open
        elif self._CLOSE is not None and level < self._CLOSE * self._ceiling:
            self._ceiling /= self._open
        elif self._CLOSE is None:
            self._ceiling *= self._drift

    def _config(self) -> dict[str, Any]:
        return {
            "z_thresh": self.z_thresh,
            "max_ratio": self.max_ratio,
            "min_ratio": self.min_ratio,
            "alpha": self.alpha,
            "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm,
            "prior_norm": self.prior_norm,
            "hold_steps": self.hold_steps,
            "open_steps": self.open_steps,
            "prior_ratio": self.prior_ratio,
            "anchor_steps": self.anchor_steps,
        }

    def _state(self) -> dict[str, Any]:
        return asdict(
            AutoState(
                level=self._level,
                var=self._var,
                slope=self._slope,
                warmup=list(self._warmup),
                steps=self._steps,
                ceiling=self._ceiling,
                recent=list(self._recent),
                anchor=list(self._anchor),
            )
        )

    def _load_state(self, state: dict[str, Any]) -> None:
        saved, _ = state_from_dict(AutoState(ceiling=self.prior_norm), state)
        self._level, self._var, self._slope = saved.level, saved.var, saved.slope
        self._warmup, self._steps = saved.warmup, saved.steps
        self._ceiling = saved.ceiling if self._has_ceiling else None
        self._recent = deque(saved.recent, maxlen=self._PRESS_WINDOW)
        self._anchor = saved.anchor if self.prior_ratio is not None else []
        if self.prior_ratio is not None and "anchor" not in state:
            # A state saved before the relative ceiling existed: a ceiling it holds stands (the anchor is complete);
            # without one, the next norms anchor it.
            if self._ceiling is not None and self._steps > 0:
                self._anchor = [self._ceiling / self.prior_ratio] * self.anchor_steps
            else:
                self._ceiling = None


# ------------------------------------------------------------------------------------------------ factory
def make_policy(clip: str | ThresholdPolicy | None, max_norm: float | None = None) -> ThresholdPolicy | None:
    """Build the policy named by ``clip``.

    Args:
        clip: ``"auto"``, ``"fixed"``, ``"percentile"``, ``"zscore"``, a :class:`ThresholdPolicy` instance
            (returned as is), or ``None`` (monitor only: no clipping, returns ``None``).
        max_norm: the threshold of ``"fixed"`` (required there); a cap on the adaptive policies.

    Returns:
        The policy, or ``None`` for monitor only.

    Raises:
        ValueError: on an unknown name, ``"fixed"`` without ``max_norm``, ``max_norm`` together with
            ``clip=None`` or with a policy instance, or an invalid ``max_norm``.
        TypeError: if ``clip`` is of another type.

    Example:

        >>> make_policy("fixed", max_norm=1.0)
        FixedPolicy(max_norm=1.0)
        >>> make_policy(None) is None
        True
    """
    if clip is None:
        if max_norm is not None:
            raise ValueError(
                f"`max_norm` ({max_norm!r}) has no effect with `clip=None` (monitor only); "
                f"use clip='fixed' for a constant threshold or one of {', '.join(POLICY_NAMES)} with a cap"
            )
        return None
    if isinstance(clip, ThresholdPolicy):
        if max_norm is not None:
            raise ValueError(
                f"`max_norm` ({max_norm!r}) cannot be combined with a policy instance ({clip!r}); "
                "pass max_norm to the policy's constructor instead"
            )
        return clip
    if not isinstance(clip, str):
        raise TypeError(
            f"`clip` must be one of {', '.join(POLICY_NAMES)}, a ThresholdPolicy or None, "
            f"got {clip!r} ({type(clip).__name__})"
        )
    if clip == "fixed":
        if max_norm is None:
            raise ValueError("`clip='fixed'` requires `max_norm` (the constant threshold, > 0), got None")
        return FixedPolicy(max_norm)
    if clip == "auto":
        return AutoPolicy(max_norm=max_norm)
    if clip == "percentile":
        return PercentilePolicy(max_norm=max_norm)
    if clip == "zscore":
        return ZScorePolicy(max_norm=max_norm)
    raise ValueError(f"`clip` must be one of {', '.join(POLICY_NAMES)} or None, got {clip!r}")
