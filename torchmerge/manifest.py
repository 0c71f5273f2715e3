"""The manifest of a saved merged model (``torchmerge.json``): written from a merged model, read
back and checked, and the JSON values in it.

:func:`manifest_of` describes a merged model in plain JSON (see :func:`torchmerge.io.save` for
the fields); :func:`read_manifest` reads one back and checks its format version and fields;
:func:`encode` / :func:`decode` carry plain Python values (tuples, dicts with int keys,
non-finite floats) through JSON unchanged; :func:`summary` makes ``merged.info`` JSON-safe.

>>> decode(json.loads(dumps(encode({0: "cat", "size": (2, 3)}))))
{0: 'cat', 'size': (2, 3)}
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .batches import example_inputs_of
from .errors import TorchMergeError
from .inject import InjectedModel
from .merged import GraphMergedModel, MergedModel
from .rewrite import TASK
from .spec import PermutationSpec

FORMAT = "torchmerge"
FORMAT_VERSION = 1
MANIFEST = "torchmerge.json"
WEIGHTS = "model.safetensors"
_MISSING = object()


# ---------------------------------------------------------------------------------------------
# writing


def manifest_of(merged: MergedModel, example_inputs=None) -> dict:
    """The manifest of ``merged`` (without the ``weights`` entry, which :func:`~torchmerge.io.save`
    adds once the weights file is written); ``example_inputs``: see :func:`~torchmerge.io.save`.

    >>> import torchmerge as tm
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> merged = tm.merge([net, net], method="average", example_inputs=torch.randn(2, 4), align=None,
    ...                   correction=None)
    >>> m = manifest_of(merged)
    >>> m["build"], m["heads"]["paths"], m["example"], [s["node"] for s in m["sites"]]
    ('graph', ['2'], {'args': [{'shape': [2, 4], 'dtype': 'float32'}]}, ['_0'])
    """
    from . import __version__

    injected = isinstance(merged, InjectedModel)
    info = merged.info or {}
    out = {"format": FORMAT, "format_version": FORMAT_VERSION, "torchmerge_version": __version__,
           "torch_version": torch.__version__, "build": "inject" if injected else "graph",
           "model_class": (merged._torchmerge_base if injected else type(merged.body)).__name__,
           "task_names": list(merged.task_names), "active_task": merged.active_task,
           "training": merged.training, "method": info.get("method"),
           "hyperparameters": _hyperparameters(info), "widened": info.get("method") == "pleas",
           "heads": _heads_entry(merged), "sites": [site_entry(n, s) for n, s in merged.sites().items()],
           "task_weights": None if merged.task_weights is None else {"names": list(merged.task_weights.names)},
           "info": summary(info)}
    if injected:
        out["attributes"] = _attributes_entry(merged)
    else:
        out["example"] = _example_entry(merged, example_inputs)
        out["trace_options"] = _trace_entry(merged.trace_options)
    return out


def _hyperparameters(info: dict) -> dict:
    merge_info = info.get("merge_info") or {}
    return {k: summary(v) for k, v in merge_info.items() if k not in ("perms", "widths", "sources")
            and (v is None or isinstance(v, (bool, int, float, str)))}


def _heads_entry(merged: MergedModel) -> dict:
    heads = merged.heads()
    shapes = [{path: {k: list(v.shape) for k, v in h.heads[t].state_dict().items()} for path, h in heads.items()}
              for t in range(merged.num_tasks)]
    return {"paths": list(heads), "shapes": shapes}


def site_entry(name: str, site) -> dict:
    """What the manifest records of one TaskAffine site (``load`` checks the rebuilt sites against it)."""
    entry = {"name": name, "channels": site.scale.shape[1], "channel_axis": site.channel_axis,
             "node": site.site_node, "module": site.site_module, "norm": site.norm_path}
    return {**entry, "rank": site.rank} if site.rank else entry  # older manifests: no low-rank maps


def _example_entry(merged: GraphMergedModel, example_inputs) -> dict:
    """Shapes and dtypes of the positional tensors the graph was traced with."""
    if example_inputs is not None:
        call = example_inputs_of(example_inputs)
        if call.kwargs or not all(isinstance(a, torch.Tensor) for a in call.args):
            raise TorchMergeError(f"example_inputs ({call.describe()}): the graph build re-traces with "
                                  "positional tensors only; pass a tensor or a tuple of tensors")
        return {"args": [{"shape": list(a.shape), "dtype": dtype_name(a.dtype)} for a in call.args]}
    floating = next((p.dtype for p in merged.body.parameters() if p.is_floating_point()), torch.float32)
    args = []
    for node in merged.body.graph.nodes:
        if node.op != "placeholder" or node.target == TASK:
            continue
        shape = node.meta.get("shape")
        if not isinstance(shape, tuple):
            break  # a defaulted argument the example call left out: positional tensors end here
        dtype = floating if node.meta.get("is_float", True) else torch.int64
        args.append({"shape": list(shape), "dtype": dtype_name(dtype)})
    return {"args": args}


def _trace_entry(options: dict) -> dict:
    leaves = []
    for m in options.get("leaf_modules") or ():
        leaves.append(m if isinstance(m, str) else {"class": f"{m.__module__}.{m.__qualname__}"})
    concrete = options.get("concrete_args")
    try:
        concrete = None if concrete is None else encode(dict(concrete))
    except TorchMergeError as e:
        raise TorchMergeError(f"concrete_args {concrete!r} cannot be saved: {e}") from e
    return {"leaf_modules": leaves, "concrete_args": concrete}


def _attributes_entry(merged: InjectedModel) -> dict:
    """Each task's attribute overrides, and the values they replace (the reference expert's)."""
    keys = list(dict.fromkeys(k for attrs in merged._task_attrs for k in attrs))
    base = []
    for path, in_config, name in keys:
        value = vars(merged._attribute_owner(path, in_config)).get(name, _MISSING)
        if value is not _MISSING:
            base.append([path, in_config, name, encode(value)])
    tasks = [[[p, c, n, encode(v)] for (p, c, n), v in attrs.items()] for attrs in merged._task_attrs]
    return {"base": base, "tasks": tasks}


# ---------------------------------------------------------------------------------------------
# JSON values


def encode(value):
    """A plain value (numbers, strings, None, lists/tuples/dicts of them) as JSON that
    :func:`decode` turns back into an equal value: tuples, dicts (any plain keys) and non-finite
    floats are tagged.

    >>> v = {0: "cat", "shape": (2, 3), "eps": float("inf")}
    >>> decode(json.loads(json.dumps(encode(v)))) == v
    True
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    raise TorchMergeError(f"a {type(value).__name__} is not a plain value (numbers, strings, None, and "
                          "lists, tuples and dicts of them)")


