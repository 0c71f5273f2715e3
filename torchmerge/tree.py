"""Small helpers on a model's module tree, shared by the builds, the pipeline and persistence.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
>>> under("0.weight", ["0"]), under("01.weight", ["0"]), submodule(net, "2"), device_of(net).type
(True, False, None, 'cpu')
"""
from __future__ import annotations

import itertools

from torch import nn


def under(key: str, paths) -> bool:
    """True if the dotted name ``key`` is one of ``paths`` or inside one of them."""
    return any(key == p or key.startswith(p + ".") for p in paths)


def device_of(model: nn.Module, default=None):
    """The device of the model's first parameter or buffer (``default`` if it has none)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return default if first is None else first.device


def submodule(model: nn.Module, path: str) -> nn.Module | None:
    """``model.get_submodule(path)``, or None where there is no such module."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def shares_params(model: nn.Module, module: nn.Module | None) -> bool:
    """True if a parameter of ``module`` is also used elsewhere in ``model`` (tied weights)."""
    if module is None:
        return False
    mine = {id(p) for p in module.parameters()}
    owners = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in mine]
    return len(owners) > len(mine)
