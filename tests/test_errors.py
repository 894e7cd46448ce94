"""One error family: everything GradGuard raises once training runs is a GradGuardError (and a RuntimeError);
the errors are importable from the top-level package and from the module that raises them."""

from __future__ import annotations

import pytest

import lightning_gradguard
from lightning_gradguard import GradGuardError, NonFiniteGradientsError, RecoveryError


@pytest.mark.parametrize("error", [GradGuardError, NonFiniteGradientsError, RecoveryError], ids=lambda e: e.__name__)
def test_every_error_is_a_gradguard_error_and_a_runtime_error(error: type[Exception]) -> None:
    assert issubclass(error, GradGuardError) and issubclass(error, RuntimeError)
    with pytest.raises(GradGuardError):
        raise error("stop")


def test_the_errors_are_one_class_wherever_they_are_imported_from() -> None:
    from lightning_gradguard.decide import engine
    from lightning_gradguard.recovery import rollback

    assert engine.NonFiniteGradientsError is NonFiniteGradientsError and engine.GradGuardError is GradGuardError
    assert rollback.RecoveryError is RecoveryError
    assert {"GradGuardError", "NonFiniteGradientsError", "RecoveryError"} <= set(lightning_gradguard.__all__)
