"""Graph edits that turn one traced expert into the task-conditioned merged graph, and back.

* :func:`build_graph` — trace a template expert, load the merged weights, add a ``task`` input,
  replace each head by a :class:`TaskHeads` and insert a :class:`TaskAffine` at every site.
* :func:`export_graph` — one task's plain graph: heads picked, affines folded into the layer that
  produces their input (Linear, Conv, BatchNorm, LayerNorm, GroupNorm), the ``task`` input removed;
  :func:`into_module` carries it into a copy of an expert, an instance of the user's own class.

Sites: ``"layer"`` (default) — after each Linear/Conv, or after the norm that directly follows it,
before the activation; ``"block"`` — after each residual add; a list of module paths (after
each call of those modules); or a callable ``(node, module_or_None) -> bool`` choosing nodes.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch import nn

from .errors import TorchMergeError
from .modules import ChannelAffine, TaskAffine, TaskHeads
from .coupling import Walker
from .layout import channel_axis as layout_channel_axis
from .trace import module_path, trace
from .guards import strip_hooks
from .tree import is_hf_conv1d, shares_params as _shares_params, submodule as _submodule, under as _under

LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
ADDS = (operator.add, operator.iadd, torch.add)
TASK = "task"


def build_graph(template: nn.Module, example_inputs, state: dict, heads: list, head_paths,
                sites="layer", leaf_modules=(), concrete_args=None) -> fx.GraphModule:
    """The merged graph; ``heads[t]`` maps each head path to task t's head module."""
    template = copy.deepcopy(template)
    own = template.state_dict()  # fx may add constants to the graph module: only the model's own
    missing = [k for k in own if k not in state and not _under(k, head_paths)]
    if missing:
        raise TorchMergeError(f"merged weights lack {missing[:5]}; merge every non-head tensor")
    template.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    gm = trace(template, example_inputs, leaf_modules, concrete_args)
    Walker(gm, template, leaf_modules).run()  # node.meta["layout"]: each site's channel axis
    task = _add_task_input(gm)
    for path in head_paths:
        _replace_head(gm, path, [h[path] for h in heads], task)
    for i, node in enumerate(select_sites(gm, sites, head_paths)):
        _insert_affine(gm, node, task, len(heads), f"site{i}_{_slug(node)}")
    gm.graph.lint()
    gm.recompile()
    return gm


def _slug(node: fx.Node) -> str:
    return str(node.target if node.op == "call_module" else node.name).replace(".", "_")


def _add_task_input(gm: fx.GraphModule) -> fx.Node:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(p.target == TASK for p in placeholders):
        raise TorchMergeError(f"the model's forward already has an argument named {TASK!r}")
    with gm.graph.inserting_after(placeholders[-1]):  # a default: it may follow defaulted arguments
        return gm.graph.placeholder(TASK, default_value=None)


def _replace_head(gm: fx.GraphModule, path: str, modules: list, task: fx.Node) -> None:
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]
    if len(nodes) != 1:
        raise TorchMergeError(f"head '{path}' must be one module called once in forward "
                              f"(found {len(nodes)} calls); pass heads=[...] naming the head modules")
    gm.add_submodule(path, TaskHeads([copy.deepcopy(m) for m in modules]))
    nodes[0].args = nodes[0].args + (task,)


def head_modules(model: nn.Module, spec, heads="auto") -> list:
    """Paths of the modules that own the task heads (``spec.heads``) or those the user names."""
    if heads == "auto":
        owners = {name.rsplit(".", 1)[0] for name in spec.heads if "." in name}
        if any("." not in name for name in spec.heads):
            raise TorchMergeError(f"head parameters {spec.heads} are not inside a module; wrap the head "
                                  "in an nn.Module or pass heads=[module paths]")
        return sorted(owners)
    if callable(heads):
        return [n for n, m in model.named_modules() if n and heads(n, m)]
    names = dict(model.named_modules())
    unknown = [h for h in heads if h not in names]
    if unknown:
        raise TorchMergeError(f"unknown head modules {unknown}; valid paths include {list(names)[1:8]}")
    return list(heads)


