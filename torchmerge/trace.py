"""torch.fx tracing and shape propagation with errors a person can act on.

>>> import torch
>>> g = trace(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()), (torch.randn(2, 3),))
>>> [n.op for n in g.graph.nodes]
['placeholder', 'call_module', 'call_module', 'output']
>>> g.graph.nodes.__iter__().__next__().meta["shape"]
(2, 3)
"""
from __future__ import annotations

import contextlib
import inspect
import os
import traceback
import warnings

import torch
import torch.fx as fx
from torch import nn

from .batches import Inputs, example_inputs_of
from .errors import ShapeError, TorchMergeError, TraceError, unknown_name

class _Tracer(fx.Tracer):
    """fx tracer that remembers which module it was in when tracing failed."""

    def __init__(self, leaf_modules=()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_paths = {m for m in leaf_modules if isinstance(m, str)}
        self.stack: list = []
        self.failed_in: tuple | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.stack[-1]
            raise
        finally:
            self.stack.pop()


def as_inputs(example_inputs) -> tuple:
    """Normalise example inputs to a tuple of tensors (or raise a TorchMergeError)."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise ShapeError(
                f"example_inputs[{i}] is a {type(x).__name__}, expected a torch.Tensor. Pass a tensor "
                "or a tuple of tensors shaped like one real batch; pass Python flags through "
                "concrete_args={...}."
            )
    return tuple(inputs)


def module_path(node: fx.Node) -> str:
    """Dotted path of the module that produced ``node`` ('' for the root model).

    Symbolic tracing keys ``nn_module_stack`` by path; torch.export keys it by an id and stores
    ``(path, type name)`` as the value.
    """
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key = next(reversed(stack))
    value = stack[key]
    return value[0] if isinstance(value, tuple) else key


def trace(model: nn.Module, example_inputs, leaf_modules=(), concrete_args=None) -> fx.GraphModule:
    """Trace ``model`` with torch.fx and store every node's output shape in ``node.meta["shape"]``.

    ``leaf_modules``: module classes or dotted paths to keep opaque (their spaces get frozen).
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    try:
        inspect.signature(model.forward).bind(*inputs, **(concrete_args or {}))
    except TypeError as e:
        raise ShapeError(f"{len(inputs)} example input(s) do not fit {type(model).__name__}.forward"
                         f"{inspect.signature(model.forward)}: {e}. Pass one tensor per tensor "
                         "argument, as a tuple.") from e
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:  # fx raises many types; the user needs the place and the remedy
        path, kind = tracer.failed_in or ("", type(model).__name__)
        where = f"module '{path}' ({kind})" if path else f"the forward of {kind} (the root model)"
        advice = (f"if this is data-dependent control flow or an untraceable op, pass "
                  f"leaf_modules=({kind},) or leaf_modules=('{path}',) to keep it opaque (its channels "
                  "are then frozen), or fix Python-level flags with concrete_args={...}." if path else
                  "the root forward itself cannot be traced symbolically (a leaf module cannot help): "
                  "fix Python-level flags with concrete_args={...}, rewrite the data-dependent branch "
                  "(e.g. with torch.where or torch.cond), or let torch.export capture it "
                  "(tm.discover(..., capture_method='auto'), tm.merge(..., build='auto')).")
        raise TraceError(f"torch.fx could not trace {where}: {type(e).__name__}: {e}\n"
                         f"What to do: {advice}") from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["example_outputs"] = _ShapeRecorder(gm).run_all(inputs)
    gm.meta["capture"] = "fx"
    return gm


def capture(model: nn.Module, example_inputs, leaf_modules=(), concrete_args=None,
            method: str = "auto") -> fx.GraphModule:
    """An fx graph of ``model`` with every node's output shape in ``node.meta["shape"]``.

    ``method="auto"``: torch.fx symbolic tracing when it can capture the model (fast; keeps
    ``call_module`` nodes), else ``torch.export`` (non-strict), which follows Python control flow
    on shapes, decorators, ``**kwargs`` and defaulted or ``None`` arguments, and yields ATen
    training-IR ops whose parameters are ``get_attr`` nodes named as in the state dict.
    ``example_inputs``: a Tensor, a tuple of positional arguments, or a dict of keyword arguments.
    ``gm.meta["capture"]`` says which was used.

    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(3, 4)
    ...     def forward(self, x, scale=None):
    ...         return self.fc(x) if x.shape[0] > 1 else self.fc(x) * 2   # shape-dependent Python
    >>> gm = capture(Net(), {"x": torch.randn(2, 3)})
    >>> gm.meta["capture"], [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    ('export', ['aten.linear.default'])
    """
    if method not in ("auto", "fx", "export"):
        raise TorchMergeError(unknown_name("capture method", method, ("auto", "fx", "export")))
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    inputs = example_inputs_of(example_inputs)
    _check_values(inputs)
    plain = not inputs.kwargs and all(isinstance(a, torch.Tensor) for a in inputs.args)
    gm = None
    if method == "fx" or (method == "auto" and plain):
        try:
            gm = trace(model, inputs.args, leaf_modules, concrete_args)
        except ShapeError:
            raise
        except TraceError:
            if method == "fx":
                raise
        if method == "fx" or (gm is not None and not _weak(gm, leaf_modules)):
            return gm
    inputs.check_fits(model, "example_inputs")
    inputs = without_cache(model, inputs)
    try:
        return export_graph_module(model, inputs)
    except TraceError:
        if gm is not None:
            return gm  # export failed where fx succeeded: keep fx's (more frozen) graph
        raise


def without_cache(model: nn.Module, inputs: Inputs) -> Inputs:
    """``use_cache=False`` added when the forward takes it and the caller did not set it: a causal
    LM's key/value cache is an output object, not part of the function being merged."""
    if "use_cache" in inputs.kwargs:
        return inputs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return inputs
    if "use_cache" not in params:
        return inputs
    return Inputs(inputs.args, {**inputs.kwargs, "use_cache": False})


def _weak(gm: fx.GraphModule, leaf_modules) -> bool:
    from .rules import weak_nodes  # circular: rules -> coupling -> trace

    return bool(weak_nodes(gm, leaf_modules))


def _check_values(inputs: Inputs) -> None:
    for i, x in enumerate(inputs.args):
        if not isinstance(x, torch.Tensor):
            raise ShapeError(f"example_inputs[{i}] is a {type(x).__name__}, expected a torch.Tensor. "
                             "Pass a tensor, a tuple of tensors (positional arguments) or a dict of "
                             "keyword arguments (tensors or Python constants such as use_cache=False), "
                             "shaped like one real batch.")
    for k, v in inputs.kwargs.items():
        if not isinstance(v, (torch.Tensor, bool, int, float, str, type(None))):
            raise ShapeError(f"example_inputs[{k!r}] is a {type(v).__name__}, expected a torch.Tensor "
                             "or a Python constant (bool, int, float, str, None).")


def export_graph_module(model: nn.Module, inputs: Inputs) -> fx.GraphModule:
    """``torch.export`` (non-strict) of ``model`` in eval mode, as a plain fx GraphModule."""
    stack: list = []
    not_tensor: set = set()
    with eval_mode(model), _module_stack(model, stack, not_tensor), warnings.catch_warnings():
        # nn.LSTM re-assigns its flat weights while traced: export's warning is about export's
        # own bookkeeping, not about the user's model
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        try:
            ep = torch.export.export(model, inputs.args, inputs.kwargs, strict=False)
        except Exception as e:  # export raises many types; the user needs the place and the remedy
            raise _export_error(model, e, stack) from e
        outputs = inputs(model)
    gm = ep.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)  # input-shape guards: not part of the function
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        node.meta["shape"] = _shapes(val)
        node.meta["is_float"] = isinstance(val, torch.Tensor) and val.is_floating_point()
    gm.meta.update(example_outputs=outputs, capture="export", inputs=inputs,
                   non_tensor_modules=not_tensor)
    return gm


