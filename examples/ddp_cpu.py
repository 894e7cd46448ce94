"""Multi-process DDP with GradGuard: 2 CPU processes over gloo here, NCCL on GPUs with the same code.

    python examples/ddp_cpu.py [--devices 2] [--accelerator cpu|auto] [--strategy ddp_spawn|ddp] [--max-steps N]

The quickstart's digits classifier trained data-parallel with ``GradGuard()``. Lightning picks the
process-group backend from the accelerator: gloo on CPUs, NCCL on CUDA GPUs; GradGuard makes the same
clip / skip / LR decision on every rank from one small all-reduced vector per step. Each rank writes
what it saw (rank, backend, threshold, clipped steps, a checksum of its weights) to
``<logdir>/ddp_cpu/rank<N>.json``; the launching process prints them side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import one_thread_unless_set, quiet_lightning
from quickstart import DigitsClassifier, digits_loader

from lightning_gradguard import GradGuard


class RankReport(Callback):
    """Writes, at the end of fit, what this rank's GradGuard decided, to ``directory/rank<N>.json``."""

    def __init__(self, directory: Path, guard: GradGuard) -> None:
        self.directory = directory
        self.guard = guard

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            checksum = sum(float(p.double().sum()) for p in pl_module.parameters())
        report = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else "none",
            "device": str(pl_module.device),
            "steps": trainer.global_step,
            "threshold": self.guard.threshold,
            "clipped_steps": self.guard.clipped_steps,
            "skipped_steps": self.guard.skipped_steps,
            "lr_scale": self.guard.lr_scale,
            "weight_checksum": checksum,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or auto (NCCL on CUDA GPUs)")
    parser.add_argument("--strategy", default="ddp_spawn", help="ddp_spawn (works anywhere) or ddp")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--logdir", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    quiet_lightning()

    L.seed_everything(0, verbose=False)
    report_dir = args.logdir / "ddp_cpu"
    for old in report_dir.glob("rank*.json"):
        old.unlink()
    guard = GradGuard()
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        max_steps=args.max_steps,
        logger=TensorBoardLogger(args.logdir, name="ddp_cpu"),
        callbacks=[guard, RankReport(report_dir, guard)],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    # Lightning adds a DistributedSampler: each rank sees half of every epoch.
    trainer.fit(DigitsClassifier(), digits_loader())

    # Under "ddp" every rank runs this line; wait (bounded) until each rank has written its report.
    deadline = time.monotonic() + 30
    while len(list(report_dir.glob("rank*.json"))) < trainer.world_size and time.monotonic() < deadline:
        time.sleep(0.1)
    reports = [json.loads(p.read_text()) for p in sorted(report_dir.glob("rank*.json"))]
    if trainer.is_global_zero:
        print(f"\nDDP ({args.strategy}, {args.accelerator}) with GradGuard(): {len(reports)} ranks")
        print(
            f"  {'rank':>4s} {'backend':>8s} {'device':>7s} {'steps':>6s} {'threshold':>10s} {'clipped':>8s} checksum"
        )
        for r in reports:
            threshold = "none" if r["threshold"] is None else f"{r['threshold']:.4f}"
            print(
                f"  {r['global_rank']:>4d} {r['backend']:>8s} {r['device']:>7s} {r['steps']:>6d} {threshold:>10s} "
                f"{r['clipped_steps']:>8d} {r['weight_checksum']:.10f}"
            )
    return reports


if __name__ == "__main__":
    one_thread_unless_set()  # tiny models: a second thread only waits on a busy machine
    main()
