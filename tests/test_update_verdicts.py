"""The update-to-weight ratio verdicts: "LR too high for <layer>" and "<layer> is not learning"."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_gradguard.decide.diagnostics import (
    UPDATE_RATIO_HIGH,
    lr_too_high_verdicts,
    not_learning_verdicts,
)
from lightning_gradguard.measure.stats import GradStats
from lightning_gradguard.measure.updates import UpdateTracker


def test_lr_too_high_uses_the_median_and_names_the_layer() -> None:
    ratios = {
        "enc": [-0.7, -0.4, -3.0, -0.6],  # median -0.65 > -1.0, despite one low step
        "head": [-2.5, -0.2, -2.6],  # one spike, median -2.5: healthy
        "new": [-0.5, -0.4],  # too few observations
    }
    (v,) = lr_too_high_verdicts(40, ratios)
    assert (v.layer, v.kind, v.step) == ("enc", "lr_too_high", 40)
    assert math.isclose(v.value, -0.65)
    assert "LR too high for layer 'enc'" in v.message and "-0.65" in v.message and "above -1;" in v.message
    assert "0.22 of their norm" in v.message  # 10**-0.65
    assert "learning rate" in v.remedy
    assert [x.layer for x in lr_too_high_verdicts(40, ratios, high=-3.0)] == ["enc", "head"]
    assert lr_too_high_verdicts(40, ratios, min_observations=2)[-1].layer == "new"


def test_not_learning_absolute_and_relative() -> None:
    ratios = {
        "a": [-2.5, -2.4, -2.6],
        "frozen": [-math.inf, -math.inf, -math.inf],  # zero update: the lowest ratio there is
        "slow": [-5.6, -5.5, -5.4],  # below -5
        "lagging": [-4.8, -4.9, -4.7],  # above -5 and within 3 decades of the median layer (-4.8 here)
        "b": [-2.2, math.nan, -2.3, -2.1],  # NaN ignored
    }
    verdicts = {v.layer: v for v in not_learning_verdicts(7, ratios)}
    assert set(verdicts) == {"frozen", "slow"}
    assert "changes its weights by 0 of their norm" in verdicts["frozen"].message
    assert "below -5" in verdicts["slow"].message
    # relative rule alone: a layer 3+ decades below the median layer, although above the floor
    rel = not_learning_verdicts(7, {"a": [-1.0] * 3, "b": [-1.2] * 3, "c": [-4.5] * 3})
    assert [(v.layer, v.kind) for v in rel] == [("c", "not_learning")]
    assert "decades below the median over all layers" in rel[0].message
    # one layer alone: only the absolute floor applies
    assert not_learning_verdicts(7, {"c": [-4.5] * 3}) == []


def test_verdicts_from_a_real_tracker_on_a_too_fast_and_a_frozen_layer() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(
        [
            {"params": net[0].parameters(), "lr": 5.0},  # far too fast
            {"params": net[2].parameters(), "lr": 1e-9},  # frozen in practice
            {"params": net[4].parameters(), "lr": 0.05},
        ]
    )
    tracker = UpdateTracker(GradStats(net.named_parameters()))
    history: dict[str, list[float]] = {layer: [] for layer in tracker.layers}
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        tracker.snapshot()
        opt.step()
        for layer, r in tracker.read(tracker.squared_norms()).log10_ratios().items():
            history[layer].append(r)
    assert [v.layer for v in lr_too_high_verdicts(5, history)] == ["0"]
    assert [v.layer for v in not_learning_verdicts(5, history)] == ["2"]
    assert max(history["4"]) < UPDATE_RATIO_HIGH
