"""Non-finite gradients: a step with NaN/inf gradients is skipped (weights and optimizer state untouched),
raised or stepped through with a warning; a streak of skips stops the run; under a GradScaler the scaler's own
skips are counted apart and stop the run only as a streak. From the engine's decision up to a real Trainer."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_gradguard import GradGuard, NonFiniteGradientsError
from lightning_gradguard.decide.engine import apply_outcome
from lightning_gradguard.decide.policies import FixedPolicy
from lightning_gradguard.keys import tag

from ._models import TinyRegressor, make_trainer, read_events, scalars, weights
from .test_engine import _engine, _set_grads, _stats
from .test_frontends import _amp_run


def _fit(tmp_path: Path, callbacks: list[Callback], model: L.LightningModule, **kwargs: Any) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model)
    return trainer


# ----------------------------------------------------------------------------------- the engine's decision


def test_skip_drops_gradients_counts_and_reports_the_layers() -> None:
    engine = _engine(FixedPolicy(max_norm=1.0))
    _set_grads(engine, [math.nan, 0.0], [1.0])
    outcome = engine.decide(engine.measure()[0])
    assert outcome.skipped and not outcome.clipped and outcome.error is None and outcome.threshold is None
    (event,) = outcome.events
    assert event.kind == "skipped" and not event.is_warning and event.layers == ("0",) and event.step == 0
    assert event.message == "skipped optimizer step 0: non-finite gradients in 0"
    assert event.evidence["consecutive_skips"] == 1
    apply_outcome(engine, outcome)
    assert all(p.grad is None for p in engine.stats.params)
    assert engine.counters.skipped_total == 1 and engine.counters.consecutive_skips == 1
    assert engine.policy is not None and engine.policy.state_dict()["config"] == {"max_norm": 1.0}


def test_streak_of_skips_raises_at_the_limit_and_a_finite_step_resets_it() -> None:
    engine = _engine(FixedPolicy(max_norm=1.0), max_consecutive_skips=3)
    bad = _stats(math.inf, 1.0)
    assert [engine.decide(bad).error for _ in range(2)] == [None, None]
    assert engine.decide(_stats(0.5, 0.0)).error is None and engine.counters.consecutive_skips == 0
    outcomes = [engine.decide(bad) for _ in range(3)]
    assert [o.error is None for o in outcomes] == [True, True, False]
    assert outcomes[-1].error is not None and outcomes[-1].error.startswith("GradGuard: 3 consecutive optimizer steps")
    assert "max_consecutive_skips" in outcomes[-1].error and outcomes[-1].skipped
    assert engine.counters.skipped_total == 5 and engine.counters.steps == 6


def test_raise_sets_the_error_and_keeps_the_gradients() -> None:
    engine = _engine(FixedPolicy(max_norm=1.0), on_nonfinite="raise")
    _set_grads(engine, [math.inf, 0.0], [1.0])
    outcome = engine.decide(engine.measure()[0])
    assert not outcome.skipped and outcome.events == ()
    assert outcome.error is not None and "non-finite gradients at optimizer step 0 in layer(s) 0" in outcome.error
    apply_outcome(engine, outcome)
    assert all(p.grad is not None for p in engine.stats.params) and engine.counters.skipped_total == 0


@pytest.mark.parametrize(("on_nonfinite", "monitor_only"), [("warn", False), ("skip", True), ("raise", True)])
def test_warn_and_monitor_only_step_through_with_a_warning(on_nonfinite: str, monitor_only: bool) -> None:
    engine = _engine(None, on_nonfinite=on_nonfinite, monitor_only=monitor_only)
    outcome = engine.decide(_stats(math.nan, 1.0))
    assert not outcome.skipped and outcome.error is None
    (event,) = outcome.events
    assert event.kind == "nonfinite" and event.is_warning and event.layers == ("a",)
    assert event.text == "GradGuard: non-finite gradients at step 0 in a; stepping anyway"
    assert engine.counters.consecutive_skips == 0


def test_scaler_skipped_steps_are_neither_skips_nor_events_but_a_streak_stops() -> None:
    engine = _engine(FixedPolicy(max_norm=1.0), max_consecutive_skips=2)
    outcome = engine.decide(_stats(math.inf, 1.0), scaler_enabled=True)
    assert outcome.scaler_skipped and not outcome.skipped and outcome.events == () and outcome.error is None
    assert engine.counters.scaler_skipped_total == 1 and engine.counters.skipped_total == 0
    assert engine.interval.scaler_skipped == 1
    outcome = engine.decide(_stats(math.inf, 1.0), scaler_enabled=True)  # the run cannot progress: stop
    assert outcome.scaler_skipped and outcome.error is not None and "GradScaler skipped 2 consecutive" in outcome.error
    engine.counters.consecutive_skips = 0
    assert engine.decide(_stats(math.inf, 1.0), scaler_enabled=True).error is None
    assert engine.decide(_stats(1.0, 1.0), scaler_enabled=True).error is None  # a finite step ends the streak
    assert engine.decide(_stats(math.inf, 1.0), scaler_enabled=True).error is None


# ------------------------------------------------------------------------------------------- in a Trainer


class _Snapshots(Callback):
    """Weights and optimizer state after every optimizer step."""

    def __init__(self) -> None:
        self.after: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        opt_state = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])
        self.after[trainer.global_step] = (weights(pl_module), opt_state)


def test_nan_step_is_skipped_without_touching_weights_or_optimizer_state(tmp_path: Path) -> None:
    snaps = _Snapshots()
    guard = GradGuard(log_every_n_steps=1, histogram_every_n_steps=0)
    model = TinyRegressor(optimizer="adamw", nan_at_steps=(3,))
    trainer = _fit(tmp_path, [guard, snaps], model, max_steps=6)
    assert guard.skipped_steps == 1
    w_before, s_before = snaps.after[3]  # after optimizer step index 2
    w_after, s_after = snaps.after[4]  # after the skipped step index 3
    for key in w_before:
        assert torch.equal(w_before[key], w_after[key]), key
    for pid in s_before:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s_before[pid][name], s_after[pid][name]), (pid, name)
    # training continued afterwards
    assert not torch.equal(snaps.after[5][0]["net.0.weight"], w_after["net.0.weight"])
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert scalars(acc, tag("skipped"))[3] == 1.0 and scalars(acc, tag("skipped_total"))[5] == 1.0
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag("events") + "/text_summary")]
    assert any("step 3" in t and "net.0" in t for t in texts)


def test_raise_and_max_consecutive_skips_stop_with_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteGradientsError, match="non-finite gradients at optimizer step 1"):
        _fit(tmp_path / "r", [GradGuard(on_nonfinite="raise")], TinyRegressor(nan_at_steps=(1,)), max_steps=4)
    guard = GradGuard(max_consecutive_skips=3, rollback=False)  # with recovery on, the streak rolls back instead
    with pytest.raises(NonFiniteGradientsError, match="3 consecutive optimizer steps had non-finite gradients"):
        _fit(tmp_path / "s", [guard], TinyRegressor(nan_at_steps=(2, 3, 4, 5)), max_steps=8)
    assert guard.skipped_steps == 3


def test_warn_steps_anyway(tmp_path: Path) -> None:
    guard = GradGuard(on_nonfinite="warn")
    model = TinyRegressor(nan_at_steps=(1,))
    with pytest.warns(UserWarning, match="non-finite gradients at step 1"):
        _fit(tmp_path, [guard], model, max_steps=3)
    assert guard.skipped_steps == 0
    assert torch.isnan(model.net[0].weight).all()  # the user asked for it


def test_events_are_written_before_the_streak_error(tmp_path: Path) -> None:
    guard = GradGuard(max_consecutive_skips=2, histogram_every_n_steps=0, log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [guard], max_steps=5)
    with pytest.raises(NonFiniteGradientsError):
        trainer.fit(TinyRegressor(nan_at_steps=(0, 1, 2, 3)))
    texts = read_events(trainer.logger.log_dir).Tensors(f"{tag('events')}/text_summary")  # type: ignore[union-attr]
    assert [e.step for e in texts] == [0, 1]


def test_nan_step_is_nan_in_the_heatmap_not_a_dead_layer(tmp_path: Path) -> None:
    guard = GradGuard(heatmap_every_n_steps=1000, histogram_every_n_steps=0, log_every_n_steps=1)
    make_trainer(tmp_path, [guard], max_steps=3).fit(TinyRegressor(nan_at_steps=(1,)))
    columns = guard.state_dict()["guards"]["0"]["heatmap_columns"]
    assert len(columns) == 3
    assert all(math.isnan(v) for v in columns[1])  # grey, "no value", not -inf ("dead layer", black)
    assert all(math.isfinite(v) for v in columns[0] + columns[2])


# ----------------------------------------------------------------------------------------- under a GradScaler


class ScaledLoss(TinyRegressor):
    """The loss is multiplied by inf at the chosen steps (an fp16 overflow)."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        return loss * math.inf if self.trainer.global_step in self.nan_at_steps else loss


