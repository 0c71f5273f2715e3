"""What the injected build reads from a model: its site modules and its per-task attributes.

Sites are chosen by module: :func:`select_module_sites` runs one example call and looks at each
candidate module's output (see :mod:`torchmerge.inject` for the rules); a site after a module that
is not a Linear/Conv/norm (a block) takes its channel axis from the coupling walk's layouts over a
capture of the model (:func:`output_layouts`).
:func:`task_attributes` lists the plain attributes (``num_labels``, ``config.id2label``...) in
which one expert differs from another, so the merged model can switch them with the task.

>>> import torch
>>> from torchmerge.batches import Inputs
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> select_module_sites(net, "layer", ["3"], Inputs((torch.randn(2, 3),)))
[('1', 4, -1)]
"""
from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from .batches import Inputs
from .coupling import Walker
from .errors import TorchMergeError
from .layout import channel_axis
from .rewrite import LAYERS, NORMS, is_hf_conv1d
from .stats import default_channel_axis
from .trace import capture, eval_mode
from .tree import submodule as _submodule, under as _under

_MISSING = object()


def select_module_sites(model: nn.Module, sites, head_paths, example: Inputs) -> list:
    """``[(module path, channels, channel axis)]`` of the site modules, in module order.

    Runs ``example`` once through ``model`` (eval mode, no grad) to see each candidate's output.

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    >>> select_module_sites(net, "layer", [], Inputs((torch.randn(2, 3, 5, 5),)))
    [('1', 4, 1)]
    """
    modules = {p: m for p, m in model.named_modules() if p and not _under(p, head_paths)}
    candidates = _candidates(model, modules, sites, head_paths)
    norms = [p for p, m in modules.items() if isinstance(m, NORMS)] if sites == "layer" else []
    outputs, consumers = _probe(model, list(dict.fromkeys(candidates + norms)), example)
    if sites == "layer":
        candidates = list(dict.fromkeys(consumers.get(p, p) for p in candidates))
    explicit = isinstance(sites, (list, tuple))
    blocks = [p for p in candidates if outputs.get(p) is not None and not _is_layer(modules[p])]
    layouts = output_layouts(model, example, blocks) if blocks else {}
    chosen = []
    for path in candidates:
        x = outputs.get(path)
        if x is None or not x.is_floating_point() or x.dim() == 0:
            if explicit:
                what = "was not called" if x is None else f"gave a {x.dtype} tensor of shape {tuple(x.shape)}"
                raise TorchMergeError(f"site module {path!r} {what} when the example inputs ran; "
                                      "name modules that output a floating tensor (or a tuple whose "
                                      "first element is one)")
            continue
        layer = _is_layer(modules[path]) or layouts is None
        axis = site_axis(modules[path], x) if layer else _block_axis(path, x, layouts)
        chosen.append((path, x.shape[axis], axis))
    return chosen


def _candidates(model: nn.Module, modules: dict, sites, head_paths) -> list:
    if sites == "layer":
        return [p for p, m in modules.items() if isinstance(m, LAYERS) or is_hf_conv1d(m)]
    if sites == "block":
        return [p for p in block_paths(model) if p in modules]
    if callable(sites):
        return [p for p, m in modules.items() if sites(p, m)]
    if isinstance(sites, (list, tuple)) and all(isinstance(s, str) for s in sites):
        bad = [s for s in sites if s not in modules]
        if bad:
            why = "are inside a head" if any(_under(s, head_paths) for s in bad) else "are not modules"
            raise TorchMergeError(f"sites {bad} {why}; valid paths include {list(modules)[:8]}")
        return list(dict.fromkeys(_leaf_of_sequential(modules, s) for s in sites))
    raise TorchMergeError(f"sites must be 'layer', 'block', a callable (path, module) -> bool or a "
                          f"list of module paths, got {sites!r}")


