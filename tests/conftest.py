"""Test-wide isolation for in-process distributed launches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import lightning as L

    from lightning_gradguard import GradGuard

# Lightning's ddp_spawn writes these into os.environ and leaves them there; a later launch in the same
# pytest process would then reuse a port that may still be in TIME_WAIT. Each test starts without them,
# so Lightning picks a fresh free port.
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@pytest.fixture(autouse=True)
def _fresh_distributed_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in _DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture(scope="session")
def sigmoid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[GradGuard, L.Trainer]:
    """A deep Sigmoid classifier trained under GradGuard (its early layers vanish), fitted once for the tests
    that read its verdicts (diagnostics) or its run directory (the report, the TensorBoard server)."""
    from .test_diagnostics_trainer import Classifier, _mlp, _train

    tmp = tmp_path_factory.mktemp("sigmoid")
    with pytest.warns(UserWarning, match="vanishing"):
        return _train(tmp, Classifier(_mlp(10, 64, "sigmoid")))
