"""Attribution accuracy of GradGuard's incident records on injected incidents of known cause and place.

    python benchmarks/bench_forensics.py [--seeds 2] [--steps 120]

Each run trains one of three small models (an MLP, a CNN, an LSTM) with the plain-PyTorch ``Guard``
(``replay=True``, ``batch_ids`` = the dataset indices of the batch) and injects one incident at a known step:

* ``poisoned_sample`` (cause: data): one sample of the data set holds NaN features; the batch that carries it
  makes the gradients non-finite. Expected: the batch index, the sample id and the input layer (where the
  forward pass first goes non-finite), verdict *reproducible*.
* ``grad_corruption`` (cause: transient): a gradient hook multiplies one layer's gradient by 1e6 in one
  backward pass only. Expected: that layer leads, verdict *transient*.
* ``layer_lr`` (cause: one layer's LR): the output layer's param group gets a 1000x LR for one step; its
  weights jump and the next step's gradients spike. Expected: the layer or its neighbour leads (the layer
  before it receives the jumped weights' backward signal), verdict *reproducible* (the state is the cause).
* ``bad_init`` (cause: one layer's initialisation): the output layer's weights are multiplied by 1e3 in place.
  Expected: the layer or its neighbour leads, verdict *reproducible*.
* ``fp16_overflow`` (cause: numerics): the input layer runs in float16 and one sample's features are 1e5x too
  large, which overflows float16 (fine in float32). Expected: the batch, the layer leads, *reproducible*.

For every injected incident the first incident GradGuard recorded at or after the injection step is scored:
the leading layer (the expected layer, or for ``layer_lr``/``bad_init`` its direct neighbour), the batch
(index within the epoch), the sample id where there is one, and the replay verdict. The cost is the median
wall time of a replay and the median step time with and without incident recording on incident-free steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))

from lightning_gradguard import Guard  # noqa: E402

torch.set_num_threads(1)

KINDS = ("poisoned_sample", "grad_corruption", "layer_lr", "bad_init", "fp16_overflow")
ARCHS = ("mlp", "cnn", "lstm")
N, BATCH = 512, 16


class Indexed(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """``(x, y, index)``: the index is the sample id ``batch_ids`` reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


class Half(nn.Module):
    """A linear layer computed in float16 (the overflow's place)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.half(), self.lin.weight.half(), self.lin.bias.half()).float()


def make(arch: str, seed: int) -> tuple[nn.Module, Indexed]:
    """The model and its data."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if arch == "mlp":
        x = torch.randn(N, 16, generator=g)
        y = (x[:, :4].sum(1) > 0).long()
        model: nn.Module = nn.Sequential(Half(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
    elif arch == "cnn":
        x = torch.randn(N, 1, 8, 8, generator=g)
        y = (x.mean((1, 2, 3)) > 0).long()
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            Half(8 * 64, 32),
            nn.ReLU(),
            nn.Linear(32, 2),
        )
    else:
        x = torch.randn(N, 6, 4, generator=g)
        y = (x[:, :, 0].sum(1) > 0).long()

        class Seq(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inp = Half(4, 8)
                self.lstm = nn.LSTM(8, 16, batch_first=True)
                self.head = nn.Linear(16, 2)

            def forward(self, t: torch.Tensor) -> torch.Tensor:
                out, _ = self.lstm(self.inp(t))
                return self.head(out[:, -1])

        model = Seq()
    return model, Indexed(x, y)


def layer_of(model: nn.Module, kind: str) -> tuple[str, nn.Module]:
    """The layer an injection targets: the float16 layer for the overflow, else the first weight layer."""
    names = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LSTM))]
    if kind == "fp16_overflow":
        name, half = next((n, m) for n, m in model.named_modules() if isinstance(m, Half))
        return f"{name}.lin", half.lin
    return names[-1] if kind in ("layer_lr", "bad_init") else names[0]


