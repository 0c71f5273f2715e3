"""Up-front checks of ``tm.merge``'s and ``tm.calibrate``'s arguments, and the guards that keep the
user's objects intact.

Every check runs before any expensive work (discovery, alignment, statistics) and raises an
:class:`~torchmerge.errors.ArgumentError` (a ValueError) or :class:`~torchmerge.errors.ArgumentTypeError`
(a TypeError) — both :class:`~torchmerge.errors.TorchMergeError` — naming the argument, the expert
or task index (or module path), what was expected and what to do. Checked:

* experts / base: modules (not ``torch.compile`` wrappers), one class, no tensors on the meta
  device, one dtype and device per tensor name, finite weights, no pruning / weight-norm hooks or
  parametrizations;
* data: one entry per task, each an iterable of batches (not one ``(x, y)`` batch), non-empty,
  not an endless ``itertools.cycle/repeat/count`` without ``max_batches``; one-shot iterators
  (generators) are read once into a list, so every stage sees every batch; each task's first
  batch fits its expert;
* method, hyper-parameters (names, types, finiteness and the method's own ranges, by a dry run on
  a tiny state), ``calibration`` options, ``task_names``, ``max_batches``, ``leaf_modules``, and
  the choices (``align``, ``correction``, ``build``, ``heads``, ``sites``).

>>> import torch, torchmerge as tm
>>> nets = [torch.nn.Linear(3, 2) for _ in range(2)]
>>> tm.merge(nets, method="ties", k="0.2", example_inputs=torch.randn(1, 3), correction=None)
Traceback (most recent call last):
...
torchmerge.errors.ArgumentTypeError: k='0.2' for method 'ties' is a str; expected a number (default 0.2)
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import itertools
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from .batches import Inputs, example_inputs_of, first_call
from .errors import ArgumentError, ArgumentTypeError, ShapeError, TorchMergeError, did_you_mean, unknown_name
from .guards import in_merged_order, tensors as _tensors
from .progress import using
from .tree import device_of as _device

ALIGNS = (None, "auto", "weight", "activation")
CORRECTIONS = (None, "affine", "repair", "affine+tune")
BUILDS = ("auto", "graph", "inject")
DATA_METHODS = ("regmean", "fisher", "mats", "pleas")
#: tm.calibrate's keyword options and what each must be (``calibration=`` of tm.merge).
CALIBRATION_OPTIONS = {
    "passes": "an int >= 1", "eps": "a finite number > 0", "tune_steps": "\"auto\" or an int >= 0",
    "tune_lr": "a finite number > 0", "tune_loss": "'kl' or 'mse'", "tune_heads": "a bool",
    "tune_rank": "\"auto\" or an int >= 0", "tune_holdout": "an int >= 0",
    "progress": "True, False or None",
}
#: tm.align's tuning options and what each must be (``alignment=`` of tm.merge).
ALIGNMENT_OPTIONS = {"max_iter": "an int >= 1", "probes_per_group": "an int >= 1"}
_ENDLESS = (itertools.cycle, itertools.repeat, itertools.count)


# ---------------------------------------------------------------------------------------------
# tm.merge and tm.calibrate


def merge_arguments(experts, method, base, data, *, align, correction, heads, sites, example_inputs,
                    task_names, leaf_modules, concrete_args, max_batches, allow_uncorrected,
                    calibration, build, seed, method_kwargs):
    """Check every argument of ``tm.merge``; return ``(experts, data, example)``: the experts as a
    list, ``data`` with one-shot iterators read into lists, and the (copied) call used to trace."""
    _choice("align", align, ALIGNS, "alignment method")
    _choice("correction", correction, CORRECTIONS, "correction")
    _choice("build", build, BUILDS, "build")
    if not isinstance(method, str):
        raise ArgumentTypeError(f"method is a {type(method).__name__}; pass a method name, one of "
                                f"{', '.join(map(repr, method_names()))}")
    _choice("method", method, method_names(), "merge method")
    if method == "pleas" and correction is not None:
        raise ArgumentError("method='pleas' may widen layers, so merged channels no longer match "
                            "the experts' one to one and the affine correction does not apply; its "
                            "least squares already fit each expert's outputs: pass correction=None")
    check_max_batches(max_batches)
    _flag("allow_uncorrected", allow_uncorrected)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentTypeError(f"seed={seed!r} is a {type(seed).__name__}; pass an int")
    warn_unused_tune_options(correction, calibration_options(calibration))
    _check_heads_sites(heads, sites)
    experts = check_models(experts, "experts")
    check_method_kwargs(method, method_kwargs, len(experts))
    check_task_names(task_names, len(experts))
    if base is not None:
        bases = [base] if isinstance(base, nn.Module) else base
        check_models(bases, "base", reference=experts[0], same_class=False)
    check_leaf_modules(leaf_modules, experts[0])
    if concrete_args is not None and not isinstance(concrete_args, Mapping):
        raise ArgumentTypeError(f"concrete_args is a {type(concrete_args).__name__}; pass a dict "
                                "{forward argument name: fixed value}, as for tm.discover")
    data, firsts = check_data(data, len(experts), max_batches,
                              _data_needs(method, align, correction, allow_uncorrected))
    example = _example(example_inputs, firsts)
    check_batches_fit(experts, firsts, example, "example_inputs" if example_inputs is not None
                      else "data[0]'s first batch")
    return experts, data, example


def calibrate_arguments(merged, experts, data, mode, max_batches, allow_uncorrected, options):
    """Check ``tm.calibrate``'s arguments; return ``(experts, data, permuted)``: the experts in the
    merged model's unit order (originals given for a merge that permuted them are permuted here,
    their task indices in ``permuted``) and ``data`` with one-shot iterators read into lists."""
    from .merged import MergedModel

    if not isinstance(merged, MergedModel):
        raise ArgumentTypeError(f"merged is a {type(merged).__name__}; pass the model tm.merge returned")
    _choice("mode", mode, CORRECTIONS[1:], "correction")
    check_max_batches(max_batches)
    _flag("allow_uncorrected", allow_uncorrected)
    check_calibration_values(options)
    experts = check_models(experts, "experts")
    n = merged.num_tasks
    entries = len(data) if isinstance(data, (list, tuple)) else None
    if len(experts) != n or (entries is not None and entries != n):
        raise ArgumentError(f"calibrate needs one expert and one data iterable per task: {n} tasks, "
                            f"{len(experts)} experts, {entries if entries is not None else '?'} data")
    data, firsts = check_data(data, n, max_batches, ()) if data is not None else ([None] * n, [None] * n)
    present = [f for f in firsts if f is not None]
    if present:
        check_batches_fit(experts, firsts, present[0], "the first task's first batch")
    experts, permuted = in_merged_order(merged, experts)
    return experts, data, permuted


def _data_needs(method, align, correction, allow_uncorrected) -> tuple:
    """What needs data (for the message); empty when nothing does."""
    needs = [w for w, c in (("align='activation'", align == "activation"),
                            (f"method={method!r}", method in DATA_METHODS),
                            (f"correction={correction!r}", correction is not None and not allow_uncorrected))
             if c]
    return tuple(needs)


def _example(example_inputs, firsts) -> Inputs:
    """The call used to trace and probe the reference: example_inputs, or data[0]'s first batch
    (copies: tracing runs the model on them)."""
    if example_inputs is not None:
        return example_inputs_of(example_inputs).clone()
    if firsts is None or firsts[0] is None:
        raise ArgumentError("pass example_inputs=<one batch> or data=[batches per task] so the "
                            "experts can be traced")
    return firsts[0]


# ---------------------------------------------------------------------------------------------
# small values


def method_names() -> tuple:
    """Every ``method=`` tm.merge accepts: the registry ``tm.methods.METHODS``, then PLeaS (its own
    path: it matches units and fits layers itself, so it is no state-dict function)."""
    from .methods import METHODS

    return (*METHODS, "pleas")


def _choice(name, value, valid, what):
    """Exact names only (case-sensitive); an unknown one raises with "did you mean" and the list."""
    if not any(value is v or (isinstance(v, str) and value == v) for v in valid):
        raise ArgumentError(unknown_name(what, value, valid))


def _flag(name, value):
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name}={value!r} is a {type(value).__name__}; pass True or False")


def check_max_batches(max_batches) -> None:
    if max_batches is None:
        return
    if isinstance(max_batches, bool) or not isinstance(max_batches, int):
        raise ArgumentTypeError(f"max_batches={max_batches!r} is a {type(max_batches).__name__}; pass "
                                "None (every batch) or an int >= 1")
    if max_batches < 1:
        raise ArgumentError(f"max_batches={max_batches!r}: pass None (every batch) or an int >= 1")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_task_names(task_names, n: int) -> None:
    if task_names is None:
        return
    if isinstance(task_names, (str, bytes)):
        raise ArgumentTypeError(f"task_names={task_names!r} is a string; pass a list with one name per "
                                f"task, e.g. task_names={[f'task{i}' for i in range(n)]}")
    if not isinstance(task_names, Iterable) or isinstance(task_names, Mapping):
        raise ArgumentTypeError(f"task_names is a {type(task_names).__name__}; pass a list of {n} "
                                "strings, one name per task")
    names = list(task_names)
    if len(names) != n:
        raise ArgumentError(f"{len(names)} task names for {n} experts: give one name per expert")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ArgumentTypeError(f"task_names[{i}] is {name!r}; names must be non-empty strings "
                                    "(tasks are addressed by index too: set_task(1))")
        if name in names[:i]:
            raise ArgumentError(f"task_names has {name!r} twice (positions {names.index(name)} and {i}); "
                                "names must be unique, so that set_task(name) picks one task")


def _check_heads_sites(heads, sites) -> None:
    for name, value, words in (("heads", heads, ("auto",)), ("sites", sites, ("layer", "block"))):
        if callable(value) or value in words:
            continue
        valid = f"{name} must be {' or '.join(map(repr, words))}, a list of module paths or a callable"
        if isinstance(value, str):
            raise ArgumentError(f"{valid}; got {name}={value!r}{did_you_mean(value, words)}: to name "
                                f"one module pass a list, {name}=[{value!r}]")
        if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
            raise ArgumentTypeError(f"{valid}; got {value!r}")


def check_leaf_modules(leaf_modules, reference: nn.Module) -> None:
    if isinstance(leaf_modules, (str, type)) or not isinstance(leaf_modules, (list, tuple, set, frozenset)):
        raise ArgumentTypeError(f"leaf_modules={leaf_modules!r}: pass a tuple of module classes or module "
                                "paths, e.g. leaf_modules=(MyBlock,) or leaf_modules=('encoder.gate',)")
    paths = [p for p, _ in reference.named_modules() if p]
    for i, entry in enumerate(leaf_modules):
        if isinstance(entry, type):
            if not issubclass(entry, nn.Module):
                raise ArgumentTypeError(f"leaf_modules[{i}] is the class {entry.__name__}, not a "
                                        "subclass of torch.nn.Module")
        elif isinstance(entry, str):
            if entry not in paths:
                close = difflib.get_close_matches(entry, paths, n=5)
                raise ArgumentError(f"leaf_modules[{i}]={entry!r} is not a module path of experts[0] "
                                    f"({type(reference).__name__}); "
                                    + (f"did you mean {close}? " if close else "")
                                    + f"valid paths: {paths[:20]}{' ...' if len(paths) > 20 else ''}")
        else:
            raise ArgumentTypeError(f"leaf_modules[{i}] is a {type(entry).__name__} ({entry!r}); expected "
                                    "a module class (e.g. nn.MultiheadAttention) or a module path "
                                    "string (e.g. 'encoder.gate')")


# ---------------------------------------------------------------------------------------------
# hyper-parameters and calibration options


def check_method_kwargs(method: str, kwargs: dict, num_tasks: int) -> None:
    """Names, types and finiteness of ``method``'s hyper-parameters, then the method's own range
    checks by a dry run on a tiny state (milliseconds): bad values fail before any real work."""
    from . import methods as merge_methods

    if method == "pleas":
        managed = {"experts", "spec", "data", "heads", "max_batches", "seed"}
        defaults = {n: p.default for n, p in inspect.signature(merge_methods.pleas).parameters.items()
                    if n not in managed}
    else:
        defaults = merge_methods.hyperparameters(method)  # unknown method names fail here
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ArgumentError(f"unknown hyper-parameter(s) {unknown} for method {method!r}; valid: "
                            f"{', '.join(defaults) or '(none)'}")
    for name, value in kwargs.items():
        _check_hyper(method, name, value, defaults[name])
    if method != "pleas":
        _dry_run(method, kwargs, num_tasks)


def _check_hyper(method, name, value, default) -> None:
    where = f"{name}={value!r} for method {method!r}"
    if default is None or default is inspect.Parameter.empty:
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"{where} is a {type(value).__name__}; expected True or False")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ArgumentTypeError(f"{where} is a {type(value).__name__}; expected a string "
                                    f"(default {default!r})")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentTypeError(f"{where} is a {type(value).__name__}; expected an int (default {default!r})")
    elif isinstance(default, float):
        values = _numbers(method, name, value)
        if values is None:
            raise ArgumentTypeError(f"{where} is a {type(value).__name__}; expected a number (default {default!r})")
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ArgumentError(f"{where}: must be finite (got {bad[0]}); pass a number like the default "
                                f"{default!r}")


def _numbers(method, name, value):
    """The numbers in ``value``: one number, a per-task list (TALL/Consensus ``lam``), or a
    ``{group: width}`` dict (PLeaS ``width``); None if it is none of these."""
    if _is_number(value):
        return [float(value)]
    if name == "lam" and method in ("tall", "consensus"):
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
            return [float(v) for v in value]
    if name == "width" and method == "pleas" and isinstance(value, Mapping) \
            and all(_is_number(v) for v in value.values()):
        return [float(v) for v in value.values()]
    return None


def _dry_run(method, kwargs, num_tasks) -> None:
    """Run ``method`` on T tiny fake states: its own checks (ranges, choices, per-task lengths)
    raise here, before alignment. Anything else the fake provokes is left to the real run."""
    from .methods import merge_states

    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(2, 3, generator=gen)} for _ in range(max(num_tasks, 1))]
    gram = [{"w": torch.eye(3)} for _ in states]
    fisher = [{"w": torch.ones(2, 3)} for _ in states]
    stats = {"regmean": gram, "fisher": fisher,
             "mats": fisher if kwargs.get("statistic") == "fisher" else gram}.get(method)
    try:
        with warnings.catch_warnings(), using(False):  # warnings and bars belong to the real run
            warnings.simplefilter("ignore")
            merge_states(method, states, None, stats, **kwargs)
    except TorchMergeError as err:
        kind = ArgumentError if type(err) is TorchMergeError else type(err)
        raise kind(f"method {method!r}: {err}") from None
    except Exception:  # noqa: BLE001
        # the tiny fake state itself does not suit this method: nothing is learned about the
        # user's arguments here, and the real run (before any expensive work) reports them
        return


def calibration_options(options) -> dict:
    """``tm.merge``'s ``calibration=``: a dict of :func:`tm.calibrate` options (checked)."""
    own = {"mode": "correction=", "max_batches": "max_batches=", "allow_uncorrected": "allow_uncorrected="}
    options = _option_dict("calibration", options, CALIBRATION_OPTIONS, own, "{'passes': 3}")
    check_calibration_values(options)
    return options


