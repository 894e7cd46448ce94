"""Saved state as data: a dataclass per stateful part, written as plain Python values and read back field by field.

A part's state is one dataclass; its fields are the saved keys, declared once. :func:`state_to_dict` writes it
as primitives (``deque`` and ``tuple`` as lists, an infinite float field as ``None``), which load with
``torch.load(weights_only=True)``; :func:`state_from_dict` reads such a dict into a fresh instance: a key it lacks
keeps the fresh value (a field added since the state was saved), ``None`` is ``None`` for an optional field and
the fresh value otherwise (an infinite float), a key the dataclass does not declare is ignored and returned, so
the caller decides whether to say so. A ``deque``, list or dict field names how its saved items are read back in
its metadata: ``window: deque[float] = field(default_factory=deque, metadata={"item": float})`` (dict keys are
read as ``str``). Nothing here imports from the package.
"""

from __future__ import annotations

import ast
import inspect
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import Field, fields
from typing import Any, TypeVar

__all__ = [
    "config_differs",
    "config_text",
    "constructor_config",
    "state_from_dict",
    "state_to_dict",
    "version_2_config",
]

T = TypeVar("T")

#: Scalar field annotations and how a saved value is read back into them.
_SCALARS: dict[str, Callable[[Any], Any]] = {
    "float": float,
    "int": int,
    "bool": bool,
    "str": str,
    "float | None": float,
    "int | None": int,
}


def _plain(value: Any) -> Any:
    if isinstance(value, deque | list | tuple):
        return [_plain(v) for v in value]
    return value


def state_to_dict(state: Any) -> dict[str, Any]:
    """Every field of the dataclass ``state`` as plain Python values (an infinite float field as ``None``)."""
    return {
        f.name: None if isinstance(v, float) and math.isinf(v) else _plain(v)
        for f in fields(state)
        for v in (getattr(state, f.name),)
    }


def _read(f: Field[Any], current: Any, saved: Any) -> Any:
    if isinstance(current, deque):
        current.extend(f.metadata["item"](x) for x in saved)
        return current
    if "item" in f.metadata:  # a list, or a dict of str keys
        item = f.metadata["item"]
        if isinstance(current, dict):
            return {str(k): item(v) for k, v in saved.items()}
        return [item(x) for x in saved]
    if saved is None:  # an optional field's None; else an infinite float: the fresh value
        return None if str(f.type).endswith("| None") else current
    convert = _SCALARS.get(str(f.type))
    return saved if convert is None else convert(saved)


def state_from_dict(fresh: T, saved: Mapping[str, Any]) -> tuple[T, list[str]]:
    """``fresh`` (a dataclass instance, changed in place) with the values of ``saved``; returns it and the keys
    of ``saved`` it does not declare."""
    declared = {f.name: f for f in fields(fresh)}  # type: ignore[arg-type]
    for name, value in saved.items():
        f = declared.get(name)
        if f is not None:
            setattr(fresh, name, _read(f, getattr(fresh, name), value))
    return fresh, sorted(k for k in saved if k not in declared)


def config_differs(saved: Mapping[str, Any], now: Mapping[str, Any], default: Mapping[str, Any]) -> bool:
    """Whether a saved configuration differs from the current one. An option the saved one lacks (added after the
    checkpoint was written) counts only if it is set to something else than its default now."""
    return any(k not in now for k in saved) or any(saved.get(k, default.get(k)) != v for k, v in now.items())


def constructor_config(obj: Any, cls: type) -> dict[str, Any]:
    """``cls``'s constructor arguments as ``obj`` holds them (an attribute per argument), as plain values."""
    parameters = inspect.signature(cls).parameters  # the constructor's, without self
    return {name: getattr(obj, name) for name in parameters}


def config_text(name: str, config: Mapping[str, Any]) -> str:
    """``config`` written as the constructor call ``name(k=v, ...)`` (for messages)."""
    return f"{name}({', '.join(f'{k}={v}' for k, v in config.items())})"


def version_2_config(text: str) -> dict[str, Any] | None:
    """A version-2 state's configuration string (``"LRGuard(patience=10, ...)"``) as a dict; ``None`` if it is not
    a call with literal keyword arguments."""
    try:
        call = ast.parse(text, mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            return None
        return {str(kw.arg): ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError):
        return None
