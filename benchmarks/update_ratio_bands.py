"""Evidence for the update-to-weight ratio bands: log10(||dw|| / ||w||) per layer on healthy and broken runs.

Trains the quickstart's three-layer MLP on the 8x8 digits (1797 samples, batches of 32, plain torch loop,
CPU, seed 0) for ``--steps`` optimizer steps in five configurations:

* ``adam``: Adam at LR 1e-3 (healthy);
* ``adam_30x``: Adam at LR 3e-2 (30x too high);
* ``sgd``: SGD with momentum 0.9 at LR 0.05 (the quickstart's healthy setting);
* ``sgd_30x``: the same at LR 1.5 (30x too high);
* ``adam_frozen_mid``: healthy Adam, but the middle layer's LR is 1e-7 (a layer that is not learning).

Every ``--every`` steps it records each layer's log10 update-to-weight ratio with
:class:`~lightning_gradguard.measure.updates.UpdateTracker` and prints, per configuration and layer, the median and
max over the first 10% of steps, the median, min and max over the rest, and the final accuracy on the
training set.

Run: ``.venv/bin/python benchmarks/update_ratio_bands.py [--steps 300] [--every 5]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from lightning_gradguard.measure.stats import GradStats  # noqa: E402
from lightning_gradguard.measure.updates import UpdateTracker  # noqa: E402

CONFIGS = ("adam", "adam_30x", "sgd", "sgd_30x", "adam_frozen_mid")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long)


def run(config: str, steps: int, every: int) -> dict[str, object]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = _data()
    opt: torch.optim.Optimizer
    if config.startswith("adam"):
        lr = 3e-2 if config == "adam_30x" else 1e-3
        groups = [{"params": list(net[0].parameters()) + list(net[4].parameters())}]
        groups.append({"params": list(net[2].parameters()), "lr": 1e-7 if config == "adam_frozen_mid" else lr})
        opt = torch.optim.Adam(groups, lr=lr)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=1.5 if config == "sgd_30x" else 0.05, momentum=0.9)
    tracker = UpdateTracker(GradStats(net.named_parameters()))
    gen = torch.Generator().manual_seed(0)
    ratios: dict[str, list[tuple[int, float]]] = {layer: [] for layer in tracker.layers}
    losses: list[float] = []
    order = torch.randperm(len(x), generator=gen)
    pos = 0
    for step in range(steps):
        if pos + 32 > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos : pos + 32]
        pos += 32
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        losses.append(float(loss.detach()))
        log = step % every == 0
        if log:
            tracker.snapshot()
        opt.step()
        if log:
            for layer, r in tracker.read(tracker.squared_norms()).log10_ratios().items():
                ratios[layer].append((step, r))
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())
    early = steps // 10
    per_layer = {
        layer: {
            "early_median": statistics.median(r for s, r in v if s < early),
            "early_max": max(r for s, r in v if s < early),
            "median": statistics.median(r for s, r in v if s >= early),
            "min": min(r for s, r in v if s >= early),
            "max": max(r for s, r in v if s >= early),
        }
        for layer, v in ratios.items()
    }
    finite_losses = [v for v in losses if math.isfinite(v)]
    return {"accuracy": acc, "final_loss": losses[-1], "max_loss": max(finite_losses), "layers": per_layer}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {}
    for config in CONFIGS:
        res = run(config, args.steps, args.every)
        results[config] = res
        print(f"{config:16s} accuracy {res['accuracy']:.3f}  final loss {res['final_loss']:.3g}")
        for layer, s in res["layers"].items():  # type: ignore[attr-defined]
            print(
                f"    layer {layer}: log10 ratio first 10% of steps: median {s['early_median']:+.2f} "
                f"max {s['early_max']:+.2f} | rest: median {s['median']:+.2f} min {s['min']:+.2f} max {s['max']:+.2f}"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
