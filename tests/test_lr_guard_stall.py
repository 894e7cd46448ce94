"""The LR guard's stall channel: the loss stopped improving while the weights move fast -> the LR is cut.

Unit tests drive :meth:`LRGuard.stall_check` with chosen losses, clip decisions and update ratios; the
front-end tests read the reduction back from the ``on_event`` hook and the optimizer's effective LR, with the
update ratio measured by the engine itself (no logger, and with ``log_update_ratios=False``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, Guard, LRGuard
from lightning_gradguard.decide.lr_guard import STALL_EVERY, STALL_MIN_GAIN, STALL_START
from lightning_gradguard.events import GuardEvent

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _feed(guard: LRGuard, losses: list[float], norm: float = 0.5, threshold: float = 1.0) -> None:
    for step, loss in enumerate(losses):
        guard.update(step=step, norm=norm, threshold=threshold, loss=loss)


def test_checks_are_due_every_25_steps_from_step_50_and_never_when_off() -> None:
    guard = LRGuard()
    due = [s for s in range(200) if guard.stall_due(s)]
    assert due == list(range(STALL_START, 200, STALL_EVERY)) == [50, 75, 100, 125, 150, 175]
    assert not any(LRGuard(stall_update_ratio=None).stall_due(s) for s in range(200))


def test_a_flat_loss_with_large_updates_cuts_the_lr_with_the_evidence() -> None:
    opt = torch.optim.AdamW(nn.Linear(2, 1).parameters(), lr=0.03)
    guard = LRGuard().attach(opt)
    _feed(guard, [3.0 + 0.0001 * i for i in range(51)])  # steps 0..50: flat (rising a little)
    assert guard.stall_check(step=50, update_ratio=0.004) is None  # below 0.005: moving slowly is fine
    reduction = guard.stall_check(step=50, update_ratio=0.012)
    assert reduction is not None and reduction.reason == "stall" and reduction.step == 50
    assert guard.lr_scale == 0.5 and reduction.lr_scale == 0.5 and guard.num_reductions == 1
    assert guard.effective_lrs() == [0.015] and opt.param_groups[0]["lr"] == 0.03  # the scheduler's LR untouched
    text = str(reduction)
    assert "0.012 of their norm" in text and "step size is too large" in text and "0.03 -> 0.015" in text
    assert reduction.update_ratio == 0.012 and reduction.loss_recent == pytest.approx(3.0, abs=0.011)


@pytest.mark.parametrize(
    ("case", "losses", "norm", "step"),
    [
        ("improving loss", [3.0 - 0.01 * i for i in range(51)], 0.5, 50),
        ("clipping binds most steps (the approach channel's case)", [3.0] * 51, 2.0, 50),
        ("not a check step", [3.0] * 61, 0.5, 60),
        ("too few losses", [3.0] * 30, 0.5, 50),
    ],
)
def test_no_cut(case: str, losses: list[float], norm: float, step: int) -> None:
    guard = LRGuard()
    _feed(guard, losses, norm=norm)
    scale = guard.lr_scale  # (the approach channel may have cut already when the norm presses the threshold)
    assert guard.stall_check(step=step, update_ratio=0.05) is None, case
    assert guard.lr_scale == scale


def test_off_limits_floors_and_non_finite_ratios() -> None:
    off = LRGuard(stall_update_ratio=None)
    _feed(off, [3.0] * 51)
    assert off.stall_check(step=50, update_ratio=1.0) is None
    capped = LRGuard(max_reductions=1)
    _feed(capped, [3.0] * 76)
    assert capped.stall_check(step=50, update_ratio=math.nan) is None
    assert capped.stall_check(step=50, update_ratio=0.05) is not None
    assert capped.stall_check(step=75, update_ratio=0.05) is None  # max_reductions reached
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    floored = LRGuard(min_lr=0.1).attach(opt)  # already at the floor: a cut would change nothing
    _feed(floored, [3.0] * 51)
    assert floored.stall_check(step=50, update_ratio=0.05) is None and floored.lr_scale == 1.0


def test_successive_checks_cut_again_and_the_clip_record_survives_state_dict() -> None:
    guard = LRGuard(cooldown=100)
    _feed(guard, [3.0] * 51)
    assert guard.stall_check(step=50, update_ratio=0.05) is not None
    for step in range(51, 76):
        guard.update(step=step, norm=0.5, threshold=1.0, loss=3.0)
    # the norm channels' cooldown (100 steps) does not hold the stall channel back: a new window, a new cut
    assert guard.stall_check(step=75, update_ratio=0.05) is not None and guard.lr_scale == 0.25
    state = guard.state_dict()
    assert state["recent_clipped"] == [False] * STALL_EVERY
    restored = LRGuard(cooldown=100)
    restored.load_state_dict(torch.load(_roundtrip(state), weights_only=True))
    assert restored.state_dict() == state


def _roundtrip(state: dict[str, Any]) -> Any:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_a_step_that_follows_the_gradient_needs_a_run_that_has_not_learned() -> None:
    """The gain and convergence conditions. A run whose loss fell from 3.0 to a flat 1.0 has learned and sits at
    its best: converged, no cut whatever the step size (an adaptive optimizer at a constant LR keeps moving its
    weights there). A run that never learned is cut at gain 1 too once its loss rose above twice where it started
    (a too-high LR), never while it sits at its first loss (a plateau). A learned run whose
    loss rose again to more than twice its best is cut when its step does not follow the gradient (Adam's
    normalised step, gain 50), and left to clipping under SGD (gain 1)."""

    def fed(losses: list[float]) -> LRGuard:
        guard = LRGuard().attach(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1))
        _feed(guard, losses, norm=0.5, threshold=1.0)  # post-clip norms 0.5: a plain step moves 0.1 x 0.5
        return guard

    learned = fed([3.0] * 5 + [1.0] * 46)
    assert learned.stall_gain(0.05) == pytest.approx(1.0) and learned.stall_gain(math.nan) is None
    assert learned.stall_check(step=50, update_ratio=0.012, update_norm=0.05) is None
    assert learned.stall_check(step=50, update_ratio=0.012, update_norm=STALL_MIN_GAIN * 0.05) is None  # the limit
    assert learned.stall_check(step=50, update_ratio=0.012, update_norm=2.5) is None  # converged: no cut
    plateau = fed([3.0] * 51)  # flat at its first loss: it has not started, a cut would keep it there
    assert plateau.stall_check(step=50, update_ratio=0.012, update_norm=0.05) is None
    thrown_up = fed([3.0] * 3 + [6.5] * 48)  # a too-high LR throws the loss up first: 6.5 / 3.0 > 2
    reduction = thrown_up.stall_check(step=50, update_ratio=0.012, update_norm=0.05)
    assert reduction is not None and "on a run that has not learned yet" in str(reduction)
    assert "once rose above 2x where it started" in str(reduction)
    below = fed([3.0] * 3 + [5.9] * 48)  # 1.97x: still below the bar
    assert below.stall_check(step=50, update_ratio=0.012, update_norm=0.05) is None
    risen = fed([3.0] * 5 + [0.4] * 21 + [1.0] * 25)  # learned (0.4 < 1.5), then 2.5x its best running level
    assert risen.stall_check(step=50, update_ratio=0.012, update_norm=0.05) is None
    reduction = risen.stall_check(step=50, update_ratio=0.012, update_norm=2.5)  # Adam-like: cut
    assert reduction is not None and reduction.update_gain == pytest.approx(50.0)
    assert "50x a plain gradient step" in str(reduction) and "does not follow the gradient" in str(reduction)
    assert LRGuard().stall_gain(1.0) is None  # no optimizer attached: unknown


def test_clipped_steps_count_at_their_threshold_and_the_record_survives_state_dict() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
    guard = LRGuard().attach(opt)
    guard.update(step=0, norm=3.0, threshold=1.0, loss=1.0)  # clipped: the step applied a norm of 1.0
    guard.update(step=1, norm=0.5, threshold=1.0, loss=1.0)
    assert guard.state_dict()["recent_applied_norms"] == [1.0, 0.5]
    assert guard.stall_gain(1.0) == pytest.approx(1.0 / math.sqrt((1.0 + 0.25) / 2))
    restored = LRGuard().attach(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0))
    restored.load_state_dict(torch.load(_roundtrip(guard.state_dict()), weights_only=True))
    assert restored.stall_gain(1.0) == guard.stall_gain(1.0)


def test_a_healthy_sgd_run_whose_loss_is_noisy_keeps_its_lr() -> None:
    """The outcomes benchmark's 10-layer tanh MLP on digits at its sane SGD LR (0.1), seeds 6, 10 and 15: at a
    stall check (steps 150-200) a single step's update ratio is 0.005-0.015 after a large gradient while the
    25-step loss median does not fall. Under SGD the update follows the clipped gradient (gain about 1) and the
    run has learned, so the stall channel leaves the LR alone (docs/benchmarks.md, "Extra seeds")."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_outcomes as bo
    finally:
        sys.path.pop(0)
    w = bo.WORKLOADS["mlp"]
    for seed in (6, 10, 15):
        train, _, _ = bo._batches(w, seed, w.steps, w.batch)
        model, loss_fn = bo._build(w, seed)
        opt = bo._optimizer(w, model.parameters(), 0.1)
        events: list[GuardEvent] = []
        guard = Guard(model, opt, on_event=events.append, rollback=False)
        for batch in train:
            loss = loss_fn(model, batch)
            loss.backward()
            guard.before_optimizer_step(loss)
            opt.step()
            opt.zero_grad()
        guard.close()
        assert not [e for e in events if e.kind == "lr_reduction"] and guard.lr_scale == 1.0, seed
        assert guard.clipped_steps > 0  # the ceiling acted on this run (its norms exceed the prior early on)