def select_sites(gm: fx.GraphModule, sites, head_paths) -> list:
    """Nodes after which a TaskAffine goes (see module docstring)."""
    modules = dict(gm.named_modules())
    chosen = []
    for node in gm.graph.nodes:
        m = modules.get(node.target) if node.op == "call_module" else None
        if node.op == "call_module" and _under(node.target, head_paths):
            continue
        if callable(sites):
            keep = sites(node, m)
        elif sites == "layer":
            keep = isinstance(m, LAYERS) or (isinstance(m, NORMS) and _follows_layer(node, modules))
            if isinstance(m, LAYERS) and _only_user_is_norm(node, modules):
                keep = False
        elif sites == "block":
            keep = node.op == "call_function" and node.target in ADDS and _is_tensor(node) \
                and _carries_channels(node)
        elif isinstance(sites, (list, tuple)) and all(isinstance(s, str) for s in sites):
            keep = node.op == "call_module" and node.target in sites
        else:
            raise TorchMergeError(f"sites must be 'layer', 'block', a callable or a list of module "
                                  f"paths, got {sites!r}")
        if keep and _is_tensor(node):
            chosen.append(node)
    return chosen


def _is_tensor(node) -> bool:
    return isinstance(node.meta.get("shape"), tuple) and len(node.meta["shape"]) >= 1


def _carries_channels(node) -> bool:
    """False where the recorded layout shows no channels at all (e.g. ``var + eps`` inside a
    functional norm: batch and spatial axes only): such an add is no residual add."""
    layout = node.meta.get("layout")
    return layout is None or any(a.kind not in ("data", "unit") for a in layout)


def _only_user_is_norm(node, modules) -> bool:
    users = list(node.users)
    return len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(users[0].target), NORMS)


def _follows_layer(node, modules) -> bool:
    src = node.args[0] if node.args else None
    return isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), LAYERS) \
        and len(src.users) == 1


def channel_axis(node: fx.Node, modules: dict) -> int:
    """Negative channel axis of a node's output, from its recorded layout (``node.meta["layout"]``,
    from the coupling walk; see :func:`torchmerge.layout.channel_axis`): the axis that carries
    channels, the producing layer's own output axis where several do (a token-mixing Linear)."""
    layout = node.meta.get("layout")
    m = modules.get(node.target) if node.op == "call_module" else None
    axis = None if layout is None else layout_channel_axis(layout, _layer_axis(m, len(layout)))
    if axis is None:
        raise TorchMergeError(
            f"cannot tell the channel axis at fx node '{node.name}' (module '{module_path(node)}', "
            f"shape {node.meta.get('shape')}): its axes carry {list(layout or ()) or 'no recorded layout'} "
            "(one axis must carry the parameters' channels: a Linear's features, a conv's "
            "channels, attention heads merged back into features); choose sites after "
            "Linear/Conv/norm layers, or after the heads are merged")
    return axis


def _layer_axis(m, ndim: int) -> int | None:
    """The output axis a Linear / Conv / norm module defines as its channels (None for others)."""
    if isinstance(m, (nn.Linear, nn.LayerNorm)) or is_hf_conv1d(m):
        return -1
    if isinstance(m, nn.modules.conv._ConvNd):
        return -(len(m.kernel_size) + 1)
    return 1 - ndim if isinstance(m, NORMS) else None


def _insert_affine(gm, node, task, num_tasks, name) -> None:
    modules = dict(gm.named_modules())
    axis = channel_axis(node, modules)
    shape = node.meta["shape"]
    ref = next(gm.parameters())
    affine = TaskAffine(num_tasks, shape[axis], axis, ref.dtype, ref.device)
    affine.site_node = node.name  # where the experts' matching activation lives (calibration)
    gm.add_submodule(f"sites.{name}", affine)
    norm = modules.get(node.target) if node.op == "call_module" else None
    absorb = _absorbable(gm, node, norm)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(f"sites.{name}", (node.args[0] if absorb else node, task))
    new.meta["shape"], new.meta["layout"] = shape, node.meta["layout"]
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    if absorb:  # the site calls the norm itself: fused into one batch_norm at inference
        affine.absorb_norm(norm, node.target)
        gm.graph.erase_node(node)


