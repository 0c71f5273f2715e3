"""MergedModel: one module serving every task, switched like peft adapters.

Two builds share this task API (``set_task``, ``with model.task(t)``, ``task=`` in the call,
``sites``, ``heads``, ``task_parameters``, ``export``, ``save``):

* :class:`GraphMergedModel` — the fx-rewritten reference expert in ``body`` (``build="graph"``);
* :class:`torchmerge.inject.InjectedModel` — a copy of the reference expert, still an instance of
  the user's own class, with task modules injected at module boundaries (``build="inject"``).

>>> import torch, torchmerge as tm
>>> experts = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, k))
...            for k in (3, 5)]
>>> merged = tm.merge(experts, method="average", example_inputs=torch.randn(2, 4), align=None,
...                   correction=None)
>>> merged.set_task(1)
>>> merged(torch.randn(2, 4)).shape
torch.Size([2, 5])
>>> with merged.task(0):
...     merged(torch.randn(2, 4)).shape
torch.Size([2, 3])
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from torch import nn

from .batches import Inputs
from .errors import TorchMergeError
from .modules import TaskAffine, TaskHeads, check_task_ids, stitch_rows
from .rewrite import export_graph, into_module


def _rewrite_weights(module, incompatible_keys) -> None:
    """After load_state_dict the bound TALL buffers hold weights of the old masks: refresh them."""
    module.task_weights.write(module._weights_root(), module.active_task)


class MergedModel(nn.Module):
    """The task API of every merged model (both builds are instances of this class).

    ``task=None`` uses the active task (``set_task`` / ``with model.task(t)``); an int or name
    selects one task; a LongTensor ``[B]`` gives each sample its own task (batch axis first).
    ``task_weights``, if given (TALL masks), is a :class:`~torchmerge.task_weights.TaskWeights`:
    each forward computes its task's weights from it and runs with them (nothing is written into
    the model during forward, so it trains like any other merged model: mixed batches, several
    tasks' losses in one backward, torch.compile, DDP). The masked tensors are no parameters of
    the model but non-persistent buffers holding the active task's weights, refreshed by
    ``set_task``, so a submodule called directly runs the active task too.
    """

    def _init_tasks(self, task_names, task_weights=None) -> None:
        """Set the task state (called by each build's constructor)."""
        self.task_names = [str(t) for t in task_names]
        self.active_task = 0
        self.task_weights = task_weights  # a TaskWeights submodule (TALL masks) or None
        self.info = {}
        if task_weights is not None:
            task_weights.bind(self._weights_root(), 0)
            self.register_load_state_dict_post_hook(_rewrite_weights)

    # -- tasks ------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def task_index(self, task) -> int:
        """The index of a task name, or a validated int index."""
        if isinstance(task, str):
            if task not in self.task_names:
                raise TorchMergeError(f"unknown task {task!r}; tasks: {self.task_names}")
            return self.task_names.index(task)
        check_task_ids(task, self.num_tasks)
        return int(task)

    def set_task(self, task) -> None:
        """Make ``task`` (index or name) the one ``forward`` uses by default. TALL: its weights are
        also put in the model's buffers (outside forward), for submodules called directly."""
        t = self.task_index(task)
        if self.task_weights is not None and t != self.active_task:
            self.task_weights.write(self._weights_root(), t)
        self.active_task = t

    @contextlib.contextmanager
    def task(self, task):
        """``with model.task(t): ...`` — temporarily switch the active task."""
        previous = self.active_task
        self.set_task(task)
        try:
            yield self
        finally:
            self.set_task(previous)

    def _weights_root(self) -> nn.Module:
        """The module tree whose tensors the TALL task weights replace (names relative to it)."""
        return self

    def _weights_of(self, t: int, as_parameters: bool = False):
        """A context running the model with task t's TALL weights (none to put: a no-op)."""
        if self.task_weights is None:
            return contextlib.nullcontext()
        return self.task_weights.use(self._weights_root(), t, as_parameters)

    def _check_ids(self, ids: torch.Tensor, batch: int | None, device) -> None:
        check_task_ids(ids, self.num_tasks, batch, where=" (model(x, task=ids))")
        if device is not None and ids.device != device:
            raise TorchMergeError(f"task ids are on {ids.device} but the inputs are on {device}; "
                                  "move them with ids.to(x.device)")

    # -- views ------------------------------------------------------------------------------
    def _task_modules(self, kind) -> dict:
        return {n: m for n, m in self.named_modules() if isinstance(m, kind)}

    def sites(self) -> dict:
        """{name: TaskAffine} in module order."""
        return self._task_modules(TaskAffine)

    def heads(self) -> dict:
        """{name: TaskHeads}."""
        return self._task_modules(TaskHeads)

    def task_parameters(self):
        """Parameters of the affine sites and the heads: train these in an ordinary loop."""
        for m in list(self.sites().values()) + list(self.heads().values()):
            yield from m.parameters()

    def export(self, task=None, like: nn.Module | None = None) -> nn.Module:
        """A plain module for one task: implemented by each build (``GraphMergedModel.export``,
        ``InjectedModel.export``); this base class is never instantiated on its own."""
        raise NotImplementedError(f"{type(self).__name__} is not a build of MergedModel: use "
                                  "tm.merge, which returns a graph or an injected build")

    def save(self, path, example_inputs=None) -> None:
        """Write the folder ``path``: ``model.safetensors`` (every tensor) and ``torchmerge.json``
        (the manifest); no pickle. :func:`torchmerge.load` rebuilds the model from a fresh
        instance of the reference architecture, without the experts (see :mod:`torchmerge.io`).
        """
        from .io import save  # io builds merged models: imported on use

        save(self, path, example_inputs=example_inputs)

    def extra_repr(self) -> str:
        sites = ", ".join(self.sites())
        return (f"tasks={self.task_names}, active={self.task_names[self.active_task]!r}, "
                f"sites={len(self.sites())} [{sites[:200]}{'...' if len(sites) > 200 else ''}]")


class GraphMergedModel(MergedModel):
    """The fx build: wraps the rewritten graph ``body``; ``forward(*inputs, task=None, **kwargs)``."""

    def __init__(self, body: fx.GraphModule, task_names, task_weights=None):
        super().__init__()
        self.body = body
        self.trace_options: dict = {}
        self._init_tasks(task_names, task_weights)

    def _weights_root(self) -> nn.Module:
        return self.body

    def _task_modules(self, kind) -> dict:
        return {n: m for n, m in self.body.named_modules() if isinstance(m, kind)}

    # -- forward ----------------------------------------------------------------------------
    def forward(self, *inputs, task=None, **kwargs):
        if task is None:
            task = self.active_task
        elif isinstance(task, torch.Tensor):
            first = next((v for v in (*inputs, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
            self._check_ids(task, None if first is None or not first.dim() else first.shape[0],
                            None if first is None else first.device)
            if self.task_weights is not None:
                return self._forward_per_task(inputs, kwargs, task)
        else:
            task = self.task_index(task)
        with self._weights_of(task):
            return self.body(*inputs, task=task, **kwargs)

    def _forward_per_task(self, inputs, kwargs, ids):
        """Task-specific weights: run each present task on its own rows (a loop over tasks)."""
        call, parts = Inputs(inputs, kwargs), []
        for t in ids.unique().tolist():
            rows = (ids == t).nonzero().squeeze(1)
            part = call.rows(rows)
            with self._weights_of(t):
                parts.append((rows, self.body(*part.args, task=t, **part.kwargs)))
        return stitch_rows(parts, ids.shape[0])

    def export(self, task=None, like: nn.Module | None = None) -> nn.Module:
        """A plain module for one task: heads chosen, affines folded, no task argument.

        A ``GraphModule``; with ``like=expert`` (the task's expert, or any model of that
        architecture and head size), a copy of it with the merged weights instead: the user's own
        class, eager code, same function (every affine must fold into a layer).
        """
        t = self.active_task if task is None else self.task_index(task)
        with self._weights_of(t, as_parameters=True):  # copied inside: plain parameters of task t
            graph = export_graph(self.body, t)
        return graph if like is None else into_module(graph, like)
