"""Resident memory over a long run with every GradGuard output on: it must stay flat after warm-up.

A plain PyTorch loop trains a tiny regression MLP with :class:`~lightning_gradguard.Guard` writing to a
TensorBoard ``SummaryWriter``, every output on at short cadences: scalars and per-layer norms every
``--log-every`` steps, histograms, the layer x step heatmap image, update-to-weight ratios and their
verdicts, diagnostics, recovery snapshots. Short cadences make a per-output leak show within the run: at
the defaults (heatmap every 1,000 steps) the same growth would take 20-50x more steps to appear.

Resident memory (``VmRSS`` from ``/proc/self/status``) is read after a warm-up (the first heatmaps,
histograms and snapshots allocate their buffers, matplotlib loads its fonts) and at the end; the
growth in between, per 10,000 steps and per heatmap written, is printed. ``check: ok`` when the growth
after warm-up stays within ``--tolerance-mib``.

Run: ``.venv/bin/python benchmarks/bench_memory.py [--quick] [--steps N] [--out result.json]``
(``--quick``: 600 steps, for the smoke test; the default, 50,000 steps, takes a few minutes on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

from lightning_gradguard import Guard  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = args.steps or (600 if args.quick else 50_000)
    warmup = args.warmup if args.warmup is not None else max(args.heatmap_every * 3, steps // 10)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(4096, 1, generator=g)

    from torch.utils.tensorboard import SummaryWriter

    readings: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        guard = Guard(
            model,
            optimizer,
            writer=writer,
            log_every_n_steps=args.log_every,
            histogram_every_n_steps=args.histogram_every,
            heatmap_every_n_steps=args.heatmap_every,
            snapshot_every_n_steps=args.snapshot_every,
            log_update_ratios=True,
            diagnostics=True,
        )
        start = time.perf_counter()
        for step in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            guard.before_optimizer_step(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step + 1 == warmup or (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
                gc.collect()
                readings.append((step + 1, rss_mib()))
        elapsed = time.perf_counter() - start
        guard.close()
        writer.close()

    warm = next(r for s, r in readings if s >= warmup)
    end = readings[-1][1]
    heatmaps = (steps - warmup) // args.heatmap_every
    growth = end - warm
    print(f"versions: torch {torch.__version__}, python {platform.python_version()}")
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
            "quick": args.quick,
            "steps": steps,
            "warmup": warmup,
            "rss_mib": [[s, r] for s, r in readings],
            "growth_mib": growth,
            "heatmaps_after_warmup": heatmaps,
            "seconds": elapsed,
        }
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
