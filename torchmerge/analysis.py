"""Diagnostics: linear interpolation between models and the loss/accuracy barrier along the path.

>>> import torch, torchmerge as tm
>>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
>>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
>>> curve = tm.analysis.interpolation_barrier(a, b, data, steps=3)
>>> len(curve["loss"]), curve["alphas"]
(3, [0.0, 0.5, 1.0])
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TorchMergeError
from .trace import eval_mode


def interpolate(a: nn.Module, b: nn.Module, alpha: float) -> nn.Module:
    """A new module with floating-point tensors ``(1 − α)·a + α·b`` (integer buffers from ``a``)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        raise TorchMergeError(f"models differ in their tensors: {sorted(set(sa) ^ set(sb))[:6]}")
    mixed = {}
    for k, x in sa.items():
        if x.shape != sb[k].shape:
            raise TorchMergeError(f"{k}: shape {tuple(x.shape)} vs {tuple(sb[k].shape)}; interpolate "
                                  "models of the same architecture (exclude task heads first)")
        mixed[k] = torch.lerp(x, sb[k].to(x.dtype), alpha) if x.is_floating_point() else x
    out = copy.deepcopy(a)
    out.load_state_dict(mixed)
    return out


def evaluate(model: nn.Module, data, loss_fn=F.cross_entropy, max_batches=None) -> tuple:
    """Mean loss and accuracy of ``model`` over ``(x, y)`` batches (eval mode, no grad)."""
    total_loss, correct, count = 0.0, 0, 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model):
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TorchMergeError("evaluate needs (input, target) batches, got "
                                      f"{type(batch).__name__}")
            x, y = batch[0].to(device), batch[1].to(device)
            out = model(x)
            total_loss += float(loss_fn(out, y, reduction="sum"))
            correct += int((out.argmax(-1) == y).sum())
            count += len(y)
    if count == 0:
        raise TorchMergeError("evaluate got no batches")
    return total_loss / count, correct / count


def interpolation_barrier(a: nn.Module, b: nn.Module, data, steps: int = 11, loss_fn=F.cross_entropy,
                          max_batches=None) -> dict:
    """Loss and accuracy along the straight line from ``a`` to ``b``, and the barriers.

    Barrier (Frankle et al. 2020; Ainsworth et al. 2022): the largest gap between the path and the
    straight line joining its ends, ``max_α L(α) − ((1 − α)L(0) + αL(1))`` (and the same for
    accuracy, with the sign flipped). Align ``b`` to ``a`` first to see the barrier drop.
    """
    if steps < 2:
        raise TorchMergeError(f"steps must be >= 2, got {steps}")
    data = list(data) if not isinstance(data, (list, tuple)) else data
    alphas = [i / (steps - 1) for i in range(steps)]
    losses, accs = [], []
    for alpha in alphas:
        loss, acc = evaluate(interpolate(a, b, alpha), data, loss_fn, max_batches)
        losses.append(loss)
        accs.append(acc)
    line = lambda v, t: (1 - t) * v[0] + t * v[-1]  # noqa: E731
    return {
        "alphas": alphas, "loss": losses, "accuracy": accs,
        "loss_barrier": max(l - line(losses, t) for l, t in zip(losses, alphas)),
        "accuracy_barrier": max(line(accs, t) - acc for acc, t in zip(accs, alphas)),
    }
