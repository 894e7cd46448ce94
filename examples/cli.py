"""LightningCLI with GradGuard configured from YAML.

    python examples/cli.py fit --config examples/cli_config.yaml [--trainer.max_steps N]

``cli_config.yaml`` adds ``lightning_gradguard.GradGuard`` to ``trainer.callbacks`` with ``class_path`` and
``init_args`` (including a configured ``LRGuard``), like any Lightning callback; every GradGuard argument can
also be overridden on the command line, e.g. ``--trainer.callbacks.init_args.max_norm 5``. Needs
``jsonargparse[signatures]`` (in the ``dev`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import one_thread_unless_set, quiet_lightning
from quickstart import DigitsClassifier, digits_loader


class DigitsData(L.LightningDataModule):
    """scikit-learn's digits as a data module.

    Args:
        batch_size: samples per batch.
    """

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader[tuple[object, ...]]:
        return digits_loader(self.batch_size)


def main(argv: list[str] | None = None) -> LightningCLI:
    """Run the CLI; ``argv`` as on the command line (``None``: ``sys.argv[1:]``)."""
    quiet_lightning()
    return LightningCLI(DigitsClassifier, DigitsData, args=argv, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    one_thread_unless_set()  # tiny models: a second thread only waits on a busy machine
    main()