def decode(value):
    """The inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"tuple"} and isinstance(value["tuple"], list):
        return tuple(decode(v) for v in value["tuple"])
    if set(value) == {"dict"} and isinstance(value["dict"], list):
        return {_hashable(decode(k)): decode(v) for k, v in value["dict"]}
    if set(value) == {"float"} and value["float"] in ("inf", "-inf", "nan"):
        return float(value["float"])
    raise TorchMergeError(f"malformed value in the manifest: {json.dumps(value)[:200]}")


def dumps(value, indent: str = "") -> str:
    """JSON, one key per line, lists of numbers and strings kept on one line (readable manifests).

    >>> print(dumps({"shape": [2, 3], "sites": [{"name": "a"}]}))
    {
     "shape": [2, 3],
     "sites": [
      {
       "name": "a"
      }
     ]
    }
    """
    inner = indent + " "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + dumps(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value, allow_nan=False)


def _hashable(key):
    if isinstance(key, list):
        raise TorchMergeError(f"malformed dict key in the manifest: {key!r}")
    return key


def summary(value, depth: int = 0):
    """A JSON-safe, readable (lossy) summary of ``merged.info``: tensors as lists (shape and dtype
    when large), a PermutationSpec as its group sizes and frozen count, other objects by repr.

    >>> summary({"perms": [{"g": torch.tensor([1, 0])}], "lam": 0.4, "eps": float("nan")})
    {'perms': [{'g': [1, 0]}], 'lam': 0.4, 'eps': 'nan'}
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, torch.Tensor):
        if value.numel() <= 10_000:
            return value.detach().cpu().tolist()
        return {"shape": list(value.shape), "dtype": dtype_name(value.dtype)}
    if isinstance(value, PermutationSpec):
        return {"groups": {name: g.size for name, g in value.groups.items()}, "frozen": len(value.frozen)}
    if depth < 8 and isinstance(value, dict):
        return {str(k): summary(v, depth + 1) for k, v in value.items()}
    if depth < 8 and isinstance(value, (list, tuple)):
        return [summary(v, depth + 1) for v in value]
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name) -> torch.dtype:
    """``torch.float32`` for ``"float32"`` (only dtype names: nothing else is looked up)."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise TorchMergeError(f"unknown dtype {name!r} in the manifest's example call")
    return dtype


# ---------------------------------------------------------------------------------------------
# reading


def read_manifest(folder: Path) -> dict:
    """The manifest in ``folder``, checked: format, version (newer than this torchmerge reads:
    an error), the fields :func:`~torchmerge.io.load` reads.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / MANIFEST).write_text('{"format": "torchmerge", "format_version": 7}')
    >>> read_manifest(folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    torchmerge.errors.TorchMergeError: ... is in format 7 ...: upgrade torchmerge to load it
    """
    if not folder.is_dir():
        raise TorchMergeError(f"{folder} is not a folder; tm.load reads the folder merged.save wrote")
    file = folder / MANIFEST
    if not file.is_file():
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise TorchMergeError(f"no {MANIFEST} in {folder}; tm.load reads folders written by merged.save "
                              f"(found {found})")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TorchMergeError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TorchMergeError(f"{file} is not a torchmerge manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise TorchMergeError(f"{file}: format_version must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise TorchMergeError(f"{file} is in format {version} (written by torchmerge "
                              f"{manifest.get('torchmerge_version')}); this torchmerge reads formats up to "
                              f"{FORMAT_VERSION}: upgrade torchmerge to load it")
    _check_fields(manifest, file)
    return manifest


_FIELDS = {"build": str, "model_class": str, "task_names": list, "active_task": int, "training": bool,
           "widened": bool, "heads": dict, "sites": list, "info": dict, "weights": dict}


def _check_fields(manifest: dict, file: Path) -> None:
    bad = [k for k, kind in _FIELDS.items() if not isinstance(manifest.get(k), kind)]
    heads, weights = manifest.get("heads", {}), manifest.get("weights", {})
    if manifest.get("build") not in ("graph", "inject"):
        bad.append("build")
    if not isinstance(heads, dict) or not _strings(heads.get("paths")) or not isinstance(heads.get("shapes"), list) \
            or len(heads["shapes"]) != len(manifest.get("task_names") or ()):
        bad.append("heads")
    site_keys = ("name", "channels", "channel_axis", "node", "module", "norm")
    if not all(isinstance(s, dict) and all(k in s for k in site_keys)
               and type(s.get("rank", 0)) is int and s.get("rank", 0) >= 0 for s in manifest.get("sites") or ()):
        bad.append("sites")
    if not isinstance(weights, dict) or weights.get("file") != WEIGHTS or not isinstance(weights.get("sha256"), str) \
            or not isinstance(weights.get("bytes"), int) or not isinstance(weights.get("aliases"), dict):
        bad.append("weights")
    extra = ("attributes",) if manifest.get("build") == "inject" else ("example", "trace_options")
    bad += [k for k in extra if not isinstance(manifest.get(k), dict)]
    weights_spec = manifest.get("task_weights")
    if weights_spec is not None and not (isinstance(weights_spec, dict) and _strings(weights_spec.get("names"))):
        bad.append("task_weights")
    if bad:
        raise TorchMergeError(f"{file} is malformed: bad or missing fields {sorted(set(bad))}; write it again "
                              "with merged.save")


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


__all__ = ["manifest_of", "read_manifest", "site_entry", "dtype_name", "parse_dtype", "encode", "decode",
           "dumps", "summary", "FORMAT", "FORMAT_VERSION", "MANIFEST", "WEIGHTS"]
