"""Ship a merged model: ``merged.save(folder)`` and ``tm.load(folder, model)``, without the experts
and without pickle.

:func:`save` writes two files into a folder:

* ``model.safetensors`` — every tensor of ``merged.state_dict()``: the merged body, every task's
  head, the affine sites, TALL masks (bit-packed, as the model keeps them) and buffers;
* ``torchmerge.json`` — the manifest: format version, build kind, task names, the head paths and
  each task's head shapes, the sites (module paths / fx node names, channel axes and counts),
  method, hyper-parameters, a JSON summary of ``merged.info``, and what rebuilding needs: the
  example call's shapes and dtypes (graph build), the per-task attributes (injected build), and
  the weights file's size and SHA-256 (:mod:`torchmerge.manifest` writes and checks it).

:func:`load` rebuilds the structure from ``model``, a freshly constructed instance of the
reference architecture (random init is fine: every tensor is then loaded, strictly, from the
file) — the injected build with :func:`torchmerge.inject.rebuild_injected`, the graph build by
tracing ``model`` again with zeros of the recorded example shapes. Heads of other sizes than
``model``'s (and PLeaS's widened layers) are rebuilt as copies of ``model``'s modules holding
tensors of the saved shapes. Only those two files are read; nothing is unpickled or imported.

>>> import tempfile, torch, torchmerge as tm
>>> def net(k):
...     return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, k))
>>> merged = tm.merge([net(3), net(5)], method="average", example_inputs=torch.randn(2, 4),
...                   align=None, correction=None)
>>> folder = tempfile.mkdtemp()
>>> merged.save(folder)
>>> again = tm.load(folder, net(3))                 # a fresh model: its weights are not used
>>> x = torch.randn(2, 4)
>>> torch.equal(again(x, task=1), merged(x, task=1)), again(x, task=1).shape
(True, torch.Size([2, 5]))
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from .batches import example_inputs_of
from .errors import TorchMergeError
from .inject import RESERVED, InjectedModel, rebuild_injected
from .manifest import (FORMAT_VERSION, MANIFEST, WEIGHTS, decode, dumps, manifest_of, parse_dtype,
                       read_manifest, site_entry)
from .merged import GraphMergedModel, MergedModel
from .rewrite import build_graph, is_hf_conv1d
from .task_weights import TaskWeights
from .tree import fit_sizes, submodule as _submodule, under as _under
from .tree import device_of

_FX_CONSTANT = re.compile(r"_tensor_constant\d+$")  # a tensor fx found in the forward's code


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # a declared dependency; only a broken install lacks it
        raise TorchMergeError("saving and loading merged models needs the safetensors package: "
                              "pip install safetensors") from e
    return safetensors


# ---------------------------------------------------------------------------------------------
# save


def save(merged: MergedModel, path, example_inputs=None) -> None:
    """Write ``merged`` to the folder ``path`` (created if needed; the two files are replaced).

    ``example_inputs`` (graph build only): the call :func:`load` re-traces with, described by its
    shapes and dtypes (default: the shapes recorded when ``tm.merge`` traced the model; floating
    inputs get the body's dtype, others int64).

    >>> import tempfile, os, torch, torchmerge as tm
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> merged = tm.merge([net, net], method="average", example_inputs=torch.randn(2, 4), align=None,
    ...                   correction=None)
    >>> folder = tempfile.mkdtemp()
    >>> save(merged, folder)
    >>> sorted(os.listdir(folder))
    ['model.safetensors', 'torchmerge.json']
    """
    if not isinstance(merged, MergedModel):
        raise TorchMergeError(f"save takes a merged model (tm.merge's result), got {type(merged).__name__}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise TorchMergeError(f"{folder} is a file; merged.save writes a folder: pass a folder path")
    manifest = manifest_of(merged, example_inputs)  # before writing anything: it may refuse
    folder.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _tensors_to_save(merged)
    weights = folder / WEIGHTS
    _replace(weights, lambda tmp: _safetensors().torch.save_file(
        tensors, tmp, metadata={"format": "pt", "torchmerge_format": str(FORMAT_VERSION)}))
    manifest["weights"] = {"file": WEIGHTS, "bytes": weights.stat().st_size, "sha256": _sha256(weights),
                           "aliases": aliases}
    text = dumps(manifest) + "\n"
    _replace(folder / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _replace(target: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never half a file."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensors_to_save(merged: nn.Module):
    """``(tensors, aliases)``: the state dict on the CPU, contiguous; a name whose tensor is the very
    tensor of an earlier name (tied weights) is stored once and listed in ``aliases``."""
    tensors, aliases, first, storages = {}, {}, {}, {}
    for name, t in merged.state_dict().items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) \
            if t.numel() else None
        if key in first:
            aliases[name] = first[key]
            continue
        if key is not None:
            first[key] = name
            storages.setdefault(key[0], []).append(name)
        tensors[name] = t
    shared = {n for names in storages.values() if len(names) > 1 for n in names}
    return {n: (t.clone() if n in shared else t).cpu().contiguous() for n, t in tensors.items()}, aliases


# ---------------------------------------------------------------------------------------------
# load


def load(path, model: nn.Module, example_inputs=None) -> MergedModel:
    """The merged model saved in the folder ``path``, rebuilt from ``model``: a freshly constructed
    instance of the reference architecture (e.g. ``BertForSequenceClassification(config)``; its
    weights are not used). ``example_inputs`` (graph build only): a call to re-trace with instead
    of zeros shaped like the recorded one (for a forward whose trace depends on input values).

    Every task's outputs equal the saved model's exactly, on ``model``'s device. Raises
    :class:`~torchmerge.TorchMergeError` for a folder without a manifest, a manifest of a newer
    format, a truncated or corrupted weights file, or a ``model`` of another architecture (the
    message lists the missing and unexpected tensors and the shape differences).

    >>> import tempfile, torch, torchmerge as tm
    >>> load(tempfile.mkdtemp(), torch.nn.Linear(2, 2))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    torchmerge.errors.TorchMergeError: no torchmerge.json in ...; ...
    """
    if not isinstance(model, nn.Module) or isinstance(model, MergedModel):
        raise TorchMergeError(f"load(path, model) takes a freshly constructed model of the reference "
                              f"architecture, got {type(model).__name__}")
    folder = Path(path)
    manifest = read_manifest(folder)
    tensors = _read_weights(folder, manifest, _device_or_cpu(model))
    builder = _load_injected if manifest["build"] == "inject" else _load_graph
    merged = builder(manifest, tensors, model, example_inputs)
    _add_saved_ranks(merged, manifest)
    _check_sites(merged, manifest)
    _load_strict(merged, tensors, manifest)
    merged.train(manifest["training"])
    merged.set_task(manifest["active_task"])
    merged.info = manifest["info"]
    return merged


def _read_weights(folder: Path, manifest: dict, device) -> dict:
    """The tensors of the weights file, checked against the manifest's size and SHA-256."""
    entry = manifest["weights"]
    file = folder / entry["file"]
    if not file.is_file():
        raise TorchMergeError(f"{file} is missing; the manifest {folder / MANIFEST} needs it")
    safetensors = _safetensors()
    try:
        tensors = safetensors.torch.load_file(file, device=str(device))
    except Exception as e:  # SafetensorError and friends: a truncated or damaged file
        raise TorchMergeError(f"cannot read {file}: {type(e).__name__}: {e} (truncated or corrupted? "
                              "write it again with merged.save)") from e
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise TorchMergeError(f"{file} has {size} bytes, the manifest says {entry['bytes']}: truncated or "
                              "replaced; write it again with merged.save")
    if _sha256(file) != entry["sha256"]:
        raise TorchMergeError(f"{file} is corrupted: its SHA-256 differs from the manifest's; write it again "
                              "with merged.save")
    for alias, source in entry["aliases"].items():
        if source not in tensors:
            raise TorchMergeError(f"{file}: tied tensor {alias!r} refers to {source!r}, which the file lacks")
        tensors[alias] = tensors[source]
    return tensors


def _load_graph(manifest, tensors, model, example_inputs) -> GraphMergedModel:
    head_paths = manifest["heads"]["paths"]
    body = _strip(tensors, "body.")
    shared = {k: v for k, v in body.items() if not _under(k, head_paths) and not k.startswith("sites.")}
    weights = _task_weights(manifest, tensors)
    shared.update(_masked(weights, manifest))
    template = _template(model, shared, manifest, tensors, "body.", check_missing=False)
    heads = _task_heads(template, tensors, "body.", manifest)
    example = _example_call(manifest, example_inputs, _device_or_cpu(model))
    own = template.state_dict()
    state = {**own, **{k: v for k, v in shared.items() if k in own}}
    options = _trace_options(manifest["trace_options"], model)
    wanted = {s["node"] for s in manifest["sites"]}
    try:
        gm = build_graph(template, example, state, heads, head_paths, lambda node, _: node.name in wanted,
                         options["leaf_modules"], options["concrete_args"])
    except TorchMergeError as e:
        raise TorchMergeError(f"re-tracing {type(model).__name__} to rebuild the saved model failed: {e}\n"
                              "Pass load(..., example_inputs=<one real batch>) if the trace depends on the "
                              "input values") from e
    merged = GraphMergedModel(gm, manifest["task_names"], weights)
    merged.trace_options = options
    return merged


def _load_injected(manifest, tensors, model, example_inputs) -> InjectedModel:
    head_paths = manifest["heads"]["paths"]
    shared = {k: v for k, v in tensors.items() if not _under(k, head_paths) and k.split(".")[0] not in RESERVED}
    weights = _task_weights(manifest, tensors)
    shared.update(_masked(weights, manifest))
    template = _template(model, shared, manifest, tensors, "", check_missing=True)
    heads = _task_heads(template, tensors, "", manifest)
    modules = dict(template.named_modules())
    chosen = []
    for site in manifest["sites"]:
        if site["module"] not in modules:
            raise TorchMergeError(f"the saved site {site['name']!r} follows module {site['module']!r}, which "
                                  f"{type(model).__name__} lacks: pass a model of the saved architecture")
        chosen.append((site["module"], site["channels"], site["channel_axis"]))
    attributes = manifest["attributes"]
    tasks = [_attribute_dict(entries) for entries in attributes.get("tasks", [])]
    if len(tasks) != len(manifest["task_names"]):
        raise TorchMergeError(f"the manifest's attributes list {len(tasks)} tasks for {len(manifest['task_names'])}")
    merged = rebuild_injected(template, shared, heads, head_paths, chosen, manifest["task_names"],
                              weights, tasks)
    for (path, in_config, name), value in _attribute_dict(attributes.get("base", [])).items():
        setattr(merged._attribute_owner(path, in_config), name, value)
    return merged


def _attribute_dict(entries) -> dict:
    try:
        return {(str(p), bool(c), str(n)): decode(v) for p, c, n, v in entries}
    except (TypeError, ValueError) as e:
        raise TorchMergeError(f"malformed attributes in the manifest: {e}") from e


def _strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _template(model: nn.Module, saved: dict, manifest: dict, tensors: dict, prefix: str,
              check_missing: bool) -> nn.Module:
    """``model``, or a copy of it holding tensors of the saved shapes (PLeaS's widened layers, task
    0's heads) and dtypes; the architecture is checked against the saved body tensors first."""
    head_paths = manifest["heads"]["paths"]
    modules = dict(model.named_modules())
    absent = [p for p in head_paths if p not in modules]
    own = {k: v for k, v in model.state_dict().items() if not _under(k, head_paths)}
    first_heads = {f"{p}.{k}": v for p in head_paths for k, v in _strip(tensors, f"{prefix}{p}.heads.0.").items()}
    unexpected = [k for k in saved if k not in own and not _plain_tensor(model, k) and not _FX_CONSTANT.match(k.rpartition(".")[2])]
    missing = [k for k in own if k not in saved] if check_missing else []
    shapes = [] if manifest["widened"] else \
        [(k, own[k].shape, saved[k].shape) for k in saved if k in own and own[k].shape != saved[k].shape]
    if absent or unexpected or missing or shapes:
        raise TorchMergeError(_mismatch(model, manifest, missing, unexpected, shapes, absent))
    everything = model.state_dict()
    wanted = {**saved, **first_heads}  # the template's heads: task 0's shapes (PLeaS widens their inputs)
    changes = {k: v for k, v in wanted.items()
               if k in everything and (everything[k].shape, everything[k].dtype) != (v.shape, v.dtype)}
    if not changes:
        return model
    template = copy.deepcopy(model)
    conform(template, changes)
    return template


def _plain_tensor(model: nn.Module, key: str) -> bool:
    """A tensor attribute that is no parameter or buffer (fx keeps it in the graph's state)."""
    obj = model
    for part in key.split("."):
        obj = getattr(obj, part, None)
    return isinstance(obj, torch.Tensor)


def _mismatch(model, manifest, missing, unexpected, shapes, heads=()) -> str:
    lines = [f"{type(model).__name__} does not have the architecture of the saved model "
             f"({manifest['model_class']}, {manifest['build']} build):"]
    if heads:
        lines.append(f"  no head modules {heads} (the saved model's heads)")
    for what, keys in (("missing from the saved model", missing), ("unexpected (not in the model)", unexpected)):
        if keys:
            lines.append(f"  {len(keys)} tensors {what}: {keys[:10]}{' ...' if len(keys) > 10 else ''}")
    for key, mine, theirs in shapes[:10]:
        lines.append(f"  {key}: the model has shape {tuple(mine)}, the saved tensor {tuple(theirs)}")
    if len(shapes) > 10:
        lines.append(f"  ... and {len(shapes) - 10} more shape differences")
    lines.append("Construct the model with the configuration the merged model was built from.")
    return "\n".join(lines)


def conform(module: nn.Module, tensors: dict) -> nn.Module:
    """Give ``module``'s parameters and buffers the shapes and dtypes of ``tensors`` (by name; the
    values are not copied) and fix the size attributes of Linear, ConvNd, norms, Embedding and
    Hugging Face ``Conv1D`` to match. A tied parameter stays tied. In place; returns ``module``.

    >>> head = conform(torch.nn.Linear(8, 3), {"weight": torch.zeros(5, 8), "bias": torch.zeros(5)})
    >>> head.out_features, tuple(head(torch.zeros(1, 8)).shape)
    (5, (1, 5))
    """
    for name, value in tensors.items():
        path, _, leaf = name.rpartition(".")
        owner = _submodule(module, path)
        if owner is None:
            continue
        for table in (owner._parameters, owner._buffers):
            t = table.get(leaf)
            if t is not None and (t.shape, t.dtype) != (value.shape, value.dtype):
                fresh = torch.empty(value.shape, dtype=value.dtype, device=t.device)
                if isinstance(t, nn.Parameter):
                    t.data = fresh
                else:
                    table[leaf] = fresh
    for m in module.modules():
        fit_sizes(m)
    return module


def _task_heads(template: nn.Module, tensors: dict, prefix: str, manifest: dict) -> list:
    """Per task ``{head path: a copy of template's head holding tensors of the saved shapes}``."""
    out = []
    for t, shapes in enumerate(manifest["heads"]["shapes"]):
        heads = {}
        for path in manifest["heads"]["paths"]:
            saved = _strip(tensors, f"{prefix}{path}.heads.{t}.")
            found = {k: list(v.shape) for k, v in saved.items()}
            if not isinstance(shapes, dict) or found != shapes.get(path):
                raise TorchMergeError(f"the weights file does not match the manifest: head {path!r} of task "
                                      f"{t} has tensors {found}, the manifest says {shapes.get(path)}")
            heads[path] = conform(copy.deepcopy(template.get_submodule(path)), saved)
        out.append(heads)
    return out


def _task_weights(manifest: dict, tensors: dict):
    spec = manifest.get("task_weights")
    if spec is None:
        return None
    names = spec["names"]
    if names != sorted(names):
        raise TorchMergeError("the manifest's task_weights names are not sorted; write it again with merged.save")
    parts = {}
    for kind in ("merged", "base", "mask"):
        keys = [f"task_weights.{kind}_{i}" for i in range(len(names))]
        absent = [k for k in keys if k not in tensors]
        if absent:
            raise TorchMergeError(f"the weights file lacks the TALL tensors {absent[:5]} the manifest lists")
        parts[kind] = {n: tensors[k] for n, k in zip(names, keys)}
    return TaskWeights(parts["merged"], parts["base"], parts["mask"])


def _masked(weights, manifest: dict) -> dict:
    """The TALL-masked tensors of the active task: the merged model keeps them as non-persistent
    buffers (not in the file), but rebuilding checks and fills every tensor of the architecture."""
    return {} if weights is None else weights(manifest["active_task"])


def _example_call(manifest: dict, example_inputs, device) -> tuple:
    """The positional tensors to re-trace with: ``example_inputs``, or zeros of the saved shapes."""
    if example_inputs is not None:
        call = example_inputs_of(example_inputs)
        if call.kwargs:
            raise TorchMergeError(f"example_inputs ({call.describe()}): the graph build traces positional "
                                  "tensors only")
        return call.args
    args = manifest["example"].get("args")
    if not isinstance(args, list) or not all(isinstance(a, dict) and _ints(a.get("shape")) for a in args):
        raise TorchMergeError(f"malformed example call in the manifest: {args!r}")
    return tuple(torch.zeros(a["shape"], dtype=parse_dtype(a.get("dtype")), device=device) for a in args)


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)


