"""Argument checks shared by every public constructor: messages name the argument, the range and the value.

Also the options every front-end (the Lightning callback, :class:`~lightning_gradguard.Guard`, the Fabric
adapter) takes, validated once in :func:`guard_options`, and the engines built from them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from torch import Tensor

    from lightning_gradguard.decide.diagnostics import GradientDiagnostics
    from lightning_gradguard.decide.engine import GuardEngine
    from lightning_gradguard.decide.lr_guard import LRGuard
    from lightning_gradguard.decide.policies import ThresholdPolicy
    from lightning_gradguard.measure.stats import GradStats, GroupBy
    from lightning_gradguard.recovery.rollback import Recovery, RollbackTrigger

ClipName = Literal["auto", "fixed", "percentile", "zscore"]
OnNonFinite = Literal["skip", "raise", "warn"]
#: The clip policies known by name (declared once, from :data:`ClipName`).
CLIP_NAMES: tuple[str, ...] = get_args(ClipName)
ON_NONFINITE: tuple[str, ...] = get_args(OnNonFinite)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a Python int or float after :func:`python_scalar` (a bool is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, int | float)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int ``>= minimum``; ``TypeError`` for a non-int (bools included), else ``ValueError``.

    Numpy integers and 0-d integer tensors are accepted (:func:`python_scalar`); numpy bools are bools.

    Example:

        >>> import numpy as np
        >>> check_int("window", np.int64(5), 1)
        5
    """
    plain = python_scalar(value)
    if isinstance(plain, bool) or not isinstance(plain, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if plain < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return plain


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool: ``True``, ``False`` or a numpy bool; ``TypeError`` for anything else (``0``, ``1``).

    Example:

        >>> import numpy as np
        >>> check_bool("log_update_ratios", np.bool_(False))
        False
    """
    plain = python_scalar(value)
    if not isinstance(plain, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__})")
    return plain


def check_real(name: str, value: Any) -> float:
    """``value`` as a finite float (``TypeError`` for a non-number, bools included)."""
    plain = python_scalar(value)
    if not is_number(plain):
        raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__})")
    out = float(plain)
    if not math.isfinite(out):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    return out


def check_positive_real(name: str, value: Any) -> float:
    """``value`` as a finite float ``> 0``."""
    out = check_real(name, value)
    if out <= 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}")
    return out


def check_open_unit(name: str, value: Any) -> float:
    """``value`` as a float in ``(0, 1)``."""
    out = check_real(name, value)
    if not 0.0 < out < 1.0:
        raise ValueError(f"`{name}` must be in (0, 1), got {value!r}")
    return out


def check_float(name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    """``value`` as a float in the interval ``lo..hi`` (open or closed at each end; ``inf`` only for ``[.., inf]``)."""
    plain = python_scalar(value)
    if not is_number(plain):
        raise TypeError(f"`{name}` must be a float, got {value!r} ({type(value).__name__})")
    v = float(plain)
    ok = math.isfinite(v) or (v == math.inf and hi == math.inf and not hi_open)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"`{name}` must be in {rng}, got {value!r}")
    return v


def check_number(name: str, value: float, minimum: float, inclusive: bool, allowed: str) -> float:
    """``value`` as a float ``>= minimum`` (``inclusive``) or ``> minimum``; ``allowed`` words the range."""
    plain = python_scalar(value)
    if not is_number(plain):
        raise TypeError(f"`{name}` must be a number {allowed}, got {value!r}")
    out = float(plain)
    ok = out >= minimum if inclusive else out > minimum
    if math.isnan(out) or not ok:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return out


def check_choice(name: str, value: Any, choices: Iterable[str], extra: str = "") -> None:
    """``ValueError`` unless ``value`` is one of ``choices`` ("`name` must be one of a, b{extra}, got v")."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(choices)}{extra}, got {value!r}")


def check_hook(name: str, value: Any) -> None:
    """``TypeError`` unless ``value`` is ``None`` or callable."""
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be a callable taking one GuardEvent, or None, got {value!r}")


