"""Small models and Trainer helpers shared by the tests."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def regression_data(n: int = 64, dim: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(n, 1, generator=g))


class TinyRegressor(L.LightningModule):
    """Two linear layers; ``nan_at_steps`` injects a NaN into the loss at chosen optimizer steps."""

    def __init__(
        self,
        dim: int = 8,
        hidden: int = 16,
        lr: float = 0.1,
        optimizer: str = "sgd",
        nan_at_steps: tuple[int, ...] = (),
        batch_size: int = 8,
        n: int = 64,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.lr = lr
        self.optimizer_name = optimizer
        self.nan_at_steps = nan_at_steps
        self.batch_size = batch_size
        self.n = n
        self.dim = dim

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.trainer.global_step in self.nan_at_steps:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(regression_data(self.n, self.dim), batch_size=self.batch_size)


class GradRecorder(Callback):
    """Records, in ``on_before_optimizer_step``, each layer's gradient norm as torch computes it.

    Place it BEFORE GradGuard in the callbacks list: it then sees the pre-clip gradients.
    """

    def __init__(self) -> None:
        self.layer_norms: list[dict[str, float]] = []
        self.global_norms: list[float] = []
        self.steps: list[int] = []
        self.scales: list[float] = []  # the AMP loss scale at each step (1.0 without a GradScaler)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        per_layer: dict[str, list[torch.Tensor]] = {}
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                per_layer.setdefault(name.rpartition(".")[0], []).append(p.grad.detach().flatten())
        norms = {k: torch.cat(v).double().norm().item() for k, v in per_layer.items()}
        self.layer_norms.append(norms)
        self.global_norms.append(math.sqrt(sum(v * v for v in norms.values())))
        self.steps.append(trainer.global_step)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(float(scaler.get_scale()) if scaler is not None else 1.0)


def make_trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": TensorBoardLogger(tmp_path, name="run", version=0),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }
    if "max_steps" in kwargs:
        defaults["max_epochs"] = -1
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


def read_events(log_dir: str | Path) -> Any:
    """An EventAccumulator over ``log_dir`` with nothing sampled away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc: Any, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


Factory = Callable[..., L.LightningModule]


def retry_on_exit_abort(run: Callable[[], Any]) -> Any:
    """Run an in-process ``ddp_spawn`` launch; repeat it once if a spawned rank died of SIGABRT.

    gloo's C++ threads occasionally abort a spawned process during interpreter shutdown ("terminate
    called without an active exception"), a teardown artefact of the launcher. A second abort, any
    other failure, or a wrong result still fails the test.
    """
    import signal

    from torch.multiprocessing.spawn import ProcessExitedException

    try:
        return run()
    except ProcessExitedException as exc:
        if exc.exit_code != -signal.SIGABRT and getattr(exc, "signal_name", "") != "SIGABRT":
            raise
        return run()


class RankZeroMessages(logging.Handler):
    """The messages of Lightning's rank-zero logger (where GradGuard's information goes), read at the source."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> RankZeroMessages:
        logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        logger.removeHandler(self)
        logger.setLevel(self._level)