def block_paths(model: nn.Module) -> list:
    """Children of every ModuleList/Sequential holding >= 2 composite modules of one class
    (the innermost such level), in module order.

    >>> blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(2))
    >>> block_paths(torch.nn.ModuleDict({"layers": blocks}))
    ['layers.0.0', 'layers.1.0']
    """
    modules = dict(model.named_modules())
    blocks = []
    for path, m in modules.items():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kinds = [type(c) for c in m.children() if next(c.children(), None) is not None]
        repeated = {k for k in kinds if kinds.count(k) >= 2}
        blocks += [f"{path}.{name}" if path else name for name, c in m.named_children() if type(c) in repeated]
    inner = [b for b in blocks if not any(o != b and o.startswith(b + ".") for o in blocks)]
    return [_leaf_of_sequential(modules, b) for b in inner]


def _leaf_of_sequential(modules: dict, path: str) -> str:
    """A Sequential's output is its last child's: hook that child (a Sequential iterates its
    children, so it cannot hold the site)."""
    while isinstance(modules.get(path), nn.Sequential) and len(modules[path]):
        path = f"{path}.{list(modules[path]._modules)[-1]}"
    return path


def site_axis(module: nn.Module, x: torch.Tensor) -> int:
    """Channel axis of ``module``'s output ``x``: -1, or 1 for ``[B, C, *spatial]`` conv/norm
    outputs; a block takes the axis of the last Linear/Conv/norm inside it (only where the model
    cannot be captured: otherwise a block's axis comes from its recorded layout, see
    :func:`output_layouts`).

    >>> site_axis(torch.nn.Conv2d(3, 4, 1), torch.zeros(2, 4, 5, 5)), site_axis(torch.nn.Linear(3, 4), torch.zeros(2, 7, 4))
    (1, -1)
    """
    if is_hf_conv1d(module):
        return -1
    if isinstance(module, LAYERS + NORMS):
        return default_channel_axis(module, x)
    inner = [m for m in module.modules() if isinstance(m, LAYERS + NORMS) or is_hf_conv1d(m)]
    return site_axis(inner[-1], x) if inner else -1


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, LAYERS + NORMS) or is_hf_conv1d(module)


def output_layouts(model: nn.Module, example: Inputs, paths: list) -> dict | None:
    """``{path: [layout of each fx node whose value leaves that module]}``: the coupling walk's
    ``node.meta["layout"]`` over one capture of ``model`` (fx, else torch.export), so that a
    block's channel axis is read from discovery's layouts, not guessed from its last layer.
    None (with a warning) where neither can capture the model."""
    try:
        gm = capture(model, example)
    except TorchMergeError as e:
        warnings.warn(f"sites {paths[:4]} are not Linear/Conv/norm modules, so their channel axis comes "
                      f"from a capture of {type(model).__name__}, which failed ({str(e)[:300]}); it is "
                      "taken from the last Linear/Conv/norm inside each (-1 for none), which is wrong for "
                      "blocks that permute their output; pass sites='layer' or a list of Linear/Conv/norm "
                      "module paths to be sure", stacklevel=3)
        return None
    Walker(gm, model).run()
    inside = lambda n: {v[0] for v in (n.meta.get("nn_module_stack") or {}).values()}  # noqa: E731
    wanted, out = set(paths), {}
    for node in gm.graph.nodes:
        if "layout" not in node.meta or node.op == "get_attr":
            continue
        for path in inside(node) & wanted:
            if any(u.op == "output" or path not in inside(u) for u in node.users):
                out.setdefault(path, []).append(node)
    return out


def _block_axis(path: str, x: torch.Tensor, layouts: dict) -> int:
    """The channel axis of block ``path``'s output ``x``: what the layouts of the graph values
    leaving the block with ``x``'s shape agree on."""
    nodes = [n for n in layouts.get(path, []) if n.meta.get("shape") == tuple(x.shape)]
    axes = {channel_axis(n.meta["layout"]) for n in nodes}
    if len(axes) != 1 or None in axes:
        seen = [f"{n.name}: {list(n.meta['layout'])}" for n in nodes] or "no graph value of that shape"
        raise TorchMergeError(f"cannot tell the channel axis of site module {path!r} (output shape "
                              f"{tuple(x.shape)}): its outputs' layouts are {seen}; one axis must carry "
                              "parameter channels. Choose other sites (sites='layer', or a list of "
                              "module paths whose output has one channel axis)")
    return axes.pop()


