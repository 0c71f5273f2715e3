"""The injected build: a copy of the reference expert, still of the user's own class.

For models torch.fx cannot trace (every Hugging Face transformers model, timm forwards with
defaulted arguments), the merged model is built the peft way: :func:`build_injected` deep-copies
the reference expert, loads the merged weights, replaces each head module by a
:class:`ContextHeads` (one head per task) and puts a :class:`~torchmerge.modules.TaskAffine`
after each site module, applied by a forward hook on that module. The copy's class becomes a
subclass of both the user's class and :class:`~torchmerge.merged.MergedModel`, so
``merged(**batch)`` returns the model's own output object, ``merged.generate(...)`` and
``merged.config`` work, and ``isinstance(merged, UserClass)`` holds.

The task reaches the injected modules through one shared :class:`TaskContext` (a plain object,
not a module) that ``forward`` sets for the duration of the call.

Sites (``sites=``), chosen by module, never inside a head:

* ``"layer"`` — every ``nn.Linear`` / ``ConvNd`` / Hugging Face ``Conv1D`` output; when a norm
  module (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) receives that very output tensor as its
  input (seen in one forward of the example inputs), the site goes after the norm instead;
* ``"block"`` — the output of every repeated block: the children of an ``nn.ModuleList`` /
  ``nn.Sequential`` holding two or more modules of one class with submodules (``bert.encoder.layer.0``,
  GPT-2's ``transformer.h.0``); the innermost such level when they nest;
* a callable ``(path, module) -> bool``, or a list of module paths.

A site applies to a module's output tensor, or to element 0 of a tuple / ``ModelOutput``. Its
channel axis is -1 (Linear, LayerNorm, token layouts) or 1 (``[B, C, *spatial]`` outputs of
conv / batch-norm / group-norm modules, and of blocks ending in one). Each site records
``site_module`` (the path it follows), where calibration hooks the expert.

>>> import torch, torchmerge as tm
>>> class Net(torch.nn.Module):
...     def __init__(self, k):
...         super().__init__()
...         self.fc, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, k)
...     def forward(self, x, scale=None):
...         return {"logits": self.head(self.fc(x).relu())}
>>> experts = [Net(3), Net(5)]
>>> merged = tm.merge(experts, method="average", example_inputs=torch.randn(2, 4), align=None,
...                   correction=None, build="inject")
>>> isinstance(merged, Net), isinstance(merged, tm.MergedModel), type(merged).__name__
(True, True, 'MergedNet')
>>> merged(torch.randn(2, 4), task=1)["logits"].shape
torch.Size([2, 5])
>>> type(merged.export(task=0)).__name__, list(merged.sites())
('Net', ['task_sites.site0_fc'])
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
from collections.abc import MutableMapping

import torch
from torch import nn

from .batches import Inputs, example_inputs_of
from .errors import TorchMergeError
from .merged import MergedModel, _rewrite_weights
from .module_sites import select_module_sites, task_attributes
from .modules import ChannelAffine, TaskAffine, TaskHeads, stitch_rows
from .rewrite import fold_affine
from .tree import shares_params as _shares_params, under as _under

#: Children the injected build adds to the model's root.
RESERVED = ("task_sites", "task_weights")
#: Names of the task API; a model with an attribute of one of these names cannot be injected.
API_NAMES = ("task", "set_task", "task_index", "num_tasks", "sites", "heads", "export", "save",
             "task_parameters", "active_task", "task_names", "info", *RESERVED)
#: Instance attributes of the injected build (removed again by ``export``).
STATE = ("_task_context", "task_names", "info", "_task_attrs", "_attr_groups",
         "task_weights", "task_sites")
EXPORTED_AFFINE = "torchmerge_affine"
_MISSING = object()


class TaskContext:
    """The task the injected modules read: ``current`` during a forward, else ``active``."""

    def __init__(self):
        self.active = 0
        self.current = None  # an int or a [B] LongTensor while a forward runs

    @property
    def task(self):
        return self.active if self.current is None else self.current


class ContextHeads(TaskHeads):
    """One head per task, choosing by the shared :class:`TaskContext` (any call signature)."""

    def __init__(self, heads, context: TaskContext):
        super().__init__(heads)
        self._context = context

    def forward(self, *args, **kwargs):
        task = self._context.task
        if isinstance(task, int):
            return self.heads[task](*args, **kwargs)
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            return super().forward(args[0], task)
        call, parts = Inputs(args, kwargs), []
        for t in task.unique().tolist():
            rows = (task == t).nonzero().squeeze(1)
            part = call.rows(rows)
            parts.append((rows, self.heads[t](*part.args, **part.kwargs)))
        return stitch_rows(parts, task.shape[0])


def map_first(output, fn, path: str):
    """``fn`` applied to a module's output tensor, or to element 0 of a tuple/list/mapping output."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        if hasattr(output, "_fields"):  # a namedtuple
            return output._replace(**{output._fields[0]: fn(output[0])})
        return type(output)([fn(output[0]), *output[1:]])
    if isinstance(output, MutableMapping) and output:
        key = next(iter(output))
        if isinstance(output[key], torch.Tensor):
            output[key] = fn(output[key])  # a fresh output object (e.g. a ModelOutput): edit it
            return output
    raise TorchMergeError(f"the site after module {path!r} needs a tensor output (or a tuple / "
                          f"ModelOutput whose first element is one), got {type(output).__name__}; "
                          "choose other sites (sites=[module paths] or a predicate)")


