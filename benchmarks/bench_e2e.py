"""End-to-end cost of GradGuard in a real Lightning training loop, against the usual alternatives.

Trains a small causal transformer language model (about 5M parameters) on random tokens, on CPU, with

* ``none``          (a) no gradient callback;
* ``clip_val``      (b) ``Trainer(gradient_clip_val=1.0)``;
* ``grad_norm``     (c) Lightning's ``grad_norm(self, norm_type=2)`` + ``self.log_dict`` every step, in the
  module's ``on_before_optimizer_step`` (as Lightning's docs show);
* ``add_histogram`` (d) ``SummaryWriter.add_histogram`` of every parameter's gradient every 10 steps;
* ``gradguard``     (e) ``GradGuard()`` with its defaults.

Every case has the same model (same seed), data, optimizer (AdamW) and ``TensorBoardLogger``.

Timing: a callback records ``on_train_batch_start`` -> ``on_train_batch_end`` of every step. One *round*
fits each case once, for ``warmup`` untimed steps then ``steps`` timed steps, the cases in an order that
rotates from round to round, so a slow spell of a shared machine hits all cases alike. The per-round
figure of a case is the **mean** step time over its timed steps: amortised, so work done every N steps
(histograms, logger writes) counts in proportion; the timed window of 100 steps holds exactly one
GradGuard histogram step and ten ``add_histogram`` steps. The reported figure is the **median over rounds**,
and each ratio is also given as the median of the per-round ratios (paired, same round) as a cross-check.
The median single-step time (typical step, which ignores every-N-steps work) is printed too.

Memory: the peak of live bytes allocated through torch's CPU allocator during the timed steps, read from
``torch.profiler`` memory events (``profile_memory=True``), for (a) and (e) in the same process; the
difference is GradGuard's peak extra memory. The peak resident set size (``ru_maxrss``) of a fresh process
for (a) and for (e) is printed next to it; it also counts imported modules and allocator caching.

Targets: (e) adds at most 2% over (a), and costs less than (c) and (d).

Run: ``.venv/bin/python benchmarks/bench_e2e.py [--quick] [--rounds N] [--steps N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Benchmark the checkout this script lives in, installed or not.
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent)]

from lightning_gradguard import GradGuard  # noqa: E402

CASES = ("none", "clip_val", "grad_norm", "add_histogram", "gradguard")
LABELS = {
    "none": "(a) no callback",
    "clip_val": "(b) gradient_clip_val=1.0",
    "grad_norm": "(c) grad_norm + log_dict",
    "add_histogram": "(d) add_histogram / 10 steps",
    "gradguard": "(e) GradGuard()",
}
HISTOGRAM_EVERY = 10
RESULTS = _HERE / "results"

# vocab, width, layers, ffn, seq, batch
FULL = {"vocab": 2048, "width": 256, "layers": 5, "ffn": 1024, "seq": 32, "batch": 8}
QUICK = {"vocab": 64, "width": 32, "layers": 2, "ffn": 64, "seq": 16, "batch": 4}


class TinyLM(L.LightningModule):
    """A pre-LayerNorm causal transformer language model; ``mode`` selects the per-step extra work."""

    def __init__(self, vocab: int, width: int, layers: int, ffn: int, seq: int, mode: str = "none") -> None:
        super().__init__()
        self.mode = mode
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(seq, width))
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=ffn, dropout=0.0, batch_first=True)
        layer.norm_first = True
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        x = self.embed(tokens[:, :-1]) + self.pos[: tokens.shape[1] - 1]
        n = x.shape[1]
        h = self.encoder(x, mask=self.mask[:n, :n], is_causal=True)
        logits = self.head(self.norm(h))
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        self.log("train/loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.mode == "grad_norm":
            self.log_dict(grad_norm(self, norm_type=2))
        elif self.mode == "add_histogram" and self.global_step % HISTOGRAM_EVERY == 0:
            writer = self.logger.experiment  # type: ignore[union-attr]
            for name, p in self.named_parameters():
                if p.grad is not None:
                    writer.add_histogram(f"grad/{name}", p.grad, self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


class StepTimer(Callback):
    """Wall and process-CPU seconds from ``on_train_batch_start`` to ``on_train_batch_end`` of every step."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.cpu.append(time.process_time() - self._c0)
        self.wall.append(time.perf_counter() - self._t0)


class TimedGradGuard(GradGuard):
    """``GradGuard()`` that also records the process-CPU seconds spent in its ``on_before_optimizer_step``."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_cpu: list[float] = []

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        c0 = time.process_time()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.hook_cpu.append(time.process_time() - c0)


class MemoryPeak(Callback):
    """Peak live bytes through torch's CPU allocator over steps ``[start, start + count)`` (torch.profiler)."""

    def __init__(self, start: int, count: int) -> None:
        self.start, self.count = start, count
        self.peak_bytes = 0
        self._prof: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.start:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._prof is not None and idx == self.start + self.count - 1:
            self._prof.__exit__(None, None, None)
            self.peak_bytes = _peak_live_bytes(self._prof)
            self._prof = None