def warn_unused_tune_options(mode, given: Mapping) -> None:
    """Warn when tune options are given to a correction that fits but does not tune ("affine",
    "repair"): they would do nothing (``None`` fits nothing at all)."""
    unused = sorted(k for k in given if k.startswith("tune_"))
    if unused and mode in ("affine", "repair"):
        warnings.warn(f"{', '.join(unused)} only act with correction='affine+tune'; correction={mode!r} "
                      "ignores them", UserWarning, stacklevel=4)


def alignment_options(options) -> dict:
    """``tm.merge``'s ``alignment=``: a dict of :func:`tm.align` options (checked)."""
    own = {"method": "align=", "seed": "seed=", "max_batches": "max_batches=", "exclude": "heads=",
           "data": "data=", "progress": "progress="}
    options = _option_dict("alignment", options, ALIGNMENT_OPTIONS, own, "{'max_iter': 300}")
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            kind = ArgumentError if isinstance(value, int) and not isinstance(value, bool) else ArgumentTypeError
            raise kind(f"alignment option {key}={value!r} is invalid: {key} must be {ALIGNMENT_OPTIONS[key]}")
    return options


def _option_dict(name: str, options, valid: Mapping, own: Mapping, example: str) -> dict:
    """A dict of options named in ``valid``; keys that tm.merge takes itself (``own``) are refused."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ArgumentTypeError(f"{name} is a {type(options).__name__}; pass a dict of options, e.g. "
                                f"{name}={example}; valid keys: {', '.join(valid)}")
    for key in options:
        if key in own:
            raise ArgumentError(f"{name}={{{key!r}: ...}}: pass {own[key]} to tm.merge itself")
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            raise ArgumentError(f"unknown {name} option {key!r}"
                                + (f" (did you mean {close[0]!r}?)" if close else "")
                                + f"; valid keys: {', '.join(valid)}")
    return dict(options)


def _count(value) -> bool:
    """An int >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_calibration_values(options: Mapping) -> None:
    """Types and ranges of tm.calibrate's options (``eps`` must be finite and > 0, ...)."""
    checks = {
        "passes": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "eps": lambda v: _is_number(v) and math.isfinite(v) and v > 0,
        "tune_steps": lambda v: v == "auto" or _count(v),
        "tune_lr": lambda v: _is_number(v) and math.isfinite(v) and v > 0,
        "tune_loss": lambda v: v in ("kl", "mse"),
        "tune_heads": lambda v: isinstance(v, bool),
        "tune_rank": lambda v: v == "auto" or _count(v),
        "tune_holdout": _count,
        "progress": lambda v: v is None or isinstance(v, bool),
    }
    for key, value in options.items():
        if key in checks and not checks[key](value):
            ints = key in ("passes", "tune_steps", "tune_rank", "tune_holdout")
            right_type = (isinstance(value, int) and not isinstance(value, bool) if ints
                          else _is_number(value) if key in ("eps", "tune_lr")
                          else isinstance(value, str) if key == "tune_loss" else False)
            kind = ArgumentError if right_type else ArgumentTypeError
            hint = did_you_mean(value, ("kl", "mse")) if key == "tune_loss" else ""
            raise kind(f"calibration option {key}={value!r} is invalid: {key} must be "
                       f"{CALIBRATION_OPTIONS[key]}{hint}")