class SiteHook:
    """Forward hook: the site's :class:`TaskAffine` on the module's output, for the context's task.

    A callable object (not a closure) so that ``copy.deepcopy`` of the model copies it with the
    affine and the context it points to.
    """

    def __init__(self, affine: TaskAffine, context: TaskContext):
        self.affine, self.context = affine, context

    def __call__(self, module, args, output):
        return map_first(output, lambda x: self.affine(x, self.context.task), self.affine.site_module)


class FixedAffineHook:
    """Forward hook of an exported model: its child ``torchmerge_affine`` (a ChannelAffine) on the output."""

    def __call__(self, module, args, output):
        return map_first(output, getattr(module, EXPORTED_AFFINE), type(module).__name__)


class _SequentialRoot:
    """An ``nn.Sequential`` root iterates its children in forward: hide the merged model's own."""

    def _layers(self) -> list:
        return [m for name, m in self._modules.items() if name not in RESERVED]

    def __iter__(self):
        return iter(self._layers())

    def __len__(self) -> int:
        return len(self._layers())

    def __getitem__(self, index):
        return self._layers()[index]


class InjectedModel(MergedModel):
    """The task API of the injected build; merged models are instances of ``Merged<YourClass>``,
    a subclass of this class and of your model's class (see :func:`build_injected`).

    ``forward(*args, task=None, **kwargs)``: ``task`` as for every merged model; the other
    arguments go to your model's ``forward`` unchanged, and its output object comes back.
    """

    _torchmerge_base = nn.Module  # the user's class (set on each dynamic subclass)

    @property
    def active_task(self) -> int:
        return self._task_context.active

    @active_task.setter
    def active_task(self, task: int) -> None:
        self._task_context.active = task

    def forward(self, *args, task=None, **kwargs):
        if isinstance(task, torch.Tensor):
            call = Inputs(args, kwargs)
            first = next(iter(call.tensors()), None)
            self._check_ids(task, call.batch_size, None if first is None else first.device)
            if self.task_weights is not None or len(set(self._attr_groups)) > 1:
                return self._forward_rows(call, task)
        elif task is None:
            task = self._task_context.task
        else:
            task = self.task_index(task)
        return self._run(args, kwargs, task)

    def _run(self, args, kwargs, task):
        """Your model's forward with ``task`` in the context (and its weights and attributes)."""
        context = self._task_context
        weights = self._weights_of(task) if isinstance(task, int) else contextlib.nullcontext()
        previous, context.current = context.current, task
        try:
            with weights, self._attributes(task if isinstance(task, int) else 0):
                return super(InjectedModel, self).forward(*args, **kwargs)
        finally:
            context.current = previous

    def _forward_rows(self, call: Inputs, ids: torch.Tensor):
        """Task-specific weights or attributes: each present task on its own rows, stitched back."""
        parts = []
        for t in ids.unique().tolist():
            rows = (ids == t).nonzero().squeeze(1)
            part = call.rows(rows)
            parts.append((rows, self._run(part.args, part.kwargs, t)))
        return stitch_rows(parts, ids.shape[0])

    @contextlib.contextmanager
    def _attributes(self, t: int):
        """Task t's plain attributes (e.g. ``num_labels``, ``config.id2label``) during a call."""
        overrides = self._task_attrs[t]
        saved = []
        try:
            for (path, in_config, attr), value in overrides.items():
                owner = self._attribute_owner(path, in_config)
                saved.append((owner, attr, vars(owner).get(attr, _MISSING)))
                setattr(owner, attr, value)
            yield
        finally:
            for owner, attr, value in reversed(saved):
                if value is _MISSING:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, value)

    def _attribute_owner(self, path: str, in_config: bool):
        module = self.get_submodule(path)
        return module.config if in_config else module

    def __reduce_ex__(self, protocol):
        """Pickle by the user's class (the dynamic subclass is rebuilt on load)."""
        return _new_injected, (self._torchmerge_base,), self.__dict__

    # -- export -------------------------------------------------------------------------------
    def export(self, task=None, like: nn.Module | None = None) -> nn.Module:
        """A plain instance of your model's class for one task, without task modules.

        The task's head is put in place, its TALL weights and plain attributes written, and each
        site's affine row folded into the module it follows (Linear, Conv, Conv1D, norms with
        affine parameters). Where that is impossible (a block's output, a layer whose weights are
        tied to another module) the module gets a child ``torchmerge_affine`` (a fixed
        :class:`~torchmerge.modules.ChannelAffine`) applied by a forward hook. ``like``: a model
        of the task's architecture and head sizes, checked against the export (API symmetry with
        the graph build); the export is built from the merged model either way.
        """
        t = self.active_task if task is None else self.task_index(task)
        with self._weights_of(t, as_parameters=True):  # copied inside: plain parameters of task t
            out = _copy_without(self, self._export_skips(t))
        out.__class__ = self._torchmerge_base
        for name in STATE:
            out._modules.pop(name, None)
            out.__dict__.pop(name, None)
        _remove_hooks(out)
        for path, heads in self.heads().items():
            _set_submodule(out, path, copy.deepcopy(heads.heads[t]))
        for site in self.sites().values():
            _fold_or_fix(out, site.site_module, site.scale[t].detach(), site.shift[t].detach(),
                         site.channel_axis, site.low_rank_of(t))
        for (path, in_config, attr), value in self._task_attrs[t].items():
            owner = out.get_submodule(path)
            setattr(owner.config if in_config else owner, attr, copy.deepcopy(value))
        if like is not None:
            _check_like(out, like, self.task_names[t])
        return out

    def _export_skips(self, t: int) -> list:
        """What an export of task t leaves behind: other tasks' heads, every task module."""
        skip = [self.task_sites, *self.sites().values()]
        if self.task_weights is not None:
            skip.append(self.task_weights)
        for heads in self.heads().values():
            skip += [h for i, h in enumerate(heads.heads) if i != t]
        return skip


