"""Per-layer gradient statistics in one pass over the gradients (pure torch, no Lightning).

:class:`GradStats` groups the parameters of an optimizer into *layers* and computes, for every
optimizer step, one small float64 vector holding each layer's squared L2 gradient norm. Everything
GradGuard decides (global norm, non-finite layers, clipping, LR guard, diagnostics) is derived from
that vector after a single device-to-host transfer; nothing is read per parameter on the host.

How the pass works:

* gradients are bucketed by ``(device, dtype)`` once per sparsity pattern (which parameters have a
  gradient) and the bucket plans are cached, so a step costs one ``torch._foreach_norm`` per bucket,
  one ``stack`` and one ``index_add_`` into the per-layer vector;
* low-precision gradients (fp16/bf16) are normed in float32 and squared in float64, so large layers
  neither overflow nor lose the small ones;
* complex gradients count by their magnitude: they are normed as their real view (``view_as_real``,
  whose L2 norm is the complex one), clipped by a real coefficient, and histogrammed by ``abs``;
* sharded gradients (``DTensor``, as FSDP2's ``fully_shard`` produces) contribute the squared norm of
  their local shard; :mod:`lightning_gradguard.measure.distributed` sums the vector across ranks. A shard held
  by several ranks (the ``Replicate`` dimensions of a 2-D mesh: HSDP, or tensor parallelism's
  replicated biases) is weighted by one over its number of holders, so the sum counts it once;
* a non-finite value anywhere in a layer makes that layer's entry NaN or inf, which is how
  non-finite layers are found without a second pass.

Histograms (:meth:`GradStats.histogram_ranges` and :meth:`GradStats.histogram_counts`) are built on
the device with fixed-width bins between each layer's min and max and shipped as bin counts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lightning_gradguard._compat import foreach_mul_, foreach_norm

__all__ = [
    "GradStats",
    "GroupBy",
    "HistogramData",
    "StepStats",
    "layer_name",
    "strip_compile_wrapper",
]

GroupBy = Literal["module", "param"] | int | Callable[[str], str]

# Offsets of the per-layer histogram row built by `histogram_counts`.
_H_NUM, _H_SUM, _H_SUMSQ, _H_BINS = 0, 1, 2, 3


_COMPILE_WRAPPER = "_orig_mod"  # the attribute under which torch.compile's OptimizedModule keeps the module


def strip_compile_wrapper(param_name: str) -> str:
    """``param_name`` without the ``_orig_mod`` components that ``torch.compile`` wrappers insert.

    Example:

        >>> strip_compile_wrapper("net._orig_mod.0.weight")
        'net.0.weight'
    """
    if _COMPILE_WRAPPER not in param_name:
        return param_name
    return ".".join(part for part in param_name.split(".") if part != _COMPILE_WRAPPER)


def layer_name(param_name: str, group_by: GroupBy) -> str:
    """Name of the layer a parameter belongs to.

    Args:
        param_name: dotted parameter name, as ``named_parameters()`` yields it.
        group_by: ``"module"`` (owning module: ``enc.0.linear.weight`` -> ``enc.0.linear``),
            ``"param"`` (the parameter itself), an ``int`` depth (the first ``depth`` components of the
            owning module's path) or a callable mapping the parameter name to a layer name.

    Example:

        >>> layer_name("encoder.layers.3.linear1.weight", "module")
        'encoder.layers.3.linear1'
        >>> layer_name("encoder.layers.3.linear1.weight", 2)
        'encoder.layers'
    """
    if callable(group_by):
        return str(group_by(param_name))
    if group_by == "param":
        return param_name
    module, _, _ = param_name.rpartition(".")
    if group_by == "module":
        return module or param_name
    parts = module.split(".") if module else []
    return ".".join(parts[:group_by]) if parts else param_name


@dataclass(frozen=True)
class StepStats:
    """Host-side view of one step's statistics (built from the single transferred vector).

    Attributes:
        layers: layer names, in model order.
        sq_norms: each layer's squared L2 gradient norm (``nan``/``inf`` where non-finite; ``0.0``
            for a layer none of whose parameters has a gradient this step).
        extras: values appended to the vector by the caller (for example the AMP loss scale).
    """

    layers: Sequence[str]
    sq_norms: Sequence[float]
    extras: Sequence[float] = ()

    @property
    def global_norm(self) -> float:
        """L2 norm over all layers; ``nan`` or ``inf`` when any layer is non-finite."""
        return math.sqrt(math.fsum(self.sq_norms)) if self.finite else self._nonfinite_total()

    @functools.cached_property
    def finite(self) -> bool:
        """Every layer's norm is finite (computed once: the decision, recovery and outputs all ask)."""
        return all(math.isfinite(v) for v in self.sq_norms)

    @property
    def nonfinite_layers(self) -> list[str]:
        return [name for name, v in zip(self.layers, self.sq_norms, strict=True) if not math.isfinite(v)]

    def layer_norms(self) -> dict[str, float]:
        """Layer name -> L2 norm (``nan``/``inf`` kept as they are)."""
        return {name: math.sqrt(v) if v >= 0 else v for name, v in zip(self.layers, self.sq_norms, strict=True)}

    def _nonfinite_total(self) -> float:
        return math.nan if any(math.isnan(v) for v in self.sq_norms) else math.inf


