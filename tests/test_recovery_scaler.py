"""Guard in a plain loop with a GradScaler and no ``scaler.unscale_``: a rollback step goes through
``scaler.step`` / ``scaler.update`` (plain and fused optimizers) and changes nothing."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_gradguard import Guard, RollbackTrigger, StepOutcome

FAULT = 6
Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Factory] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
}


def _run(make: Factory, fault: str, unscale: bool) -> tuple[Guard, list[StepOutcome], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = make(list(model.parameters()))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    # one non-finite loss, or one loss far above the level, rolls back at once
    trigger = RollbackTrigger(nonfinite_loss_steps=1, runaway_steps=1)
    guard = Guard(model, optimizer, scaler=scaler, rollback=trigger, snapshot_every_n_steps=1, log_every_n_steps=1)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(12, 32, 8, generator=g), torch.randn(8, 1, generator=g)
    outcomes, weights = [], []
    for step in range(12):
        loss = nn.functional.mse_loss(model(x[step]), x[step] @ w)
        if step == FAULT:
            loss = loss * (math.nan if fault == "nan" else 1e4)
        scaler.scale(loss).backward()
        if unscale:
            scaler.unscale_(optimizer)
        outcomes.append(guard.before_optimizer_step(loss))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return guard, outcomes, weights


@pytest.mark.parametrize("fault", ["nan", "runaway"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rollback_step_goes_through_the_scaler_without_unscale(name: str, fault: str) -> None:
    guard, outcomes, weights = _run(OPTIMIZERS[name], fault, unscale=False)
    rolled = outcomes[FAULT]
    assert guard.rollbacks_total == 1 and rolled.skipped
    assert [e.kind for e in rolled.events][-1] == "rollback"
    # the rollback put back the snapshot of the step before (taken before its update) and stepped nothing
    before = weights[FAULT - 2]
    for key, value in weights[FAULT].items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert all(torch.isfinite(v).all() for v in weights[-1].values())
    assert not any(o.skipped for i, o in enumerate(outcomes) if i != FAULT)  # training went on


@pytest.mark.parametrize("name", ["adamw", "adamw-fused"])
def test_rollback_without_unscale_matches_the_run_with_unscale(name: str) -> None:
    _, with_unscale, weights_a = _run(OPTIMIZERS[name], "runaway", unscale=True)
    _, without, weights_b = _run(OPTIMIZERS[name], "runaway", unscale=False)
    assert [o.skipped for o in with_unscale] == [o.skipped for o in without]
    for a, b in zip(weights_a[-1].values(), weights_b[-1].values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
