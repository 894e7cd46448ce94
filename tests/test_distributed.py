"""Identical decisions on every rank: DDP, sharded (FSDP2 ``fully_shard``) and multi-node, on CPU over gloo.

The multi-process runs are launched once per module (three launches: Lightning's ``ddp`` launcher with
``devices=2``, ``ModelParallelStrategy`` with ``fully_shard`` and ``devices=2``, and two "nodes" started
by hand with ``num_nodes=2``); every launch runs several short fits in the same processes (see
``tests/distributed_workers/worker.py``), each rank writing what its GradGuard decided at every step.
The tests compare those files with each other and with single-process runs made here.

Every launch is bounded by a timeout and killed (whole process group) when it runs past it, so a hang
fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from .distributed_workers import worker
from .distributed_workers.worker import Net

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(worker.__file__).resolve()
LAUNCH_TIMEOUT_S = 240
_DIST_ENV = ("LOCAL_RANK", "RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


_EXIT_ABORT = "terminate called without an active exception"


def _launch(args_envs: list[tuple[list[str], dict[str, str]]]) -> list[tuple[int, str]]:
    """Run the worker processes; once more, on a fresh port, if a process aborted while exiting.

    gloo's C++ threads occasionally abort a process during interpreter shutdown, after the run itself
    has finished (rc -6, "terminate called without an active exception"): a teardown artefact of
    the launcher, not a decision GradGuard took. Such a launch is repeated once; anything else,
    including a second abort or a hang, fails the test.
    """
    results = _launch_once(args_envs)
    if any(rc < 0 and _EXIT_ABORT in log for rc, log in results):
        port = str(_free_port())
        results = _launch_once([(args, {**env, "MASTER_PORT": port}) for args, env in args_envs])
    return results


def _launch_once(args_envs: list[tuple[list[str], dict[str, str]]]) -> list[tuple[int, str]]:
    """Start the given worker processes, each in its own session; kill them all if they run past the timeout."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for args, env in args_envs
    ]
    results: list[tuple[int, str]] = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
            results.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        tails = []
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)  # the process and the ranks it started
            tails.append(proc.communicate()[0][-3000:])
        pytest.fail(f"distributed run did not finish within {LAUNCH_TIMEOUT_S}s (hang?):\n" + "\n".join(tails))
    return results