def neighbours(model: nn.Module, name: str) -> set[str]:
    """``name`` and the weight layers right before and after it."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LSTM))]
    i = names.index(name) if name in names else -1
    return {name} | ({names[i - 1]} if i > 0 else set()) | ({names[i + 1]} if 0 <= i < len(names) - 1 else set())


@dataclass
class Scored:
    arch: str
    kind: str
    seed: int
    found: bool
    leader_ok: bool
    batch_ok: bool
    sample_ok: bool | None
    verdict_ok: bool
    leader: str | None
    verdict: str | None
    replay_s: float | None


def run(arch: str, kind: str, seed: int, steps: int, inject_at: int, log_dir: Path) -> Scored:
    model, data = make(arch, seed)
    target_name, target = layer_of(model, kind)
    poisoned = None
    if kind == "poisoned_sample":
        poisoned = (inject_at * BATCH + 5) % N  # lands in the batch of step inject_at (shuffle off)
        data.x[poisoned].fill_(float("nan"))
    if kind == "fp16_overflow":
        overflow = (inject_at * BATCH + 3) % N
        data.x[overflow].mul_(1e5)  # fine in float32, overflows float16 in the Half layer
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith(target_name + ".")]}]
    groups.append({"params": list(target.parameters())})
    opt = torch.optim.SGD(groups, lr=0.05)
    guard = Guard(model, opt, replay=True, batch_ids=lambda b: b[2].tolist())
    loader = DataLoader(data, batch_size=BATCH, shuffle=False)
    corrupt = {"left": 0}
    if kind == "grad_corruption":

        def flip(grad: torch.Tensor) -> torch.Tensor:
            if corrupt["left"]:
                corrupt["left"] -= 1
                return grad * 1e6
            return grad

        next(iter(target.parameters())).register_hook(flip)
    step, epoch = 0, 0
    expected_batch = inject_at % len(loader)
    while step < steps:
        for batch_idx, batch in enumerate(loader):
            x, y, _ = batch
            if step == inject_at and kind == "grad_corruption":
                corrupt["left"] = 1
            if step == inject_at and kind == "bad_init":
                with torch.no_grad():
                    next(iter(target.parameters())).mul_(1e3)
            if kind == "layer_lr":
                opt.param_groups[1]["lr"] = 50.0 if step == inject_at - 1 else 0.05

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.zero_grad()
            loss = closure()
            guard.before_optimizer_step(loss, closure=closure, batch=batch, batch_idx=batch_idx, epoch=epoch)
            opt.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    guard.close()
    hits = [i for i in guard.incidents if i.step >= inject_at - (1 if kind == "layer_lr" else 0)]
    if not hits:
        return Scored(arch, kind, seed, False, False, False, None, False, None, None, None)
    first = hits[0]
    expected_leaders = neighbours(model, target_name) if kind in ("layer_lr", "bad_init") else {target_name}
    leader = first.leader
    want_verdict = "transient" if kind == "grad_corruption" else "reproducible"
    batch_expected = expected_batch if kind != "layer_lr" else None
    sample_ok = None
    if poisoned is not None:
        sample_ok = first.sample_ids is not None and poisoned in first.sample_ids
    return Scored(
        arch,
        kind,
        seed,
        True,
        leader in expected_leaders,
        batch_expected is None or first.batch_idx == batch_expected,
        sample_ok,
        first.replay == want_verdict,
        leader,
        first.replay,
        first.replay_evidence.get("replay_seconds"),
    )


def step_cost(arch: str, incidents: bool, steps: int = 300) -> float:
    """Median wall time of ``before_optimizer_step`` on incident-free steps, with or without incident records."""
    model, data = make(arch, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = Guard(model, opt, incidents=incidents)
    loader = DataLoader(data, batch_size=BATCH, shuffle=False)
    times: list[float] = []
    while len(times) < steps:
        for x, y, _ in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            t0 = time.perf_counter()
            guard.before_optimizer_step(loss)
            times.append(time.perf_counter() - t0)
            opt.step()
            if len(times) >= steps:
                break
    guard.close()
    return statistics.median(times[50:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--inject-at", type=int, default=70)
    args = parser.parse_args(argv)
    results: list[Scored] = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch in ARCHS:
            for kind in KINDS:
                for seed in range(args.seeds):
                    out = Path(tmp) / f"{arch}-{kind}-{seed}"
                    r = run(arch, kind, seed, args.steps, args.inject_at, out)
                    results.append(r)
                    print(
                        f"{arch:5s} {kind:16s} seed {seed}: found={r.found} leader={r.leader} ({r.leader_ok}) "
                        f"batch={r.batch_ok} sample={r.sample_ok} verdict={r.verdict} ({r.verdict_ok})",
                        flush=True,
                    )
    print()
    print("| incident | runs | found | leading layer | batch | sample id | verdict |")
    print("|---|---|---|---|---|---|---|")
    for kind in (*KINDS, "all"):
        rows = [r for r in results if kind in ("all", r.kind)]
        samples = [r for r in rows if r.sample_ok is not None]

        def pct(xs: list[bool]) -> str:
            return f"{sum(xs)}/{len(xs)}" if xs else "-"

        print(
            f"| {kind} | {len(rows)} | {pct([r.found for r in rows])} | {pct([r.leader_ok for r in rows])} | "
            f"{pct([r.batch_ok for r in rows])} | {pct([bool(r.sample_ok) for r in samples])} | "
            f"{pct([r.verdict_ok for r in rows])} |"
        )
    replays = [r.replay_s for r in results if r.replay_s is not None]
    if replays:
        print(f"\nreplay: median {statistics.median(replays) * 1e3:.2f} ms per incident ({len(replays)} replays)")
    for arch in ARCHS:
        on = step_cost(arch, True)
        off = step_cost(arch, False)
        print(
            f"{arch}: incident-free step {on * 1e6:.0f} us with records, {off * 1e6:.0f} us without ({on / off:.3f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
