"""Cost of GradGuard's per-step statistics and of its histograms, against the usual alternatives.

On a synthetic transformer-like model (90.1M parameters in 265 tensors, 133 layers) whose gradients
hold random values, this times

* the **stats step**: ``GradStats.squared_norms()`` + ``read()`` (the single host transfer), plus
  the host-side global norm and per-layer norms the callback logs; against
  (a) one read pass over the same number of bytes: ``torch.linalg.vector_norm`` of one flat buffer,
  (b) ``torch.nn.utils.clip_grad_norm_(params, max_norm=inf, foreach=True)``,
  (c) Lightning's ``lightning.pytorch.utilities.grad_norm(module, norm_type=2)``;
* the **histogram step**: ``histogram_ranges()`` + ``histogram_counts(bins=64)`` +
  ``read_histograms()`` (and the same followed by ``add_histogram_raw`` per layer); against
  ``SummaryWriter.add_histogram`` on every gradient tensor.

Targets: stats step <= 1.3x the one-pass read; histogram step >= 4x faster than ``add_histogram``.

Run: ``.venv/bin/python benchmarks/bench_stats.py [--quick] [--rounds N] [--device cpu]``.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import grad_norm
from torch.utils.tensorboard import SummaryWriter

# Benchmark the checkout this script lives in, installed or not.
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

from _common import Report, build_model, parse_args, time_interleaved  # noqa: E402

from lightning_gradguard.measure.stats import GradStats  # noqa: E402
from lightning_gradguard.outputs.tensorboard import write_histograms  # noqa: E402

HISTOGRAM_BINS = 64
HISTOGRAM_EVERY_N_STEPS = 100


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    device = torch.device(args.device)
    stats_rounds = args.rounds or (3 if args.quick else 31)
    hist_rounds = args.rounds or (2 if args.quick else 5)

    model = build_model(args.quick, device)
    params = list(model.parameters())
    named = list(model.named_parameters())
    numel = sum(p.numel() for p in params)
    stats = GradStats(named)
    flat = torch.empty(numel, device=device).normal_(0.0, 1e-3)

    variant = f"threads{args.threads}" if args.threads else ""
    report = Report("bench_stats", args.quick, device, variant)
    report.config = {
        "parameters": numel,
        "tensors": len(params),
        "layers": stats.num_layers,
        "grad_bytes": numel * 4,
        "dtype": "float32",
        "stats_rounds": stats_rounds,
        "hist_rounds": hist_rounds,
        "histogram_bins": HISTOGRAM_BINS,
    }
    print(
        f"model: {numel / 1e6:.1f}M parameters in {len(params)} tensors, {stats.num_layers} layers "
        f"({numel * 4 / 2**20:.0f} MiB of float32 gradients)"
    )

    def stats_step() -> object:
        s = stats.read(stats.squared_norms())
        return s.global_norm, s.layer_norms()

    def one_pass_read() -> float:
        return float(torch.linalg.vector_norm(flat).item())

    def clip_grad_norm_inf() -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm=math.inf, foreach=True)

    def lightning_grad_norm() -> dict[str, float]:
        return grad_norm(model, norm_type=2)

    # Sanity: every method sees the same global norm (clip_grad_norm_ with inf rescales by exactly 1).
    ours = stats.read(stats.squared_norms()).global_norm
    builtin = float(clip_grad_norm_inf())
    lightning = float(lightning_grad_norm()["grad_2.0_norm_total"])
    for label, value in (("clip_grad_norm_", builtin), ("grad_norm", lightning)):
        if not math.isclose(ours, value, rel_tol=1e-4):
            raise SystemExit(f"check failed: GradStats global norm {ours} != {label} {value}")
    print(f"check: global norm {ours:.6g} agrees with clip_grad_norm_ and grad_norm")

    print(f"-- stats step ({stats_rounds} rounds)")
    report.add(
        time_interleaved(
            {
                "stats_step": stats_step,
                "one_pass_read": one_pass_read,
                "clip_grad_norm_inf": clip_grad_norm_inf,
                "lightning_grad_norm": lightning_grad_norm,
            },
            rounds=stats_rounds,
            warmup=2,
            device=device,
        )
    )
    report.ratio("stats_step / one_pass_read", "stats_step", "one_pass_read", target=1.3)
    report.ratio("stats_step / clip_grad_norm_(inf)", "stats_step", "clip_grad_norm_inf")
    report.ratio("stats_step / lightning_grad_norm", "stats_step", "lightning_grad_norm")

    with tempfile.TemporaryDirectory(prefix="gradguard-bench-") as logdir:
        ours_writer = SummaryWriter(str(Path(logdir) / "gradguard"))
        tb_writer = SummaryWriter(str(Path(logdir) / "add_histogram"))
        step = [0, 0]

        def histogram_step() -> object:
            ranges = stats.histogram_ranges()
            counts = stats.histogram_counts(ranges, bins=HISTOGRAM_BINS)
            return stats.read_histograms(ranges, counts)

        def histogram_step_and_write() -> None:
            step[0] += 1
            hists = histogram_step()
            assert isinstance(hists, dict)
            write_histograms(ours_writer, 0, step[0], hists)  # what GradGuard writes, as GradGuard writes it

        def add_histogram_per_tensor() -> None:
            step[1] += 1
            for name, p in named:
                tb_writer.add_histogram(f"hist/{name}", p.grad, global_step=step[1])

        # Sanity: per layer, the device histogram holds every gradient value once.
        hists = histogram_step()
        assert isinstance(hists, dict)
        if sum(h.num for h in hists.values()) != numel:
            raise SystemExit("check failed: histogram counts do not add up to the number of gradient values")

        print(f"-- histogram step, {HISTOGRAM_BINS} bins ({hist_rounds} rounds)")
        report.add(
            time_interleaved(
                {
                    "histogram_step": histogram_step,
                    "histogram_step_and_write": histogram_step_and_write,
                    "add_histogram_per_tensor": add_histogram_per_tensor,
                },
                rounds=hist_rounds,
                warmup=1,
                device=device,
            )
        )
        ours_writer.close()
        tb_writer.close()
    report.ratio(
        "add_histogram_per_tensor / histogram_step (speed-up)",
        "add_histogram_per_tensor",
        "histogram_step",
        target=4.0,
        op=">=",
    )
    report.ratio(
        "add_histogram_per_tensor / histogram_step_and_write (speed-up)",
        "add_histogram_per_tensor",
        "histogram_step_and_write",
    )
    amortised = report.median("histogram_step") / HISTOGRAM_EVERY_N_STEPS
    share = amortised / report.median("stats_step")
    report.notes["histogram_amortised"] = {
        "every_n_steps": HISTOGRAM_EVERY_N_STEPS,
        "ms_per_step": amortised * 1e3,
        "fraction_of_stats_step": share,
    }
    print(
        f"ratio histogram step amortised at histogram_every_n_steps={HISTOGRAM_EVERY_N_STEPS} / stats_step: "
        f"{share:.3f}x   ({amortised * 1e3:.2f} ms per step)"
    )
    report.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