@pytest.mark.parametrize("bad", [0.0, -0.1, math.inf, "0.005", True])
def test_validation(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="stall_update_ratio"):
        LRGuard(stall_update_ratio=bad)


def _noise_run(
    lr: float, log_update_ratios: bool = True, steps: int = 80
) -> tuple[Guard, list[GuardEvent], list[float]]:
    """AdamW on fresh noise targets every step (nothing to learn; the output layer starts at zero, so the loss is
    flat at the noise level from the start; batches of 128, so one batch's loss is within ~10 % of the level).
    At lr 0.05 Adam moves the weights by about 3 % of their norm per
    step and the loss cannot improve; at lr 0.001 they move slowly. The gradients stay far below the 1.0
    ceiling, so no clip threshold sees anything."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    events: list[GuardEvent] = []
    guard = Guard(model, opt, log_update_ratios=log_update_ratios, on_event=events.append, rollback=False)
    lrs = []
    for _ in range(steps):
        x, y = 0.1 * torch.randn(128, 8, generator=gen), 0.1 * torch.randn(128, 1, generator=gen)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.before_optimizer_step(loss)
        opt.step()
        opt.zero_grad()
        lrs.append(guard.engine.lr_guard.effective_lrs()[0])  # type: ignore[union-attr]
    guard.close()
    return guard, events, lrs


@pytest.mark.parametrize("log_update_ratios", [True, False])
def test_the_engine_measures_the_update_and_cuts_when_the_loss_stalls(log_update_ratios: bool) -> None:
    guard, events, lrs = _noise_run(0.05, log_update_ratios, steps=160)
    cuts = [e for e in events if e.kind == "lr_reduction"]
    # the loss is flat at the noise level from the start: a check (every 25 steps from 50) whose last 25 losses
    # are not below the 25 before cuts the LR
    assert cuts, [str(e.message) for e in events]
    first = cuts[0].step
    assert first >= 50 and first % 25 == 0
    assert cuts[0].evidence["reason"] == "stall" and float(cuts[0].evidence["update_ratio"]) > 0.02
    assert "step size is too large" in cuts[0].message
    # lrs[t] is read after step t: the cut step itself ran at 0.05, and the cut holds from the next step on
    assert lrs[first - 1] == 0.05 and lrs[first] == 0.025
    assert guard.lr_scale == 0.5 ** len(cuts)
    # update ratios are recorded for the verdicts only at log steps (0, 50, 100, 150), and only when logged
    ratios = guard.engine.update_ratios
    assert (len(next(iter(ratios.values()))) == 4) if log_update_ratios else not ratios


def test_a_healthy_adamw_lr_is_left_alone() -> None:
    guard, events, lrs = _noise_run(0.001)
    assert not [e for e in events if e.kind == "lr_reduction"] and guard.lr_scale == 1.0 and set(lrs) == {0.001}


class NoiseTask(L.LightningModule):
    """The noise regression of :func:`_noise_run` in a Trainer, one optimizer step per epoch (see
    ``tests/test_resume.py``), so a checkpoint at any step resumes the data exactly."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        gen = torch.Generator().manual_seed(1)
        self.x, self.y = (
            0.1 * torch.randn(steps * 16, 8, generator=gen),
            0.1 * torch.randn(steps * 16, 1, generator=gen),
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        from .test_resume import EpochSampler

        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, sampler=EpochSampler(16))


