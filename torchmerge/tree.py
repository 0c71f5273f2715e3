"""Small helpers on a model's module tree, shared by the builds, the pipeline and persistence.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
>>> under("0.weight", ["0"]), under("01.weight", ["0"]), submodule(net, "2"), device_of(net).type
(True, False, None, 'cpu')
"""
from __future__ import annotations

import itertools

import torch
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


def fit_sizes(m: nn.Module) -> None:
    """Set ``m``'s size attributes (``out_features``, ``out_channels``, ``num_features``,
    ``normalized_shape``, Conv1D's ``nf``, ...) from its tensors, after they changed shape (a
    widened or loaded layer): forwards that read them (Conv1D reshapes with ``nf``) stay right."""
    w = getattr(m, "weight", None)
    w = w if isinstance(w, torch.Tensor) else None
    if isinstance(m, nn.Linear) and w is not None:
        m.out_features, m.in_features = w.shape
    elif isinstance(m, nn.modules.conv._ConvNd) and w is not None:
        outer, inner = (w.shape[1] * m.groups, w.shape[0]) if m.transposed else (w.shape[0], w.shape[1] * m.groups)
        m.out_channels, m.in_channels = outer, inner
    elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        ref = w if w is not None else getattr(m, "running_mean", None)
        if ref is not None:
            m.num_features = ref.shape[0]
    elif isinstance(m, nn.LayerNorm) and w is not None:
        m.normalized_shape = tuple(w.shape)
    elif isinstance(m, nn.GroupNorm) and w is not None:
        m.num_channels = w.shape[0]
    elif isinstance(m, nn.Embedding) and w is not None:
        m.num_embeddings, m.embedding_dim = w.shape
    elif is_hf_conv1d(m):
        m.nf = w.shape[1]
        if hasattr(m, "nx"):
            m.nx = w.shape[0]


def is_hf_conv1d(module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear with a transposed ``[in, out]`` weight."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") \
        and getattr(module, "bias", None) is not None and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def has_attention(model: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` or a module class named ``*Attention`` (the Hugging Face, timm
    and torchvision convention: BertSelfAttention, GPT2Attention, LlamaAttention, ...): what the
    ``"auto"`` defaults call a transformer."""
    return any(isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention")
               for m in model.modules())
