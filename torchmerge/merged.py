"""MergedModel: one module serving every task, switched like peft adapters.

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

from .errors import TorchMergeError
from .modules import TaskAffine, TaskHeads, check_task_ids
from .rewrite import export_graph, into_module


def _forget_applied(module, incompatible_keys) -> None:
    """After load_state_dict the body holds whatever task's weights were saved: re-apply."""
    module._applied = None


class MergedModel(nn.Module):
    """Wraps the rewritten graph ``body``; ``forward(*inputs, task=None)``.

    ``task=None`` uses the active task (``set_task`` / ``with model.task(t)``); an int or name
    selects one task; a LongTensor ``[B]`` gives each sample its own task (batch axis first).
    ``task_weights``, if given, maps a task index to that task's weights (TALL masks): they are
    written into the body when the task changes.
    """

    def __init__(self, body: fx.GraphModule, task_names, task_weights=None):
        super().__init__()
        self.body = body
        self.task_names = [str(t) for t in task_names]
        self.active_task = 0
        self.task_weights = task_weights  # a TaskWeights submodule (TALL masks) or None
        self._applied = None
        self.info: dict = {}
        self.trace_options: dict = {}
        self.register_load_state_dict_post_hook(_forget_applied)
        self._apply_weights(0)

    # -- tasks ------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def task_index(self, task) -> int:
        if isinstance(task, str):
            if task not in self.task_names:
                raise TorchMergeError(f"unknown task {task!r}; tasks: {self.task_names}")
            return self.task_names.index(task)
        check_task_ids(task, self.num_tasks)
        return int(task)

    def set_task(self, task) -> None:
        """Make ``task`` (index or name) the one ``forward`` uses by default."""
        self.active_task = self.task_index(task)

    @contextlib.contextmanager
    def task(self, task):
        """``with model.task(t): ...`` — temporarily switch the active task."""
        previous = self.active_task
        self.set_task(task)
        try:
            yield self
        finally:
            self.active_task = previous

    def _apply_weights(self, t: int) -> None:
        if self.task_weights is None or self._applied == t:
            return
        params = dict(self.body.named_parameters()) | dict(self.body.named_buffers())
        with torch.no_grad():
            for name, value in self.task_weights(t).items():
                params[name].copy_(value)
        self._applied = t

    # -- forward ----------------------------------------------------------------------------
    def forward(self, *inputs, task=None):
        if task is None:
            task = self.active_task
        elif isinstance(task, torch.Tensor):
            batch = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            check_task_ids(task, self.num_tasks, batch, where=" (model(x, task=ids))")
            if task.device != inputs[0].device:
                raise TorchMergeError(f"task ids are on {task.device} but the inputs are on "
                                      f"{inputs[0].device}; move them with ids.to(x.device)")
            if self.task_weights is not None:
                return self._forward_per_task(inputs, task)
        else:
            task = self.task_index(task)
        if isinstance(task, int):
            self._apply_weights(task)
        return self.body(*inputs, task=task)

    def _forward_per_task(self, inputs, ids):
        """Task-specific weights: run each present task on its own rows (a loop over tasks)."""
        outs = []
        for t in ids.unique().tolist():
            rows = (ids == t).nonzero().squeeze(1)
            self._apply_weights(t)
            outs.append((rows, self.body(*[x.index_select(0, rows) for x in inputs], task=t)))
        first = outs[0][1]
        sizes = {t: tuple(o.shape[1:]) for t, (_, o) in zip(ids.unique().tolist(), outs)}
        if len(set(sizes.values())) > 1:
            raise TorchMergeError(f"a mixed-task batch needs heads with equal output shapes, got {sizes}; "
                                  "run tasks with different head sizes separately (model.set_task)")
        out = first.new_empty((ids.shape[0],) + first.shape[1:])
        for rows, o in outs:
            out.index_copy_(0, rows, o)
        return out

    # -- views ------------------------------------------------------------------------------
    def sites(self) -> dict:
        """{name: TaskAffine} in graph order."""
        return {n: m for n, m in self.body.named_modules() if isinstance(m, TaskAffine)}

    def heads(self) -> dict:
        return {n: m for n, m in self.body.named_modules() if isinstance(m, TaskHeads)}

    def task_parameters(self):
        """Parameters of the affine sites and the heads: train these in an ordinary loop."""
        for m in list(self.sites().values()) + list(self.heads().values()):
            yield from m.parameters()

    def export(self, task=None, like: nn.Module | None = None) -> nn.Module:
        """A plain module for one task: heads chosen, affines folded, no task argument.

        A ``GraphModule``; with ``like=expert`` (the task's expert, or any model of that
        architecture and head size), a copy of it with the merged weights instead: the user's own
        class, eager code, same function (every affine must fold into a layer).
        """
        t = self.active_task if task is None else self.task_index(task)
        self._apply_weights(t)
        graph = export_graph(self.body, t)
        return graph if like is None else into_module(graph, like)

    def extra_repr(self) -> str:
        sites = ", ".join(self.sites())
        return (f"tasks={self.task_names}, active={self.task_names[self.active_task]!r}, "
                f"sites={len(self.sites())} [{sites[:200]}{'...' if len(sites) > 200 else ''}]")
