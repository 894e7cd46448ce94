"""Interactions between the merged features, as a first-week Lightning user meets them.

Each test reproduces a defect found by trying GradGuard() with a standard Lightning feature (fails
before its fix) and reads back what it claims: weights, optimizer state, events.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradguard import GradGuard
from lightning_gradguard.events import GuardEvent

from ._models import make_trainer, regression_data, weights


class _Finetune(L.LightningModule):
    """A backbone and a head; the optimizer starts with the head only (BackboneFinetuning's contract)."""

    def __init__(self, nan_at_steps: tuple[int, ...]) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.nan_at_steps = nan_at_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.trainer.global_step in self.nan_at_steps:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(regression_data(64, 8), batch_size=8)  # 8 steps per epoch


@pytest.mark.parametrize(
    ("nan_at", "restored_to"),
    [
        # the unfreeze (epoch 1 = step 8) is followed at once by the blow-up: the newest snapshot (an early
        # capture at step 4) predates the backbone's param group; it crashed with "param groups changed since
        # the snapshot"
        ((8, 9, 10), 4),
        # a healthy step after the unfreeze: the new group makes it a snapshot step
        ((10, 11, 12), 8),
    ],
)
def test_rollback_after_backbone_unfreeze(tmp_path: Path, nan_at: tuple[int, ...], restored_to: int) -> None:
    torch.manual_seed(0)
    model = _Finetune(nan_at)
    seen: list[dict[str, Any]] = []
    at_step: dict[int, dict[str, torch.Tensor]] = {}

    class _Record(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            at_step.setdefault(trainer.global_step, weights(model))

    def on_event(event: GuardEvent) -> None:
        if event.kind == "rollback":
            opt = model.trainer.optimizers[0]
            backbone = [p for g in opt.param_groups[1:] for p in g["params"]]
            seen.append(
                {
                    "evidence": dict(event.evidence),
                    "weights": weights(model),
                    "groups": len(opt.param_groups),
                    "backbone_state": [bool(opt.state.get(p)) for p in backbone],
                }
            )

    guard = GradGuard(snapshot_every_n_steps=1000, on_event=on_event)
    trainer = make_trainer(
        tmp_path, [_Record(), BackboneFinetuning(unfreeze_backbone_at_epoch=1), guard], max_epochs=3, logger=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    assert guard.rollbacks_total == 1
    (rb,) = seen
    assert rb["evidence"]["restored_to"] == restored_to
    assert rb["groups"] == 2  # the backbone's group stays in the optimizer
    # the weights are those the snapshot step started from (the step's own update comes after the capture)
    for name, value in at_step[restored_to].items():
        torch.testing.assert_close(rb["weights"][name], value, rtol=0, atol=0)
    # the backbone group's optimizer state is as at the capture: none yet (AdamW creates it at the step)
    assert rb["backbone_state"] == [False, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_report_shows_rollbacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``gradguard report`` on a run that rolled back names the rollback; it said nothing of it before."""
    import json

    from lightning_gradguard.outputs.report import main as report_main

    from ._models import TinyRegressor

    def fit(nan_at: tuple[int, ...], version: int) -> GradGuard:
        from lightning.pytorch.loggers import TensorBoardLogger

        torch.manual_seed(0)
        guard = GradGuard(histogram_every_n_steps=0)
        logger = TensorBoardLogger(tmp_path, name="run", version=version)
        trainer = make_trainer(tmp_path, [guard], logger=logger, log_every_n_steps=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(TinyRegressor(nan_at_steps=nan_at))
        return guard

    guard = fit((2, 3, 4), 0)
    # non-finite from step 2: step 4 goes back to the newest snapshot before step 2 (the early capture at step 1)
    assert (guard.rollbacks_total, guard.steps_lost) == (1, 3)
    assert report_main(["report", str(tmp_path / "run" / "version_0")]) == 0, capsys.readouterr().err
    assert "rollbacks       1 (3 steps lost): step 4 -> step 1" in capsys.readouterr().out.splitlines()
    assert report_main(["report", str(tmp_path / "run" / "version_0"), "--json"]) == 0
    rollbacks = json.loads(capsys.readouterr().out)["runs"][0]["rollbacks"]
    assert rollbacks == {"total": 1, "steps_lost": 3, "rollbacks": [{"step": 4, "restored_to": 1, "steps_lost": 3}]}

    assert fit((), 1).rollbacks_total == 0
    assert report_main(["report", str(tmp_path / "run" / "version_1")]) == 0
    assert "rollbacks       none" in capsys.readouterr().out.splitlines()


def test_rollback_keeps_the_diagnostics_account_of_the_run(tmp_path: Path) -> None:
    """A rollback restores the diagnostics' norm windows, not their record of the run.

    Before, the end-of-fit summary restarted at the rollback: "54 log steps (steps 10-63)" for a
    64-step run, the non-finite episode of steps 8-10 cut to "steps 10-10" and reported twice.
    """
    from ._models import TinyRegressor

    events: list[GuardEvent] = []
    guard = GradGuard(on_event=events.append, diagnose_every_n_steps=1)
    trainer = make_trainer(tmp_path, [guard], logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 64 steps, log_every_n_steps=1; at lr 0.02 the run is stable after the fault (at 0.1 its loss climbs)
        trainer.fit(TinyRegressor(n=512, nan_at_steps=(8, 9, 10), lr=0.02))
    assert guard.rollbacks_total == 1
    (rollback,) = [e for e in events if e.kind == "rollback"]
    assert (rollback.step, rollback.evidence["restored_to"]) == (10, 4)  # the newest snapshot before step 8
    (summary,) = [e for e in events if e.kind == "summary"]
    lines = summary.message.splitlines()
    assert lines[1].startswith("2 layers over 64 log steps (steps 0-63)")
    assert "  net.0: nonfinite (1 episode, steps 8-10)" in lines
    nonfinite = [e for e in events if e.kind == "verdict" and "non-finite gradient" in e.message]
    assert [e.step for e in nonfinite] == [8, 8]  # one verdict per layer for the one episode


def test_fp16_gradscaler_nan_loss_streak_rolls_back(tmp_path: Path) -> None:
    """Under fp16 AMP every non-finite step is a GradScaler skip; a NaN loss streak must still roll back.

    Before, the loss of every scaler-skipped step was withheld from the trigger, so ``nonfinite_loss``
    could never fire under a GradScaler: a NaN loss (NaN at any loss scale) went on until the skip
    streak reached ``max_consecutive_skips``.
    """
    from lightning.pytorch.plugins import MixedPrecision
    from torch.amp import GradScaler

    from ._models import TinyRegressor

    torch.manual_seed(0)
    events: list[GuardEvent] = []
    guard = GradGuard(on_event=events.append)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))
    trainer = make_trainer(tmp_path, [guard], logger=False, plugins=[plugin])
    model = TinyRegressor(n=256, nan_at_steps=(8, 9, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    (rollback,) = [e for e in events if e.kind == "rollback"]
    assert rollback.step == 10 and rollback.evidence["trigger"] == "nonfinite_loss"
    assert rollback.evidence["nonfinite_loss_streak"] == 3
    assert guard.rollbacks_total == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
