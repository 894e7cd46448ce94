"""The callback's checkpoint state: saving, loading, adopting a state saved under another key, and the messages.

The per-optimizer state is each engine's own (:meth:`~lightning_gradguard.decide.engine.Engine.state_dict`);
this module keeps what the callback adds around it: state loaded before its optimizer exists, the state frozen
at the end of a fit, the saved configuration (for messages only) and the keys of state version 2.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_gradguard.decide.engine import STATE_VERSION, Engine
from lightning_gradguard.decide.policies import ThresholdPolicy
from lightning_gradguard.events import GuardEvent
from lightning_gradguard.options import GuardOptions
from lightning_gradguard.outputs.sink import Reporter
from lightning_gradguard.recovery.rollback import Recovery

#: ``say(kind, message)``: reports a message about the saved state.
Say = Callable[[str, str], None]


def describe(value: Any) -> str:
    """Short stable description of an argument, for messages and the state key."""
    if value is None or isinstance(value, str | int | float):
        return str(value)
    return getattr(value, "__name__", type(value).__name__)


def describe_clip(clip: Any) -> str:
    """A policy instance by its configuration (``AutoPolicy(z_thresh=3.0, ...)``); a name as is."""
    return repr(clip) if isinstance(clip, ThresholdPolicy) else describe(clip)


def is_gradguard_state(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("guards"), Mapping) and "version" in value


def version_2_state_key(callback: Callback, options: GuardOptions) -> str:
    """The key checkpoints of state version 2 hold a callback's state under (built from the configuration)."""
    return callback._generate_state_key(
        clip=describe_clip(options.clip), max_norm=options.max_norm, group_by=describe(options.group_by)
    )


def config_summary(class_name: str, options: GuardOptions) -> dict[str, Any]:
    """The configuration, as primitives, saved for messages (never used to restore anything)."""
    lr_guard = options.lr_guard_template
    return {
        "class": class_name,
        "clip": describe_clip(options.clip),
        "max_norm": options.max_norm,
        "group_by": describe(options.group_by),
        "on_nonfinite": options.on_nonfinite,
        "lr_guard": None if lr_guard is None else lr_guard.config(),
        "diagnostics": options.diagnostics_template is not None,
    }


class CallbackState:
    """The saved state around the engines: loaded but not yet applied, frozen at the end of fit, the saved config.

    Args:
        reporter: the outputs the messages about the saved state go to.
    """

    def __init__(self, reporter: Reporter) -> None:
        self._reporter = reporter
        self.pending: dict[int, dict[str, Any]] = {}  # optimizer index -> state loaded before its engine exists
        self.final: dict[str, dict[str, Any]] | None = None  # as it was before the end-of-fit flush
        self.saved_config: dict[str, Any] = {}

    def say(self, kind: str, message: str) -> None:
        """A message about the saved state, as a :class:`GuardEvent` (console only, not TensorBoard text)."""
        self._reporter.emit(GuardEvent(kind, 0, message), index=None)

    def start_fit(self, engines: Iterable[Engine], continued: bool) -> bool:
        """At the start of a fit, keep the state its engines start from; returns whether there is any.

        A new fit starts fresh, or from the checkpoint Lightning loads after ``setup`` (or from a state
        loaded by hand before the first fit). The same Trainer fitted again (``continued``: ``global_step > 0``)
        continues from the end of the last fit, as it would from a checkpoint saved there.
        """
        engines = list(engines)
        carried: dict[int, dict[str, Any]] = {}
        if continued and (engines or self.final):
            carried = {int(k): v for k, v in self.state_dict(engines, {}, None)["guards"].items()}
        elif not engines and self.final is None:
            carried = self.pending  # loaded by hand (``load_state_dict``) before the first fit
        self.pending, self.final = carried, None
        return bool(carried)

    def state_dict(
        self, engines: Iterable[Engine], config: dict[str, Any], recovery: Recovery | None
    ) -> dict[str, Any]:
        """Everything that affects future decisions, as Python primitives (see ``docs/state.md``).

        Per optimizer: counters, interval aggregates, heatmap buffer, layer names and sizes, the clip
        policy's history, the LR guard's scale, cooldown and detector, the diagnostics' per-layer history.
        State loaded but not yet applied (no step taken since) is saved as loaded.
        """
        guards = {str(index): state for index, state in sorted(self.pending.items())}
        if self.final is not None:
            guards.update(self.final)
        else:
            guards.update((str(e.index), e.state_dict()) for e in engines)
        state = {"version": STATE_VERSION, "config": config, "guards": guards}
        if recovery is not None:
            state["recovery"] = recovery.trigger.state_dict()
        return state

    def load_state_dict(
        self, state_dict: Mapping[str, Any], engines: Iterable[Engine], recovery: Recovery | None
    ) -> None:
        """Restore :meth:`state_dict` output, also from earlier versions (missing keys start fresh).

        State saved by a differently configured GradGuard (other clip policy, other layers, LR guard or
        diagnostics switched on or off) is applied where it still means the same thing; each difference
        and what is done about it is reported once.
        """
        self.final = None
        version = state_dict.get("version", 1)
        if isinstance(version, int) and version > STATE_VERSION:
            self.say(
                "state",
                f"the checkpoint's GradGuard state has version {version}, newer than this version "
                f"({STATE_VERSION}); loading the parts this version knows and ignoring the rest.",
            )
        saved = state_dict.get("config")
        self.saved_config = dict(saved) if isinstance(saved, Mapping) else {}
        saved_recovery = state_dict.get("recovery")
        if recovery is not None and isinstance(saved_recovery, Mapping):
            recovery.trigger.load_state_dict(saved_recovery)
        by_index = {e.index: e for e in reversed(list(engines))}  # the first engine of an index wins
        for key, state in (state_dict.get("guards") or {}).items():
            index = int(key)
            engine = by_index.get(index)
            if engine is None:
                self.pending[index] = state
            else:
                self.report_differences(engine, engine.load_state_dict(state))

    def apply_pending(self, engine: Engine) -> None:
        """Load the state waiting for this engine's optimizer, if any."""
        pending = self.pending.pop(engine.index, None)
        if pending is not None:
            self.report_differences(engine, engine.load_state_dict(pending))

    def report_differences(self, engine: Engine, differences: list[str]) -> None:
        if not differences:
            return
        saved = self.saved_config
        origin = f" (saved by {saved.get('class', 'GradGuard')}(clip={saved.get('clip')!r}))" if saved else ""
        self.say(
            "state",
            f"the checkpoint's state for optimizer {engine.index} does not fully match this GradGuard"
            f"{origin}:\n- " + "\n- ".join(differences),
        )

    def report_unused(self, engines: Iterable[Engine]) -> None:
        """Warn about state saved for optimizers this run does not have (called once the engines exist)."""
        if not self.pending:
            return
        have = sorted(e.index for e in engines)
        self.say(
            "state",
            f"the checkpoint has GradGuard state for optimizer(s) {sorted(self.pending)}, but this "
            f"run has optimizer(s) {have}; that state is ignored.",
        )
        self.pending.clear()


