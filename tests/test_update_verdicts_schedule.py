"""A layer whose LR an LR schedule anneals moves slowly on purpose: no "not learning" verdict for it, while a
layer whose LR is tiny from the start still gets one (plain-loop ``Guard``, gradients set by hand)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard import Guard
from lightning_gradguard.decide.engine import UPDATE_LR_DECAYED

OPTIONS: dict[str, Any] = {
    "histogram_every_n_steps": 0,
    "heatmap_every_n_steps": 0,
    "log_every_n_steps": 1,
    "diagnose_every_n_steps": 1,
}
STEPS = 30


def _model() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Three 4x4 layers of ones: ``0`` healthy (1 % of its norm per step), ``1`` annealed from that to 1e-8 of
    its norm over the first half of the run, ``2`` at 1e-8 of its norm from the start."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        for layer in model:
            layer.weight.fill_(1.0)  # type: ignore[operator]
    groups = [
        {"params": model[0].parameters(), "lr": 1.0},
        {"params": model[1].parameters(), "lr": 1.0},
        {"params": model[2].parameters(), "lr": 1e-6},
    ]
    optimizer = torch.optim.SGD(groups, lr=1.0)
    annealed = lambda step: max(1e-6, 1.0 - step / (STEPS // 2))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step: 1.0, annealed, lambda step: 1.0])
    return model, optimizer, scheduler


def _train(guard: Guard, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, steps: range) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in steps:
            sign = 1.0 if step % 2 == 0 else -1.0  # the updates are known exactly: lr x 0.01 per element
            for p in model.parameters():
                p.grad = torch.full_like(p, sign * 0.01)
            guard.before_optimizer_step()
            optimizer.step()
            scheduler.step()


def _not_learning(guard: Guard) -> list[str]:
    return [v.layer for v in guard.engine.update_verdicts if v.kind == "not_learning"]


@pytest.mark.parametrize("lr_guard", [False, True], ids=["scheduler-lrs", "lr-guard-effective-lrs"])
def test_an_annealed_layer_is_not_called_not_learning_a_tiny_lr_from_the_start_is(lr_guard: bool) -> None:
    model, optimizer, scheduler = _model()
    guard = Guard(model, optimizer, scheduler=scheduler, clip=None, lr_guard=lr_guard, **OPTIONS)
    _train(guard, model, optimizer, scheduler, range(STEPS))
    guard.close()
    engine = guard.engine
    # the annealed layer really is as slow as the tiny-LR one by the end: only its schedule tells them apart
    assert max(engine.update_ratios["1"]) < -7.0 and max(engine.update_ratios["2"]) < -7.0
    assert engine.update_lr_peaks == {"0": 1.0, "1": 1.0, "2": pytest.approx(1e-6)}
    assert engine.update_lrs["1"] < UPDATE_LR_DECAYED * engine.update_lr_peaks["1"]
    assert _not_learning(guard) == ["2"]


def test_the_lr_peaks_are_saved_and_a_state_without_them_still_loads() -> None:
    model, optimizer, scheduler = _model()
    guard = Guard(model, optimizer, scheduler=scheduler, clip=None, lr_guard=False, **OPTIONS)
    _train(guard, model, optimizer, scheduler, range(STEPS // 2))
    state = guard.engine.state_dict()
    assert state["update_lr_peaks"] == {"0": 1.0, "1": 1.0, "2": pytest.approx(1e-6)}

    weights = [p.detach().clone() for p in model.parameters()]
    scheduler_state = scheduler.state_dict()

    def resume(saved: dict[str, Any]) -> Guard:
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights, strict=True):
                p.copy_(w)
        scheduler.load_state_dict(scheduler_state)
        resumed = Guard(model, optimizer, scheduler=scheduler, clip=None, lr_guard=False, **OPTIONS)
        assert resumed.engine.load_state_dict(saved) == []
        _train(resumed, model, optimizer, scheduler, range(STEPS // 2, STEPS))
        return resumed

    # resumed with the peaks: the annealed layer is still known to be scheduled down (the tiny-LR layer's
    # episode, reported before the checkpoint, goes on)
    assert _not_learning(resume(state)) == []
    # a state written before the peaks existed loads; the peaks start from the LRs seen after it, so the layer
    # annealed before the checkpoint counts as slow from the start
    older = resume({k: v for k, v in state.items() if k != "update_lr_peaks"})
    assert older.engine.update_lr_peaks["1"] == pytest.approx(1e-6)
    assert _not_learning(older) == ["1"]
