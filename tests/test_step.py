"""The optimizer step without Lightning: its sequence, its record, cadences of its own, and a sink that only writes."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard.decide.engine import Engine, NonFiniteGradientsError
from lightning_gradguard.options import GuardOptions
from lightning_gradguard.outputs.sink import Reporter
from lightning_gradguard.step import OptimizerStep, StepRecord, UpdateRecord


class RecordingSink:
    """Records what it is handed and nothing else."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def write(self, engine: Engine, record: StepRecord) -> None:
        self.calls.append(("write", record))

    def write_updates(self, engine: Engine, record: UpdateRecord) -> None:
        self.calls.append(("write_updates", record))

    def end(self, engine: Engine, global_step: int, events: Any, extra: Any) -> None:
        self.calls.append(("end", events))


def _run(sink: Any, steps: int = 60, nan_at: tuple[int, ...] = (7, 8), **options: Any) -> tuple[list[Any], nn.Module]:
    """A small regression trained through a OptimizerStep; returns each step's decision and the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    opts = GuardOptions(**options)
    engine = opts.engine(0, list(model.named_parameters()), monitor_only=False)
    if engine.lr_guard is not None:
        engine.lr_guard.attach(optimizer)
    step = OptimizerStep(sink, log_every=5, diagnose_every=opts.diagnose_every_n_steps, histogram_every=0)
    step.attach(engine, optimizer)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    decisions = []
    for i in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * (math.nan if i in nan_at else 1.0)
        loss.backward()
        record = step.run(engine, optimizer, lambda: list(model.named_parameters()), [engine], global_step=i, loss=loss)
        o = record.outcome
        decisions.append((o.step, o.threshold, o.coefficient, o.clipped, o.skipped, [e.kind for e in record.events]))
        optimizer.step()
    step.end(engine, steps)
    step.detach()
    if engine.lr_guard is not None:
        engine.lr_guard.detach()
    return [*decisions, [(v.kind, v.layer, v.step) for v in engine.verdicts], engine.state_dict()], model


def test_the_step_runs_without_lightning_and_returns_a_frozen_record() -> None:
    sink = RecordingSink()
    _run(sink, steps=12)
    writes = [r for kind, r in sink.calls if kind == "write"]
    assert [r.global_step for r in writes] == list(range(12))
    assert [r.log_step for r in writes] == [i % 5 == 0 for i in range(12)]
    skipped = [r.outcome.step for r in writes if r.outcome.skipped]
    assert skipped == [7, 8] and all("skipped" in [e.kind for e in r.events] for r in writes if r.outcome.skipped)
    with pytest.raises(FrozenInstanceError):
        writes[0].global_step = 3  # type: ignore[misc]


def test_decisions_are_identical_without_a_sink() -> None:
    """Outputs decide nothing: the same run with no sink at all clips, skips, cuts and judges alike."""
    with_sink, model_a = _run(RecordingSink(), diagnose_every_n_steps=5)
    without, model_b = _run(None, diagnose_every_n_steps=5)
    assert with_sink == without
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_reporter_changes_no_decision_state() -> None:
    """A real Reporter writing every step leaves the decisions and the decision state as without outputs."""
    written: list[dict[str, float]] = []
    reporter = Reporter(
        GuardOptions(), warn=lambda _: None, info=lambda _: None, log_metrics=lambda m, _: written.append(m)
    )
    with_reporter, model_a = _run(reporter, diagnose_every_n_steps=5)
    without, model_b = _run(None, diagnose_every_n_steps=5)
    assert written and any("gradguard/update_ratio" in key for m in written for key in m)
    state_a, state_b = with_reporter.pop(), without.pop()
    for output_state in ("interval", "heatmap_steps", "heatmap_columns"):  # the Reporter's own buffers
        state_a.pop(output_state), state_b.pop(output_state)
    assert with_reporter == without and state_a == state_b
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


def test_diagnostics_follow_their_own_cadence_not_the_log_cadence() -> None:
    sink = RecordingSink()
    _run(sink, steps=30, nan_at=(), diagnose_every_n_steps=7)
    writes = [r for kind, r in sink.calls if kind == "write"]
    assert [r.outcome.step for r in writes if r.diagnose_step] == [0, 7, 14, 21, 28]
    assert [r.outcome.step for r in writes if r.log_step] == [0, 5, 10, 15, 20, 25]
    # update ratios: read after the optimizer step of every log or diagnose step (none skipped here)
    updates = [r for kind, r in sink.calls if kind == "write_updates"]
    assert sorted({r.step for r in updates}) == sorted({0, 5, 7, 10, 14, 15, 20, 21, 25, 28})
    assert all(r.log_step == (r.step % 5 == 0) for r in updates)


def test_a_stop_is_written_then_raised() -> None:
    sink = RecordingSink()
    with pytest.raises(NonFiniteGradientsError):
        _run(sink, steps=5, nan_at=(2,), on_nonfinite="raise")
    last = sink.calls[-1][1]
    assert last.outcome.step == 2 and isinstance(last.error, NonFiniteGradientsError)


def test_diagnose_every_n_steps_is_checked() -> None:
    with pytest.raises(ValueError, match="diagnose_every_n_steps"):
        GuardOptions(diagnose_every_n_steps=0)
