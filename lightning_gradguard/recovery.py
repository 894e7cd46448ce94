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

from lightning_gradguard._validation import check_bool, check_int, is_number, python_scalar
from lightning_gradguard.engine import GradGuardError, GuardEngine, StepOutcome
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

Trigger = Literal["nonfinite_grad", "nonfinite_loss", "loss_runaway"]
#: Default snapshot interval (optimizer steps). Measured by ``benchmarks/bench_snapshot.py``: one capture costs
#: 2.5-7.4 % of a training step on CPU (1M-50M parameters, AdamW), so every 100 steps amortises to <= 0.08 %,
#: leaving room for GPUs, where the step is shorter and the copy is bound by host bandwidth.
SNAPSHOT_EVERY_N_STEPS = 100
#: The names a rollback's trigger can take.
TRIGGERS: tuple[str, ...] = ("nonfinite_grad", "nonfinite_loss", "loss_runaway")


class RecoveryError(GradGuardError):
    """Raised on every rank, at the same step, when a trigger fires after ``max_rollbacks`` rollbacks."""


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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.optimizers: list[torch.optim.Optimizer] = _as_list(optimizers, torch.optim.Optimizer, "optimizers")
        self.schedulers: list[Any] = _as_list(schedulers, None, "schedulers")
        for i, sched in enumerate(self.schedulers):
            if not (callable(getattr(sched, "state_dict", None)) and callable(getattr(sched, "load_state_dict", None))):
                raise TypeError(
                    f"`schedulers[{i}]` must have `state_dict` and `load_state_dict`, got {type(sched).__name__}"
                )
        self.pin_memory = None if pin_memory is None else check_bool("pin_memory", pin_memory)
        self._step: int | None = None
        self._model_slots: list[_Slot] = []
        # (optimizer, group, index in group) -> {state key -> slot or copied value}; None: no state.
        self._opt_state: dict[tuple[int, int, int], dict[str, Any] | None] = {}
        self._opt_groups: list[list[dict[str, Any]]] = []
        self._opt_layout: list[list[int]] = []
        self._sched_states: list[dict[str, Any]] = []
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
        yield from self.model.parameters()
        yield from self.model.buffers()

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
        error: set instead of a rollback once ``max_rollbacks`` rollbacks were spent; raise it.
    """

    step: int
    rollback: bool = False
    trigger: str | None = None
    message: str = ""
    evidence: Mapping[str, float | int | str] = field(default_factory=dict)
    snapshot_ok: bool = False
    error: RecoveryError | None = None


@dataclass(frozen=True)
class RollbackRecord:
    """One rollback: at ``step``, because of ``trigger``, the state of ``restored_to`` was restored."""

    step: int
    trigger: str
    restored_to: int

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
        self._nonfinite_loss_streak = 0
        self._history: list[RollbackRecord] = []

    # ---------------------------------------------------------------- counters

    @property
    def rollbacks_total(self) -> int:
        """Rollbacks recorded so far."""
        return len(self._history)

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
        self, step: int, loss: float | None = None, nonfinite: bool = False, skipped: bool = False
    ) -> RollbackDecision:
        """Feed one optimizer step and decide.

        Args:
            step: the optimizer step (any increasing counter, e.g. ``trainer.global_step``).
            loss: the step's training loss, reduced across ranks; ``None`` turns the loss checks off
                for this step.
            nonfinite: the step's gradients are non-finite on some rank (reduced).
            skipped: the optimizer step is skipped for any reason (GradGuard, the GradScaler).
        """
        step = int(step)
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
            healthy = loss_finite and not nonfinite and not skipped and n_above == 0
            return RollbackDecision(step=step, evidence=evidence, snapshot_ok=healthy)
        if self.rollbacks_total >= self.max_rollbacks:
            error = RecoveryError(self._error_message(step, trigger, what))
            return RollbackDecision(step=step, trigger=trigger, message=str(error), evidence=evidence, error=error)
        message = f"step {step}: {what}: rolling back to the last good snapshot"
        return RollbackDecision(step=step, rollback=True, trigger=trigger, message=message, evidence=evidence)

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

    def record_rollback(self, decision: RollbackDecision, restored_to: int) -> RollbackRecord:
        """Count the rollback ``decision`` asked for, now that the state of step ``restored_to`` is back.

        Resets the streaks and forgets the losses observed after ``restored_to`` (they belong to the
        discarded trajectory).
        """
        if not decision.rollback or decision.trigger is None:
            raise ValueError(f"`decision` did not ask for a rollback: {decision!r}")
        restored_to = check_int("restored_to", restored_to, 0)
        record = RollbackRecord(step=decision.step, trigger=decision.trigger, restored_to=restored_to)
        self._history.append(record)
        self._nonfinite_streak = self._nonfinite_loss_streak = 0
        self._recent.clear()
        self._set_losses([(s, v) for s, v in self._losses if s <= restored_to])
        return record

    def _error_message(self, step: int, trigger: str, what: str) -> str:
        lines = [
            f"GradGuard recovery gave up at step {step}: {what} ({trigger}), after {self.rollbacks_total} "
            f"rollback(s) (max_rollbacks={self.max_rollbacks}), {self.steps_lost} step(s) lost:"
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
        return {
            "version": 1,
            "history": [[r.step, r.trigger, r.restored_to] for r in self._history],
            "losses": [[s, v] for s, v in self._losses],
            "recent": [[s, a] for s, a in self._recent],
            "nonfinite_streak": self._nonfinite_streak,
            "nonfinite_loss_streak": self._nonfinite_loss_streak,
            "rollbacks_total": self.rollbacks_total,
            "steps_lost": self.steps_lost,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; keys it lacks keep their defaults."""
        self._history = [RollbackRecord(int(s), str(t), int(r)) for s, t, r in state_dict.get("history", [])]
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


