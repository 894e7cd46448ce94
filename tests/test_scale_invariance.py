"""GradGuard's decisions do not depend on the units of the loss.

Under Adam, loss x k at the same LR, and under SGD, loss x k with the LR divided by k, are the identical run
without clipping. With ``Guard(model, optimizer)`` at its defaults the two runs must clip and skip the same steps,
cut the LR and roll back at the same steps, use thresholds k times the k = 1 thresholds, and end at the same loss
within the gap float rounding alone makes between the two unguarded runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
STEPS = 200

sys.path.insert(0, str(BENCHMARKS))
try:
    import bench_scale
finally:
    sys.path.pop(0)

#: (workload, k) pairs whose decisions depend on k with the current defaults, and why.
KNOWN_SCALE_DEPENDENT: dict[tuple[str, float], str] = {}

_runs: dict[tuple[str, float, bool, str], Any] = {}


def _run(name: str, k: float, guard: bool = True, options: dict[str, Any] | None = None) -> Any:
    key = (name, k, guard, repr(options))
    if key not in _runs:
        _runs[key] = bench_scale.run(bench_scale.WORKLOADS[name], k, guard=guard, steps=STEPS, options=options)
    return _runs[key]


def _mismatches(name: str, k: float, options: dict[str, Any] | None = None) -> list[str]:
    base, other = _run(name, 1.0, options=options), _run(name, k, options=options)
    found = bench_scale.differences(base, other)
    plain, plain_k = _run(name, 1.0, guard=False), _run(name, k, guard=False)
    floor = max(0.01 * abs(plain.final_loss), 3.0 * abs(plain.final_loss - plain_k.final_loss))
    if bench_scale.separation(base, other) < min(len(base.losses), len(other.losses)):
        # float rounding parted the two guarded runs before the end (a chaotic, too-high LR): their decisions
        # were compared up to that step; the final losses only need to agree to 10 %
        floor = max(floor, 0.1 * abs(base.final_loss))
    if not abs(other.final_loss - base.final_loss) <= floor:
        found.append(f"final loss {base.final_loss:.4g} vs {other.final_loss:.4g} (floor {floor:.2g})")
    return found


def _cases() -> list[Any]:
    cases = []
    for name in bench_scale.WORKLOADS:
        for k in bench_scale.KS:
            reason = KNOWN_SCALE_DEPENDENT.get((name, k))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(name, k, id=f"{name}-k{k:g}", marks=marks))
    return cases


@pytest.mark.parametrize(("name", "k"), _cases())
def test_default_decisions_are_the_same_whatever_the_loss_units(name: str, k: float) -> None:
    mismatches = _mismatches(name, k)
    assert not mismatches, "\n".join(mismatches)


def test_a_relative_policy_passes_the_check_and_an_absolute_one_fails_it() -> None:
    """The check itself: ``clip="percentile"`` (thresholds from the run's own norms) is scale-free with every
    other default, ``clip="fixed"`` at ``max_norm=1.0`` is not (as users expect of an absolute threshold)."""
    relative = {"clip": "percentile"}
    assert _mismatches("cls_sgd", 100.0, relative) == []
    clipped = _run("cls_sgd", 100.0, options=relative).clipped
    assert clipped and clipped == _run("cls_sgd", 1.0, options=relative).clipped  # it did clip, the same steps
    absolute = {"clip": "fixed", "max_norm": 1.0, "lr_guard": False}
    found = _mismatches("cls_sgd", 100.0, absolute)
    assert any(m.startswith("clipped:") for m in found) and any(m.startswith("threshold") for m in found)


def test_without_a_guard_the_scaled_runs_are_the_same_run() -> None:
    for name in ("cls_sgd", "reg_adam"):
        plain, scaled = _run(name, 1.0, guard=False), _run(name, 100.0, guard=False)
        assert scaled.final_loss == pytest.approx(plain.final_loss, rel=1e-3)
        assert plain.clipped == scaled.clipped == [] and plain.thresholds == []
