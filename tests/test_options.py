"""The options are declared once (GuardOptions): every front-end's signature follows the declaration, each
option is checked by it (TypeError for a wrong type, ValueError for a wrong value, naming the option and the
value), and no front-end keeps copies of the options."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_gradguard import FabricGuard, GradClip, GradGuard, GradMonitor, Guard, LRGuard
from lightning_gradguard.options import GuardOptions, option_names

#: Arguments of a front-end that are not options: what it is attached to.
FRONT_END_ONLY = {"self", "model", "optimizer", "writer", "scaler", "scheduler", "fabric"}
DECLARED = {option.name: option for option in dataclasses.fields(GuardOptions)}
HINTS = typing.get_type_hints(GuardOptions)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _option_parameters(init: Callable[..., Any]) -> list[inspect.Parameter]:
    return [p for name, p in inspect.signature(init).parameters.items() if name not in FRONT_END_ONLY]


@pytest.mark.parametrize("front_end", [GradGuard, Guard], ids=lambda c: c.__name__)
def test_signature_lists_every_declared_option_with_its_default_and_type(front_end: type) -> None:
    parameters = _option_parameters(front_end.__init__)
    assert [p.name for p in parameters] == list(option_names())
    hints = typing.get_type_hints(front_end.__init__)
    for parameter in parameters:
        declared = DECLARED[parameter.name]
        assert parameter.default == declared.default, parameter.name
        assert type(parameter.default) is type(declared.default), parameter.name
        assert hints[parameter.name] == HINTS[parameter.name], parameter.name
        assert parameter.kind is parameter.POSITIONAL_OR_KEYWORD


def test_grad_clip_spells_out_clip_and_max_norm_as_declared() -> None:
    parameters = {p.name: p for p in _option_parameters(GradClip.__init__) if p.kind is p.POSITIONAL_OR_KEYWORD}
    assert list(parameters) == ["clip", "max_norm"]
    assert all(p.default == DECLARED[name].default for name, p in parameters.items())
    assert typing.get_type_hints(GradClip.__init__)["max_norm"] == HINTS["max_norm"]


def _defaults() -> dict[str, Any]:
    return {name: option.default for name, option in DECLARED.items()}


def test_every_front_end_takes_every_option_by_name() -> None:
    defaults = _defaults()
    assert GradGuard(**defaults).options == GuardOptions()
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    assert Guard(net, optimizer, **defaults).options == GuardOptions()
    fabric = Fabric(accelerator="cpu", devices=1)
    assert FabricGuard(fabric, net, optimizer, **defaults).options == GuardOptions()
    clip_options = {**defaults, "histogram_every_n_steps": 7}
    assert GradClip(**clip_options).options.histogram_every_n_steps == 7
    changes_training = option_names(changes_training=True)
    expected = ("clip", "max_norm", "on_nonfinite", "max_consecutive_skips", "lr_guard", "rollback", "skip_list")
    assert changes_training == expected
    monitor = GradMonitor(**{k: v for k, v in defaults.items() if k not in changes_training})
    assert monitor.options.clip is None and monitor.options.lr_guard is False
    for name in changes_training:
        with pytest.raises(TypeError, match=f"GradMonitor only monitors; `{name}` is not accepted"):
            GradMonitor(**{name: defaults[name]})


@pytest.mark.parametrize("front_end", ["GradGuard", "Guard"])
def test_no_front_end_keeps_a_copy_of_an_option(front_end: str) -> None:
    if front_end == "GradGuard":
        guard: Any = GradGuard()
    else:
        net = _net()
        guard = Guard(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert not set(vars(guard)) & set(option_names())
    with pytest.raises(dataclasses.FrozenInstanceError):
        guard.options.histogram_every_n_steps = 5
    with pytest.raises(AttributeError):
        guard.options = GuardOptions()


def test_on_event_can_be_replaced_before_fit_and_is_checked() -> None:
    guard = GradGuard()
    events: list[Any] = []
    guard.on_event = events.append
    assert guard.on_event == events.append and guard.options.on_event == events.append
    with pytest.raises(TypeError, match="`on_event` must be a callable"):
        guard.on_event = 3  # type: ignore[assignment]


# name, a value of the wrong type, a value of the right type that is not allowed (None: there is none)
CHECKS: list[tuple[str, Any, Any]] = [
    ("clip", 3, "median"),
    ("max_norm", "1.0", -1.0),
    ("on_nonfinite", 0, "ignore"),
    ("max_consecutive_skips", 2.5, 0),
    ("lr_guard", "yes", None),
    ("group_by", 1.5, "layer"),
    ("log_every_n_steps", "10", 0),
    ("log_layer_norms", 1, None),
    ("histogram_every_n_steps", True, -1),
    ("histogram_bins", 64.0, 0),
    ("diagnostics", 1, None),
    ("heatmap_every_n_steps", 1.5, -1),
    ("log_update_ratios", "no", None),
    ("on_event", 3, None),
    ("rollback", "yes", None),
    ("snapshot_every_n_steps", np.float64(10.0), 0),
    ("diagnose_every_n_steps", None, 0),
    ("incidents", "yes", None),
    ("replay", 1, None),
    ("batch_ids", 3, None),
    ("skip_list", 3, "no/such/skip_list.json"),
]


def test_every_option_has_a_check_case() -> None:
    assert [name for name, _, _ in CHECKS] == list(option_names())


@pytest.mark.parametrize(("name", "wrong_type", "wrong_value"), CHECKS, ids=[c[0] for c in CHECKS])
def test_a_wrong_type_is_a_type_error_and_a_wrong_value_a_value_error(
    name: str, wrong_type: Any, wrong_value: Any
) -> None:
    with pytest.raises(TypeError, match=rf"^`{name}` must be ") as info:
        GuardOptions(**{name: wrong_type})
    assert repr(wrong_type) in str(info.value)
    if wrong_value is not None:
        with pytest.raises(ValueError, match=rf"^`{name}` must be ") as info:
            GuardOptions(**{name: wrong_value})
        assert str(info.value).endswith(f"got {wrong_value!r}")


def test_numpy_scalars_are_kept_as_python_values() -> None:
    options = GuardOptions(
        max_norm=np.float32(2.0),
        group_by=np.int64(2),
        log_layer_norms=np.bool_(False),
        lr_guard=np.bool_(True),
        histogram_bins=torch.tensor(8),
    )
    assert type(options.max_norm) is float and type(options.group_by) is int and type(options.histogram_bins) is int
    assert options.log_layer_norms is False and options.lr_guard is True
    assert isinstance(options.lr_guard_template, LRGuard)


def test_what_the_options_resolve_to() -> None:
    assert GuardOptions().log_every() == 50 and GuardOptions().log_every(10) == 10
    assert GuardOptions(log_every_n_steps=5).log_every(10) == 5
    assert GuardOptions(clip=None).lr_guard_template is None and GuardOptions(clip=None).rollback_template is None
    assert GuardOptions(lr_guard=False).rollback_template is None  # a rollback lowers the LR through the LR guard
    assert GuardOptions(diagnostics=False).diagnostics_template is None
    with pytest.raises(ValueError, match="`lr_guard` needs clipping"):
        GuardOptions(clip=None, lr_guard=LRGuard())
    with pytest.raises(ValueError, match="`clip='fixed'` requires `max_norm`"):
        GuardOptions(clip="fixed")
