"""Cost of the per-layer update-to-weight ratio at a log step, against the optimizer step it measures.

On the synthetic transformer-like model of ``bench_stats.py`` (90.1M parameters in 265 tensors, 133
layers; weights N(0, 0.02), gradients N(0, 1e-3)), this times

* ``adamw_step``: ``torch.optim.AdamW(foreach=True).step()`` alone;
* ``adamw_step_with_updates``: :meth:`UpdateTracker.snapshot` (a fused copy of the touched weights),
  the same ``step()``, then :meth:`UpdateTracker.squared_norms` + :meth:`UpdateTracker.read` (two
  fused norm passes, one host transfer) and the logged metrics;
* ``adamw_step_with_updates_kept_buffers``: the same with ``UpdateTracker(keep_buffers=True)`` (the copy
  buffers stay allocated between log steps: no fresh memory at the log step, one resident weight copy);
* ``stats_step``: the gradient statistics GradGuard computes at every step, for scale.

Both optimizer cases step the same model, interleaved round by round. The ratio
``adamw_step_with_updates / adamw_step`` is the cost of a log step's optimizer step with the ratios
on; amortised over ``log_every_n_steps=50`` (Lightning's default) the overhead per step is
``(ratio - 1) / 50`` of an optimizer step. Target: at most 2x at the log step.

Run: ``.venv/bin/python benchmarks/bench_updates.py [--quick] [--rounds N] [--device cpu]``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

from _common import Report, build_model, parse_args, time_interleaved  # noqa: E402

from lightning_gradguard.measure.stats import GradStats  # noqa: E402
from lightning_gradguard.measure.updates import UpdateTracker, update_metrics  # noqa: E402

LOG_EVERY_N_STEPS = 50


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    device = torch.device(args.device)
    rounds = args.rounds or (3 if args.quick else 15)

    model = build_model(args.quick, device)
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    stats = GradStats(model.named_parameters())
    tracker = UpdateTracker(stats)
    kept = UpdateTracker(stats, keep_buffers=True)
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    variant = f"threads{args.threads}" if args.threads else ""
    report = Report("bench_updates", args.quick, device, variant)
    report.config = {
        "parameters": numel,
        "tensors": len(params),
        "layers": stats.num_layers,
        "dtype": "float32",
        "optimizer": "AdamW(foreach=True)",
        "rounds": rounds,
        "log_every_n_steps": LOG_EVERY_N_STEPS,
    }
    print(f"model: {numel / 1e6:.1f}M parameters in {len(params)} tensors, {stats.num_layers} layers")

    def adamw_step() -> None:
        opt.step()

    def adamw_step_with_updates() -> dict[str, float]:
        tracker.snapshot()
        opt.step()
        return update_metrics(tracker.read(tracker.squared_norms()))

    def adamw_step_with_updates_kept_buffers() -> dict[str, float]:
        kept.snapshot()
        opt.step()
        return update_metrics(kept.read(kept.squared_norms()))

    def stats_step() -> object:
        return stats.read(stats.squared_norms()).global_norm

    # Sanity: the tracked update of one step equals the directly computed one.
    before = [p.detach().clone() for p in params]
    tracker.snapshot()
    opt.step()
    tracked = tracker.read(tracker.squared_norms())
    direct = math.sqrt(
        sum(float((p.detach() - b).double().square().sum()) for p, b in zip(params, before, strict=True))
    )
    del before
    total = math.sqrt(math.fsum(u * u for u in tracked.update_norms))
    if not math.isclose(total, direct, rel_tol=1e-3):
        raise SystemExit(f"check failed: tracked update norm {total} != direct {direct}")
    print(f"check: total update norm {direct:.6g} agrees with the direct computation")

    print(f"-- optimizer step ({rounds} rounds)")
    report.add(
        time_interleaved(
            {
                "adamw_step": adamw_step,
                "adamw_step_with_updates": adamw_step_with_updates,
                "adamw_step_with_updates_kept_buffers": adamw_step_with_updates_kept_buffers,
                "stats_step": stats_step,
            },
            rounds=rounds,
            warmup=2,
            device=device,
        )
    )
    ratio = report.ratio("adamw_step_with_updates / adamw_step", "adamw_step_with_updates", "adamw_step", target=2.0)
    report.ratio(
        "adamw_step_with_updates(keep_buffers) / adamw_step", "adamw_step_with_updates_kept_buffers", "adamw_step"
    )
    report.ratio("stats_step / adamw_step", "stats_step", "adamw_step")
    extra = report.median("adamw_step_with_updates") - report.median("adamw_step")
    amortised = (ratio - 1.0) / LOG_EVERY_N_STEPS
    report.notes["amortised"] = {
        "log_every_n_steps": LOG_EVERY_N_STEPS,
        "extra_ms_at_log_step": extra * 1e3,
        "fraction_of_optimizer_step_per_step": amortised,
    }
    print(
        f"ratio update tracking amortised at log_every_n_steps={LOG_EVERY_N_STEPS} / adamw_step: "
        f"{amortised:.4f}x   ({extra * 1e3:.2f} ms extra at a log step)"
    )
    report.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
