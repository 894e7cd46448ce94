"""Exploding gradients: a recurrent net that diverges without a guard, trained three ways side by side.

    python examples/exploding_rnn.py [--max-steps N] [--short-steps N] [--seq-len T] [--lr LR]

The model is an IRNN-style recurrent net (Le et al. 2015): a leaky-ReLU RNN whose recurrent matrix starts
as the identity, trained with SGD + momentum on the adding problem (sum the two marked numbers of a
sequence). Training follows a sequence-length curriculum, as long-sequence models often do: the first
``--short-steps`` batches have length 10, the rest length ``--seq-len`` (100). With an identity recurrence
the backprop-through-time gradient grows with the sequence length, so at the switch the gradient norm
jumps by orders of magnitude. Three runs from the same initial weights and batches:

* no clipping: the first long batch's step blows the recurrent weights up and the loss goes non-finite;
* ``Trainer(gradient_clip_val=1.0)``: a fixed threshold you had to guess;
* ``GradGuard()``: defaults; its threshold learned from the short phase clips the jump, and its LR guard
  halves the LR when clipping keeps saturating.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    capture_gradguard_messages,
    one_thread_unless_set,
    quiet_lightning,
    report_command,
    tensorboard_command,
)

from lightning_gradguard import GradGuard

MODES = ("none", "clip_val", "gradguard")


def adding_batch(batch_size: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the adding problem: inputs (batch, length, 2), targets (batch, 1) centred on 0.

    Channel 0 holds uniform numbers, channel 1 marks one position in each half of the sequence; the
    target is the sum of the two marked numbers minus 1 (its mean).
    """
    values = torch.rand(batch_size, length, generator=generator)
    first = torch.randint(0, length // 2, (batch_size,), generator=generator)
    second = torch.randint(length // 2, length, (batch_size,), generator=generator)
    marks = torch.zeros(batch_size, length)
    rows = torch.arange(batch_size)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    return torch.stack([values, marks], dim=-1), (values * marks).sum(1, keepdim=True) - 1.0


def curriculum(steps: int, short_steps: int, seq_len: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of 32: length 10 for the first ``short_steps``, then length ``seq_len``."""
    generator = torch.Generator().manual_seed(seed)
    return [adding_batch(32, 10 if i < short_steps else seq_len, generator) for i in range(steps)]


class IRNN(L.LightningModule):
    """Leaky-ReLU RNN with identity recurrent init and a linear read-out of the last hidden state."""

    def __init__(self, hidden: int = 32, lr: float = 0.01, momentum: float = 0.9, negative_slope: float = 0.1) -> None:
        super().__init__()
        self.input = nn.Linear(2, hidden)
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.recurrent.weight.copy_(torch.eye(hidden))
            nn.init.normal_(self.input.weight, std=0.001)
            self.input.bias.zero_()
        self.lr = lr
        self.momentum = momentum
        self.negative_slope = negative_slope
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drive = self.input(x)
        h = x.new_zeros(x.shape[0], self.recurrent.out_features)
        for t in range(x.shape[1]):
            h = nn.functional.leaky_relu(self.recurrent(h) + drive[:, t], self.negative_slope)
        out: torch.Tensor = self.head(h)
        return out

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(float(loss.detach()))
        self.log("train/loss", loss)
        if not math.isfinite(self.losses[-1]) and len(self.losses) >= 2 and not math.isfinite(self.losses[-2]):
            self.trainer.should_stop = True  # two non-finite losses in a row: the weights are gone
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


@dataclass
class RunResult:
    """Outcome of one run."""

    mode: str
    losses: list[float]
    clipped_steps: int | None = None
    skipped_steps: int | None = None
    lr_scale: float | None = None
    messages: tuple[str, ...] = ()

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    @property
    def first_nonfinite_step(self) -> int | None:
        return next((i for i, v in enumerate(self.losses) if not math.isfinite(v)), None)

    @property
    def went_nonfinite(self) -> bool:
        return self.first_nonfinite_step is not None

    def mean_loss(self, last: int) -> float:
        return sum(self.losses[-last:]) / min(last, len(self.losses))


def train(mode: str, args: argparse.Namespace) -> RunResult:
    """Train from seed 0 with the given protection: ``none``, ``clip_val`` or ``gradguard``."""
    L.seed_everything(0, verbose=False)
    model = IRNN(lr=args.lr)
    batches = curriculum(args.max_steps, args.short_steps, args.seq_len)
    guard = GradGuard(max_norm=args.max_norm) if mode == "gradguard" else None
    extra: dict[str, Any] = {"gradient_clip_val": 1.0} if mode == "clip_val" else {}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        logger=TensorBoardLogger(args.logdir, name="exploding_rnn", version=mode),
        callbacks=[guard] if guard is not None else [],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        **extra,
    )
    with capture_gradguard_messages() as messages:
        # A list of ready-made batches; batch_size=None hands them over as they are.
        trainer.fit(model, DataLoader(batches, batch_size=None))  # type: ignore[arg-type]
    if guard is None:
        return RunResult(mode, model.losses)
    return RunResult(
        mode,
        model.losses,
        clipped_steps=guard.clipped_steps,
        skipped_steps=guard.skipped_steps,
        lr_scale=guard.lr_scale,
        messages=tuple(messages.warnings),
    )


def main(argv: list[str] | None = None) -> dict[str, RunResult]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--short-steps", type=int, default=100, help="steps on length-10 sequences first")
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--max-norm", type=float, default=None, help="GradGuard(max_norm=...): cap, also in warmup")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    parser.add_argument("--logdir", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    if args.short_steps >= args.max_steps:
        parser.error(f"--short-steps ({args.short_steps}) must be below --max-steps ({args.max_steps})")
    quiet_lightning()

    results = {mode: train(mode, args) for mode in args.modes.split(",")}
    print(
        f"\nIRNN on the adding problem: {args.short_steps} steps at length 10, then length {args.seq_len} "
        f"up to step {args.max_steps}; SGD(lr={args.lr}, momentum=0.9)"
    )
    print(f"  {'run':28s} {'final loss':>10s} {'mean last 50':>12s}  non-finite")
    names = {"none": "no clipping", "clip_val": "Trainer(gradient_clip_val=1.0)", "gradguard": "GradGuard()"}
    for mode, result in results.items():
        where = f"yes, from step {result.first_nonfinite_step}" if result.went_nonfinite else "no"
        print(f"  {names[mode]:28s} {result.final_loss:>10.4f} {result.mean_loss(50):>12.4f}  {where}")
    guarded = results.get("gradguard")
    if guarded is not None:
        print(
            f"\nGradGuard(): clipped {guarded.clipped_steps} steps, skipped {guarded.skipped_steps}, "
            f"LR scale now {guarded.lr_scale:g}"
        )
        for message in guarded.messages:
            if message.startswith("GradGuard: LR guard"):
                print(f"  {message[:220]}...")
    print(f"\nTensorBoard: {tensorboard_command(args.logdir / 'exploding_rnn')}")
    print(f"Report:      {report_command(args.logdir / 'exploding_rnn')}")
    return results


if __name__ == "__main__":
    one_thread_unless_set()  # tiny models: a second thread only waits on a busy machine
    main()