# ---------------------------------------------------------------------------------------------
# models


def check_models(models, what: str, reference: nn.Module | None = None, same_class: bool = True) -> list:
    """``models`` as a list, each checked (see the module docstring); ``what`` names them in
    messages ("experts", "base"); tensors are compared name by name with ``reference`` (default:
    the first model)."""
    if isinstance(models, nn.Module) or not isinstance(models, Iterable) or isinstance(models, (str, Mapping)):
        got = f"one {type(models).__name__}" if isinstance(models, nn.Module) else f"a {type(models).__name__}"
        raise ArgumentTypeError(f"{what} must be a non-empty list of torch.nn.Module, got {got}; pass "
                                f"a list with one module per task")
    models = list(models)
    if not models:
        raise ArgumentError(f"{what} must be a non-empty list of torch.nn.Module, got an empty list")
    for i, m in enumerate(models):
        _check_module(m, f"{what}[{i}]")
    if same_class:
        kinds = {type(m).__name__ for m in models}
        if len(kinds) > 1:
            raise ArgumentError(f"{what} must share one architecture, got classes {sorted(kinds)}")
    ref = _tensors(reference if reference is not None else models[0])
    ref_what = "experts[0]" if reference is not None or what != "experts" else f"{what}[0]"
    for i, m in enumerate(models):
        _check_layout(_tensors(m), ref, f"{what}[{i}]", ref_what)
        _check_finite(m, f"{what}[{i}]")
    return models