class Recovery:
    """A :class:`RollbackTrigger` and a :class:`Snapshot` wired to GradGuard's engines (every front-end).

    The front-end calls :meth:`attach` once the model, optimizers and schedulers exist, then
    :meth:`after_decide` at every optimizer step, right after :meth:`GuardEngine.decide
    <lightning_gradguard.engine.GuardEngine.decide>` and before
    :func:`~lightning_gradguard.engine.apply_outcome`. The decision is taken from the outcome (the loss
    and the non-finite flag come from the reduced statistics vector), so every rank acts at the same step.

    The first optimizer (index 0) drives recovery; the snapshot holds every optimizer. On a rollback, in
    this order: the model, optimizers and schedulers are restored; GradGuard's own state of every engine
    (clip policy, LR guard, diagnostics) is restored; the LR guard of every engine lowers the LR
    (:meth:`~lightning_gradguard.lr_guard.LRGuard.force_reduction`, scheduler-proof); the step is
    skipped. Counters (steps, totals) are never rolled back.

    Args:
        trigger: the trigger (its state is GradGuard's ``state_dict()["recovery"]``).
        every_n_steps: take a snapshot at healthy steps whose index is a multiple of this (and at the
            first healthy step, so the first rollback always has a target).
    """

    def __init__(self, trigger: RollbackTrigger, every_n_steps: int = SNAPSHOT_EVERY_N_STEPS) -> None:
        if not isinstance(trigger, RollbackTrigger):
            raise TypeError(f"`trigger` must be a RollbackTrigger, got {type(trigger).__name__}")
        self.trigger = trigger
        self.every_n_steps = check_int("snapshot_every_n_steps", every_n_steps, 1)
        self.snapshot: Snapshot | None = None

    def attach(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        schedulers: Any | Sequence[Any] | None = None,
    ) -> None:
        """Start snapshotting ``model``, ``optimizers`` and ``schedulers`` (drops any earlier snapshot)."""
        self.snapshot = Snapshot(model, optimizers, schedulers)

    def metrics(self) -> dict[str, float]:
        """``gradguard/rollbacks_total`` and ``gradguard/steps_lost``, for the log steps."""
        from lightning_gradguard.keys import tag

        return {
            tag("rollbacks_total"): float(self.trigger.rollbacks_total),
            tag("steps_lost"): float(self.trigger.steps_lost),
        }

    def after_decide(
        self, engine: GuardEngine, outcome: StepOutcome, engines: Sequence[GuardEngine]
    ) -> tuple[StepOutcome, RecoveryError | None]:
        """Feed the trigger; roll back, snapshot, or do nothing; returns the outcome to apply and any error.

        Args:
            engine: the engine that decided ``outcome`` (only index 0 drives recovery).
            outcome: what it decided.
            engines: every engine of the front-end (their own state is snapshotted and restored).

        Returns:
            ``(outcome, error)``: on a rollback the outcome is marked skipped, its streak error cleared and
            a ``"rollback"`` event added; ``error`` is a :class:`RecoveryError` to raise (every rank, same
            step) once the step has been reported, else ``None``.
        """
        if engine.index != 0 or engine.monitor_only or self.snapshot is None:
            return outcome, None
        step = outcome.step
        # A step the AMP GradScaler skips is its calibration's business: its gradients are not counted
        # and a finite loss stays out of the runaway window. A non-finite loss is fed: the loss is
        # unscaled, so no loss scale can make it finite (a NaN loss is NaN at any scale).
        scaler = outcome.scaler_skipped
        loss = outcome.loss
        if scaler and loss is not None and math.isfinite(loss):
            loss = None
        decision = self.trigger.update(
            step,
            loss=loss,
            nonfinite=not outcome.stats.finite and not scaler,
            skipped=outcome.skipped or scaler,
        )
        snapshot = self.snapshot
        if decision.error is not None:
            return outcome, decision.error
        # Escalation: a non-finite streak that reached `max_consecutive_skips` rolls back before it stops.
        streak_error = outcome.error is not None and engine.on_nonfinite == "skip" and not decision.rollback
        room = self.trigger.rollbacks_total < self.trigger.max_rollbacks
        if streak_error and snapshot.step is not None and room:
            what = f"{engine.counters.consecutive_skips} consecutive steps with non-finite gradients"
            decision = RollbackDecision(
                step=step,
                rollback=True,
                trigger="nonfinite_grad",
                message=f"step {step}: {what}: rolling back to the last good snapshot",
                evidence=decision.evidence,
            )
        if decision.rollback and snapshot.step is not None and (engine.on_nonfinite != "raise" or not outcome.error):
            with _scheduler_lrs(engines):
                return self._roll_back(decision, outcome, engines), None
        # A param group added since the snapshot (BackboneFinetuning's unfreeze) makes the next healthy
        # step a snapshot step, so later rollbacks restore the new group's optimizer state too.
        due = snapshot.step is None or step % self.every_n_steps == 0 or snapshot.layout_changed
        if decision.snapshot_ok and due:
            with _scheduler_lrs(engines):
                snapshot.capture(step, extra={"engines": {str(e.index): _own_state(e) for e in engines}})
        return outcome, None

    def _roll_back(
        self, decision: RollbackDecision, outcome: StepOutcome, engines: Sequence[GuardEngine]
    ) -> StepOutcome:
        snapshot = self.snapshot
        assert snapshot is not None and snapshot.step is not None
        saved = snapshot.extra.get("engines", {})
        restored_to = snapshot.restore()
        record = self.trigger.record_rollback(decision, restored_to)
        scales = []
        for e in engines:
            _load_own_state(e, saved.get(str(e.index)))
            e.counters.consecutive_skips = 0
            if e.lr_guard is not None:
                scales.append(e.lr_guard.force_reduction())
        if scales:
            before, after = scales[0]
            lr_text = f"LR scale {before:.4g} -> {after:.4g}"
        else:
            before = after = 1.0
            lr_text = "LR unchanged (no LR guard)"
        message = (
            f"rollback {self.trigger.rollbacks_total}/{self.trigger.max_rollbacks}: {decision.message}; restored "
            f"step {restored_to} ({record.steps_lost} step(s) lost), {lr_text}, step {decision.step} skipped"
        )
        evidence = dict(decision.evidence)
        evidence.update(
            trigger=str(decision.trigger),
            restored_to=restored_to,
            steps_lost=record.steps_lost,
            rollbacks_total=self.trigger.rollbacks_total,
            lr_scale_before=before,
            lr_scale=after,
        )
        event = GuardEvent("rollback", decision.step, message, evidence=evidence)
        return replace(
            outcome, skipped=True, clipped=False, coefficient=None, error=None, events=(*outcome.events, event)
        )


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
