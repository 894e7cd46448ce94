"""Resume: a run stopped at step k and resumed from its checkpoint is the run that never stopped; one
GradGuard across several fits (folds, the same Trainer fitted again, a state loaded by hand) keeps or starts
its state as each case needs.

Every epoch here is exactly one optimizer step (a sampler hands out a fresh slice of the data each epoch),
so every checkpoint is an end-of-epoch checkpoint and Lightning resumes its data exactly; any difference
between the runs can only come from state GradGuard failed to save or restore.
"""

from __future__ import annotations

import copy
import csv
import gc
import logging
import math
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_gradguard import GradGuard
from lightning_gradguard.decide.lr_guard import LRGuard
from lightning_gradguard.decide.policies import AutoPolicy
from lightning_gradguard.keys import tag

from ._models import RankZeroMessages, TinyRegressor, make_trainer, read_events, retry_on_exit_abort, scalars

N = 14  # optimizer steps of every run
LOG_EVERY = 4  # no resume point below is a log step: each resume starts inside a log interval


class EpochSampler(Sampler[int]):
    """Epoch ``e`` yields items ``[e * n, (e + 1) * n)`` (per rank under DDP): one optimizer step per epoch."""

    def __init__(self, per_epoch: int) -> None:
        self.per_epoch = per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        start = (self.epoch * world + rank) * self.per_epoch
        return iter(range(start, start + self.per_epoch))

    def __len__(self) -> int:
        return self.per_epoch


class Model(L.LightningModule):
    """Tiny regressor; ``spikes``: optimizer steps whose inputs are scaled up (large gradient norms)."""

    def __init__(
        self, accumulate: int = 1, spikes: tuple[int, ...] = (), scheduler: bool = False, world: int = 1
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
        self.batch_size, self.accumulate, self.spikes = 4, accumulate, spikes
        self.scheduler, self.world = scheduler, world

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        per_epoch = self.batch_size * self.accumulate
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N * self.world, per_epoch, 6, generator=g)
        for step in self.spikes:
            x[step * self.world : (step + 1) * self.world] *= 8.0
        x = x.reshape(-1, 6)
        y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(len(x), 1, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, sampler=EpochSampler(per_epoch))


