"""Errors and cooperative cancellation shared by core, engine, CLI and the napari scheduler."""

from __future__ import annotations

import math
import threading
from typing import Callable, Optional


class InputError(ValueError):
    """Bad user input (wrong dimensions, NaN, unreadable file, ...).

    The message is one clear, specific sentence meant for the user: the CLI prints it as its
    one-line reason and the napari widgets show it as a notification.
    """


class Cancelled(RuntimeError):
    """Raised inside long computations when their cancel token was set."""


class CancelToken:
    """Thread-safe cancel flag, checked by long computations between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


# progress(fraction in [0, 1], short message)
ProgressCallback = Callable[[float, str], None]


def check_cancel(cancel: Optional[CancelToken]) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set (``None`` means not cancellable)."""
    if cancel is not None:
        cancel.raise_if_cancelled()


def report(progress: Optional[ProgressCallback], fraction: float, message: str = "") -> None:
    """Call ``progress`` if given, clamping the fraction to [0, 1]."""
    if progress is not None:
        progress(min(1.0, max(0.0, float(fraction))), message)


def finite_number(value, name: str) -> float:
    """``value`` as a finite float, else an :class:`InputError` naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number; got {value!r}") from None
    if not math.isfinite(v):
        raise InputError(f"{name} must be finite; got {v}")
    return v