def _check_module(m, what: str) -> None:
    if not isinstance(m, nn.Module):
        raise ArgumentTypeError(f"{what} is a {type(m).__name__}, not a torch.nn.Module")
    for path, sub in m.named_modules():
        where = f"{what}" + (f"'s module '{path}'" if path else "")
        if type(sub).__name__ == "OptimizedModule" and hasattr(sub, "_orig_mod"):
            orig = f"{what}.{path + '.' if path else ''}_orig_mod"
            raise ArgumentError(f"{where} is a torch.compile'd module (OptimizedModule): merging reads "
                                f"and rewrites the module itself; pass the original module ({orig}) "
                                "and compile the merged model afterwards if you like")
        _check_reparametrized(sub, where)
    meta = next((n for n, t in _tensors(m).items() if t.is_meta), None)
    if meta is not None:
        raise ArgumentError(f"{what} has tensors on the meta device (e.g. {meta!r}): they hold no values "
                            "(a model built under torch.device('meta') or init_empty_weights); load its "
                            "weights first, e.g. model.to_empty(device='cpu') then load_state_dict(...)")


def _check_reparametrized(module: nn.Module, where: str) -> None:
    """Pruning and old-style weight/spectral norm recompute a weight in a forward pre-hook;
    parametrizations compute it on access: merging needs the plain tensors."""
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    if parametrize.is_parametrized(module):
        names = list(module.parametrizations.keys())
        raise ArgumentError(
            f"{where} ({type(module).__name__}) has parametrized tensors {names} "
            "(torch.nn.utils.parametrize: e.g. parametrizations.weight_norm, spectral_norm, orthogonal); "
            "merging needs plain parameters: call torch.nn.utils.parametrize.remove_parametrizations("
            f"module, {names[0]!r}) on it first (keeps the current values)")
    for hook in module._forward_pre_hooks.values():
        name = getattr(hook, "_tensor_name", None) or getattr(hook, "name", "weight")
        fix = None
        if isinstance(hook, prune.BasePruningMethod):
            fix = (f"is pruned with torch.nn.utils.prune ({name}_orig and {name}_mask, applied by a "
                   f"forward pre-hook); call torch.nn.utils.prune.remove(module, {name!r}) first to "
                   "make the pruning permanent")
        elif isinstance(hook, WeightNorm):
            fix = (f"uses torch.nn.utils.weight_norm on {name!r} (a forward pre-hook); call "
                   f"torch.nn.utils.remove_weight_norm(module, {name!r}) first")
        elif isinstance(hook, SpectralNorm):
            fix = (f"uses torch.nn.utils.spectral_norm on {name!r} (a forward pre-hook); call "
                   f"torch.nn.utils.remove_spectral_norm(module, {name!r}) first")
        if fix:
            raise ArgumentError(f"{where} ({type(module).__name__}) {fix}")