def _absorbable(gm, node, norm) -> bool:
    """A BatchNorm with running statistics, called once, on one tensor, with no other users."""
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats \
        and len(node.args) == 1 and not node.kwargs and len(node.users) == 1 \
        and _calls(gm, node.target) == 1


def _calls(gm: fx.GraphModule, target: str) -> int:
    """How many times the graph calls the module at ``target``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


# ---------------------------------------------------------------------------------------------
# export: fold one task's affines into the layers before them


def export_graph(gm: fx.GraphModule, task: int) -> fx.GraphModule:
    """A plain GraphModule for ``task``: heads chosen, affines folded, no ``task`` input."""
    out = copy.deepcopy(gm)
    modules = dict(out.named_modules())
    for node in list(out.graph.nodes):
        m = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(m, TaskHeads):
            out.add_submodule(node.target, m.heads[task])
            node.args = node.args[:-1]
        elif isinstance(m, TaskAffine):
            _fold_or_fix(out, node, m, task, modules)
    for node in list(out.graph.nodes):
        if node.op == "placeholder" and node.target == TASK:
            out.graph.erase_node(node)
    out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    return out


def into_module(graph: fx.GraphModule, like: nn.Module) -> nn.Module:
    """A deep copy of ``like`` (an expert: the user's own class) carrying ``graph``'s parameters
    and buffers, which share its names; on ``graph``'s device and floating dtype, in its mode.

    Needs every affine folded (no :class:`ChannelAffine` left) and matching shapes; a bias that
    folding added to a bias-free Linear/Conv is added to the copy too. Tensors the graph does not
    hold (buffers fx turned into constants, e.g. a causal mask) keep ``like``'s values.
    """
    if not isinstance(like, nn.Module):
        raise TorchMergeError(f"export(like=...) takes an expert module, got {type(like).__name__}")
    left = [n.target for n in graph.graph.nodes if n.op == "call_module"
            and isinstance(graph.get_submodule(n.target), ChannelAffine)]
    if left:
        raise TorchMergeError(f"export(like=...): the affines at {left[:3]} follow no foldable layer "
                              "(e.g. sites after a residual add), so no module of the expert's own "
                              "class computes this model; use export() without like= (a GraphModule)")
    out = strip_hooks(copy.deepcopy(like))  # the expert's own hooks do not belong in the export
    first = next((v for v in graph.state_dict().values() if v.is_floating_point()), None)
    if first is not None:
        out.to(device=first.device, dtype=first.dtype)
    theirs = out.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in graph.state_dict().items():
            mine = theirs.get(name)
            if mine is None and name.startswith("_tensor_constant"):
                continue  # a constant fx lifted out of the forward code: the class computes it
            if mine is not None and mine.shape == value.shape:
                mine.copy_(value)
                continue
            path, _, attr = name.rpartition(".")
            owner = _submodule(out, path) if mine is None else None
            if owner is not None and attr == "bias" and getattr(owner, "bias", 0) is None:
                owner.bias = nn.Parameter(value.clone())  # added by folding a shift
                continue
            got = "missing" if mine is None else f"shape {tuple(mine.shape)}"
            raise TorchMergeError(f"export(like=...): merged tensor {name!r} {tuple(value.shape)} has "
                                  f"no counterpart in {type(like).__name__} ({got}); pass the expert "
                                  "of the exported task (its head sizes) or export without like=")
    return out.train(graph.training)


def _fold_or_fix(gm, node, affine: TaskAffine, task: int, modules) -> None:
    scale, shift = affine.scale[task].detach(), affine.shift[task].detach()
    low_rank = affine.low_rank_of(task)
    if affine.norm_path is not None:  # the site owns its BatchNorm's call: put the norm back
        with gm.graph.inserting_before(node):
            src = gm.graph.call_module(affine.norm_path, (node.args[0],))
        node.args = (src,) + node.args[1:]
    src = node.args[0]
    layer = modules.get(src.target) if src.op == "call_module" else None
    calls = _calls(gm, src.target) if src.op == "call_module" else 0
    shape = node.meta.get("shape")  # the affine must act on the layer's own output axis to fold
    own = _layer_axis(layer, len(shape)) if shape else affine.channel_axis
    if len(src.users) == 1 and calls == 1 and own == affine.channel_axis \
            and not _shares_params(gm, layer) and fold_affine(layer, scale, shift, low_rank):
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        return
    gm.add_submodule(node.target, ChannelAffine(scale, shift, affine.channel_axis, low_rank))
    node.args = node.args[:1]



def fold_affine(layer, scale: torch.Tensor, shift: torch.Tensor, low_rank=None) -> bool:
    """Fold ``y = scale·layer(x) + shift`` into ``layer``'s parameters in place; False if impossible.

    ``low_rank``: ``(down [C, r], up [r, C])`` of a site's low-rank map, ``y += (layer(x)·down)·up``:
    the map is then the matrix ``diag(scale) + down·up`` on the output channels, which folds into a
    Linear, an HF Conv1D or an ungrouped convolution (a norm's per-channel weight cannot hold it).
    """
    if low_rank is not None:
        return _fold_matrix(layer, torch.diag(scale) + low_rank[0] @ low_rank[1], shift)
    with torch.no_grad():
        if isinstance(layer, nn.Linear) or (isinstance(layer, nn.modules.conv._ConvNd)
                                            and not layer.transposed):
            w = layer.weight
            w.mul_(scale.view((-1,) + (1,) * (w.dim() - 1)))
            _fold_bias(layer, scale, shift, w.shape[0])
            return True
        if is_hf_conv1d(layer):  # y = x @ W + b with W [in, out]: scale W's columns
            layer.weight.mul_(scale)
            layer.bias.mul_(scale).add_(shift)
            return True
        if isinstance(layer, nn.modules.conv._ConvTransposeNd) and layer.groups == 1:
            w = layer.weight
            w.mul_(scale.view((1, -1) + (1,) * (w.dim() - 2)))
            _fold_bias(layer, scale, shift, w.shape[1])
            return True
        if isinstance(layer, NORMS) and getattr(layer, "weight", None) is not None \
                and layer.weight.dim() == 1 and getattr(layer, "bias", None) is not None:
            layer.weight.mul_(scale)
            layer.bias.mul_(scale).add_(shift)
            return True
    return False


def _fold_matrix(layer, matrix: torch.Tensor, shift: torch.Tensor) -> bool:
    """Fold ``y = layer(x)·matrix + shift`` (``matrix`` ``[C, C]`` on the output channels)."""
    with torch.no_grad():
        if is_hf_conv1d(layer):  # W [in, out]
            layer.weight.copy_(layer.weight @ matrix)
        elif isinstance(layer, nn.Linear) or (isinstance(layer, nn.modules.conv._ConvNd)
                                              and not layer.transposed and layer.groups == 1):
            layer.weight.copy_(torch.einsum("co,c...->o...", matrix, layer.weight))
        else:
            return False
        bias = _bias_of(layer, matrix.shape[0])
        bias.copy_(bias @ matrix + shift)
    return True


def _fold_bias(layer, scale, shift, channels) -> None:
    _bias_of(layer, channels).mul_(scale).add_(shift)


def _bias_of(layer, channels: int) -> torch.Tensor:
    """``layer.bias``, created as zeros where the layer has none (folding a shift needs one)."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(channels, dtype=layer.weight.dtype, device=layer.weight.device))
    return layer.bias
