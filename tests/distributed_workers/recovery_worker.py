"""Two-process worker for tests/test_recovery_distributed.py: rollbacks under DDP and FSDP2, on CPU over gloo.

Run as a script, one set of scenarios per launch::

    python tests/distributed_workers/recovery_worker.py ddp OUT     # Lightning's "ddp" launcher, devices=2
    python tests/distributed_workers/recovery_worker.py fsdp2 OUT   # ModelParallelStrategy + fully_shard

In every scenario rank 1 *alone* has one weight turned into NaN (a simulated hardware fault) at the
start of chosen optimizer steps. Each rank writes its GradGuard's state and its final full weights to
``OUT/{scenario}_rank{r}.pt`` (see ``worker.fit``); the last scenario of each set keeps injecting the
fault, so recovery runs out of rollbacks: each rank then writes ``OUT/{scenario}_raised_rank{r}.json``
with the error's text and exits with code 4.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

if __name__ == "__main__":  # run as a script: import the checkout's package and the sibling worker
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch.callbacks import Callback

from lightning_gradguard import GradGuard, RecoveryError
from tests.distributed_workers.worker import TIMEOUT, Net, fit

FAULT_RANK = 1
FAULT_STEP = 6
STEPS = 16
EXHAUST_FROM = 3
EXHAUST_STEPS = 40


class CorruptWeight(Callback):
    """At the start of the given optimizer steps, rank ``rank`` sets one element of its first weight to NaN.

    ``index`` is the flat index of the element in what the rank holds: under FSDP2 its local shard,
    which only that rank holds.
    """

    def __init__(self, rank: int, steps: range | tuple[int, ...], index: int = 0) -> None:
        self.rank, self.steps, self.index = rank, steps, index

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step in self.steps:
            weight = next(pl_module.parameters())
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            with torch.no_grad():
                local.view(-1)[self.index] = float("nan")


def recovery_guard() -> GradGuard:
    return GradGuard(snapshot_every_n_steps=2, histogram_every_n_steps=0, heatmap_every_n_steps=0)


def fit_expecting_recovery_error(out: Path, name: str, **kwargs: Any) -> None:
    """A fit that must stop with RecoveryError on this rank: writes a marker, then exits with 4."""
    try:
        fit(out, name, **kwargs)
    except RecoveryError as exc:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        (out / f"{name}_raised_rank{rank}.json").write_text(json.dumps({"rank": rank, "message": str(exc)}))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(4)  # no interpreter finalisation: gloo's threads otherwise make exit abort now and then
    raise SystemExit(f"{name}: expected RecoveryError, training finished instead")


def run_ddp(out: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    fault = CorruptWeight(FAULT_RANK, (FAULT_STEP,))
    fit(
        out,
        "ddp_rollback",
        Net(),
        recovery_guard(),
        STEPS,
        strategy=DDPStrategy(timeout=TIMEOUT),
        devices=2,
        before=[fault],
    )
    fit_expecting_recovery_error(
        out,
        "ddp_exhausted",
        model=Net(),
        guard=recovery_guard(),
        steps=EXHAUST_STEPS,
        strategy=DDPStrategy(timeout=TIMEOUT),
        devices=2,
        before=[CorruptWeight(FAULT_RANK, range(EXHAUST_FROM, EXHAUST_STEPS))],
    )


def run_fsdp2(out: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT)
    fault = CorruptWeight(FAULT_RANK, (FAULT_STEP,))
    fit(
        out,
        "fsdp2_rollback",
        Net(shard="fsdp", split=False),
        recovery_guard(),
        STEPS,
        strategy=strategy,
        devices=2,
        before=[fault],
    )


SETS = {"ddp": run_ddp, "fsdp2": run_fsdp2}

if __name__ == "__main__":
    torch.set_num_threads(1)
    SETS[sys.argv[1]](Path(sys.argv[2]))
