"""What the front-ends write, read back from the event files: the dashboard's tags, events and warnings.

Loss, the threshold band, the layer-norm extremes, the weight norms and update-to-weight ratios (checked
against the weights recorded around each optimizer step), the update verdicts with their episodes, the
``on_event`` hook, the events of one step as one text entry, warnings attributed to the user's line, and one
set of tags per Trainer.
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard import GradGuard, GradGuardError, GradMonitor, Guard, GuardEvent, LRGuard
from lightning_gradguard.keys import tag

from ._models import TinyRegressor, make_trainer, read_events, scalars


class AroundTheStep(Callback):
    """Weights before and after each optimizer step, and the loss, keyed by ``trainer.global_step``."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.loss: dict[int, float] = {}

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.loss[trainer.global_step] = loss.item()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.before[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.after[trainer.global_step - 1] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}


def _per_layer(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers: dict[str, list[torch.Tensor]] = {}
    for name, value in params.items():
        layers.setdefault(name.rpartition(".")[0], []).append(value.flatten().double())
    return {layer: torch.cat(values) for layer, values in layers.items()}


def test_the_callback_writes_loss_band_extremes_and_update_ratios(tmp_path: Path) -> None:
    recorder = AroundTheStep()
    guard = GradGuard(
        clip="fixed", max_norm=0.5, log_every_n_steps=2, histogram_every_n_steps=0, heatmap_every_n_steps=0
    )
    trainer = make_trainer(tmp_path, [recorder, guard], max_steps=8)
    trainer.fit(TinyRegressor())
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    # every 2 steps, plus the end-of-training log of the last step, 7 (logged at its own step)
    log_steps, source = [0, 2, 4, 6, 7], {0: 0, 2: 2, 4: 4, 6: 6, 7: 7}

    # The loss GradGuard carries, beside the norms.
    loss = scalars(acc, "gradguard/loss")
    assert sorted(loss) == log_steps
    for step, value in loss.items():
        assert value == pytest.approx(recorder.loss[source[step]], rel=1e-6)

    # The threshold band: three tags at the same steps, the norm between post-clip norm and threshold.
    norm, band = (
        scalars(acc, "gradguard/global_norm"),
        {name: scalars(acc, f"gradguard/band/{name}") for name in ("global_norm", "post_clip_norm", "threshold")},
    )
    assert sorted(band["global_norm"]) == sorted(band["post_clip_norm"]) == sorted(band["threshold"]) == log_steps
    clipped = 0
    for step in log_steps:
        assert band["global_norm"][step] == pytest.approx(norm[step])
        assert band["threshold"][step] == pytest.approx(0.5)
        assert band["post_clip_norm"][step] == pytest.approx(min(norm[step], 0.5), rel=1e-5)
        clipped += norm[step] > 0.5
    assert clipped, "the fixed 0.5 threshold clips some of these log steps, so the band's two edges differ"

    # The per-layer extremes: min / median / max of the layer norms of the same step.
    layer_norms = {layer: scalars(acc, f"gradguard/layer_norm/{layer}") for layer in ("net.0", "net.2")}
    for name, fn in (("min", min), ("median", statistics.median), ("max", max)):
        logged = scalars(acc, f"gradguard/layer_norm_{name}")
        assert sorted(logged) == log_steps
        for step, value in logged.items():
            assert value == pytest.approx(fn([layer_norms[layer][step] for layer in layer_norms]), rel=1e-6)

    # Weight norms and update-to-weight ratios, from the weights recorded around the step.
    for layer in ("net.0", "net.2"):
        weight_norm = scalars(acc, f"gradguard/weight_norm/{layer}")
        ratio = scalars(acc, f"gradguard/update_ratio/{layer}")
        assert sorted(weight_norm) == sorted(ratio) == [0, 2, 4, 6]  # the end-of-fit log has no step to measure
        for step in weight_norm:
            before, after = _per_layer(recorder.before[step])[layer], _per_layer(recorder.after[step])[layer]
            assert weight_norm[step] == pytest.approx(after.norm().item(), rel=1e-5)
            expected = math.log10((after - before).norm().item() / after.norm().item())
            assert ratio[step] == pytest.approx(expected, abs=1e-4)

    # The dashboard's margin charts read tags that exist and share their steps.
    from tensorboard.plugins.custom_scalar import layout_pb2

    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    margins = [c.margin.series[0] for cat in layout.category for c in cat.chart if c.HasField("margin")]
    assert len(margins) == 2
    for series in margins:
        steps = [sorted(scalars(acc, t)) for t in (series.value, series.lower, series.upper)]
        assert steps[0] == steps[1] == steps[2] == log_steps


def _plain_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        for layer in model:
            layer.weight.fill_(1.0)  # type: ignore[operator]
    groups = [
        {"params": model[0].parameters(), "lr": 50.0},  # weights 1 <-> 0.5: each step moves 50-100% of the norm
        {"params": model[1].parameters(), "lr": 0.0},  # never moves
        {"params": model[2].parameters(), "lr": 1.0},  # 1% per step: healthy
    ]
    return model, torch.optim.SGD(groups, lr=1.0)


def _steps(guard: Guard, model: nn.Module, optimizer: torch.optim.Optimizer, first: int, count: int) -> None:
    for step in range(first, first + count):
        sign = 1.0 if step % 2 == 0 else -1.0  # gradients set by hand: the updates are known exactly
        for p in model.parameters():
            p.grad = torch.full_like(p, sign * 0.01)
        guard.before_optimizer_step()
        optimizer.step()


def test_update_verdicts_once_per_episode_and_logged_ratios(tmp_path: Path) -> None:
    model, optimizer = _plain_model()
    events: list[GuardEvent] = []
    writer = SummaryWriter(str(tmp_path))
    options: dict[str, Any] = {
        "histogram_every_n_steps": 0,
        "heatmap_every_n_steps": 0,
        "log_every_n_steps": 1,
        "diagnose_every_n_steps": 1,
    }
    guard = Guard(model, optimizer, clip=None, lr_guard=False, writer=writer, on_event=events.append, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _steps(guard, model, optimizer, 0, 12)
        first = [(e.layers, e.evidence["verdict"], e.step) for e in events if e.kind == "verdict"]
        # a full window of 5 log steps, then one verdict per layer and kind however long it lasts
        assert first == [(("0",), "lr_too_high", 4), (("1",), "not_learning", 4)]
        assert "LR too high for layer '0'" in events[0].message and "Remedy:" in events[0].message
        optimizer.param_groups[0]["lr"] = 1.0  # layer 0 calms down for a whole window: its episode ends
        _steps(guard, model, optimizer, 12, 10)
        optimizer.param_groups[0]["lr"] = 50.0
        _steps(guard, model, optimizer, 22, 8)
    guard.close()
    writer.close()
    high = [e.step for e in events if e.kind == "verdict" and e.evidence["verdict"] == "lr_too_high"]
    assert high[0] == 4 and len(high) == 2 and high[1] > 22  # reported again in the new episode, only once
    assert [e.step for e in events if e.kind == "verdict" and e.evidence["verdict"] == "not_learning"] == [4]
    assert [v.kind for v in guard.engine.update_verdicts] == ["lr_too_high", "not_learning", "lr_too_high"]

    acc = read_events(tmp_path)
    healthy = scalars(acc, "gradguard/update_ratio/2")
    assert len(healthy) == 30 and all(v == pytest.approx(-2.0, abs=0.01) for v in healthy.values())  # 0.01 / ~1
    assert "gradguard/update_ratio/1" not in acc.Tags()["scalars"]  # a zero update: log10 = -inf, not charted
    assert list(scalars(acc, "gradguard/weight_norm/1").values()) == [pytest.approx(4.0)] * 30  # ||ones(4, 4)||


def test_an_on_event_hook_that_raises_is_reported_once_and_training_goes_on() -> None:
    model, optimizer = _plain_model()
    calls: list[str] = []

    def broken(event: GuardEvent) -> None:
        calls.append(event.kind)
        raise ConnectionError("webhook down")

    guard = Guard(
        model, optimizer, clip=None, lr_guard=False, on_event=broken, log_every_n_steps=1, diagnose_every_n_steps=1
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps(guard, model, optimizer, 0, 8)
    hook_warnings = [w for w in caught if "on_event hook raised ConnectionError: webhook down" in str(w.message)]
    assert len(hook_warnings) == 1
    assert calls.count("verdict") == 2  # the hook kept being called after its first failure
    assert guard.engine.counters.steps == 8


def test_on_event_must_be_callable() -> None:
    with pytest.raises(TypeError, match="`on_event` must be a callable"):
        GradGuard(on_event="slack")  # type: ignore[arg-type]


def test_update_ratios_can_be_switched_off(tmp_path: Path) -> None:
    """Changed with the LR guard's stall channel: with ``log_update_ratios=False`` nothing is logged or judged,
    but the weight copies still serve that channel unless it is off (``stall_update_ratio=None``) too."""
    guard = GradGuard(log_update_ratios=False, log_every_n_steps=2, histogram_every_n_steps=0)
    trainer = make_trainer(tmp_path, [guard], max_steps=4)
    trainer.fit(TinyRegressor())
    tags = read_events(trainer.logger.log_dir).Tags()["scalars"]  # type: ignore[union-attr]
    assert "gradguard/loss" in tags and "gradguard/layer_norm_median" in tags
    assert not [t for t in tags if "update_ratio" in t or "weight_norm" in t]
    assert all(e.updates is not None and not e.log_updates and not e.update_ratios for e in guard._engines.values())
    quiet = GradGuard(log_update_ratios=False, lr_guard=LRGuard(stall_update_ratio=None), histogram_every_n_steps=0)
    make_trainer(tmp_path / "quiet", [quiet], max_steps=4).fit(TinyRegressor())
    assert all(e.updates is None for e in quiet._engines.values())
    with pytest.raises(TypeError, match="log_update_ratios"):
        GradGuard(log_update_ratios=1)  # type: ignore[arg-type]


def test_notices_for_loggers_without_histograms_reach_the_hook_once(tmp_path: Path) -> None:
    events: list[GuardEvent] = []
    guard = GradGuard(on_event=events.append, histogram_every_n_steps=1, heatmap_every_n_steps=2)
    trainer = make_trainer(tmp_path, [guard], max_steps=4, logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(TinyRegressor())
    notices = [e.message for e in events if e.kind == "notice"]
    assert notices == [
        "CSVLogger cannot take histograms or images; they are skipped for it (its scalars are logged as usual).",
        "no TensorBoardLogger attached; the dashboard layout and the text events are TensorBoard-only and are "
        "skipped (scalars go to every logger, histograms and the heatmap to those that take them, events also "
        "to the console and to `on_event`).",
    ]
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()  # type: ignore[union-attr]
    assert "gradguard/loss" in metrics and "gradguard/update_ratio/net.0" in metrics


def test_events_of_one_step_are_one_text_entry(tmp_path: Path) -> None:
    guard = GradGuard(on_nonfinite="skip", histogram_every_n_steps=0, log_every_n_steps=1, diagnose_every_n_steps=1)
    trainer = make_trainer(tmp_path, [guard], max_steps=4)
    trainer.fit(TinyRegressor(nan_at_steps=(1, 3)))
    texts = read_events(trainer.logger.log_dir).Tensors(f"{tag('events')}/text_summary")  # type: ignore[union-attr]
    entries = {e.step: e.tensor_proto.string_val[0].decode() for e in texts}
    assert [e.step for e in texts] == [1, 3]  # one entry per step; the last one written at the end of fit
    # the skip, the two layers' non-finite verdicts and the incident's story, together
    assert entries[1].startswith("**4 events**")
    assert "skipped optimizer step 1" in entries[1] and "'net.0'" in entries[1] and "'net.2'" in entries[1]
    assert "incident: skipped at step 1 (epoch 0, batch 1)" in entries[1]
    assert entries[3].startswith("**2 events**") and "skipped optimizer step 3" in entries[3]


def test_gradguard_and_gradmonitor_in_one_trainer_are_refused(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [GradGuard(), GradMonitor()], max_steps=2)
    with pytest.raises(GradGuardError, match=r"GradGuard\(clip='auto'\) and GradMonitor\(clip='None'\) in one Trainer"):
        trainer.fit(TinyRegressor())
    trainer = make_trainer(tmp_path, [GradGuard(), GradMonitor()], max_steps=2, logger=False)
    trainer.fit(TinyRegressor())  # nothing is written without loggers: two instances are fine (own states)


def test_warnings_point_at_the_users_line_not_at_gradguard_source(tmp_path: Path) -> None:
    from lightning_gradguard import Guard

    trainer = make_trainer(tmp_path, [GradGuard(histogram_every_n_steps=0, diagnose_every_n_steps=1)], max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegressor(nan_at_steps=(1,)))
        model = nn.Linear(2, 1)
        guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), histogram_every_n_steps=0)
        (model(torch.ones(1, 2)) * math.nan).sum().backward()
        guard.before_optimizer_step()
    ours = [w for w in caught if str(w.message).startswith("GradGuard:")]
    assert len(ours) >= 3  # the skip, the verdicts (fit) and the skip (plain loop)
    for w in ours:
        shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
        assert f"{os.sep}lightning_gradguard{os.sep}" not in shown, shown  # no file of the package
        assert w.filename == __file__, shown
