"""Test-wide isolation for in-process distributed launches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# Lightning's ddp_spawn writes these into os.environ and leaves them there; a later launch in the same
# pytest process would then reuse a port that may still be in TIME_WAIT. Each test starts without them,
# so Lightning picks a fresh free port.
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@pytest.fixture(autouse=True)
def _fresh_distributed_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in _DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    yield
