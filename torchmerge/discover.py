"""``discover``: trace a model, couple its axes, turn the result into a verified PermutationSpec."""
from __future__ import annotations

import torch
from torch import nn

from .coupling import Walker
from .errors import VerificationError
from .layout import Atom
from .progress import bar
from .spec import FrozenSpace, Group, PermutationSpec, Probe, _names, permute
from .batches import example_inputs_of
from .trace import capture, eval_mode


def discover(model: nn.Module, example_inputs, *, leaf_modules=(), concrete_args=None,
             verify: bool = True, capture_method: str = "auto") -> PermutationSpec:
    """Find every set of (parameter, axis) pairs that must share one permutation.

    ``example_inputs``: shaped like one batch — a tensor, a tuple of positional arguments, or a
    dict of keyword arguments (``{"input_ids": ids, "attention_mask": mask}``). The model is
    captured by torch.fx symbolic tracing, or by ``torch.export`` where that cannot capture it
    (``capture_method``: "auto", "fx" or "export"; see :func:`torchmerge.trace.capture`).
    ``leaf_modules``: module classes or dotted paths to keep opaque (their spaces are frozen).
    With ``verify`` (default) the spec is checked by permuting a copy randomly and comparing
    every output; a mismatch raises :class:`VerificationError` naming the offending groups.

    >>> import torch, torchmerge as tm
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
    ...                           torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    >>> spec = tm.discover(net, torch.randn(2, 3, 6, 6))
    >>> [(g.size, len(g.members)) for g in spec.groups.values()]
    [(8, 7)]
    """
    with bar(None, "discover", total=3) as steps:  # a progress bar naming the step
        steps.set_postfix_str("capture")
        gm = capture(model, example_inputs, leaf_modules, concrete_args, capture_method)
        steps.update()
        steps.set_postfix_str("couple")
        walker = Walker(gm, model, leaf_modules)
        walker.run()
        spec = build_spec(walker)
        steps.update()
        if verify and spec.groups:
            steps.set_postfix_str("verify")
            verify_spec(model, spec, gm.meta.get("inputs", example_inputs), concrete_args,
                        gm.meta.get("example_outputs"))
        steps.update()
    return spec


def build_spec(walker: Walker) -> PermutationSpec:
    """Name groups after their first member in graph order; freeze reasons become FrozenSpaces."""
    spaces = walker.spaces
    names: dict = {}
    members: dict = {}
    frozen: dict = {}
    axes = {}

    def expr(term, pname, axis, path):
        r = spaces.resolve(term)
        if isinstance(r, Atom):
            if not pname:  # describing an activation: no members to record
                name = names.get(id(r))
                return ("fixed", r.size) if r.frozen is not None or name is None else ("g", name, r.size)
            if r.frozen is not None:
                frozen.setdefault(id(r), (r, []))[1].append((pname, axis))
                return ("fixed", r.size)
            name = names.setdefault(id(r), f"{pname}:{axis}{path}")
            members.setdefault(name, (r.size, []))[1].append((pname, axis))
            return ("g", name, r.size)
        if r.size == 1:
            return ("fixed", 1)
        parts = tuple(expr(t, pname, axis, f"{path}.{i}") for i, t in enumerate(r.terms))
        if all(p[0] == "fixed" for p in parts):
            return ("fixed", r.size)
        return ("prod" if type(r).__name__ == "Prod" else "cat", parts, r.size)

    for pname, terms in walker.params.items():
        for axis, term in enumerate(terms):
            e = expr(term, pname, axis, "")
            if e[0] != "fixed":
                axes[(pname, axis)] = e
    groups = {n: Group(n, size, tuple(dict.fromkeys(m))) for n, (size, m) in members.items()}
    frozen_spaces = tuple(
        FrozenSpace(a.frozen.why, a.frozen.op, a.frozen.module_path, a.frozen.node, a.size,
                    tuple(dict.fromkeys(m)))
        for a, m in frozen.values())
    unused = tuple(n for n in walker.canonical.values()
                   if n not in walker.params and _get(walker.model, n).dim() > 0)
    probes = _probes(walker, lambda t: expr(t, "", 0, ""), groups)
    return PermutationSpec(groups, axes, frozen_spaces, unused, probes)


def _module_outputs(gm) -> dict:
    """{module path: [nodes whose value leaves the module]} — one node per call for
    ``call_module`` graphs; for torch.export graphs, from each node's ``nn_module_stack``."""
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    if calls or gm.meta.get("capture") != "export":
        return calls
    keys: dict = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.op != "call_function":
            continue
        for key, (path, _) in list(stack.items())[1:]:
            keys.setdefault(path, set()).add(key)
            if any(key not in (u.meta.get("nn_module_stack") or {}) for u in node.users):
                calls.setdefault(path, []).append(node)
    skip = gm.meta.get("non_tensor_modules", set())  # outputs a hook cannot read as one tensor
    return {p: nodes for p, nodes in calls.items() if len(keys[p]) == 1 and p not in skip}


def _probes(walker: Walker, expr, groups) -> dict:
    """Module outputs where each group can be observed (for activation statistics)."""
    probes: dict = {}
    for path, nodes in _module_outputs(walker.gm).items():
        nodes = list(nodes)
        value = walker.env.get(nodes[0])
        if len(nodes) > 1 or not isinstance(value, list):
            continue  # a module called twice (or with several outputs) would mix spaces in one hook
        for axis, term in enumerate(value):
            e = expr(term)
            for name in _names(e):
                if name in groups:
                    probes.setdefault(name, []).append(Probe(path, axis - len(value), e))
    return {name: tuple(p) for name, p in probes.items()}


def _get(model, name):
    for part in name.split("."):
        model = getattr(model, part)
    return model


def _outputs(model, inputs, concrete_args):
    kwargs = {k: v for k, v in (concrete_args or {}).items() if not isinstance(v, type(...))}
    with eval_mode(model):
        return _flat_tensors(inputs(model, **kwargs))  # Inputs run the model on copies


def _flat_tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def _close(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False  # every output is compared, none ignored
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        tol = 1e-3 if x.dtype in (torch.float32, torch.float64) else 5e-2
        scale = x.abs().max().item() + 1e-12
        if (x - y).abs().max().item() > tol * scale:
            return False
    return True


def verify_spec(model: nn.Module, spec: PermutationSpec, example_inputs, concrete_args=None,
                reference_outputs=None) -> None:
    """Raise :class:`VerificationError` if a random permutation changes the model's outputs."""
    inputs = example_inputs_of(example_inputs)
    if reference_outputs is None:
        reference = _outputs(model, inputs, concrete_args)
    else:
        reference = _flat_tensors(reference_outputs)
    perms = spec.random_perms(seed=0)
    if _close(reference, _outputs(permute(model, spec, perms), inputs, concrete_args)):
        return
    bad = [n for n in spec.groups
           if not _close(reference, _outputs(permute(model, spec, {n: perms[n]}), inputs, concrete_args))]
    details = "; ".join(f"{n} (members {spec.groups[n].members[:4]})" for n in bad) or "a combination"
    raise VerificationError(
        f"permuting {type(model).__name__} with the discovered spec changed its outputs; groups: "
        f"{details}. Some op uses these parameters in a way the trace could not see. What to do: "
        "pass leaf_modules=(ModuleClass,) or ('module.path',) for the module that uses them, "
        "so its spaces are frozen, and report the op to torchmerge.")
