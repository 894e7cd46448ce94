"""Regression tests for issue 13, phase 2: the callback-side defects (one section per item of the issue)."""

from __future__ import annotations

import gc
import logging
import math
import warnings
import weakref
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_gradguard import GradGuard, GradMonitor
from lightning_gradguard.decide.engine import GradGuardError, NonFiniteGradientsError
from lightning_gradguard.keys import tag
from tests._models import TinyRegressor, make_trainer, read_events, scalars


class RankZeroMessages(logging.Handler):
    """The messages of Lightning's rank-zero logger (where GradGuard's information goes), read at the source."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> RankZeroMessages:
        logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        logger.removeHandler(self)
        logger.setLevel(self._level)


# ---------------------------------------------------------------------------------- 3: numpy / tensor numbers
@pytest.mark.parametrize("make", [np.float64, np.float32, torch.tensor], ids=["np.float64", "np.float32", "tensor"])
def test_numpy_and_tensor_numbers_are_stored_as_python_numbers(make: Any, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    guard = GradGuard(
        clip="fixed", max_norm=make(5.0), max_consecutive_skips=np.int64(3), histogram_every_n_steps=np.int32(2)
    )
    assert type(guard.max_norm) is float and guard.max_norm == 5.0
    assert type(guard.max_consecutive_skips) is int and type(guard.histogram_every_n_steps) is int
    ckpt = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, [guard, ckpt], max_steps=3, enable_checkpointing=True)
    trainer.fit(TinyRegressor())
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["callbacks"][guard.state_key]
    assert saved["config"]["max_norm"] == 5.0 and saved["guards"]["0"]["counters"]["steps"] == 3
    resumed = GradGuard(clip="fixed", max_norm=make(5.0))
    ckpt = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path / "b", [resumed, ckpt], max_steps=5, enable_checkpointing=True)
    trainer.fit(TinyRegressor(), ckpt_path=str(last), weights_only=True)
    assert resumed.last_outcome is not None and resumed.last_outcome.step == 4  # continued from step 3


# ---------------------------------------------------------------------------------- 8: argument holes
@pytest.mark.parametrize("value", [True, False])
def test_group_by_bool_is_refused(value: bool) -> None:
    with pytest.raises(ValueError, match=rf"`group_by` must be 'module', 'param', an int .* got {value}"):
        GradGuard(group_by=value)


@pytest.mark.parametrize("value", ["no", 0, None, 1])
def test_log_layer_norms_must_be_a_bool(value: Any) -> None:
    with pytest.raises(ValueError, match=rf"`log_layer_norms` must be True or False, got {value!r}"):
        GradGuard(log_layer_norms=value)


def test_numpy_bool_log_layer_norms_is_a_bool() -> None:
    assert GradGuard(log_layer_norms=np.bool_(False)).log_layer_norms is False


# ---------------------------------------------------------------------------------- 12: NaN in the heatmap
def test_nan_step_is_nan_in_the_heatmap_not_a_dead_layer(tmp_path: Path) -> None:
    guard = GradGuard(heatmap_every_n_steps=1000, histogram_every_n_steps=0, log_every_n_steps=1)
    make_trainer(tmp_path, [guard], max_steps=3).fit(TinyRegressor(nan_at_steps=(1,)))
    columns = guard.state_dict()["guards"]["0"]["heatmap_columns"]
    assert len(columns) == 3
    assert all(math.isnan(v) for v in columns[1])  # grey, "no value", not -inf ("dead layer", black)
    assert all(math.isfinite(v) for v in columns[0] + columns[2])


# ---------------------------------------------------------------------------------- 9: off by one
def test_end_of_fit_flush_is_logged_at_the_last_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_gradguard.outputs.report import main

    guard = GradGuard(log_every_n_steps=4, histogram_every_n_steps=0)
    trainer = make_trainer(tmp_path, [guard], max_steps=6)
    with RankZeroMessages() as said:
        trainer.fit(TinyRegressor())
    log_dir = trainer.logger.log_dir  # type: ignore[union-attr]
    assert sorted(scalars(read_events(log_dir), tag("global_norm"))) == [0, 4, 5]  # not 6: the run is steps 0-5
    summaries = [m for m in said.messages if "diagnostics summary" in m]
    assert len(summaries) == 1 and "(steps 0-5)" in summaries[0]
    capsys.readouterr()
    assert main(["report", str(log_dir)]) == 0
    assert "steps           0 .. 5 (" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- 11: events in one entry
def test_events_of_one_step_are_one_text_entry(tmp_path: Path) -> None:
    guard = GradGuard(on_nonfinite="skip", histogram_every_n_steps=0, log_every_n_steps=1, diagnose_every_n_steps=1)
    trainer = make_trainer(tmp_path, [guard], max_steps=4)
    trainer.fit(TinyRegressor(nan_at_steps=(1, 3)))
    texts = read_events(trainer.logger.log_dir).Tensors(f"{tag('events')}/text_summary")  # type: ignore[union-attr]
    entries = {e.step: e.tensor_proto.string_val[0].decode() for e in texts}
    assert [e.step for e in texts] == [1, 3]  # one entry per step; the last one written at the end of fit
    assert entries[1].startswith("**3 events**")  # the skip and the two layers' non-finite verdicts, together
    assert "skipped optimizer step 1" in entries[1] and "'net.0'" in entries[1] and "'net.2'" in entries[1]
    assert entries[3].startswith("skipped optimizer step 3")


def test_events_are_written_before_the_streak_error(tmp_path: Path) -> None:
    guard = GradGuard(max_consecutive_skips=2, histogram_every_n_steps=0, log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [guard], max_steps=5)
    with pytest.raises(NonFiniteGradientsError):
        trainer.fit(TinyRegressor(nan_at_steps=(0, 1, 2, 3)))
    texts = read_events(trainer.logger.log_dir).Tensors(f"{tag('events')}/text_summary")  # type: ignore[union-attr]
    assert [e.step for e in texts] == [0, 1]


# ---------------------------------------------------------------------------------- 5: fp16 GradScaler
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
    assert counters["scaler_skipped_total"] == 1 and counters["skipped_total"] == 0
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert scalars(acc, tag("scaler_skipped"))[1] == 1.0


def test_a_streak_of_scaler_skips_stops_the_run(tmp_path: Path) -> None:
    guard = GradGuard(max_consecutive_skips=5, histogram_every_n_steps=0)
    trainer = _amp_trainer(tmp_path, guard, 40)
    with pytest.raises(NonFiniteGradientsError, match="GradScaler skipped 5 consecutive optimizer steps"):
        trainer.fit(ScaledLoss(nan_at_steps=tuple(range(40))))
    assert guard.state_dict()["guards"]["0"]["counters"]["steps"] == 5  # not 40


# ---------------------------------------------------------------------------------- 2: state across fits
def test_folds_with_one_guard_start_fresh_and_keep_no_model_alive(
    tmp_path: Path,
) -> None:
    guard = GradGuard(clip="percentile", histogram_every_n_steps=0, heatmap_every_n_steps=0)
    models: list[weakref.ref[L.LightningModule]] = []
    for fold in range(3):
        for earlier in models:
            gc.collect()
            assert earlier() is None  # no earlier fold's model is kept alive
        torch.manual_seed(fold)
        model = TinyRegressor(lr=0.05 * (fold + 1), n=96)
        trainer = make_trainer(tmp_path / f"fold{fold}", [guard], max_steps=30)
        with RankZeroMessages() as said:
            trainer.fit(model)
        acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
        last_threshold = scalars(acc, tag("threshold"))
        assert guard.threshold == pytest.approx(last_threshold[max(last_threshold)], rel=1e-6)
        assert guard.lr_scale == pytest.approx(scalars(acc, tag("lr_scale"))[29], rel=1e-6)
        assert guard.state_dict()["guards"]["0"]["counters"]["steps"] == 30  # this fit's steps only
        assert list(guard.state_dict()["guards"]) == ["0"]
        assert sum("diagnostics summary" in m for m in said.messages) == 1
        models.append(weakref.ref(model))
        del model, trainer, acc
    gc.collect()
    assert all(ref() is None for ref in models)  # not even the last one: GradGuard let go of it at teardown


def test_the_same_trainer_fitted_again_continues(tmp_path: Path) -> None:
    guard = GradGuard(histogram_every_n_steps=0, heatmap_every_n_steps=0)
    model = TinyRegressor()
    trainer = make_trainer(tmp_path, [guard], max_steps=3)
    trainer.fit(model)
    trainer.fit_loop.epoch_loop.max_steps = 5
    trainer.fit(model)
    assert guard.state_dict()["guards"]["0"]["counters"]["steps"] == 5
    assert guard.last_outcome is not None and guard.last_outcome.step == 4


# ---------------------------------------------------------------------------------- 1: unfrozen parameters
class Finetuned(L.LightningModule):
    """A backbone (frozen first, unfrozen by BackboneFinetuning or by hand) and a head."""

    def __init__(self, nan_at_step: int | None = None, all_params_in_optimizer: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)
        self.nan_at_step = nan_at_step
        self.all_params_in_optimizer = all_params_in_optimizer
        self.backbone[0].weight.register_hook(self._poison)

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.nan if self.trainer.global_step == self.nan_at_step else grad

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.backbone(x)), y * 100)  # large gradients: clipping is active

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = (
            self.parameters() if self.all_params_in_optimizer else filter(lambda p: p.requires_grad, self.parameters())
        )
        return torch.optim.SGD(params, lr=1e-3)

    def train_dataloader(self) -> Any:
        return TinyRegressor().train_dataloader()  # 8 steps per epoch


class AfterGuard(Callback):
    """After GradGuard: the global norm over every gradient the optimizer will apply, and the backbone weight."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}
        self.backbone: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms[trainer.global_step] = torch.linalg.vector_norm(torch.cat(grads)).item() if grads else 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._before = pl_module.backbone[0].weight.detach().clone()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.backbone[trainer.global_step - 1] = (self._before, pl_module.backbone[0].weight.detach().clone())


