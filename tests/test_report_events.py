"""``gradguard report`` reads events from their JSON records, and event files with text events only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard import Guard, LRGuard, RollbackTrigger
from lightning_gradguard.events import GuardEvent
from lightning_gradguard.keys import tag
from lightning_gradguard.outputs.alerts import event_json
from lightning_gradguard.outputs.report import ReportError, build_report, read_run
from lightning_gradguard.outputs.tensorboard import EventLog

LR_CUT = GuardEvent(
    "lr_reduction",
    40,
    "LR guard: step 40: LR scale 0.7 -> 0.49 (reduction 2). Norm 3, threshold 2.",
    evidence={"lr_scale_before": 0.7, "lr_scale": 0.7 * 0.7, "reason": "rise"},
)
ROLLBACK = GuardEvent(
    "rollback",
    40,
    "rollback 1/3: step 40: non-finite gradients on 3 consecutive steps: rolling back to the last good "
    "snapshot; restored step 36 (4 step(s) lost), LR scale 1 -> 0.5, step 40 skipped",
    evidence={"trigger": "nonfinite_grad", "restored_to": 36, "steps_lost": 4, "lr_scale": 0.5},
)
DECLINED = GuardEvent(
    "rollback",
    50,
    "no rollback at step 50: non-finite gradients on 3 consecutive steps (nonfinite_grad), but max_rollbacks=3 "
    "spent; training continues with skipping and clipping",
    evidence={"trigger": "nonfinite_grad", "rollbacks_total": 3},
)
SKIP = GuardEvent("skipped", 7, "skipped optimizer step 7: non-finite gradients in fc1", ("fc1",))


def _write(run: Path, events: list[GuardEvent], text: bool = True, records: bool = True) -> None:
    """Events the way the sink writes them (one entry per tag and step), beside a scalar."""
    log = EventLog()
    with SummaryWriter(str(run)) as writer:
        writer.add_scalar(tag("global_norm"), 1.0, 0)
        for event in events:
            if text:
                log.add(tag("events"), event.step, event.message, writer)
            if records:
                log.add(tag("event_records"), event.step, event_json(event), writer)
        log.flush(writer)


def _section(run: Path) -> dict:
    (section,) = build_report(run)
    return section


def test_events_come_from_the_records(tmp_path: Path) -> None:
    _write(tmp_path, [SKIP, LR_CUT, ROLLBACK, DECLINED], text=False)  # records alone are enough
    section = _section(tmp_path)
    assert [(e["step"], e["text"]) for e in section["events"]] == [
        (e.step, e.message) for e in (SKIP, LR_CUT, ROLLBACK, DECLINED)
    ]
    # no lr_scale scalar: the reductions come from the events' evidence, at full precision
    assert section["lr_reductions"] == [{"step": 40, "from": 0.7, "to": 0.7 * 0.7, "source": "events"}]
    assert [e["text"] for e in section["lr_events"]] == [LR_CUT.message]
    assert section["rollbacks"] == {
        "total": 1,
        "steps_lost": 4,
        "rollbacks": [{"step": 40, "restored_to": 36, "steps_lost": 4}],
    }


def test_text_only_event_files_read_the_same(tmp_path: Path) -> None:
    events = [SKIP, LR_CUT, ROLLBACK, DECLINED]
    _write(tmp_path / "records", events)
    _write(tmp_path / "text", events, records=False)
    new, old = _section(tmp_path / "records"), _section(tmp_path / "text")
    for key in ("events", "lr_events", "rollbacks"):
        assert new[key] == old[key]
    assert old["lr_reductions"] == [{"step": 40, "from": 0.7, "to": 0.49, "source": "events"}]  # as printed


def test_steps_without_records_fall_back_to_their_text(tmp_path: Path) -> None:
    log = EventLog()
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar(tag("global_norm"), 1.0, 0)
        log.add(tag("events"), SKIP.step, SKIP.message, writer)  # an older version's step: text only
        for event in (LR_CUT, ROLLBACK):
            log.add(tag("events"), event.step, event.message, writer)
            log.add(tag("event_records"), event.step, event_json(event), writer)
        log.flush(writer)
    section = _section(tmp_path)
    assert [e["text"] for e in section["events"]] == [SKIP.message, LR_CUT.message, ROLLBACK.message]
    assert section["rollbacks"]["rollbacks"] == [{"step": 40, "restored_to": 36, "steps_lost": 4}]


def test_a_corrupt_record_is_a_report_error(tmp_path: Path) -> None:
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar(tag("global_norm"), 1.0, 0)
        writer.add_text(tag("event_records"), '{"kind": "skipped", "step": 3', 3)
    with pytest.raises(ReportError, match="corrupt event record at step 3"):
        build_report(tmp_path)


def test_a_guarded_run_writes_the_records_the_report_reads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = SummaryWriter(str(tmp_path))
    seen: list[GuardEvent] = []
    guard = Guard(
        model,
        optimizer,
        max_norm=10.0,
        clip="fixed",
        lr_guard=LRGuard(patience=1000),
        rollback=RollbackTrigger(nonfinite_steps=3),
        snapshot_every_n_steps=4,
        log_every_n_steps=5,
        writer=writer,
        on_event=seen.append,
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 16, 4, generator=g), torch.randn(24, 16, 1, generator=g)
    for step in range(24):
        loss = nn.functional.mse_loss(model(x[step]), y[step])
        if 14 <= step < 17:
            loss = loss * math.nan
        loss.backward()
        guard.before_optimizer_step(loss)
        optimizer.step()
        optimizer.zero_grad()
    guard.close()
    writer.close()
    assert tag("event_records") in read_run(tmp_path).texts
    section = _section(tmp_path)
    (rollback,) = [e for e in seen if e.kind == "rollback"]
    assert section["rollbacks"]["rollbacks"] == [
        {"step": rollback.step, "restored_to": rollback.evidence["restored_to"], "steps_lost": 4}
    ]
    written = [e.message for e in seen if e.kind not in ("notice", "summary")]  # step events only
    assert [e["text"] for e in section["events"]] == written
