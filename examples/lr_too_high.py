"""LR too high: gradient norms keep climbing and GradGuard's LR guard steps in where clipping alone cannot.

    python examples/lr_too_high.py [--max-steps N] [--lr LR]

A small Tanh MLP (16 -> 64 -> 1) fits a smooth synthetic regression with SGD + momentum 0.9 at a learning
rate just past what the problem's curvature tolerates. Two runs from the same weights and batches: with
``GradGuard()`` (LR guard on, the default) and with ``GradGuard(lr_guard=False)`` (clipping only). At this LR
the steps overshoot more and more. Clipping alone cannot fix that: the default clip threshold is relative to
the run's own norms, and the step size is wrong from the first step, so the clipping-only run diverges. The LR
guard sees the loss climb to twice its best level while step after step presses the clip threshold, halves the
LR, and training settles.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    capture_gradguard_messages,
    one_thread_unless_set,
    quiet_lightning,
    report_command,
    tensorboard_command,
)

from lightning_gradguard import GradGuard


def regression_data(n: int = 2048, dim: int = 16, seed: int = 0) -> TensorDataset:
    """``y = sin(2 x.w) + noise`` with ``x ~ N(0, I)``, ``w ~ N(0, I/16)``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    w = torch.randn(dim, 1, generator=generator) / 4
    y = torch.sin(2 * x @ w) + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


class Regressor(L.LightningModule):
    """Tanh MLP trained with SGD + momentum; records every step's loss."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


@dataclass
class RunResult:
    """Outcome of one run."""

    lr_guard: bool
    losses: list[float]
    clipped_steps: int
    lr_scale: float
    reductions: list[str]

    def mean_loss(self, last: int) -> float:
        return sum(self.losses[-last:]) / min(last, len(self.losses))


def train(lr_guard: bool, args: argparse.Namespace) -> RunResult:
    L.seed_everything(0, verbose=False)
    model = Regressor(lr=args.lr)
    guard = GradGuard(lr_guard=lr_guard)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        logger=TensorBoardLogger(args.logdir, name="lr_too_high", version="lr_guard" if lr_guard else "no_lr_guard"),
        callbacks=[guard],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    with capture_gradguard_messages() as messages:
        trainer.fit(model, DataLoader(regression_data(), batch_size=64, shuffle=True))
    reductions = [m for m in messages.warnings if m.startswith("GradGuard: LR guard")]
    return RunResult(lr_guard, model.losses, guard.clipped_steps, guard.lr_scale, reductions)


def main(argv: list[str] | None = None) -> dict[str, RunResult]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--logdir", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    quiet_lightning()

    results = {"lr_guard": train(True, args), "no_lr_guard": train(False, args)}
    print(f"\nTanh MLP regression, SGD(lr={args.lr}, momentum=0.9), {args.max_steps} steps")
    print(f"  {'run':28s} {'final loss':>10s} {'mean last 50':>12s} {'clipped':>8s} {'LR scale':>9s}")
    names = {"lr_guard": "GradGuard()", "no_lr_guard": "GradGuard(lr_guard=False)"}
    for key, r in results.items():
        print(
            f"  {names[key]:28s} {r.losses[-1]:>10.4f} {r.mean_loss(50):>12.4f} {r.clipped_steps:>8d} {r.lr_scale:>9g}"
        )
    for message in results["lr_guard"].reductions:
        print(f"  {message[:200]}...")
    print(f"\nTensorBoard: {tensorboard_command(args.logdir / 'lr_too_high')}")
    print(f"Report:      {report_command(args.logdir / 'lr_too_high')}")
    return results


if __name__ == "__main__":
    one_thread_unless_set()  # tiny models: a second thread only waits on a busy machine
    main()
