"""Constructor arguments: a wrong type is a TypeError naming the argument, what it takes and what it got;
numpy integers and bools are accepted wherever Python ones are, and stored as Python ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_gradguard import FabricGuard, GradGuard, Guard, LRGuard, RollbackTrigger
from lightning_gradguard.decide.diagnostics import GradientDiagnostics
from lightning_gradguard.decide.policies import PercentilePolicy
from lightning_gradguard.recovery.snapshot import Snapshot

from ._models import TinyRegressor, make_trainer


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


_NET = _net()
_OPT = torch.optim.SGD(_NET.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "net"}, r"`model` must be a torch.nn.Module .*got 'net' \(str\)"),
        ({"model": None}, r"`model` must be a torch.nn.Module .*got None \(NoneType\)"),
        ({"optimizer": None}, r"`optimizer` must be a torch.optim.Optimizer .*got None \(NoneType\)"),
        ({"optimizer": "sgd"}, r"`optimizer` must be a torch.optim.Optimizer .*got 'sgd' \(str\)"),
        ({"optimizer": _NET}, r"`optimizer` must be a torch.optim.Optimizer .*got a Sequential \(the model was passed"),
        ({"scaler": "yes"}, r"`scaler` must be a torch.amp.GradScaler or None, got 'yes' \(str\), which lacks "),
        ({"writer": 3}, r"`writer` must be a TensorBoard SummaryWriter .* or None, got 3 \(int\), which lacks add_"),
    ],
)
def test_guard_names_the_argument_of_the_wrong_type(kwargs: dict[str, Any], match: str) -> None:
    arguments = {"model": _NET, "optimizer": _OPT, **kwargs}
    with pytest.raises(TypeError, match=match):
        Guard(**arguments)


def test_fabric_guard_names_a_fabric_that_is_not_one() -> None:
    with pytest.raises(TypeError, match=r"`fabric` must be a lightning.fabric.Fabric .*got 'cpu' \(str\)"):
        FabricGuard("cpu", _NET, _OPT)


def test_guard_takes_a_fabric_wrapped_optimizer_and_a_real_writer(tmp_path: Any) -> None:
    from torch.utils.tensorboard import SummaryWriter

    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = fabric.setup(_net(), torch.optim.SGD(_NET.parameters(), lr=0.1))
    writer = SummaryWriter(str(tmp_path))
    guard = Guard(model, optimizer, writer=writer, scaler=torch.amp.GradScaler("cpu"))
    assert guard.optimizer is optimizer.optimizer  # Fabric's wrapper unwrapped
    writer.close()


@pytest.mark.parametrize("make", [np.int64, np.int32], ids=["np.int64", "np.int32"])
def test_numpy_integers_and_bools_are_accepted_everywhere_as_python_values(make: Any) -> None:
    guard = GradGuard(
        snapshot_every_n_steps=make(50),
        log_update_ratios=np.bool_(False),
        max_consecutive_skips=make(5),
        heatmap_every_n_steps=make(0),
    )
    assert type(guard.options.snapshot_every_n_steps) is int and guard.options.snapshot_every_n_steps == 50
    assert guard.options.log_update_ratios is False
    trigger = RollbackTrigger(max_rollbacks=make(5), runaway_steps=make(4), runaway_mad=np.float32(3.0))
    assert type(trigger.max_rollbacks) is int and trigger.max_rollbacks == 5
    assert type(trigger.runaway_mad) is float and trigger.runaway_mad == 3.0
    lr_guard = LRGuard(patience=make(4), cooldown=make(0), require_stalled_loss=np.bool_(True))
    assert (lr_guard.patience, lr_guard.require_stalled_loss) == (4, True) and type(lr_guard.patience) is int
    assert PercentilePolicy(window=make(100)).window == 100
    assert GradientDiagnostics(window=make(7)).window == 7
    guard = Guard(_NET, _OPT, snapshot_every_n_steps=make(50), log_update_ratios=np.bool_(False))
    assert guard.recovery is not None and type(guard.recovery.every_n_steps) is int
    assert Snapshot(_NET, _OPT, pin_memory=np.bool_(False)).pin_memory is False


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: GradGuard(snapshot_every_n_steps=True), TypeError, "`snapshot_every_n_steps` must be an int >= 1"),
        (lambda: GradGuard(max_consecutive_skips=np.bool_(True)), TypeError, "`max_consecutive_skips` must be an int"),
        (lambda: GradGuard(log_update_ratios=1), TypeError, "`log_update_ratios` must be True or False, got 1"),
        (lambda: GradGuard(log_update_ratios=np.int64(1)), TypeError, "`log_update_ratios` must be True or False"),
        (lambda: RollbackTrigger(max_rollbacks=np.bool_(True)), TypeError, "`max_rollbacks` must be an int >= 1"),
        (
            lambda: RollbackTrigger(max_rollbacks=np.int64(0)),
            ValueError,
            r"`max_rollbacks` must be an int >= 1, got np.int64\(0\)",
        ),
        (lambda: LRGuard(require_stalled_loss=1), TypeError, "`require_stalled_loss` must be True or False, got 1"),
    ],
)
def test_bools_are_not_ints_and_ints_are_not_bools(build: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("make", [np.float64, np.float32, torch.tensor], ids=["np.float64", "np.float32", "tensor"])
def test_numpy_and_tensor_numbers_are_stored_as_python_numbers(make: Any, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    guard = GradGuard(
        clip="fixed", max_norm=make(5.0), max_consecutive_skips=np.int64(3), histogram_every_n_steps=np.int32(2)
    )
    options = guard.options
    assert type(options.max_norm) is float and options.max_norm == 5.0
    assert type(options.max_consecutive_skips) is int and type(options.histogram_every_n_steps) is int
    ckpt = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, [guard, ckpt], max_steps=3, enable_checkpointing=True)
    trainer.fit(TinyRegressor())
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["callbacks"][guard.state_key]
    assert saved["config"]["max_norm"] == 5.0 and saved["guards"]["0"]["counters"]["steps"] == 3
    resumed = GradGuard(clip="fixed", max_norm=make(5.0))
    ckpt = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path / "b", [resumed, ckpt], max_steps=5, enable_checkpointing=True)
    trainer.fit(TinyRegressor(), ckpt_path=str(last), weights_only=True)
    assert resumed.last_outcome is not None and resumed.last_outcome.step == 4  # continued from step 3


@pytest.mark.parametrize("value", [True, False])
def test_group_by_bool_is_refused(value: bool) -> None:
    with pytest.raises(TypeError, match=rf"`group_by` must be 'module', 'param', an int .* got {value}"):
        GradGuard(group_by=value)


@pytest.mark.parametrize("value", ["no", 0, None, 1])
def test_log_layer_norms_must_be_a_bool(value: Any) -> None:
    with pytest.raises(TypeError, match=rf"`log_layer_norms` must be True or False, got {value!r}"):
        GradGuard(log_layer_norms=value)


def test_numpy_bool_log_layer_norms_is_a_bool() -> None:
    assert GradGuard(log_layer_norms=np.bool_(False)).options.log_layer_norms is False
