"""The custom-scalars layout, read back from the event file the way TensorBoard reads it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard.keys import KEYS, tag
from lightning_gradguard.outputs.tensorboard import dashboard_layout, layer_norm_extremes, threshold_band


def _written_layout(tmp_path: Path, indices: list[int]) -> layout_pb2.Layout:
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_custom_scalars(dashboard_layout(indices))
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    assert len(events) == 1
    return layout_pb2.Layout.FromString(events[0].tensor_proto.string_val[0])


def _documented(full_tag: str) -> bool:
    name = full_tag.split("/", 1)[1]
    return any(re.fullmatch(re.escape(key.name).replace(re.escape("{layer}"), ".+"), name) for key in KEYS)


def test_margin_charts_read_back_from_the_event_file(tmp_path: Path) -> None:
    layout = _written_layout(tmp_path, [0])
    charts = {chart.title: chart for cat in layout.category for chart in cat.chart}
    band = charts["norm within its threshold band"]
    assert band.WhichOneof("content") == "margin"
    (series,) = band.margin.series
    assert (series.value, series.lower, series.upper) == (
        "gradguard/band/global_norm",
        "gradguard/band/post_clip_norm",
        "gradguard/band/threshold",
    )
    extremes = charts["per-layer norm extremes"].margin.series
    assert [(s.value, s.lower, s.upper) for s in extremes] == [
        ("gradguard/layer_norm_median", "gradguard/layer_norm_min", "gradguard/layer_norm_max")
    ]
    # every margin tag is a documented key (margin series are exact tags)
    for chart in charts.values():
        for s in chart.margin.series:
            assert all(_documented(t) for t in (s.value, s.lower, s.upper))


def test_loss_lr_and_lr_scale_on_their_own_cards_and_counts_together(tmp_path: Path) -> None:
    layout = _written_layout(tmp_path, [0])
    assert [c.title for c in layout.category] == [
        "GradGuard",
        "GradGuard: layers",
        "GradGuard: LR, clipping, skipped steps",
    ]
    charts = {c.title: c for c in layout.category[0].chart}
    charts |= {c.title: c for cat in layout.category[1:] for c in cat.chart}
    multiline = {title: list(c.multiline.tag) for title, c in charts.items() if c.WhichOneof("content") == "multiline"}
    assert multiline["loss"] == ["^gradguard/loss$"]
    assert multiline["learning rate"] == ["^gradguard/lr$"]
    assert multiline["LR guard scale"] == ["^gradguard/lr_scale$"]
    counts = multiline["skipped steps and rollbacks"]
    assert "^gradguard/rollbacks_total$" in counts and "^gradguard/skipped_total$" in counts
    # the regular expressions select exactly the intended tags among all documented ones
    concrete = [tag(k.name.replace("{layer}", "net.0")) for k in KEYS if k.kind == "scalar"]
    assert [t for t in concrete if re.search(multiline["clipping"][1], t)] == ["gradguard/clipped"]
    assert [t for t in concrete if re.search(multiline["update-to-weight ratio (log10)"][0], t)] == [
        "gradguard/update_ratio/net.0"
    ]
    assert [t for t in concrete if re.search(multiline["per-layer gradient norm"][0], t)] == [
        "gradguard/layer_norm/net.0"
    ]
    # the loss card and the threshold band share the first category: TensorBoard draws them side by side
    assert {c.title for c in layout.category[0].chart} == {"norm within its threshold band", "loss"}


def test_second_optimizer_gets_its_own_category(tmp_path: Path) -> None:
    layout = _written_layout(tmp_path, [0, 1])
    titles = [c.title for c in layout.category]
    assert titles[0] == "GradGuard" and titles[3] == "GradGuard (optimizer 1)" and len(titles) == 6
    band = {c.title: c for c in layout.category[3].chart}["norm within its threshold band"]
    assert band.margin.series[0].upper == "gradguard_opt1/band/threshold"


def test_layer_norm_extremes() -> None:
    assert layer_norm_extremes({"a": 3.0, "b": 4.0}) == {
        "layer_norm_min": 3.0,
        "layer_norm_median": 3.5,
        "layer_norm_max": 4.0,
    }
    assert layer_norm_extremes({"a": math.inf, "b": math.nan}) == {}
    assert layer_norm_extremes({"a": math.nan, "b": 0.0})["layer_norm_max"] == pytest.approx(0.0)


def test_threshold_band_tags_share_their_steps_in_the_event_file(tmp_path: Path) -> None:
    # an uncapped warmup (no threshold), then clipping: the margin chart's three tags must have equal steps
    steps = [(0, 2.0, 2.0, None), (10, 3.0, 3.0, None), (20, 5.0, 4.0, 4.0), (30, 3.5, 3.5, 4.5)]
    with SummaryWriter(str(tmp_path)) as writer:
        for step, norm, post, threshold in steps:
            for name, value in threshold_band(norm, post, threshold).items():
                writer.add_scalar(tag(name), value, step)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    series = {
        name: [(e.step, e.value) for e in acc.Scalars(f"gradguard/band/{name}")]
        for name in ("global_norm", "post_clip_norm", "threshold")
    }
    assert series == {
        "global_norm": [(20, 5.0), (30, 3.5)],
        "post_clip_norm": [(20, 4.0), (30, 3.5)],
        "threshold": [(20, 4.0), (30, 4.5)],
    }
    assert threshold_band(1.0, None, 2.0) == {}
    assert threshold_band(math.inf, 2.0, 2.0) == {}
