"""The stats engine: grouping (also of ``torch.compile``'d modules), one-pass norms (also of complex
parameters), non-finite detection, device histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_gradguard.measure.stats import GradStats, layer_name


def _set_grads(model: nn.Module, value_fn) -> None:  # type: ignore[no-untyped-def]
    for name, p in model.named_parameters():
        p.grad = value_fn(name, p)


def test_layer_name_options() -> None:
    name = "encoder.layers.3.linear1.weight"
    assert layer_name(name, "module") == "encoder.layers.3.linear1"
    assert layer_name(name, "param") == name
    assert layer_name(name, 1) == "encoder"
    assert layer_name(name, 3) == "encoder.layers.3"
    assert layer_name(name, 10) == "encoder.layers.3.linear1"
    assert layer_name(name, lambda n: n.split(".")[0].upper()) == "ENCODER"
    assert layer_name("bias", "module") == "bias"  # a parameter registered on the root module


def test_three_four_five() -> None:
    """A 3-4-5 gradient has norm 5; two of them in one layer have norm sqrt(50)."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 2, bias=False))
    model[0].weight.grad = torch.tensor([[3.0, 4.0]])
    model[1].weight.grad = torch.tensor([[0.0], [5.0]])
    stats = GradStats(model.named_parameters())
    assert stats.layers == ["0", "1"]
    assert stats.numels == [2, 2]
    s = stats.read(stats.squared_norms())
    assert s.sq_norms == [25.0, 25.0]
    assert s.layer_norms() == {"0": 5.0, "1": 5.0}
    assert s.global_norm == pytest.approx(math.sqrt(50.0))
    assert s.finite and s.nonfinite_layers == []


def test_grouping_by_module_merges_weight_and_bias_and_matches_torch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model(torch.randn(5, 8)).square().sum().backward()
    stats = GradStats(model.named_parameters())
    s = stats.read(stats.squared_norms())
    assert stats.layers == ["0", "2"]
    for i, layer in enumerate(stats.layers):
        module = model[int(layer)]
        expected = torch.cat([module.weight.grad.flatten(), module.bias.grad.flatten()]).norm().item()
        assert math.sqrt(s.sq_norms[i]) == pytest.approx(expected, rel=1e-6)
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    assert s.global_norm == pytest.approx(total, rel=1e-6)


def test_per_param_and_depth_grouping() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1))
    assert GradStats(model.named_parameters(), "param").layers == [n for n, _ in model.named_parameters()]
    assert GradStats(model.named_parameters(), 1).layers == ["0", "1"]


def test_frozen_and_missing_grads_are_left_out() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    stats = GradStats(model.named_parameters())
    assert stats.layers == ["1", "2"]
    model[1].weight.grad = torch.ones(2, 2)  # layer 2 has no gradient this step
    s = stats.read(stats.squared_norms())
    assert s.sq_norms == [4.0, 0.0]
    # the sparsity pattern changes between steps: the cached plans follow it
    model[2].bias.grad = torch.full((2,), 2.0)
    assert stats.read(stats.squared_norms()).sq_norms == [4.0, pytest.approx(8.0)]


def test_nonfinite_layers_are_found() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    _set_grads(model, lambda n, p: torch.ones_like(p))
    model[1].weight.grad[0, 0] = float("nan")
    s = GradStats(model.named_parameters()).read(GradStats(model.named_parameters()).squared_norms())
    assert s.nonfinite_layers == ["1"] and not s.finite and math.isnan(s.global_norm)
    model[1].weight.grad[0, 0] = float("inf")
    stats = GradStats(model.named_parameters())
    s = stats.read(stats.squared_norms())
    assert s.nonfinite_layers == ["1"] and s.global_norm == math.inf


def test_mixed_dtypes_and_fp16_overflow_safe() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(torch.float64)
    model[1].half()
    _set_grads(model, lambda n, p: torch.full_like(p, 300.0))  # fp16 squares would overflow 65504
    stats = GradStats(model.named_parameters())
    s = stats.read(stats.squared_norms())
    assert s.sq_norms == [pytest.approx(20 * 300.0**2), pytest.approx(20 * 300.0**2)]
    assert s.finite


def test_sparse_gradients() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 1, 4])).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse
    stats = GradStats(emb.named_parameters())
    s = stats.read(stats.squared_norms())
    dense = emb.weight.grad.to_dense()
    assert math.sqrt(s.sq_norms[0]) == pytest.approx(dense.norm().item())
    ranges = stats.histogram_ranges()
    hist = stats.read_histograms(ranges, stats.histogram_counts(ranges, 8))
    assert hist["weight"].num == 6  # the coalesced values: 2 rows x 3


def test_empty_model_and_no_grads() -> None:
    stats = GradStats(nn.Module().named_parameters())
    s = stats.read(stats.squared_norms())
    assert s.layers == [] and s.global_norm == 0.0 and s.finite
    ranges = stats.histogram_ranges()
    assert stats.read_histograms(ranges, stats.histogram_counts(ranges, 4)) == {}
    model = nn.Linear(2, 2)
    stats = GradStats(model.named_parameters())
    assert stats.read(stats.squared_norms()).global_norm == 0.0


