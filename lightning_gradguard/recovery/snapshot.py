"""Snapshot: the last good training state of this rank, in host buffers allocated once and reused.

:class:`Snapshot` copies the model's parameters and buffers (the local shard of a ``DTensor``), the optimizers'
state and hyper-parameters, the LR schedulers' state and an opaque dict of the caller's own state into host
buffers, and copies them back *in place* (``copy_`` into the same tensors, so DDP / FSDP2 wrappers keep their
storage). :class:`_BufferGuard` keeps a device copy of the persistent buffers, so a skipped step leaves no trace
in them.

Nothing here imports Lightning.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard._checks import check_bool, check_int
from lightning_gradguard._compat import foreach_copy_, foreach_norm, persistent_buffers

__all__ = ["Snapshot"]


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


_ATOMS = (int, float, str, bool, bytes, type(None))  # immutable: shared, not copied


def _copy_tree(value: Any) -> Any:
    """A deep copy of ``value`` whose tensors are detached host copies."""
    if type(value) in _ATOMS:
        return value
    if isinstance(value, Tensor):
        return _local(value).detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _copy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_tree(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy_tree(v) for v in value)
    return copy.deepcopy(value)


# Copies a capture queues: (host targets, their sources) copied blocking, then (pinned targets, sources) non-blocking.
_Copies = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


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
        # Slots are matched (allocated where needed) first; the copies then go in one fused call per kind
        # (blocking host copies, non-blocking copies into pinned buffers) instead of one call per tensor.
        copies: _Copies = ([], [], [], [])
        with torch.no_grad():
            tensors = list(self._model_tensors())
            if len(self._model_slots) != len(tensors):
                self._model_slots = []
            for i, t in enumerate(tensors):
                old = self._model_slots[i] if i < len(self._model_slots) else None
                slot = self._copy_out(t, old, devices, copies)
                if old is None:
                    self._model_slots.append(slot)
            self._capture_optimizers(devices, copies)
            targets, sources, pinned_targets, pinned_sources = copies
            if targets:
                foreach_copy_(targets, sources)
            if pinned_targets:
                foreach_copy_(pinned_targets, pinned_sources, non_blocking=True)
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

    def _copy_out(self, t: Tensor, slot: _Slot | None, devices: set[torch.device], copies: _Copies) -> _Slot:
        """Queue a copy of ``t`` (its local shard) into ``slot``'s buffer on ``copies``, allocating a new slot if it
        does not fit."""
        spec = None
        if _is_dtensor(t):
            spec = (t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))  # type: ignore[attr-defined]
            t = t.to_local()  # type: ignore[attr-defined]
        local = t.detach()
        if slot is None or slot.buffer.shape != local.shape or slot.buffer.dtype != local.dtype:
            pin = self._pin(local)
            slot = _Slot(torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin), local.device)
        slot.device = local.device
        slot.dtensor_spec = spec
        if local.device.type == "cpu":
            copies[0].append(slot.buffer)
            copies[1].append(local)
            return slot
        devices.add(local.device)
        pinned = slot.buffer.is_pinned()
        copies[2 if pinned else 0].append(slot.buffer)
        copies[3 if pinned else 1].append(local)
        return slot

    def _capture_optimizers(self, devices: set[torch.device], copies: _Copies) -> None:
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
                            entries[name] = self._copy_out(
                                value, prev if isinstance(prev, _Slot) else None, devices, copies
                            )
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