@contextlib.contextmanager
def _module_stack(model: nn.Module, stack: list, not_tensor: set | None = None):
    """Track which submodule is running (to name it when capture fails), and which modules
    return something other than one tensor (no hook can read their output as a channel space)."""
    names = {m: n for n, m in model.named_modules()}
    not_tensor = set() if not_tensor is None else not_tensor

    def pre(m, args):
        if m in names:
            stack.append((names[m], type(m).__name__))

    def post(m, args, out):
        if m in names and stack:
            stack.pop()
            if not isinstance(out, torch.Tensor):
                not_tensor.add(names[m])

    handles = [nn.modules.module.register_module_forward_pre_hook(pre),
               nn.modules.module.register_module_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


_TORCH_DIR = os.path.dirname(torch.__file__)


def _export_error(model: nn.Module, e: Exception, stack: list) -> TraceError:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_TORCH_DIR)
              and "torchmerge" not in os.path.basename(os.path.dirname(f.filename))]
    line = f"{frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}" if frames else "unknown"
    path, kind = stack[-1] if stack else ("", type(model).__name__)
    where = f"module '{path}' ({kind})" if path else f"the forward of {kind} (the root model)"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    advice = (f"keep that submodule opaque with leaf_modules=({kind},) or leaf_modules=('{path}',) "
              "(its channels are then frozen; leaf modules are honoured by torch.fx symbolic "
              "tracing, so the rest of the forward must trace symbolically); fix Python-level flags with "
              "concrete_args={...}" if path else
              "the root forward itself cannot be captured: rewrite the data-dependent branch (e.g. "
              "with torch.where or torch.cond), or wrap the model so its forward takes tensors only")
    return TraceError(f"neither torch.fx nor torch.export could capture {where}: "
                      f"{type(e).__name__}: {first}\nSource line: {line}\nWhat to do: {advice}.")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode and no_grad, restoring every submodule's mode: the user's model is untouched."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in modes.items():
            m.training = training