def test_extras_travel_in_the_same_vector() -> None:
    model = nn.Linear(1, 1, bias=False)
    model.weight.grad = torch.tensor([[2.0]])
    stats = GradStats(model.named_parameters())
    s = stats.read(stats.squared_norms(extras=[torch.tensor(65536.0)]), num_extras=1)
    assert s.sq_norms == [4.0] and s.extras == [65536.0]


def test_tied_parameters_count_once() -> None:
    a = nn.Linear(2, 2, bias=False)
    model = nn.Module()
    model.a = a
    model.b = a  # type: ignore[assignment]
    named = [("a.weight", a.weight), ("b.weight", a.weight)]
    assert GradStats(named).numels == [4]
    assert GradStats(model.named_parameters(remove_duplicate=False)).numels == [4]


def test_histogram_matches_summary_writer_statistics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """num/min/max/sum/sum_squares equal those SummaryWriter.add_histogram computes for the same tensor."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 5))
    model(torch.randn(7, 30)).sum().backward()
    stats = GradStats(model.named_parameters())
    ranges = stats.histogram_ranges()
    ours = stats.read_histograms(ranges, stats.histogram_counts(ranges, 16))

    writer = SummaryWriter(str(tmp_path))
    for i, layer in enumerate(stats.layers):
        grads = torch.cat([p.grad.flatten() for p in model[i].parameters()])
        writer.add_histogram(f"ref/{layer}", grads, 0)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    for i, layer in enumerate(stats.layers):
        ref = acc.Histograms(f"ref/{layer}")[0].histogram_value
        h = ours[layer]
        assert h.num == ref.num
        assert h.min == pytest.approx(ref.min, rel=1e-6)
        assert h.max == pytest.approx(ref.max, rel=1e-6)
        assert h.sum == pytest.approx(ref.sum, rel=1e-5, abs=1e-7)
        assert h.sum_squares == pytest.approx(ref.sum_squares, rel=1e-5)
        grads = torch.cat([p.grad.flatten() for p in model[i].parameters()]).numpy().astype(np.float64)
        expected, _ = np.histogram(grads, bins=16, range=(grads.min(), grads.max()))
        assert sum(h.bucket_counts) == grads.size
        # equal-width bins: allow a value sitting exactly on an edge to land on either side
        assert np.abs(np.array(h.bucket_counts) - expected).sum() <= 2
        assert h.bucket_limits[-1] == h.max


def test_histogram_constant_and_nonfinite_layers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    _set_grads(model, lambda n, p: torch.zeros_like(p))
    model[1].weight.grad[0, 0] = float("nan")
    stats = GradStats(model.named_parameters())
    ranges = stats.histogram_ranges()
    hist = stats.read_histograms(ranges, stats.histogram_counts(ranges, 8))
    assert list(hist) == ["0"]  # the NaN layer is left out
    assert hist["0"].bucket_counts == [6.0] and hist["0"].min == hist["0"].max == 0.0


def test_scale_multiplies_dense_and_sparse_grads() -> None:
    emb = nn.Embedding(4, 2, sparse=True)
    lin = nn.Linear(2, 2)
    model = nn.ModuleDict({"emb": emb, "lin": lin})
    emb(torch.tensor([0, 2])).sum().backward()
    lin.weight.grad = torch.ones(2, 2)
    stats = GradStats(model.named_parameters())
    before = stats.read(stats.squared_norms()).global_norm
    stats.scale_(0.5)
    assert lin.weight.grad.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert stats.read(stats.squared_norms()).global_norm == pytest.approx(before / 2)


def test_complex_gradient_norms_match_torch() -> None:
    layer = nn.Linear(3, 2, dtype=torch.complex128)
    layer.weight.grad = torch.tensor([[3 + 4j, 0, 0], [0, 0, 12j]], dtype=torch.complex128)
    layer.bias.grad = torch.zeros(2, dtype=torch.complex128)
    stats = GradStats(layer.named_parameters(), group_by="param")
    read = stats.read(stats.squared_norms())
    assert read.layer_norms() == pytest.approx({"weight": 13.0, "bias": 0.0})
    stats.scale_(0.5)
    assert layer.weight.grad[0, 0] == 1.5 + 2j
    ranges = stats.histogram_ranges()
    hist = stats.read_histograms(ranges, stats.histogram_counts(ranges, 4))["weight"]
    assert (hist.min, hist.max, hist.num, hist.sum) == (0.0, 6.0, 6.0, 2.5 + 6.0)


def test_compiled_module_has_the_eager_layer_names() -> None:
    eager = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Sequential(nn.Linear(3, 1)))
    outer = nn.Module()
    outer.net = torch.compile(eager)  # wrapping is lazy: nothing is compiled until the first call
    names = [n for n, _ in outer.named_parameters()]
    assert any("_orig_mod" in n for n in names)  # what torch.compile does to the names
    compiled = torch.compile(outer)
    for group_by in ("module", "param", 1):
        stats = GradStats(compiled.named_parameters(), group_by=group_by)  # type: ignore[arg-type]
        reference = GradStats((f"net.{n}", p) for n, p in eager.named_parameters())
        if group_by == "module":
            assert stats.layers == reference.layers == ["net.0", "net.2.0"]
        assert not any("_orig_mod" in layer for layer in stats.layers), stats.layers
    assert GradStats(compiled.named_parameters(), group_by=1).layers == ["net"]