def _peak_live_bytes(prof: Any) -> int:
    """Peak of the running sum of allocations minus frees recorded by the profiler (relative to its start).

    Each event contributes the bytes it allocated or freed itself (``self_cpu_memory_usage``; frees outside
    any operator come as ``[memory]`` events), in order of start time. A temporary that an operator allocates
    and frees before it returns is not seen, the same way with and without GradGuard.
    """
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def make_data(cfg: dict[str, int], n_batches: int) -> DataLoader[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg["vocab"], (n_batches * cfg["batch"], cfg["seq"] + 1), generator=gen)
    return DataLoader(TensorDataset(tokens), batch_size=cfg["batch"], shuffle=False)


def fit_once(
    case: str, cfg: dict[str, int], total_steps: int, logdir: str, extra: list[Callback]
) -> TimedGradGuard | None:
    """Fit ``case`` for ``total_steps`` steps; returns the GradGuard instance of case (e), else ``None``."""
    torch.manual_seed(0)
    mode = case if case in ("grad_norm", "add_histogram") else "none"
    model = TinyLM(cfg["vocab"], cfg["width"], cfg["layers"], cfg["ffn"], cfg["seq"], mode=mode)
    guard = TimedGradGuard() if case == "gradguard" else None
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=total_steps,
        gradient_clip_val=1.0 if case == "clip_val" else None,
        logger=TensorBoardLogger(logdir, name=case),
        callbacks=[*extra, *([guard] if guard is not None else [])],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, make_data(cfg, total_steps))
    return guard


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import lightning
    import tensorboard

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "tensorboard": tensorboard.__version__,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.ERROR)


