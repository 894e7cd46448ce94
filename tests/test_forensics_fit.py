"""Incidents from real training runs: the Lightning callback, Guard and FabricGuard name the batch and the
sample, replay tells data from transient faults, and a restarted run skips what was reproducible."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_gradguard import FabricGuard, GradGuard, Guard
from lightning_gradguard.forensics.incidents import read_incidents
from lightning_gradguard.forensics.skiplist import SkipList, SkipSamples

N, BATCH, POISONED = 64, 8, 21  # sample 21 sits in batch 2 of every epoch (no shuffling)


class Indexed(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    def __init__(self, poisoned: int | None = POISONED) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)
        if poisoned is not None:
            self.x[poisoned, 2] = math.nan

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


class Net(L.LightningModule):
    def __init__(self, corrupt_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.corrupt_at = corrupt_at
        self.net[2].weight.register_hook(self._corrupt)
        self.steps_taken: list[int] = []

    def _corrupt(self, grad: torch.Tensor) -> torch.Tensor:
        if self.corrupt_at is not None and self.trainer.global_step == self.corrupt_at:
            self.corrupt_at = None  # one backward pass only: a transient fault
            return grad * math.inf
        return grad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps_taken.append(batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(tmp_path: Path, model: Net, guard: GradGuard, steps: int, **kwargs: Any) -> L.Trainer:
    poisoned = kwargs.pop("poisoned", POISONED)
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[guard, *kwargs.pop("callbacks", [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        **kwargs,
    )
    torch.manual_seed(0)
    trainer.fit(model, DataLoader(Indexed(poisoned), batch_size=BATCH), ckpt_path=ckpt_path, weights_only=False)
    return trainer


def test_a_poisoned_sample_is_named_reproducible_and_skipped_after_a_restart(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    guard = GradGuard(replay=True, batch_ids=lambda batch: batch[2])
    trainer = _fit(tmp_path, Net(), guard, 6, callbacks=[ckpt], enable_checkpointing=True)
    (incident,) = guard.incidents
    assert (incident.kind, incident.epoch, incident.batch_idx) == ("skipped", 0, POISONED // BATCH)
    assert POISONED in (incident.sample_ids or ()) and incident.replay == "reproducible"
    assert incident.origin == "net.0"  # the forward pass goes non-finite in the first layer, where the data enters
    # one JSON line beside the event files, read back
    log_dir = Path(trainer.log_dir or "")
    (written,) = read_incidents(log_dir / "incidents.jsonl")
    assert written.batch_idx == incident.batch_idx and written.replay == "reproducible"
    skip_file = log_dir / "skip_list.json"
    (entry,) = SkipList(skip_file).entries
    assert (entry.epoch, entry.batch_idx, POISONED in entry.sample_ids) == (0, 2, True)
    # restart from the checkpoint taken before the incident (step 2). A plain DataLoader restarts its epoch
    # (Lightning numbers its batches from 2 on): the batch holding the listed sample is found by its ids
    events: list[Any] = []
    again = GradGuard(skip_list=skip_file, batch_ids=lambda batch: batch[2], on_event=events.append)
    _fit(tmp_path, Net(), again, 6, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    (listed,) = [e for e in events if e.kind == "skipped" and e.evidence.get("skip_list")]
    assert (
        "batch 4 of epoch 0 is on the skip list (it holds 8 samples (16, 17, 18, ..., 23) of the list" in listed.message
    )
    assert again.incidents[0].kind == "skipped" and all(i.kind != "nonfinite" for i in again.incidents)
    # the samples themselves can be left out instead: the dataset without them
    kept = SkipSamples(Indexed(), SkipList(skip_file))
    assert len(kept) == N - BATCH and all(torch.isfinite(kept[i][0]).all() for i in range(len(kept)))


def test_a_one_off_gradient_fault_is_transient_and_not_listed(tmp_path: Path) -> None:
    guard = GradGuard(replay=True)
    trainer = _fit(tmp_path, Net(corrupt_at=4), guard, 8, poisoned=None)
    (incident,) = [i for i in guard.incidents if i.kind == "skipped"]
    assert incident.step == 4 and incident.replay == "transient" and incident.leader == "net.2"
    assert not (Path(trainer.log_dir or "") / "skip_list.json").exists()
    assert incident.replay_evidence["replay_seconds"] >= 0.0 and math.isfinite(incident.replay_evidence["replay_norm"])


def test_without_replay_the_record_says_why(tmp_path: Path) -> None:
    events: list[Any] = []
    guard = GradGuard(on_event=events.append)
    _fit(tmp_path, Net(), guard, 4)
    (incident,) = guard.incidents
    assert incident.replay is None and incident.batch_idx == 2
    (event,) = [e for e in events if e.kind == "incident"]
    assert event.evidence["replay"].startswith("not replayed: replay is off")
    assert json.loads(str(event.evidence["record"]))["batch_idx"] == 2


def _loop(guard_cls: Any, tmp_path: Path) -> Any:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if guard_cls is FabricGuard:
        fabric = L.Fabric(accelerator="cpu", devices=1)
        model, optimizer = fabric.setup(model, optimizer)
        guard = FabricGuard(fabric, model, optimizer, replay=True, batch_ids=lambda b: b[2])
    else:
        guard = Guard(model, optimizer, replay=True, batch_ids=lambda b: b[2])
    for batch_idx, batch in enumerate(DataLoader(Indexed(), batch_size=BATCH)):
        x, y, _ = batch

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        optimizer.zero_grad()
        loss = closure()
        guard.before_optimizer_step(loss, closure=closure, batch=batch, batch_idx=batch_idx, epoch=0)
        optimizer.step()
    guard.close()
    return guard


@pytest.mark.parametrize("guard_cls", [Guard, FabricGuard], ids=["Guard", "FabricGuard"])
def test_the_plain_loop_front_ends_tell_the_same_story(tmp_path: Path, guard_cls: Any) -> None:
    guard = _loop(guard_cls, tmp_path)
    (incident,) = guard.incidents
    assert (incident.kind, incident.batch_idx, incident.replay, incident.origin) == ("skipped", 2, "reproducible", "0")
    assert POISONED in (incident.sample_ids or ())
    assert guard.skip_list is not None and guard.skip_list.skips(0, 2) and not guard.skip_list.skips(0, 3)
    restored = Guard(nn.Linear(4, 1), torch.optim.SGD(nn.Linear(4, 1).parameters(), lr=0.1))
    restored.load_state_dict(guard.state_dict())  # the skip list travels with the state
    assert restored.skip_list is not None and restored.skip_list.skips(0, 2)


def test_nothing_is_written_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A logger without a directory of its own (W&B, MLflow, a custom one): the incidents stay in memory and in
    the events; no file appears where the user happens to run (Trainer.log_dir would fall back to it)."""
    from lightning.pytorch.loggers import Logger

    class NoDir(Logger):
        name, version = "nodir", 0

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: Any, step: Any = None) -> None:
            pass

    monkeypatch.chdir(tmp_path)
    guard = GradGuard()
    L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=NoDir(),
        callbacks=[guard],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(Net(), DataLoader(Indexed(), batch_size=BATCH))
    assert [i.kind for i in guard.incidents] == ["skipped"]
    assert not list(tmp_path.rglob("incidents.jsonl")) and not list(tmp_path.rglob("skip_list.json"))
