"""Rollbacks on every rank at once: 2-rank DDP and 2-rank FSDP2 (``ModelParallelStrategy``), CPU, gloo.

Rank 1 alone has one weight turned into NaN (a simulated hardware fault). The decision to roll back is
taken from GradGuard's reduced statistics vector, so both ranks roll back at the same step, each from
its own snapshot (DDP: its replica; FSDP2: its shards), and end with identical, finite weights. When
the fault keeps coming back, recovery runs out of rollbacks and both ranks stop with RecoveryError:
every launch is bounded by a timeout, so a hang fails the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from .distributed_workers import recovery_worker as rw
from .distributed_workers.worker import DIM, Net, fit
from .test_distributed import WORKER, _env, _free_port, _launch_once

pytestmark = pytest.mark.slow

RECOVERY_WORKER = Path(rw.__file__).resolve()


def _run(set_name: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    import tests.test_distributed as td

    monkeypatch.setattr(td, "WORKER", RECOVERY_WORKER)  # the shared launcher, pointed at this worker
    try:
        return _launch_once([([set_name, str(out)], _env(MASTER_PORT=str(_free_port())))])
    finally:
        monkeypatch.setattr(td, "WORKER", WORKER)


def _load(out: Path, name: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)]


def _check_one_rollback_identical_on_both_ranks(ranks: list[dict[str, Any]]) -> None:
    histories = [r["guard_state"]["recovery"]["history"] for r in ranks]
    assert histories[0] == histories[1]
    ((step, trigger, restored_to),) = histories[0]
    assert trigger == "nonfinite_grad" and step == rw.FAULT_STEP + 2 and restored_to == rw.FAULT_STEP - 2
    for rank in ranks:
        skipped = [s["skipped"] for s in rank["steps"]]
        assert skipped == [rw.FAULT_STEP <= i <= rw.FAULT_STEP + 2 for i in range(rw.STEPS)]
        assert rank["steps"][-1]["lr_scale"] == 1.0  # a non-finite fault is restored without an LR cut
    for key, value in ranks[0]["weights"].items():
        assert bool(value.isfinite().all()), key
        assert torch.equal(value, ranks[1]["weights"][key]), key


def test_ddp_rollback_on_one_rank_fault_and_exhaustion_on_every_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [(rc, log)] = _run("ddp", tmp_path, monkeypatch)
    assert rc == 4, f"the last scenario must stop with RecoveryError (exit 4), got {rc}:\n{log[-4000:]}"
    _check_one_rollback_identical_on_both_ranks(_load(tmp_path, "ddp_rollback"))
    messages = [json.loads((tmp_path / f"ddp_exhausted_raised_rank{r}.json").read_text())["message"] for r in (0, 1)]
    assert messages[0] == messages[1]
    # both slots restored in turn, each followed by the fault again: the skip streak then stops the run
    assert "after 2 rollback(s) (max_rollbacks=3, 1 counted)" in messages[0]
    assert "25 consecutive" in messages[0]
    for i in (1, 2):
        assert f"rollback {i}: at step" in messages[0]
    assert "What to try" in messages[0]


def test_fsdp2_rollback_restores_each_ranks_shards_like_a_single_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [(rc, log)] = _run("fsdp2", tmp_path, monkeypatch)
    assert rc == 0, log[-4000:]
    ranks = _load(tmp_path, "fsdp2_rollback")
    _check_one_rollback_identical_on_both_ranks(ranks)
    assert ranks[0]["steps"][0]["grad_type"] == "DTensor"
    # The same fault in one process: rank 1's shard of the first weight holds its second half of the rows.
    fault = rw.CorruptWeight(0, (rw.FAULT_STEP,), index=(Net().net[0].weight.shape[0] // 2) * DIM)
    fit(tmp_path, "reference", Net(split=False), rw.recovery_guard(), rw.STEPS, before=[fault])
    (reference,) = [torch.load(tmp_path / "reference_rank0.pt", weights_only=True)]
    assert reference["guard_state"]["recovery"]["history"] == ranks[0]["guard_state"]["recovery"]["history"]
    for key, value in reference["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][key], value, rtol=1e-5, atol=1e-6)
