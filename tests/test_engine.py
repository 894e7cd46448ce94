"""The engine's decisions without a Trainer: clip, skip / raise / warn, streaks, aggregates, events, state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import FrozenInstanceError

import pytest
import torch
from torch import nn

from lightning_gradguard._checks import CLIP_NAMES
from lightning_gradguard.decide.engine import Engine, StepOutcome, apply_outcome
from lightning_gradguard.decide.lr_guard import LRGuard
from lightning_gradguard.decide.policies import POLICY_NAMES, FixedPolicy
from lightning_gradguard.events import GuardEvent
from lightning_gradguard.measure.stats import GradStats, StepStats
from lightning_gradguard.options import GuardOptions

LAYERS = ("a", "b")


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        model[1].weight.fill_(3.0)
    return model


def _engine(policy: FixedPolicy | None = None, **kwargs: object) -> Engine:
    model = _model()
    return Engine(0, GradStats(model.named_parameters()), policy, None, None, **kwargs)  # type: ignore[arg-type]


def _stats(*sq: float) -> StepStats:
    return StepStats(LAYERS[: len(sq)], list(sq))


def _set_grads(engine: Engine, *grads: Sequence[float]) -> None:
    for param, values in zip(engine.stats.params, grads, strict=True):
        param.grad = torch.tensor(values, dtype=torch.float32).reshape(param.shape)


def test_clip_coefficient_from_a_3_4_5_gradient_and_apply_scales_the_gradients() -> None:
    engine = _engine(FixedPolicy(max_norm=1.0))
    _set_grads(engine, [3.0, 0.0], [4.0])
    stats, loss, scale = engine.measure()
    assert (stats.global_norm, loss, scale) == (5.0, None, None)
    outcome = engine.decide(stats)
    assert outcome.threshold == 1.0 and outcome.clipped and not outcome.skipped and outcome.error is None
    assert outcome.coefficient == pytest.approx(1.0 / (5.0 + 1e-6), rel=1e-12)
    assert outcome.post_clip_norm == pytest.approx(1.0, rel=1e-6)
    apply_outcome(engine, outcome)
    clipped = torch.cat([p.grad.reshape(-1) for p in engine.stats.params])  # type: ignore[union-attr]
    assert torch.linalg.vector_norm(clipped).item() == pytest.approx(1.0, rel=1e-6)
    below = engine.decide(_stats(0.25, 0.0))
    assert not below.clipped and below.coefficient is None and below.post_clip_norm == 0.5


def test_outcome_is_immutable() -> None:
    outcome = _engine().decide(_stats(1.0, 0.0))
    assert isinstance(outcome, StepOutcome) and outcome.threshold is None and outcome.coefficient is None
    with pytest.raises(FrozenInstanceError):
        outcome.skipped = True  # type: ignore[misc]


def test_measure_carries_loss_and_amp_scale_in_the_one_vector_and_decide_unscales() -> None:
    engine = _engine(FixedPolicy(max_norm=100.0))
    _set_grads(engine, [3.0 * 8, 0.0], [4.0 * 8])  # gradients still multiplied by the loss scale 8
    stats, loss, scale = engine.measure(loss=torch.tensor(2.5), amp_scale=torch.tensor(8.0))
    assert (loss, scale) == (2.5, 8.0) and stats.global_norm == 40.0
    outcome = engine.decide(stats, loss=loss, amp_scale=scale)
    assert outcome.global_norm == 5.0 and outcome.loss == 2.5 and not outcome.clipped


def test_interval_aggregates_and_close_interval() -> None:
    engine = _engine(FixedPolicy(max_norm=2.0))
    for sq in (1.0, 9.0, 4.0):  # norms 1, 3 (clipped), 2 (not: equal to the threshold)
        engine.decide(_stats(sq, 0.0))
    interval = engine.interval
    assert (interval.steps, interval.finite, interval.norm_sum, interval.norm_max) == (3, 3, 6.0, 3.0)
    assert (interval.clipped, interval.skipped) == (1, 0)
    assert engine.decide(_stats(math.nan, 0.0)).skipped
    assert math.isnan(engine.interval.norm_max) and engine.interval.finite == 3
    assert engine.decide(_stats(math.inf, 0.0)).skipped and engine.interval.norm_max == math.inf
    assert engine.interval.skipped == 2 and engine.counters.clipped_total == 1
    last = engine.decide(_stats(100.0, 0.0))  # norm 10: log10 1.0; a zero norm: -inf
    engine.close_interval(last, global_step=7, heatmap=True)
    assert engine.interval.steps == 0 and engine.heatmap_steps == [7]
    assert engine.heatmap_columns == [[1.0, -math.inf]]
    for step in range(600):
        engine.close_interval(last, global_step=step, heatmap=True)
    assert len(engine.heatmap_steps) <= 512 and engine.heatmap_grid()[1] == [-math.inf] * len(engine.heatmap_steps)


def test_lr_reduction_becomes_a_warning_event_with_its_evidence() -> None:
    model = _model()
    engine = Engine(
        0, GradStats(model.named_parameters()), FixedPolicy(max_norm=1.0), LRGuard(patience=2, cooldown=0), None
    )
    outcomes = [engine.decide(_stats(1.0, 0.0)) for _ in range(2)]
    assert outcomes[0].lr_reduction is None and outcomes[0].events == ()
    reduction = outcomes[1].lr_reduction
    assert reduction is not None and reduction.lr_scale == 0.5
    (event,) = outcomes[1].events
    assert event.kind == "lr_reduction" and event.is_warning and event.message == str(reduction)
    assert event.evidence["lr_scale"] == 0.5 and event.evidence["threshold"] == 1.0


def test_verdicts_at_diagnose_steps_become_events() -> None:
    """Changed: a layer is called dead from its second zero observation on (see test_diagnostics)."""
    options = GuardOptions(clip=None)
    model = _model()
    engine = options.engine(0, model.named_parameters(), monitor_only=False)
    outcome = engine.decide(_stats(0.0, 1.0))  # layer "0" of the model: gradient exactly zero
    assert engine.diagnose(outcome) == ()  # once could be a zero-init head
    outcome = engine.decide(_stats(0.0, 1.0))  # still exactly zero -> dead
    events = engine.diagnose(outcome)
    assert events and all(e.kind == "verdict" and e.is_warning for e in events)
    assert [v.layer for v in engine.verdicts] == [layer for e in events for layer in e.layers]
    assert "Remedy:" in events[0].message


def test_state_round_trip_and_the_version_1_format_loads() -> None:
    options = GuardOptions(clip="fixed", max_norm=1.0)
    engine = options.engine(0, _model().named_parameters(), monitor_only=False)
    for sq in (4.0, 0.25, math.inf):
        engine.decide(StepStats(engine.stats.layers, [sq, 0.0]))
    state = engine.state_dict()
    assert state["counters"] == {
        "steps": 3,
        "clipped_total": 1,
        "skipped_total": 1,
        "scaler_skipped_total": 0,
        "consecutive_skips": 1,
    }
    fresh = options.engine(0, _model().named_parameters(), monitor_only=False)
    assert fresh.load_state_dict(state) == [] and fresh.state_dict() == state
    # version 1: no "layers", "numels", "lr_guard_config"; a counter missing and one unknown
    old = {k: v for k, v in state.items() if k not in ("layers", "numels", "lr_guard_config")}
    old["counters"] = {k: v for k, v in state["counters"].items() if k != "scaler_skipped_total"} | {"later": 1}
    older = options.engine(0, _model().named_parameters(), monitor_only=False)
    assert older.load_state_dict(old) == []
    assert older.counters == engine.counters and older.interval == engine.interval
    assert older.lr_guard is not None and older.lr_guard.state_dict() == engine.lr_guard.state_dict()  # type: ignore[union-attr]


def test_state_of_another_model_is_reported() -> None:
    options = GuardOptions(clip="fixed", max_norm=1.0)
    engine = options.engine(0, _model().named_parameters(), monitor_only=False)
    engine.decide(StepStats(engine.stats.layers, [4.0, 0.0]))
    other = options.engine(0, nn.Linear(3, 1).named_parameters(), monitor_only=False)
    differences = other.load_state_dict(engine.state_dict())
    assert len(differences) == 2 and differences[0].startswith("layers differ")
    assert differences[1].startswith("parameters differ") and other.counters.steps == 1


def test_events_are_frozen_and_kinds_checked() -> None:
    event = GuardEvent("notice", 0, "hello")
    assert event.text == "GradGuard: hello" and not event.is_warning and dict(event.evidence) == {}
    with pytest.raises(FrozenInstanceError):
        event.step = 1  # type: ignore[misc]
    assert GuardEvent("summary", 3, "diagnostics summary:\nx").text == "GradGuard diagnostics summary:\nx"
    assert GuardEvent("state", 0, "saved state differs").is_warning
    with pytest.raises(ValueError, match="`kind` must be one of skipped, nonfinite"):
        GuardEvent("other", 0, "x")


def test_clip_names_are_declared_once() -> None:
    assert POLICY_NAMES is CLIP_NAMES and CLIP_NAMES == ("auto", "fixed", "percentile", "zscore")


def test_options_name_the_argument_and_the_value() -> None:
    with pytest.raises(ValueError, match=r"`clip` must be one of auto, fixed, percentile, zscore, a ThresholdPolicy"):
        GuardOptions(clip="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`on_nonfinite` must be one of skip, raise, warn, got 'ignore'"):
        GuardOptions(on_nonfinite="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`max_norm` must be a finite number > 0 or None, got inf"):
        GuardOptions(max_norm=math.inf)
    assert GuardOptions(clip=None).lr_guard_template is None and GuardOptions().lr_guard_template is not None


def test_the_engine_and_recovery_import_no_lightning() -> None:
    import subprocess
    import sys

    code = (
        "import sys, lightning_gradguard.decide.engine, lightning_gradguard.events\n"
        "import lightning_gradguard.recovery.rollback\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
