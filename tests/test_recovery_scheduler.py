"""``Guard(scheduler=...)``: a rollback in a plain loop restores the LR scheduler with the model and optimizer."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard import Guard, LRGuard, RollbackTrigger

STEPS, FAULT, EVERY, STEP_SIZE, GAMMA, LR = 30, 14, 4, 5, 0.5, 0.05


def _run(with_scheduler: bool) -> tuple[Guard, torch.optim.lr_scheduler.StepLR, list[float], list[float]]:
    """SGD + StepLR; the loss is NaN at steps FAULT..FAULT+2, so the third such step rolls back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=STEP_SIZE, gamma=GAMMA)
    guard = Guard(
        model,
        optimizer,
        max_norm=10.0,
        clip="fixed",
        lr_guard=LRGuard(patience=1000),  # no reduction of its own: the rollback's cut is the only one
        rollback=RollbackTrigger(nonfinite_steps=3),
        snapshot_every_n_steps=EVERY,
        scheduler=scheduler if with_scheduler else None,
    )
    applied: list[float] = []  # the LR each optimizer step runs with (after the LR guard's pre-hook)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"]))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(STEPS, 16, 4, generator=g), torch.randn(STEPS, 16, 1, generator=g)
    between: list[float] = []  # the param group's LR between steps (the scheduler's own)
    for step in range(STEPS):
        loss = nn.functional.mse_loss(model(x[step]), y[step])
        if FAULT <= step < FAULT + 3:
            loss = loss * math.nan
        loss.backward()
        guard.before_optimizer_step(loss)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        between.append(optimizer.param_groups[0]["lr"])
    guard.close()
    return guard, scheduler, applied, between


def _step_lr(scheduler_steps: int) -> float:
    """StepLR's LR after ``scheduler_steps`` calls of ``step()``, multiplied the way StepLR does it."""
    lr = LR
    for epoch in range(1, scheduler_steps + 1):
        if epoch % STEP_SIZE == 0:
            lr *= GAMMA
    return lr


def test_a_rollback_restores_the_scheduler_and_the_run_ends_at_the_right_lr() -> None:
    guard, scheduler, applied, between = _run(with_scheduler=True)
    (record,) = guard.recovery.trigger.history  # type: ignore[union-attr]
    assert (record.step, record.restored_to) == (FAULT + 2, 12)  # the last healthy snapshot: step 12
    lost = record.steps_lost
    assert lost == 4 and guard.lr_scale == 1.0  # a non-finite fault: restored without an LR cut
    # the scheduler went back to its state at step 12 and continued from there: STEPS - lost steps in all
    assert scheduler.last_epoch == STEPS - lost
    assert _step_lr(STEPS - lost) != _step_lr(STEPS)  # (so a scheduler left alone would end elsewhere)
    assert between[-1] == pytest.approx(_step_lr(STEPS - lost), rel=1e-12)
    assert scheduler.get_last_lr()[0] == between[-1]
    # before the rollback the steps ran at the scheduler's LR, after it at half of it (the rollback's cut)
    assert applied[: FAULT + 2] == pytest.approx([_step_lr(s) for s in range(FAULT + 2)], rel=1e-12)
    after = [_step_lr(s - lost) for s in range(FAULT + 2, STEPS)]
    assert applied[FAULT + 2 :] == pytest.approx(after, rel=1e-12)


def test_without_the_scheduler_a_rollback_leaves_it_where_it_is() -> None:
    guard, scheduler, applied, _ = _run(with_scheduler=False)
    assert guard.rollbacks_total == 1
    assert scheduler.last_epoch == STEPS  # not restored
    # the param groups went back to step 12's LR but the scheduler did not: its decays come at other steps
    after = [_step_lr(s - 4) for s in range(FAULT + 2, STEPS)]
    assert applied[FAULT + 2 :] != pytest.approx(after, rel=1e-12)


@pytest.mark.parametrize("bad", [object(), [object()]])
def test_scheduler_must_be_a_scheduler(bad: Any) -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="`scheduler` must be an LR scheduler"):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), scheduler=bad)
