"""The one collective per optimizer step, and the rank helpers around it.

GradGuard makes every decision (clip, skip, stop, LR reduction) from one small float64 vector of
per-layer squared gradient norms. In a multi-process run that vector is summed across ranks with a
single ``all_reduce`` before it is read, which gives two guarantees at once:

* sharded layers (FSDP2 ``DTensor`` gradients) hold the sum of their shards' squared norms, i.e. the
  squared norm of the full gradient (a shard that several ranks hold, on the ``Replicate`` dimensions
  of a 2-D mesh, is weighted by one over its number of holders in
  :meth:`~lightning_gradguard.measure.stats.GradStats.squared_norms`, so it counts once);
* replicated layers (DDP) are divided back by the world size, so every rank reads the very same bits
  and takes the very same decisions, whatever rounding differences the ranks had. A non-finite value
  on any one rank turns the entry non-finite on all of them, so no rank steps while another skips and
  no rank raises alone.

The collective runs over the default process group (every rank of the job: the device meshes of
FSDP2 / HSDP / tensor parallelism are expected to span it) with whatever backend the run uses (gloo on
CPU tensors, NCCL on CUDA tensors); a single-process run makes none. On histogram steps, where some
layer is sharded, :func:`reduce_histograms` adds two more (bin edges by MAX, then counts by SUM).
See ``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "reduce_histograms", "reduce_stats", "world_size"]


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """World size of the default process group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def _replicated_divisor(like: Tensor, sharded: Sequence[bool], n: int) -> Tensor | None:
    """``n`` for rows not marked sharded (and trailing extras), ``1`` for sharded rows; ``None`` if all sharded."""
    if all(sharded) and len(sharded) == like.shape[0]:
        return None
    divisor = torch.full((like.shape[0],), float(n), dtype=like.dtype, device=like.device)
    if any(sharded):
        mask = torch.tensor(list(sharded), dtype=torch.bool, device=like.device)
        divisor[: len(sharded)][mask] = 1.0
    return divisor


def reduce_stats(vector: Tensor, sharded: Sequence[bool]) -> Tensor:
    """Sum ``vector`` across ranks in one ``all_reduce``; entries not marked sharded are averaged.

    Every rank receives the same reduced bits (the all-reduce algorithms of gloo and NCCL end by
    distributing each fully reduced chunk), and the division that follows is the same on every rank,
    so every rank reads an identical vector. A NaN or inf on any rank makes the entry non-finite
    everywhere (squared norms are never negative, so infinities cannot cancel).

    Args:
        vector: per-layer squared norms followed by any extras (extras are treated as replicated).
        sharded: one flag per leading entry of ``vector``; ``True`` where each rank holds only a shard
            (the entry is then the sum of the shards' squared norms: the full gradient's).

    Returns:
        The reduced vector (the input itself, untouched and without any collective, in a
        single-process run).
    """
    if not is_distributed():
        return vector
    dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    divisor = _replicated_divisor(vector, sharded, world_size())
    return vector if divisor is None else vector / divisor


def reduce_histograms(ranges: Tensor, counts: Tensor | None = None, sharded: Sequence[bool] | None = None) -> Tensor:
    """Combine histogram pieces of sharded layers: ranges by MAX (``[-min, max]``), counts by SUM.

    Called only on histogram steps, and only where some layer is sharded: first with ``ranges`` alone
    (so that every rank bins with the same edges), then with the ``counts`` binned on those edges.

    Args:
        ranges: ``(num_layers, 2)`` per-layer ``[-min, max]`` of the local values.
        counts: ``(num_layers, 3 + bins)`` per-layer ``[num, sum, sum_squares, bins...]``.
        sharded: one flag per layer; rows of replicated layers (every rank holds the whole gradient)
            are divided back by the world size after the SUM. ``None``: all layers sharded.

    Returns:
        The reduced ``ranges`` (first call) or ``counts`` (second call).
    """
    if not is_distributed():
        return ranges if counts is None else counts
    if counts is None:
        dist.all_reduce(ranges, op=dist.ReduceOp.MAX)
        return ranges
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    divisor = None if sharded is None else _replicated_divisor(counts, sharded, world_size())
    return counts if divisor is None else counts / divisor[:, None]
