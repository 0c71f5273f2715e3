"""Model inputs: the one parser for every batch and example torchmerge reads.

A *batch* (from ``data``) is a Tensor (the input), an ``(x, y, ...)`` tuple/list (the first
element is the input, the rest are targets), or a dict of keyword arguments (the Hugging Face
convention; label keys such as ``labels`` are dropped). ``example_inputs`` (for tracing) is a
Tensor, a tuple of positional arguments, or a dict of keyword arguments. Both become
:class:`Inputs`, which calls a model as ``model(*args, **kwargs)``.

>>> import torch
>>> net = torch.nn.Linear(3, 2)
>>> calls = list(iter_calls([torch.ones(4, 3), (torch.zeros(5, 3), torch.tensor([1] * 5))]))
>>> [c.batch_size for c in calls], tuple(calls[0](net).shape)
([4, 5], (4, 2))
>>> batch_inputs({"input_ids": torch.ones(2, 7, dtype=torch.long), "labels": torch.ones(2)}).kwargs.keys()
dict_keys(['input_ids'])
"""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ShapeError, TorchMergeError

#: Keys of a dict batch that hold targets, not model inputs (dropped unless ``keep_labels``).
LABEL_KEYS = ("labels", "label", "label_ids", "targets")


@dataclass(frozen=True)
class Inputs:
    """Positional and keyword arguments of one model call."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __call__(self, model, **extra):
        """``model(*args, **kwargs, **extra)`` on fresh copies of the tensors: a forward that
        modifies its input in place (``x.mul_(2)``) changes neither the user's batch nor the
        input of the next model run on the same batch (one copy per call: cheap next to a forward)."""
        call = self.clone()
        return model(*call.args, **call.kwargs, **extra)

    def clone(self) -> "Inputs":
        """The same call with every tensor argument copied."""
        return self.map(torch.clone)

    def tensors(self) -> list:
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, torch.Tensor)]

    @property
    def batch_size(self) -> int | None:
        first = next(iter(self.tensors()), None)
        return None if first is None or first.dim() == 0 else first.shape[0]

    def map(self, fn) -> "Inputs":
        """Apply ``fn`` to every tensor argument."""
        f = lambda v: fn(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Inputs(tuple(f(v) for v in self.args), {k: f(v) for k, v in self.kwargs.items()})

    def to(self, device) -> "Inputs":
        return self if device is None else self.map(lambda t: t.to(device))

    def rows(self, index: torch.Tensor) -> "Inputs":
        """The samples ``index`` of every tensor whose first axis is the batch axis."""
        b = self.batch_size
        return self.map(lambda t: t.index_select(0, index.to(t.device)) if t.dim() and t.shape[0] == b else t)

    def first(self, n: int = 2) -> "Inputs":
        """The first ``n`` samples (this call if it has no more): tracing and verification run
        their input a few times, and a whole batch would cost a whole forward each time. Two, not
        one: a size-1 batch axis can be specialised away by ``torch.export``."""
        b = self.batch_size
        return self.rows(torch.arange(n)) if b is not None and b > n else self

    def on_first(self, fn, n: int = 2):
        """``fn(self.first(n))``, or ``fn(self)`` when that raises a :class:`TorchMergeError` (or
        there are no more samples): cheap when it can be, and an error is always about this call."""
        small = self.first(n)
        if small is not self:
            try:
                return fn(small)
            except TorchMergeError:
                pass  # a model that needs the whole batch (a fixed batch size): retried below
        return fn(self)

    def check_fits(self, model: nn.Module, what: str = "inputs") -> None:
        """Raise a :class:`ShapeError` listing ``model.forward``'s parameters if these do not bind."""
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            return
        try:
            sig.bind(*self.args, **self.kwargs)
        except TypeError as e:
            raise ShapeError(
                f"{what} ({len(self.args)} positional, keywords {sorted(self.kwargs)}) do not fit "
                f"{type(model).__name__}.forward{sig}: {e}. Give one value per forward argument: "
                "a tensor, a tuple of positional arguments, or a dict of keyword arguments.") from e

    def describe(self) -> str:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in self.args]
        kw = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
              for k, v in self.kwargs.items()}
        return f"args {shapes}, kwargs {kw}" if kw else f"args {shapes}"


