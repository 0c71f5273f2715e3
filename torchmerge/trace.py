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

import torch
import torch.fx as fx
from torch import nn

from .errors import ShapeError, TorchMergeError, TraceError

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
    """Dotted path of the module that produced ``node`` ('' for the root model)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack)) if stack else ""


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
        where = f"module '{path}' ({kind})" if path else f"the forward of {kind}"
        raise TraceError(
            f"torch.fx could not trace {where}: {type(e).__name__}: {e}\n"
            f"What to do: if this is data-dependent control flow or an untraceable op, pass "
            f"leaf_modules=({kind},) or leaf_modules=('{path or 'submodule.path'}',) to keep it opaque "
            "(its channels are then frozen), or fix Python-level flags with concrete_args={...}."
        ) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["example_outputs"] = _ShapeRecorder(gm).run_all(inputs)
    return gm


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
            return self.run(*inputs)

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
        return out


def _target(n: fx.Node) -> str:
    t = n.target
    return getattr(t, "__name__", str(t))
