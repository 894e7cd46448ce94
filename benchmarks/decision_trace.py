"""Every decision GradGuard takes on a set of short, varied runs, as JSON: a fast equivalence check for refactors.

    python benchmarks/decision_trace.py --out trace.json              # record
    python benchmarks/decision_trace.py --compare trace.json          # record again and compare

Each scenario trains a small model from a fixed seed on one CPU thread and records, per optimizer step, the
decision (threshold, coefficient, clipped, skipped, global norm, loss, LR scale), every event GradGuard
reports (kind, step, text), and a digest of the final weights. Two traces are *decision-identical* when the
per-step decisions, the event kinds and steps, and the final weights agree exactly; differing event texts are
listed separately (a rename may change a message without changing a decision).

The scenarios cover the default ``auto`` clip on a healthy and a too-high LR, fixed and percentile clipping,
non-finite gradients (skips), non-finite weights (rollback), a runaway loss (rollback and LR cut), the LR
guard's approach and stall channels, vanishing-gradient verdicts, update-ratio verdicts, two optimizers under
manual optimization, gradient accumulation, a checkpoint resumed by a new callback, the plain-PyTorch
``Guard`` and ``FabricGuard``. The outcomes benchmark (``bench_outcomes.py``) is the larger proof.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gradguard as gg

torch.set_num_threads(1)
Trace = dict[str, Any]


def _f(value: Any) -> Any:
    """A float as its exact repr (JSON-safe for nan/inf); other values unchanged."""
    if isinstance(value, float):
        return repr(value)
    return value


def _outcome(o: Any, lr_scale: float) -> list[Any]:
    return [
        o.step,
        _f(o.threshold),
        _f(o.coefficient),
        bool(o.clipped),
        bool(o.skipped),
        _f(float(o.global_norm)),
        _f(o.loss),
        _f(float(lr_scale)),
    ]


def _digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _data(n: int = 256, dim: int = 8, seed: int = 0, scale: float = 1.0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = torch.sin(x @ w) * scale + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class Net(L.LightningModule):
    """A small MLP with knobs for the scenarios."""

    def __init__(
        self,
        lr: float = 0.05,
        optimizer: str = "sgd",
        depth: int = 2,
        act: str = "tanh",
        nan_loss_at: tuple[int, ...] = (),
        nan_weight_at: tuple[int, ...] = (),
        lr_growth: float = 1.0,
        loss_scale: float = 1.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 8
        for _ in range(depth):
            layers += [nn.Linear(width, 16), nn.Sigmoid() if act == "sigmoid" else nn.Tanh()]
            width = 16
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.lr, self.optimizer_name, self.lr_growth, self.loss_scale = lr, optimizer, lr_growth, loss_scale
        self.nan_loss_at, self.nan_weight_at = set(nan_loss_at), set(nan_weight_at)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y) * self.loss_scale
        step = self.trainer.global_step
        if step in self.nan_loss_at:
            loss = loss * float("nan")
        if step in self.nan_weight_at:
            with torch.no_grad():
                self.net[0].weight[0, 0] = float("nan")
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        params = self.parameters()
        if self.optimizer_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr)
        elif self.optimizer_name == "sgdm":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        else:
            opt = torch.optim.SGD(params, lr=self.lr)
        if self.lr_growth == 1.0:
            return opt
        growth = self.lr_growth
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: growth**s)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TwoOptimizers(L.LightningModule):
    """Manual optimization with two optimizers (an encoder and a head), stepped one after the other."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()  # type: ignore[misc]
        loss = nn.functional.mse_loss(self.head(self.enc(x)), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.enc.parameters(), lr=0.3),
            torch.optim.Adam(self.head.parameters(), lr=0.05),
        ]