class RssPeak(Callback):
    """Peak resident set size over the steps from ``start`` on, above the RSS at ``start`` (Linux only).

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) at step ``start`` and reads ``VmHWM``
    at the end, so imports and set-up do not count.
    """

    def __init__(self, start: int) -> None:
        self.start = start
        self.base = self.peak = 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status", encoding="ascii") as fh:
            line = next(ln for ln in fh if ln.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.start:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            self.base = self._status("VmRSS")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak = self._status("VmHWM")


def rss_child(case: str, cfg: dict[str, int], warmup: int, steps: int) -> None:
    """Child process for the RSS figure: prints the peak RSS above the RSS after warmup, in bytes."""
    _quiet()
    meter = RssPeak(start=warmup)
    with tempfile.TemporaryDirectory() as logdir:
        fit_once(case, cfg, warmup + steps, logdir, [meter])
    print(meter.peak - meter.base)


def _table(title: str, per_round: dict[str, list[float]], all_steps: dict[str, list[float]]) -> dict[str, float]:
    medians = {c: _median(per_round[c]) for c in CASES}
    print(f"\n{title}: median over rounds of the round's mean step (amortised); typical = median single step")
    for c in CASES:
        spread = f"{min(per_round[c]) * 1e3:.1f}-{max(per_round[c]) * 1e3:.1f}"
        print(
            f"  {LABELS[c]:<30s} {medians[c] * 1e3:8.2f} ms  (rounds {spread:>13s})"
            f"  typical {_median(all_steps[c]) * 1e3:8.2f} ms"
        )
    return medians


def _ratios(medians: dict[str, float], per_round: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    pairs = [(c, "none") for c in CASES[1:]] + [("gradguard", "grad_norm"), ("gradguard", "add_histogram")]
    for num, den in pairs:
        paired = _median([x / y for x, y in zip(per_round[num], per_round[den], strict=True)])
        out[f"{num}/{den}"] = {"ratio": medians[num] / medians[den], "paired": paired}
        print(f"  {num + ' / ' + den:<28s} {medians[num] / medians[den]:.4f}x   (paired per round {paired:.4f}x)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps and rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per fit (default 100; quick 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per fit (default 10; quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rounds", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"`--{name}` must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"`--warmup` must be >= 0, got {args.warmup}")
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (10 if args.quick else 100)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    total = warmup + steps
    if args.rss_child:
        rss_child(args.rss_child, cfg, warmup, steps)
        return 0
    _quiet()

    info = machine()
    n_params = sum(
        p.numel() for p in TinyLM(cfg["vocab"], cfg["width"], cfg["layers"], cfg["ffn"], cfg["seq"]).parameters()
    )
    print(f"== bench_e2e{' (quick)' if args.quick else ''}")
    print(f"machine: {info['cpu']} | {info['cpu_count']} CPUs | torch threads {info['torch_threads']}")
    print(f"platform: {info['platform']}")
    print(
        f"versions: python {info['python']} | torch {info['torch']} | lightning {info['lightning']}"
        f" | tensorboard {info['tensorboard']} | load average at start {info['loadavg']}"
    )
    print(
        f"model: causal transformer LM, {n_params / 1e6:.2f}M parameters, {cfg}; AdamW; "
        f"{rounds} rounds x {len(CASES)} cases x ({warmup} warmup + {steps} timed) steps"
    )

    wall: dict[str, list[float]] = {c: [] for c in CASES}  # mean step time of each round
    cpu: dict[str, list[float]] = {c: [] for c in CASES}
    wall_steps: dict[str, list[float]] = {c: [] for c in CASES}
    cpu_steps: dict[str, list[float]] = {c: [] for c in CASES}
    hook: list[float] = []  # mean CPU seconds per step inside GradGuard's hook, per round
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(rounds):
            order = CASES[r % len(CASES) :] + CASES[: r % len(CASES)]
            for case in order:
                timer = StepTimer()
                guard = fit_once(case, cfg, total, logdir, [timer])
                wall[case].append(statistics.fmean(timer.wall[warmup:]))
                cpu[case].append(statistics.fmean(timer.cpu[warmup:]))
                wall_steps[case].extend(timer.wall[warmup:])
                cpu_steps[case].extend(timer.cpu[warmup:])
                if guard is not None:
                    hook.append(statistics.fmean(guard.hook_cpu[warmup:total]))
            print(
                f"round {r + 1}/{rounds} (wall / cpu ms): "
                + "  ".join(f"{c} {wall[c][-1] * 1e3:.1f}/{cpu[c][-1] * 1e3:.1f}" for c in CASES),
                flush=True,
            )

        wall_med = _table("wall-clock time per step", wall, wall_steps)
        cpu_med = _table("process CPU time per step", cpu, cpu_steps)
        print("\nratios of wall-clock medians")
        wall_ratios = _ratios(wall_med, wall)
        print("ratios of CPU-time medians")
        cpu_ratios = _ratios(cpu_med, cpu)
        hook_med = _median(hook)
        print(
            f"\nGradGuard's own hook (on_before_optimizer_step), CPU time per step, amortised: {hook_med * 1e3:.2f} ms"
            f" = {hook_med / cpu_med['none'] * 100:.2f}% of (a)'s CPU time per step"
        )

        targets: dict[str, bool] = {}
        for kind, med in (("wall", wall_med), ("cpu", cpu_med)):
            overhead = med["gradguard"] / med["none"] - 1.0
            print(f"GradGuard overhead over (a), {kind}: {overhead * 100:+.2f}%")
            targets[f"{kind}: gradguard adds <= 2% over none"] = overhead <= 0.02
            targets[f"{kind}: gradguard < grad_norm"] = med["gradguard"] < med["grad_norm"]
            targets[f"{kind}: gradguard < add_histogram"] = med["gradguard"] < med["add_histogram"]
        for name, met in targets.items():
            print(f"  target {name}: {'met' if met else 'MISSED'}")

        # Memory: steps 0-2 of a fresh fit; step 0 is GradGuard's busiest (histograms, first log, dashboard).
        peaks: dict[str, int] = {}
        for case in ("none", "gradguard"):
            meter = MemoryPeak(start=0, count=3)
            fit_once(case, cfg, 3, logdir, [meter])
            peaks[case] = meter.peak_bytes
    mib = 1024 * 1024
    print("\nmemory: peak live bytes through torch's CPU allocator over steps 0-2 (torch.profiler, profile_memory)")
    for case, value in peaks.items():
        print(f"  {LABELS[case]:<30s} {value / mib:9.2f} MiB")
    print(f"  GradGuard peak extra: {(peaks['gradguard'] - peaks['none']) / mib:+.3f} MiB")

    rss: dict[str, int] = {}
    if os.path.exists("/proc/self/clear_refs"):
        for case in ("none", "gradguard"):
            cmd = [sys.executable, __file__, "--rss-child", case, "--steps", str(steps), "--warmup", str(warmup)]
            cmd += ["--threads", str(args.threads), *(["--quick"] if args.quick else [])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
            rss[case] = int(out[-1])
        print(f"peak RSS growth over the {steps} steps after warmup, fresh process each (/proc/self VmHWM reset)")
        for case, value in rss.items():
            print(f"  {LABELS[case]:<30s} {value / mib:9.2f} MiB")
        print(f"  GradGuard peak extra: {(rss['gradguard'] - rss['none']) / mib:+.2f} MiB")

    payload = {
        "benchmark": "bench_e2e",
        "quick": args.quick,
        "machine": {**info, "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "config": {**cfg, "params": n_params, "rounds": rounds, "steps": steps, "warmup": warmup},
        "wall_median_ms": {c: wall_med[c] * 1e3 for c in CASES},
        "cpu_median_ms": {c: cpu_med[c] * 1e3 for c in CASES},
        "wall_typical_step_ms": {c: _median(wall_steps[c]) * 1e3 for c in CASES},
        "cpu_typical_step_ms": {c: _median(cpu_steps[c]) * 1e3 for c in CASES},
        "wall_per_round_ms": {c: [x * 1e3 for x in wall[c]] for c in CASES},
        "cpu_per_round_ms": {c: [x * 1e3 for x in cpu[c]] for c in CASES},
        "wall_ratios": wall_ratios,
        "cpu_ratios": cpu_ratios,
        "gradguard_hook_cpu_ms": hook_med * 1e3,
        "targets": targets,
        "memory": {"profiler_peak_bytes": peaks, "rss_peak_bytes": rss},
        "argv": list(argv if argv is not None else sys.argv[1:]),
    }
    out_path = args.out or RESULTS / f"bench_e2e{'-quick' if args.quick else ''}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
