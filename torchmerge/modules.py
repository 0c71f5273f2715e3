"""Task-conditioned building blocks of the merged model: TaskAffine and TaskHeads.

Both take the task as a second input: a Python ``int`` (one task for the whole batch, the fast
path) or a ``LongTensor`` of shape ``[B]`` (one task per sample, batch axis first).

>>> import torch
>>> affine = TaskAffine(num_tasks=2, channels=3, channel_axis=1)
>>> x = torch.randn(4, 3, 5, 5)
>>> torch.equal(affine(x, 0), x)            # starts as the identity
True
>>> affine(x, torch.tensor([0, 1, 1, 0])).shape
torch.Size([4, 3, 5, 5])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from .errors import TorchMergeError


def check_task_ids(task, num_tasks: int, batch: int | None = None, where: str = ""):
    """Validate an int task or a [B] LongTensor of task ids (raise TorchMergeError)."""
    if isinstance(task, int) and not isinstance(task, bool):
        if not 0 <= task < num_tasks:
            raise TorchMergeError(f"task {task} out of range: the model has {num_tasks} tasks{where}")
        return
    if not isinstance(task, torch.Tensor) or task.dtype not in (torch.int64, torch.int32) or task.dim() != 1:
        got = f"tensor of shape {tuple(task.shape)} and dtype {task.dtype}" if isinstance(task, torch.Tensor) \
            else type(task).__name__
        raise TorchMergeError(f"task ids must be an int or a 1-D LongTensor [batch], got {got}{where}")
    if batch is not None and task.shape[0] != batch:
        raise TorchMergeError(f"task ids have {task.shape[0]} entries but the batch has {batch}{where}")
    if task.numel():
        low, high = (int(v) for v in torch.aminmax(task))
        if low < 0 or high >= num_tasks:
            raise TorchMergeError(f"task ids must lie in [0, {num_tasks - 1}], got ids from {low} to "
                                  f"{high}{where}")


def _broadcast_rows(table: torch.Tensor, task, ndim: int, axis: int) -> torch.Tensor:
    """table[task] shaped to broadcast against an ndim-tensor whose channels lie on ``axis``."""
    axis = axis % ndim
    shape = [1] * ndim
    shape[axis] = table.shape[1]
    if isinstance(task, int):
        return table[task].view(shape)
    shape[0] = task.shape[0]
    return table.index_select(0, task.to(table.device)).view(shape)


class TaskAffine(nn.Module):
    """Per-task, per-channel ``y = scale[t] · x + shift[t]``; parameters are ``[T, C]``.

    A site right after a BatchNorm owns that norm's call (``absorb_norm``): with the norm in eval
    mode, norm and affine run as ONE pass with composed weights — ``F.batch_norm`` for one task
    (its kernel beats a broadcast ``addcmul`` on small maps), an ``addcmul`` with per-sample rows
    for a mixed batch. ``observe`` (an identity) sees the tensor the affine acts on, for hooks;
    ``fuse = False`` forces the two-step path (calibration uses it).

    ``add_low_rank(r)`` gives every task a rank-``r`` channel map on top, ``y += (x·down[t])·up[t]``
    over the channel axis (``down`` ``[T, C, r]``, ``up`` ``[T, r, C]``; ``up`` starts at zero, so
    outputs are unchanged until ``correction="affine+tune"`` trains it): a per-task low-rank
    adapter, the capacity the per-channel affine lacks where experts differ by more than a scale.
    """

    def __init__(self, num_tasks: int, channels: int, channel_axis: int = 1, dtype=None, device=None):
        super().__init__()
        self.channel_axis = channel_axis
        self.site_node = None  # name of the fx node this site follows (set by the rewriter)
        self.site_module = None  # path of the module whose output it corrects (set by inject)
        self.norm_path = None  # path of an absorbed BatchNorm (set by absorb_norm)
        self.fuse = True
        object.__setattr__(self, "_norm", None)  # a reference, not a submodule: it lives elsewhere
        self.observe = nn.Identity()
        self.scale = nn.Parameter(torch.ones(num_tasks, channels, dtype=dtype, device=device))
        self.shift = nn.Parameter(torch.zeros(num_tasks, channels, dtype=dtype, device=device))
        self.down = self.up = None  # the low-rank maps, once add_low_rank is called

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[2]

    def add_low_rank(self, rank: int, generator: torch.Generator | None = None) -> None:
        """Give every task a rank-``rank`` channel map (``up`` zero: the site's outputs do not change).

        >>> site = TaskAffine(2, 8, channel_axis=-1); x = torch.randn(3, 8)
        >>> site.add_low_rank(2); torch.equal(site(x, 1), x), tuple(site.down.shape)
        (True, (2, 8, 2))
        """
        tasks, channels = self.scale.shape
        if not 0 < rank <= channels:
            raise TorchMergeError(f"low-rank site maps need 0 < rank <= channels ({channels}), got {rank}")
        if self.down is not None:
            raise TorchMergeError(f"this site has rank-{self.rank} maps already")
        down = torch.randn(tasks, channels, rank, generator=generator) / channels ** 0.5
        self.down = nn.Parameter(down.to(self.scale))
        self.up = nn.Parameter(torch.zeros(tasks, rank, channels, dtype=self.scale.dtype, device=self.scale.device))

    def low_rank_of(self, task: int):
        """``(down [C, r], up [r, C])`` of one task (detached), or None without low-rank maps."""
        return None if self.down is None else (self.down[task].detach(), self.up[task].detach())

    def absorb_norm(self, norm: nn.Module, path: str) -> None:
        """Run ``norm`` (a BatchNorm with running statistics, owned elsewhere) before the affine."""
        object.__setattr__(self, "_norm", norm)
        self.norm_path = path

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        norm = self._norm
        if norm is not None:
            if self.fuse and not norm.training and self.down is None:
                fused = self._fused if isinstance(task, int) else self._fused_rows
                return fused(x, norm, task)
            x = norm(x)
        x = self.observe(x)
        if x.shape[self.channel_axis] != self.scale.shape[1]:
            raise TorchMergeError(f"TaskAffine expects {self.scale.shape[1]} channels on axis "
                                  f"{self.channel_axis}, got input of shape {tuple(x.shape)}")
        scale = _broadcast_rows(self.scale, task, x.dim(), self.channel_axis)
        shift = _broadcast_rows(self.shift, task, x.dim(), self.channel_axis)
        y = torch.addcmul(shift, x, scale)  # one fused pass (mul_ + add_ in place is two)
        # in place: y is addcmul's fresh output, which its backward does not need
        return y if self.down is None else y.add_(low_rank_map(x, self.down, self.up, task, self.channel_axis))

    def _fused(self, x, norm, task):
        """scale·BN(x) + shift = batch_norm(x) with weight·scale and bias·scale + shift."""
        scale, shift = self.scale[task], self.shift[task]
        weight = scale if norm.weight is None else norm.weight * scale
        bias = shift if norm.bias is None else torch.addcmul(shift, norm.bias, scale)
        return F.batch_norm(x, norm.running_mean, norm.running_var, weight, bias, False, 0.0, norm.eps)

    def _fused_rows(self, x, norm, task):
        """One task per sample: the eval BatchNorm folded into every task's row of the affine,
        rows gathered per sample, one ``addcmul`` pass (instead of the norm's pass and the affine's)."""
        a = torch.rsqrt(norm.running_var + norm.eps)
        a = a if norm.weight is None else norm.weight * a
        b = -norm.running_mean * a
        b = b if norm.bias is None else b + norm.bias
        scale, shift = self.scale * a, torch.addcmul(self.shift, self.scale, b)  # [T, C]
        return torch.addcmul(_broadcast_rows(shift, task, x.dim(), self.channel_axis), x,
                             _broadcast_rows(scale, task, x.dim(), self.channel_axis))

    def set_identity(self) -> None:
        with torch.no_grad():
            self.scale.fill_(1.0)
            self.shift.zero_()

    def extra_repr(self) -> str:
        t, c = self.scale.shape
        rank = f", rank={self.rank}" if self.rank else ""
        return f"tasks={t}, channels={c}, channel_axis={self.channel_axis}{rank}"


def low_rank_map(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, task, axis: int) -> torch.Tensor:
    """``(x·down[t])·up[t]`` over ``x``'s channel axis; ``task``: an int or one id per sample."""
    moved = x.movedim(axis, -1)
    if isinstance(task, int):
        out = (moved @ down[task]) @ up[task]
    else:  # per sample: [B, N, C] · [B, C, r] · [B, r, C]
        ids = task.to(down.device)
        flat = moved.reshape(moved.shape[0], -1, moved.shape[-1])
        out = torch.bmm(torch.bmm(flat, down.index_select(0, ids)), up.index_select(0, ids)).view(moved.shape)
    return out.movedim(-1, axis)


class ChannelAffine(nn.Module):
    """A fixed per-channel affine (what a TaskAffine becomes on export where it cannot be folded),
    with the task's low-rank map when the site has one (``low_rank``: ``(down [C, r], up [r, C])``)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, channel_axis: int, low_rank=None):
        super().__init__()
        self.channel_axis = channel_axis
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())
        self.down, self.up = (None, None) if low_rank is None else \
            (nn.Parameter(low_rank[0].detach().clone()), nn.Parameter(low_rank[1].detach().clone()))

    def forward(self, x):
        y = torch.addcmul(_broadcast_rows(self.shift[None], 0, x.dim(), self.channel_axis), x,
                          _broadcast_rows(self.scale[None], 0, x.dim(), self.channel_axis))
        return y if self.down is None else y.add_(low_rank_map(x, self.down[None], self.up[None], 0, self.channel_axis))


def stitch_rows(parts, batch: int):
    """Reassemble per-task outputs in batch order: ``parts`` is ``[(rows, output), ...]``.

    Outputs may be tensors or any pytree of them (tuples, dicts, Hugging Face ``ModelOutput``);
    every tensor leaf must have the batch axis first, other leaves must be equal across parts.

    >>> rows = [torch.tensor([0, 2]), torch.tensor([1])]
    >>> stitch_rows([(rows[0], torch.tensor([10, 30])), (rows[1], torch.tensor([20]))], 3).tolist()
    [10, 20, 30]
    """
    flat = [pytree.tree_flatten(out) for _, out in parts]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        raise TorchMergeError("a mixed-task batch gave outputs of different structure per task; run "
                              "one task per call (model.set_task)")
    leaves = [_stitch_leaf([leaf[i] for leaf, _ in flat], [rows for rows, _ in parts], batch, i)
              for i in range(len(flat[0][0]))]
    return pytree.tree_unflatten(leaves, spec)


def _stitch_leaf(values, rows, batch, i):
    first = values[0]
    if not isinstance(first, torch.Tensor):
        scalar = isinstance(first, (bool, int, float, str, type(None)))
        if all(v is first or (scalar and type(v) is type(first) and v == first) for v in values):
            return first
        raise TorchMergeError(f"a mixed-task batch gave output element {i} of type {type(first).__name__}, "
                              "which differs per task and cannot be put back in batch order; run one task "
                              "per call (model.set_task), e.g. with use_cache=False or without labels")
    sizes = {tuple(v.shape[1:]) for v in values}
    if len(sizes) > 1:
        raise TorchMergeError(f"a mixed-task batch needs heads with equal output shapes, got "
                              f"{[tuple(v.shape) for v in values]}; run tasks with different head sizes "
                              "separately (model.set_task)")
    if any(v.dim() == 0 or v.shape[0] != len(r) for v, r in zip(values, rows)):
        raise TorchMergeError(f"a mixed-task batch gave output element {i} of shapes "
                              f"{[tuple(v.shape) for v in values]} with no batch axis first (e.g. a loss); "
                              "run one task per call (model.set_task) or leave out the labels")
    out = first.new_empty((batch,) + first.shape[1:])
    for v, r in zip(values, rows):
        out.index_copy_(0, r.to(out.device), v)
    return out


class TaskHeads(nn.Module):
    """One head module per task; a mixed batch runs each task's head on its own samples."""

    def __init__(self, heads):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        if isinstance(task, int):
            return self.heads[task](x)
        outs = {}
        for t in task.unique().tolist():  # a loop over tasks present, never over samples
            rows = (task == t).nonzero().squeeze(1).to(x.device)
            outs[t] = (rows, self.heads[t](x.index_select(0, rows)))
        first = next(iter(outs.values()))[1]
        shapes = {tuple(o.shape[1:]) for _, o in outs.values()}
        if len(shapes) > 1:
            sizes = {t: tuple(o.shape[1:]) for t, (_, o) in outs.items()}
            raise TorchMergeError(f"a mixed-task batch needs heads with equal output shapes, got {sizes}; "
                                  "run tasks with different head sizes separately (model.set_task)")
        out = first.new_empty((x.shape[0],) + first.shape[1:])
        for rows, o in outs.values():
            out.index_copy_(0, rows, o)
        return out

    def extra_repr(self) -> str:
        return f"tasks={len(self.heads)}"