def _load(out: Path, name: str) -> list[dict[str, Any]]:
    files = [out / f"{name}_rank{r}.pt" for r in (0, 1)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"missing outputs {missing}"
    return [torch.load(f, weights_only=True) for f in files]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    [(rc, log)] = _launch([(["ddp", str(out)], _env(MASTER_PORT=str(_free_port())))])
    assert rc == 3, f"the last scenario must stop with NonFiniteGradientsError (exit 3), got {rc}:\n{log[-4000:]}"
    return out


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    [(rc, log)] = _launch([(["sharded", str(out)], _env(MASTER_PORT=str(_free_port())))])
    assert rc == 0, log[-4000:]
    return out


@pytest.fixture(scope="module")
def multinode_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    out = tmp_path_factory.mktemp("multinode")
    port = str(_free_port())
    runs = _launch(
        [
            (["multinode", str(out)], _env(MASTER_PORT=port, NODE_RANK=str(node), LOCAL_RANK="0", WORLD_SIZE="2"))
            for node in (0, 1)
        ]
    )
    for rc, log in runs:
        assert rc == 3, f"each node must stop with NonFiniteGradientsError (exit 3), got {rc}:\n{log[-4000:]}"
    return out, [rc for rc, _ in runs]


def _decisions(record: dict[str, Any]) -> list[tuple[Any, ...]]:
    keys = ("step", "threshold", "clipped", "skipped", "lr_scale", "global_norm", "sq_norms", "collectives")
    return [tuple(step[k] for k in keys) for step in record["steps"]]


def _same(a: float | None, b: float | None) -> bool:
    """Equal, NaN included (the decision inputs must be bit-identical, not merely close)."""
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def _deep_same(a: Any, b: Any) -> bool:
    """Structural equality where NaN equals NaN (a state holding a skipped step's NaN norm)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_deep_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_deep_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(
            torch.equal(a, b) or (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))
        )
    if isinstance(a, float) and isinstance(b, float):
        return _same(a, b)
    return type(a) is type(b) and bool(a == b)


def _assert_identical_ranks(r0: dict[str, Any], r1: dict[str, Any]) -> None:
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world_size"] == r1["world_size"] == 2
    assert len(r0["steps"]) == len(r1["steps"]) > 0
    for s0, s1 in zip(r0["steps"], r1["steps"], strict=True):
        for key in ("step", "clipped", "skipped", "lr_scale", "clipped_total", "skipped_total", "collectives"):
            assert s0[key] == s1[key], (key, s0, s1)
        for key in ("threshold", "global_norm", "post_clip_norm"):
            assert _same(s0[key], s1[key]), (key, s0, s1)
        assert all(_same(a, b) for a, b in zip(s0["sq_norms"], s1["sq_norms"], strict=True)), (s0, s1)
    assert _deep_same(r0["guard_state"], r1["guard_state"])
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key


def _skipped(record: dict[str, Any]) -> list[int]:
    return [s["step"] for s in record["steps"] if s["skipped"]]


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_ranks_take_identical_decisions_with_one_collective_per_step(ddp_run: Path) -> None:
    r0, r1 = _load(ddp_run, "decisions")
    _assert_identical_ranks(r0, r1)
    steps = r0["steps"]
    # The run exercises every decision: thresholds after the 3 warmup steps, clips, an LR reduction.
    assert [s["threshold"] is None for s in steps] == [True] * 3 + [False] * (len(steps) - 3)
    assert sum(s["clipped"] for s in steps) >= 2
    assert steps[-1]["lr_scale"] < 1.0
    # One collective per optimizer step, histogram steps (0, 4, 8) included: replicated layers need no
    # histogram reduction.
    assert [s["collectives"] for s in steps] == [1] * len(steps)
    assert all(s["grad_type"] == "Tensor" and s["sharded_layers"] == [False, False] for s in steps)


def test_nan_on_one_rank_only_is_skipped_on_every_rank(ddp_run: Path) -> None:
    # A NaN put into rank 1's gradients AFTER DDP's all-reduce (rank 0's gradients stay finite).
    r0, r1 = _load(ddp_run, "nan_after_allreduce")
    _assert_identical_ranks(r0, r1)
    assert _skipped(r0) == _skipped(r1) == [3]
    assert [s["step"] for s in r0["steps"]] == list(range(8))  # training went on after the skip
    # Control, same fault with GradGuard's reduction switched off: the ranks disagree and diverge.
    c0, c1 = _load(ddp_run, "control_no_reduction")
    assert (_skipped(c0), _skipped(c1)) == ([], [3])
    assert not all(torch.equal(v, c1["weights"][k]) for k, v in c0["weights"].items())
    # A NaN loss on rank 1 only: DDP's all-reduce spreads it, both ranks skip the same step.
    n0, n1 = _load(ddp_run, "nan_loss_one_rank")
    _assert_identical_ranks(n0, n1)
    assert _skipped(n0) == _skipped(n1) == [2]


def test_incidents_and_replay_verdicts_are_identical_on_every_rank(ddp_run: Path) -> None:
    """Every rank replays the incident's batch together (the replay's backward is DDP's all-reduce): the NaN
    put into rank 1's gradients after the all-reduce does not come back (transient); the NaN loss of rank 1 at
    step 2 does (its training step makes it again: reproducible). The records agree rank for rank."""
    r0, r1 = _load(ddp_run, "nan_after_allreduce")
    assert repr(r0["incidents"]) == repr(r1["incidents"])
    assert [(k, s, b, v) for k, s, b, v, _ in r0["incidents"] if k == "skipped"] == [("skipped", 3, 3, "transient")]
    n0, n1 = _load(ddp_run, "nan_loss_one_rank")
    assert repr(n0["incidents"]) == repr(n1["incidents"])
    assert [(k, s, b, v) for k, s, b, v, _ in n0["incidents"] if k == "skipped"] == [("skipped", 2, 2, "reproducible")]


def test_raise_on_one_rank_raises_on_every_rank_and_the_job_exits(ddp_run: Path) -> None:
    # ddp_run asserted the launch exited (code 3) within the timeout; both ranks wrote their marker.
    for rank in (0, 1):
        marker = json.loads((ddp_run / f"raise_raised_rank{rank}.json").read_text())
        assert marker["rank"] == rank
        assert "non-finite gradients at optimizer step 2" in marker["message"]


@pytest.fixture(scope="module")
def single_full_batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process, full batch (16 = 2 x 8), the guard of the 2-rank equivalence run; collectives counted."""
    out = tmp_path_factory.mktemp("single")
    undo = worker.count_collectives()
    try:
        worker.fit(out, "equivalence", Net(batch_size=16), worker.equivalence_guard(), 10)
    finally:
        undo()
    record: dict[str, Any] = torch.load(out / "equivalence_rank0.pt", weights_only=True)
    return record


def test_single_process_run_makes_no_collective(single_full_batch: dict[str, Any]) -> None:
    assert single_full_batch["world_size"] == 1
    assert [s["collectives"] for s in single_full_batch["steps"]] == [0] * 10


def test_two_ranks_on_half_batches_decide_as_one_process_on_the_full_batch(
    ddp_run: Path, single_full_batch: dict[str, Any]
) -> None:
    r0, r1 = _load(ddp_run, "equivalence")
    _assert_identical_ranks(r0, r1)
    one = single_full_batch["steps"]
    two = r0["steps"]
    assert len(one) == len(two) == 10
    # DDP averages the two half-batch mean gradients = the full-batch mean gradient, up to float32 rounding.
    for a, b in zip(one, two, strict=True):
        assert b["global_norm"] == pytest.approx(a["global_norm"], rel=1e-5)
        assert b["sq_norms"] == pytest.approx(a["sq_norms"], rel=1e-5)
        assert (b["threshold"] is None) == (a["threshold"] is None)
        if a["threshold"] is not None:
            assert b["threshold"] == pytest.approx(a["threshold"], rel=1e-5)
            # Where it must match exactly: the discrete decisions. They are robust here because no norm is
            # within rounding distance of its threshold.
            assert abs(a["global_norm"] / a["threshold"] - 1) > 1e-4
        assert (b["clipped"], b["skipped"], b["lr_scale"]) == (a["clipped"], a["skipped"], a["lr_scale"])
    assert sum(s["clipped"] for s in one) >= 1 and one[-1]["lr_scale"] < 1.0  # decisions were exercised
    for key, value in single_full_batch["weights"].items():
        torch.testing.assert_close(r0["weights"][key], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- sharded (FSDP2)
@pytest.fixture(scope="module")
def single_unsharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("unsharded")
    worker.fit(out, "sharded", Net(split=False), worker.sharded_guard(), worker.SHARDED_STEPS)
    record: dict[str, Any] = torch.load(out / "sharded_rank0.pt", weights_only=True)
    return record


@pytest.mark.parametrize("name", ["sharded", "hsdp"])
def test_sharded_norms_and_clipping_match_one_process(
    sharded_run: Path, single_unsharded: dict[str, Any], name: str
) -> None:
    # "sharded": fully_shard over 2 ranks (Shard(0)). "hsdp": fully_shard over the 2-D (2 x 1) mesh, each
    # shard held by both ranks ((Replicate(), Shard(0))): each copy must count once in the SUM.
    r0, r1 = _load(sharded_run, name)
    _assert_identical_ranks(r0, r1)
    one = single_unsharded["steps"]
    two = r0["steps"]
    assert len(one) == len(two) == worker.SHARDED_STEPS
    for a, b in zip(one, two, strict=True):
        # The hook saw DTensor gradients: each rank held only its shard (net.2 has one output row, so
        # rank 1's shard of it is empty), and the reduced vector holds the norms of the full gradients.
        assert b["grad_type"] == "DTensor" and b["sharded_layers"] == [True, True]
        assert b["layers"] == a["layers"] == ["net.0", "net.2"]
        assert b["sq_norms"] == pytest.approx(a["sq_norms"], rel=1e-5)
        assert b["global_norm"] == pytest.approx(a["global_norm"], rel=1e-5)
        assert abs(a["global_norm"] / worker.SHARDED_MAX_NORM - 1) > 1e-4
        assert b["clipped"] == a["clipped"]
        assert b["post_clip_norm"] == pytest.approx(a["post_clip_norm"], rel=1e-5)
        # update-to-weight ratios: the shards' squared norms SUM-reduced, as the full weights give them
        assert set(b["update_ratios"]) == set(a["update_ratios"]) == {"net.0", "net.2"}
        for layer, ratio in a["update_ratios"].items():
            assert b["update_ratios"][layer] == pytest.approx(ratio, abs=1e-4)
    assert 0 < sum(s["clipped"] for s in one) < len(one)  # some steps clipped, some not
    # One collective per step; histogram steps (0, 3, 6) add the two histogram reductions (ranges, counts).
    assert [s["collectives"] for s in two] == [3 if s["step"] % 3 == 0 else 1 for s in two]
    for key, value in single_unsharded["weights"].items():
        torch.testing.assert_close(r0["weights"][key], value, rtol=1e-5, atol=1e-6)


def test_nan_in_one_shard_is_skipped_on_every_rank(sharded_run: Path) -> None:
    r0, r1 = _load(sharded_run, "sharded_nan")
    _assert_identical_ranks(r0, r1)
    assert _skipped(r0) == _skipped(r1) == [2]
    assert r0["steps"][2]["sq_norms"][0] != r0["steps"][2]["sq_norms"][0]  # NaN in net.0, the poisoned layer
    assert math.isfinite(r0["steps"][2]["sq_norms"][1])


# ------------------------------------------------------------------------------------------- multi-node
def test_two_nodes_take_identical_decisions(multinode_run: tuple[Path, list[int]]) -> None:
    out, _ = multinode_run
    r0, r1 = _load(out, "mn_decisions")
    _assert_identical_ranks(r0, r1)
    assert r0["num_nodes"] == r1["num_nodes"] == 2
    assert sum(s["clipped"] for s in r0["steps"]) >= 2 and r0["steps"][-1]["lr_scale"] < 1.0
    assert [s["collectives"] for s in r0["steps"]] == [1] * len(r0["steps"])
    n0, n1 = _load(out, "mn_nan_after_allreduce")
    _assert_identical_ranks(n0, n1)
    assert _skipped(n0) == _skipped(n1) == [4]
    for rank in (0, 1):
        marker = json.loads((out / f"mn_raise_raised_rank{rank}.json").read_text())
        assert "non-finite gradients at optimizer step 2" in marker["message"]


# ------------------------------------------------------------------------------ pure helpers (no processes)
def test_replicated_rows_are_divided_back_and_sharded_rows_are_not() -> None:
    from lightning_gradguard.measure.distributed import _replicated_divisor, reduce_histograms, reduce_stats

    # layers: sharded, replicated, sharded; then one extra entry (treated as replicated)
    divisor = _replicated_divisor(torch.zeros(4, 3, dtype=torch.float64), [True, False, True], 2)
    assert divisor is not None and divisor.tolist() == [1.0, 2.0, 1.0, 2.0]
    assert _replicated_divisor(torch.zeros(2), [True, True], 4) is None
    # Single process: the input comes back untouched (same object), no collective is attempted.
    vector = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    assert reduce_stats(vector, [False, False]) is vector
    assert reduce_histograms(vector) is vector and reduce_histograms(vector, vector + 1, [True, False]) is not vector
