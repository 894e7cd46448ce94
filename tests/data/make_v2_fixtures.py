"""Writes the version-2 state fixtures in this folder. Run once, on the code before the v3 state format
(commit 69ced06, main with the engine refactor): ``PYTHONPATH=$PWD python tests/data/make_v2_fixtures.py``.

- ``v2_gradguard_step6.ckpt``: a Lightning checkpoint at global step 6 of ``tests/test_resume.py``'s
  ``Model(spikes=(10, 12), scheduler=True)`` under ``GradGuard(clip=AutoPolicy(warmup_steps=6),
  log_every_n_steps=3, histogram_every_n_steps=0, rollback=True, snapshot_every_n_steps=2)`` (clip policy,
  LR guard, diagnostics, heatmap, update ratios and recovery state all present).
- ``v2_guard_step8.pt``: ``Guard.state_dict()`` of a plain loop after 8 steps (see ``_plain_loop`` in
  ``tests/test_state_format.py``), saved with ``torch.save``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))

from tests.test_resume import Model, _every_step, _fit  # noqa: E402
from tests.test_state_format import _plain_loop, gradguard_for_fixture  # noqa: E402


def main() -> None:
    import lightning.pytorch as L

    L.seed_everything(0, verbose=False)
    init = Model(spikes=(10, 12), scheduler=True)
    tmp = HERE / "_tmp"
    _fit(tmp, copy.deepcopy(init), gradguard_for_fixture(), 6, extra=(_every_step(tmp / "ckpt"),))
    ckpt = torch.load(tmp / "ckpt" / "step=6.ckpt", weights_only=True)
    torch.save(ckpt, HERE / "v2_gradguard_step6.ckpt")
    guard, _ = _plain_loop(8)
    torch.save(guard.state_dict(), HERE / "v2_guard_step8.pt")
    import shutil

    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