class Probe(Callback):
    """Placed after GradGuard: what GradGuard decided at each optimizer step, read in a hook that runs."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[Any, ...]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        guard = next(cb for cb in trainer.callbacks if isinstance(cb, GradGuard))  # type: ignore[attr-defined]
        lr = float(trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]) if trainer.lr_scheduler_configs else None
        self.rows[trainer.global_step] = (guard.threshold, guard.clipped_steps, guard.lr_scale, lr)


def _fit(
    tmp: Path,
    model: L.LightningModule,
    guard: GradGuard,
    max_steps: int,
    ckpt_path: str | Path | None = None,
    extra: tuple[Callback, ...] = (),
    **kwargs: Any,
) -> tuple[L.Trainer, Probe]:
    L.seed_everything(0, verbose=False)
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        max_steps=max_steps,
        logger=kwargs.pop("logger", CSVLogger(tmp, name="", version=0)),
        callbacks=[guard, probe, *extra],
        enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in extra),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **kwargs,
    )
    trainer.fit(model, ckpt_path=ckpt_path, weights_only=True if ckpt_path is not None else None)
    return trainer, probe


def _every_step(dirpath: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath, filename="{step}", every_n_train_steps=1, save_top_k=-1)


def _logged(trainer: L.Trainer) -> dict[int, dict[str, str]]:
    """The CSV file read back: step -> {metric: value as written}."""
    rows: dict[int, dict[str, str]] = {}
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:  # type: ignore[union-attr]
        for row in csv.DictReader(f):
            rows.setdefault(int(row.pop("step")), {}).update({k: v for k, v in row.items() if v != ""})
    return rows


def _same(a: Any, b: Any) -> bool:
    """Deep equality where NaN equals NaN (the heatmap buffer holds log10(0) = NaN for dead layers)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _primitives_only(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _primitives_only(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_primitives_only(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str | torch.Tensor)


def _guard_state(ckpt: Path, index: int = 0) -> dict[str, Any]:
    checkpoint = torch.load(ckpt, weights_only=True)  # must not need pickled classes
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("GradGuard")]
    assert _primitives_only(state)
    guard_state: dict[str, Any] = state["guards"][str(index)]
    return guard_state


def _assert_same_run(
    straight: tuple[L.Trainer, Probe],
    resumed: tuple[L.Trainer, Probe],
    k: int,
    stopped: tuple[L.Trainer, Probe] | None = None,
    compare_state: bool = True,
) -> None:
    (t_a, p_a), (t_b, p_b) = straight, resumed
    assert t_b.global_step == t_a.global_step == N
    # per step: threshold, clip count, LR scale and scheduler LR, read in a hook after GradGuard's
    assert sorted(p_b.rows) == list(range(k, N))
    assert [p_b.rows[s] for s in range(k, N)] == [p_a.rows[s] for s in range(k, N)]
    # the logged values, read back from the CSV files
    logged_a, logged_b = _logged(t_a), _logged(t_b)
    assert {s: v for s, v in logged_b.items() if s >= k} == {s: v for s, v in logged_a.items() if s >= k}
    assert any(s > k for s in logged_b)
    if stopped is not None:
        t_s, p_s = stopped
        assert [p_s.rows[s] for s in range(k)] == [p_a.rows[s] for s in range(k)]
        # (the stopped run's end-of-fit flush of its unfinished interval is logged at its last step, k - 1)
        before = {s: v for s, v in _logged(t_s).items() if s < k - 1}
        assert before == {s: v for s, v in logged_a.items() if s < k - 1}
    # the final weights, bit for bit, and every piece of GradGuard state
    w_a, w_b = t_a.lightning_module.state_dict(), t_b.lightning_module.state_dict()
    assert all(torch.equal(w_a[name], w_b[name]) for name in w_a)
    guard_a, guard_b = (next(cb for cb in t.callbacks if isinstance(cb, GradGuard)) for t in (t_a, t_b))  # type: ignore[attr-defined]
    if compare_state:
        assert _same(guard_b.state_dict(), guard_a.state_dict())
    opt_a, opt_b = t_a.optimizers[0], t_b.optimizers[0]
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]


def _auto_guard() -> GradGuard:
    return GradGuard(clip=AutoPolicy(warmup_steps=6), log_every_n_steps=LOG_EVERY, histogram_every_n_steps=0)


# --------------------------------------------------------------------------- warmup / after warmup
@pytest.fixture(scope="module")
def auto_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, L.LightningModule, tuple[L.Trainer, Probe]]:
    tmp = tmp_path_factory.mktemp("auto")
    L.seed_everything(0, verbose=False)
    init = Model(spikes=(10, 12))
    straight = _fit(tmp / "straight", copy.deepcopy(init), _auto_guard(), N, extra=(_every_step(tmp / "ckpt"),))
    return tmp, init, straight


@pytest.mark.parametrize("k", [3, 7], ids=["mid-warmup", "after-warmup"])
def test_resume_from_model_checkpoint_matches_the_uninterrupted_run(
    auto_run: tuple[Path, L.LightningModule, tuple[L.Trainer, Probe]], k: int
) -> None:
    tmp, init, straight = auto_run
    ckpt = tmp / "ckpt" / f"step={k}.ckpt"
    saved = _guard_state(ckpt)
    policy = saved["policy"]
    if k < 6:  # really mid-warmup: no statistics yet, k norms collected
        assert policy["level"] is None and len(policy["warmup"]) == k
    else:  # really after warmup, and clipping happens after the resume point
        assert policy["level"] is not None and policy["warmup"] == []
        assert straight[1].rows[N - 1][1] > straight[1].rows[k][1]
    assert saved["counters"]["steps"] == k and 0 < saved["interval"]["steps"] < LOG_EVERY
    resumed = _fit(tmp / f"resumed{k}", copy.deepcopy(init), _auto_guard(), N, ckpt_path=ckpt)
    _assert_same_run(straight, resumed, k)


