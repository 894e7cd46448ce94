"""Recovery: keep the last good training state in host memory and decide when to roll back to it.

Clipping and skipping act on gradients. Once the *weights* are non-finite or blown up, every later
gradient is bad too and only a rewind helps. This module holds the two Lightning-free pieces of that
rewind; a front-end (the Lightning callback, a plain loop) wires them together:

* :class:`Snapshot` copies the model's parameters and buffers (the local shard of a ``DTensor``),
  the optimizers' state and hyper-parameters, the LR schedulers' state and an opaque dict of the
  caller's own state into host buffers that are allocated once and reused, and copies them back *in
  place* (``copy_`` into the same tensors, so DDP / FSDP2 wrappers keep their storage).
* :class:`RollbackTrigger` is fed once per optimizer step with host values that every rank reads
  identically (the loss and the non-finite / skipped flags, already reduced across ranks) and answers
  a :class:`RollbackDecision`: roll back now (and why, with the evidence), or whether the step was
  healthy enough for a snapshot to be taken. It counts rollbacks and the steps they cost, and after
  ``max_rollbacks`` rollbacks answers a :class:`RecoveryError` instead.

The protocol, once per optimizer step, *before* the optimizer applies the step's gradients::

    decision = trigger.update(step, loss=loss, nonfinite=nonfinite, skipped=skipped)
    if decision.error is not None:
        raise decision.error                      # every rank, same step: no hang
    if decision.rollback and snapshot.step is not None:
        restored_to = snapshot.restore()          # drops this step's gradients too
        trigger.record_rollback(decision, restored_to)
        ...lower the LR (LR guard), skip this optimizer step...
    elif decision.snapshot_ok and step % every_n_steps == 0:
        snapshot.capture(step, extra=own_state)

Taking the snapshot at that point (after the step's loss and gradients were seen to be healthy, before
its update) stores exactly the weights that produced a healthy loss and finite gradients.

Nothing here imports Lightning.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import functools
import math
import statistics
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_gradguard._checks import check_bool, check_int, is_number, python_scalar
from lightning_gradguard._compat import foreach_copy_, foreach_norm, persistent_buffers
from lightning_gradguard.decide.engine import GuardEngine, StepOutcome
from lightning_gradguard.errors import RecoveryError
from lightning_gradguard.events import GuardEvent

__all__ = [
    "SNAPSHOT_EVERY_N_STEPS",
    "TRIGGERS",
    "Recovery",
    "RecoveryError",
    "RollbackDecision",
    "RollbackRecord",
    "RollbackTrigger",
    "Snapshot",
]

Trigger = Literal["nonfinite_grad", "nonfinite_loss", "loss_runaway", "nonfinite_state"]
#: Default snapshot interval (optimizer steps). Measured by ``benchmarks/bench_snapshot.py``: one capture costs
#: 2.5-7.4 % of a training step on CPU (1M-50M parameters, AdamW), so every 100 steps amortises to <= 0.08 %,
#: leaving room for GPUs, where the step is shorter and the copy is bound by host bandwidth.
SNAPSHOT_EVERY_N_STEPS = 100
#: The names a rollback's trigger can take.
TRIGGERS: tuple[str, ...] = ("nonfinite_grad", "nonfinite_loss", "loss_runaway", "nonfinite_state")


# --------------------------------------------------------------------------------------------- snapshot


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def _is_dtensor(t: Tensor) -> bool:
    kind = _dtensor_type()
    return kind is not None and isinstance(t, kind)


def _local(t: Tensor) -> Tensor:
    """The tensor this rank holds: a ``DTensor``'s local shard (a view, no copy), else ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined,no-any-return]


def _copy_tree(value: Any) -> Any:
    """A deep copy of ``value`` whose tensors are detached host copies."""
    if isinstance(value, Tensor):
        return _local(value).detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _copy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_tree(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy_tree(v) for v in value)
    return copy.deepcopy(value)


@dataclass
class _Slot:
    """One host buffer and what is needed to put it back where it came from."""

    buffer: Tensor
    device: torch.device
    dtensor_spec: tuple[Any, Any, torch.Size, tuple[int, ...]] | None = None  # mesh, placements, shape, stride