def _check_layout(mine: dict, ref: dict, what: str, ref_what: str) -> None:
    """Tensors of one name share dtype and device with the reference model's."""
    for name, t in mine.items():
        r = ref.get(name)
        if r is None:
            continue
        if t.dtype != r.dtype and (t.is_floating_point() or r.is_floating_point()):
            raise ArgumentError(f"{what}'s {name!r} is {t.dtype} but {ref_what}'s is {r.dtype}: the models "
                                f"must share dtypes; cast them first, e.g. {what}.to({r.dtype})")
        if t.device != r.device:
            raise ArgumentError(f"{what}'s {name!r} is on {t.device} but {ref_what}'s is on {r.device}: move "
                                f"every model to one device first, e.g. {what}.to('{r.device}')")


def _check_finite(model: nn.Module, what: str) -> None:
    """No NaN or inf in a floating parameter or buffer: one float32 sum per tensor (finite if
    every entry is, unless the sum overflows: then the exact test), the place looked up only for a
    bad tensor. About a quarter of a state-dict copy's time."""
    for name, t in _tensors(model).items():
        if not t.is_floating_point() or not t.numel():
            continue
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        if math.isfinite(t.detach().sum(dtype=acc)) or bool(torch.isfinite(t.detach()).all()):
            continue
        bad = (~torch.isfinite(t.detach())).nonzero()[0].tolist()
        value = t.detach()[tuple(bad)].item()
        kind = "parameter" if name in dict(model.named_parameters()) else "buffer"
        raise ArgumentError(f"{what}'s {kind} {name!r} holds {value} at index {tuple(bad)}: merging would "
                            "spread it into every task; fix or reload that model's weights (e.g. a "
                            "diverged training run)")


