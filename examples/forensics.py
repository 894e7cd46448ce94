"""Forensics: a poisoned sample and a one-off fault, told apart, named and skipped on restart.

    python examples/forensics.py [--max-steps N] [--logdir DIR]

A small MLP classifies the digits bundled with scikit-learn (8x8 images). Two things go wrong on purpose:

* **data**: one training image holds NaN pixels (sample 300): every batch that carries it has non-finite
  gradients;
* **a transient fault**: at one step, the output layer's gradient is multiplied by 1e6 in that backward pass
  only (a flaky kernel, a bit flip).

``GradGuard(replay=True, batch_ids=...)`` skips both steps and records two incidents. Replaying each batch from
the same weights tells them apart: the poisoned batch does it again (*reproducible*: it goes on the skip list),
the faulty step does not (*transient*). Then a run restarted from a checkpoint taken before the incident gets
``GradGuard(skip_list=...)`` and drops the listed batch instead of meeting it again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import capture_gradguard_messages, one_thread_unless_set, quiet_lightning, report_command

from lightning_gradguard import GradGuard

POISONED = 300  # the sample with NaN pixels
FAULT_AT = 40  # the optimizer step whose backward pass is corrupted once


class Digits(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """``(image, label, index)``: the index is the sample id ``batch_ids`` reads."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        self.x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        self.y = torch.tensor(data.target)
        self.x[POISONED, 10:20] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


class Classifier(L.LightningModule):
    def __init__(self, fault_at: int | None = FAULT_AT) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
        self.fault_at = fault_at
        self.net[4].weight.register_hook(self._fault)

    def _fault(self, grad: torch.Tensor) -> torch.Tensor:
        if self.fault_at is not None and self.trainer.global_step == self.fault_at:
            self.fault_at = None  # once: the replay of this step's batch computes a clean gradient
            return grad * 1e6
        return grad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def train(logdir: Path, max_steps: int, ckpt_path: str | None = None, **kwargs: Any) -> L.Trainer:
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=TensorBoardLogger(logdir, name="forensics"),
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    loader = DataLoader(Digits(), batch_size=32, shuffle=False)
    trainer.fit(Classifier(), loader, ckpt_path=ckpt_path, weights_only=False)
    return trainer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--logdir", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    quiet_lightning()

    # 1. the run that meets both incidents
    guard = GradGuard(replay=True, batch_ids=lambda batch: batch[2])
    checkpoints = ModelCheckpoint(args.logdir / "forensics_ckpt", every_n_train_steps=5, save_top_k=-1)
    with capture_gradguard_messages():
        trainer = train(args.logdir, args.max_steps, callbacks=[guard, checkpoints])
    run_dir = Path(trainer.log_dir or args.logdir)
    print(f"\n{len(guard.incidents)} incident(s):")
    for incident in guard.incidents:
        print(f"  {incident.summary()}")
    skip_list = run_dir / "skip_list.json"

    # 2. restart from the checkpoint before the poisoned batch, honouring the skip list
    before = args.logdir / "forensics_ckpt" / "epoch=0-step=5.ckpt"
    restarted = GradGuard(skip_list=skip_list, batch_ids=lambda batch: batch[2])
    with capture_gradguard_messages() as messages:
        train(args.logdir, args.max_steps, ckpt_path=str(before), callbacks=[restarted])
    dropped = [m for m in messages.infos + messages.warnings if "is on the skip list" in m]
    print(f"\nrestarted from step 5 with skip_list={skip_list}:")
    for line in dropped:
        print(f"  {line[:160]}")
    print(f"\nIncidents: {run_dir / 'incidents.jsonl'}")
    print(f"Report:    {report_command(run_dir)}")
    print(f"PNGs:      {report_command(run_dir, '--postmortem', str(args.logdir / 'postmortems'))}")
    return {"guard": guard, "restarted": restarted, "run_dir": run_dir, "dropped": dropped}


if __name__ == "__main__":
    one_thread_unless_set()
    main()
