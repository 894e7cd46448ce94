"""The options of every front-end, declared once: each one's name, type, default and check.

:class:`~lightning_gradguard.GradGuard` (and :class:`~lightning_gradguard.GradMonitor`,
:class:`~lightning_gradguard.GradClip`), :class:`~lightning_gradguard.Guard` and
:class:`~lightning_gradguard.FabricGuard` take the options of :class:`GuardOptions`. GradGuard and Guard spell
them out as keyword parameters, so that IDEs and ``LightningCLI`` see a typed signature; the test suite checks
that those signatures have the names, defaults and annotations declared here, and each front-end passes them on
with :meth:`GuardOptions.from_arguments` (nothing is copied onto the front-end).

Also the factory of what the options configure: one :class:`~lightning_gradguard.decide.engine.Engine`
per optimizer (:meth:`GuardOptions.engine`) and the :class:`~lightning_gradguard.recovery.rollback.Recovery`
(:meth:`GuardOptions.recovery`).
"""

from __future__ import annotations

import copy
import functools
import os
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Annotated, Any

from lightning_gradguard._checks import (
    CLIP_NAMES,
    ON_NONFINITE,
    ClipName,
    OnNonFinite,
    check_bool,
    check_choice,
    check_finite_positive,
    check_flag_or,
    check_hook,
    check_int,
    python_scalar,
)
from lightning_gradguard.decide.diagnostics import GradientDiagnostics
from lightning_gradguard.decide.engine import Engine
from lightning_gradguard.decide.lr_guard import LRGuard
from lightning_gradguard.decide.policies import ThresholdPolicy, make_policy
from lightning_gradguard.events import OnEvent
from lightning_gradguard.forensics.skiplist import SkipList
from lightning_gradguard.forensics.tracker import Forensics
from lightning_gradguard.measure.stats import GradStats, GroupBy
from lightning_gradguard.measure.updates import UpdateTracker
from lightning_gradguard.recovery.rollback import SNAPSHOT_EVERY_N_STEPS, Recovery, RollbackTrigger

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["DEFAULT_LOG_EVERY_N_STEPS", "Checked", "GuardOptions", "option_names", "update_tracker"]

#: Log cadence, in optimizer steps, when neither the option nor the Trainer gives one.
DEFAULT_LOG_EVERY_N_STEPS = 50

BatchIds = Callable[[Any], Sequence[Any]]
"""``batch -> sequence`` of the batch's sample identifiers (e.g. dataset indices), read at incidents only."""

Check = Callable[[str, Any], Any]
"""An option's check: ``check(name, value)`` returns the value to keep (numpy scalars as Python ones) or raises."""


@dataclass(frozen=True)
class Checked:
    """What the annotation of a declared option carries besides its type: its check.

    ``changes_training`` marks the options that change training (clipping, skipping, the LR guard, recovery),
    which :class:`~lightning_gradguard.GradMonitor` refuses.
    """

    check: Check
    changes_training: bool = False


def _int_at_least(minimum: int, optional: bool = False) -> Check:
    def check(name: str, value: Any) -> Any:
        return None if optional and value is None else check_int(name, value, minimum)

    return check


def _flag(name: str, value: Any) -> bool:
    return check_bool(name, value)


def _flag_or(kind: type, kind_name: str) -> Check:
    def check(name: str, value: Any) -> Any:
        check_flag_or(name, value, kind, kind_name)
        return python_scalar(value)

    return check


def _choice(choices: tuple[str, ...]) -> Check:
    def check(name: str, value: Any) -> Any:
        check_choice(name, value, choices)
        return value

    return check


def _clip(name: str, value: Any) -> Any:
    if value is not None and not isinstance(value, ThresholdPolicy):
        check_choice(name, value, CLIP_NAMES, ", a ThresholdPolicy or None")
    return value


def _max_norm(name: str, value: Any) -> Any:
    check_finite_positive(name, value, allow_none=True)
    return python_scalar(value)


def _group_by(name: str, value: Any) -> Any:
    plain = python_scalar(value)
    if isinstance(plain, int) and not isinstance(plain, bool):
        return check_int(name, value, 1)
    if callable(plain) or (isinstance(plain, str) and plain in ("module", "param")):
        return plain
    allowed = f"`{name}` must be 'module', 'param', an int depth >= 1 or a callable"
    if isinstance(value, str):
        raise ValueError(f"{allowed}, got {value!r}")
    raise TypeError(f"{allowed}, got {value!r} ({type(value).__name__})")