def check_finite_positive(name: str, value: Any, allow_none: bool = False) -> None:
    """``ValueError`` unless ``value`` is a finite number > 0 (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    plain = python_scalar(value)
    if not is_number(plain) or not 0 < plain < math.inf:
        raise ValueError(f"`{name}` must be a finite number > 0{' or None' if allow_none else ''}, got {value!r}")


def python_scalar(value: Any) -> Any:
    """A numpy scalar or a 0-d tensor as the Python ``bool`` / ``int`` / ``float`` it holds; anything else as is.

    Arguments are stored in the checkpoint's state, which must load with ``torch.load(weights_only=True)``:
    ``np.float64(5.0)`` or ``torch.tensor(5.0)`` would not.

    Example:

        >>> import numpy as np
        >>> python_scalar(np.float64(5.0)), python_scalar(np.int64(3)), python_scalar("auto")
        (5.0, 3, 'auto')
    """
    if type(value) in (bool, int, float) or value is None or isinstance(value, str):
        return value
    module = type(value).__module__
    is_numpy = module == "numpy" and getattr(value, "shape", None) == ()
    is_tensor = module.startswith("torch") and hasattr(value, "dim") and value.dim() == 0 and not value.is_complex()
    if is_numpy or is_tensor:
        out = value.item()
        if isinstance(out, bool | int | float):
            return out
    return value


@dataclass(frozen=True)
class GuardOptions:
    """The validated options of a guard (see :class:`~lightning_gradguard.GradGuard` for their meaning)."""

    clip: Any
    max_norm: float | None
    on_nonfinite: OnNonFinite
    max_consecutive_skips: int
    lr_guard: LRGuard | None  # template, copied per optimizer; None when disabled
    group_by: Any
    log_every_n_steps: int | None
    log_layer_norms: bool
    histogram_every_n_steps: int
    histogram_bins: int
    diagnostics: GradientDiagnostics | None  # template, copied per optimizer
    heatmap_every_n_steps: int
    log_update_ratios: bool = True
    rollback: RollbackTrigger | None = None  # template, copied per front-end; None when recovery is off
    snapshot_every_n_steps: int = 100
    diagnose_every_n_steps: int = 50

    def recovery(self) -> Recovery | None:
        """A fresh :class:`~lightning_gradguard.recovery.rollback.Recovery` (``None`` when ``rollback`` is off)."""
        from lightning_gradguard.recovery.rollback import Recovery

        if self.rollback is None:
            return None
        return Recovery(copy.deepcopy(self.rollback), self.snapshot_every_n_steps)

    def engine(self, index: int, named_parameters: Iterable[tuple[str, Tensor]], monitor_only: bool) -> GuardEngine:
        """A fresh :class:`~lightning_gradguard.decide.engine.GuardEngine` for one optimizer's parameters."""
        from lightning_gradguard.decide.engine import GuardEngine
        from lightning_gradguard.decide.policies import make_policy
        from lightning_gradguard.measure.stats import GradStats

        policy = None if monitor_only else make_policy(copy.deepcopy(self.clip), self.max_norm)
        stats = GradStats(named_parameters, self.group_by)
        lr_guard = None if monitor_only or policy is None else copy.deepcopy(self.lr_guard)
        stall = lr_guard is not None and lr_guard.stall_update_ratio is not None
        return GuardEngine(
            index=index,
            stats=stats,
            policy=policy,
            lr_guard=lr_guard,
            diagnostics=copy.deepcopy(self.diagnostics),
            on_nonfinite=self.on_nonfinite,
            max_consecutive_skips=self.max_consecutive_skips,
            monitor_only=monitor_only,
            updates=update_tracker(stats) if (self.log_update_ratios or stall) and not monitor_only else None,
            log_updates=self.log_update_ratios,
        )


def update_tracker(stats: GradStats) -> Any:
    """The :class:`~lightning_gradguard.measure.updates.UpdateTracker` of a guard, its buffer policy chosen by device.

    On CPU the copy buffers are kept between log steps: a fresh copy per log step costs 2.3-3.8x a plain
    AdamW step there (page faults of the new allocation dominate; ``benchmarks/bench_updates.py``, 90M
    parameters), 2.5-5.7% of the run at ``log_every_n_steps=50``, against 1.0-1.2x (at most 0.4%) with kept
    buffers, for one resident copy of the weights in host memory. On accelerators the caching allocator
    serves a fresh copy from its pool without faults, and the memory goes back to the pool (activations)
    between log steps, so no copy is kept resident there.
    """
    from lightning_gradguard.measure.updates import UpdateTracker

    return UpdateTracker(stats, keep_buffers=stats.device.type == "cpu")


