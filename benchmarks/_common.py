"""Helpers shared by the micro-benchmarks: the synthetic model, interleaved timing, reporting.

Not part of the package. Each ``bench_*.py`` script imports this module from its own folder.

Timing method: every case is timed once per *round*, the cases of a round run back to back in an
order that rotates from round to round, and each case reports the median over rounds. Because the
machine may be shared, a slow spell hits all cases of a round alike; the reported ratios are ratios
of medians, and the median of the per-round ratios is printed next to them as a cross-check.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "RESULTS_DIR",
    "Report",
    "SyntheticModel",
    "build_model",
    "machine_info",
    "parse_args",
    "time_interleaved",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (vocab, width, depth): the full model has 90.1M parameters in 265 tensors (133 layers when grouped
# by module); the quick one is tiny and only checks that the scripts run.
FULL_SHAPE = (4096, 576, 22)
QUICK_SHAPE = (64, 32, 2)


class _Block(nn.Module):
    """The parameter shapes of a pre-LayerNorm transformer block (12 tensors; no forward needed)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)


class SyntheticModel(nn.Module):
    """An embedding followed by ``depth`` transformer-like blocks (1 + 12 * depth tensors)."""

    def __init__(self, vocab: int, width: int, depth: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))


def build_model(quick: bool, device: torch.device, seed: int = 0) -> SyntheticModel:
    """The synthetic model with every ``.grad`` set to N(0, 1e-3) values.

    The weights are left uninitialised (allocated, never read): only the gradients matter here.
    """
    vocab, width, depth = QUICK_SHAPE if quick else FULL_SHAPE
    with torch.device("meta"):
        model = SyntheticModel(vocab, width, depth)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
    return model


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "not installed"
    return str(getattr(mod, "__version__", "unknown"))


def machine_info(device: torch.device) -> dict[str, Any]:
    """Machine, library versions and thread settings, for the printed header and the JSON."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "tensorboard": _version("tensorboard"),
        "numpy": _version("numpy"),
        "device": str(device),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny model, few rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own default)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"`--rounds` must be >= 1, got {args.rounds}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"`--threads` must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return args


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(
    cases: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int,
    device: torch.device,
    setup: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every case, one sample per round, cases interleaved within a round.

    Args:
        cases: name -> zero-argument callable.
        rounds: timed rounds; each case runs once per round.
        warmup: untimed rounds run first.
        device: the device whose queue is synchronised around each timed call.
        setup: called before every call (warm-up and timed), outside the timed region.
    """
    sync = _sync(device)
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(warmup + rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                if setup is not None:
                    setup()
                sync()
                t0 = time.perf_counter()
                cases[name]()
                sync()
                elapsed = time.perf_counter() - t0
                if r >= warmup:
                    samples[name].append(elapsed)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


@dataclass
class Report:
    """Collects medians and ratios, prints them as they come, and writes the JSON at the end."""

    name: str
    quick: bool
    device: torch.device
    variant: str = ""  # appended to the default JSON file name, e.g. "threads1"
    config: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.machine = machine_info(self.device)
        m = self.machine
        print(f"== {self.name}{' (quick)' if self.quick else ''}{f' [{self.variant}]' if self.variant else ''}")
        print(f"machine: {m['cpu']} | {m['cpu_count']} CPUs | torch threads {m['torch_threads']} | {m['platform']}")
        print(
            f"versions: python {m['python']} | torch {m['torch']} | lightning {m['lightning']}"
            f" | tensorboard {m['tensorboard']} | numpy {m['numpy']} | device {m['device']}"
        )

    def add(self, samples: Mapping[str, list[float]]) -> None:
        """Record and print per-case medians (ms) with the interquartile range."""
        for case, values in samples.items():
            self.samples[case] = list(values)
            q1, med, q3 = _quartiles(values)
            print(f"median {case:<28s} {med * 1e3:10.2f} ms   (IQR {q1 * 1e3:.2f}-{q3 * 1e3:.2f}, n={len(values)})")

    def median(self, case: str) -> float:
        return statistics.median(self.samples[case])

    def ratio(self, label: str, num: str, den: str, *, target: float | None = None, op: str = "<=") -> float:
        """Print and record ``median(num) / median(den)``, checked against ``target`` when given."""
        value = self.median(num) / self.median(den)
        paired = statistics.median(a / b for a, b in zip(self.samples[num], self.samples[den], strict=True))
        entry: dict[str, Any] = {"numerator": num, "denominator": den, "ratio": value, "paired_median": paired}
        # significant digits, not decimals: a tiny ratio (a 5 us capture against a step slowed by a loaded
        # machine) must not print as 0.000x
        line = f"ratio {label}: {value:.4g}x   (per-round median {paired:.4g}x)"
        if target is not None:
            met = value <= target if op == "<=" else value >= target
            entry.update(target=target, op=op, met=met)
            line += f"   target {op} {target:g}x: {'met' if met else 'MISSED'}"
        self.ratios[label] = entry
        print(line)
        return value

    def write(self, out: Path | None) -> Path:
        stem = self.name + ("-quick" if self.quick else "") + (f"-{self.variant}" if self.variant else "")
        path = out if out is not None else RESULTS_DIR / f"{stem}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.machine["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        payload = {
            "benchmark": self.name,
            "quick": self.quick,
            "machine": self.machine,
            "config": self.config,
            "median_ms": {case: statistics.median(v) * 1e3 for case, v in self.samples.items()},
            "samples_ms": {case: [x * 1e3 for x in v] for case, v in self.samples.items()},
            "ratios": self.ratios,
            "notes": self.notes,
            "argv": sys.argv[1:],
        }
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"results written to {path}")
        return path


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else math.nan
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]
