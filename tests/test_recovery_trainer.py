"""Recovery wired into GradGuard: rollbacks in a real Trainer, read back from weights, events and checkpoints.

A simulated hardware fault (one weight set to NaN at the start of an optimizer step) is rolled back to
the last snapshot and training finishes close to the fault-free run; a run whose LR is too high
recovers under the defaults; healthy runs never roll back; a checkpoint taken after a rollback resumes
into the run that never stopped; the callback, Fabric and a plain loop roll back identically.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_gradguard import AutoPolicy, GradGuard, Guard, RecoveryError, RollbackTrigger
from lightning_gradguard.events import GuardEvent
from lightning_gradguard.keys import tag
from lightning_gradguard.outputs.tensorboard import split_events

from . import test_frontends as frontends
from ._models import TinyRegressor, make_trainer, read_events, regression_data, scalars, weights
from .test_lr_guard_trainer import _fit_regression
from .test_resume import Model, _every_step, _fit


class CorruptWeight(Callback):
    """At the start of the given optimizer steps, one element of the model's first weight becomes NaN."""

    def __init__(self, steps: tuple[int, ...] | range) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step in self.steps:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def _full_loss(model: TinyRegressor) -> float:
    x, y = regression_data(model.n, model.dim).tensors
    with torch.no_grad():
        return float(nn.functional.mse_loss(model.net(x), y))


def _tiny_fit(tmp: Path, guard: GradGuard, steps: int, fault: tuple[int, ...] = (), **model_kwargs: Any) -> Any:
    torch.manual_seed(0)
    model = TinyRegressor(**{"optimizer": "adamw", "lr": 0.02, **model_kwargs})
    trainer = make_trainer(tmp, [CorruptWeight(fault), guard], max_steps=steps, log_every_n_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    return model, trainer, [str(w.message) for w in caught]


def test_weight_turned_nan_mid_run_rolls_back_and_finishes_close_to_the_fault_free_run(tmp_path: Path) -> None:
    clean_guard = GradGuard(snapshot_every_n_steps=10, histogram_every_n_steps=0)
    clean, _, _ = _tiny_fit(tmp_path / "clean", clean_guard, 120)
    guard = GradGuard(snapshot_every_n_steps=10, histogram_every_n_steps=0)
    model, trainer, messages = _tiny_fit(tmp_path / "fault", guard, 120, fault=(45,))
    assert clean_guard.rollbacks_total == 0
    # Steps 45-47 have non-finite gradients (skipped); the third rolls back to the snapshot of step 40.
    assert guard.rollbacks_total == 1 and guard.steps_lost == 47 - 40 and guard.skipped_steps == 3
    assert guard.lr_scale == 1.0  # a non-finite weight after a healthy history is no evidence of a too-high LR
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    loss, clean_loss = _full_loss(model), _full_loss(clean)
    assert math.isfinite(loss) and abs(loss - clean_loss) < 0.05 + 0.5 * clean_loss, (loss, clean_loss)
    assert _full_loss(TinyRegressor()) > 5 * loss  # and it did learn
    (warning,) = [m for m in messages if "rollback" in m]
    assert "rollback 1/3: step 47: non-finite gradients on 3 consecutive steps" in warning
    assert "restored step 40 (7 step(s) lost), LR scale kept at 1 (a non-finite fault" in warning
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    rollbacks, lost = scalars(acc, tag("rollbacks_total")), scalars(acc, tag("steps_lost"))
    assert rollbacks[45] == 0.0 and rollbacks[50] == 1.0 and lost[50] == 7.0 and rollbacks[max(rollbacks)] == 1.0
    entries = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag("events") + "/text_summary")]
    texts = [text for entry in entries for text in split_events(entry)]  # one entry holds all events of a step
    assert any(t.startswith("rollback 1/3: step 47") for t in texts)
    state = guard.state_dict()["recovery"]  # the counters are checkpointed, the snapshot is not
    assert state["rollbacks_total"] == 1 and state["history"] == [[47, "nonfinite_grad", 40]]


