"""``python -m lightning_gradguard report RUN_DIR``: same as the ``gradguard`` console script."""

from __future__ import annotations

from lightning_gradguard.outputs.report import main

if __name__ == "__main__":
    raise SystemExit(main())