def adopt_checkpoint_state(
    states: Mapping[str, Any],
    keys: tuple[str, str],
    family: list[tuple[str, str]],
    load: Callable[[dict[str, Any]], None],
    say: Say,
) -> None:
    """When a checkpoint holds no state under a callback's key: load what is meant for it, or say why not.

    Lightning loads a callback's state only under its exact key. If the key is missing, the state saved under
    this configuration's key of state version 2 is loaded; else the only GradGuard state no other callback of
    this Trainer claims is adopted (the configuration changed between the runs: its differences are reported
    on load); otherwise the callback starts fresh, with an info message (GradGuard added to an existing run)
    or a warning naming the other states.

    Args:
        states: the checkpoint's callback states, by key.
        keys: the callback's state key and its key of state version 2.
        family: those two keys of every GradGuard-family callback of the Trainer.
        load: the callback's ``load_state_dict``.
        say: reports a message about the saved state.
    """
    state_key, version_2_key = keys
    if state_key in states:
        return  # Lightning loads it
    if version_2_key in states:  # the same configuration, saved under the key of state version 2
        load(copy.deepcopy(states[version_2_key]))
        return
    ours = {str(k): v for k, v in states.items() if is_gradguard_state(v)}
    claimed = {key for pair in family for key in pair}
    unclaimed = {k: v for k, v in ours.items() if k not in claimed}
    homeless = [pair for pair in family if not set(pair) & states.keys()]
    if len(unclaimed) == 1 and len(homeless) == 1:
        key, state = next(iter(unclaimed.items()))
        say(
            "state",
            f"the checkpoint has no state under this GradGuard's key {state_key!r}; loading "
            f"the GradGuard state saved under {key!r} instead (the GradGuard was configured differently).",
        )
        load(copy.deepcopy(state))
        return
    fresh = "starting with fresh GradGuard state: counters at 0, the clip policy warms up again, LR scale 1.0."
    if not ours:
        say(
            "notice",
            "the checkpoint holds no GradGuard state (GradGuard was added to an existing run, or "
            f"the checkpoint predates it); {fresh}",
        )
    else:
        say(
            "state",
            f"none of the GradGuard states in the checkpoint ({', '.join(sorted(ours))}) matches "
            f"this GradGuard's key {state_key!r}; {fresh}",
        )