def _trainer_run(tmp: Path, steps: int, ckpt_path: Path | None = None) -> tuple[L.Trainer, GradGuard, list[GuardEvent]]:
    events: list[GuardEvent] = []
    guard = GradGuard(on_event=events.append, histogram_every_n_steps=0)
    checkpoint = ModelCheckpoint(tmp / "ckpt", filename="{step}", every_n_train_steps=60, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=-1,
        max_steps=steps,
        logger=False,
        callbacks=[guard, checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(NoiseTask(steps), ckpt_path=ckpt_path, weights_only=True if ckpt_path is not None else None)
    return trainer, guard, events


def test_a_trainer_run_cuts_at_the_stall_and_a_resume_before_it_cuts_identically(tmp_path: Path) -> None:
    steps = 90
    straight, guard_a, events_a = _trainer_run(tmp_path / "a", steps)
    cuts = [(e.step, e.evidence["reason"]) for e in events_a if e.kind == "lr_reduction"]
    assert cuts == [(75, "stall")] and guard_a.lr_scale == 0.5 and guard_a.clipped_steps < 5  # not clipping-bound
    ckpt = tmp_path / "a" / "ckpt" / "step=60.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("GradGuard")]
    assert len(state["guards"]["0"]["lr_guard"]["recent_clipped"]) == STALL_EVERY  # the record travels
    resumed, guard_b, events_b = _trainer_run(tmp_path / "b", steps, ckpt_path=ckpt)
    assert [(e.step, e.evidence["reason"]) for e in events_b if e.kind == "lr_reduction"] == cuts
    w_a, w_b = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert all(torch.equal(w_a[name], w_b[name]) for name in w_a)
    assert guard_b.lr_scale == 0.5 and repr(guard_b.state_dict()) == repr(guard_a.state_dict())


def _plateau_run(lr_guard: bool, steps: int = 400) -> tuple[float, list[int]]:
    """A tanh MLP regressing a sine with plain SGD: its loss sits at its first level for about 100 steps, then
    falls. Returns the final full-data loss and the steps of the LR guard's cuts."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g)) + 0.1 * torch.randn(256, 1, generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    events: list[GuardEvent] = []
    guard = Guard(model, optimizer, lr_guard=lr_guard, on_event=events.append, incidents=False)
    batches = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 256, (16,), generator=batches)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        guard.before_optimizer_step(loss)
        optimizer.step()
    with torch.no_grad():
        final = float(nn.functional.mse_loss(model(x), y))
    return final, [e.step for e in events if e.kind == "lr_reduction"]


def test_a_plateau_at_the_first_loss_is_not_a_stall() -> None:
    guarded, cuts = _plateau_run(lr_guard=True)
    plain, _ = _plateau_run(lr_guard=False)
    assert cuts == [] and guarded == plain