class UnfreezeByHand(Callback):
    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        pl_module.backbone.requires_grad_(False)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == 1:
            pl_module.backbone.requires_grad_(True)


@pytest.mark.parametrize("how", ["BackboneFinetuning", "by hand"])
def test_parameters_unfrozen_during_training_are_clipped_and_skipped(how: str, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import BackboneFinetuning

    guard = GradGuard(clip="fixed", max_norm=0.5, lr_guard=False, histogram_every_n_steps=0, diagnostics=False)
    after = AfterGuard()
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1) if how == "BackboneFinetuning" else UnfreezeByHand()
    trainer = make_trainer(tmp_path, [unfreeze, guard, after], max_epochs=2, log_every_n_steps=1)
    trainer.fit(Finetuned(nan_at_step=11, all_params_in_optimizer=how == "by hand"))
    assert len(after.norms) == 16
    assert all(norm <= 0.5 * (1 + 1e-5) for norm in after.norms.values()), after.norms  # backbone included
    assert guard.skipped_steps == 1
    before, now = after.backbone[11]
    assert torch.isfinite(now).all() and torch.equal(before, now)  # the NaN step left the backbone untouched
    before, now = after.backbone[12]
    assert not torch.equal(before, now)  # and it trains after it
    layers = guard.state_dict()["guards"]["0"]["layers"]
    assert layers == ["backbone.0", "head"]
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert 12 in scalars(acc, tag("layer_norm/{layer}", 0, "backbone.0"))
    # the update-to-weight ratios (weight copies rebuilt at the regroup) cover the unfrozen backbone too
    ratios = scalars(acc, tag("update_ratio/{layer}", 0, "backbone.0"))
    assert 12 in ratios and math.isfinite(ratios[12]) and -8.0 < ratios[12] < 0.0