def test_stop_at_k_save_checkpoint_after_fit_and_resume(
    auto_run: tuple[Path, L.LightningModule, tuple[L.Trainer, Probe]],
) -> None:
    tmp, init, straight = auto_run
    k = 7
    stopped = _fit(tmp / "stopped", copy.deepcopy(init), _auto_guard(), k)
    stopped[0].save_checkpoint(tmp / "stopped.ckpt")  # after fit: after GradGuard's end-of-training flush
    # the checkpoint holds the state as it was before the flush, i.e. that of the ModelCheckpoint file at k
    assert _same(_guard_state(tmp / "stopped.ckpt"), _guard_state(tmp / "ckpt" / f"step={k}.ckpt"))
    resumed = _fit(tmp / "resumed-stopped", copy.deepcopy(init), _auto_guard(), N, ckpt_path=tmp / "stopped.ckpt")
    _assert_same_run(straight, resumed, k, stopped=stopped)


# --------------------------------------------------------------------------- mid-cooldown after a reduction
def test_resume_mid_cooldown_after_an_lr_reduction_with_a_scheduler(tmp_path: Path) -> None:
    def guard() -> GradGuard:
        # every norm is far above 0.9 * max_norm: a reduction at step 1, cooldown 6, the next at step 9
        lr_guard = LRGuard(patience=2, cooldown=6, rise_ratio=None, require_stalled_loss=False)
        return GradGuard(clip="fixed", max_norm=0.02, lr_guard=lr_guard, log_every_n_steps=LOG_EVERY)

    L.seed_everything(0, verbose=False)
    init = Model(scheduler=True)
    straight = _fit(tmp_path / "straight", copy.deepcopy(init), guard(), N, extra=(_every_step(tmp_path / "ckpt"),))
    k = 7
    saved = _guard_state(tmp_path / "ckpt" / f"step={k}.ckpt")["lr_guard"]
    assert saved["lr_scale"] == 0.5 and saved["num_reductions"] == 1 and saved["cooldown_left"] > 0
    # Lightning restores the scheduler's own LR into the optimizer: the scale is not baked into it
    ckpt = torch.load(tmp_path / "ckpt" / f"step={k}.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.7**2)
    assert ckpt["lr_schedulers"][0]["_last_lr"] == [ckpt["optimizer_states"][0]["param_groups"][0]["lr"]]
    resumed = _fit(
        tmp_path / "resumed", copy.deepcopy(init), guard(), N, ckpt_path=tmp_path / "ckpt" / f"step={k}.ckpt"
    )
    _assert_same_run(straight, resumed, k)
    scales = [straight[1].rows[s][2] for s in range(N)]
    assert scales[k] == 0.5 and scales[-1] < 0.5  # the next reduction happened after the resume, on time
    logged = _logged(resumed[0])
    step = 12  # a log step after the resume and after the second reduction
    lr_scale, sched_lr = straight[1].rows[step][2], straight[1].rows[step][3]
    assert float(logged[step][tag("lr")]) == pytest.approx(lr_scale * sched_lr)  # effective LR: applied once


# --------------------------------------------------------------------------- gradient accumulation
def test_resume_at_a_gradient_accumulation_window_boundary(tmp_path: Path) -> None:
    class SaveInsideWindow(Callback):
        """Saves a checkpoint after the first micro-batch of the window following optimizer step k."""

        def __init__(self, k: int) -> None:
            self.k, self.seen = k, 0

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == self.k:
                self.seen += 1
                if self.seen == 2:
                    trainer.save_checkpoint(tmp_path / "inside.ckpt")

    def guard() -> GradGuard:
        return GradGuard(clip=AutoPolicy(warmup_steps=4), log_every_n_steps=LOG_EVERY, histogram_every_n_steps=0)

    k = 7
    L.seed_everything(0, verbose=False)
    init = Model(accumulate=3, spikes=(9,))
    extra = (_every_step(tmp_path / "ckpt"), SaveInsideWindow(k))
    straight = _fit(tmp_path / "straight", copy.deepcopy(init), guard(), N, extra=extra, accumulate_grad_batches=3)
    boundary = tmp_path / "ckpt" / f"step={k}.ckpt"
    # GradGuard's state changes only at optimizer steps: inside the window it is the boundary's state
    assert _same(_guard_state(tmp_path / "inside.ckpt"), _guard_state(boundary))
    assert _guard_state(boundary)["counters"]["steps"] == k
    resumed = _fit(tmp_path / "resumed", copy.deepcopy(init), guard(), N, ckpt_path=boundary, accumulate_grad_batches=3)
    _assert_same_run(straight, resumed, k)


# --------------------------------------------------------------------------- several instances, missing or other state
class StateAtStart(Callback):
    """Every GradGuard's state as the resumed run starts (after Lightning restored the checkpoint)."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, GradGuard):
                self.states[cb.state_key] = copy.deepcopy(cb.state_dict())


def _two_guards() -> list[GradGuard]:
    guards = [
        GradGuard(clip="auto", histogram_every_n_steps=0),
        GradGuard(clip="percentile", lr_guard=False, log_layer_norms=False, histogram_every_n_steps=0),
    ]
    guards[0].name, guards[1].name = "auto", "percentile"
    return guards


def test_two_instances_keep_their_own_state_and_identical_ones_are_refused(tmp_path: Path) -> None:
    guards = _two_guards()
    # two GradGuards in one Trainer write the same tags: refused with loggers, so here without
    trainer, _ = _fit(tmp_path / "a", Model(), guards[0], 5, extra=(guards[1],), logger=False)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    assert saved[guards[0].state_key]["guards"]["0"]["policy"]["name"] == "auto"
    assert saved[guards[1].state_key]["guards"]["0"]["policy"]["name"] == "percentile"
    assert "lr_guard" not in saved[guards[1].state_key]["guards"]["0"]
    # a new pair, listed in the other order, each gets back exactly its own state
    fresh, at_start = _two_guards(), StateAtStart()
    _fit(
        tmp_path / "b", Model(), fresh[1], 6, ckpt_path=tmp_path / "two.ckpt", extra=(fresh[0], at_start), logger=False
    )
    for guard in guards:
        assert _same(at_start.states[guard.state_key]["guards"], saved[guard.state_key]["guards"])
    # two GradGuards with the same identity (class and name) would share one checkpoint entry
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        L.Trainer(callbacks=[GradGuard(), GradGuard(log_every_n_steps=7)], logger=False)


def test_checkpoint_without_gradguard_state_resumes_fresh_with_an_info_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(Model())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    guard, at_start = _auto_guard(), StateAtStart()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):  # other tests may have quieted it
        _fit(tmp_path / "r", Model(), guard, 7, ckpt_path=tmp_path / "plain.ckpt", extra=(at_start,))
    assert "the checkpoint holds no GradGuard state" in caplog.text
    assert "starting with fresh GradGuard state" in caplog.text
    start = at_start.states[guard.state_key]["guards"]["0"]
    assert start["counters"]["steps"] == 0 and start["policy"]["steps"] == 0
    assert guard.state_dict()["guards"]["0"]["counters"]["steps"] == 3  # steps 4, 5, 6 of the resumed run


def test_differently_configured_checkpoint_says_what_differs_and_keeps_what_still_applies(tmp_path: Path) -> None:
    lr_guard = LRGuard(patience=2, cooldown=50, rise_ratio=None, require_stalled_loss=False)
    before = GradGuard(clip="fixed", max_norm=0.02, lr_guard=lr_guard, histogram_every_n_steps=0)
    trainer, _ = _fit(tmp_path / "a", Model(), before, 4)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    assert before.state_dict()["guards"]["0"]["lr_guard"]["lr_scale"] == 0.5
    after = GradGuard(
        clip="zscore", group_by="param", lr_guard=LRGuard(patience=3, cooldown=50), histogram_every_n_steps=0
    )
    at_start = StateAtStart()
    with pytest.warns(UserWarning) as record:
        _fit(tmp_path / "d", Model(), after, 6, ckpt_path=ckpt, extra=(at_start,))
    text = "\n".join(str(w.message) for w in record)
    assert "clip policy differs (saved 'fixed', now 'zscore')" in text and "starts fresh" in text
    assert "layers differ" in text and "LR guard configuration differs" in text
    start = at_start.states[after.state_key]["guards"]["0"]
    assert start["counters"]["steps"] == 4 and start["lr_guard"]["lr_scale"] == 0.5  # kept
    assert start["policy"]["steps"] == 0 and start["policy"]["name"] == "zscore"  # fresh
    assert start["heatmap_steps"] == [] and start["layers"] == [
        "net.0.weight",
        "net.0.bias",
        "net.2.weight",
        "net.2.bias",
    ]


def test_state_from_an_earlier_version_with_fewer_keys_loads(tmp_path: Path) -> None:
    guard = _auto_guard()
    trainer, _ = _fit(tmp_path / "a", Model(), guard, 8)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    state = checkpoint["callbacks"][guard.state_key]
    # version 1: no "config"; per optimizer no "layers", "numels", "lr_guard_config"; fewer counters; and a
    # policy state from before a key was added. Plus a key from the future, which is ignored.
    old_guard = state["guards"]["0"]
    for key in ("layers", "numels", "lr_guard_config"):
        del old_guard[key]
    del old_guard["counters"]["scaler_skipped_total"], old_guard["policy"]["slope"]
    old_guard["counters"]["added_later"] = 3
    checkpoint["callbacks"][guard.state_key] = {"version": 1, "guards": {"0": old_guard}}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    resumed, at_start = _auto_guard(), StateAtStart()
    _fit(tmp_path / "b", Model(), resumed, 10, ckpt_path=tmp_path / "old.ckpt", extra=(at_start,))
    start = at_start.states[resumed.state_key]["guards"]["0"]
    assert start["counters"]["steps"] == 8 and start["counters"]["scaler_skipped_total"] == 0
    assert "added_later" not in start["counters"]
    assert start["policy"]["level"] == old_guard["policy"]["level"] and start["policy"]["slope"] == 0.0
    assert start["lr_guard"] == old_guard["lr_guard"]
    assert resumed.state_dict()["guards"]["0"]["counters"]["steps"] == 10


# --------------------------------------------------------------------------- DDP
class DumpState(Callback):
    """Each rank writes its GradGuard state to ``{dirpath}/{when}-rank{r}.pt`` at train start and end."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = dirpath

    def _dump(self, trainer: L.Trainer, when: str) -> None:
        (guard,) = [cb for cb in trainer.callbacks if isinstance(cb, GradGuard)]  # type: ignore[attr-defined]
        torch.save(guard.state_dict(), self.dirpath / f"{when}-rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, "start")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, "end")


def test_ddp_resume_restores_identical_state_on_both_ranks(tmp_path: Path) -> None:
    k = 7
    L.seed_everything(0, verbose=False)
    init = Model(spikes=(10,), world=2)
    # the checkpoint comes from a one-process run (cheap); what is under test is the 2-process resume
    trainer, _ = _fit(tmp_path / "single", copy.deepcopy(init), _auto_guard(), k)
    ckpt = tmp_path / "single.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"][_auto_guard().state_key]
    out = tmp_path / "ddp"
    out.mkdir()

    def resume() -> None:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),  # a hang fails, bounded
            max_epochs=-1,
            max_steps=N,
            logger=False,
            callbacks=[_auto_guard(), DumpState(out)],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
            use_distributed_sampler=False,  # EpochSampler gives each rank its own slice of the data
        )
        trainer.fit(copy.deepcopy(init), ckpt_path=ckpt, weights_only=True)

    retry_on_exit_abort(resume)

    def load(name: str) -> dict[str, Any]:
        state: dict[str, Any] = torch.load(out / name, weights_only=True)
        return state

    # each rank starts from the checkpoint's state and, fed different data, ends identical to the other
    for rank in (0, 1):
        assert _same(load(f"start-rank{rank}.pt")["guards"], saved["guards"])
    assert saved["guards"]["0"]["counters"]["steps"] == k and saved["guards"]["0"]["policy"]["level"] is not None
    end = load("end-rank0.pt")
    assert _same(load("end-rank1.pt"), end)
    assert end["guards"]["0"]["counters"]["steps"] == N and end["guards"]["0"]["counters"]["clipped_total"] > 0