def _new_injected(base: type):
    return object.__new__(injected_class(base))


_CLASSES: dict = {}


def injected_class(cls: type) -> type:
    """``Merged<cls>``: a subclass of :class:`InjectedModel` and ``cls``, one per class (cached,
    so instances of one class share it: ``isinstance``, ``copy.deepcopy`` and pickling work).

    >>> injected_class(torch.nn.Linear) is injected_class(torch.nn.Linear)
    True
    >>> injected_class(torch.nn.Linear).__mro__[1:4] == (InjectedModel, MergedModel, torch.nn.Linear)
    True
    """
    if cls not in _CLASSES:
        bases = (InjectedModel, cls)
        if issubclass(cls, nn.Sequential):
            bases = (_SequentialRoot, *bases)
        namespace = {"forward": _forward_of(cls), "_torchmerge_base": cls, "__module__": __name__,
                     "__doc__": f"{cls.__name__} merged by torchmerge (see InjectedModel)."}
        _CLASSES[cls] = type(f"Merged{cls.__name__}", bases, namespace)
    return _CLASSES[cls]


def _forward_of(cls: type):
    """``InjectedModel.forward`` with the signature of ``cls.forward`` plus ``task=None``, so that
    tools inspecting the signature (Hugging Face ``generate``) see the model's own arguments."""
    def forward(self, *args, task=None, **kwargs):
        return InjectedModel.forward(self, *args, task=task, **kwargs)

    try:
        sig = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return forward
    if "task" in sig.parameters:
        raise TorchMergeError(f"{cls.__name__}.forward already has an argument named 'task', which the "
                              "merged model uses to choose the task; rename it")
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter("task", inspect.Parameter.KEYWORD_ONLY, default=None))
    forward.__signature__ = sig.replace(parameters=params)
    forward.__doc__ = cls.forward.__doc__
    return forward


