"""Two-process worker for the plain ``Guard`` under DDP and FSDP2 (see tests/test_distributed_plain_loop.py).

Started twice with ``RANK`` / ``WORLD_SIZE=2`` / ``MASTER_ADDR`` / ``MASTER_PORT``; runs a DDP loop, then an
FSDP2 (``fully_shard``) loop, in the same processes over gloo on CPU. Each rank trains on its half of every
batch; rank 1 alone poisons its loss at step ``POISONED``. Each rank writes what its guard decided at every
step and the final full weights to ``OUT/{ddp,fsdp2}_rank{r}.pt``. Then the same two strategies train an
AdamW regression on noise (``run_noise``) until the LR guard's stall channel cuts the LR, from the update
ratio of replicated weights (DDP) and of SUM-reduced shard norms (FSDP2): ``OUT/{ddp,fsdp2}_noise_rank{r}.pt``.

Imported as a module (by the test), nothing runs: ``make_model``, ``batch`` and ``run_loop`` serve the
single-process reference run too.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_gradguard import Guard, LRGuard

STEPS, LR, POISONED, BATCH = 12, 2.0, 5, 32


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 16, generator=g)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def run_loop(
    model: nn.Module, params_of: nn.Module, rank: int, world: int, log_dir: Path | None = None
) -> dict[str, Any]:
    """Train ``STEPS`` steps on this rank's share of each batch; the guard's decisions and final weights.

    The guard replays incidents (``replay=True``): the poisoned loss of rank 1 is a one-off fault, so its
    replay (the same batch share, unpoisoned, on every rank) classifies it transient. With ``log_dir`` (rank
    zero), the guard writes its events and ``incidents.jsonl`` there.
    """
    optimizer = torch.optim.SGD(params_of.parameters(), lr=LR)
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir))
    guard = Guard(model, optimizer, writer=writer, max_norm=1.0, lr_guard=LRGuard(patience=3, cooldown=5), replay=True)
    records = []
    for step in range(STEPS):
        x, y = batch(step)
        share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)

        def closure(xs: torch.Tensor = x[share], ys: torch.Tensor = y[share]) -> torch.Tensor:
            loss = nn.functional.mse_loss(model(xs), ys)
            loss.backward()
            return loss

        loss = nn.functional.mse_loss(model(x[share]), y[share])
        if step == POISONED and rank == world - 1 and world > 1:
            loss = loss * math.nan
        loss.backward()
        o = guard.before_optimizer_step(loss, closure=closure, batch_idx=step, epoch=0)
        optimizer.step()
        optimizer.zero_grad()
        records.append([o.global_norm, o.threshold, o.coefficient, o.clipped, o.skipped, guard.lr_scale])
    weights = {}
    for key, value in params_of.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        weights[key] = full.detach().clone()
    guard.close()
    if writer is not None:
        writer.close()
    incidents = [[i.kind, i.step, i.batch_idx, i.replay, i.leader, i.global_norm] for i in guard.incidents]
    return {"records": records, "weights": weights, "incidents": incidents}


NOISE_STEPS, NOISE_BATCH = 160, 128


def make_noise_model() -> nn.Module:
    """The zero-head regressor of ``tests/test_lr_guard_stall.py``: its loss is flat at the noise level."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    return model


def run_noise(model: nn.Module, params_of: nn.Module, rank: int, world: int) -> dict[str, Any]:
    """AdamW at lr 0.05 on fresh noise targets: per step, the LR scale and the LR-guard events seen."""
    optimizer = torch.optim.AdamW(params_of.parameters(), lr=0.05)
    events: list[Any] = []
    guard = Guard(model, optimizer, on_event=events.append, rollback=False, diagnostics=False)
    records = []
    g = torch.Generator().manual_seed(1)  # every rank draws the whole batch, then takes its share
    for _ in range(NOISE_STEPS):
        x, y = 0.1 * torch.randn(NOISE_BATCH, 8, generator=g), 0.1 * torch.randn(NOISE_BATCH, 1, generator=g)
        share = slice(rank * NOISE_BATCH // world, (rank + 1) * NOISE_BATCH // world)
        loss = nn.functional.mse_loss(model(x[share]), y[share])
        loss.backward()
        o = guard.before_optimizer_step(loss)
        optimizer.step()
        optimizer.zero_grad()
        records.append([o.global_norm, o.clipped, guard.lr_scale])
    guard.close()
    cuts = [
        [e.step, str(e.evidence["reason"]), float(e.evidence["update_ratio"])]
        for e in events
        if e.kind == "lr_reduction"
    ]
    return {"records": records, "cuts": cuts}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    module = make_model()
    ddp = nn.parallel.DistributedDataParallel(module)
    logs = out / "ddp_logs" if rank == 0 else None
    torch.save(run_loop(ddp, module, rank, world, logs), out / f"ddp_rank{rank}.pt")

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = make_model()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(sharded[0], mesh=mesh)
    fully_shard(sharded[2], mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    torch.save(run_loop(sharded, sharded, rank, world), out / f"fsdp2_rank{rank}.pt")

    noise = make_noise_model()
    torch.save(
        run_noise(nn.parallel.DistributedDataParallel(noise), noise, rank, world), out / f"ddp_noise_rank{rank}.pt"
    )
    noise = make_noise_model()
    fully_shard(noise[0], mesh=mesh)
    fully_shard(noise[2], mesh=mesh)
    fully_shard(noise, mesh=mesh)
    torch.save(run_noise(noise, noise, rank, world), out / f"fsdp2_noise_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
    # Every result is saved and the process group destroyed: leave without the interpreter's teardown, where
    # gloo's and the event writer's threads can abort the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
