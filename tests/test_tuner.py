"""Lightning's LR finder with GradGuard among the callbacks: the finder's deliberately exploding loss is not
GradGuard's business (the tuner replaces the callback list while it runs), and the fit that follows starts fresh."""

from __future__ import annotations

import warnings

import lightning as L
import torch
from lightning.pytorch.tuner import Tuner

from lightning_gradguard import GradGuard
from lightning_gradguard.events import GuardEvent
from tests._models import TinyRegressor


def test_the_lr_finder_is_not_seen_and_the_fit_after_it_starts_fresh() -> None:
    torch.manual_seed(0)
    model = TinyRegressor(lr=0.01, n=512)
    events: list[GuardEvent] = []
    guard = GradGuard(histogram_every_n_steps=0, heatmap_every_n_steps=0, on_event=events.append)
    trainer = L.Trainer(
        max_steps=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finder = Tuner(trainer).lr_find(model, num_training=40, attr_name="lr")
        assert finder is not None and len(finder.results["lr"]) > 10  # the finder ran its sweep
        assert events == []  # ... without GradGuard: no rollback, LR cut or verdict on its exploding loss
        trainer.fit(model)
    assert guard.state_dict()["guards"]["0"]["counters"]["steps"] == 30  # the fit's own steps only
    assert guard.rollbacks_total == 0 and guard.lr_scale == 1.0
    assert [e.kind for e in events if e.kind in ("rollback", "lr_reduction")] == []