def _amp_trainer(tmp_path: Path, guard: GradGuard, max_steps: int) -> L.Trainer:
    from lightning.pytorch.plugins import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256.0))
    return make_trainer(tmp_path, [guard], max_steps=max_steps, plugins=[plugin])


def test_one_scaler_overflow_is_no_verdict_and_no_guard_skip(tmp_path: Path) -> None:
    guard = GradGuard(histogram_every_n_steps=0, log_every_n_steps=1)
    trainer = _amp_trainer(tmp_path, guard, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ScaledLoss(nan_at_steps=(1,)))
    texts = [str(w.message) for w in caught]
    assert not any("non-finite" in t or "skips such optimizer steps" in t or "skipped optimizer" in t for t in texts)
    assert guard.verdicts == [] or all(v.kind != "nonfinite" for v in guard.verdicts)
    counters = guard.state_dict()["guards"]["0"]["counters"]
    assert counters["scaler_skipped_total"] == 1 and counters["skipped_total"] == 0 and guard.skipped_steps == 0
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert scalars(acc, tag("scaler_skipped"))[1] == 1.0


def test_a_streak_of_scaler_skips_stops_the_run(tmp_path: Path) -> None:
    guard = GradGuard(max_consecutive_skips=5, histogram_every_n_steps=0)
    trainer = _amp_trainer(tmp_path, guard, 40)
    with pytest.raises(NonFiniteGradientsError, match="GradScaler skipped 5 consecutive optimizer steps"):
        trainer.fit(ScaledLoss(nan_at_steps=tuple(range(40))))
    assert guard.state_dict()["guards"]["0"]["counters"]["steps"] == 5  # not 40


def test_grad_scaler_skips_non_finite_steps_itself() -> None:
    outcomes, weights = _amp_run(unscale_first=True, poison=4)
    assert outcomes[4].scaler_skipped and not outcomes[4].skipped and outcomes[4].events == ()
    assert not any(o.scaler_skipped for i, o in enumerate(outcomes) if i != 4)
    assert torch.isfinite(torch.cat([w.reshape(-1) for w in weights])).all()