def test_too_high_lr_diverging_in_the_first_steps_recovers() -> None:
    """SGD at lr 0.9 on a regression diverges within its first steps when nothing bounds the first updates.

    The default ``auto`` policy's ceiling (2x the first norms) slows this blow-up enough that the loss never runs
    away, so the rollback is exercised with the adaptive part alone (``prior_ratio=None``: no clipping during
    its warmup).
    """
    losses, gg, messages = _fit_regression(lr_guard=True, rollback=True, clip=AutoPolicy(prior_ratio=None))
    assert gg.rollbacks_total >= 1
    first = next(m for m in messages if "rollback 1/3" in m)
    restored = int(re.search(r"restored step (\d+)", first).group(1))  # type: ignore[union-attr]
    # the loss ran away from its level, or climbed from its start (whichever check saw it first); an early snapshot
    assert ("losses above" in first or "the loss climbed from where the run started" in first) and restored < 8
    assert max(losses[:15]) > 20 * losses[0]  # it did diverge within its first steps
    final = sum(losses[-20:]) / 20
    assert final < 0.05  # the noise floor is 0.01
    assert gg.lr_scale <= 0.5


def test_adamw_far_too_high_lr_is_rolled_back_under_defaults(tmp_path: Path) -> None:
    """AdamW at 150x its healthy LR: clipping cannot bound Adam's step; under defaults the runaway loss rolls back."""
    torch.manual_seed(0)  # the initial weights _tiny_fit starts from
    init_loss = _full_loss(TinyRegressor())
    runs = {}
    for rollback in (True, False):
        guard = GradGuard(histogram_every_n_steps=0, rollback=rollback)
        model, _, messages = _tiny_fit(tmp_path / str(rollback), guard, 150, optimizer="adamw", lr=3.0)
        runs[rollback] = (guard, _full_loss(model), messages)
    guard, loss, messages = runs[True]
    first = next(m for m in messages if "rollback 1/3" in m)
    step, blown = re.search(r"rollback 1/3: step (\d+): loss ([0-9.e+]+)", first).groups()  # type: ignore[union-attr]
    assert int(step) < 15 and float(blown) > 20 * init_loss  # it diverged within its first steps
    restored = int(re.search(r"restored step (\d+)", first).group(1))  # type: ignore[union-attr]
    assert restored < int(step) and guard.rollbacks_total >= 1 and guard.lr_scale <= 0.5  # a runaway cuts the LR
    assert math.isfinite(loss) and loss < 0.5 * runs[False][1], (loss, runs[False][1])  # far better than without
    assert runs[False][0].rollbacks_total == 0


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_healthy_runs_never_roll_back(tmp_path: Path, optimizer: str) -> None:
    guard = GradGuard(snapshot_every_n_steps=5, histogram_every_n_steps=0)
    _, trainer, messages = _tiny_fit(tmp_path, guard, 100, optimizer=optimizer, lr=0.05)
    assert guard.rollbacks_total == 0 and not [m for m in messages if "rollback" in m]
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert set(scalars(acc, tag("rollbacks_total")).values()) == {0.0}


def test_an_isolated_nan_loss_is_skipped_not_rolled_back(tmp_path: Path) -> None:
    guard = GradGuard(histogram_every_n_steps=0)
    _tiny_fit(tmp_path, guard, 12, nan_at_steps=(4,))
    assert guard.skipped_steps == 1 and guard.rollbacks_total == 0


def test_recovery_runs_out_of_rollbacks_with_an_error_naming_each(tmp_path: Path) -> None:
    guard = GradGuard(rollback=RollbackTrigger(max_rollbacks=2), snapshot_every_n_steps=2, histogram_every_n_steps=0)
    with pytest.raises(RecoveryError) as info:
        _tiny_fit(tmp_path, guard, 60, fault=range(5, 60))
    text = str(info.value)
    # Spent rollbacks do not stop the run by themselves: it skips on until the skip streak shows that
    # training cannot make progress, then names every rollback.
    assert "GradGuard recovery gave up at step 35" in text and "25 consecutive" in text
    assert "after 2 rollback(s) (max_rollbacks=2, 2 counted)" in text
    assert "rollback 1: at step 7 (nonfinite_grad) restored step 4" in text
    # the same trigger before any new snapshot: the slot of step 4 failed, the older one is restored
    assert "rollback 2: at step 10 (nonfinite_grad) restored step 2" in text
    assert "What to try" in text and guard.rollbacks_total == 2 and guard.lr_scale == 0.5