def _trace_options(entry: dict, model: nn.Module) -> dict:
    """Leaf modules (paths, or classes found among ``model``'s own modules by name: nothing is
    imported; a class the model does not use changes no trace) and concrete_args."""
    classes = {f"{type(m).__module__}.{type(m).__qualname__}": type(m) for m in model.modules()}
    leaves = []
    for leaf in entry.get("leaf_modules") or []:
        if isinstance(leaf, str):
            leaves.append(leaf)
        elif isinstance(leaf, dict) and leaf.get("class") in classes:
            leaves.append(classes[leaf["class"]])
    concrete = entry.get("concrete_args")
    return {"leaf_modules": tuple(leaves), "concrete_args": None if concrete is None else decode(concrete)}


def _add_saved_ranks(merged: MergedModel, manifest: dict) -> None:
    """Low-rank maps (from ``tune_rank``) on the sites the manifest gives a rank (matched by name)."""
    ranks = {s["name"]: s.get("rank", 0) for s in manifest["sites"]}
    for name, site in merged.sites().items():
        if ranks.get(name, 0):
            site.add_low_rank(ranks[name])


def _check_sites(merged: MergedModel, manifest: dict) -> None:
    got = [site_entry(n, s) for n, s in merged.sites().items()]
    if got != manifest["sites"]:
        diff = [(a, b) for a, b in zip(manifest["sites"], got) if a != b][:3]
        raise TorchMergeError(f"the rebuilt model's sites differ from the saved ones ({len(manifest['sites'])} "
                              f"saved, {len(got)} rebuilt; first differences (saved, rebuilt): {diff}); pass a "
                              "model of the saved architecture")