@dataclass(frozen=True)
class HistogramData:
    """One layer's histogram, ready for ``SummaryWriter.add_histogram_raw``."""

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


@dataclass
class _Bucket:
    device: torch.device
    dtype: torch.dtype
    positions: list[int]  # indices into GradStats._params
    index: Tensor  # layer index of each position, on the main device
    weight: Tensor | None = None  # per-position weight of the squared norms (None: all 1)
    params: list[Tensor] = field(default_factory=list)  # the parameters at ``positions``
    plain: bool = False  # every gradient is a plain real tensor (no DTensor, not complex): read as it is


@dataclass
class _Plan:
    dense: list[_Bucket] = field(default_factory=list)
    sparse: list[int] = field(default_factory=list)  # positions with sparse gradients


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _local(t: Tensor) -> Tensor:
    """The local part of a (possibly sharded) tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _holders(t: Tensor) -> int:
    """Number of ranks of a DTensor's mesh holding the same local piece (its ``Replicate`` dims); 1 otherwise."""
    placements, mesh = getattr(t, "placements", None), getattr(t, "device_mesh", None)
    if placements is None or mesh is None:
        return 1
    return math.prod(mesh.size(dim) for dim, p in enumerate(placements) if p.is_replicate())


def _bucket_grads(bucket: _Bucket, real: bool = True) -> list[Tensor]:
    """The local gradients of a bucket (``real``: complex ones viewed as real); plain ones read as they are."""
    if bucket.plain:
        return [p.grad for p in bucket.params]  # type: ignore[misc]
    if real:
        return [_as_real(_local(p.grad)) for p in bucket.params]  # type: ignore[arg-type]
    return [_local(p.grad) for p in bucket.params]  # type: ignore[arg-type]


def _as_real(t: Tensor) -> Tensor:
    """A real view of a complex tensor (same L2 norm, no copy); other tensors as they are."""
    return torch.view_as_real(t) if t.is_complex() else t


def _magnitude(t: Tensor) -> Tensor:
    """Element magnitudes of a complex tensor (``abs``); other tensors as they are."""
    if not t.is_complex():
        return t
    return (t.to(torch.complex64) if t.dtype == torch.complex32 else t).abs()


def _is_sharded(t: Tensor) -> bool:
    placements = getattr(t, "placements", None)
    if placements is None:
        return False
    return any(not p.is_replicate() for p in placements)