def test_rollback_false_stops_at_max_consecutive_skips(tmp_path: Path) -> None:
    from lightning_gradguard import NonFiniteGradientsError

    guard = GradGuard(rollback=False, max_consecutive_skips=4, histogram_every_n_steps=0)
    with pytest.raises(NonFiniteGradientsError, match="4 consecutive optimizer steps"):
        _tiny_fit(tmp_path, guard, 30, fault=(5,))
    assert guard.rollbacks_total == 0


def test_a_skip_streak_rolls_back_before_max_consecutive_skips_stops(tmp_path: Path) -> None:
    trigger = RollbackTrigger(nonfinite_steps=5, nonfinite_loss_steps=0)  # later than max_consecutive_skips
    guard = GradGuard(rollback=trigger, max_consecutive_skips=2, snapshot_every_n_steps=2, histogram_every_n_steps=0)
    model, _, _ = _tiny_fit(tmp_path, guard, 20, fault=(5,))
    assert [(r.step, r.trigger, r.restored_to) for r in guard._recovery.trigger.history] == [  # type: ignore[union-attr]
        (6, "nonfinite_grad", 4)
    ]
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_options_are_validated() -> None:
    with pytest.raises(TypeError, match="`rollback` must be True, False or a RollbackTrigger"):
        GradGuard(rollback="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`snapshot_every_n_steps` must be an int >= 1"):
        GradGuard(snapshot_every_n_steps=0)
    with pytest.raises(TypeError, match="`snapshot_every_n_steps` must be an int"):
        Guard(nn.Linear(2, 1), torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), snapshot_every_n_steps=1.5)  # type: ignore[arg-type]
    # `True` builds on the LR guard; an explicit trigger is always honoured.
    assert GradGuard(lr_guard=False)._recovery is None and GradGuard(clip=None)._recovery is None
    assert GradGuard(lr_guard=False, rollback=RollbackTrigger())._recovery is not None


# --------------------------------------------------------------------------- resume after a rollback
class _Fault(Callback):
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == 3:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def _resume_guard() -> GradGuard:
    return GradGuard(log_every_n_steps=4, histogram_every_n_steps=0, snapshot_every_n_steps=2)


def test_resume_from_a_checkpoint_taken_after_a_rollback_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    init = Model(scheduler=True)
    n, k = 14, 8
    guard = _resume_guard()
    straight, straight_probe = _fit(
        tmp_path / "straight", copy.deepcopy(init), guard, n, extra=(_Fault(), _every_step(tmp_path / "ckpt"))
    )
    assert [(r.step, r.restored_to) for r in guard._recovery.trigger.history] == [(5, 2)]  # type: ignore[union-attr]
    ckpt = tmp_path / "ckpt" / f"step={k}.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"][guard.state_key]["recovery"]
    assert saved["history"] == [[5, "nonfinite_grad", 2]]
    resumed_guard = _resume_guard()
    resumed, probe = _fit(
        tmp_path / "resumed", copy.deepcopy(init), resumed_guard, n, ckpt_path=ckpt, extra=(_Fault(),)
    )
    assert resumed_guard.rollbacks_total == 1 and resumed_guard.steps_lost == 3
    assert {s: probe.rows[s] for s in range(k, n)} == {s: straight_probe.rows[s] for s in range(k, n)}
    a, b = weights(straight.lightning_module), weights(resumed.lightning_module)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert resumed_guard.lr_scale == guard.lr_scale == 1.0  # one non-finite fault: restored, LR kept