def example_inputs_of(example) -> Inputs:
    """``example_inputs`` (Tensor, tuple of positional arguments, dict of keywords, or Inputs)."""
    if isinstance(example, Inputs):
        return example
    if isinstance(example, Mapping):
        return Inputs((), _drop_labels(example))
    if isinstance(example, (tuple, list)):
        return Inputs(tuple(example), {})
    if isinstance(example, torch.Tensor):
        return Inputs((example,), {})
    raise ShapeError(f"example_inputs is a {type(example).__name__}; expected a torch.Tensor, a tuple of "
                     "positional arguments, or a dict of keyword arguments shaped like one real batch")


def batch_inputs(batch, index: int = 0, keep_labels: bool = False) -> Inputs:
    """One data batch: Tensor, ``(x, y, ...)`` (x is the input), or a dict of keyword arguments."""
    if isinstance(batch, Inputs):
        return batch
    if isinstance(batch, torch.Tensor):
        return Inputs((batch,), {})
    if isinstance(batch, Mapping):
        kwargs = dict(batch) if keep_labels else _drop_labels(batch)
        if not kwargs:
            raise TorchMergeError(f"batch {index} is a dict holding only labels ({sorted(map(str, batch))}); "
                                  "add the model's input keys (e.g. input_ids, pixel_values)")
        return Inputs((), kwargs)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, Mapping)):
        return batch_inputs(batch[0], index, keep_labels)
    what = type(batch).__name__
    if isinstance(batch, (tuple, list)):
        what += " whose first element is " + (type(batch[0]).__name__ if batch else "missing")
    raise TorchMergeError(f"batch {index} is a {what}; expected a Tensor, an (inputs, targets) "
                          "tuple/list with a Tensor first, or a dict of keyword arguments")


def _drop_labels(mapping: Mapping) -> dict:
    return {k: v for k, v in mapping.items() if k not in LABEL_KEYS}


def iter_calls(batches, max_batches: int | None = None, device=None) -> Iterator[Inputs]:
    """Yield each batch's :class:`Inputs`, moved to ``device`` (unchanged when ``None``).

    A single Tensor or dict is one batch (not iterated row by row).
    """
    if isinstance(batches, (torch.Tensor, Mapping, Inputs)):
        batches = [batches]
    if not isinstance(batches, Iterable):
        raise TorchMergeError(f"batches is a {type(batches).__name__}; expected an iterable of batches "
                              "(a DataLoader, a list of Tensors, of (x, y) tuples or of dicts)")
    if max_batches is not None and max_batches < 1:
        raise TorchMergeError(f"max_batches must be a positive int or None, got {max_batches!r}")
    for index, batch in enumerate(itertools.islice(batches, max_batches)):
        yield batch_inputs(batch, index).to(device)


def output_tensor(out) -> torch.Tensor:
    """The main tensor of a model's output: itself, ``.logits`` (Hugging Face output objects), or
    the first tensor of a tuple/dict."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TorchMergeError(f"the model returned a {type(out).__name__}; expected a tensor, an output "
                          "object with .logits, or a tuple/dict holding a tensor")


def batch_targets(batch, index: int = 0):
    """The targets of a batch: ``y`` of ``(x, y)``, or a dict's label key; None if there are none."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        return next((batch[k] for k in LABEL_KEYS if k in batch), None)
    return None


def first_call(batches, device=None, what: str = "data") -> Inputs:
    """The first batch's inputs, copied (tracing runs the model on them: a forward that modifies
    its input in place must not change the user's batch); a clear error for an empty iterable."""
    first = next(iter(iter_calls(batches, 1, device)), None)
    if first is None:
        raise TorchMergeError(f"{what} is empty: give at least one batch")
    return first.clone()


__all__ = ["Inputs", "LABEL_KEYS", "batch_inputs", "batch_targets", "example_inputs_of", "iter_calls",
           "first_call", "output_tensor"]