def test_folds_with_one_guard_start_fresh_and_keep_no_model_alive(
    tmp_path: Path,
) -> None:
    guard = GradGuard(clip="percentile", histogram_every_n_steps=0, heatmap_every_n_steps=0)
    models: list[weakref.ref[L.LightningModule]] = []
    for fold in range(3):
        for earlier in models:
            gc.collect()
            assert earlier() is None  # no earlier fold's model is kept alive
        torch.manual_seed(fold)
        model = TinyRegressor(lr=0.02 * (fold + 1), n=96)  # every fold trains (at 0.15 the loss climbs 4x: a rollback)
        trainer = make_trainer(tmp_path / f"fold{fold}", [guard], max_steps=30)
        with RankZeroMessages() as said:
            trainer.fit(model)
        acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
        last_threshold = scalars(acc, tag("threshold"))
        assert guard.threshold == pytest.approx(last_threshold[max(last_threshold)], rel=1e-6)
        assert guard.lr_scale == pytest.approx(scalars(acc, tag("lr_scale"))[29], rel=1e-6)
        assert guard.state_dict()["guards"]["0"]["counters"]["steps"] == 30  # this fit's steps only
        assert list(guard.state_dict()["guards"]) == ["0"]
        assert sum("diagnostics summary" in m for m in said.messages) == 1
        models.append(weakref.ref(model))
        del model, trainer, acc
    gc.collect()
    assert all(ref() is None for ref in models)  # not even the last one: GradGuard let go of it at teardown


def test_the_same_trainer_fitted_again_continues(tmp_path: Path) -> None:
    guard = GradGuard(histogram_every_n_steps=0, heatmap_every_n_steps=0)
    model = TinyRegressor()
    trainer = make_trainer(tmp_path, [guard], max_steps=3)
    trainer.fit(model)
    trainer.fit_loop.epoch_loop.max_steps = 5
    trainer.fit(model)
    assert guard.state_dict()["guards"]["0"]["counters"]["steps"] == 5
    assert guard.last_outcome is not None and guard.last_outcome.step == 4


def test_state_loaded_by_hand_before_the_first_fit_is_used(tmp_path: Path) -> None:
    first = GradGuard(histogram_every_n_steps=0, heatmap_every_n_steps=0)
    make_trainer(tmp_path / "a", [first], max_steps=3, logger=False).fit(TinyRegressor())
    second = GradGuard(histogram_every_n_steps=0, heatmap_every_n_steps=0)
    second.load_state_dict(first.state_dict())
    make_trainer(tmp_path / "b", [second], max_steps=2, logger=False).fit(TinyRegressor())
    assert second.state_dict()["guards"]["0"]["counters"]["steps"] == 5  # 3 loaded + 2 of this fit