def test_plain_guard_regroups_after_an_unfreeze() -> None:
    from lightning_gradguard import Guard

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, optimizer, clip="fixed", max_norm=0.1, lr_guard=False, diagnostics=False)
    x = torch.randn(8, 4)
    for step in range(3):
        if step == 2:
            model[0].requires_grad_(True)
        optimizer.zero_grad()
        (model(x).sum() * 100).backward()
        outcome = guard.before_optimizer_step()
        total = torch.linalg.vector_norm(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
        assert total.item() <= 0.1 * (1 + 1e-5)
        assert list(outcome.stats.layers) == (["0", "1"] if step == 2 else ["1"])
        optimizer.step()


# ---------------------------------------------------------------------------------- 7: one set of tags
def test_gradguard_and_gradmonitor_in_one_trainer_are_refused(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [GradGuard(), GradMonitor()], max_steps=2)
    with pytest.raises(GradGuardError, match=r"GradGuard\(clip='auto'\) and GradMonitor\(clip='None'\) in one Trainer"):
        trainer.fit(TinyRegressor())
    trainer = make_trainer(tmp_path, [GradGuard(), GradMonitor()], max_steps=2, logger=False)
    trainer.fit(TinyRegressor())  # nothing is written without loggers: two instances are fine (own states)


# ---------------------------------------------------------------------------------- 14: warnings at the user's line
def test_warnings_point_at_the_users_line_not_at_gradguard_source(tmp_path: Path) -> None:
    from lightning_gradguard import Guard

    trainer = make_trainer(tmp_path, [GradGuard(histogram_every_n_steps=0, diagnose_every_n_steps=1)], max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegressor(nan_at_steps=(1,)))
        model = nn.Linear(2, 1)
        guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), histogram_every_n_steps=0)
        (model(torch.ones(1, 2)) * math.nan).sum().backward()
        guard.before_optimizer_step()
    ours = [w for w in caught if str(w.message).startswith("GradGuard:")]
    assert len(ours) >= 3  # the skip, the verdicts (fit) and the skip (plain loop)
    for w in ours:
        shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
        assert "callbacks.py:" not in shown and "outputs.py:" not in shown and "guard.py:" not in shown, shown
        assert w.filename == __file__, shown


