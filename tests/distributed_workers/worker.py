"""Multi-process worker for tests/test_distributed.py (and the single-process references it compares with).

Run as a script, one *set* of scenarios per launch, so that the cost of starting the processes is paid
once per set::

    python tests/distributed_workers/worker.py ddp OUT        # Lightning's own "ddp" launcher, devices=2
    python tests/distributed_workers/worker.py sharded OUT    # ModelParallelStrategy + fully_shard, devices=2
    NODE_RANK=i LOCAL_RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python tests/distributed_workers/worker.py multinode OUT   # one process per "node", num_nodes=2

Each scenario is one ``Trainer.fit`` in the same processes. Every rank writes what its GradGuard decided
at every step (plus the final weights) to ``OUT/{scenario}_rank{r}.pt``; the scenarios that must raise
write ``OUT/{scenario}_raised_rank{r}.json`` instead. The test process compares the files.

Imported as a module (by the tests), nothing runs: the models and callbacks serve the single-process
reference runs too.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

if __name__ == "__main__":  # run as a script: import the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gradguard import GradGuard, LRGuard, NonFiniteGradientsError, ZScorePolicy

#: Collectives counted while GradGuard's hook runs (torch.distributed's Python entry points).
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter_tensor",
)
CALLS = [0]

DIM, HIDDEN = 8, 16
TIMEOUT = timedelta(seconds=90)  # a desynchronised collective fails the worker instead of waiting 30 min


def count_collectives() -> Callable[[], None]:
    """Wrap ``torch.distributed``'s collectives so that each call increments ``CALLS``; returns an undo."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            CALLS[0] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(fn))

    def undo() -> None:
        for name, fn in originals.items():
            setattr(dist, name, fn)

    return undo


def dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, DIM, generator=g)
    w = torch.randn(DIM, 1, generator=g)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(n, 1, generator=g))


class Net(L.LightningModule):
    """Two linear layers, initialised from a fixed seed so every process starts from the same weights.

    Args:
        batch_size: per-process batch size.
        n: dataset size.
        growth: the loss is multiplied by ``growth ** global_step`` (rising gradient norms).
        nan_loss_at: ``(rank, step)``: the loss of that rank is NaN at that optimizer step.
        shard: apply FSDP2 ``fully_shard`` to both linears and the root in ``configure_model``:
            ``"fsdp"`` over the data-parallel dimension of ``ModelParallelStrategy``'s mesh (gradients
            ``Shard(0)``), ``"hsdp"`` over the whole 2-D mesh, i.e. replicated across the 2 data-parallel
            ranks and sharded over the 1-rank tensor-parallel dimension (gradients ``(Replicate(), Shard(0))``).
        lr: SGD learning rate (momentum 0.9).
        split: in a multi-process run, rank ``r`` of ``w`` reads samples ``r, r + w, r + 2w, ...`` in order
            (so the ranks' batches of step ``k`` together form the single-process batch of size
            ``w * batch_size``); ``False``: every rank reads the whole dataset in order.
    """

    def __init__(
        self,
        batch_size: int = 8,
        n: int = 256,
        growth: float = 1.0,
        nan_loss_at: tuple[int, int] | None = None,
        shard: Literal["", "fsdp", "hsdp"] = "",
        lr: float = 0.05,
        split: bool = True,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
        self.batch_size, self.n, self.growth, self.nan_loss_at = batch_size, n, growth, nan_loss_at
        self.shard, self.lr, self.split = shard, lr, split

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"] if self.shard == "fsdp" else self.device_mesh
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y) * self.growth**self.trainer.global_step
        if self.nan_loss_at == (self.trainer.global_rank, self.trainer.global_step):
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        data = dataset(self.n)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > 1 and self.split:  # Lightning's own DistributedSampler would shuffle
            sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
            return DataLoader(data, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(data, batch_size=self.batch_size)


class PoisonGrad(Callback):
    """Before GradGuard (list it first): puts a NaN into one gradient of one rank at one step.

    This runs after DDP's gradient all-reduce, so only this rank sees the NaN: the agreement of the
    ranks then rests on GradGuard's own reduction.
    """

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            local.view(-1)[0] = float("nan")


class Recorder:
    """What one GradGuard decided at every step, and how many collectives its hook made.

    ``callbacks(guard)`` returns ``[before, guard, after]``: ``before`` notes the collective count (and
    the gradient type), ``after`` reads the guard's record of the step.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._calls_before = 0
        self._grad_type = ""

    def callbacks(self, guard: GradGuard) -> list[Callback]:
        recorder = self

        class Before(Callback):
            def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, opt: Any) -> None:
                recorder._calls_before = CALLS[0]
                grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
                recorder._grad_type = type(grad).__name__

        class After(Callback):
            def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, opt: Any) -> None:
                g = guard._first_engine()
                assert g is not None and g.last is not None
                last = g.last
                recorder.steps.append(
                    {
                        "step": last.step,
                        "global_step": trainer.global_step,
                        "layers": list(last.stats.layers),
                        "sq_norms": list(last.stats.sq_norms),
                        "global_norm": last.global_norm,
                        "threshold": last.threshold,
                        "clipped": last.clipped,
                        "skipped": last.skipped,
                        "post_clip_norm": last.post_clip_norm,
                        "lr_scale": guard.lr_scale,
                        "clipped_total": guard.clipped_steps,
                        "skipped_total": guard.skipped_steps,
                        "collectives": CALLS[0] - recorder._calls_before,
                        "grad_type": recorder._grad_type,
                        "sharded_layers": list(g.stats.sharded_layers),
                    }
                )

            def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
                # measured by GradGuard's optimizer post-hook: the latest update-to-weight ratio of each layer
                g = guard._first_engine()
                assert g is not None
                recorder.steps[-1]["update_ratios"] = {k: v[-1] for k, v in g.update_ratios.items() if v}

        return [Before(), guard, After()]


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full weights (DTensor shards gathered), detached copies on the CPU."""
    out = {}
    for key, value in module.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        out[key] = full.detach().cpu().clone()
    return out


class Dump(Callback):
    """Writes the recorder's steps, the guard's state and the final weights at the end of training."""

    def __init__(self, path: Callable[[int], Path], recorder: Recorder, guard: GradGuard) -> None:
        self.path, self.recorder, self.guard = path, recorder, guard

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        payload = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "steps": self.recorder.steps,
            "guard_state": self.guard.state_dict(),
            "incidents": [[i.kind, i.step, i.batch_idx, i.replay, i.leader] for i in self.guard.incidents],
            "weights": full_weights(pl_module),
        }
        torch.save(payload, self.path(trainer.global_rank))


