"""Weight averaging: θ* = (1/T) Σ_i θ_i (McMahan et al. 2017 "FedAvg"; Wortsman et al. 2022
"model soups"). No hyper-parameters; a base is not used.

>>> import torch
>>> from torchmerge.methods import average
>>> r = average([{"w": torch.tensor([1.0, 4.0])}, {"w": torch.tensor([3.0, 0.0])}])
>>> r.state["w"].tolist()
[2.0, 2.0]
"""
from __future__ import annotations

from .base import Aligned, MergeResult, check_degenerate


def average(experts) -> MergeResult:
    """Element-wise mean of the experts' floating-point tensors (integer buffers from expert 0)."""
    al = Aligned(experts, None)
    info = {"method": "average"}
    check_degenerate(al, info)
    state = {}
    for k in al.keys:
        state[k] = al.out(k, al.base(k)) if k in al.float_keys else al.passthrough(k)
    return MergeResult(state=state, info=info)
