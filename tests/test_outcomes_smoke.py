"""The outcomes benchmark in miniature: one real cell (IRNN, adding problem, lr 0.03), 20 steps, three methods.

It runs through ``benchmarks/bench_outcomes.py`` itself (Lightning ``Trainer``, the same initial weights and
batches for every method) and checks a real claim of the full table: a first-step explosion (the identity-
initialised ReLU RNN starts with a gradient norm of about 25) blows up without clipping, while
``gradient_clip_val=1.0`` and ``GradGuard()`` keep it finite from step 0.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_outcomes
    finally:
        sys.path.pop(0)
    return bench_outcomes


@pytest.fixture(scope="module")
def cache(bench: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("outcomes") / "outcomes.json"
    data = bench.run_all(["irnn"], [0], ["none", "clip1", "gradguard"], jobs=1, steps=20, path=path, lr_index=(2,))
    return path, data


def test_first_step_explosion_clip1_holds_it_and_the_default_clips_from_its_second_step(
    bench: Any, cache: tuple[Path, Any]
) -> None:
    """The ReLU IRNN at 30x its LR explodes from its first step. An absolute clip-1.0 holds it from step 0 (its
    1.0 lies far below this run's first norm); the scale-free default cannot judge step 0 and clips from step 1
    on at twice the first norm, which in this 20-step smoke form is not enough to keep the run inside the
    divergence line (over the full 300 steps it recovers: see docs/benchmarks.md)."""
    runs = cache[1]["runs"]
    none, clip1, guard = (runs[f"irnn|0.03|0|{m}"] for m in ("none", "clip1", "gradguard"))
    # same weights and batches: the same first (pre-clip) norm, far above 1
    assert none["first_norm"] == pytest.approx(clip1["first_norm"]) == pytest.approx(guard["first_norm"])
    assert none["first_norm"] > 10.0
    assert none["steps"] == clip1["steps"] == guard["steps"] == 20
    # no clipping: the norm explodes and the run ends far worse than predicting the mean
    assert none["max_norm"] > 100.0 * none["first_norm"]
    assert none["diverged"] and (none["val_loss"] is None or none["val_loss"] > 10.0 * none["baseline"])
    # clip-1.0: the norm never grows past the first one, and the run does not diverge
    assert clip1["max_norm"] <= 1.5 * clip1["first_norm"] and not clip1["diverged"] and clip1["clip_rate"] >= 0.5
    # the default: clips from step 1 on (not at step 0), finishes without an error, finite
    assert guard["clip_rate"] >= 0.2 and guard["error"] is None
    assert guard["val_loss"] is not None and math.isfinite(guard["val_loss"])
    assert none["blew_up"] and not clip1["blew_up"]
    assert isinstance(guard["update_verdicts"], list)


def test_cache_is_reused_and_the_table_has_its_structure(bench: Any, cache: tuple[Path, Any]) -> None:
    path, _ = cache
    again = bench.run_all(["irnn"], [0], ["none", "clip1", "gradguard"], jobs=1, steps=20, path=path, lr_index=(2,))
    assert len(again["runs"]) == 3  # nothing recomputed, nothing added
    text = bench.tables(again, ["irnn"], [0], ["none", "clip1", "gradguard"])
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| workload | lr |"))
    assert header.count("|") == 2 + 3 + 2  # workload, lr, three methods, verdict
    assert "no clip" in header and "`gradient_clip_val=1`" in header and "`GradGuard()`" in header
    rows = [line for line in lines if line.startswith("| ReLU IRNN")]
    assert len(rows) == 3  # one per LR of the sweep; only lr 0.03 was run
    row = next(r for r in rows if "| 0.03 |" in r)
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
    assert cells[2].endswith("(1)")  # no clipping: 1 seed of 1 diverged
    guard = again["runs"]["irnn|0.03|0|gradguard"]
    assert cells[3].endswith("(0)") and cells[4].endswith(f"({int(guard['diverged'])})")
    assert cells[5].startswith(("ok", "+", "-", "diverged"))  # the verdict column judges GradGuard()
    assert any(r for r in rows if "| 0.001 |" in r and "| - |" in r)  # not run: shown as "-"
    method_rows = [line for line in lines if line.startswith(("| no clip |", "| `gradient_clip_val=1` |"))]
    assert len(method_rows) == 2
    summary = next(line for line in lines if line.startswith("| method | diverged |"))
    assert "rollbacks sane / high" in summary and "exploding on blown-up runs" in summary


def test_extra_seeds_table_reads_the_cache(bench: Any, cache: tuple[Path, Any]) -> None:
    """The extra-seeds table (digits and IRNN over more seeds) reads the same cache: here only the IRNN at lr
    0.03, seed 0, for three of its six methods; the rest shows as "-" and the verdict says what is missing."""
    _, data = cache
    runs = data["runs"]
    text = bench.extra_table(data, bench.noise_floor(runs, ["irnn"], [0]), 1)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| workload | lr |"))
    assert header.count("|") == 2 + len(bench.EXTRA_METHODS) + 3  # workload, lr, methods, LR cuts, verdict
    rows = [line for line in lines if line.startswith("| ")][1:]  # below the header
    assert len(rows) == 3 * len(bench.EXTRA_WORKLOADS)
    row = next(r for r in rows if r.startswith("| ReLU IRNN") and "| 0.03 |" in r)
    cells = [c.strip() for c in row.strip("|").split("|")]
    guard = runs["irnn|0.03|0|gradguard"]
    assert cells[2].endswith("(1)")  # no clip diverged
    assert cells[-3] == f"{guard['val_loss']:.3f} ({int(guard['diverged'])})"  # GradGuard()
    assert cells[4] == "-"  # ZClip was not run
    assert cells[-2] == f"{int(guard['lr_reductions'] > 0)} / {guard['lr_reductions']}"
    assert all("missing" in r for r in rows if r.startswith("| 10-layer"))


def test_split_assigns_every_workload_to_one_half(bench: Any) -> None:
    halves = list(bench.SPLIT.values())
    assert len(halves) == 2
    assert sorted(w for half in halves for w in half) == sorted(bench.WORKLOADS)


def test_longer_horizon_runs_have_their_own_keys_and_steps(bench: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    w = bench.WORKLOADS["mlp"]
    assert bench._key("mlp", 0.1, 0, "none") == "mlp|0.1|0|none"  # the 1x keys of the existing cache
    assert bench._steps(w, None) is None and bench._steps(w, 25) == 25
    one_x = bench._fingerprint("none", bench._steps(w, None))
    monkeypatch.setattr(bench, "HORIZON_MULT", 3)
    assert bench._key("mlp", 0.1, 0, "none") == f"mlp|0.1|0|none|steps={3 * w.steps}"
    assert bench._steps(w, None) == 3 * w.steps
    assert bench._fingerprint("none", bench._steps(w, None)) != one_x