class GradStats:
    """Groups parameters into layers and computes per-layer gradient statistics on the device.

    Args:
        named_parameters: ``(name, parameter)`` pairs, in model order. Parameters that do not require
            gradients are left out. A parameter listed twice (tied weights) counts once. The
            ``_orig_mod`` components of ``torch.compile``'d modules are dropped from the names, so a
            compiled model has the same layer names as the eager one.
        group_by: how parameters are grouped into layers, see :func:`layer_name`.

    Example:

        >>> model = torch.nn.Linear(2, 1)
        >>> stats = GradStats(model.named_parameters())
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> stats.read(stats.squared_norms()).layers
        ['']
    """

    def __init__(self, named_parameters: Iterable[tuple[str, Tensor]], group_by: GroupBy = "module") -> None:
        self._params: list[Tensor] = []
        self._untracked: list[Tensor] = []  # listed but frozen: watched for a gradient (unfrozen later)
        self.group_by: GroupBy = group_by
        self._param_names: list[str] = []
        self._param_layer: list[int] = []
        self.layers: list[str] = []
        self.numels: list[int] = []
        layer_index: dict[str, int] = {}
        seen: set[int] = set()
        for name, param in named_parameters:
            if not param.requires_grad and id(param) not in seen:
                self._untracked.append(param)
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = strip_compile_wrapper(name)
            layer = layer_name(name, group_by)
            if layer not in layer_index:
                layer_index[layer] = len(self.layers)
                self.layers.append(layer)
                self.numels.append(0)
            idx = layer_index[layer]
            self._params.append(param)
            self._param_names.append(name)
            self._param_layer.append(idx)
            self.numels[idx] += param.numel()
        self.device = self._params[0].device if self._params else torch.device("cpu")
        self.sharded_layers: list[bool] = [
            any(_is_sharded(p) for p, layer in zip(self._params, self._param_layer, strict=True) if layer == i)
            for i in range(len(self.layers))
        ]
        # Weight of each parameter's squared norm in the cross-rank SUM of a sharded layer: one over the
        # number of ranks holding the same piece (plain tensors in such a layer are held by every rank).
        world = torch.distributed.get_world_size() if _dist_initialized() else 1
        self._param_weight: list[float] = [
            (1.0 / (_holders(p) if hasattr(p, "placements") else world)) if self.sharded_layers[layer] else 1.0
            for p, layer in zip(self._params, self._param_layer, strict=True)
        ]
        self._plans: dict[tuple[bool, ...], _Plan] = {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def params(self) -> list[Tensor]:
        """The tracked parameters (requiring grad), in model order."""
        return self._params

    def release(self) -> None:
        """Drop the references to the parameters (end of training); layer names and sizes are kept."""
        self._params = []
        self._untracked = []
        self._plans = {}

    def frozen_layers(self, layers: Iterable[int]) -> set[str]:
        """Names of the given layers (by index) none of whose parameters requires a gradient now (frozen since)."""
        wanted = set(layers)
        if not wanted:
            return set()
        trainable = {
            i for p, i in zip(self._params, self._param_layer, strict=False) if i in wanted and p.requires_grad
        }
        return {self.layers[i] for i in wanted - trainable}

    def untracked_have_grads(self) -> bool:
        """Whether a parameter left out as frozen has a gradient now (it was unfrozen): regroup then.

        Costs one attribute read per frozen parameter, none for the tracked ones.
        """
        return any(p.grad is not None for p in self._untracked)

    def _plan(self) -> _Plan:
        present = tuple(p.grad is not None for p in self._params)
        plan = self._plans.get(present)
        if plan is not None:
            return plan
        plan = _Plan()
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        plain: dict[tuple[torch.device, torch.dtype], bool] = {}
        for pos, (param, has_grad) in enumerate(zip(self._params, present, strict=True)):
            if not has_grad:
                continue
            grad = param.grad
            assert grad is not None
            if grad.is_sparse:
                plan.sparse.append(pos)
                continue
            local = _local(grad)
            key = (local.device, local.dtype)
            by_key.setdefault(key, []).append(pos)
            plain[key] = plain.get(key, True) and local is grad and not grad.is_complex()
        for (device, dtype), positions in by_key.items():
            index = torch.tensor([self._param_layer[p] for p in positions], dtype=torch.long, device=self.device)
            weights = [self._param_weight[p] for p in positions]
            weight = None
            if any(w != 1.0 for w in weights):
                weight = torch.tensor(weights, dtype=torch.float64, device=self.device)
            params = [self._params[p] for p in positions]
            plan.dense.append(_Bucket(device, dtype, positions, index, weight, params, plain[(device, dtype)]))
        self._plans[present] = plan
        return plan

    def squared_norms(self, extras: Sequence[Tensor] = ()) -> Tensor:
        """Per-layer squared L2 norms of the current gradients, as a float64 vector on the device.

        Args:
            extras: scalar tensors appended after the layer entries (for example the AMP loss scale),
                so that they reach the host in the same transfer.

        Returns:
            A vector of length ``num_layers + len(extras)``. Nothing is transferred to the host.
        """
        out = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        plan = self._plan()
        with torch.no_grad():
            for bucket in plan.dense:
                grads = _bucket_grads(bucket)
                wide = bucket.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128)
                norms = foreach_norm(grads, None if wide else torch.float32)
                sq = torch.stack(norms).to(device=self.device, dtype=torch.float64).square()
                if bucket.weight is not None:
                    sq = sq * bucket.weight
                out.index_add_(0, bucket.index, sq)
            for pos in plan.sparse:
                grad = self._params[pos].grad
                assert grad is not None
                values = _as_real(grad.coalesce().values())
                sq_norm = torch.linalg.vector_norm(values, dtype=torch.float32).to(self.device, torch.float64)
                out[self._param_layer[pos]] += sq_norm.square() * self._param_weight[pos]
        if extras:
            out = torch.cat([out, *(e.detach().reshape(1).to(self.device, torch.float64) for e in extras)])
        return out

    def scale_(self, coef: float) -> None:
        """Multiply every present gradient by ``coef`` in place (one fused multiply per bucket)."""
        plan = self._plan()
        with torch.no_grad():
            for bucket in plan.dense:
                foreach_mul_(_bucket_grads(bucket, real=False), coef)
            for pos in plan.sparse:
                grad = self._params[pos].grad
                assert grad is not None
                grad.mul_(coef)

    def read(self, vector: Tensor, num_extras: int = 0) -> StepStats:
        """Bring a (possibly reduced) statistics vector to the host in one transfer."""
        values: list[float] = vector.tolist()
        n = self.num_layers
        return StepStats(layers=self.layers, sq_norms=values[:n], extras=values[n : n + num_extras])

    # ------------------------------------------------------------------ histograms
    def _dense_grads_by_layer(self) -> list[tuple[int, Tensor, float]]:
        out: list[tuple[int, Tensor, float]] = []
        for param, layer, weight in zip(self._params, self._param_layer, self._param_weight, strict=True):
            grad = param.grad
            if grad is None:
                continue
            local = _magnitude(grad.coalesce().values() if grad.is_sparse else _local(grad))
            if local.numel():
                out.append((layer, local.detach().reshape(-1), weight))
        return out

    def histogram_ranges(self) -> Tensor:
        """Per-layer ``[-min, max]`` of the local gradient values, shape ``(num_layers, 2)``, float64.

        The minimum is negated so that ranges of several ranks combine with a single MAX reduction.
        Layers without gradient values hold ``-inf``. A NaN anywhere in a layer makes its row NaN (the
        layer is left out of the histograms; its sum is NaN as well, which leaves it out on its own).
        """
        out = torch.full((self.num_layers, 2), -math.inf, dtype=torch.float64, device=self.device)
        pieces = self._dense_grads_by_layer()
        if not pieces:
            return out
        # One aminmax per tensor; the pairs are stacked per (device, dtype) and folded into their layers'
        # rows with one MAX scatter, instead of a few small ops per tensor.
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[Tensor]]] = {}
        with torch.no_grad():
            for layer, flat, _ in pieces:
                layers, pairs = groups.setdefault((flat.device, flat.dtype), ([], []))
                layers.append(layer)
                pairs.append(torch.stack(torch.aminmax(flat)))
            for layers, pairs in groups.values():
                values = torch.stack(pairs).to(self.device, torch.float64)
                values[:, 0].neg_()
                index = torch.tensor(layers, dtype=torch.long, device=self.device).unsqueeze(1).expand(-1, 2)
                out.scatter_reduce_(0, index, values, "amax")
        return out

    def histogram_counts(self, ranges: Tensor, bins: int) -> Tensor:
        """Per-layer ``[num, sum, sum_squares, count_0 .. count_{bins-1}]``, shape ``(num_layers, 3 + bins)``.

        Args:
            ranges: the output of :meth:`histogram_ranges`, possibly MAX-reduced across ranks, so
                that every rank bins with the same edges.
            bins: number of equal-width bins between each layer's min and max.
        """
        out = torch.zeros(self.num_layers, _H_BINS + bins, dtype=torch.float64, device=self.device)
        pieces = self._dense_grads_by_layer()
        if not pieces:
            return out
        lo_all = -ranges[:, 0]
        scale_all = bins / (ranges[:, 1] - lo_all).clamp_min(torch.finfo(torch.float64).tiny)
        # Scratch buffers reused across tensors: binning allocates nothing per tensor (fresh memory
        # costs more than the arithmetic on CPU), and bin indices take one byte each for <= 256 bins.
        # Up to 128 bins the positions convert to int8 (a vectorised conversion, unlike uint8's) and are
        # counted through a uint8 view of the same bytes (no sign check); the values 0..127 read alike.
        largest = max(flat.numel() for _, flat, _ in pieces)
        index_dtype = torch.int8 if bins <= 128 else torch.uint8 if bins <= 256 else torch.int64
        scratch: dict[
            tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]
        ] = {}
        layers: list[int] = []
        weights: list[float] = []
        numels: list[float] = []
        sums: list[Tensor] = []
        counts: list[Tensor] = []
        with torch.no_grad():
            for layer, flat, weight in pieces:
                values = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
                key = (values.device, values.dtype)
                if key not in scratch:
                    scratch[key] = (
                        torch.empty(largest, dtype=values.dtype, device=values.device),
                        torch.empty(largest, dtype=index_dtype, device=values.device),
                        lo_all.to(values.device, values.dtype).unbind(),
                        scale_all.to(values.device, values.dtype).unbind(),
                    )
                buf, idx, lo, scale = scratch[key]
                n = values.numel()
                # Positions are >= 0 (every value is >= its layer's minimum), so the integer conversion
                # truncates them to their bin: no separate floor pass.
                pos = torch.sub(values, lo[layer], out=buf[:n]).mul_(scale[layer])
                pos.nan_to_num_(nan=0.0, posinf=bins - 1, neginf=0.0).clamp_(0, bins - 1)
                index = idx[:n]
                index.copy_(pos)
                if index.dtype == torch.int8:
                    index = index.view(torch.uint8)
                counts.append(torch.bincount(index, minlength=bins).to(self.device))
                sums.append(torch.stack([values.sum(), torch.dot(values, values)]).to(self.device, torch.float64))
                layers.append(layer)
                weights.append(weight)
                numels.append(float(n))
            target = torch.tensor(layers, dtype=torch.long, device=self.device)
            body = torch.cat(
                [
                    torch.tensor(numels, dtype=torch.float64, device=self.device).unsqueeze(1),
                    torch.stack(sums),
                    torch.stack(counts).to(torch.float64),
                ],
                dim=1,
            )
            if any(w != 1.0 for w in weights):  # a piece several ranks hold: their counts add up to one copy
                body *= torch.tensor(weights, dtype=torch.float64, device=self.device).unsqueeze(1)
            out.index_add_(0, target, body)
        return out

    def read_histograms(self, ranges: Tensor, counts: Tensor) -> dict[str, HistogramData]:
        """Bring histograms to the host in one transfer; layers with non-finite values are left out."""
        bins = counts.shape[1] - _H_BINS
        rows: list[list[float]] = torch.cat([ranges, counts], dim=1).tolist()
        out: dict[str, HistogramData] = {}
        for name, row in zip(self.layers, rows, strict=True):
            lo, hi = -row[0], row[1]
            body = row[2:]
            if not (math.isfinite(lo) and math.isfinite(hi)) or body[_H_NUM] == 0:
                continue
            if not all(math.isfinite(v) for v in body[:_H_BINS]):
                continue
            width = (hi - lo) / bins
            if width > 0:
                limits = [lo + width * (k + 1) for k in range(bins)]
                limits[-1] = hi
                bucket_counts = body[_H_BINS:]
            else:
                limits, bucket_counts = [hi], [body[_H_NUM]]
            out[name] = HistogramData(
                min=lo,
                max=hi,
                num=body[_H_NUM],
                sum=body[_H_SUM],
                sum_squares=body[_H_SUMSQ],
                bucket_limits=limits,
                bucket_counts=bucket_counts,
            )
        return out
