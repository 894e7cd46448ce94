"""Phase-1 preview of the Custom Scalars dashboard (issue 15), until the callback writes the new tags.

    .venv/bin/python docs/dev/dashboard_preview.py [--keep-logs DIR]

Trains ``examples/quickstart.py`` with a bridge callback that writes the tags GradGuard will write once
the phase-2 wiring lands (``loss``, ``band/*``, ``layer_norm_min/median/max``, ``weight_norm/{layer}``,
``update_ratio/{layer}``) from the pure helpers of ``lightning_gradguard.tensorboard`` and
``lightning_gradguard.updates``, then screenshots TensorBoard's Custom Scalars tab into
``docs/img/dashboard.png`` with the machinery of ``screenshots.py``. The bridge runs before GradGuard,
so it sees the pre-clip gradients; it reads the threshold GradGuard holds before the step and takes
``min(norm, threshold)`` as the post-clip norm. Delete this script once ``screenshots.py`` shows the same.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(Path(__file__).resolve().parent)]

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_gradguard import GradGuard  # noqa: E402
from lightning_gradguard.keys import tag  # noqa: E402
from lightning_gradguard.stats import GradStats  # noqa: E402
from lightning_gradguard.tensorboard import layer_norm_extremes, threshold_band  # noqa: E402
from lightning_gradguard.updates import UpdateTracker, update_metrics  # noqa: E402


class _Bridge(Callback):
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stats = GradStats(pl_module.named_parameters())
        self.tracker = UpdateTracker(self.stats)
        self.metrics: dict[str, float] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step % trainer.log_every_n_steps:
            return
        stats = self.stats.read(self.stats.squared_norms())
        self.metrics = {tag(k): v for k, v in layer_norm_extremes(stats.layer_norms()).items()}
        guard = next(c for c in trainer.callbacks if isinstance(c, GradGuard))  # type: ignore[attr-defined]
        norm, threshold = stats.global_norm, guard.threshold
        post = norm if threshold is None else min(norm, threshold)
        self.metrics |= {tag(k): v for k, v in threshold_band(norm, post, threshold).items()}
        self.tracker.snapshot()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.tracker.pending:
            return
        self.metrics |= update_metrics(self.tracker.read(self.tracker.squared_norms()))
        self.metrics[tag("loss")] = float(outputs["loss"])
        assert trainer.logger is not None
        trainer.logger.log_metrics(self.metrics, step=trainer.global_step - 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-logs", type=Path, default=None, help="train into this folder and keep it")
    args = parser.parse_args()

    import quickstart
    import screenshots

    trainer_init = L.Trainer.__init__

    def with_bridge(self: L.Trainer, *a: Any, **k: Any) -> None:
        k["callbacks"] = [_Bridge(), *k.get("callbacks", [])]
        trainer_init(self, *a, **k)

    chromium = screenshots._chromium()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        logdir = args.keep_logs or tmp / "runs"
        L.Trainer.__init__ = with_bridge  # type: ignore[method-assign]
        try:
            quickstart.main(["--logdir", str(logdir)])
        finally:
            L.Trainer.__init__ = trainer_init  # type: ignore[method-assign]
        screenshots._shoot(chromium, logdir, {"dashboard.png": ("#custom_scalars", 1300, 1300)}, tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
