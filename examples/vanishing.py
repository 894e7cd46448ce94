"""Vanishing gradients: a deep Sigmoid net, the popular deep Tanh net and a BatchNorm+ReLU+Kaiming net.

    python examples/vanishing.py [--max-steps N] [--variants sigmoid,tanh,bn_relu] [--logdir DIR]

Each variant is a 10-layer fully connected classifier (64 -> 100 x 9 -> 10) on scikit-learn's digits,
trained with ``GradGuard()`` and its default diagnostics. The script prints, per variant, the first-
and last-layer gradient norms at the first step and what GradGuard's diagnostics concluded.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
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

VARIANTS = ("sigmoid", "tanh", "bn_relu")
DEPTH = 10
WIDTH = 100


def make_net(variant: str, depth: int = DEPTH, width: int = WIDTH) -> nn.Sequential:
    """``depth`` Linear layers named ``fc1`` .. ``fc{depth}``, with the variant's activation between them.

    ``sigmoid`` and ``tanh`` keep PyTorch's default init; ``bn_relu`` puts a BatchNorm before each ReLU
    and uses Kaiming (He) init.
    """
    sizes = [64] + [width] * (depth - 1) + [10]
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(depth):
        last = i == depth - 1
        linear = nn.Linear(sizes[i], sizes[i + 1], bias=last or variant != "bn_relu")
        layers[f"fc{i + 1}"] = linear
        if last:
            break
        if variant == "sigmoid":
            layers[f"act{i + 1}"] = nn.Sigmoid()
        elif variant == "tanh":
            layers[f"act{i + 1}"] = nn.Tanh()
        elif variant == "bn_relu":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            layers[f"bn{i + 1}"] = nn.BatchNorm1d(sizes[i + 1])
            layers[f"act{i + 1}"] = nn.ReLU()
        else:
            raise ValueError(f"`variant` must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return nn.Sequential(layers)


class DeepClassifier(L.LightningModule):
    """A :func:`make_net` classifier trained with SGD + momentum; records the first step's layer norms."""

    def __init__(self, variant: str, lr: float = 0.05) -> None:
        super().__init__()
        self.net = make_net(variant)
        self.lr = lr
        self.first_norms: dict[str, float] = {}  # L2 norm and per-element RMS of fc1's and the last layer's grads

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def on_after_backward(self) -> None:
        if not self.first_norms:
            for name in ("fc1", f"fc{DEPTH}"):
                grad = getattr(self.net, name).weight.grad
                l2 = float(grad.norm()) if grad is not None else math.nan
                self.first_norms[name] = l2
                self.first_norms[f"{name}_rms"] = l2 / math.sqrt(grad.numel()) if grad is not None else math.nan

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits_loader(batch_size: int = 64) -> DataLoader[tuple[torch.Tensor, ...]]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


@dataclass
class VariantResult:
    """What one variant showed."""

    variant: str
    first_layer_norm: float
    last_layer_norm: float
    first_layer_rms: float
    last_layer_rms: float
    final_loss: float
    verdicts: list[str] = field(default_factory=list)
    summary: str = ""

    def flagged(self, kind: str) -> list[str]:
        """Layer names with a verdict of ``kind`` (e.g. ``"vanishing"``), in the order reported."""
        names = []
        for message in self.verdicts:
            if f" {kind} gradient" in message or (kind == "dead" and " is dead" in message):
                names.append(message.split("'")[1])
        return names


def train_variant(variant: str, max_steps: int, logdir: Path) -> VariantResult:
    """Train one variant with ``GradGuard()`` and collect what its diagnostics said."""
    L.seed_everything(0, verbose=False)
    model = DeepClassifier(variant)
    guard = GradGuard()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=TensorBoardLogger(logdir, name="vanishing", version=variant),
        callbacks=[guard],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    with capture_gradguard_messages() as messages:
        trainer.fit(model, digits_loader())
    return VariantResult(
        variant=variant,
        first_layer_norm=model.first_norms["fc1"],
        last_layer_norm=model.first_norms[f"fc{DEPTH}"],
        first_layer_rms=model.first_norms["fc1_rms"],
        last_layer_rms=model.first_norms[f"fc{DEPTH}_rms"],
        final_loss=float(trainer.callback_metrics["train/loss"]),
        verdicts=messages.verdicts,
        summary=messages.summary,
    )


def main(argv: list[str] | None = None) -> dict[str, VariantResult]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS)
    )
    parser.add_argument("--logdir", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    quiet_lightning()

    results = {}
    for variant in args.variants.split(","):
        result = results[variant] = train_variant(variant, args.max_steps, args.logdir)
        ratio = result.first_layer_norm / result.last_layer_norm
        vanishing = result.flagged("vanishing")
        print(f"\n=== {variant}: 10 Linear layers, {args.max_steps} steps, final loss {result.final_loss:.3f}")
        print(
            f"  step 0 weight-gradient L2 norm: fc1 {result.first_layer_norm:.2e}, "
            f"fc{DEPTH} {result.last_layer_norm:.2e} (ratio {ratio:.1e})"
        )
        rms_ratio = result.first_layer_rms / result.last_layer_rms
        print(
            f"  step 0 per-element RMS:         fc1 {result.first_layer_rms:.2e}, "
            f"fc{DEPTH} {result.last_layer_rms:.2e} (ratio {rms_ratio:.1e})"
        )
        print(f"  layers GradGuard calls vanishing: {', '.join(vanishing) if vanishing else 'none'}")
        for message in result.verdicts[:3]:
            print(f"    {message.split(' Remedy:')[0].removeprefix('GradGuard: ')}")
        if len(result.verdicts) > 3:
            print(f"    ... and {len(result.verdicts) - 3} more verdicts")
        if result.summary:
            print("  " + "\n  ".join(result.summary.splitlines()))
    print(f"\nTensorBoard: {tensorboard_command(args.logdir / 'vanishing')}")
    print(f"Report:      {report_command(args.logdir / 'vanishing')}")
    return results


if __name__ == "__main__":
    one_thread_unless_set()  # tiny models: a second thread only waits on a busy machine
    main()
