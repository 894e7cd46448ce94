"""The micro-benchmarks run end to end in their ``--quick`` configuration (no timing assertions)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

EXPECTED_RATIOS = {
    "bench_stats.py": [
        "stats_step / one_pass_read",
        "stats_step / clip_grad_norm_(inf)",
        "stats_step / lightning_grad_norm",
        "add_histogram_per_tensor / histogram_step (speed-up)",
        "add_histogram_per_tensor / histogram_step_and_write (speed-up)",
    ],
    "bench_snapshot.py": [
        "tiny capture / step",
        "tiny restore / step",
        "tiny trigger.update / step",
        "cnn buffers (copy + check) / step",
    ],
    "bench_updates.py": [
        "adamw_step_with_updates / adamw_step",
        "adamw_step_with_updates(keep_buffers) / adamw_step",
        "stats_step / adamw_step",
    ],
    "bench_clip.py": [
        "gradguard / clip_grad_norm_ when clipping",
        "gradguard / clip_grad_norm_ when not clipping",
    ],
}


@pytest.mark.parametrize("script", sorted(EXPECTED_RATIOS))
def test_benchmark_quick_run(script: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = _run_script(script, "--quick", "--rounds", "2", "--out", str(out))
    lines = proc.stdout.splitlines()
    assert any(line.startswith("check: ") for line in lines), proc.stdout
    assert any(line.startswith("versions: ") and "torch" in line for line in lines), proc.stdout
    for label in EXPECTED_RATIOS[script]:
        matching = [line for line in lines if line.startswith(f"ratio {label}: ")]
        assert len(matching) == 1, f"no ratio line for {label!r} in:\n{proc.stdout}"
        value = float(matching[0].split(": ", 1)[1].split("x", 1)[0])
        assert value > 0

    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["quick"] is True
    assert set(result["ratios"]) == set(EXPECTED_RATIOS[script])
    for label, entry in result["ratios"].items():
        num, den = result["median_ms"][entry["numerator"]], result["median_ms"][entry["denominator"]]
        assert entry["ratio"] == pytest.approx(num / den), label
        assert len(result["samples_ms"][entry["numerator"]]) == 2


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` with ``args``; it must exit 0 (its output is shown when it does not)."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _import_benchmark(name: str) -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_zoo_quick_run_writes_its_table_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "zoo.json"
    proc = _run_script("bench_zoo.py", "--quick", "--out", str(out))
    zoo = _import_benchmark("bench_zoo")
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| config |"))
    assert "no callback" in header and "`GradGuard()`" in header and "noise floor" in header and "| pass |" in header
    for name in zoo.QUICK:
        row = next(line for line in lines if line.startswith(f"| {zoo.CONFIGS[name].title} | 30 |"))
        assert row.rstrip(" |").endswith(("yes", ")")), row  # a verdict: yes, or **no** (why)
    runs = json.loads(out.read_text(encoding="utf-8"))["runs"]
    assert sorted(runs) == sorted(f"{n}|0|{m}" for n in zoo.QUICK for m in zoo.METHODS)
    for key, run in runs.items():
        assert run["steps"] == 30 and run["val_loss"] is not None, key
        assert isinstance(run["cuts"], list) and isinstance(run["verdicts"], list) and 0.0 <= run["clip_share"] <= 1
        if key.endswith("|none"):
            assert run["clip_share"] == 0.0 and run["cuts"] == [] and run["lr_scale"] == 1.0
    # a rerun reuses every cached run
    again = zoo.run_all(list(zoo.QUICK), [0], jobs=1, steps=30, path=out)
    assert again["runs"] == runs
    # a package change invalidates the GradGuard runs only
    name = zoo.QUICK[0]
    before = {m: zoo._fingerprint(name, m, 30) for m in zoo.METHODS}
    monkeypatch.setattr(zoo, "_package_hash", lambda: "changed")
    after = {m: zoo._fingerprint(name, m, 30) for m in zoo.METHODS}
    assert before["none"] == after["none"] and before["gradguard"] != after["gradguard"]


def test_scale_quick_run_prints_one_row_per_workload() -> None:
    proc = _run_script("bench_scale.py", "--quick")
    scale = _import_benchmark("bench_scale")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "| 100 |" in line]
    assert len(rows) == len(scale.QUICK)
    assert any(line.endswith("rows scale-free.") for line in proc.stdout.splitlines())


@pytest.mark.parametrize("mode", ["trainer", "loop"])
def test_memory_benchmark_quick_run(mode: str, tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    proc = _run_script("bench_memory.py", "--quick", "--mode", mode, "--out", str(out))
    lines = proc.stdout.splitlines()
    assert any(line.startswith("check: ok") for line in lines), proc.stdout
    assert any(line.startswith(f"mode: {mode} ") for line in lines), proc.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["mode"] == mode and result["quick"] is True and result["steps"] == 600
    assert result["heatmaps_after_warmup"] > 0
    steps = [step for step, _ in result["rss_mib"]]
    assert result["warmup"] in steps and steps[-1] == 600 and len(steps) >= 5
