"""Guards that keep the user's objects out of harm's way during and after a merge.

* :func:`strip_hooks` — deep copies of an expert carry its forward/backward hooks (logging,
  feature capture); the merged and exported models must not.
* :func:`fingerprints` / :func:`in_merged_order` — ``tm.calibrate`` needs the experts in the
  merged model's unit order; a few channel sums of each aligned expert, kept in ``merged.info``,
  tell the aligned experts from the originals (which are then permuted) and from strangers.

>>> import torch
>>> net = torch.nn.Linear(2, 2)
>>> _ = net.register_forward_hook(lambda m, a, o: print("hook"))
>>> len(strip_hooks(net)._forward_hooks)
0
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from .errors import ArgumentError


def tensors(model: nn.Module) -> dict:
    """Parameters and buffers by name."""
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


def fingerprints(experts, spec, perms) -> list:
    """Per task, a few channel sums of the *aligned* expert where its permutation moved channels:
    lets :func:`tm.calibrate` tell the aligned experts from the originals (plain data for info)."""
    out = []
    for expert, p in zip(experts, perms):
        out.append(_fingerprint(expert, spec, p))
    return out


def _fingerprint(expert, spec, perms):
    own = tensors(expert)
    members = [(key, expr) for key, expr in spec.axes.items() if expr[0] != "fixed" and key[0] in own
               and own[key[0]].is_floating_point()]
    members.sort(key=lambda kv: -own[kv[0][0]].dim())  # weights first: their channels differ
    tries = 0
    for (name, axis), expr in members:
        index = spec.index(expr, perms)
        moved = (index != torch.arange(len(index))).nonzero().squeeze(1)[:32]
        if not len(moved):
            continue
        aligned = _channel_sums(own[name], axis, index[moved])
        if not torch.allclose(aligned, _channel_sums(own[name], axis, moved), rtol=1e-4, atol=1e-8):
            return {"param": name, "axis": axis, "positions": moved.tolist(), "values": aligned.tolist()}
        tries += 1  # not telling: these channels look alike
        if tries == 8:
            break
    return None


def _channel_sums(t: torch.Tensor, axis: int, channels: torch.Tensor) -> torch.Tensor:
    """float64 sums of ``t``'s slices ``channels`` along ``axis`` (only those: weights are large)."""
    picked = t.detach().index_select(axis, channels.to(t.device)).movedim(axis, 0)
    return picked.reshape(len(channels), -1).sum(1, dtype=torch.float64).cpu()


def in_merged_order(merged, experts) -> tuple:
    """``experts`` in the merged model's unit order: as given if they are the aligned experts,
    permuted (``tm.permute`` with ``merged.info``'s spec and perms) if they are the experts given
    to ``tm.merge``; anything else raises. Returns ``(experts, permuted task indices)``."""
    info = getattr(merged, "info", None) or {}
    prints = info.get("aligned_fingerprints")
    perms = (info.get("merge_info") or {}).get("perms")
    if not prints or perms is None or info.get("spec") is None:
        return experts, []
    from .spec import permute

    out, permuted = list(experts), []
    for t, (expert, fp) in enumerate(zip(experts, prints)):
        if fp is None or _matches(expert, fp, None):
            continue
        spec = info["spec"]
        index = spec.index(spec.axes[(fp["param"], fp["axis"])], perms[t])
        if not _matches(expert, fp, index):
            raise ArgumentError(
                f"experts[{t}] is neither the expert tm.merge was given for task {t} nor its aligned copy "
                f"(channel sums of {fp['param']!r} match neither): the merged model's units are in the "
                "aligned order. Pass the experts given to tm.merge (they are permuted here with "
                "merged.info['spec'] and merged.info['merge_info']['perms']), or copies in that order, "
                f"tm.permute(expert, merged.info['spec'], merged.info['merge_info']['perms'][{t}]); to "
                "calibrate against other experts already in that order, drop this check first with "
                "merged.info.pop('aligned_fingerprints')")
        out[t] = permute(expert, spec, perms[t])
        permuted.append(t)
    return out, permuted


def _matches(expert, fp, index) -> bool:
    t = tensors(expert).get(fp["param"])
    if t is None:
        return False
    positions = torch.tensor(fp["positions"])
    if index is not None:
        positions = index[positions]
    if t.dim() <= fp["axis"] or int(positions.max()) >= t.shape[fp["axis"]]:
        return False
    got = _channel_sums(t, fp["axis"], positions)
    want = torch.tensor(fp["values"], dtype=torch.float64)
    return bool(torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()) + 1e-12))


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def strip_hooks(model: nn.Module, keep: tuple = ()) -> nn.Module:
    """Remove every forward/backward hook from ``model``'s modules (in place) but those whose hook
    object is an instance of ``keep``: deep copies of a user's expert carry its hooks (a logging or
    feature-capture hook), which do not belong in a merged or exported model."""
    for m in model.modules():
        for attr in _HOOKS:
            hooks = getattr(m, attr, None)
            if not hooks:
                continue
            for hid in [h for h, fn in hooks.items() if not isinstance(fn, keep)]:
                del hooks[hid]
                for flags in _HOOK_FLAGS:
                    getattr(m, flags, {}).pop(hid, None)
        if not m._backward_hooks:
            m._is_full_backward_hook = None
    return model




__all__ = ["strip_hooks", "fingerprints", "in_merged_order", "tensors"]