def _load_strict(merged: MergedModel, tensors: dict, manifest: dict) -> None:
    """Every saved tensor into ``merged``, strictly (names, shapes; dtypes are taken from the file).

    Tensor constants that fx lifted out of the forward's code (``_tensor_constant<i>``) are left
    out: the new trace computed them from the same code, and their numbering depends on how often
    the model had been traced before. So are saved copies of non-persistent buffers (files written
    before the TALL-masked tensors became such buffers held one)."""
    own = {k: v for k, v in merged.state_dict().items() if not _FX_CONSTANT.match(k.rpartition(".")[2])}
    transient = {f"{p}.{b}" if p else b for p, m in merged.named_modules() for b in m._non_persistent_buffers_set}
    tensors = {k: v for k, v in tensors.items() if not _FX_CONSTANT.match(k.rpartition(".")[2])
               and k not in transient}
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [(k, own[k].shape, v.shape) for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise TorchMergeError(_mismatch(merged, manifest, missing, unexpected, shapes))
    conform(merged, {k: v for k, v in tensors.items() if own[k].dtype != v.dtype})
    merged.load_state_dict(tensors, strict=False)  # strict up to the constants: checked above


__all__ = ["save", "load", "conform", "read_manifest", "FORMAT_VERSION", "MANIFEST", "WEIGHTS"]


def _device_or_cpu(model):
    return device_of(model, torch.device("cpu"))
