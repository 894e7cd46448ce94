"""Cost of recovery's snapshot (``Snapshot.capture``) as a fraction of a training step, by model size and interval.

For each model size (MLPs of about 1M, 10M and 50M parameters, AdamW, batch 128, float32), every
round times one full training step (forward, backward, ``AdamW.step``), one ``Snapshot.capture``
(weights + both Adam moments + step counters into the reused host buffers), one
``Snapshot.restore`` and one ``RollbackTrigger.update`` (the per-step decision, run on every step),
interleaved. The amortised cost of snapshotting every ``N`` steps is
``median(capture) / (N * median(step))``; the trigger's per-step cost is
``median(update) / median(step)``.

Host memory: the snapshot's own ``nbytes`` and the process's resident-set growth (``VmRSS`` from
``/proc/self/status``) over the first capture (allocates the buffers) and over the following ones
(must be ~0: the buffers are reused). ``tracemalloc`` does not see torch's allocations.

The default interval printed at the end is the smallest of 1, 10, 50, 100 whose amortised cost is
<= 1% at every size. On a GPU the copy is device-to-host into pinned buffers (PCIe / NVLink-C2C
bandwidth), against a much shorter step: rerun with ``--device cuda`` there.

Run: ``.venv/bin/python benchmarks/bench_snapshot.py [--quick] [--rounds N] [--device cpu]``.
"""

from __future__ import annotations

import copy
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

from _common import Report, parse_args, time_interleaved  # noqa: E402

from lightning_gradguard.recovery.rollback import Recovery  # noqa: E402
from lightning_gradguard.recovery.snapshot import Snapshot, _BufferGuard  # noqa: E402
from lightning_gradguard.recovery.trigger import RollbackTrigger  # noqa: E402

# name -> (width, depth): depth square Linear layers, about depth * width^2 parameters.
SIZES = {"1M": (512, 4), "10M": (1024, 10), "50M": (2048, 12)}
QUICK_SIZES = {"tiny": (32, 2)}
INTERVALS = (1, 10, 50, 100)
BATCH = 128
BUDGET = 0.01  # amortised cost target: <= 1% of step time


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def _mlp(width: int, depth: int, device: torch.device) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers[:-1]).to(device)


def _bench_size(report: Report, name: str, width: int, depth: int, device: torch.device, rounds: int) -> float:
    """Time step / capture / restore / trigger for one model size; returns median(capture) / median(step)."""
    torch.manual_seed(0)
    model = _mlp(width, depth, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(BATCH, width, device=device)
    y = torch.randn(BATCH, width, device=device)
    losses: list[float] = []

    def step() -> None:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))  # the one host read a real loop does anyway

    step()  # creates the optimizer state
    snap = Snapshot(model, opt)
    rss0 = _rss_bytes()
    snap.capture(step=0)
    snap.synchronize()
    rss1 = _rss_bytes()
    trigger = RollbackTrigger()
    for i in range(200):  # a full loss window, as in a long run
        trigger.update(i, loss=1.0 + 0.01 * (i % 7))
    counter = [200]

    def capture() -> None:
        snap.capture(step=1)
        snap.synchronize()

    def restore() -> None:
        snap.restore(clear_grads=False)

    def update() -> None:
        counter[0] += 1
        trigger.update(counter[0], loss=1.0 + 0.01 * (counter[0] % 7))

    samples = time_interleaved(
        {f"{name}/step": step, f"{name}/capture": capture, f"{name}/restore": restore, f"{name}/trigger": update},
        rounds=rounds,
        warmup=1,
        device=device,
    )
    rss2 = _rss_bytes()
    snap.capture(step=2)
    saved = [t.detach().clone() for t in model.parameters()]
    step()
    snap.restore()
    exact = all(torch.equal(a, b) for a, b in zip(model.parameters(), saved, strict=True))
    print(f"check: {name} restore gives back the captured weights bit for bit: {'ok' if exact else 'FAILED'}")
    if not exact:
        raise RuntimeError(f"{name}: Snapshot.restore did not give back the captured weights")
    report.add(samples)
    n_params = sum(p.numel() for p in model.parameters())
    t_step = statistics.median(samples[f"{name}/step"])
    t_cap = statistics.median(samples[f"{name}/capture"])
    per_capture = report.ratio(f"{name} capture / step", f"{name}/capture", f"{name}/step")
    report.ratio(f"{name} restore / step", f"{name}/restore", f"{name}/step")
    report.ratio(f"{name} trigger.update / step", f"{name}/trigger", f"{name}/step")
    gbps = snap.nbytes / t_cap / 1e9
    print(
        f"memory {name}: {n_params / 1e6:.2f}M params, snapshot {snap.nbytes / 2**20:.1f} MiB, "
        f"RSS +{(rss1 - rss0) / 2**20:.1f} MiB at first capture, {(rss2 - rss1) / 2**20:+.1f} MiB over "
        f"{2 * rounds + 2} more captures and restores; copy {gbps:.2f} GB/s; step {t_step * 1e3:.1f} ms"
    )
    report.config["sizes"][name] = {
        "width": width,
        "depth": depth,
        "parameters": n_params,
        "snapshot_bytes": snap.nbytes,
        "rss_first_capture_bytes": rss1 - rss0,
        "rss_later_bytes": rss2 - rss1,
        "capture_gb_per_s": gbps,
    }
    return per_capture


