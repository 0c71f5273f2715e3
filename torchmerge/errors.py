"""One exception hierarchy for every error torchmerge raises on bad input.

Catch :class:`TorchMergeError` to catch them all; the subclasses also inherit the matching
built-in (``ValueError``/``TypeError``) so generic handlers keep working.
"""


class TorchMergeError(Exception):
    """Base class: the message names the module path, the fx node and the shapes involved."""


class TraceError(TorchMergeError, TypeError):
    """The model could not be traced with torch.fx (data-dependent control flow, untraceable op)."""


class ShapeError(TorchMergeError, ValueError):
    """Example inputs or tensors have shapes the model or the spec cannot accept."""


class SpecError(TorchMergeError, ValueError):
    """A permutation spec, or permutations given for it, do not fit the model."""


class VerificationError(TorchMergeError):
    """Permuting with the discovered spec changed the model's function (an op used in a way the
    tracer could not see); the message names the spaces involved and how to freeze them."""


class ArgumentError(TorchMergeError, ValueError):
    """An argument of ``tm.merge`` / ``tm.calibrate`` has a value that cannot be right (an empty
    task, a non-finite hyper-parameter, NaN weights, duplicate task names...); checked up front,
    before any expensive work. The message names the argument, the expert or task index and what
    to pass instead."""


class ArgumentTypeError(TorchMergeError, TypeError):
    """An argument of ``tm.merge`` / ``tm.calibrate`` has the wrong type (``k="0.2"``,
    ``task_names="ab"``, ``data=5``); checked up front."""


def did_you_mean(value, valid) -> str:
    """`` (did you mean 'ties'?)`` for a near miss of ``value`` among the names ``valid`` (compared
    case-insensitively; a miss by case only says so), else ``""``."""
    import difflib

    if not isinstance(value, str):
        return ""
    lower = {v.lower(): v for v in valid if isinstance(v, str)}
    close = difflib.get_close_matches(value.lower(), list(lower), n=1, cutoff=0.6)
    if not close:
        return ""
    case = " names are case-sensitive" if close[0] == value.lower() else ""
    return f" (did you mean {lower[close[0]]!r}?{case})"


def unknown_name(what: str, value, valid) -> str:
    """The message for a name that is not one of ``valid``: names are exact (case-sensitive, as
    documented); a near miss gets a "did you mean", then the full valid list.

    >>> unknown_name("merge method", "Ties", ["average", "ties"])
    "unknown merge method 'Ties' (did you mean 'ties'? names are case-sensitive); valid: 'average', 'ties'"
    """
    return f"unknown {what} {value!r}{did_you_mean(value, valid)}; valid: {', '.join(map(repr, valid))}"
