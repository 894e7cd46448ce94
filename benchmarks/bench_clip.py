"""Cost of GradGuard's clip step against ``torch.nn.utils.clip_grad_norm_(foreach=True)``.

The **clip step** is what the callback does per optimizer step: ``GradStats.squared_norms()`` +
``read()`` (one host transfer) + the decision ``norm > threshold`` + ``scale_(coef)`` only when it
clips, with the coefficient ``clip_grad_norm_`` uses (``max_norm / (norm + 1e-6)``). The built-in
always multiplies the gradients (by 1.0 when it does not clip).

Both run on the same 90.1M-parameter / 265-tensor gradients, once with the threshold at half the
gradient norm (both clip) and once at twice the norm (neither clips). Before every timed call, the
gradients are restored from a saved copy outside the timed region, so repeated clipping cannot
drift the values towards denormals and every call starts from the same state.

Targets: <= 1.05x the built-in when clipping, <= 0.6x when not clipping.

Run: ``.venv/bin/python benchmarks/bench_clip.py [--quick] [--rounds N] [--device cpu]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

# Benchmark the checkout this script lives in, installed or not.
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

from _common import Report, build_model, parse_args, time_interleaved  # noqa: E402

from lightning_gradguard.measure.stats import GradStats  # noqa: E402

EPS = 1e-6  # clip_grad_norm_'s


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    device = torch.device(args.device)
    rounds = args.rounds or (3 if args.quick else 25)

    model = build_model(args.quick, device)
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    saved = [g.clone() for g in grads]
    numel = sum(p.numel() for p in params)
    stats = GradStats(model.named_parameters())
    norm = stats.read(stats.squared_norms()).global_norm
    low, high = 0.5 * norm, 2.0 * norm

    variant = f"threads{args.threads}" if args.threads else ""
    report = Report("bench_clip", args.quick, device, variant)
    report.config = {
        "parameters": numel,
        "tensors": len(params),
        "layers": stats.num_layers,
        "grad_bytes": numel * 4,
        "global_norm": norm,
        "threshold_clipping": low,
        "threshold_not_clipping": high,
        "rounds": rounds,
    }
    print(
        f"model: {numel / 1e6:.1f}M parameters in {len(params)} tensors, {stats.num_layers} layers; "
        f"global norm {norm:.4g}, thresholds {low:.4g} (clips) and {high:.4g} (does not clip)"
    )

    def restore() -> None:
        torch._foreach_copy_(grads, saved)

    def gradguard_clip_step(threshold: float) -> bool:
        s = stats.read(stats.squared_norms())
        total = s.global_norm
        clipped = total > threshold  # False for NaN: non-finite steps are skipped, not scaled
        if clipped:
            stats.scale_(threshold / (total + EPS))
        return clipped

    def builtin(threshold: float) -> object:
        return torch.nn.utils.clip_grad_norm_(params, max_norm=threshold, foreach=True)

    # Sanity: both clip to the same gradients, and neither changes them above the norm.
    restore()
    assert gradguard_clip_step(low)
    ours = [g.clone() for g in grads]
    restore()
    builtin(low)
    if not all(torch.allclose(a, b, rtol=1e-6, atol=0.0) for a, b in zip(ours, grads, strict=True)):
        raise SystemExit("check failed: GradGuard's clip step and clip_grad_norm_ disagree")
    del ours
    restore()
    assert not gradguard_clip_step(high)
    builtin(high)
    if not all(torch.equal(a, b) for a, b in zip(saved, grads, strict=True)):
        raise SystemExit("check failed: a step above the threshold changed the gradients")
    print("check: both clip to the same gradients; neither changes them when not clipping")

    print(f"-- clip step ({rounds} rounds; gradients restored before every call, untimed)")
    report.add(
        time_interleaved(
            {
                "gradguard_clipping": lambda: gradguard_clip_step(low),
                "clip_grad_norm_clipping": lambda: builtin(low),
                "gradguard_not_clipping": lambda: gradguard_clip_step(high),
                "clip_grad_norm_not_clipping": lambda: builtin(high),
            },
            rounds=rounds,
            warmup=2,
            device=device,
            setup=restore,
        )
    )
    report.ratio(
        "gradguard / clip_grad_norm_ when clipping", "gradguard_clipping", "clip_grad_norm_clipping", target=1.05
    )
    report.ratio(
        "gradguard / clip_grad_norm_ when not clipping",
        "gradguard_not_clipping",
        "clip_grad_norm_not_clipping",
        target=0.6,
    )
    report.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