def _cnn(channels: int, blocks: int, device: torch.device) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1)]
    for _ in range(blocks):
        layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return nn.Sequential(*layers).to(device)


def _bench_whole_state(report: Report, device: torch.device, rounds: int, quick: bool) -> None:
    """What whole-state protection adds: the buffer copy and check per step, the second slot, other modules.

    A CNN with BatchNorm (SGD + momentum, 32x32 images): *buffers* is the per-step work recovery adds for
    the persistent buffers (one device-side copy and the finiteness check that rides in the statistics
    vector), against the training step. Memory: the two slots of :class:`Recovery` against one
    :class:`Snapshot`, and a snapshot that also holds a weight-averaging copy of the model.
    """
    channels, blocks, batch = (8, 2, 8) if quick else (64, 8, 64)
    torch.manual_seed(0)
    model = _cnn(channels, blocks, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())

    step()
    guard = _BufferGuard(model)

    def buffers() -> None:
        guard.save()
        check = guard.check()
        assert check is not None
        float(check)

    samples = time_interleaved({"cnn/step": step, "cnn/buffers": buffers}, rounds=rounds, warmup=1, device=device)
    report.add(samples)
    report.ratio("cnn buffers (copy + check) / step", "cnn/buffers", "cnn/step")
    one = Snapshot(model, opt)
    one.capture(step=0)
    recovery = Recovery(RollbackTrigger())
    recovery.attach(model, opt)
    for s in recovery.snapshots:
        s.capture(step=0)
    averaged = copy.deepcopy(model)
    with_avg = Snapshot(model, opt, modules=[averaged])
    with_avg.capture(step=0)
    n_params = sum(p.numel() for p in model.parameters())
    mib = 2**20
    print(
        f"memory cnn: {n_params / 1e6:.2f}M params, buffers copy {guard.nbytes / mib:.3f} MiB (device), one slot "
        f"{one.nbytes / mib:.1f} MiB, two slots {sum(s.nbytes for s in recovery.snapshots) / mib:.1f} MiB, one slot "
        f"with a weight-averaging copy {with_avg.nbytes / mib:.1f} MiB"
    )
    report.config["whole_state"] = {
        "channels": channels,
        "blocks": blocks,
        "batch": batch,
        "parameters": n_params,
        "buffer_copy_bytes": guard.nbytes,
        "one_slot_bytes": one.nbytes,
        "two_slots_bytes": sum(s.nbytes for s in recovery.snapshots),
        "one_slot_with_average_bytes": with_avg.nbytes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    device = torch.device(args.device)
    rounds = args.rounds or (2 if args.quick else 9)
    sizes = QUICK_SIZES if args.quick else SIZES
    variant = f"threads{args.threads}" if args.threads else ""
    report = Report("bench_snapshot", args.quick, device, variant)
    report.config = {"batch": BATCH, "optimizer": "AdamW", "dtype": "float32", "sizes": {}, "intervals": INTERVALS}
    worst: dict[int, float] = dict.fromkeys(INTERVALS, 0.0)

    for name, (width, depth) in sizes.items():
        per_capture = _bench_size(report, name, width, depth, device, rounds)
        for n in INTERVALS:
            amortised = per_capture / n
            worst[n] = max(worst[n], amortised)
            print(f"amortised {name} every {n:>3d} steps: {100 * amortised:7.3f}% of step time")

    _bench_whole_state(report, device, rounds, args.quick)
    # Recovery captures at the first healthy step, at every power of two below the interval and at its
    # multiples: the early captures add log2(interval) captures once per run.
    for n in INTERVALS:
        early = sum(1 for k in range(1, n) if k & (k - 1) == 0)
        print(f"early captures with snapshot_every_n_steps={n}: {early} (once per run)")
    default = next((n for n in INTERVALS if worst[n] <= BUDGET), None)
    report.notes["worst_amortised_by_interval"] = {str(n): worst[n] for n in INTERVALS}
    report.notes["default_interval"] = default
    print(
        "worst amortised cost by interval: "
        + ", ".join(f"every {n}: {100 * worst[n]:.3f}%" for n in INTERVALS)
        + f" -> smallest interval within {100 * BUDGET:g}%: {default}"
    )
    report.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