def decision_guard() -> GradGuard:
    """An adaptive guard that clips and lowers the LR within a few steps of a rising norm."""
    return GradGuard(
        clip=ZScorePolicy(alpha=0.9, z_thresh=1.5, warmup_steps=3),
        lr_guard=LRGuard(patience=2, cooldown=2, rise_ratio=None, require_stalled_loss=False),
        histogram_every_n_steps=4,
        diagnostics=False,
        heatmap_every_n_steps=0,
        log_every_n_steps=1,
    )


def fit(
    out: Path,
    name: str,
    model: Net,
    guard: GradGuard,
    steps: int,
    strategy: Any = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    before: Sequence[Callback] = (),
    **trainer_kwargs: Any,
) -> None:
    """One fit; every rank dumps its record to ``out/{name}_rank{r}.pt``."""
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        max_steps=steps,
        callbacks=[*before, *recorder.callbacks(guard), Dump(lambda r: out / f"{name}_rank{r}.pt", recorder, guard)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        use_distributed_sampler=False,  # the model picks each rank's samples (see Net)
        **trainer_kwargs,
    )
    trainer.fit(model)


def fit_expecting_raise(out: Path, name: str, **kwargs: Any) -> None:
    """A fit that must stop with NonFiniteGradientsError on this rank: writes a marker, then exits with 3."""
    try:
        fit(out, name, **kwargs)
    except NonFiniteGradientsError as exc:
        rank = int(os.environ.get("NODE_RANK", "0")) * int(kwargs.get("devices", 1)) + int(
            os.environ.get("LOCAL_RANK", "0")
        )
        (out / f"{name}_raised_rank{rank}.json").write_text(json.dumps({"rank": rank, "message": str(exc)}))
        # Leave without interpreter finalisation: the process group's C++ threads, still alive after the
        # exception, otherwise make exit abort now and then ("terminate called without an active exception").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    raise SystemExit(f"{name}: expected NonFiniteGradientsError, training finished instead")


