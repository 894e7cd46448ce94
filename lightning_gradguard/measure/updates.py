"""Per-layer weight norm and update-to-weight ratio over one optimizer step (pure torch, no Lightning).

The update-to-weight ratio ``||w_after - w_before|| / ||w_after||`` of a layer says how far one
optimizer step moves its weights relative to their size. Practitioners read its log10: around -3 is
the usual band for Adam-style training; a layer far above it is moving too fast for its learning rate,
one far below it is barely learning (see :func:`lightning_gradguard.decide.diagnostics.update_ratio_verdicts`).

:class:`UpdateTracker` works at log steps only and in two calls around ``optimizer.step()``:

* :meth:`UpdateTracker.snapshot` (before the step) copies the weights that have a gradient this step,
  one fused ``torch._foreach_mul`` per ``(device, dtype)`` bucket; nothing reaches the host;
* :meth:`UpdateTracker.squared_norms` (after the step) turns the copies into ``w_before - w_after``
  in place, takes one ``torch._foreach_norm`` of the differences and one of the weights per bucket and
  sums them per layer into a float64 vector on the device, with the same layer grouping (and the same
  weighting of replicated shards) as :class:`~lightning_gradguard.measure.stats.GradStats`. The copies are
  released.
* :meth:`UpdateTracker.read` brings that vector to the host in one transfer. Under data parallelism
  with sharded weights (FSDP), SUM-reduce the vector across ranks first, exactly like the gradient
  statistics vector (the two can be concatenated and reduced together).

The cost is one copy of the touched weights (memory and a read/write pass) and two norm passes, at
log steps only; ``benchmarks/bench_updates.py`` measures it against a training step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gradguard._checks import check_bool
from lightning_gradguard._compat import foreach_copy_, foreach_mul, foreach_norm, foreach_sub_
from lightning_gradguard.keys import tag
from lightning_gradguard.measure.stats import GradStats, _local

__all__ = ["UpdateStats", "UpdateTracker", "log10_update_ratio", "update_metrics"]


def log10_update_ratio(update_norm: float, weight_norm: float) -> float:
    """``log10(update_norm / weight_norm)``: ``-inf`` for a zero update, ``nan`` without weights.

    Example:

        >>> log10_update_ratio(0.003, 3.0)
        -3.0
    """
    if not (math.isfinite(update_norm) and math.isfinite(weight_norm)) or weight_norm <= 0.0:
        return math.nan
    if update_norm == 0.0:
        return -math.inf
    return math.log10(update_norm / weight_norm)


@dataclass(frozen=True)
class UpdateStats:
    """Host-side view of one step's per-layer update and weight norms.

    Attributes:
        layers: layer names, in model order (those of the :class:`~lightning_gradguard.measure.stats.GradStats`).
        update_norms: L2 norm of each layer's weight change over the step (``0.0`` for a layer none
            of whose weights had a gradient).
        weight_norms: L2 norm of each layer's touched weights after the step.
        start_norms: L2 norm of the same weights before the step (empty when not measured).
    """

    layers: Sequence[str]
    update_norms: Sequence[float]
    weight_norms: Sequence[float]
    start_norms: Sequence[float] = ()

    def log10_ratios(self) -> dict[str, float]:
        """Layer name -> :func:`log10_update_ratio`, for every layer with touched weights."""
        return {
            name: log10_update_ratio(du, w)
            for name, du, w in zip(self.layers, self.update_norms, self.weight_norms, strict=True)
            if w > 0.0 or not math.isfinite(w)
        }


def update_metrics(stats: UpdateStats, optimizer_idx: int = 0) -> dict[str, float]:
    """The ``weight_norm/{layer}`` and ``update_ratio/{layer}`` scalars of one log step.

    Layers without touched weights are left out, and so are non-finite ratios (a zero update gives
    ``-inf``, which no chart can draw; the diagnostics still see it through
    :meth:`UpdateStats.log10_ratios`).
    """
    out: dict[str, float] = {}
    ratios = stats.log10_ratios()
    for name, w in zip(stats.layers, stats.weight_norms, strict=True):
        if name not in ratios:
            continue
        out[tag("weight_norm/{layer}", optimizer_idx, name)] = w
        if math.isfinite(ratios[name]):
            out[tag("update_ratio/{layer}", optimizer_idx, name)] = ratios[name]
    return out


@dataclass
class _Bucket:
    positions: list[int]  # indices into GradStats.params
    index: Tensor  # layer index of each position, on the statistics device
    weight: Tensor | None  # per-position weight of the squared norms (replicated shards), None: all 1


class UpdateTracker:
    """Weight norms and update-to-weight ratios per layer, from a copy taken before the step.

    Args:
        stats: the :class:`~lightning_gradguard.measure.stats.GradStats` of the optimizer; its parameters,
            layer grouping and shard weighting are reused.
        keep_buffers: keep the copy buffers between log steps and refill them in place
            (``torch._foreach_copy_``) instead of allocating fresh copies at every log step. Saves the
            allocation (page faults on CPU) at the price of one resident copy of the weights.

    Example:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> tracker = UpdateTracker(GradStats(model.named_parameters()))
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[3.0, 4.0]]))
        >>> model.weight.grad = torch.ones_like(model.weight)
        >>> tracker.snapshot()
        >>> with torch.no_grad():
        ...     _ = model.weight.sub_(torch.tensor([[0.0, -0.005]]))  # the "optimizer step"
        >>> s = tracker.read(tracker.squared_norms())
        >>> round(s.update_norms[0], 4), round(s.weight_norms[0], 3)
        (0.005, 5.004)
    """

    def __init__(self, stats: GradStats, keep_buffers: bool = False) -> None:
        self._stats = stats
        self.keep_buffers = check_bool("keep_buffers", keep_buffers)
        self._buffers: dict[int, list[Tensor]] = {}  # id(bucket) -> kept copy buffers
        self._plans: dict[tuple[bool, ...], list[_Bucket]] = {}
        self._pending: list[tuple[_Bucket, list[Tensor]]] | None = None

    @property
    def layers(self) -> list[str]:
        return self._stats.layers

    @property
    def pending(self) -> bool:
        """Whether a snapshot is waiting for :meth:`squared_norms`."""
        return self._pending is not None

    def _plan(self) -> list[_Bucket]:
        params = self._stats.params
        present = tuple(p.grad is not None for p in params)
        plan = self._plans.get(present)
        if plan is not None:
            return plan
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for pos, (param, has_grad) in enumerate(zip(params, present, strict=True)):
            if has_grad:
                local = _local(param)
                by_key.setdefault((local.device, local.dtype), []).append(pos)
        layer_of, weight_of = self._stats._param_layer, self._stats._param_weight
        device = self._stats.device
        plan = []
        for positions in by_key.values():
            index = torch.tensor([layer_of[p] for p in positions], dtype=torch.long, device=device)
            weights = [weight_of[p] for p in positions]
            weight = None
            if any(w != 1.0 for w in weights):
                weight = torch.tensor(weights, dtype=torch.float64, device=device)
            plan.append(_Bucket(positions, index, weight))
        self._plans[present] = plan
        return plan

    def _weights(self, bucket: _Bucket) -> list[Tensor]:
        params = self._stats.params
        return [_local(params[p]).detach() for p in bucket.positions]

    def snapshot(self) -> None:
        """Copy the weights that have a gradient now (call right before ``optimizer.step()``)."""
        pending: list[tuple[_Bucket, list[Tensor]]] = []
        with torch.no_grad():
            for bucket in self._plan():
                weights = self._weights(bucket)
                if not self.keep_buffers:
                    pending.append((bucket, foreach_mul(weights, 1.0)))
                    continue
                buffers = self._buffers.get(id(bucket))
                if buffers is None:
                    buffers = self._buffers[id(bucket)] = [torch.empty_like(w) for w in weights]
                foreach_copy_(buffers, weights)
                pending.append((bucket, buffers))
        self._pending = pending

    def discard(self) -> None:
        """Drop a snapshot whose step did not happen (a skipped step)."""
        self._pending = None

    def squared_norms(self) -> Tensor:
        """Per-layer squared update and weight norms since :meth:`snapshot`, on the device.

        Returns:
            A float64 vector of length ``3 * num_layers``: the squared L2 norm of every layer's weight
            change, then the squared L2 norm of its touched weights after the step, then before it.
            Nothing is transferred.

        Raises:
            RuntimeError: without a pending :meth:`snapshot`.
        """
        if self._pending is None:
            raise RuntimeError("`UpdateTracker.squared_norms` needs a `snapshot()` taken before the optimizer step")
        n = self._stats.num_layers
        device = self._stats.device
        out = torch.zeros(3, n, dtype=torch.float64, device=device)
        with torch.no_grad():
            for bucket, before in self._pending:
                after = self._weights(bucket)
                low = before[0].dtype not in (torch.float32, torch.float64) and not before[0].is_complex()
                dtype = torch.float32 if low else None
                w0 = torch.stack(foreach_norm(before, dtype))
                foreach_sub_(before, after)  # the copies become the (negated) update
                du = torch.stack(foreach_norm(before, dtype))
                w = torch.stack(foreach_norm(after, dtype))
                sq = torch.stack([du, w, w0]).to(device=device, dtype=torch.float64).square()
                if bucket.weight is not None:
                    sq = sq * bucket.weight
                out.index_add_(1, bucket.index, sq)
        self._pending = None
        return out.reshape(-1)

    def read(self, vector: Tensor) -> UpdateStats:
        """Bring a (possibly SUM-reduced) :meth:`squared_norms` vector to the host in one transfer."""
        values: list[float] = vector.tolist()
        n = self._stats.num_layers
        return UpdateStats(
            layers=self.layers,
            update_norms=[math.sqrt(v) for v in values[:n]],
            weight_norms=[math.sqrt(v) for v in values[n : 2 * n]],
            start_norms=[math.sqrt(v) for v in values[2 * n : 3 * n]],
        )
