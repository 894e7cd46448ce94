"""Per-step cost of GradGuard's one reduction on 2 CPU ranks (gloo), against the step time of a small model.

Two processes (``torch.multiprocessing``, gloo over loopback) train a small MLP wrapped in
``DistributedDataParallel``. Interleaved in every round, each rank times

* ``train_step``: zero_grad, forward, backward (with DDP's gradient all-reduce), ``optimizer.step``;
* ``reduce_stats``: the one collective GradGuard adds per step, ``all_reduce`` of the per-layer
  squared-norm vector (float64, one entry per layer) and the division of the replicated entries;
* ``guard_stats_step``: what GradGuard's hook pays for its statistics in a distributed run, i.e.
  ``GradStats.squared_norms()`` + ``reduce_stats`` + the single ``read()`` transfer;
* ``local_stats_step``: the same without the reduction (what a single-process run pays).

Rank 0 prints the medians and the ratios ``reduce_stats / train_step`` and
``guard_stats_step / train_step``. Both ranks leave the DDP step synchronised (its backward all-reduce),
so ``reduce_stats`` measures the collective itself, not a wait for a straggling rank; on a loaded
machine, a descheduled peer still shows up in the upper quartile.

Each rank uses one torch thread unless ``--threads`` says otherwise.

Run: ``.venv/bin/python benchmarks/bench_distributed.py [--quick] [--rounds N] [--threads T]``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

# Benchmark the checkout this script lives in, installed or not.
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

from _common import Report, parse_args, time_interleaved  # noqa: E402

from lightning_gradguard.measure.distributed import reduce_stats  # noqa: E402
from lightning_gradguard.measure.stats import GradStats  # noqa: E402

WORLD = 2
WIDTH, DEPTH, BATCH = 256, 4, 64  # 4 hidden layers of 256: 0.22M parameters, 5 layers
QUICK = (32, 2, 8)


def _mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def _worker(rank: int, port: int, argv: Sequence[str], out: Any) -> None:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "", argv)
    if args.threads is None:
        torch.set_num_threads(1)  # 2 ranks on a small machine: one thread each unless told otherwise
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        width, depth, batch = QUICK if args.quick else (WIDTH, DEPTH, BATCH)
        rounds = args.rounds or (5 if args.quick else 101)
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(_mlp(width, depth))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(rank)
        x, y = torch.randn(batch, 64, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
        stats = GradStats(model.module.named_parameters())
        sharded = stats.sharded_layers

        def train_step() -> None:
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        def reduce_only() -> object:
            return reduce_stats(vector.clone(), sharded)

        def guard_stats_step() -> object:
            return stats.read(reduce_stats(stats.squared_norms(), sharded)).global_norm

        def local_stats_step() -> object:
            return stats.read(stats.squared_norms()).global_norm

        train_step()
        vector = stats.squared_norms()
        # Sanity: the reduced vector is bit-identical on both ranks and equals the local one (DDP grads).
        reduced = reduce_stats(stats.squared_norms(), sharded)
        gathered = [torch.empty_like(reduced) for _ in range(WORLD)]
        dist.all_gather(gathered, reduced)
        if not torch.equal(gathered[0], gathered[1]) or not torch.equal(reduced, stats.squared_norms()):
            raise SystemExit("check failed: reduced stats differ between ranks or from the local replica")

        report = Report("bench_distributed", args.quick, torch.device("cpu"), "") if rank == 0 else None
        if report is not None:
            numel = sum(p.numel() for p in model.parameters())
            report.config = {
                "world_size": WORLD,
                "backend": "gloo",
                "parameters": numel,
                "layers": stats.num_layers,
                "vector_bytes": vector.numel() * 8,
                "batch_per_rank": batch,
                "rounds": rounds,
            }
            print(
                f"model: MLP {numel / 1e6:.2f}M parameters, {stats.num_layers} layers; 2 ranks over gloo; "
                f"stats vector {vector.numel()} x float64 ({vector.numel() * 8} bytes)"
            )
        samples = time_interleaved(
            {
                "train_step": train_step,
                "reduce_stats": reduce_only,
                "guard_stats_step": guard_stats_step,
                "local_stats_step": local_stats_step,
            },
            rounds=rounds,
            warmup=3,
            device=torch.device("cpu"),
        )
        if report is not None:
            report.add(samples)
            report.ratio("reduce_stats / train_step", "reduce_stats", "train_step")
            report.ratio("guard_stats_step / train_step", "guard_stats_step", "train_step")
            report.ratio("guard_stats_step / local_stats_step", "guard_stats_step", "local_stats_step")
            out.put(str(report.write(args.out)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parse_args(__doc__.splitlines()[0] if __doc__ else "", argv)  # validate before spawning
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(_free_port(), argv, out), nprocs=WORLD, join=True, start_method="spawn")
    return 0 if not out.empty() else 1


if __name__ == "__main__":
    raise SystemExit(main())
