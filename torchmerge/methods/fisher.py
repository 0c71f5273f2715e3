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
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from ..batches import batch_inputs, batch_targets, output_tensor
from ..errors import TorchMergeError
from ..progress import bar, batch_total
from .base import Aligned, MergeResult, check_choice, check_degenerate, check_nonneg
from .regmean import check_stats


def fisher_merge(experts, fishers, eps: float = 1e-8) -> MergeResult:
    """Σ F_i θ_i / Σ F_i per entry (F_i floored at eps); averages parameters without a Fisher."""
    eps = check_nonneg("eps", eps)
    al = Aligned(experts, None)
    fishers = check_stats(al, fishers, "fishers", lambda w: tuple(w.shape))
    info = {"method": "fisher", "eps": eps}
    check_degenerate(al, info)
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
    return MergeResult(state=state, info=info)


def diagonal_fisher(model: torch.nn.Module, batches, *, max_batches: int | None = None,
                    labels: str = "sampled", loss_fn=None, seed: int = 0) -> dict:
    """Diagonal Fisher of ``model`` (a classifier returning logits ``[B, C]``) over ``batches``.

    ``batches`` yields an input tensor, a tuple ``(inputs, targets, ...)`` or a dict of keyword
    inputs (labels under ``labels``); ``labels="sampled"`` draws y ~ softmax(logits) (seeded),
    ``labels="empirical"`` uses the targets. Logits may have extra axes (tokens: ``[B, T, C]``).
    ``loss_fn(logits, y)`` is the negative log-likelihood of one example (default: cross-entropy,
    mean over its tokens); its squared gradient is accumulated. Inputs move to the model's device. The model runs in eval mode (restored after); the result is
    ``{param name: tensor}`` on each parameter's device, mean over examples.
    """
    check_choice("labels", labels, {"sampled", "empirical"})
    loss_fn = loss_fn or _token_nll
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    gen, count, was_training = None, 0, model.training
    device = next(iter(params.values())).device if params else None
    model.eval()

    def nll(p, args, kwargs, y):
        one = lambda t: t.unsqueeze(0)  # noqa: E731  (vmap strips the batch axis)
        out = functional_call(model, (p, buffers), tree_map(one, args), tree_map(one, kwargs))
        return loss_fn(output_tensor(out), y.unsqueeze(0))

    try:
        passes = bar(itertools.islice(batches, max_batches), "diagonal Fisher",
                     total=batch_total(batches, max_batches))
        for index, batch in enumerate(passes):
            inputs = batch_inputs(batch, index).to(device)
            if labels == "empirical":
                y = batch_targets(batch, index)
                if y is None:
                    raise TorchMergeError(f"labels='empirical' needs targets: batch {index} is a "
                                          f"{type(batch).__name__} without (inputs, targets) or a "
                                          "'labels' key")
                y = y.to(device)
            else:
                with torch.no_grad():
                    logits = output_tensor(inputs(model))
                if gen is None:
                    gen = torch.Generator(device=logits.device).manual_seed(seed)
                probs = F.softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
                y = torch.multinomial(probs, 1, generator=gen).view(logits.shape[:-1])
            for n, g in _squared_grads(nll, params, inputs.clone(), y).items():  # a copy: see Inputs.__call__
                acc[n] += g
            count += inputs.batch_size
    finally:
        model.train(was_training)
    if count == 0:
        raise TorchMergeError("diagonal_fisher got no batches")
    return {n: (a / count).to(params[n].dtype) for n, a in acc.items()}


def _squared_grads(nll, params, inputs, y) -> dict:
    """Σ over the batch of each example's squared gradient: one vmap call, or — for forwards vmap
    cannot batch (data-dependent checks such as Hugging Face's attention-mask tests) — a loop over
    examples, with a warning (slower, same result)."""
    try:
        per_example = vmap(grad(nll), in_dims=(None, *_batch_dims(inputs), 0))
        return {n: g.to(torch.float64).pow(2).sum(0)
                for n, g in per_example(params, inputs.args, inputs.kwargs, y).items()}
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
        warnings.warn(f"diagonal_fisher: torch.func.vmap cannot batch this forward ({str(err)[:80]}...); "
                      "computing per-example gradients in a loop (slower, same result)", stacklevel=3)
    total: dict = {}
    one_grad = grad(nll)
    for i in range(inputs.batch_size):
        row = inputs.rows(torch.tensor([i]))
        strip = lambda t: t.squeeze(0) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 else t  # noqa: E731
        g = one_grad(params, tree_map(strip, row.args), tree_map(strip, row.kwargs), y[i])
        for n, v in g.items():
            total[n] = total.get(n, 0) + v.to(torch.float64).pow(2)
    return total


def _token_nll(logits, y):
    """Cross-entropy of one example, averaged over its positions when logits have extra axes."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _batch_dims(inputs):
    """vmap ``in_dims`` for an Inputs' args and kwargs: 0 for batch-first tensors, None otherwise."""
    b = inputs.batch_size
    dim = lambda v: 0 if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else None  # noqa: E731
    return tuple(dim(v) for v in inputs.args), {k: dim(v) for k, v in inputs.kwargs.items()}