# ---------------------------------------------------------------------------------------------
# build


def build_injected(template: nn.Module, state: dict, heads_per_task: list, head_paths, sites,
                   example_inputs, task_names, task_weights=None, experts=None,
                   attributes_of=None) -> InjectedModel:
    """The merged model as a copy of ``template`` (the reference expert) with task modules.

    ``state``: the merged non-head tensors (every one must be there). ``heads_per_task[t]`` maps
    each head path to task t's head module (copied). ``sites``: see the module docstring.
    ``example_inputs``: one call (Tensor, tuple, dict or :class:`~torchmerge.batches.Inputs`) run
    once to find the site modules' output shapes. ``task_weights``: TALL
    :class:`~torchmerge.task_weights.TaskWeights` or None. ``experts``: one model per task whose
    plain attributes that differ from ``template``'s (``num_labels``, ``config.id2label``, ...)
    are switched with the task. ``attributes_of``: the model those attributes are compared with
    (default ``template``; PLeaS passes the reference expert, since its widened template differs
    from every expert in sizes such as ``Conv1D.nf`` that must not switch back).
    ``template`` and the experts are not modified.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> heads = [{"2": torch.nn.Linear(8, k)} for k in (3, 5)]
    >>> merged = build_injected(net, net.state_dict(), heads, ["2"], "layer", torch.randn(2, 4), ["a", "b"])
    >>> isinstance(merged, torch.nn.Sequential), len(merged), merged(torch.randn(2, 4), task="b").shape
    (True, 3, torch.Size([2, 5]))
    """
    model = _copy_with(template, state, head_paths, experts or [])
    _check_names(model)
    _load_merged(model, state, head_paths)
    chosen = select_module_sites(model, sites, head_paths, example_inputs_of(example_inputs))
    reference = template if attributes_of is None else attributes_of
    attrs = task_attributes(reference, experts, head_paths) if experts else [{} for _ in heads_per_task]
    return _assemble(model, heads_per_task, head_paths, chosen, task_names, task_weights, attrs)


def rebuild_injected(template: nn.Module, state: dict, heads_per_task: list, head_paths, chosen,
                     task_names, task_weights=None, task_attrs=None) -> InjectedModel:
    """:func:`build_injected` with the sites already known, ``chosen = [(module path, channels,
    channel axis)]``: no example call, no experts (what :func:`torchmerge.load` uses).
    ``task_attrs``: per task, ``{(module path, in_config, name): value}`` (default: none).

    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> heads = [{"2": torch.nn.Linear(8, k)} for k in (3, 5)]
    >>> merged = rebuild_injected(net, net.state_dict(), heads, ["2"], [("0", 8, -1)], ["a", "b"])
    >>> list(merged.sites()), merged(torch.randn(2, 4), task="b").shape
    (['task_sites.site0_0'], torch.Size([2, 5]))
    """
    model = _copy_with(template, state, head_paths, [])
    _check_names(model)
    _load_merged(model, state, head_paths)
    attrs = task_attrs if task_attrs is not None else [{} for _ in heads_per_task]
    return _assemble(model, heads_per_task, head_paths, list(chosen), task_names, task_weights, attrs)


def _assemble(model, heads_per_task, head_paths, chosen, task_names, task_weights, attrs) -> InjectedModel:
    """Heads, class, task context, attributes and sites put into ``model`` (a copy, in place)."""
    context = TaskContext()
    for path in head_paths:
        _set_submodule(model, path, ContextHeads([copy.deepcopy(h[path]) for h in heads_per_task], context))
    model.__class__ = injected_class(type(model))
    model._task_context = context
    model._task_attrs = attrs
    model._attr_groups = _groups(attrs)
    model.task_sites = _inject_sites(model, chosen, len(heads_per_task), context)
    model._init_tasks(task_names, task_weights)
    return model


def _groups(attrs: list) -> list:
    """One int per task; tasks with equal attribute overrides share it."""
    keys = [repr(sorted(a.items(), key=repr)) for a in attrs]
    return [keys.index(k) for k in keys]


