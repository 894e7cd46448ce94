"""GradGuard in a Lightning Fabric loop: ``FabricGuard`` between ``fabric.backward`` and ``optimizer.step``.

Fabric runs its callbacks only after the optimizer step, too late to clip or skip, so the guard is
called explicitly. The learning rate here is too high on purpose: the guard clips, and its LR guard
halves the LR once clipping keeps saturating.

    python examples/fabric_loop.py --steps 200 --lr 0.8 --logdir runs
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import FabricGuard, LRGuard


def make_data(n: int = 256, dim: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.sin(x @ torch.randn(dim, 1, generator=g))
    return TensorDataset(x, y)


def make_model(dim: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def train(steps: int, lr: float, logdir: str | None, **guard_options: object) -> tuple[FabricGuard, nn.Module]:
    """Train for ``steps`` optimizer steps; returns the guard and the trained model."""
    loggers = [TensorBoardLogger(logdir, name="fabric_loop")] if logdir else []
    fabric = Fabric(accelerator="cpu", devices=1, loggers=loggers)
    module = make_model()
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=lr))
    guard_options.setdefault("max_norm", 1.0)  # caps the threshold from step 0, while the policy warms up
    guard_options.setdefault("lr_guard", LRGuard(patience=3, cooldown=10))
    guard = FabricGuard(fabric, model, optimizer, log_every_n_steps=10, **guard_options)  # type: ignore[arg-type]
    loader = fabric.setup_dataloaders(DataLoader(make_data(), batch_size=32, shuffle=False))
    step = 0
    while step < steps:
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            fabric.backward(loss)
            guard.before_optimizer_step(loss)  # clip / skip / LR guard, one device-to-host transfer
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == steps:
                break
    guard.close()
    return guard, model


def main(argv: Sequence[str] | None = None) -> FabricGuard:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.8)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)
    guard, _ = train(args.steps, args.lr, args.logdir)
    print(f"clipped {guard.clipped_steps} of {args.steps} steps; LR scale {guard.lr_scale:g}")
    return guard


if __name__ == "__main__":
    main()
