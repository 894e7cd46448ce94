"""The plain ``Guard`` under DDP and FSDP2 (two CPU processes over gloo): identical decisions on every rank.

One launch runs both loops (see ``tests/distributed_workers/plain_worker.py``). Rank 1 alone poisons its
loss at one step: both ranks must skip that step. The decisions must be bit-identical across ranks, and
the norms those of a single process training on the whole batch (up to float rounding).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
import torch

from .distributed_workers import plain_worker

pytestmark = pytest.mark.slow
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    out = tmp_path_factory.mktemp("plain_dist")
    port = str(_free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    procs = [
        subprocess.Popen(
            [sys.executable, plain_worker.__file__, str(out)],
            env={
                **base,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in (0, 1)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the two-process Guard run did not finish in time (hang?)")
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    names = ("ddp", "fsdp2", "ddp_noise", "fsdp2_noise")
    loaded: dict[str, list[Any]] = {
        name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)] for name in names
    }
    loaded["_out"] = [out]
    return loaded


def _reference() -> dict[str, Any]:
    model = plain_worker.make_model()
    return plain_worker.run_loop(model, model, rank=0, world=1)


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_ranks_decide_identically_and_skip_together(runs: dict[str, list[dict[str, Any]]], name: str) -> None:
    rank0, rank1 = runs[name]
    assert repr(rank0["records"]) == repr(rank1["records"])  # bit for bit (repr: a float's shortest round-trip)
    skipped = [step for step, r in enumerate(rank0["records"]) if r[4]]
    assert skipped == [plain_worker.POISONED]  # rank 1 alone was poisoned; both skipped
    assert any(r[3] for r in rank0["records"]) and rank0["records"][-1][5] < 1.0  # clipped; LR lowered
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]) and torch.isfinite(value).all()


def test_norms_match_a_single_process_on_the_whole_batch(runs: dict[str, list[dict[str, Any]]]) -> None:
    """Up to the poisoned step the runs see the same gradients as one process on the whole batch."""
    reference = _reference()["records"]
    for name in ("ddp", "fsdp2"):
        records = runs[name][0]["records"]
        for ours, ref in zip(records[: plain_worker.POISONED], reference, strict=False):
            assert math.isclose(ours[0], ref[0], rel_tol=1e-5), (name, ours, ref)
            assert ours[3:5] == ref[3:5]  # clipped, skipped


@pytest.mark.parametrize("name", ["ddp_noise", "fsdp2_noise"])
def test_the_stall_channel_cuts_at_the_same_step_on_every_rank(
    runs: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The update ratio comes from replicated weights (DDP) or SUM-reduced shard norms (FSDP2): every rank
    measures the same ratio and cuts the LR at the same step as one process training on the whole batch."""
    rank0, rank1 = runs[name]
    # the decisions (norm, clipped, LR scale at every step) bit for bit; events reach on_event on rank 0 only
    assert repr(rank0["records"]) == repr(rank1["records"]) and rank1["cuts"] == []
    model = plain_worker.make_noise_model()
    reference = plain_worker.run_noise(model, model, rank=0, world=1)
    assert rank0["cuts"] and all(reason == "stall" for _, reason, _ in rank0["cuts"])
    assert [c[0] for c in rank0["cuts"]] == [c[0] for c in reference["cuts"]]
    for ours, ref in zip(rank0["cuts"], reference["cuts"], strict=True):
        assert math.isclose(ours[2], ref[2], rel_tol=1e-4)  # the same update ratio (up to float rounding)
    assert rank0["records"][-1][2] == reference["records"][-1][2] < 1.0


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_incidents_are_identical_on_every_rank_and_written_once(
    runs: dict[str, list[dict[str, Any]]], name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Rank 1's poisoned loss is one incident on both ranks: the same step, batch, leader and replay verdict
    (the replay re-runs the unpoisoned batch share on every rank: transient); rank zero alone writes it."""
    rank0, rank1 = runs[name]
    assert repr(rank0["incidents"]) == repr(rank1["incidents"])  # bit for bit (a NaN norm included)
    skipped = [i for i in rank0["incidents"] if i[0] == "skipped"]
    assert [(i[1], i[2], i[3]) for i in skipped] == [(plain_worker.POISONED, plain_worker.POISONED, "transient")]
    if name == "ddp":
        (logs,) = {p.parent for p in runs["_out"][0].glob("ddp_logs/incidents.jsonl")}  # type: ignore[union-attr]
        from lightning_gradguard.forensics.incidents import read_incidents

        written = read_incidents(logs / "incidents.jsonl")
        assert [(i.kind, i.step, i.replay) for i in written] == [(k, s, r) for k, s, _, r, _, _ in rank0["incidents"]]
        assert not list(runs["_out"][0].glob("**/incidents.jsonl"))[1:]  # one file: rank zero's