def _shapes(x):
    """Tensor -> its shape (a tuple); tuple/list/dict of values -> a *list* of those; else None."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)) and not isinstance(x, torch.Size):
        return [_shapes(v) for v in x]
    if isinstance(x, dict):
        return [_shapes(v) for v in x.values()]
    return None


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once (eval mode, no grad) and records output shapes and dtypes per node."""

    def run_all(self, inputs):
        with eval_mode(self.module):
            # copies: a forward that writes into its input (x.mul_(2)) must not change the user's
            return self.run(*[a.clone() if isinstance(a, torch.Tensor) else a for a in inputs])

    def run_node(self, n: fx.Node):
        try:
            out = super().run_node(n)
        except TorchMergeError:
            raise
        except Exception as e:
            if n.op == "placeholder":
                raise ShapeError(f"example_inputs do not match the forward signature: {e}") from e
            args = [_shapes(self.env[a]) if isinstance(a, fx.Node) else a for a in n.args]
            path = module_path(n)
            raise ShapeError(
                f"running the example inputs failed at fx node '{n.name}' ({n.op} {_target(n)})"
                f"{f' in module {path!r}' if path else ''} with argument shapes {args}: "
                f"{type(e).__name__}: {e}\nWhat to do: pass example_inputs shaped like one real batch "
                "of the model's input (a tensor or a tuple of tensors)."
            ) from e
        n.meta["shape"] = _shapes(out)
        n.meta["is_float"] = isinstance(out, torch.Tensor) and out.is_floating_point()
        n.meta["dtype"] = out.dtype if isinstance(out, torch.Tensor) else None
        return out


def _target(n: fx.Node) -> str:
    t = n.target
    return getattr(t, "__name__", str(t))
