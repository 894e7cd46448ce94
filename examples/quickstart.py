"""Quickstart: train a small classifier on the digits data set with ``GradGuard()`` on CPU.

    python examples/quickstart.py [--epochs N] [--logdir DIR]

Writes TensorBoard logs under ``runs/quickstart`` (per-layer gradient norms, histograms, the
"GradGuard" dashboard under Custom Scalars, clipping and LR-guard scalars) and prints a summary that
ends with the command to view them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import one_thread_unless_set, report_command, tensorboard_command

from lightning_gradguard import GradGuard


class DigitsClassifier(L.LightningModule):
    """A three-layer MLP on the 8x8 digits images (1797 samples, shipped with scikit-learn)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits_loader(batch_size: int = 32) -> DataLoader[tuple[torch.Tensor, ...]]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def main(argv: list[str] | None = None) -> GradGuard:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--logdir", type=Path, default=Path("runs"))
    parser.add_argument("--max-steps", type=int, default=-1)
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)  # Lightning's own, not about your run
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    guard = GradGuard()
    logger = TensorBoardLogger(args.logdir, name="quickstart")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        logger=logger,
        callbacks=[guard],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    model = DigitsClassifier()
    print(f"Training a digits classifier for {args.epochs} epochs on CPU with GradGuard() ...", flush=True)
    trainer.fit(model, digits_loader())

    x, y = digits_loader().dataset.tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        logits = model.eval().net(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(-1) == y).float().mean().item()
    threshold = f"{guard.threshold:.3f}" if guard.threshold is not None else "none yet (warming up)"
    print()
    print("GradGuard quickstart finished")
    print(f"  optimizer steps       {trainer.global_step}")
    print(f"  loss on all digits    {loss:.4f}")
    print(f"  accuracy              {accuracy:.3f}")
    print(f"  clip threshold now    {threshold}")
    print(f"  clipped steps         {guard.clipped_steps}")
    print(f"  skipped steps         {guard.skipped_steps}")
    print(f"  LR scale              {guard.lr_scale:g}")
    print(f"  logs                  {logger.log_dir}")
    print()
    print("View them (Custom Scalars tab holds the GradGuard dashboard):")
    print(f"  {tensorboard_command(args.logdir)}")
    print("or read them back without a server:")
    print(f"  {report_command(logger.log_dir)}")
    return guard


if __name__ == "__main__":
    one_thread_unless_set()  # tiny models: a second thread only waits on a busy machine
    main()
