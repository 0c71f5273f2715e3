"""Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging"):

    θ* = Σ_i F_i ∘ θ_i / Σ_i F_i        (element-wise, diagonal Fisher F_i, floored at eps)

``fishers`` is one dict per expert shaped like the weights. Parameters without a Fisher are
averaged. Default eps = 1e-8 (the floor keeps entries where every Fisher is 0 at the average;
the official RegMean/Fisher code adds 1e-10 instead).

:func:`diagonal_fisher` estimates F = E_x E_{y~p_θ(·|x)} [(∇_θ log p_θ(y|x))²] with **one label
sampled from the model's own softmax per example** (an unbiased Monte-Carlo estimate of the true
Fisher, as in the paper), using per-example gradients (``torch.func.vmap``), averaged over
examples. ``labels="empirical"`` uses the batch's labels instead (the "empirical Fisher").

>>> import torch
>>> from torchmerge.methods import fisher_merge
>>> experts = [{"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([2.0, 0.0])}]
>>> fishers = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 0.0])}]
>>> fisher_merge(experts, fishers, eps=0.0).state["w"].tolist()
[1.5, 4.0]
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..errors import TorchMergeError
from .base import Aligned, MergeResult, check_choice, check_nonneg
from .regmean import check_stats


def fisher_merge(experts, fishers, eps: float = 1e-8) -> MergeResult:
    """Σ F_i θ_i / Σ F_i per entry (F_i floored at eps); averages parameters without a Fisher."""
    eps = check_nonneg("eps", eps)
    al = Aligned(experts, None)
    fishers = check_stats(al, fishers, "fishers", lambda w: tuple(w.shape))
    state = {}
    for key in al.keys:
        if key not in al.float_keys:
            state[key] = al.passthrough(key)
        elif key in fishers[0]:
            num = den = 0
            for i in range(al.num_tasks):
                f = fishers[i][key].to(al.expert(i, key)).clamp_min(eps)
                num = num + f * al.expert(i, key)
                den = den + f
            state[key] = al.out(key, torch.where(den > 0, num / den, al.base(key)))
        else:
            state[key] = al.out(key, al.base(key))
    return MergeResult(state=state, info={"method": "fisher", "eps": eps})


def diagonal_fisher(model: torch.nn.Module, batches, *, max_batches: int | None = None,
                    labels: str = "sampled", loss_fn=None, seed: int = 0) -> dict:
    """Diagonal Fisher of ``model`` (a classifier returning logits ``[B, C]``) over ``batches``.

    ``batches`` yields an input tensor or a tuple ``(inputs, targets, ...)``; ``labels="sampled"``
    draws y ~ softmax(logits) (seeded), ``labels="empirical"`` uses ``targets``. ``loss_fn(logits,
    y)`` is the negative log-likelihood of one example (default: cross-entropy); its squared
    gradient is accumulated. The model runs in eval mode (restored after); the result is
    ``{param name: tensor}`` on each parameter's device, mean over examples.
    """
    check_choice("labels", labels, {"sampled", "empirical"})
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y))
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    gen, count, was_training = None, 0, model.training
    model.eval()

    def nll(p, x, y):
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(logits, y.unsqueeze(0))

    per_example = vmap(grad(nll), in_dims=(None, 0, 0))
    try:
        for batch in itertools.islice(batches, max_batches):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if labels == "empirical":
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TorchMergeError("labels='empirical' needs batches of (inputs, targets)")
                y = batch[1]
            else:
                with torch.no_grad():
                    probs = F.softmax(model(x), dim=-1)
                if gen is None:
                    gen = torch.Generator(device=probs.device).manual_seed(seed)
                y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            for n, g in per_example(params, x, y).items():
                acc[n] += g.to(torch.float64).pow(2).sum(0)
            count += x.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise TorchMergeError("diagonal_fisher got no batches")
    return {n: (a / count).to(params[n].dtype) for n, a in acc.items()}
