"""Writes the version-2 checkpoints ``tests/test_state.py`` resumes from: run once, on the code that wrote
``STATE_VERSION = 2`` (``PYTHONPATH=$PWD python tests/data/make_v2_state_fixtures.py``).

- ``v2_state_<name>_step6.ckpt``: a Lightning checkpoint at global step 6 of ``tests/test_resume.py``'s
  ``Model(spikes=(8, 10), scheduler=True)`` under ``tests/test_state.py``'s ``GUARDS[name]`` (the default
  GradGuard, one with ``rollback=True`` and one with ``clip="percentile"``).
- ``v2_state_loop_step8.pt``: ``Guard.state_dict()`` of ``tests/test_state.py``'s plain loop after 8 steps.
"""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))

from tests.test_resume import _every_step, _fit  # noqa: E402
from tests.test_state import GUARDS, _lightning_model, _plain_loop  # noqa: E402


def main() -> None:
    tmp = HERE / "_tmp"
    for name, make in GUARDS.items():
        _fit(tmp / name, _lightning_model(), make(), 6, extra=(_every_step(tmp / name / "ckpt"),))
        ckpt = torch.load(tmp / name / "ckpt" / "step=6.ckpt", weights_only=True)
        torch.save(ckpt, HERE / f"v2_state_{name}_step6.ckpt")
    guard, _ = _plain_loop(8)
    torch.save(copy.deepcopy(guard.state_dict()), HERE / "v2_state_loop_step8.pt")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
