"""Validation helpers shared by every layer: integers that are not booleans, positive numbers.

``True`` is an ``int`` in Python, so ``isinstance(x, int)`` alone accepts ``n_chains=True``;
every check here refuses booleans. Two kinds of integer check exist, and each caller keeps the
one it always had:

* *strict* (``strict=True``): the type must be ``int`` or a numpy integer (``2.0`` is refused);
* *loose* (``strict=False``): any number equal to an integer (``2.0`` is accepted and returned as
  ``2``); a value that ``int()`` cannot convert raises ``int()``'s own ``TypeError`` or
  ``ValueError``.

The error messages are part of the interface (tests and users match them): "Expected an integer
{name} >= {minimum}; got {value!r}".

Example:
    >>> check_int("chains", 4, 1)
    4
    >>> is_int(True), is_int(2.0), is_int(2.0, strict=False), is_int(3, minimum=4)
    (False, False, True, False)
    >>> check_int("chains", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: Expected an integer chains >= 1; got 0
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "is_int",
    "is_real",
    "check_int",
    "check_positive",
    "check_positive_float",
    "float_or_none",
]


def is_int(value: Any, *, minimum: int | None = None, strict: bool = True) -> bool:
    """Whether ``value`` is an integer (never a boolean), at least ``minimum`` if given.

    Args:
        value: the value to test.
        minimum: the smallest value allowed (``None``: no bound).
        strict: require the type ``int`` or a numpy integer; else accept any number equal to an
            integer (``int(value)`` raises as usual for a value it cannot convert).
    """
    if isinstance(value, bool):
        return False
    if strict:
        if not isinstance(value, (int, np.integer)):
            return False
    elif int(value) != value:
        return False
    return minimum is None or value >= minimum


def is_real(value: Any) -> bool:
    """Whether ``value`` is a Python ``int`` or ``float`` (numpy floats too), not a boolean."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int, *, strict: bool = True) -> int:
    """``value`` as an ``int``, or ``ValueError("Expected an integer {name} >= {minimum}; ...")``.

    ``strict`` as for :func:`is_int`.
    """
    if not is_int(value, minimum=minimum, strict=strict):
        raise ValueError(f"Expected an integer {name} >= {minimum}; got {value!r}")
    return int(value)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a finite ``float > 0``; else "Expected a finite {name} > 0; got ..."."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Expected a finite {name} > 0; got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"Expected a finite {name} > 0; got {value!r}")
    return v


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a finite ``float > 0`` (a step size, a trajectory length).

    Raises:
        ValueError: "Expected a positive float for {name}; got ..." if it is no number,
            "Expected {name} > 0 and finite; got ..." if it is not positive and finite.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Expected a positive float for {name}; got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"Expected {name} > 0 and finite; got {value}")
    return v


def float_or_none(x: Any) -> float | None:
    """``x`` as a finite ``float``, else ``None`` (for numbers read from metadata).

    Booleans, strings that are not numbers, ``None``, NaN and infinities all give ``None``.

    Example:
        >>> float_or_none("1.5"), float_or_none(True), float_or_none(float("nan"))
        (1.5, None, None)
    """
    if isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
