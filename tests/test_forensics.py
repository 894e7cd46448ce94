"""Incident records, leading layers, replay verdicts and the skip list, without a Trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard.forensics.incidents import Incident, IncidentRecorder, read_incidents
from lightning_gradguard.forensics.replay import replay
from lightning_gradguard.forensics.skiplist import SkipEntry, SkipList, SkipSamples

LAYERS = ("a", "b", "c")


def _feed(rec: IncidentRecorder, steps: int, sq: tuple[float, ...] = (1.0, 4.0, 0.25), start: int = 0) -> None:
    for step in range(start, start + steps):
        rec.observe(step, LAYERS, list(sq), math.sqrt(sum(sq)), 1.0, [0.1])


def _record(rec: IncidentRecorder, kind: str, step: int, sq_norms: list[float], **kwargs: Any) -> Incident:
    """``rec.record`` of optimizer 0 at ``step`` over ``LAYERS`` (unless ``layers`` is given), LR 0.1, loss 1.0
    and the global norm of ``sq_norms`` unless given."""
    finite = all(math.isfinite(v) for v in sq_norms)
    kwargs.setdefault("global_norm", math.sqrt(sum(sq_norms)) if finite else math.nan)
    kwargs.setdefault("loss", 1.0)
    kwargs.setdefault("layers", LAYERS)
    return rec.record(kind, step=step, global_step=step, optimizer=0, sq_norms=sq_norms, lrs=[0.1], **kwargs)


def test_spikes_are_relative_to_the_window_and_need_history() -> None:
    rec = IncidentRecorder(min_history=8)
    _feed(rec, 7)
    assert rec.spike(1000.0, 1.0) is None  # too little history to call anything a spike
    _feed(rec, 1, start=7)
    base = math.sqrt(5.25)
    assert rec.spike(9.0 * base, 1.0) is None
    assert rec.spike(11.0 * base, 1.0) == "norm_spike"
    assert rec.spike(base, 6.0) == "loss_spike"
    assert rec.spike(base, 4.0) is None
    assert rec.spike(math.nan, math.nan) is None  # non-finite steps are GradGuard's skips, not spikes


def test_spike_detection_is_scale_free() -> None:
    a, b = IncidentRecorder(min_history=8), IncidentRecorder(min_history=8)
    _feed(a, 20)
    _feed(b, 20, sq=(1e4, 4e4, 2.5e3))  # the same run with the loss x100
    base = math.sqrt(5.25)
    for factor in (5.0, 9.9, 10.1, 50.0):
        assert a.spike(factor * base, None) == b.spike(factor * base * 100, None)


def test_leading_layers_rank_by_jump_against_own_history(tmp_path: Path) -> None:
    rec = IncidentRecorder(min_history=4, top_k=2, path=tmp_path / "incidents.jsonl")
    _feed(rec, 10)
    # layer c jumps x40 (its own baseline 0.5), layer b x3; b is largest in absolute terms
    incident = _record(rec, "norm_spike", 10, [1.0, 36.0, 400.0], epoch=0, batch_idx=3)
    assert [x.name for x in incident.leading_layers] == ["c", "b"]
    assert incident.leading_layers[0].factor == pytest.approx(40.0)
    assert incident.leading_layers[1].factor == pytest.approx(3.0)
    assert incident.norm_baseline == pytest.approx(math.sqrt(5.25))
    back = read_incidents(tmp_path / "incidents.jsonl")
    assert back == [incident]


def test_nonfinite_layers_lead_and_round_trip_through_json(tmp_path: Path) -> None:
    rec = IncidentRecorder(min_history=4, path=tmp_path / "i.jsonl", batch_ids=lambda batch: batch["id"])
    _feed(rec, 5)
    incident = _record(
        rec,
        "skipped",
        5,
        [100.0, math.nan, 0.25],
        loss=math.nan,
        batch={"id": torch.tensor([7, 11])},
        message="skipped optimizer step 5",
    )
    assert incident.leader == "b" and math.isinf(incident.leading_layers[0].factor)
    assert [x.name for x in incident.leading_layers] == ["b", "a"]
    assert incident.sample_ids == (7, 11)
    line = json.loads((tmp_path / "i.jsonl").read_text())
    assert line["global_norm"] == "nan" and line["sample_ids"] == [7, 11]
    back = read_incidents(tmp_path / "i.jsonl")[0]
    assert math.isnan(back.global_norm) and back.sample_ids == (7, 11) and back.leader == "b"
    assert "samples [7, 11]" in back.summary()


def test_a_corrupt_incident_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "incidents.jsonl"
    path.write_text('{"kind": "skipped"}\nnot json\n')
    with pytest.raises(ValueError, match=r"incidents.jsonl:1: not an incident record"):
        read_incidents(path)


def test_bad_recorder_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="norm_spike"):
        IncidentRecorder(norm_spike=1.0)
    with pytest.raises(ValueError, match="min_history"):
        IncidentRecorder(window=8, min_history=16)
    with pytest.raises(TypeError, match="batch_ids"):
        IncidentRecorder(batch_ids=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        Incident("boom", 0, 0, 0, None, None, None, 1.0, 1.0, None, 1.0, (), (), None, ())


def _model_and_measure() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def measure() -> float:
        sq = sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None)
        return math.sqrt(sq)

    return model, measure


def test_replay_calls_a_poisoned_batch_reproducible_and_restores_the_gradients() -> None:
    model, measure = _model_and_measure()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    x[3, 1] = math.nan  # a poisoned sample

    def closure() -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    closure()
    before = [p.grad.clone() for p in model.parameters()]
    result = replay(list(model.parameters()), closure, measure, norm=math.nan, loss=math.nan, kind="skipped")
    assert result.verdict == "reproducible" and math.isnan(result.norm)
    for p, g in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, g) or (torch.isnan(p.grad) == torch.isnan(g)).all()


def test_replay_calls_a_one_off_corruption_transient() -> None:
    model, measure = _model_and_measure()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    corrupt = {"left": 1}

    def flip(grad: torch.Tensor) -> torch.Tensor:
        if corrupt["left"]:
            corrupt["left"] -= 1
            return grad * 1e6  # a one-off fault in this backward only
        return grad

    model[0].weight.register_hook(flip)

    def closure() -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    closure()
    spiked = measure()
    corrupted = model[0].weight.grad.clone()
    result = replay(list(model.parameters()), closure, measure, norm=spiked, loss=None)
    assert result.verdict == "transient" and result.norm < spiked / 100
    assert torch.equal(model[0].weight.grad, corrupted)  # the decision applies to what it was taken on
    assert result.seconds >= 0.0 and set(result.evidence()) >= {"replay_norm", "replay_seconds"}


def test_skip_list_persists_and_is_honoured_by_samples_and_by_batch(tmp_path: Path) -> None:
    path = tmp_path / "skip_list.json"
    skip = SkipList(path)
    assert skip.add(SkipEntry(epoch=0, batch_idx=4, sample_ids=(5, 9), reason="skipped, reproducible", step=4))
    assert not skip.add(SkipEntry(epoch=0, batch_idx=4, sample_ids=(5, 9)))  # listed once
    resumed = SkipList(path)
    assert len(resumed) == 1 and resumed.skips(0, 4) and not resumed.skips(1, 4) and not resumed.skips(0, 5)
    data = list(range(20))
    kept = SkipSamples(data, resumed)
    assert len(kept) == 18 and kept.skipped == 2 and 5 not in list(kept) and 9 not in list(kept)


def test_a_corrupt_skip_list_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "skip_list.json"
    path.write_text("[1, 2")
    with pytest.raises(ValueError, match="not a GradGuard skip list"):
        SkipList(path)
    assert path.read_text() == "[1, 2"


def test_the_window_travels_with_the_record_and_draws_a_post_mortem(tmp_path: Path) -> None:
    import matplotlib.image

    from lightning_gradguard.forensics.postmortem import describe, render_postmortem

    rec = IncidentRecorder(window=8, min_history=4, path=tmp_path / "incidents.jsonl")
    _feed(rec, 12)
    incident = _record(
        rec, "norm_spike", 12, [1.0, 4.0, 400.0], epoch=1, batch_idx=2, message="LR guard: step 12: LR scale 1 -> 0.5"
    )
    assert incident.window_steps == (4, 5, 6, 7, 8, 9, 10, 11, 12)  # the 8 steps before, then its own
    assert incident.window_layers == LAYERS
    assert incident.window_layer_norms[2][-1] == pytest.approx(20.0)
    assert incident.window_layer_norms[2][0] == pytest.approx(0.5)
    back = read_incidents(tmp_path / "incidents.jsonl")[0]
    assert back.window_layer_norms == incident.window_layer_norms
    lines = describe(back)
    assert "led by c x40" in lines[0] and "(epoch 1, batch 2)" in lines[0] and "LR scale 1 -> 0.5" in lines[-1]
    png = render_postmortem(back, tmp_path / "pm.png")
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[1] == 1000 and pixels.shape[0] > 400
    assert len({tuple(p) for p in pixels[::10, ::10].reshape(-1, pixels.shape[-1]).tolist()}) > 20  # drawn, not blank


def test_report_tells_the_story_of_each_incident_and_draws_its_post_mortem(tmp_path: Path, capsys: Any) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from lightning_gradguard.outputs.report import main

    run = tmp_path / "run"
    writer = SummaryWriter(str(run))
    for step in range(0, 40, 10):
        writer.add_scalar("gradguard/global_norm", 1.0 + step / 100, step)
    writer.close()
    rec = IncidentRecorder(window=16, min_history=4, path=run / "incidents.jsonl")
    _feed(rec, 20)
    _record(
        rec,
        "skipped",
        20,
        [1.0, math.inf, 0.25],
        global_norm=math.inf,
        loss=math.nan,
        epoch=0,
        batch_idx=20,
        message="skipped optimizer step 20: non-finite gradients",
    )
    assert main(["report", str(run)]) == 0
    text = capsys.readouterr().out
    assert "incidents       1" in text and "skipped at step 20 (epoch 0, batch 20)" in text and "led by b xinf" in text
    assert main(["report", str(run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (incident,) = doc["runs"][0]["incidents"]
    assert incident["batch_idx"] == 20 and incident["leading_layers"][0]["name"] == "b"
    assert main(["report", str(run), "--postmortem", str(tmp_path / "pm")]) == 0
    (png,) = sorted((tmp_path / "pm").glob("*.png"))
    assert png.name.endswith("step20.skipped.png") and png.stat().st_size > 10_000
    (run / "incidents.jsonl").write_text("garbage\n")
    assert main(["report", str(run)]) == 2
    assert "incidents.jsonl:1: not an incident record" in capsys.readouterr().err


def test_an_incident_at_a_regrouping_has_no_per_layer_history() -> None:
    rec = IncidentRecorder(min_history=4)
    _feed(rec, 6)
    wider = (*LAYERS, "d")  # a layer unfrozen at this step
    incident = _record(rec, "skipped", 6, [1.0, 4.0, 0.25, math.nan], layers=wider, loss=None)
    assert incident.window_layers == wider and len(incident.window_layer_norms) == 4
    assert all(math.isnan(v) for row in incident.window_layer_norms for v in row[:-1])  # no history of the new layout
    assert incident.leader == "d"  # the non-finite layer leads
