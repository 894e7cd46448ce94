"""Argument checks shared by every public constructor: messages name the argument, the range and the value.

A value of the wrong type is a ``TypeError``, a value of the right type outside the allowed ones a
``ValueError``. Numpy scalars and 0-d tensors count as the Python numbers they hold (:func:`python_scalar`).
This module imports nothing from the package: every layer may use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, get_args

ClipName = Literal["auto", "fixed", "percentile", "zscore"]
OnNonFinite = Literal["skip", "raise", "warn"]
#: The clip policies known by name (declared once, from :data:`ClipName`).
CLIP_NAMES: tuple[str, ...] = get_args(ClipName)
ON_NONFINITE: tuple[str, ...] = get_args(OnNonFinite)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a Python int or float after :func:`python_scalar` (a bool is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, int | float)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int ``>= minimum``; ``TypeError`` for a non-int (bools included), else ``ValueError``.

    Numpy integers and 0-d integer tensors are accepted (:func:`python_scalar`); numpy bools are bools.

    Example:

        >>> import numpy as np
        >>> check_int("window", np.int64(5), 1)
        5
    """
    plain = python_scalar(value)
    if isinstance(plain, bool) or not isinstance(plain, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if plain < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return plain


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool: ``True``, ``False`` or a numpy bool; ``TypeError`` for anything else (``0``, ``1``).

    Example:

        >>> import numpy as np
        >>> check_bool("log_update_ratios", np.bool_(False))
        False
    """
    plain = python_scalar(value)
    if not isinstance(plain, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__})")
    return plain


def check_real(name: str, value: Any) -> float:
    """``value`` as a finite float (``TypeError`` for a non-number, bools included)."""
    plain = python_scalar(value)
    if not is_number(plain):
        raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__})")
    out = float(plain)
    if not math.isfinite(out):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    return out


def check_positive_real(name: str, value: Any) -> float:
    """``value`` as a finite float ``> 0``."""
    out = check_real(name, value)
    if out <= 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}")
    return out


def check_open_unit(name: str, value: Any) -> float:
    """``value`` as a float in ``(0, 1)``."""
    out = check_real(name, value)
    if not 0.0 < out < 1.0:
        raise ValueError(f"`{name}` must be in (0, 1), got {value!r}")
    return out


def check_float(name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    """``value`` as a float in the interval ``lo..hi`` (open or closed at each end; ``inf`` only for ``[.., inf]``)."""
    plain = python_scalar(value)
    if not is_number(plain):
        raise TypeError(f"`{name}` must be a float, got {value!r} ({type(value).__name__})")
    v = float(plain)
    ok = math.isfinite(v) or (v == math.inf and hi == math.inf and not hi_open)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"`{name}` must be in {rng}, got {value!r}")
    return v


def check_number(name: str, value: float, minimum: float, inclusive: bool, allowed: str) -> float:
    """``value`` as a float ``>= minimum`` (``inclusive``) or ``> minimum``; ``allowed`` words the range."""
    plain = python_scalar(value)
    if not is_number(plain):
        raise TypeError(f"`{name}` must be a number {allowed}, got {value!r}")
    out = float(plain)
    ok = out >= minimum if inclusive else out > minimum
    if math.isnan(out) or not ok:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return out


def check_choice(name: str, value: Any, choices: Iterable[str], extra: str = "") -> None:
    """``value`` must be one of ``choices`` ("`name` must be one of a, b{extra}, got v").

    ``TypeError`` for a value that is not a string, ``ValueError`` for a string that is not one of them.
    """
    choices = tuple(choices)
    if value in choices and isinstance(value, str):
        return
    error = ValueError if isinstance(value, str) else TypeError
    got = repr(value) if isinstance(value, str) else _got(value)
    raise error(f"`{name}` must be one of {', '.join(choices)}{extra}, got {got}")


def check_flag_or(name: str, value: Any, kind: type, kind_name: str) -> None:
    """``value`` must be ``True``, ``False`` (numpy bools included) or an instance of ``kind``; ``TypeError`` else."""
    if not isinstance(python_scalar(value), bool | kind):
        raise TypeError(f"`{name}` must be True, False or {kind_name} instance, got {_got(value)}")


def check_hook(name: str, value: Any) -> None:
    """``TypeError`` unless ``value`` is ``None`` or callable."""
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be a callable taking one GuardEvent, or None, got {value!r}")


def check_finite_positive(name: str, value: Any, allow_none: bool = False) -> None:
    """``value`` must be a finite number > 0 (or ``None`` when allowed); ``TypeError`` for a non-number."""
    if value is None and allow_none:
        return
    allowed = f"a finite number > 0{' or None' if allow_none else ''}"
    plain = python_scalar(value)
    if not is_number(plain):
        raise TypeError(f"`{name}` must be {allowed}, got {_got(value)}")
    if not 0 < plain < math.inf:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")


def _got(value: Any) -> str:
    """The "got ..." part of a message about a value of the wrong type: its repr and its type."""
    return f"{value!r} ({type(value).__name__})"


def python_scalar(value: Any) -> Any:
    """A numpy scalar or a 0-d tensor as the Python ``bool`` / ``int`` / ``float`` it holds; anything else as is.

    Arguments are stored in the checkpoint's state, which must load with ``torch.load(weights_only=True)``:
    ``np.float64(5.0)`` or ``torch.tensor(5.0)`` would not.

    Example:

        >>> import numpy as np
        >>> python_scalar(np.float64(5.0)), python_scalar(np.int64(3)), python_scalar("auto")
        (5.0, 3, 'auto')
    """
    if type(value) in (bool, int, float) or value is None or isinstance(value, str):
        return value
    module = type(value).__module__
    is_numpy = module == "numpy" and getattr(value, "shape", None) == ()
    is_tensor = module.startswith("torch") and hasattr(value, "dim") and value.dim() == 0 and not value.is_complex()
    if is_numpy or is_tensor:
        out = value.item()
        if isinstance(out, bool | int | float):
            return out
    return value