class Recorder(Callback):
    """Placed after GradGuard: reads its decision at every optimizer step."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard
        self.steps: list[list[Any]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        outcome = self.guard.last_outcome
        if outcome is not None:
            self.steps.append(_outcome(outcome, self.guard.lr_scale))


def _lightning(
    module: L.LightningModule,
    guard_kwargs: dict[str, Any],
    steps: int,
    *,
    data: TensorDataset | None = None,
    batch_size: int = 16,
    trainer_kwargs: dict[str, Any] | None = None,
    resume_at: int | None = None,
) -> Trace:
    events: list[list[Any]] = []

    def on_event(event: Any) -> None:
        events.append([event.kind, event.step, event.text])

    data = data or _data()
    recorded: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        phases = [steps] if resume_at is None else [resume_at, steps]
        ckpt: str | None = None
        for max_steps in phases:
            torch.manual_seed(0)
            guard = gg.GradGuard(on_event=on_event, diagnose_every_n_steps=10, **guard_kwargs)
            recorder = Recorder(guard)
            trainer = L.Trainer(
                max_steps=max_steps,
                callbacks=[guard, recorder],
                logger=L.pytorch.loggers.TensorBoardLogger(tmp, name="trace"),
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                accelerator="cpu",
                devices=1,
                log_every_n_steps=10,
                **(trainer_kwargs or {}),
            )
            loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(1))
            trainer.fit(module, loader, ckpt_path=ckpt)
            recorded += recorder.steps
            ckpt = str(Path(tmp) / "mid.ckpt")
            trainer.save_checkpoint(ckpt)
        return {
            "steps": recorded,
            "events": events,
            "verdicts": [[v.kind, v.layer, v.step] for v in guard.verdicts],
            "weights": _digest(module),
            "clipped": guard.clipped_steps,
            "skipped": guard.skipped_steps,
        }


def _plain(fabric: bool, steps: int = 120) -> Trace:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    events: list[list[Any]] = []

    def on_event(event: Any) -> None:
        events.append([event.kind, event.step, event.text])

    data = _data()
    if fabric:
        from lightning.fabric import Fabric

        f = Fabric(accelerator="cpu", devices=1)
        model, opt = f.setup(model, opt)
        guard: Any = gg.FabricGuard(f, model, opt, on_event=on_event, log_every_n_steps=10, diagnose_every_n_steps=10)
    else:
        guard = gg.Guard(model, opt, on_event=on_event, log_every_n_steps=10, diagnose_every_n_steps=10)
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    recorded: list[list[Any]] = []
    step = 0
    while step < steps:
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            if step in (40, 41, 90):
                loss = loss * float("nan")
            opt.zero_grad()
            if fabric:
                f.backward(loss)
            else:
                loss.backward()
            outcome = guard.before_optimizer_step(loss)
            recorded.append(_outcome(outcome, guard.lr_scale))
            opt.step()
            step += 1
            if step >= steps:
                break
    guard.close()
    return {"steps": recorded, "events": events, "weights": _digest(model)}


SCENARIOS: dict[str, Callable[[], Trace]] = {
    "auto_healthy": lambda: _lightning(Net(lr=0.05), {}, 200),
    "auto_healthy_x100": lambda: _lightning(Net(lr=0.05 / 100, loss_scale=100.0), {}, 200),
    "auto_adam_too_high": lambda: _lightning(Net(lr=0.3, optimizer="adam"), {}, 200),
    "sgdm_too_high": lambda: _lightning(Net(lr=0.9, optimizer="sgdm"), {}, 200),
    "fixed_clip": lambda: _lightning(Net(lr=0.2), {"clip": "fixed", "max_norm": 0.5}, 120),
    "percentile_clip": lambda: _lightning(Net(lr=0.2), {"clip": "percentile"}, 160),
    "nan_gradients": lambda: _lightning(Net(lr=0.05, nan_loss_at=(30, 31, 70)), {}, 120),
    "nan_weights_rollback": lambda: _lightning(Net(lr=0.05, nan_weight_at=(90,)), {"rollback": True}, 160),
    "runaway_rollback": lambda: _lightning(Net(lr=0.02, lr_growth=1.06), {"rollback": True}, 200),
    "vanishing": lambda: _lightning(Net(lr=0.05, depth=8, act="sigmoid"), {}, 150),
    "two_optimizers": lambda: _lightning(TwoOptimizers(), {}, 150),
    "accumulate": lambda: _lightning(Net(lr=0.1), {}, 80, trainer_kwargs={"accumulate_grad_batches": 3}),
    "resume": lambda: _lightning(Net(lr=0.4, optimizer="sgdm"), {}, 160, resume_at=70),
    "guard_loop": lambda: _plain(fabric=False),
    "fabric_loop": lambda: _plain(fabric=True),
}


def record(names: list[str]) -> dict[str, Trace]:
    out: dict[str, Trace] = {}
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)  # the model's initial weights
            try:
                out[name] = SCENARIOS[name]()
            except Exception as exc:  # a scenario that raises is a result too (RecoveryError...)
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{name}: {_summary(out[name])}", flush=True)
    return out


def _summary(trace: Trace) -> str:
    if "error" in trace:
        return trace["error"][:120]
    kinds: dict[str, int] = {}
    for kind, _step, _text in trace["events"]:
        kinds[kind] = kinds.get(kind, 0) + 1
    clipped = sum(1 for s in trace["steps"] if s[3])
    skipped = sum(1 for s in trace["steps"] if s[4])
    return f"{len(trace['steps'])} steps, {clipped} clipped, {skipped} skipped, events {kinds}"


def compare(old: dict[str, Trace], new: dict[str, Trace]) -> tuple[list[str], list[str]]:
    """``(decision differences, text differences)``."""
    decisions: list[str] = []
    texts: list[str] = []
    for name in old:
        a, b = old[name], new.get(name)
        if b is None:
            decisions.append(f"{name}: missing")
            continue
        if "error" in a or "error" in b:
            if a.get("error") != b.get("error"):
                decisions.append(f"{name}: error {a.get('error')!r} vs {b.get('error')!r}")
            continue
        for i, (x, y) in enumerate(zip(a["steps"], b["steps"], strict=False)):
            if x != y:
                decisions.append(f"{name}: step record {i} differs: {x} vs {y}")
                break
        if len(a["steps"]) != len(b["steps"]):
            decisions.append(f"{name}: {len(a['steps'])} vs {len(b['steps'])} step records")
        # incident records tell the story of a decision; they are not decisions themselves
        ea = [e for e in a["events"] if e[0] != "incident"]
        eb = [e for e in b["events"] if e[0] != "incident"]
        ka = [(k, s) for k, s, _ in ea]
        kb = [(k, s) for k, s, _ in eb]
        if ka != kb:
            decisions.append(f"{name}: events differ: {ka} vs {kb}")
        else:
            for (k, s, t1), (_, _, t2) in zip(ea, eb, strict=True):
                if t1 != t2:
                    texts.append(f"{name}: {k}@{s}: {t1!r} -> {t2!r}")
        for key in ("weights", "verdicts", "clipped", "skipped"):
            if a.get(key) != b.get(key):
                decisions.append(f"{name}: {key} {a.get(key)} vs {b.get(key)}")
    return decisions, texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the trace here")
    parser.add_argument("--compare", type=Path, help="compare against this earlier trace")
    parser.add_argument("--only", nargs="*", default=None, help="scenario names (default: all)")
    args = parser.parse_args(argv)
    names = args.only or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    trace = record(names)
    if args.out:
        args.out.write_text(json.dumps(trace, indent=1))
    if args.compare:
        old = json.loads(args.compare.read_text())
        old = {k: v for k, v in old.items() if k in names}
        decisions, texts = compare(old, trace)
        for line in texts:
            print("text:", line)
        for line in decisions:
            print("DECISION:", line)
        print(f"{len(decisions)} decision difference(s), {len(texts)} text difference(s)")
        return 1 if decisions else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