# ---------------------------------------------------------------------------------------------
# data


def check_data(data, n: int, max_batches, needs: tuple):
    """``data``: None or one iterable of batches per task. Returns ``(data, firsts)``: a list,
    one-shot iterators read into lists (every stage iterates the data again; a generator would be
    empty after the first), and each task's first batch (copied; None for a task without data).
    ``needs``: what needs data (every entry must then be given)."""
    if data is None:
        if needs:
            instead = [alt for key, alt in (("correction", "correction=None"),
                                            ("method", "a data-free method (method='average', or method='ties' with base=)"),
                                            ("align", "align='weight'")) if any(w.startswith(key) for w in needs)]
            raise ArgumentError(f"{' and '.join(needs)} {_verb(needs)} data=[one iterable of batches per task]; "
                                f"or pass {' and '.join(instead)} to merge without data")
        return None, None
    if isinstance(data, (str, bytes, torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        raise ArgumentTypeError(f"data is a {type(data).__name__}; pass a list with one iterable of batches "
                                "per task, e.g. data=[loader_a, loader_b] (or None)")
    data = list(data)
    if len(data) != n:
        raise ArgumentError(f"data has {len(data)} entries for {n} experts: give one iterable of "
                            "batches per task (None for a task without data)")
    out, firsts = [], []
    for t, d in enumerate(data):
        if d is None:
            strict = [w for w in needs if not w.startswith("correction")]
            if strict:
                raise ArgumentError(f"data[{t}] is None, but {' and '.join(strict)} {_verb(strict)} every "
                                    "task's data")
            out.append(None)
            firsts.append(None)
            continue
        d = _task_batches(d, t, max_batches)
        try:
            firsts.append(first_call(d, what=f"data[{t}]"))
        except TorchMergeError as err:
            msg = str(err) if str(err).startswith(f"data[{t}]") else f"data[{t}]: {err}"
            raise ArgumentError(msg) from None
        out.append(d)
    return out, firsts


def _verb(subjects) -> str:
    return "needs" if len(subjects) == 1 else "need"


def _task_batches(d, t: int, max_batches):
    if isinstance(d, (torch.Tensor, Mapping, Inputs)):
        return d  # one batch (documented)
    if isinstance(d, (str, bytes)) or not isinstance(d, Iterable):
        raise ArgumentTypeError(f"data[{t}] is a {type(d).__name__}; expected an iterable of batches (a "
                                "DataLoader, or a list of tensors, (x, y) tuples or dicts)")
    if _one_batch(d):
        shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in d]
        raise ArgumentError(f"data[{t}] is one batch (a {type(d).__name__} of {len(d)} tensors, shapes "
                            f"{shapes}), not an iterable of batches: iterating it would feed each "
                            f"tensor to the model as a batch. Pass a list of batches: data[{t}] = [(x, y)] "
                            "(or a DataLoader)")
    if isinstance(d, _ENDLESS) and max_batches is None and _endless(d):
        raise ArgumentError(f"data[{t}] is an endless {type(d).__module__}.{type(d).__name__}: every "
                            "stage would iterate it forever. Pass max_batches=N, or a finite iterable")
    if isinstance(d, Iterator):  # one-shot (generator, map, iter(list)): read once, keep
        return list(itertools.islice(d, max_batches))
    return d


def _endless(d) -> bool:
    try:
        return d.__length_hint__() is None  # repeat(x, times) is finite
    except (TypeError, AttributeError):
        return True


def _one_batch(d) -> bool:
    """An ``(x, y)`` pair given where a list of batches belongs: a tuple/list of tensors (or a
    dict and tensors) that differ in dimension count or dtype."""
    if not isinstance(d, (tuple, list)) or len(d) < 2:
        return False
    if not all(isinstance(v, (torch.Tensor, Mapping)) for v in d):
        return False
    kinds = {("dict",) if isinstance(v, Mapping) else (v.dim(), v.dtype) for v in d}
    return len(kinds) > 1


def check_batches_fit(experts, firsts, example: Inputs, example_what: str) -> None:
    """Each task's first batch has the example's structure (positional count, keywords, tensor
    shapes past the batch axis, dtypes) — or, if not, its expert runs it (one forward, eval mode, no grad); a task
    whose first batch its expert cannot run raises, naming the task and the shapes. The batch that
    *is* the example (data[0]'s, when no example_inputs is given) is always run: a wrong size there
    is the data's fault, and tracing would blame example_inputs."""
    if firsts is None:
        return
    for t, first in enumerate(firsts):
        if first is None:
            continue
        if _signature(first) == _signature(example) and first is not example:
            continue
        expert = experts[t] if t < len(experts) else experts[0]
        versus = "" if first is example else f"\n{example_what} is {example.describe()}."
        try:
            first.check_fits(expert, f"data[{t}]'s first batch")
            with torch.no_grad(), _eval(expert):
                _few_samples(first).to(_device(expert))(expert)
        except Exception as err:  # noqa: BLE001 - re-raised with the task and the shapes
            raise ShapeError(f"data[{t}]'s first batch ({first.describe()}) does not fit experts[{t}] "
                             f"({type(expert).__name__}): {type(err).__name__}: {err}{versus}\nEvery "
                             "task's batches must be inputs the experts accept (the same features, "
                             "channels, keys): fix that task's data") from err


def _few_samples(call: Inputs, n: int = 2) -> Inputs:
    """The first ``n`` samples of a batch: enough to see whether it fits, at a sliver of the cost
    of a full-batch forward (a 250-image batch is a few percent of a calibration's time)."""
    size = call.batch_size
    return call if size is None or size <= n else call.rows(torch.arange(n))


def _signature(call: Inputs) -> tuple:
    def sig(v):
        return (tuple(v.shape[1:]), v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__
    return (tuple(sig(a) for a in call.args), tuple(sorted((k, sig(v)) for k, v in call.kwargs.items())))


@contextlib.contextmanager
def _eval(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


__all__ = ["merge_arguments", "calibrate_arguments", "check_models", "check_data", "check_batches_fit",
           "check_method_kwargs", "calibration_options", "warn_unused_tune_options", "alignment_options", "check_calibration_values",
           "check_task_names",
           "check_leaf_modules", "check_max_batches", "CALIBRATION_OPTIONS"]