class Snapshot:
    """The last good training state of this rank, in reused host buffers.

    One snapshot is kept: each :meth:`capture` overwrites the previous one in the same buffers, so host
    memory stays at :attr:`nbytes` whatever the run length. Each rank snapshots what it holds: a full
    replica under DDP, its local shards under FSDP2 / ``DTensor``.

    What is captured:

    * every parameter and buffer of ``model`` (the local shard of a ``DTensor``); :meth:`restore`
      copies them back with ``copy_`` into the *same* tensors;
    * for each optimizer, the per-parameter state (tensors into reused host buffers, other entries
      deep-copied) and each param group's hyper-parameters (``lr``, ``betas``, ``weight_decay``, ...).
      State that appears after the capture (a parameter that had none) is removed on restore, so the
      optimizer is exactly as it was;
    * each LR scheduler's ``state_dict()``;
    * ``modules``: the parameters and buffers of further modules that belong to the training state
      (e.g. a weight-averaging callback's averaged model), in place like the model's;
    * ``stateful``: further objects with ``state_dict`` / ``load_state_dict`` (e.g. other callbacks),
      their ``state_dict()`` deep-copied to host and loaded back on restore;
    * ``extra``: an opaque dict (e.g. GradGuard's own state), deep-copied with tensors moved to host.

    On an accelerator the device-to-host copies go to pinned buffers with ``non_blocking=True`` and do
    not wait for the step; an event recorded after them is waited on before the snapshot is read
    (:meth:`restore`, :attr:`extra`, :meth:`synchronize`).

    Args:
        model: the module whose tensors are captured (a DDP / FSDP2 wrapper is fine).
        optimizers: an optimizer, a sequence of them, or ``None``.
        schedulers: an LR scheduler (anything with ``state_dict`` / ``load_state_dict``), a sequence of
            them, or ``None``.
        pin_memory: pin the host buffers of tensors that live on an accelerator. ``None`` (default):
            pin when such a tensor is seen and the accelerator is available.
        modules: further modules captured and restored in place with the model.
        stateful: further objects with ``state_dict`` / ``load_state_dict``, captured and restored.

    Example:

        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        >>> snap = Snapshot(model, opt)
        >>> snap.capture(step=0)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(float("nan"))
        >>> snap.restore()
        0
        >>> bool(model.weight.isfinite().all())
        True
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        schedulers: Any | Sequence[Any] | None = None,
        pin_memory: bool | None = None,
        *,
        modules: Sequence[nn.Module] = (),
        stateful: Sequence[Any] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.optimizers: list[torch.optim.Optimizer] = _as_list(optimizers, torch.optim.Optimizer, "optimizers")
        self.schedulers: list[Any] = _as_list(schedulers, None, "schedulers")
        self.modules: list[nn.Module] = _as_list(list(modules), nn.Module, "modules")
        self.stateful: list[Any] = list(stateful)
        for name, items in (("schedulers", self.schedulers), ("stateful", self.stateful)):
            for i, item in enumerate(items):
                if not (
                    callable(getattr(item, "state_dict", None)) and callable(getattr(item, "load_state_dict", None))
                ):
                    raise TypeError(
                        f"`{name}[{i}]` must have `state_dict` and `load_state_dict`, got {type(item).__name__}"
                    )
        self.pin_memory = None if pin_memory is None else check_bool("pin_memory", pin_memory)
        self._step: int | None = None
        self._model_slots: list[_Slot] = []
        # (optimizer, group, index in group) -> {state key -> slot or copied value}; None: no state.
        self._opt_state: dict[tuple[int, int, int], dict[str, Any] | None] = {}
        self._opt_groups: list[list[dict[str, Any]]] = []
        self._opt_layout: list[list[int]] = []
        self._sched_states: list[dict[str, Any]] = []
        self._stateful_states: list[Any] = []
        self._extra: dict[str, Any] = {}
        self._events: list[Any] = []

    # ------------------------------------------------------------------ public

    @property
    def step(self) -> int | None:
        """The step passed to the last :meth:`capture`; ``None`` before the first one."""
        return self._step

    @property
    def nbytes(self) -> int:
        """Host bytes held by the snapshot's tensor buffers (model and optimizer state)."""
        slots = list(self._model_slots)
        for entries in self._opt_state.values():
            if entries:
                slots.extend(v for v in entries.values() if isinstance(v, _Slot))
        return sum(s.buffer.numel() * s.buffer.element_size() for s in slots)

    @property
    def extra(self) -> dict[str, Any]:
        """A deep copy of the ``extra`` dict of the last capture (empty before the first one)."""
        self.synchronize()
        return _copy_tree(self._extra)  # type: ignore[no-any-return]

    def capture(self, step: int, extra: Mapping[str, Any] | None = None) -> None:
        """Overwrite the snapshot with the current state, labelled ``step``.

        Host buffers are allocated on the first capture (or when a tensor's shape or dtype changed) and
        reused afterwards. On an accelerator the copies are queued without waiting for them.
        """
        check_int("step", step, 0)
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError(f"`extra` must be a mapping or None, got {type(extra).__name__}")
        self._events.clear()
        devices: set[torch.device] = set()
        with torch.no_grad():
            tensors = list(self._model_tensors())
            if len(self._model_slots) != len(tensors):
                self._model_slots = []
            for i, t in enumerate(tensors):
                old = self._model_slots[i] if i < len(self._model_slots) else None
                slot = self._copy_out(t, old, devices)
                if old is None:
                    self._model_slots.append(slot)
            self._capture_optimizers(devices)
        self._sched_states = [_copy_tree(s.state_dict()) for s in self.schedulers]
        self._stateful_states = [_copy_tree(s.state_dict()) for s in self.stateful]
        self._extra = _copy_tree(dict(extra)) if extra is not None else {}
        self._record_events(devices)
        self._step = int(step)

    def restore(self, clear_grads: bool = True) -> int:
        """Put the captured state back, in place, and return the step it was captured at.

        Args:
            clear_grads: set every parameter's ``.grad`` to ``None`` (the current gradients belong to
                the state being discarded; an optimizer step taken now changes nothing).

        Raises:
            RuntimeError: if nothing was captured, or the model or an optimizer changed structure
                (a different number of tensors, shapes or param groups) since the capture. Param groups
                appended since (``add_param_group``, e.g. by Lightning's ``BackboneFinetuning``) are
                allowed: they keep their hyper-parameters and lose the optimizer state they gained.
        """
        if self._step is None:
            raise RuntimeError("Snapshot.restore() called before any capture()")
        self.synchronize()
        self._check_optimizer_layout()
        with torch.no_grad():
            tensors = list(self._model_tensors())
            if len(tensors) != len(self._model_slots):
                raise RuntimeError(
                    f"the model has {len(tensors)} parameters and buffers, the snapshot {len(self._model_slots)}"
                )
            for t, slot in zip(tensors, self._model_slots, strict=True):
                local = _local(t)
                if local.shape != slot.buffer.shape:
                    raise RuntimeError(
                        f"a model tensor changed shape since the snapshot: {tuple(slot.buffer.shape)} -> "
                        f"{tuple(local.shape)}"
                    )
                local.copy_(slot.buffer, non_blocking=slot.buffer.is_pinned())
            self._restore_optimizers()
        for sched, state in zip(self.schedulers, self._sched_states, strict=True):
            sched.load_state_dict(_copy_tree(state))
        for obj, state in zip(self.stateful, self._stateful_states, strict=True):
            obj.load_state_dict(_copy_tree(state))
        if clear_grads:
            for p in self.model.parameters():
                p.grad = None
        return self._step

    def synchronize(self) -> None:
        """Wait until the copies of the last :meth:`capture` have completed (a no-op on CPU)."""
        for event in self._events:
            event.synchronize()
        self._events.clear()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(step={self._step}, nbytes={self.nbytes}, optimizers={len(self.optimizers)},"
            f" schedulers={len(self.schedulers)})"
        )

    # ----------------------------------------------------------------- helpers

    def _model_tensors(self) -> Iterator[Tensor]:
        for module in (self.model, *self.modules):
            yield from module.parameters()
            yield from module.buffers()

    def _pin(self, t: Tensor) -> bool:
        if t.device.type == "cpu":
            return False
        if self.pin_memory is not None:
            return self.pin_memory
        return torch.cuda.is_available() if t.device.type == "cuda" else False

    def _copy_out(self, t: Tensor, slot: _Slot | None, devices: set[torch.device]) -> _Slot:
        """Copy ``t`` (its local shard) into ``slot``'s buffer, allocating a new slot if it does not fit."""
        local = _local(t).detach()
        spec = None
        if _is_dtensor(t):
            spec = (t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))  # type: ignore[attr-defined]
        if slot is None or slot.buffer.shape != local.shape or slot.buffer.dtype != local.dtype:
            pin = self._pin(local)
            slot = _Slot(torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin), local.device)
        slot.device = local.device
        slot.dtensor_spec = spec
        non_blocking = slot.buffer.is_pinned() and local.device.type != "cpu"
        slot.buffer.copy_(local, non_blocking=non_blocking)
        if local.device.type != "cpu":
            devices.add(local.device)
        return slot

    def _capture_optimizers(self, devices: set[torch.device]) -> None:
        layout = self._layout()
        if layout != self._opt_layout:
            self._opt_state = {}
        self._opt_layout = layout
        self._opt_groups = [
            [_copy_tree({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
            for opt in self.optimizers
        ]
        for o, opt in enumerate(self.optimizers):
            for g, group in enumerate(opt.param_groups):
                for i, p in enumerate(group["params"]):
                    key = (o, g, i)
                    state = opt.state.get(p)
                    if not state:
                        self._opt_state[key] = None
                        continue
                    old = self._opt_state.get(key) or {}
                    entries: dict[str, Any] = {}
                    for name, value in state.items():
                        if isinstance(value, Tensor):
                            prev = old.get(name)
                            entries[name] = self._copy_out(value, prev if isinstance(prev, _Slot) else None, devices)
                        else:
                            entries[name] = copy.deepcopy(value)
                    self._opt_state[key] = entries

    def _layout(self) -> list[list[int]]:
        return [[len(g["params"]) for g in opt.param_groups] for opt in self.optimizers]

    @property
    def layout_changed(self) -> bool:
        """Whether an optimizer's param groups changed since the last :meth:`capture` (e.g. one was added)."""
        return self._step is not None and self._layout() != self._opt_layout

    def _check_optimizer_layout(self) -> None:
        # Groups appended since the capture (``add_param_group``, e.g. Lightning's BackboneFinetuning
        # unfreezing the backbone) are allowed; any other change is not. Checked before anything is
        # written, so a refused restore leaves the training state untouched.
        layout = self._layout()
        grown = len(layout) == len(self._opt_layout) and all(
            now[: len(then)] == then for now, then in zip(layout, self._opt_layout, strict=True)
        )
        if not grown:
            raise RuntimeError(
                f"an optimizer's param groups changed since the snapshot: {self._opt_layout} -> {layout}"
            )

    def _restore_optimizers(self) -> None:
        for o, opt in enumerate(self.optimizers):
            for group in opt.param_groups[len(self._opt_groups[o]) :]:
                # A group added after the capture keeps its hyper-parameters (its owner's schedule);
                # its parameters' optimizer state was created after the capture and goes.
                for p in group["params"]:
                    opt.state.pop(p, None)
            for group, saved in zip(opt.param_groups, self._opt_groups[o], strict=False):
                for name, value in saved.items():
                    current = group.get(name)
                    if isinstance(current, Tensor) and isinstance(value, Tensor) and current.shape == value.shape:
                        current.copy_(value)
                    else:
                        group[name] = _copy_tree(value)
            for g, group in enumerate(opt.param_groups[: len(self._opt_groups[o])]):
                for i, p in enumerate(group["params"]):
                    entries = self._opt_state.get((o, g, i))
                    if entries is None:
                        opt.state.pop(p, None)  # state created after the snapshot
                        continue
                    state = opt.state[p]
                    for name in [n for n in state if n not in entries]:
                        del state[name]
                    for name, value in entries.items():
                        if isinstance(value, _Slot):
                            state[name] = _copy_in(state.get(name), value)
                        else:
                            state[name] = copy.deepcopy(value)

    def _record_events(self, devices: set[torch.device]) -> None:
        for device in devices:
            module = getattr(torch, device.type, None)
            event_cls = getattr(module, "Event", None)
            if event_cls is None or not hasattr(module, "current_stream"):
                continue
            event = event_cls()
            event.record(module.current_stream(device))  # type: ignore[union-attr]
            self._events.append(event)


def _copy_in(current: Any, slot: _Slot) -> Tensor:
    """``slot``'s values in ``current`` (in place) if it still fits, else in a new tensor like the original."""
    if isinstance(current, Tensor):
        local = _local(current)
        if local.shape == slot.buffer.shape and local.dtype == slot.buffer.dtype:
            local.copy_(slot.buffer, non_blocking=slot.buffer.is_pinned())
            return current
    data = slot.buffer.to(slot.device, copy=True)
    if slot.dtensor_spec is not None:
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = slot.dtensor_spec
        return DTensor.from_local(data, mesh, placements, run_check=False, shape=shape, stride=stride)
    return data


def _as_list(value: Any, kind: type | None, name: str) -> list[Any]:
    if value is None:
        return []
    if kind is not None and isinstance(value, kind):
        return [value]
    if kind is None and not isinstance(value, Sequence):
        return [value]
    items = list(value)
    if kind is not None:
        for i, item in enumerate(items):
            if not isinstance(item, kind):
                raise TypeError(f"`{name}[{i}]` must be an instance of {kind.__name__}, got {type(item).__name__}")
    return items


# ---------------------------------------------------------------------------------------------- trigger


@dataclass(frozen=True)
class RollbackDecision:
    """What :meth:`RollbackTrigger.update` decided for one optimizer step.

    Attributes:
        step: the step passed to :meth:`RollbackTrigger.update`.
        rollback: restore the snapshot now (every rank reads the same inputs, so every rank agrees).
        trigger: why (one of :data:`TRIGGERS`), ``None`` when ``rollback`` is false.
        message: one line for the event log and the warning (empty when nothing happened).
        evidence: the numbers behind the decision (loss, running median and MAD, threshold, streaks).
        snapshot_ok: the step was healthy (finite loss and gradients, not skipped, loss not above the
            runaway threshold, no streak running): a snapshot may be taken now.
        error: set instead of a rollback once ``max_rollbacks`` rollbacks were spent.
        reason: what fired, in words (no step, no remedy), when something fired.
        first_bad: the first step of the trouble that fired (the start of the streak, the first loss above
            the runaway threshold); a snapshot taken before it holds state known to be good.
    """

    step: int
    rollback: bool = False
    trigger: str | None = None
    message: str = ""
    evidence: Mapping[str, float | int | str] = field(default_factory=dict)
    snapshot_ok: bool = False
    error: RecoveryError | None = None
    first_bad: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class RollbackRecord:
    """One rollback: at ``step``, because of ``trigger``, the state of ``restored_to`` was restored.

    ``counted`` is false for a rollback taken while the run had little history (it does not use up
    ``max_rollbacks``).
    """

    step: int
    trigger: str
    restored_to: int
    counted: bool = True

    @property
    def steps_lost(self) -> int:
        """Optimizer steps whose work the rollback discarded."""
        return max(0, self.step - self.restored_to)


_ADVICE = (
    "What to try: lower the learning rate or lengthen its warmup; clip harder (a lower `max_norm`, or the "
    "'fixed' policy); look at the batches right before the steps named above (a poisoned batch repeats "
    "after every rollback); use bf16 or fp32 where fp16 overflows; if weights turned non-finite while "
    "gradients were finite, suspect the hardware. If the loss rose for a legitimate reason (a new data "
    "mix), raise `runaway_rel` or set `runaway_steps=0`; to allow more attempts raise `max_rollbacks`."
)


class RollbackTrigger:
    """Decide from per-step host values, identical on every rank, when to roll back.

    Fed once per optimizer step with values already reduced across ranks, it fires on:

    * ``"nonfinite_grad"``: non-finite gradients on ``nonfinite_steps`` consecutive steps (skipping
      handles an isolated one; a run of them means the weights or the optimizer state are broken).
      Steps the AMP GradScaler skips are its business: pass ``nonfinite=False`` for them;
    * ``"nonfinite_loss"``: a non-finite loss on ``nonfinite_loss_steps`` consecutive steps;
    * ``"loss_runaway"``: the loss ran away from its robust running level. The level is the median
      ``M`` of the last ``runaway_window`` finite losses that were not themselves above the threshold,
      the spread their median absolute deviation ``MAD``. A loss is *above* when
      ``loss > M + max(runaway_mad * MAD, runaway_rel * |M|, runaway_min_margin)`` (while the window
      holds ``n < runaway_steps`` losses, ``runaway_rel`` is scaled by ``runaway_steps / n``); the trigger fires
      when more than half of the last ``runaway_steps`` losses were above. The level exists from the
      first loss on (the untrained model's), so a run that diverges in its first steps is caught too.
      The defaults (more than double the level *and* more than 10 MADs above it, on a majority of
      10 steps) sit far outside the batch-to-batch noise of healthy training, while a blow-up crosses
      them within steps. Losses above the threshold never enter the window, so a blow-up cannot
      drag the level up.

    Each trigger is turned off by setting its step count to ``0``. A step is healthy (a snapshot may
    be taken) when it fired nothing, had finite loss and gradients, was not skipped, and none of the
    last ``runaway_steps`` losses was above the threshold.

    After ``max_rollbacks`` rollbacks the next trigger answers a :class:`RecoveryError` naming every
    rollback, its trigger and step, and what to try.

    The state (counters, history, loss window, streaks) is a dict of primitives that loads with
    ``torch.load(weights_only=True)``; it is *not* part of the snapshot, so a rollback does not undo it.

    Args:
        nonfinite_steps: consecutive non-finite-gradient steps that trigger a rollback (``0``: never).
        nonfinite_loss_steps: consecutive non-finite losses that trigger a rollback (``0``: never).
        runaway_steps: the runaway check looks at the last ``runaway_steps`` losses and fires when more
            than half of them are above the threshold (``0``: never).
        runaway_window: finite losses the running level is computed from.
        runaway_mad: MADs above the median a loss must be.
        runaway_rel: fraction of ``|median|`` above the median a loss must be.
        runaway_min_margin: absolute floor of the margin (loss units), for losses near zero.
        max_rollbacks: rollbacks allowed per run; the next trigger answers :class:`RecoveryError`.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.

    Example:

        >>> trigger = RollbackTrigger(nonfinite_steps=2)
        >>> trigger.update(0, loss=2.3, nonfinite=False).snapshot_ok
        True
        >>> trigger.update(1, loss=2.2, nonfinite=True).rollback
        False
        >>> decision = trigger.update(2, loss=2.2, nonfinite=True)
        >>> decision.rollback, decision.trigger
        (True, 'nonfinite_grad')
        >>> trigger.record_rollback(decision, restored_to=0).steps_lost
        2
    """

    def __init__(
        self,
        *,
        nonfinite_steps: int = 3,
        nonfinite_loss_steps: int = 3,
        runaway_steps: int = 10,
        runaway_window: int = 200,
        runaway_mad: float = 10.0,
        runaway_rel: float = 1.0,
        runaway_min_margin: float = 1e-3,
        max_rollbacks: int = 3,
    ) -> None:
        self.nonfinite_steps = check_int("nonfinite_steps", nonfinite_steps, 0)
        self.nonfinite_loss_steps = check_int("nonfinite_loss_steps", nonfinite_loss_steps, 0)
        self.runaway_steps = check_int("runaway_steps", runaway_steps, 0)
        self.runaway_window = check_int("runaway_window", runaway_window, 1)
        self.runaway_mad = _check_nonneg("runaway_mad", runaway_mad)
        self.runaway_rel = _check_nonneg("runaway_rel", runaway_rel)
        self.runaway_min_margin = _check_nonneg("runaway_min_margin", runaway_min_margin)
        self.max_rollbacks = check_int("max_rollbacks", max_rollbacks, 1)
        self._losses: deque[tuple[int, float]] = deque(maxlen=self.runaway_window)
        self._sorted: list[float] = []  # the window's values, sorted: the median in O(1)
        self._recent: deque[tuple[int, bool]] = deque(maxlen=max(1, self.runaway_steps))
        self._nonfinite_streak = 0
        self._other_streaks: dict[int, int] = {}  # non-finite streaks of the other optimizers, by index
        self._nonfinite_loss_streak = 0
        self._history: list[RollbackRecord] = []

    # ---------------------------------------------------------------- counters

    @property
    def rollbacks_total(self) -> int:
        """Rollbacks recorded so far."""
        return len(self._history)

    @property
    def rollbacks_counted(self) -> int:
        """Rollbacks that count against ``max_rollbacks`` (those taken with little history do not)."""
        return sum(1 for r in self._history if r.counted)

    @property
    def steps_lost(self) -> int:
        """Optimizer steps discarded by all rollbacks so far."""
        return sum(r.steps_lost for r in self._history)

    @property
    def history(self) -> tuple[RollbackRecord, ...]:
        """Every rollback so far, oldest first."""
        return tuple(self._history)

    def level(self) -> tuple[float, float, float] | None:
        """``(median, MAD, threshold)`` of the runaway check now; ``None`` before the first finite loss."""
        if not self._losses:
            return None
        median = self._median()
        mad = statistics.median(abs(v - median) for v in self._sorted)
        margin = max(self.runaway_mad * mad, self._rel() * abs(median), self.runaway_min_margin)
        return median, mad, median + margin

    def _rel(self) -> float:
        """``runaway_rel``, widened while the window holds fewer than ``runaway_steps`` losses.

        With ``n`` losses the relative margin is ``runaway_rel * runaway_steps / n``: a level read from
        one or two batches is not trusted to within a factor of two (a low first batch would otherwise
        keep every later, ordinary loss out of the window), while a divergence, orders of magnitude
        above, still fires in the first steps.
        """
        n = len(self._losses)
        return self.runaway_rel * max(1.0, self.runaway_steps / n) if n else self.runaway_rel

    def _median(self) -> float:
        n = len(self._sorted)
        return self._sorted[n // 2] if n % 2 else 0.5 * (self._sorted[n // 2 - 1] + self._sorted[n // 2])

    def _is_above(self, loss: float) -> bool:
        """``loss > threshold``, computing the MAD only when the cheap lower bound of the margin is passed."""
        if not self._sorted:
            return False
        median = self._median()
        if loss <= median + max(self._rel() * abs(median), self.runaway_min_margin):
            return False
        level = self.level()
        return level is not None and loss > level[2]

    def _push_loss(self, step: int, loss: float) -> None:
        if len(self._losses) == self._losses.maxlen:
            _, old = self._losses[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._losses.append((step, loss))
        bisect.insort(self._sorted, loss)

    def _set_losses(self, items: list[tuple[int, float]]) -> None:
        self._losses.clear()
        self._sorted.clear()
        for s, v in items:
            self._push_loss(s, v)

    def _runaway_count(self) -> int:
        return sum(1 for _, above in self._recent if above)

    # ---------------------------------------------------------------- decision

    def update(
        self,
        step: int,
        loss: float | None = None,
        nonfinite: bool = False,
        skipped: bool = False,
        source: int = 0,
    ) -> RollbackDecision:
        """Feed one optimizer step and decide.

        Args:
            step: the optimizer step (any increasing counter, e.g. ``trainer.global_step``).
            loss: the step's training loss, reduced across ranks; ``None`` turns the loss checks off
                for this step.
            nonfinite: the step's gradients are non-finite on some rank (reduced).
            skipped: the optimizer step is skipped for any reason (GradGuard, the GradScaler).
            source: the optimizer the step belongs to. Each optimizer has its own non-finite streak and
                any of them fires; the loss checks read the loss of optimizer ``0`` only.
        """
        step = int(step)
        if source != 0:
            return self._update_other(step, int(source), nonfinite, skipped)
        loss_finite = loss is None or math.isfinite(loss)
        self._nonfinite_streak = self._nonfinite_streak + 1 if nonfinite else 0
        self._nonfinite_loss_streak = 0 if loss_finite else self._nonfinite_loss_streak + 1
        above = False
        level: tuple[float, float, float] | None = None
        if loss is not None and loss_finite:
            above = self._is_above(float(loss))
            if above:
                level = self.level()  # the evidence: median, MAD, threshold
            else:
                self._push_loss(step, float(loss))
            if self.runaway_steps:
                self._recent.append((step, above))
        n_above = self._runaway_count() if self.runaway_steps else 0

        evidence: dict[str, float | int | str] = {
            "nonfinite_streak": self._nonfinite_streak,
            "nonfinite_loss_streak": self._nonfinite_loss_streak,
            "runaway_above": n_above,
            "rollbacks_total": self.rollbacks_total,
        }
        if loss is not None:
            evidence["loss"] = float(loss)
        if above and level is not None:
            evidence.update(median=level[0], mad=level[1], threshold=level[2])

        trigger, what = self._fired(loss, n_above, level, evidence)
        if trigger is None:
            healthy = loss_finite and not nonfinite and not skipped and n_above == 0 and not self._others_bad()
            return RollbackDecision(step=step, evidence=evidence, snapshot_ok=healthy)
        if trigger == "nonfinite_grad":
            first_bad = step - self._nonfinite_streak + 1
        elif trigger == "nonfinite_loss":
            first_bad = step - self._nonfinite_loss_streak + 1
        else:
            first_bad = min((s for s, above in self._recent if above), default=step)
        return self.fire(step, trigger, what, evidence, first_bad)

    def _others_bad(self) -> bool:
        return any(self._other_streaks.values())

    def _update_other(self, step: int, source: int, nonfinite: bool, skipped: bool) -> RollbackDecision:
        """A step of an optimizer other than the first: only its non-finite streak is followed."""
        streak = self._other_streaks.get(source, 0) + 1 if nonfinite else 0
        self._other_streaks[source] = streak
        evidence: dict[str, float | int | str] = {
            "nonfinite_streak": streak,
            "optimizer": source,
            "rollbacks_total": self.rollbacks_total,
        }
        if 0 < self.nonfinite_steps <= streak:
            what = f"non-finite gradients of optimizer {source} on {streak} consecutive steps"
            return self.fire(step, "nonfinite_grad", what, evidence, step - streak + 1)
        return RollbackDecision(step=step, evidence=evidence, snapshot_ok=not (nonfinite or skipped))

    def fire(
        self,
        step: int,
        trigger: str,
        what: str,
        evidence: Mapping[str, float | int | str] | None = None,
        first_bad: int | None = None,
    ) -> RollbackDecision:
        """A rollback decision for ``trigger`` at ``step`` (``what``: the evidence in words).

        Answers a :class:`RecoveryError` in ``error`` instead once ``max_rollbacks`` counted rollbacks
        were spent. Used by :meth:`update`, and by a front-end for a trigger it detects itself
        (``"nonfinite_state"``: non-finite module buffers that cannot be repaired in place).
        """
        step = int(step)
        evidence = dict(evidence or {})
        first_bad = step if first_bad is None else int(first_bad)
        if self.rollbacks_counted >= self.max_rollbacks:
            error = RecoveryError(self._error_message(step, trigger, what))
            return RollbackDecision(
                step=step,
                trigger=trigger,
                message=str(error),
                evidence=evidence,
                error=error,
                first_bad=first_bad,
                reason=what,
            )
        message = f"step {step}: {what}: rolling back to the last good snapshot"
        return RollbackDecision(
            step=step,
            rollback=True,
            trigger=trigger,
            message=message,
            evidence=evidence,
            first_bad=first_bad,
            reason=what,
        )

    def decline(self, decision: RollbackDecision) -> None:
        """Forget the trouble that fired ``decision`` without a rollback (the front-end skips or clips instead).

        The streaks start again; after a runaway the loss level is learned again from the losses to come,
        so the run is judged from where it now is.
        """
        self._nonfinite_streak = self._nonfinite_loss_streak = 0
        self._other_streaks.clear()
        self._recent.clear()
        if decision.trigger == "loss_runaway":
            self._set_losses([])

    def _fired(
        self,
        loss: float | None,
        n_above: int,
        level: tuple[float, float, float] | None,
        evidence: dict[str, float | int | str],
    ) -> tuple[Trigger | None, str]:
        """The trigger that fires now (``None`` if none) and what it saw; a runaway adds its level to ``evidence``."""
        if 0 < self.nonfinite_steps <= self._nonfinite_streak:
            return "nonfinite_grad", f"non-finite gradients on {self._nonfinite_streak} consecutive steps"
        if 0 < self.nonfinite_loss_steps <= self._nonfinite_loss_streak:
            return "nonfinite_loss", f"non-finite loss ({loss}) on {self._nonfinite_loss_streak} consecutive step(s)"
        if self.runaway_steps and 2 * n_above > self.runaway_steps and (level := level or self.level()):
            evidence.update(median=level[0], mad=level[1], threshold=level[2])
            return "loss_runaway", (
                f"loss {_fmt(loss)}: {n_above} of the last {self.runaway_steps} losses above {level[2]:.4g} "
                f"(running median {level[0]:.4g}, MAD {level[1]:.3g})"
            )
        return None, ""

    def record_rollback(self, decision: RollbackDecision, restored_to: int, counted: bool = True) -> RollbackRecord:
        """Count the rollback ``decision`` asked for, now that the state of step ``restored_to`` is back.

        Resets the streaks and forgets the losses observed after ``restored_to`` (they belong to the
        discarded trajectory).

        Args:
            decision: the decision that asked for the rollback.
            restored_to: the step of the restored snapshot.
            counted: whether the rollback uses up one of ``max_rollbacks`` (a front-end passes ``False``
                for a rollback taken while the run had little history).
        """
        if not decision.rollback or decision.trigger is None:
            raise ValueError(f"`decision` did not ask for a rollback: {decision!r}")
        restored_to = check_int("restored_to", restored_to, 0)
        record = RollbackRecord(
            step=decision.step, trigger=decision.trigger, restored_to=restored_to, counted=bool(counted)
        )
        self._history.append(record)
        self._nonfinite_streak = self._nonfinite_loss_streak = 0
        self._other_streaks.clear()
        self._recent.clear()
        self._set_losses([(s, v) for s, v in self._losses if s <= restored_to])
        return record

    def _error_message(self, step: int, trigger: str, what: str) -> str:
        lines = [
            f"GradGuard recovery gave up at step {step}: {what} ({trigger}), after {self.rollbacks_total} "
            f"rollback(s) (max_rollbacks={self.max_rollbacks}, {self.rollbacks_counted} counted), "
            f"{self.steps_lost} step(s) lost:"
        ]
        lines += [
            f"  rollback {i}: at step {r.step} ({r.trigger}) restored step {r.restored_to}"
            for i, r in enumerate(self._history, 1)
        ]
        lines.append(_ADVICE)
        return "\n".join(lines)

    # ------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Counters, history, loss window and streaks (primitives only)."""
        others = [[i, n] for i, n in sorted(self._other_streaks.items()) if n]
        return {
            **({"other_streaks": others} if others else {}),
            "version": 1,
            "history": [[r.step, r.trigger, r.restored_to, *(() if r.counted else (False,))] for r in self._history],
            "losses": [[s, v] for s, v in self._losses],
            "recent": [[s, a] for s, a in self._recent],
            "nonfinite_streak": self._nonfinite_streak,
            "nonfinite_loss_streak": self._nonfinite_loss_streak,
            "rollbacks_total": self.rollbacks_total,
            "steps_lost": self.steps_lost,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; keys it lacks keep their defaults."""
        self._history = [
            RollbackRecord(int(h[0]), str(h[1]), int(h[2]), bool(h[3]) if len(h) > 3 else True)
            for h in state_dict.get("history", [])
        ]
        self._other_streaks = {int(i): int(n) for i, n in state_dict.get("other_streaks", [])}
        self._set_losses([(int(s), float(v)) for s, v in state_dict.get("losses", [])])
        self._recent.clear()
        self._recent.extend((int(s), bool(a)) for s, a in state_dict.get("recent", []))
        self._nonfinite_streak = int(state_dict.get("nonfinite_streak", 0))
        self._nonfinite_loss_streak = int(state_dict.get("nonfinite_loss_streak", 0))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(nonfinite_steps={self.nonfinite_steps}, nonfinite_loss_steps="
            f"{self.nonfinite_loss_steps}, runaway_steps={self.runaway_steps}, runaway_window={self.runaway_window},"
            f" runaway_mad={self.runaway_mad}, runaway_rel={self.runaway_rel}, max_rollbacks={self.max_rollbacks})"
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _check_nonneg(name: str, value: Any) -> float:
    plain = python_scalar(value)
    if not is_number(plain):
        raise TypeError(f"`{name}` must be a float >= 0, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(plain) and plain >= 0):
        raise ValueError(f"`{name}` must be a finite float >= 0, got {value!r}")
    return float(plain)


# ---------------------------------------------------------------------------------------------- wiring


class _BufferGuard:
    """Undo what a forward pass wrote into a model's persistent buffers (BatchNorm's running statistics).

    :meth:`save` keeps a device-side copy of the persistent buffers (the ones a ``state_dict`` holds)
    before the step's first forward pass; :meth:`restore` puts it back when the step is skipped, so a
    skipped step leaves no trace in them. :meth:`check` is a scalar tensor that is ``0`` while every
    floating buffer is finite and ``nan`` otherwise: it rides in the reduced statistics vector, so every
    rank reads the same verdict. A model without persistent buffers costs nothing.
    """

    def __init__(self, model: nn.Module) -> None:
        seen: set[int] = set()
        buffers: list[Tensor] = []
        for module in model.modules():
            for buf in persistent_buffers(module):
                if id(buf) in seen:
                    continue
                seen.add(id(buf))
                buffers.append(_local(buf))
        self.buffers = buffers
        self.floating = [b for b in buffers if b.is_floating_point()]
        self.copies = [torch.empty_like(b) for b in buffers]
        self.saved = False
        self.trusted = True  # the copy holds buffers known to be finite
        self.finite_now = True  # the buffers were finite (or repaired) at the last decision

    @property
    def nbytes(self) -> int:
        """Device bytes held by the copy."""
        return sum(c.numel() * c.element_size() for c in self.copies)

    def save(self) -> None:
        if self.buffers:
            with torch.no_grad():
                foreach_copy_(self.copies, self.buffers)
            self.saved = True
            self.trusted = self.finite_now

    def restore(self) -> bool:
        """Put the copy back if it is known to be finite; returns whether it did."""
        if not (self.saved and self.trusted):
            return False
        with torch.no_grad():
            foreach_copy_(self.buffers, self.copies)
        return True

    def check(self) -> Tensor | None:
        if not self.floating:
            return None
        with torch.no_grad():
            norms = foreach_norm(self.floating, torch.float32)
            return torch.stack([n.to(norms[0].device) for n in norms]).double().sum() * 0.0


class Recovery:
    """A :class:`RollbackTrigger` and two alternating :class:`Snapshot` slots wired to GradGuard's engines.

    The front-end calls :meth:`attach` once the model, optimizers and schedulers exist, passes
    :meth:`state_check` to :meth:`GuardEngine.measure <lightning_gradguard.decide.engine.GuardEngine.measure>`,
    then calls :meth:`after_decide` at every optimizer step, right after :meth:`GuardEngine.decide
    <lightning_gradguard.decide.engine.GuardEngine.decide>` and before
    :func:`~lightning_gradguard.decide.engine.apply_outcome`. Decisions are taken from reduced values (the loss,
    the non-finite flags, the buffer check), so every rank acts at the same step.

    * **Every optimizer drives.** Each optimizer's non-finite streak can fire; the loss of optimizer 0
      feeds the loss checks. A rollback restores the whole state: the model (parameters and persistent
      buffers), every optimizer, every scheduler, the further ``modules`` and ``stateful`` objects
      (other callbacks), and GradGuard's own state of every engine (clip policy, LR guard,
      diagnostics). Counters are never rolled back.
    * **Two slots.** Snapshots are taken at healthy steps that are due (the first healthy step, every
      power of two below ``every_n_steps``, every multiple of ``every_n_steps``), alternately into two
      slots. A rollback restores the newest slot older than the first bad step; a slot whose restore
      was followed by another trigger before any new snapshot is not restored again.
    * **The remedy follows the cause.** A non-finite fault is restored without touching the LR; the LR
      guard lowers the LR when a runaway loss fired, or when the same trigger fires again within
      ``trigger.runaway_window`` steps of the previous rollback.
    * **Never a crash a run would have survived.** Rollbacks that restore a snapshot from the run's
      first ``every_n_steps`` steps do not count against ``max_rollbacks``. When no slot is left to
      restore, or ``max_rollbacks`` is spent, recovery falls back to skipping and clipping (and, for a
      runaway loss, one LR cut) and training goes on; it raises :class:`RecoveryError` only when the
      run cannot continue: the skip streak reached ``max_consecutive_skips`` after rollbacks were
      tried, or module buffers are non-finite with nothing to restore.
    * **Skipped steps leave no trace in buffers.** The persistent buffers are copied on the device
      after every decision (the values the next forward pass starts from) and put back when a step is
      skipped or the check finds them non-finite.

    Args:
        trigger: the trigger (its state is GradGuard's ``state_dict()["recovery"]``).
        every_n_steps: the snapshot interval (see above).
    """

    def __init__(self, trigger: RollbackTrigger, every_n_steps: int = SNAPSHOT_EVERY_N_STEPS) -> None:
        if not isinstance(trigger, RollbackTrigger):
            raise TypeError(f"`trigger` must be a RollbackTrigger, got {type(trigger).__name__}")
        self.trigger = trigger
        self.every_n_steps = check_int("snapshot_every_n_steps", every_n_steps, 1)
        self.snapshots: list[Snapshot] = []
        self.buffers: _BufferGuard | None = None
        self._failed: set[int] = set()  # slots whose restore was followed by a trigger before any new snapshot
        self._last_slot: int | None = None
        self._captures_since_rollback = 0
        self._declined = False

    @property
    def snapshot(self) -> Snapshot | None:
        """The newest snapshot slot (``None`` before :meth:`attach` or after :meth:`release`)."""
        taken = [s for s in self.snapshots if s.step is not None]
        if taken:
            return max(taken, key=lambda s: s.step or 0)
        return self.snapshots[0] if self.snapshots else None

    @snapshot.setter
    def snapshot(self, value: None) -> None:
        if value is not None:
            raise TypeError("`snapshot` can only be set to None (release); use attach() to start snapshotting")
        self.release()

    def release(self) -> None:
        """Drop the snapshots and buffer copies (host memory and references to the model and optimizers)."""
        self.snapshots = []
        self.buffers = None

    def attach(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        schedulers: Any | Sequence[Any] | None = None,
        *,
        modules: Sequence[nn.Module] = (),
        stateful: Sequence[Any] = (),
    ) -> None:
        """Start snapshotting (drops any earlier snapshot).

        Args:
            model: the trained module.
            optimizers: every optimizer.
            schedulers: every LR scheduler.
            modules: further modules that belong to the training state (a weight-averaging callback's
                averaged model).
            stateful: further objects with ``state_dict`` / ``load_state_dict`` (other callbacks).
        """
        self.snapshots = [Snapshot(model, optimizers, schedulers, modules=modules, stateful=stateful) for _ in range(2)]
        self.buffers = _BufferGuard(model)
        self.buffers.save()
        self._failed.clear()
        self._last_slot = None
        self._captures_since_rollback = 0
        self._declined = False

    @property
    def nbytes(self) -> int:
        """Host bytes of both snapshot slots plus device bytes of the buffer copy."""
        return sum(s.nbytes for s in self.snapshots) + (self.buffers.nbytes if self.buffers else 0)

    def state_check(self) -> Tensor | None:
        """A scalar to send with the step's statistics: ``nan`` when a floating module buffer is non-finite."""
        return self.buffers.check() if self.buffers is not None else None

    def metrics(self) -> dict[str, float]:
        """``gradguard/rollbacks_total`` and ``gradguard/steps_lost``, for the log steps."""
        from lightning_gradguard.keys import tag

        return {
            tag("rollbacks_total"): float(self.trigger.rollbacks_total),
            tag("steps_lost"): float(self.trigger.steps_lost),
        }

    def _due(self, step: int) -> bool:
        newest = self.snapshot
        if newest is None or newest.step is None or newest.layout_changed:
            return True
        every = self.every_n_steps
        return step % every == 0 or (step < every and step & (step - 1) == 0)

    def _capture_slot(self, step: int) -> int:
        """The slot a capture overwrites: a failed one, an empty one, else the older one.

        Within the first ``every_n_steps`` steps the run's first snapshot is kept and the other slot
        takes the early captures: a runaway in the first steps can still go back to where the run began.
        """
        if self._failed:
            return min(self._failed)
        empty = [i for i, s in enumerate(self.snapshots) if s.step is None]
        if empty:
            return empty[0]
        by_age = sorted(range(len(self.snapshots)), key=lambda i: self.snapshots[i].step or 0)
        return by_age[-1] if step < self.every_n_steps else by_age[0]

    def _target(self, decision: RollbackDecision) -> int | None:
        """The slot to restore, ``None`` if none is left.

        The newest slot older than the first bad step that has not failed before. After a runaway loss
        the slot must also be known good: at least ``runaway_steps`` steps older than the first loss
        above the threshold (a loss can climb for a while before it crosses it); failing that, the
        oldest slot.
        """
        if self._last_slot is not None and self._captures_since_rollback == 0:
            self._failed.add(self._last_slot)  # restored, and trouble came back before any new snapshot
        first_bad = decision.step if decision.first_bad is None else decision.first_bad
        candidates = sorted(
            (
                i
                for i, s in enumerate(self.snapshots)
                if s.step is not None and s.step < first_bad and i not in self._failed
            ),
            key=lambda i: self.snapshots[i].step or 0,
            reverse=True,
        )
        if not candidates:
            return None
        if decision.trigger == "loss_runaway":
            margin = self.trigger.runaway_steps
            proven = [i for i in candidates if (self.snapshots[i].step or 0) + margin <= first_bad]
            return proven[0] if proven else candidates[-1]
        return candidates[0]

    def after_decide(
        self, engine: GuardEngine, outcome: StepOutcome, engines: Sequence[GuardEngine]
    ) -> tuple[StepOutcome, RecoveryError | None]:
        """Feed the trigger; roll back, fall back, snapshot, or do nothing; returns the outcome to apply and any error.

        Args:
            engine: the engine that decided ``outcome`` (any optimizer's).
            outcome: what it decided.
            engines: every engine of the front-end (their own state is snapshotted and restored).

        Returns:
            ``(outcome, error)``: on a rollback the outcome is marked skipped, its streak error cleared and
            a ``"rollback"`` event added; ``error`` is a :class:`RecoveryError` to raise (every rank, same
            step) once the step has been reported, else ``None``.
        """
        if engine.monitor_only or not self.snapshots:
            return outcome, None
        step = outcome.step
        buffers = self.buffers
        state_bad = not engine.state_finite
        repaired = state_bad and buffers is not None and buffers.restore()
        # A step the AMP GradScaler skips is its calibration's business: its gradients are not counted
        # and a finite loss stays out of the runaway window. A non-finite loss is fed: the loss is
        # unscaled, so no loss scale can make it finite (a NaN loss is NaN at any scale).
        scaler = outcome.scaler_skipped
        loss = outcome.loss if engine.index == 0 else None
        if scaler and loss is not None and math.isfinite(loss):
            loss = None
        decision = self.trigger.update(
            step,
            loss=loss,
            nonfinite=(not outcome.stats.finite and not scaler) or state_bad,
            skipped=outcome.skipped or scaler or state_bad,
            source=engine.index,
        )
        if state_bad and not repaired and not decision.rollback and decision.error is None:
            what = "non-finite module buffers (e.g. BatchNorm statistics) with no finite copy to put back"
            decision = self.trigger.fire(step, "nonfinite_state", what, decision.evidence)
        # Escalation: a non-finite streak that reached `max_consecutive_skips` rolls back before it stops.
        streak_error = outcome.error is not None and engine.on_nonfinite == "skip"
        if streak_error and not decision.rollback and decision.error is None:
            streak = engine.counters.consecutive_skips
            what = f"{streak} consecutive steps with non-finite gradients"
            decision = self.trigger.fire(step, "nonfinite_grad", what, decision.evidence, step - streak + 1)
        if decision.rollback or decision.error is not None:
            if engine.on_nonfinite == "raise" and outcome.error is not None:
                return outcome, None
            slot = self._target(decision) if decision.error is None else None
            with _scheduler_lrs(engines):
                if slot is not None:
                    outcome = self._roll_back(decision, outcome, engines, slot)
                    self._save_buffers(True)
                    return outcome, None
                outcome, error = self._fall_back(decision, outcome, engines)
            self._save_buffers(not state_bad or repaired)
            return outcome, error
        if state_bad and not outcome.skipped and not scaler:
            text = (
                f"skipped optimizer step {step}: non-finite module buffers after the forward pass (e.g. BatchNorm "
                "statistics of a batch with a non-finite sample); buffers put back to their values before the step"
            )
            event = GuardEvent("skipped", step, text, evidence={"buffers_restored": int(repaired)})
            outcome = replace(outcome, skipped=True, clipped=False, coefficient=None, events=(*outcome.events, event))
            engine.counters.skipped_total += 1
            engine.interval.skipped += 1
        elif outcome.skipped and buffers is not None and not state_bad:
            buffers.restore()  # the step leaves no trace in the running statistics
        if decision.snapshot_ok:
            self._declined = False
        if engine.index == 0 and decision.snapshot_ok and not state_bad and self._due(step):
            slot = self._capture_slot(step)
            with _scheduler_lrs(engines):
                self.snapshots[slot].capture(step, extra={"engines": {str(e.index): _own_state(e) for e in engines}})
            self._failed.discard(slot)
            self._captures_since_rollback += 1
        self._save_buffers(not state_bad or repaired)
        return outcome, None

    def _save_buffers(self, finite: bool) -> None:
        """Copy the buffers the next forward pass starts from (``finite``: they are known to be finite)."""
        if self.buffers is not None:
            self.buffers.finite_now = finite
            self.buffers.save()

    def _lower_lr(self, engines: Sequence[GuardEngine]) -> tuple[float, float] | None:
        scales = [e.lr_guard.force_reduction() for e in engines if e.lr_guard is not None]
        return scales[0] if scales else None

    def _roll_back(
        self, decision: RollbackDecision, outcome: StepOutcome, engines: Sequence[GuardEngine], slot: int
    ) -> StepOutcome:
        snapshot = self.snapshots[slot]
        assert snapshot.step is not None
        saved = snapshot.extra.get("engines", {})
        restored_to = snapshot.restore()
        history = self.trigger.history
        last = history[-1] if history else None
        again = (
            last is not None
            and last.trigger == decision.trigger
            and decision.step - last.step <= self.trigger.runaway_window
        )
        cut = decision.trigger == "loss_runaway" or again
        counted = restored_to >= self.every_n_steps
        record = self.trigger.record_rollback(decision, restored_to, counted=counted)
        self._last_slot = slot
        self._captures_since_rollback = 0
        self._declined = False
        for e in engines:
            _load_own_state(e, saved.get(str(e.index)))
            e.counters.consecutive_skips = 0
        lr_scale = engines[0].lr_guard.lr_scale if engines and engines[0].lr_guard is not None else 1.0
        before = after = lr_scale
        if cut:
            scales = self._lower_lr(engines)
            if scales is not None:
                before, after = scales
                lr_text = f"LR scale {before:.4g} -> {after:.4g}"
            else:
                lr_text = "LR unchanged (no LR guard)"
        else:
            lr_text = f"LR scale kept at {before:.4g} (a non-finite fault is not evidence of a too-high LR)"
        note = "" if counted else " (an early rollback: not counted against max_rollbacks)"
        message = (
            f"rollback {self.trigger.rollbacks_total}/{self.trigger.max_rollbacks}: {decision.message}; restored "
            f"step {restored_to} ({record.steps_lost} step(s) lost), {lr_text}, step {decision.step} skipped{note}"
        )
        evidence = dict(decision.evidence)
        evidence.update(
            trigger=str(decision.trigger),
            restored_to=restored_to,
            steps_lost=record.steps_lost,
            rollbacks_total=self.trigger.rollbacks_total,
            counted=int(counted),
            lr_scale_before=before,
            lr_scale=after,
        )
        event = GuardEvent("rollback", decision.step, message, evidence=evidence)
        return replace(
            outcome, skipped=True, clipped=False, coefficient=None, error=None, events=(*outcome.events, event)
        )

    def _fall_back(
        self, decision: RollbackDecision, outcome: StepOutcome, engines: Sequence[GuardEngine]
    ) -> tuple[StepOutcome, RecoveryError | None]:
        """No rollback: skip (non-finite) or clip (runaway) and go on; raise only when the run cannot continue."""
        step = decision.step
        self.trigger.decline(decision)
        events = outcome.events
        if not self._declined:
            self._declined = True
            if decision.error is not None:
                why = f"max_rollbacks={self.trigger.max_rollbacks} spent"
            else:
                why = f"no snapshot from before step {decision.first_bad} left to restore"
            lr_text = ""
            if decision.trigger == "loss_runaway":
                scales = self._lower_lr(engines)
                if scales is not None:
                    lr_text = f", LR scale {scales[0]:.4g} -> {scales[1]:.4g}"
            message = (
                f"no rollback at step {step}: {decision.reason} ({decision.trigger}), but {why}; "
                f"training continues with skipping and clipping{lr_text}"
            )
            evidence = dict(decision.evidence)
            evidence.update(trigger=str(decision.trigger), rollbacks_total=self.trigger.rollbacks_total)
            events = (*events, GuardEvent("rollback", step, message, evidence=evidence))
        stop = outcome.error is not None and _stops_by_skipping(outcome)
        if decision.trigger == "nonfinite_state" or (stop and self.trigger.rollbacks_total > 0):
            what = decision.reason if not stop else f"{decision.reason}; {outcome.error}"
            error = RecoveryError(self.trigger._error_message(step, str(decision.trigger), what))
            return replace(outcome, skipped=True, error=None, events=events), error
        return replace(outcome, events=events), None


def _stops_by_skipping(outcome: StepOutcome) -> bool:
    """Whether ``outcome`` stops training through the skip streak (rather than ``on_nonfinite="raise"``)."""
    return outcome.skipped or outcome.scaler_skipped


@contextlib.contextmanager
def _scheduler_lrs(engines: Sequence[GuardEngine]) -> Iterator[None]:
    """The param groups hold the schedulers' own LRs (not the LR guard's scaled ones) within the block."""
    with contextlib.ExitStack() as stack:
        for e in engines:
            if e.lr_guard is not None:
                stack.enter_context(e.lr_guard.scheduler_lrs())
        yield


def _own_state(engine: GuardEngine) -> dict[str, Any]:
    """The parts of an engine's state a rollback puts back (the clip policy, LR guard and diagnostics)."""
    state: dict[str, Any] = {}
    if engine.policy is not None:
        state["policy"] = engine.policy.state_dict()
    if engine.lr_guard is not None:
        state["lr_guard"] = engine.lr_guard.state_dict()
    if engine.diagnostics is not None:
        state["diagnostics"] = engine.diagnostics.state_dict()
    return state


def _load_own_state(engine: GuardEngine, state: Mapping[str, Any] | None) -> None:
    if not state:
        return
    if engine.policy is not None and "policy" in state:
        engine.policy.load_state_dict(dict(state["policy"]))
    if engine.lr_guard is not None and "lr_guard" in state:
        # The detector goes back to the snapshot; the LR scale does not: the cuts made since (by the
        # detector or by earlier rollbacks) stay, and the rollback's own cut comes on top.
        saved = dict(state["lr_guard"])
        saved.update(lr_scale=engine.lr_guard.lr_scale, num_reductions=engine.lr_guard.num_reductions)
        engine.lr_guard.load_state_dict(saved)
    if engine.diagnostics is not None and "diagnostics" in state:
        # The norm windows go back to the snapshot (the blown-up norms leave the baselines); the account
        # of the run does not: the log steps observed, their span, open episodes and the verdict records
        # stay, so the end-of-fit summary still covers the whole run.
        diag = dict(state["diagnostics"])
        current = engine.diagnostics.state_dict()
        layers = {name: dict(layer) for name, layer in diag.get("layers", {}).items()}
        for name, now in current["layers"].items():
            merged = layers.setdefault(name, {"history": [], "numel": now["numel"]})
            merged.update(active=now["active"], records=now["records"])
        diag.update(
            observations=current["observations"],
            first_step=current["first_step"],
            last_step=current["last_step"],
            layers=layers,
        )
        engine.diagnostics.load_state_dict(diag)