def _check_names(model: nn.Module) -> None:
    taken = [n for n in API_NAMES if hasattr(type(model), n) or n in vars(model)
             or n in model._modules or n in model._parameters or n in model._buffers]
    if taken:
        raise TorchMergeError(f"{type(model).__name__} has attributes {taken}, names the merged model's "
                              "task API needs; rename them in your model, or pass build='graph' if "
                              "torch.fx can trace it")


def _copy_with(template: nn.Module, state: dict, head_paths, experts) -> nn.Module:
    """``deepcopy(template)`` whose tensors *are* the merged state's (one copy of the weights, not
    two). A state tensor that shares storage with an expert is cloned: training the merged model
    must never write into an expert."""
    theirs = {t.data_ptr() for m in (template, *experts) for t in m.state_dict().values() if t.numel()}
    memo = {}
    for name, t in list(template.named_parameters()) + list(template.named_buffers()):
        value = state.get(name)
        if value is None or _under(name, head_paths) or value.shape != t.shape or value.dtype != t.dtype:
            continue
        value = value.detach()
        if value.numel() and value.data_ptr() in theirs:
            value = value.clone()
        memo[id(t)] = nn.Parameter(value, t.requires_grad) if isinstance(t, nn.Parameter) else value
    return copy.deepcopy(template, memo)


def _load_merged(model: nn.Module, state: dict, head_paths) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _under(k, head_paths)]
    if missing:
        raise TorchMergeError(f"merged weights lack {missing[:5]}; merge every non-head tensor")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def _inject_sites(model, chosen, num_tasks, context) -> nn.ModuleDict:
    ref = next(itertools.chain(model.parameters(), model.buffers()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
    sites = nn.ModuleDict()
    for i, (path, channels, axis) in enumerate(chosen):
        affine = TaskAffine(num_tasks, channels, axis, dtype, None if ref is None else ref.device)
        affine.site_module = path
        sites[f"site{i}_{path.replace('.', '_')}"] = affine
        model.get_submodule(path).register_forward_hook(SiteHook(affine, context))
    return sites


# ---------------------------------------------------------------------------------------------
# export helpers


def _copy_without(model: nn.Module, skip: list) -> nn.Module:
    """``copy.deepcopy(model)`` where every object in ``skip`` becomes None (never copied)."""
    return copy.deepcopy(model, memo={id(obj): None for obj in skip})


def _remove_hooks(model: nn.Module) -> None:
    """Drop the site hooks and the merged model's load_state_dict hook from a copy."""
    for m in model.modules():
        for hid in [h for h, fn in m._forward_hooks.items() if isinstance(fn, SiteHook)]:
            del m._forward_hooks[hid]
            m._forward_hooks_with_kwargs.pop(hid, None)
            m._forward_hooks_always_called.pop(hid, None)
    for hid in [h for h, fn in model._load_state_dict_post_hooks.items() if fn is _rewrite_weights]:
        del model._load_state_dict_post_hooks[hid]


def _fold_or_fix(model: nn.Module, path: str, scale, shift, axis: int, low_rank=None) -> None:
    module = model.get_submodule(path)
    if not _shares_params(model, module) and fold_affine(module, scale, shift, low_rank):
        return
    module.add_module(EXPORTED_AFFINE, ChannelAffine(scale, shift, axis, low_rank))
    module.register_forward_hook(FixedAffineHook())


def _check_like(out: nn.Module, like, task_name: str) -> None:
    if not isinstance(like, nn.Module):
        raise TorchMergeError(f"export(like=...) takes an expert module, got {type(like).__name__}")
    theirs = like.state_dict()
    for name, value in out.state_dict().items():
        mine = theirs.get(name)
        if mine is not None and mine.shape != value.shape:
            raise TorchMergeError(f"export(like=...): merged tensor {name!r} {tuple(value.shape)} has no "
                                  f"counterpart in {type(like).__name__} (shape {tuple(mine.shape)}); pass "
                                  f"the expert of task {task_name!r} (its head sizes) or export without like=")


__all__ = ["build_injected", "rebuild_injected", "InjectedModel", "TaskContext", "ContextHeads", "SiteHook", "injected_class",
           "map_first", "RESERVED", "select_module_sites", "task_attributes"]
