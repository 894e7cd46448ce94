"""Device histograms: every value lands in the bin its position gives, whatever the bin count (the index
dtype changes at 128 and 256 bins), and the per-layer ranges combine the tensors of a layer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_gradguard.measure.stats import GradStats


def _expected_counts(values: np.ndarray, lo: float, hi: float, bins: int) -> list[float]:
    """Bin of each float32 value by the documented rule: ``floor((x - lo) * (bins / (hi - lo)))``, in float32,
    clamped to the last bin."""
    x = values.astype(np.float32)
    scale = np.float32(bins / (hi - lo))
    pos = (x - np.float32(lo)) * scale
    index = np.clip(np.floor(pos), 0, bins - 1).astype(np.int64)
    return np.bincount(index, minlength=bins).astype(float).tolist()


@pytest.mark.parametrize("bins", [1, 8, 127, 128, 129, 200, 256, 257, 1000])
def test_counts_follow_the_binning_rule(bins: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 3.0
    stats = GradStats(model.named_parameters())
    ranges = stats.histogram_ranges()
    hist = stats.read_histograms(ranges, stats.histogram_counts(ranges, bins))
    for i, layer in enumerate(stats.layers):
        values = torch.cat([p.grad.flatten() for p in model[i].parameters()]).numpy()
        h = hist[layer]
        assert (h.min, h.max) == (float(values.min()), float(values.max()))
        assert h.bucket_counts == _expected_counts(values, h.min, h.max, bins)
        assert h.num == values.size == sum(h.bucket_counts)


def test_values_on_the_edges() -> None:
    """0..8 in 8 bins: each integer k < 8 opens bin k, and the maximum falls in the last bin."""
    layer = nn.Linear(9, 1, bias=False)
    layer.weight.grad = torch.arange(9, dtype=torch.float32).reshape(1, 9)
    stats = GradStats(layer.named_parameters())
    ranges = stats.histogram_ranges()
    (h,) = stats.read_histograms(ranges, stats.histogram_counts(ranges, 8)).values()
    assert h.bucket_counts == [1.0] * 7 + [2.0]
    assert h.bucket_limits == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


def test_ranges_combine_the_tensors_of_a_layer() -> None:
    """A layer's range spans its weight and bias, also when they have different dtypes."""
    layer = nn.Linear(2, 2)
    layer.bias.data = layer.bias.data.double()
    layer.weight.grad = torch.tensor([[-1.5, 0.25], [2.0, 0.0]])
    layer.bias.grad = torch.tensor([-3.0, 1.0], dtype=torch.float64)
    other = nn.Linear(1, 1, bias=False).half()
    other.weight.grad = torch.tensor([[0.5]], dtype=torch.float16)
    model = nn.ModuleDict({"a": layer, "b": other, "c": nn.Linear(1, 1)})  # "c" has no gradients
    stats = GradStats(model.named_parameters())
    assert stats.histogram_ranges().tolist() == [[3.0, 2.0], [-0.5, 0.5], [-math.inf, -math.inf]]
    ranges = stats.histogram_ranges()
    hist = stats.read_histograms(ranges, stats.histogram_counts(ranges, 4))
    assert list(hist) == ["a", "b"]
    # a: width 5/4 from -3, edges -1.75, -0.5, 0.75: -3 | -1.5 | 0, 0.25 | 1, 2
    assert hist["a"].bucket_counts == [1.0, 1.0, 2.0, 2.0]
    assert hist["a"].num == 6 and hist["a"].sum == pytest.approx(-1.25)


def test_nan_and_inf_layers_are_marked() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].bias.grad[1] = float("nan")
    model[1].weight.grad[0, 1] = float("inf")
    stats = GradStats(model.named_parameters())
    ranges = stats.histogram_ranges()
    assert math.isnan(ranges[0, 0].item()) and math.isnan(ranges[0, 1].item())
    assert ranges[1].tolist() == [-1.0, math.inf]
    assert ranges[2].tolist() == [-1.0, 1.0]
    hist = stats.read_histograms(ranges, stats.histogram_counts(ranges, 16))
    assert list(hist) == ["2"]
    assert hist["2"].bucket_counts == [6.0]  # a constant layer: one bucket holding every value
