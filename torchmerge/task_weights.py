"""Task-conditioned weights (TALL masks) kept compactly inside the merged model.

For a TALL merge, task t's weights are ``θ₀ + m_t ∘ τ_MTL``: entries where the task's mask is off
fall back to the base θ₀. Only the masked tensors are stored — θ₀, θ₀ + τ_MTL and one bit per
entry and task — as buffers, so they follow ``.to(device, dtype)`` and ``state_dict``.

>>> import torch
>>> from torchmerge.methods import merge_states
>>> experts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
>>> result = merge_states("tall", experts, base={"w": torch.zeros(2)}, lam=0.4)
>>> weights = TaskWeights.from_result(result)
>>> weights(0)["w"].tolist(), weights(1)["w"].tolist()
([1.0, 0.0], [0.0, 1.0])
"""
from __future__ import annotations

import math

import torch
from torch import nn

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

    def extra_repr(self) -> str:
        bits = sum(getattr(self, f"mask_{i}").numel() for i in range(len(self.names)))
        return f"tensors={len(self.names)}, tasks={self.num_tasks}, mask_bytes={bits}"