# ---------------------------------------------------------------------- scenario sets
def run_ddp(out: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    def ddp() -> DDPStrategy:
        return DDPStrategy(timeout=TIMEOUT)

    common: dict[str, Any] = {"strategy": ddp(), "devices": 2}
    fit(out, "decisions", Net(growth=1.3), decision_guard(), steps=12, **common)
    common["strategy"] = ddp()
    fit(
        out,
        "nan_after_allreduce",
        Net(),
        GradGuard(lr_guard=False, replay=True),
        8,
        before=[PoisonGrad(1, 3)],
        **common,
    )
    # Control: the same fault with GradGuard's reduction switched off -- the ranks must then disagree.
    import lightning_gradguard.decide.engine as callbacks_module  # where the engine reads the statistics

    real = callbacks_module.reduce_stats
    callbacks_module.reduce_stats = lambda vector, sharded: vector
    try:
        common["strategy"] = ddp()
        fit(out, "control_no_reduction", Net(), GradGuard(lr_guard=False), 8, before=[PoisonGrad(1, 3)], **common)
    finally:
        callbacks_module.reduce_stats = real
    common["strategy"] = ddp()
    fit(out, "nan_loss_one_rank", Net(nan_loss_at=(1, 2)), GradGuard(lr_guard=False, replay=True), 6, **common)
    common["strategy"] = ddp()
    fit(out, "equivalence", Net(batch_size=8), equivalence_guard(), 10, **common)
    common["strategy"] = ddp()
    raise_guard = GradGuard(on_nonfinite="raise", lr_guard=False)
    fit_expecting_raise(out, "raise", model=Net(), guard=raise_guard, steps=8, before=[PoisonGrad(1, 2)], **common)


def equivalence_guard() -> GradGuard:
    return GradGuard(
        clip=ZScorePolicy(alpha=0.9, z_thresh=1.0, warmup_steps=3),
        lr_guard=LRGuard(patience=2, cooldown=2, rise_ratio=None, require_stalled_loss=False),
        histogram_every_n_steps=0,
        diagnostics=False,
        heatmap_every_n_steps=0,
    )


def run_multinode(out: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    common: dict[str, Any] = {"devices": 1, "num_nodes": 2}
    fit(out, "mn_decisions", Net(growth=1.3), decision_guard(), 12, strategy=DDPStrategy(timeout=TIMEOUT), **common)
    fit(
        out,
        "mn_nan_after_allreduce",
        Net(),
        GradGuard(lr_guard=False),
        8,
        strategy=DDPStrategy(timeout=TIMEOUT),
        before=[PoisonGrad(0, 4)],
        **common,
    )
    fit_expecting_raise(
        out,
        "mn_raise",
        model=Net(),
        guard=GradGuard(on_nonfinite="raise", lr_guard=False),
        steps=8,
        strategy=DDPStrategy(timeout=TIMEOUT),
        before=[PoisonGrad(0, 2)],
        **common,
    )


def sharded_guard() -> GradGuard:
    return GradGuard(
        clip="fixed",
        max_norm=SHARDED_MAX_NORM,
        lr_guard=False,
        histogram_every_n_steps=3,
        diagnostics=False,
        heatmap_every_n_steps=0,
        log_every_n_steps=1,
    )


SHARDED_MAX_NORM = 5.0
SHARDED_STEPS = 7


def run_sharded(out: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT)
    # Both ranks see the same batches (split=False): the averaged gradient is then exactly the
    # single-process gradient of that batch, which the test compares with.
    fit(out, "sharded", Net(shard="fsdp", split=False), sharded_guard(), SHARDED_STEPS, strategy=strategy, devices=2)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT)
    fit(out, "hsdp", Net(shard="hsdp", split=False), sharded_guard(), SHARDED_STEPS, strategy=strategy, devices=2)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT)
    fit(
        out,
        "sharded_nan",
        Net(shard="fsdp", split=False),
        GradGuard(lr_guard=False, histogram_every_n_steps=0, diagnostics=False, heatmap_every_n_steps=0),
        6,
        strategy=strategy,
        devices=2,
        before=[PoisonGrad(1, 2)],
    )


SETS = {"ddp": run_ddp, "multinode": run_multinode, "sharded": run_sharded}

if __name__ == "__main__":
    torch.set_num_threads(1)
    count_collectives()
    SETS[sys.argv[1]](Path(sys.argv[2]))