def _batch_ids(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be a callable batch -> sequence of sample ids, or None, got {value!r}")
    return value


def _skip_list(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be the path of a skip list (skip_list.json) or None, got {value!r}")
    if not os.path.isfile(value):
        raise ValueError(
            f"`{name}` must be the path of an existing file (the skip_list.json an earlier run wrote beside its "
            f"logs), got {value!r}"
        )
    return value


def _hook(name: str, value: Any) -> Any:
    check_hook(name, value)
    return value


@dataclass(frozen=True)
class GuardOptions:
    """The options of a guard, checked (see :class:`~lightning_gradguard.GradGuard` for their meaning).

    Each field declares an option once: its type and its check (``Annotated[type, Checked(check)]``), and its
    default. ``__post_init__`` runs the checks: a value of the wrong type raises ``TypeError``, a value out of
    range ``ValueError``, each message naming the option, what it takes and what it got. Numpy scalars and 0-d
    tensors are kept as the Python numbers they hold.

    Example:

        >>> GuardOptions(max_norm=5).max_norm
        5
        >>> GuardOptions(histogram_bins=0)
        Traceback (most recent call last):
        ...
        ValueError: `histogram_bins` must be an int >= 1, got 0
    """

    clip: Annotated[ClipName | ThresholdPolicy | None, Checked(_clip, changes_training=True)] = "auto"
    max_norm: Annotated[float | None, Checked(_max_norm, changes_training=True)] = None
    on_nonfinite: Annotated[OnNonFinite, Checked(_choice(ON_NONFINITE), changes_training=True)] = "skip"
    max_consecutive_skips: Annotated[int, Checked(_int_at_least(1), changes_training=True)] = 25
    lr_guard: Annotated[bool | LRGuard, Checked(_flag_or(LRGuard, "an LRGuard"), changes_training=True)] = True
    group_by: Annotated[GroupBy, Checked(_group_by)] = "module"
    log_every_n_steps: Annotated[int | None, Checked(_int_at_least(1, optional=True))] = None
    log_layer_norms: Annotated[bool, Checked(_flag)] = True
    histogram_every_n_steps: Annotated[int, Checked(_int_at_least(0))] = 100
    histogram_bins: Annotated[int, Checked(_int_at_least(1))] = 64
    diagnostics: Annotated[
        bool | GradientDiagnostics, Checked(_flag_or(GradientDiagnostics, "a GradientDiagnostics"))
    ] = True
    heatmap_every_n_steps: Annotated[int, Checked(_int_at_least(0))] = 1000
    log_update_ratios: Annotated[bool, Checked(_flag)] = True
    on_event: Annotated[OnEvent | None, Checked(_hook)] = None
    rollback: Annotated[
        bool | RollbackTrigger, Checked(_flag_or(RollbackTrigger, "a RollbackTrigger"), changes_training=True)
    ] = True
    snapshot_every_n_steps: Annotated[int, Checked(_int_at_least(1))] = SNAPSHOT_EVERY_N_STEPS
    diagnose_every_n_steps: Annotated[int, Checked(_int_at_least(1))] = 50
    incidents: Annotated[bool, Checked(_flag)] = True
    replay: Annotated[bool, Checked(_flag)] = False
    batch_ids: Annotated[BatchIds | None, Checked(_batch_ids)] = None
    skip_list: Annotated[str | os.PathLike[str] | None, Checked(_skip_list, changes_training=True)] = None

    def __post_init__(self) -> None:
        for name, checked in _declared().items():
            object.__setattr__(self, name, checked.check(name, getattr(self, name)))
        make_policy(self.clip, self.max_norm)  # a throwaway, so that policy-level errors ("fixed" needs max_norm) show
        if self.clip is None and isinstance(self.lr_guard, LRGuard):
            raise ValueError("`lr_guard` needs clipping: pass `clip` (e.g. 'auto') or `lr_guard=False`")

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> GuardOptions:
        """The options among a front-end's arguments (its ``locals()``), checked; the other names are ignored."""
        return cls(**{name: arguments[name] for name in option_names() if name in arguments})

    # ------------------------------------------------------------------ what the options resolve to
    def log_every(self, fallback: int | None = None) -> int:
        """The log cadence: ``log_every_n_steps``, else ``fallback`` (the Trainer's), else 50."""
        return self.log_every_n_steps or fallback or DEFAULT_LOG_EVERY_N_STEPS

    @property
    def lr_guard_template(self) -> LRGuard | None:
        """The LR guard each engine copies; ``None`` when it is off (``lr_guard=False`` or ``clip=None``)."""
        if self.clip is None or self.lr_guard is False:
            return None
        return LRGuard() if self.lr_guard is True else self.lr_guard

    @property
    def diagnostics_template(self) -> GradientDiagnostics | None:
        """The diagnostics each engine copies; ``None`` when they are off."""
        if self.diagnostics is False:
            return None
        return GradientDiagnostics() if self.diagnostics is True else self.diagnostics

    @property
    def rollback_template(self) -> RollbackTrigger | None:
        """The rollback trigger recovery copies; ``None`` when recovery is off.

        ``True`` builds on the LR guard (a rollback lowers the LR through it): without clipping or without the
        LR guard it means off; a RollbackTrigger passed explicitly is honoured (rollbacks without an LR cut).
        """
        if isinstance(self.rollback, RollbackTrigger):
            return self.rollback
        return RollbackTrigger() if self.rollback and self.lr_guard_template is not None else None

    # ------------------------------------------------------------------ the parts the options build
    def recovery(self) -> Recovery | None:
        """A fresh :class:`~lightning_gradguard.recovery.rollback.Recovery` (``None`` when ``rollback`` is off)."""
        trigger = self.rollback_template
        if trigger is None:
            return None
        return Recovery(copy.deepcopy(trigger), self.snapshot_every_n_steps)

    def forensics(self) -> Forensics | None:
        """A fresh :class:`~lightning_gradguard.forensics.tracker.Forensics` (``None`` with ``incidents=False``)."""
        if not self.incidents:
            return None
        entries = SkipList(self.skip_list).entries if self.skip_list is not None else ()
        return Forensics(replay=self.replay, batch_ids=self.batch_ids, skip_entries=entries)

    def engine(self, index: int, named_parameters: Iterable[tuple[str, Tensor]], monitor_only: bool) -> Engine:
        """A fresh :class:`~lightning_gradguard.decide.engine.Engine` for one optimizer's parameters."""
        policy = None if monitor_only else make_policy(copy.deepcopy(self.clip), self.max_norm)
        stats = GradStats(named_parameters, self.group_by)
        lr_guard = None if monitor_only or policy is None else copy.deepcopy(self.lr_guard_template)
        stall = lr_guard is not None and lr_guard.stall_update_ratio is not None
        return Engine(
            index=index,
            stats=stats,
            policy=policy,
            lr_guard=lr_guard,
            diagnostics=copy.deepcopy(self.diagnostics_template),
            on_nonfinite=self.on_nonfinite,
            max_consecutive_skips=self.max_consecutive_skips,
            monitor_only=monitor_only,
            updates=update_tracker(stats) if (self.log_update_ratios or stall) and not monitor_only else None,
            log_updates=self.log_update_ratios,
        )


@functools.cache
def _declared() -> dict[str, Checked]:
    """Each option's :class:`Checked`, from the annotations of :class:`GuardOptions`, in declaration order."""
    hints = typing.get_type_hints(GuardOptions, include_extras=True)
    return {
        option.name: next(extra for extra in hints[option.name].__metadata__ if isinstance(extra, Checked))
        for option in fields(GuardOptions)
    }


def option_names(changes_training: bool | None = None) -> tuple[str, ...]:
    """The names of the options, in the order of the front-ends' signatures.

    With ``changes_training``, only the options that change training (``True``) or only the others (``False``).
    """
    declared = _declared()
    return tuple(n for n, c in declared.items() if changes_training is None or c.changes_training == changes_training)


def update_tracker(stats: GradStats) -> UpdateTracker:
    """The :class:`~lightning_gradguard.measure.updates.UpdateTracker` of a guard, its buffer policy chosen by device.

    On CPU the copy buffers are kept between log steps: a fresh copy per log step costs 2.3-3.8x a plain
    AdamW step there (page faults of the new allocation dominate; ``benchmarks/bench_updates.py``, 90M
    parameters), 2.5-5.7% of the run at ``log_every_n_steps=50``, against 1.0-1.2x (at most 0.4%) with kept
    buffers, for one resident copy of the weights in host memory. On accelerators the caching allocator
    serves a fresh copy from its pool without faults, and the memory goes back to the pool (activations)
    between log steps, so no copy is kept resident there.
    """
    return UpdateTracker(stats, keep_buffers=stats.device.type == "cpu")
