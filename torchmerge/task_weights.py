"""Task-conditioned weights (TALL masks) kept compactly inside the merged model.

For a TALL merge, task t's weights are ``θ₀ + m_t ∘ τ_MTL``: entries where the task's mask is off
fall back to the base θ₀. Only the masked tensors are stored — θ₀, θ₀ + τ_MTL and one bit per
entry and task — as buffers, so they follow ``.to(device, dtype)`` and ``state_dict``.

A merged model *binds* its TaskWeights to the module tree that uses those tensors (:meth:`bind`):
there they stop being parameters — they are a function of the buffers above, never trained, and a
parameter no forward uses would be a stale copy in every optimizer and an unused parameter for
DDP — and become non-persistent buffers holding the active task's weights (for code that calls a
submodule directly; :meth:`write` refreshes them). Each forward of the merged model runs inside
:meth:`use`, which puts freshly computed tensors of its task in their place and restores them
afterwards. Nothing is written in place, so one autograd graph may hold several tasks' weights (a
mixed-task batch, a sum of two tasks' losses), torch.compile traces it, and DDP sees only the
parameters that are really trained.

>>> import torch
>>> from torchmerge.methods import merge_states
>>> experts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
>>> result = merge_states("tall", experts, base={"w": torch.zeros(2)}, lam=0.4)
>>> weights = TaskWeights.from_result(result)
>>> weights(0)["w"].tolist(), weights(1)["w"].tolist()
([1.0, 0.0], [0.0, 1.0])
>>> net = torch.nn.Linear(2, 1, bias=False)
>>> weights = TaskWeights({"weight": torch.ones(1, 2)}, {"weight": torch.zeros(1, 2)},
...                       {"weight": torch.tensor([[0b10000000], [0b01000000]], dtype=torch.uint8)})
>>> weights.bind(net, 0); list(dict(net.named_parameters())), net.weight.tolist()
([], [[1.0, 0.0]])
>>> with weights.use(net, 1):
...     net(torch.ones(1, 2)).item()
1.0
"""
from __future__ import annotations

import contextlib
import itertools
import math

import torch
from torch import nn

from .errors import TorchMergeError
from .methods import unpack_mask


class TaskWeights(nn.Module):
    """``weights(t)`` → ``{param name: task t's tensor}`` for the masked parameters."""

    def __init__(self, merged: dict, base: dict, masks: dict):
        super().__init__()
        self.names = sorted(masks)
        for i, name in enumerate(self.names):  # buffer names cannot hold dots: index them
            self.register_buffer(f"merged_{i}", merged[name].detach().clone())
            self.register_buffer(f"base_{i}", base[name].detach().to(merged[name]).clone())
            self.register_buffer(f"mask_{i}", masks[name].detach().clone())
        self.slots: dict = {}  # name -> ((module path, attribute), ...) in the bound tree (ties: several)

    @classmethod
    def from_result(cls, result) -> "TaskWeights":
        """From a :class:`~torchmerge.methods.MergeResult` that carries masks (TALL, consensus)."""
        return cls({k: result.state[k] for k in result.masks}, result.base, result.masks)

    @property
    def num_tasks(self) -> int:
        return self.mask_0.shape[0] if self.names else 0

    def forward(self, t: int) -> dict:
        out = {}
        for i, name in enumerate(self.names):
            merged, base = getattr(self, f"merged_{i}"), getattr(self, f"base_{i}")
            mask = unpack_mask(getattr(self, f"mask_{i}")[t], math.prod(merged.shape)).view(merged.shape)
            out[name] = torch.where(mask.to(merged.device), merged, base)
        return out

    def bind(self, root: nn.Module, t: int) -> None:
        """Make ``root``'s masked tensors (named as in ``self.names``) non-persistent buffers holding
        task ``t``'s weights; a tensor tied to several modules is found in each of them."""
        where = {}
        for path, module in root.named_modules(remove_duplicate=False):
            for leaf, value in itertools.chain(module._parameters.items(), module._buffers.items()):
                if value is not None:
                    where.setdefault(id(value), []).append((path, leaf))
        tensors = dict(root.named_parameters()) | dict(root.named_buffers())
        absent = [n for n in self.names if n not in tensors]
        if absent:
            raise TorchMergeError(f"{type(root).__name__} has no tensors {absent[:5]} that the TALL task "
                                  "weights replace; pass a model of the merged architecture")
        self.slots = {n: tuple(where[id(tensors[n])]) for n in self.names}
        self.write(root, t)

    def write(self, root: nn.Module, t: int) -> None:
        """Put task ``t``'s weights in ``root``'s bound buffers (new tensors: nothing in place)."""
        with torch.no_grad():
            for name, value in self(t).items():
                for path, leaf in self.slots[name]:
                    _place(root.get_submodule(path), leaf, value)

    @contextlib.contextmanager
    def use(self, root: nn.Module, t: int, as_parameters: bool = False):
        """``root`` runs with task ``t``'s weights inside the block, computed now (autograd and
        torch.compile see a function of the buffers, not a write); restored afterwards.
        ``as_parameters``: as ``nn.Parameter`` s, so that a copy taken inside is a plain model."""
        saved = []
        try:
            for name, value in self(t).items():
                if as_parameters:  # one Parameter per name: tied modules stay tied in a copy
                    value = nn.Parameter(value.detach())
                for path, leaf in self.slots[name]:
                    owner = root.get_submodule(path)
                    saved.append((owner, leaf, owner._buffers[leaf]))
                    if as_parameters:
                        _place(owner, leaf, value)
                    else:
                        owner._buffers[leaf] = value
            yield root
        finally:
            for owner, leaf, value in reversed(saved):  # reversed: a module met twice ends as it was
                if as_parameters:
                    _place(owner, leaf, value)
                else:
                    owner._buffers[leaf] = value

    def extra_repr(self) -> str:
        bits = sum(getattr(self, f"mask_{i}").numel() for i in range(len(self.names)))
        return f"tensors={len(self.names)}, tasks={self.num_tasks}, mask_bytes={bits}"


def _place(owner: nn.Module, leaf: str, value: torch.Tensor) -> None:
    """``owner.<leaf> = value``: a parameter if ``value`` is one, else a non-persistent buffer."""
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)
    if isinstance(value, nn.Parameter):
        owner._non_persistent_buffers_set.discard(leaf)
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value
        owner._non_persistent_buffers_set.add(leaf)
