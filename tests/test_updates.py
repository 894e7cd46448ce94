"""Update-to-weight ratios and weight norms per layer, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradguard.measure.stats import GradStats
from lightning_gradguard.measure.updates import UpdateTracker, log10_update_ratio, update_metrics


def _two_layers() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0]]))  # norm 5
        model[1].weight.fill_(2.0)
        model[1].bias.fill_(0.0)  # layer "1": norm 2
    return model


@pytest.mark.parametrize("keep_buffers", [False, True])
def test_sgd_step_hand_computed(keep_buffers: bool) -> None:
    model = _two_layers()
    tracker = UpdateTracker(GradStats(model.named_parameters()), keep_buffers=keep_buffers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0].weight.grad = torch.tensor([[0.3, 0.4]])  # update 0.1 * 0.5 = 0.05
    model[1].weight.grad = torch.tensor([[0.0]])
    model[1].bias.grad = torch.tensor([0.0])
    tracker.snapshot()
    assert tracker.pending
    opt.step()
    s = tracker.read(tracker.squared_norms())
    assert not tracker.pending
    assert s.layers == ["0", "1"]
    assert s.update_norms == pytest.approx([0.05, 0.0])
    # after the step: [[2.97, 3.96]] -> norm 4.95
    assert s.weight_norms == pytest.approx([4.95, 2.0])
    ratios = s.log10_ratios()
    assert ratios["0"] == pytest.approx(math.log10(0.05 / 4.95))
    assert ratios["1"] == -math.inf
    metrics = update_metrics(s)
    assert metrics == pytest.approx(
        {
            "gradguard/weight_norm/0": 4.95,
            "gradguard/update_ratio/0": math.log10(0.05 / 4.95),
            "gradguard/weight_norm/1": 2.0,
        }
    )
    assert "gradguard_opt1/weight_norm/0" in update_metrics(s, 1)
    # a second log step measures only its own update (kept buffers are refilled, not accumulated)
    tracker.snapshot()
    opt.step()
    s2 = tracker.read(tracker.squared_norms())
    assert s2.update_norms == pytest.approx([0.05, 0.0])


def test_only_weights_with_a_gradient_are_touched_and_counted() -> None:
    model = _two_layers()
    tracker = UpdateTracker(GradStats(model.named_parameters()))
    model[0].weight.grad = torch.ones(1, 2)  # layer "1" has no gradient this step
    tracker.snapshot()
    with torch.no_grad():
        model[0].weight.add_(torch.tensor([[0.0, 0.03]]))
        model[1].weight.add_(100.0)  # not snapshotted: not measured
    s = tracker.read(tracker.squared_norms())
    assert s.update_norms == pytest.approx([0.03, 0.0], rel=1e-5)
    assert s.weight_norms[0] == pytest.approx(math.hypot(3.0, 4.03), rel=1e-6)
    assert s.weight_norms[1] == 0.0
    assert set(s.log10_ratios()) == {"0"}
    assert set(update_metrics(s)) == {"gradguard/weight_norm/0", "gradguard/update_ratio/0"}


def test_matches_direct_computation_under_adam_with_mixed_dtypes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    model[2].to(torch.bfloat16)
    stats = GradStats(model.named_parameters())
    tracker = UpdateTracker(stats)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(5, 8)
    model[2](model[1](model[0](x)).to(torch.bfloat16)).float().square().mean().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker.snapshot()
    opt.step()
    s = tracker.read(tracker.squared_norms())
    for i, layer in enumerate(s.layers):
        names = [n for n in before if n.startswith(f"{layer}.")]
        params = {n: p.detach() for n, p in model.named_parameters()}
        du = math.sqrt(sum(float((params[n].double() - before[n].double()).square().sum()) for n in names))
        w = math.sqrt(sum(float(params[n].double().square().sum()) for n in names))
        assert s.update_norms[i] == pytest.approx(du, rel=1e-2)
        assert s.weight_norms[i] == pytest.approx(w, rel=1e-2)
        assert s.log10_ratios()[layer] == pytest.approx(math.log10(du / w), abs=1e-2)


def test_discard_and_missing_snapshot() -> None:
    model = _two_layers()
    tracker = UpdateTracker(GradStats(model.named_parameters()))
    with pytest.raises(RuntimeError, match="snapshot"):
        tracker.squared_norms()
    model[0].weight.grad = torch.ones(1, 2)
    tracker.snapshot()
    tracker.discard()
    assert not tracker.pending
    with pytest.raises(RuntimeError, match="snapshot"):
        tracker.squared_norms()


def test_log10_update_ratio_edges() -> None:
    assert log10_update_ratio(0.003, 3.0) == pytest.approx(-3.0)
    assert log10_update_ratio(0.0, 3.0) == -math.inf
    assert math.isnan(log10_update_ratio(1.0, 0.0))
    assert math.isnan(log10_update_ratio(math.nan, 1.0))


def test_complex_weights_give_real_norms() -> None:
    w = torch.nn.Parameter(torch.tensor([3 + 4j, 0j], dtype=torch.complex64))
    w.grad = torch.ones_like(w)
    tracker = UpdateTracker(GradStats([("w", w)]))
    tracker.snapshot()
    with torch.no_grad():
        w.sub_(torch.tensor([0j, 0.03j], dtype=torch.complex64))  # |update| 0.03, |w| ~5
    stats = tracker.read(tracker.squared_norms())
    assert stats.update_norms[0] == pytest.approx(0.03, rel=1e-5)
    assert stats.weight_norms[0] == pytest.approx(math.hypot(5.0, 0.03), rel=1e-6)
