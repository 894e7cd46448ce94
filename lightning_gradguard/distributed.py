"""The one collective per optimizer step, and the rank helpers around it.

GradGuard makes every decision (clip, skip, stop, LR reduction) from one small float64 vector of
per-layer squared gradient norms. In a multi-process run that vector is summed across ranks with a
single ``all_reduce`` before it is read, which gives two guarantees at once:

* sharded layers (FSDP2 ``DTensor`` gradients) hold the sum of their shards' squared norms, i.e. the
  squared norm of the full gradient;
* replicated layers (DDP) are divided back by the world size, so every rank reads the very same bits
  and takes the very same decisions, whatever rounding differences the ranks had. A non-finite value
  on any one rank turns the entry non-finite on all of them, so no rank steps while another skips and
  no rank raises alone.

The collective runs over the default process group with whatever backend the run uses (gloo on CPU
tensors, NCCL on CUDA tensors); a single-process run makes none.
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
    return dist.get_world_size() if is_distributed() else 1


def reduce_stats(vector: Tensor, sharded: Sequence[bool]) -> Tensor:
    """Sum ``vector`` across ranks in one ``all_reduce``; entries not marked sharded are averaged.

    Args:
        vector: per-layer squared norms followed by any extras (extras are treated as replicated).
        sharded: one flag per leading entry of ``vector``; ``True`` where each rank holds only a shard.

    Returns:
        The reduced vector (the input itself, untouched, in a single-process run).
    """
    if not is_distributed():
        return vector
    dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    n = world_size()
    if all(sharded) and len(sharded) == vector.numel():
        return vector
    divisor = torch.full_like(vector, float(n))
    if any(sharded):
        mask = torch.tensor(list(sharded), dtype=torch.bool, device=vector.device)
        divisor[: len(sharded)][mask] = 1.0
    return vector / divisor


def reduce_histograms(ranges: Tensor, counts: Tensor | None = None) -> Tensor:
    """Combine histogram pieces of sharded layers: ranges by MAX (``[-min, max]``), counts by SUM."""
    if not is_distributed():
        return ranges if counts is None else counts
    if counts is None:
        dist.all_reduce(ranges, op=dist.ReduceOp.MAX)
        return ranges
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts
