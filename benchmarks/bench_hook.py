"""GradGuard's own per-step cost on bench_e2e's model, split by the kind of work a step does.

Fits ``bench_e2e``'s 5M-parameter causal transformer (CPU, ``GradGuard()`` with its defaults, a
``TensorBoardLogger``) and records, for every optimizer step, the process-CPU time spent inside

* GradGuard's ``on_before_optimizer_step`` (the figure ``bench_e2e`` reports as the hook's cost), and
* the optimizer step post-hook that closes the update-to-weight ratios (after ``optimizer.step()``).

Each step is labelled by the periodic work it did, found by counting calls during the step:
``snapshot`` (a rollback snapshot capture), ``histogram`` (per-layer histograms computed and written),
``updates`` (a weight copy for the update ratios: log, diagnose and stall-check steps), ``ordinary``
(none of these). A step may carry several labels; it is counted under each.

Printed: per kind, the number of steps and the median hook (+ post-hook) milliseconds; and the
amortised mean per step over bench_e2e's timed window (steps ``warmup .. warmup + steps``), over
``--rounds`` fits, median across rounds.

Run: ``.venv/bin/python benchmarks/bench_hook.py [--quick] [--rounds N] [--threads N] [--show]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

from bench_e2e import FULL, QUICK, TinyLM, _quiet, make_data  # noqa: E402

from lightning_gradguard import GradGuard  # noqa: E402
from lightning_gradguard.decide.engine import Engine  # noqa: E402
from lightning_gradguard.outputs.sink import Reporter  # noqa: E402
from lightning_gradguard.recovery.snapshot import Snapshot  # noqa: E402
from lightning_gradguard.step import OptimizerStep  # noqa: E402

KINDS = ("ordinary", "snapshot", "histogram", "updates")
_calls: dict[str, int] = defaultdict(int)


def _counting(cls: type, name: str, kind: str) -> None:
    original: Callable[..., Any] = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _calls[kind] += 1
        return original(*args, **kwargs)

    setattr(cls, name, wrapper)


_counting(Snapshot, "capture", "snapshot")
_counting(Reporter, "histograms", "histogram")
_counting(Engine, "snapshot_updates", "updates")


class TimedGuard(GradGuard):
    """``GradGuard()`` recording the CPU time of its hook and of the update post-hook, with each step's kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: list[float] = []
        self.post: list[float] = []
        self.kinds: list[tuple[str, ...]] = []

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        before = dict(_calls)
        c0 = time.process_time()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.hook.append(time.process_time() - c0)
        self.post.append(0.0)
        kinds = tuple(k for k in KINDS[1:] if _calls[k] != before.get(k, 0))
        self.kinds.append(kinds or ("ordinary",))


_original_after = OptimizerStep.after_optimizer_step
_current: list[TimedGuard] = []


def _timed_after(self: OptimizerStep, engine: Engine, optimizer: torch.optim.Optimizer | None = None) -> None:
    c0 = time.process_time()
    _original_after(self, engine, optimizer)
    if _current and _current[0].post:
        _current[0].post[-1] += time.process_time() - c0


OptimizerStep.after_optimizer_step = _timed_after  # type: ignore[method-assign]


def fit(total: int, logdir: str, cfg: dict[str, int] = FULL) -> TimedGuard:
    torch.manual_seed(0)
    model = TinyLM(cfg["vocab"], cfg["width"], cfg["layers"], cfg["ffn"], cfg["seq"])
    guard = TimedGuard()
    _current[:] = [guard]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=total,
        logger=TensorBoardLogger(logdir, name="hook"),
        callbacks=[guard],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, make_data(cfg, total))
    return guard


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bench_e2e's tiny model, one round (smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="bench_e2e's timed steps (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="bench_e2e's untimed steps (default 10)")
    parser.add_argument("--extra", type=int, default=100, help="further steps for more periodic samples")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show", action="store_true", help="print every periodic step of the last round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _quiet()
    cfg = QUICK if args.quick else FULL
    rounds = 1 if args.quick else args.rounds
    total = args.warmup + args.steps + args.extra
    per_kind: dict[str, list[float]] = defaultdict(list)
    per_kind_post: dict[str, list[float]] = defaultdict(list)
    amortised: list[float] = []
    amortised_post: list[float] = []
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(rounds):
            guard = fit(total, logdir, cfg)
            for hook, post, kinds in zip(guard.hook, guard.post, guard.kinds, strict=True):
                for kind in kinds:
                    per_kind[kind].append(hook)
                    per_kind_post[kind].append(post)
            window = slice(args.warmup, args.warmup + args.steps)
            amortised.append(statistics.fmean(guard.hook[window]))
            amortised_post.append(statistics.fmean(guard.post[window]))
            print(f"round {r + 1}/{rounds}: hook {amortised[-1] * 1e3:.3f} ms/step amortised", flush=True)
    if args.show:
        for i, (hook, post, kinds) in enumerate(zip(guard.hook, guard.post, guard.kinds, strict=True)):
            if kinds != ("ordinary",):
                print(
                    f"  step {i:>4d} {'+'.join(kinds):<26s} hook {hook * 1e3:7.2f} ms  post-hook {post * 1e3:6.2f} ms"
                )
    print(f"\nGradGuard hook CPU ms per step, torch threads {torch.get_num_threads()}, {rounds} rounds")
    print(f"{'kind':<10s} {'steps':>6s} {'hook median':>12s} {'post-hook median':>17s}")
    for kind in KINDS:
        if per_kind[kind]:
            print(
                f"{kind:<10s} {len(per_kind[kind]):>6d} {statistics.median(per_kind[kind]) * 1e3:>12.3f}"
                f" {statistics.median(per_kind_post[kind]) * 1e3:>17.3f}"
            )
    print(
        f"amortised over steps {args.warmup}..{args.warmup + args.steps - 1} (median of rounds): "
        f"hook {statistics.median(amortised) * 1e3:.3f} ms, post-hook {statistics.median(amortised_post) * 1e3:.3f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