# --------------------------------------------------------------------------- the three front-ends
def test_callback_fabric_and_plain_loop_roll_back_identically(monkeypatch: pytest.MonkeyPatch) -> None:
    def faulty_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        if step == 20:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        return nn.functional.mse_loss(model(x), y)

    monkeypatch.setattr(frontends, "_loss", faulty_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, plain_weights = frontends.run_plain()
        fabric, fabric_weights = frontends.run_fabric()
        callback, callback_weights = frontends.run_callback()
    assert [r[0] for r in plain if r[5]] == [20, 21, 22]  # two skips, then the rollback's skipped step
    assert plain == fabric == callback  # floats compared with ==: bit for bit
    for a, b, c in zip(plain_weights, fabric_weights, callback_weights, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert bool(a.isfinite().all())


class _Faults(Callback):
    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step in self.steps:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def test_rollbacks_restore_the_schedulers_own_lr_not_the_lr_guards_scaled_one(tmp_path: Path) -> None:
    # Lightning's hooks run inside optimizer.step, where the groups hold lr_scale x the scheduler's LR.
    # A chained scheduler (StepLR multiplies the group's LR) must get its own value back after a rollback.
    guard = _resume_guard()
    trainer, _ = _fit(tmp_path, Model(scheduler=True), guard, 14, extra=(_Faults((3, 8)),))
    assert [(r.step, r.restored_to) for r in guard._recovery.trigger.history] == [(5, 2), (10, 6)]  # type: ignore[union-attr]
    assert guard.lr_scale == 0.5  # the same trigger again soon after a restore: the second rollback cuts the LR
    sched = trainer.lr_scheduler_configs[0].scheduler
    (group,) = trainer.optimizers[0].param_groups
    assert group["lr"] == pytest.approx(0.05 * 0.7 ** (sched.last_epoch // 3), rel=1e-12)


def test_lr_guard_forced_cut_is_scheduler_proof_and_not_a_detector_reduction() -> None:
    from lightning_gradguard import LRGuard

    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    guard = LRGuard(max_reductions=1).attach(opt)
    assert guard.force_reduction() == (1.0, 0.5) and guard.force_reduction(0.1) == (0.5, 0.05)
    assert guard.num_reductions == 0
    used = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    for _ in range(3):
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        sched.step()
    assert used == pytest.approx([0.05, 0.025, 0.0125]) and opt.param_groups[0]["lr"] == 0.125
    with pytest.raises(ValueError, match="`factor` must be in"):
        guard.force_reduction(1.5)


def test_rollback_keeps_the_diagnostics_account_of_the_run(tmp_path: Path) -> None:
    """A rollback restores the diagnostics' norm windows, not their record of the run: the end-of-fit summary
    covers the whole run (all 64 log steps of a 64-step run) and the non-finite episode of steps 8-10 is one
    episode, reported once."""
    from ._models import TinyRegressor

    events: list[GuardEvent] = []
    guard = GradGuard(on_event=events.append, diagnose_every_n_steps=1)
    trainer = make_trainer(tmp_path, [guard], logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 64 steps, log_every_n_steps=1; at lr 0.02 the run is stable after the fault (at 0.1 its loss climbs)
        trainer.fit(TinyRegressor(n=512, nan_at_steps=(8, 9, 10), lr=0.02))
    assert guard.rollbacks_total == 1
    (rollback,) = [e for e in events if e.kind == "rollback"]
    assert (rollback.step, rollback.evidence["restored_to"]) == (10, 4)  # the newest snapshot before step 8
    (summary,) = [e for e in events if e.kind == "summary"]
    lines = summary.message.splitlines()
    assert lines[1].startswith("2 layers over 64 log steps (steps 0-63)")
    assert "  net.0: nonfinite (1 episode, steps 8-10)" in lines
    nonfinite = [e for e in events if e.kind == "verdict" and "non-finite gradient" in e.message]
    assert [e.step for e in nonfinite] == [8, 8]  # one verdict per layer for the one episode


def test_fp16_gradscaler_nan_loss_streak_rolls_back(tmp_path: Path) -> None:
    """Under fp16 AMP every non-finite step is a GradScaler skip; a NaN loss streak still rolls back.

    The loss of a scaler-skipped step reaches the trigger, so ``nonfinite_loss`` fires under a GradScaler: a
    NaN loss (NaN at any loss scale) is rolled back before the skip streak reaches ``max_consecutive_skips``.
    """
    from lightning.pytorch.plugins import MixedPrecision
    from torch.amp import GradScaler

    from ._models import TinyRegressor

    torch.manual_seed(0)
    events: list[GuardEvent] = []
    guard = GradGuard(on_event=events.append)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))
    trainer = make_trainer(tmp_path, [guard], logger=False, plugins=[plugin])
    model = TinyRegressor(n=256, nan_at_steps=(8, 9, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    (rollback,) = [e for e in events if e.kind == "rollback"]
    assert rollback.step == 10 and rollback.evidence["trigger"] == "nonfinite_loss"
    assert rollback.evidence["nonfinite_loss_streak"] == 3
    assert guard.rollbacks_total == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
