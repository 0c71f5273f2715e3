"""Progress bars for the long stages of ``tm.merge`` (tqdm, an optional dependency).

Each loop that can run for more than a few seconds (alignment sweeps, data passes, Gram and Fisher
collection, calibration passes, PLeaS layers) iterates ``bar(iterable, desc)``. Whether bars show
is one setting in a context variable, so deep functions need no ``progress`` argument:
``tm.merge(..., progress=...)`` (and ``tm.align``, ``tm.calibrate``) set it for everything they
call. ``True``/``False`` force bars on or off; ``None`` (the default) inherits an outer setting,
else shows bars when tqdm is importable and stderr is a terminal — so tests and logs stay quiet.
``progress=True`` without tqdm warns once per call and runs without bars. ``stage(label)`` names
the bars inside it (the outermost stage wins: a helper keeps its caller's name).

>>> with using(False):
...     [i for i in bar(range(3), "demo")]
[0, 1, 2]
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
import warnings
from collections.abc import Mapping

import torch

from .errors import ArgumentTypeError

_SETTING: contextvars.ContextVar = contextvars.ContextVar("torchmerge_progress", default=None)
_STAGE: contextvars.ContextVar = contextvars.ContextVar("torchmerge_progress_stage", default=None)


class _Setting:
    """One call's setting, and whether that call has already warned about a missing tqdm."""

    def __init__(self, on):
        self.on, self.warned = on, False


def _checked(progress):
    if progress is not None and not isinstance(progress, bool):
        raise ArgumentTypeError(f"progress={progress!r} is invalid: progress must be True, False or "
                                "None (auto: bars when tqdm is installed and stderr is a terminal)")
    return progress


@contextlib.contextmanager
def using(progress=None):
    """Bars on (``True``), off (``False``) or inherited/auto (``None``) for the calls inside."""
    if _checked(progress) is None:
        yield
        return
    token = _SETTING.set(_Setting(progress))
    try:
        yield
    finally:
        _SETTING.reset(token)


def scoped(fn):
    """Run ``fn`` under :func:`using` of its ``progress=`` keyword (a keyword-only parameter)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with using(kwargs.get("progress")):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def stage(label: str):
    """Name the bars created inside (unless an outer stage already names them)."""
    token = _STAGE.set(label) if _STAGE.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _STAGE.reset(token)


def _tqdm(force=None):
    """The tqdm class when bars are to show, else None."""
    setting = _SETTING.get()
    on = force if force is not None else setting.on if setting is not None else None
    if on is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if on and not (setting is not None and setting.warned):
            if setting is not None:
                setting.warned = True
            warnings.warn("progress=True, but tqdm is not installed: running without progress bars "
                          "(pip install tqdm)", UserWarning, stacklevel=4)
        return None
    if on is None:
        try:
            if not sys.stderr.isatty():
                return None
        except (AttributeError, ValueError):  # no stderr, or a closed one
            return None
    return tqdm


class _Silent:
    """What :func:`bar` returns when no bar shows: iterates its iterable, ignores updates."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        pass

    def set_postfix_str(self, s="", refresh=True):
        pass

    def close(self):
        pass


def bar(iterable=None, desc: str = "", total=None, progress=None):
    """A tqdm bar over ``iterable`` (or a manual one, ``iterable=None``: call ``.update()``) named
    by the current :func:`stage` or else ``desc`` — or, when bars are off, a silent stand-in that
    iterates the same items. ``progress``: True/False force it for this bar, None follows the
    setting. Use it as a context manager (``with bar(...) as it:``) where a loop may break early."""
    tqdm = _tqdm(_checked(progress))
    if tqdm is None:
        return _Silent(iterable)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, desc=_STAGE.get() or desc, total=total, leave=False, file=sys.stderr,
                dynamic_ncols=True)


def batch_total(batches, max_batches=None):
    """How many batches a pass over ``batches`` (capped at ``max_batches``) takes, if known: a bar's
    total. A Tensor or dict is one batch."""
    if isinstance(batches, (Mapping, torch.Tensor)):
        return 1
    sizes = [max_batches] if max_batches is not None else []
    if hasattr(batches, "__len__"):
        sizes.append(len(batches))
    return min(sizes) if sizes else None


__all__ = ["bar", "stage", "using", "scoped", "batch_total"]