def guard_options(
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
    rollback: bool | RollbackTrigger = True,
    snapshot_every_n_steps: int = 100,
    diagnose_every_n_steps: int = 50,
) -> GuardOptions:
    """Check every option (messages name the argument, the allowed values and the value) and bundle them.

    Numeric options given as numpy scalars or 0-d tensors are stored as Python numbers (:func:`python_scalar`).
    """
    from lightning_gradguard.decide.diagnostics import GradientDiagnostics
    from lightning_gradguard.decide.lr_guard import LRGuard

    max_norm, max_consecutive_skips = python_scalar(max_norm), python_scalar(max_consecutive_skips)
    log_every_n_steps, log_layer_norms = python_scalar(log_every_n_steps), python_scalar(log_layer_norms)
    histogram_every_n_steps, histogram_bins = python_scalar(histogram_every_n_steps), python_scalar(histogram_bins)
    heatmap_every_n_steps, group_by = python_scalar(heatmap_every_n_steps), python_scalar(group_by)
    log_update_ratios, snapshot_every_n_steps = python_scalar(log_update_ratios), python_scalar(snapshot_every_n_steps)
    _check_protection(clip, max_norm, on_nonfinite, max_consecutive_skips, lr_guard)
    _check_outputs(
        group_by,
        log_layer_norms,
        log_every_n_steps,
        histogram_every_n_steps,
        histogram_bins,
        heatmap_every_n_steps,
        log_update_ratios,
        diagnostics,
    )
    if clip is None and isinstance(lr_guard, LRGuard):
        raise ValueError("`lr_guard` needs clipping: pass `clip` (e.g. 'auto') or `lr_guard=False`")
    template = None if clip is None or lr_guard is False else (LRGuard() if lr_guard is True else lr_guard)
    from lightning_gradguard.recovery.rollback import RollbackTrigger

    if not isinstance(rollback, bool | RollbackTrigger):
        raise ValueError(f"`rollback` must be True, False or a RollbackTrigger instance, got {rollback!r}")
    check_int("snapshot_every_n_steps", snapshot_every_n_steps, 1)
    diagnose_every_n_steps = python_scalar(diagnose_every_n_steps)
    check_int("diagnose_every_n_steps", diagnose_every_n_steps, 1)
    return GuardOptions(
        clip=clip,
        max_norm=max_norm,
        on_nonfinite=on_nonfinite,
        max_consecutive_skips=max_consecutive_skips,
        lr_guard=template,
        group_by=group_by,
        log_every_n_steps=log_every_n_steps,
        log_layer_norms=log_layer_norms,
        histogram_every_n_steps=histogram_every_n_steps,
        histogram_bins=histogram_bins,
        diagnostics=GradientDiagnostics() if diagnostics is True else diagnostics or None,
        heatmap_every_n_steps=heatmap_every_n_steps,
        log_update_ratios=log_update_ratios,
        # `True` builds on the LR guard (a rollback lowers the LR through it): without clipping or without the
        # LR guard it means off; a RollbackTrigger passed explicitly is honoured (rollbacks without an LR cut).
        rollback=rollback
        if isinstance(rollback, RollbackTrigger)
        else (RollbackTrigger() if rollback and template else None),
        snapshot_every_n_steps=snapshot_every_n_steps,
        diagnose_every_n_steps=diagnose_every_n_steps,
    )


def _check_protection(clip: Any, max_norm: Any, on_nonfinite: Any, max_consecutive_skips: Any, lr_guard: Any) -> None:
    """:func:`guard_options`' checks of what changes training: clipping, non-finite steps, the LR guard."""
    from lightning_gradguard.decide.lr_guard import LRGuard
    from lightning_gradguard.decide.policies import ThresholdPolicy, make_policy

    if clip is not None and not isinstance(clip, ThresholdPolicy):
        check_choice("clip", clip, CLIP_NAMES, ", a ThresholdPolicy or None")
    check_finite_positive("max_norm", max_norm, allow_none=True)
    make_policy(clip, max_norm)  # a throwaway policy, so that policy-level errors (e.g. "fixed" without max_norm) show
    check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    check_int("max_consecutive_skips", max_consecutive_skips, 1)
    if not isinstance(lr_guard, bool | LRGuard):
        raise ValueError(f"`lr_guard` must be True, False or an LRGuard instance, got {lr_guard!r}")


def _check_outputs(
    group_by: Any,
    log_layer_norms: Any,
    log_every_n_steps: Any,
    histogram_every_n_steps: Any,
    histogram_bins: Any,
    heatmap_every_n_steps: Any,
    log_update_ratios: Any,
    diagnostics: Any,
) -> None:
    """:func:`guard_options`' checks of what is measured and reported: layers, cadences, diagnostics."""
    from lightning_gradguard.decide.diagnostics import GradientDiagnostics

    if isinstance(group_by, bool) or not (
        callable(group_by) or group_by in ("module", "param") or isinstance(group_by, int)
    ):
        raise ValueError(f"`group_by` must be 'module', 'param', an int depth >= 1 or a callable, got {group_by!r}")
    if isinstance(group_by, int):
        check_int("group_by", group_by, 1)
    if not isinstance(log_layer_norms, bool):
        raise ValueError(f"`log_layer_norms` must be True or False, got {log_layer_norms!r}")
    if log_every_n_steps is not None:
        check_int("log_every_n_steps", log_every_n_steps, 1)
    check_int("histogram_every_n_steps", histogram_every_n_steps, 0)
    check_int("histogram_bins", histogram_bins, 1)
    check_int("heatmap_every_n_steps", heatmap_every_n_steps, 0)
    check_bool("log_update_ratios", log_update_ratios)
    if not isinstance(diagnostics, bool | GradientDiagnostics):
        raise ValueError(f"`diagnostics` must be True, False or a GradientDiagnostics instance, got {diagnostics!r}")