def _probe(model: nn.Module, paths: list, example: Inputs):
    """One forward of ``example``: ``({path: first output tensor, on the meta device}, {layer
    path: norm path})`` where the norm's input is the very tensor the layer returned. Only shapes
    and dtypes are kept: holding every output would hold a whole forward's activations."""
    outputs, produced, consumers, forget = {}, {}, {}, []

    def after(path, is_norm):
        def hook(module, args, out):
            x = first_tensor(out)
            if x is not None:
                outputs.setdefault(path, torch.empty(x.shape, dtype=x.dtype, device="meta"))
                if not is_norm:
                    produced[id(x)] = path
                    # a freed output's id may be reused by a later tensor: drop it when freed
                    forget.append(weakref.finalize(x, produced.pop, id(x), None))
        return hook

    def before(path):
        def hook(module, args):
            src = produced.get(id(args[0])) if args else None
            if src is not None:
                consumers.setdefault(src, path)
        return hook

    handles = []
    try:
        for path in paths:
            module = model.get_submodule(path)
            is_norm = isinstance(module, NORMS)
            handles.append(module.register_forward_hook(after(path, is_norm)))
            if is_norm:
                handles.append(module.register_forward_pre_hook(before(path)))
        with eval_mode(model):
            example(model)
    except TorchMergeError:
        raise
    except Exception as e:
        raise TorchMergeError(f"running the example inputs ({example.describe()}) through "
                              f"{type(model).__name__} failed: {type(e).__name__}: {e}; pass "
                              "example_inputs= (or data=) shaped like one real batch") from e
    finally:
        for h in handles:
            h.remove()
        for f in forget:
            f.detach()
    return outputs, consumers


def first_tensor(out):
    """A module's output tensor, or element 0 of a tuple/list/mapping output (None otherwise)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping) and out:
        first = next(iter(out.values()))
        return first if isinstance(first, torch.Tensor) else None
    return None


def task_attributes(reference: nn.Module, experts, head_paths) -> list:
    """Per task, ``{(module path, in_config, name): value}`` of the plain attributes (numbers,
    strings, and lists/dicts of them) where expert t differs from ``reference``: of every module
    outside the heads and of each module's ``config`` object (Hugging Face), e.g. ``num_labels``.

    >>> a, b = torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)
    >>> b.num_labels = 3
    >>> task_attributes(a, [a, b], [])
    [{}, {('', False, 'num_labels'): 3}]
    """
    out = []
    for expert in experts:
        diff, seen = {}, set()
        for path, mine in reference.named_modules():
            if path and _under(path, head_paths):
                continue
            theirs = _submodule(expert, path)
            if theirs is None:
                continue
            diff.update(_differences(mine, theirs, (path, False)))
            config = getattr(mine, "config", None)
            if config is not None and not isinstance(config, nn.Module) and id(config) not in seen \
                    and hasattr(config, "__dict__") and hasattr(theirs, "config"):
                seen.add(id(config))
                diff.update(_differences(config, theirs.config, (path, True)))
        out.append(diff)
    return out


def _differences(mine, theirs, key) -> dict:
    skip = ("training",)
    mine_vars = vars(mine)
    return {(*key, name): copy.deepcopy(value) for name, value in vars(theirs).items()
            if not name.startswith("_") and name not in skip and _plain(value)
            and mine_vars.get(name, _MISSING) != value}


def _plain(value, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if depth < 3 and isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


__all__ = ["select_module_sites", "block_paths", "site_axis", "task_attributes", "first_tensor"]