def test_state_loaded_by_hand_before_the_first_fit_is_used(tmp_path: Path) -> None:
    first = GradGuard(histogram_every_n_steps=0, heatmap_every_n_steps=0)
    make_trainer(tmp_path / "a", [first], max_steps=3, logger=False).fit(TinyRegressor())
    second = GradGuard(histogram_every_n_steps=0, heatmap_every_n_steps=0)
    second.load_state_dict(first.state_dict())
    make_trainer(tmp_path / "b", [second], max_steps=2, logger=False).fit(TinyRegressor())
    assert second.state_dict()["guards"]["0"]["counters"]["steps"] == 5  # 3 loaded + 2 of this fit


class FreezeAt(Callback):
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 4:
            pl_module.net[0].requires_grad_(False)


def test_a_layer_frozen_during_training_is_not_called_dead(tmp_path: Path) -> None:
    guard = GradGuard(histogram_every_n_steps=0, log_every_n_steps=1)
    make_trainer(tmp_path, [FreezeAt(), guard], max_steps=12, logger=False).fit(TinyRegressor(n=256))
    assert [(v.kind, v.layer) for v in guard.verdicts if v.kind == "dead"] == []
    assert guard.last_outcome is not None and guard.last_outcome.stats.layer_norms()["net.0"] == 0.0
