"""Resident memory over a long run with every GradGuard output on: it must stay flat after warm-up.

Two front-ends, each training a tiny regression MLP with every output on at short cadences (scalars and
per-layer norms every ``--log-every`` steps, histograms, the layer x step heatmap image, update-to-weight
ratios and their verdicts, diagnostics, recovery snapshots):

* ``--mode trainer`` (the default): a Lightning ``Trainer`` with a ``TensorBoardLogger`` and the
  :class:`~lightning_gradguard.GradGuard` callback, as users run it;
* ``--mode loop``: a plain PyTorch loop with :class:`~lightning_gradguard.Guard` writing to a
  TensorBoard ``SummaryWriter``.

Short cadences make a per-output leak show within the run: at the defaults (heatmap every 1,000 steps)
the same growth would take 10-50x more steps to appear.

Resident memory (``VmRSS`` from ``/proc/self/status``) is read as the user would see it, without forcing a
garbage collection: after a warm-up (the first heatmaps, histograms and snapshots allocate their buffers,
matplotlib loads its fonts) and at every tenth of the run. The growth from the warm-up reading to the
end, per 10,000 steps and per heatmap written, is printed; ``check: ok`` when it stays within
``--tolerance-mib``.

Run: ``.venv/bin/python benchmarks/bench_memory.py [--mode trainer|loop] [--quick] [--steps N] [--out result.json]``
(``--quick``: 600 steps, for the smoke test; the default, 50,000 steps, takes a few minutes on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux ``/proc``; ``nan`` elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("trainer", "loop"), default="trainer", help="front-end (default trainer)")
    parser.add_argument("--quick", action="store_true", help="600 steps (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 50,000; 600 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before the first reading (default 10%%)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--heatmap-every", type=int, default=100)
    parser.add_argument("--histogram-every", type=int, default=50)
    parser.add_argument("--snapshot-every", type=int, default=50)
    parser.add_argument("--tolerance-mib", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=None, help="write the readings as JSON here")
    return parser.parse_args(argv)


class _Readings:
    """RSS readings at the warm-up step, every tenth of the run and the last step."""

    def __init__(self, steps: int, warmup: int) -> None:
        self.steps, self.warmup = steps, warmup
        self.values: list[tuple[int, float]] = []

    def after(self, step: int) -> None:
        if step == self.warmup or step % max(1, self.steps // 10) == 0 or step == self.steps:
            self.values.append((step, rss_mib()))


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(4096, 1, generator=g)
    return x, y, g


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def _outputs(args: argparse.Namespace) -> dict[str, object]:
    """Every output on, at the benchmark's cadences (the keyword arguments of Guard and GradGuard)."""
    return {
        "log_every_n_steps": args.log_every,
        "histogram_every_n_steps": args.histogram_every,
        "heatmap_every_n_steps": args.heatmap_every,
        "snapshot_every_n_steps": args.snapshot_every,
        "log_update_ratios": True,
        "diagnostics": True,
    }


def run_loop(args: argparse.Namespace, readings: _Readings) -> None:
    """A plain PyTorch loop with ``Guard`` and a ``SummaryWriter``."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_gradguard import Guard

    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y, g = _data()
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        guard = Guard(model, optimizer, writer=writer, **_outputs(args))  # type: ignore[arg-type]
        for step in range(readings.steps):
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            guard.before_optimizer_step(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            readings.after(step + 1)
        guard.close()
        writer.close()


def run_trainer(args: argparse.Namespace, readings: _Readings) -> None:
    """A Lightning ``Trainer`` with a ``TensorBoardLogger`` and the ``GradGuard`` callback."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gradguard import GradGuard

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            return nn.functional.mse_loss(self.net(inputs), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Read(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
            readings.after(trainer.global_step)

    x, y, g = _data()
    batches = [(x[idx], y[idx]) for idx in torch.randint(0, len(x), (1000, 32), generator=g)]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=readings.steps,
            logger=TensorBoardLogger(tmp),
            callbacks=[GradGuard(**_outputs(args)), Read()],  # type: ignore[arg-type]
            log_every_n_steps=args.log_every,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(Regression(), torch.utils.data.DataLoader(batches, batch_size=None))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = args.steps or (600 if args.quick else 50_000)
    warmup = args.warmup if args.warmup is not None else max(args.heatmap_every * 3, steps // 10)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # GradGuard's verdicts and Lightning's tips
    logging.getLogger("lightning_gradguard").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    reading = _Readings(steps, warmup)
    start = time.perf_counter()
    (run_trainer if args.mode == "trainer" else run_loop)(args, reading)
    elapsed = time.perf_counter() - start
    readings = reading.values

    warm = next(r for s, r in readings if s >= warmup)
    end = readings[-1][1]
    heatmaps = (steps - warmup) // args.heatmap_every
    growth = end - warm
    print(f"versions: torch {torch.__version__}, python {platform.python_version()}")
    front_end = "Trainer + TensorBoardLogger + GradGuard" if args.mode == "trainer" else "plain loop + Guard"
    print(f"mode: {args.mode} ({front_end})")
    print(f"steps: {steps}, warm-up {warmup}, {elapsed:.1f} s ({1e3 * elapsed / steps:.2f} ms/step)")
    print(f"cadences: log {args.log_every}, histograms {args.histogram_every}, heatmap {args.heatmap_every}, "
          f"snapshots {args.snapshot_every}, update ratios and diagnostics on")  # fmt: skip
    for step, value in readings:
        print(f"rss at step {step}: {value:.1f} MiB")
    per_10k = growth * 10_000 / max(1, steps - warmup)
    print(f"growth after warm-up: {growth:+.1f} MiB ({per_10k:+.2f} MiB per 10,000 steps, "
          f"{growth / max(1, heatmaps):+.3f} MiB per heatmap written, {heatmaps} heatmaps)")  # fmt: skip
    ok = growth <= args.tolerance_mib
    print(f"check: {'ok' if ok else 'FAILED'} (growth {growth:+.1f} MiB, tolerance {args.tolerance_mib} MiB)")
    if args.out is not None:
        result = {
            "mode": args.mode,
            "quick": args.quick,
            "steps": steps,
            "warmup": warmup,
            "rss_mib": [[s, r] for s, r in readings],
            "growth_mib": growth,
            "growth_mib_per_10k_steps": per_10k,
            "heatmaps_after_warmup": heatmaps,
            "seconds": elapsed,
        }
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
