"""Saving and loading merged models: ``merged.save(folder)`` / ``tm.load(folder, fresh_model)``.

Round trips over the architecture table in both builds, after calibration, with TALL masks, with
PLeaS's widened layers and with a Hugging Face BERT classifier whose heads differ per task: every
task's outputs must be *equal* (``torch.equal``) to the saved model's, and the loaded model must
keep the whole task API. Then the errors, and proof that loading never unpickles anything.
"""
from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import torchmerge as tm
from merge_helpers import TABLE, inputs_of as _inputs, perturbed_experts as _experts
from merge_helpers import randomize_sites as _randomize_sites
from merge_helpers import bert_batches as _bert_batches, tiny_bert as _bert
from architectures import BY_NAME
from torchmerge.inject import InjectedModel
from torchmerge.manifest import FORMAT_VERSION, decode, encode
from torchmerge.merged import GraphMergedModel


def _fresh(model_or_case, seed=123):
    """A fresh instance of the architecture with other weights (what a user constructs to load into)."""
    model = model_or_case.make_model() if hasattr(model_or_case, "make_model") else copy.deepcopy(model_or_case)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.train()


def _equal(a, b) -> bool:
    """Outputs (tensors or any pytree of them, e.g. a ModelOutput) equal bit for bit."""
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    return spec_a == spec_b and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                    for x, y in zip(leaves_a, leaves_b))


def _equal_heads(merged) -> bool:
    """Every task's heads have the same shapes (a mixed-task batch is possible)."""
    shapes = [[tuple(p.shape) for h in merged.heads().values() for p in h.heads[t].parameters()]
              for t in range(merged.num_tasks)]
    return all(s == shapes[0] for s in shapes)


def _round_trip(merged, fresh, folder, **load_kw):
    merged.save(folder)
    return tm.load(folder, fresh, **load_kw)


def _same_tasks(merged, loaded, x, kwargs=None):
    """Every task equal, the active task, a mixed batch (equal head sizes) and export(t)."""
    kwargs = kwargs or {}
    with torch.no_grad():
        for t in range(merged.num_tasks):
            assert _equal(loaded(*x, task=t, **kwargs), merged(*x, task=t, **kwargs)), f"task {t}"
        assert _equal(loaded(*x, **kwargs), merged(*x, **kwargs))
        if _equal_heads(merged):
            ids = torch.arange(x[0].shape[0]) % merged.num_tasks
            assert _equal(loaded(*x, task=ids, **kwargs), merged(*x, task=ids, **kwargs))
        for t in range(merged.num_tasks):
            assert _equal(loaded.export(t)(*x, **kwargs), merged.export(t)(*x, **kwargs))


# ---------------------------------------------------------------------------------------------
# the architecture table, both builds


@pytest.mark.parametrize("build", ["graph", "inject"])
@pytest.mark.parametrize("case", TABLE, ids=str)
def test_table_round_trip(case, build, tmp_path):
    experts = _experts(case)
    x = _inputs(case)
    merged = tm.merge(experts, example_inputs=x, method="average", align=None, correction=None,
                      build=build, task_names=["a", "b"]).eval()
    _randomize_sites(merged)
    merged.set_task("b")
    loaded = _round_trip(merged, _fresh(case), tmp_path / "m")
    assert type(loaded) is type(merged) and loaded.task_names == ["a", "b"] and loaded.active_task == 1
    assert not loaded.training and list(loaded.sites()) == list(merged.sites())
    _same_tasks(merged, loaded, x)


def test_identity_affines_and_manifest(tmp_path):
    """Identity affines round-trip too; the manifest says what the model is, in plain JSON."""
    case = BY_NAME["mlp"]
    experts = _experts(case, 3)
    merged = tm.merge(experts, example_inputs=_inputs(case), method="ties", align="weight",
                      correction=None, task_names=["x", "y", "z"], k=0.5).eval()
    loaded = _round_trip(merged, _fresh(case), tmp_path / "m")
    _same_tasks(merged, loaded, _inputs(case))
    assert all(torch.equal(s.scale, torch.ones_like(s.scale)) for s in loaded.sites().values())
    manifest = json.loads((tmp_path / "m" / "torchmerge.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["build"] == "graph"
    assert manifest["task_names"] == ["x", "y", "z"] and manifest["method"] == "ties"
    assert manifest["hyperparameters"]["k"] == 0.5
    assert manifest["heads"]["paths"] == ["head"]
    assert manifest["heads"]["shapes"] == 3 * [{"head": {"weight": [3, 12], "bias": [3]}}]
    assert [s["name"] for s in manifest["sites"]] == list(merged.sites())
    assert all(s["node"] and s["channels"] > 0 for s in manifest["sites"])
    spec = manifest["info"]["spec"]
    assert sorted(spec["groups"].values()) == sorted(case.sizes) and spec["frozen"] >= 1
    perms = manifest["info"]["merge_info"]["perms"]
    assert len(perms) == 3 and all(sorted(p) == list(range(len(p))) for d in perms for p in d.values())
    assert manifest["example"] == {"args": [{"shape": [4, 8], "dtype": "float32"}]}
    assert loaded.info == manifest["info"]


def test_heads_of_different_sizes_graph_and_inject(tmp_path):
    def net(classes, seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, classes)).eval()
    x = torch.randn(5, 6)
    for build in ("graph", "inject"):
        merged = tm.merge([net(3, 0), net(7, 1), net(2, 2)], example_inputs=x, method="average",
                          align=None, correction=None, build=build).eval()
        _randomize_sites(merged)
        loaded = _round_trip(merged, net(4, 9), tmp_path / build)   # any head size: rebuilt per task
        assert [loaded(x, task=t).shape[1] for t in range(3)] == [3, 7, 2]
        heads = next(iter(loaded.heads().values())).heads
        assert [h.out_features for h in heads] == [3, 7, 2]
        _same_tasks(merged, loaded, (x,))


# ---------------------------------------------------------------------------------------------
# calibration, TALL, PLeaS


def _task_data(case, tasks, batches=2):
    return [[(case.make_input(8, 10 * t + b), None) for b in range(batches)] for t in range(tasks)]


@pytest.mark.parametrize("build", ["graph", "inject"])
@pytest.mark.parametrize("name", ["mlp", "resnet_basic"])
def test_after_calibration(name, build, tmp_path):
    case = BY_NAME[name]
    merged = tm.merge(_experts(case), method="average", data=_task_data(case, 2), align="weight",
                      correction="affine", build=build).eval()
    assert merged.info["calibration"]["mode"] == "affine"
    loaded = _round_trip(merged, _fresh(case), tmp_path / "m")
    _same_tasks(merged, loaded, _inputs(case))
    assert loaded.info["calibration"]["mode"] == "affine"
    if build == "graph":  # a site that absorbed its BatchNorm absorbs it again
        norms = [s.norm_path for s in merged.sites().values()]
        assert [s.norm_path for s in loaded.sites().values()] == norms and (name == "mlp" or any(norms))


@pytest.mark.parametrize("build", ["graph", "inject"])
def test_tall_masks(build, tmp_path):
    case = BY_NAME["mlp"]
    experts = _experts(case, 3)
    base = _experts(case, 4)[3]
    merged = tm.merge(experts, method="tall", base=base, example_inputs=_inputs(case), align=None,
                      correction=None, build=build, lam=0.2).eval()
    _randomize_sites(merged)
    merged.set_task(2)
    loaded = _round_trip(merged, _fresh(case), tmp_path / "m")
    assert loaded.task_weights is not None and loaded.task_weights.names == merged.task_weights.names
    masks = {k: v for k, v in loaded.state_dict().items() if "task_weights.mask" in k}
    assert masks and all(v.dtype == torch.uint8 for v in masks.values())  # kept bit-packed
    x = _inputs(case, batch=6)
    _same_tasks(merged, loaded, x)
    ids = torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        assert _equal(loaded(*x, task=ids), merged(*x, task=ids))


@pytest.mark.parametrize("build", ["graph", "inject"])
def test_pleas_widened_layers(build, tmp_path):
    case = BY_NAME["mlp"]
    experts = _experts(case, 2)
    merged = tm.merge(experts, method="pleas", data=_task_data(case, 2), correction=None, build=build,
                      width=1.5).eval()
    root = (lambda m: m.body) if build == "graph" else (lambda m: m)  # noqa: E731
    assert root(merged).fc1.out_features == 24                   # 16 units widened by 1.5
    fresh = _fresh(case)
    narrow = {n: tuple(v.shape) for n, v in fresh.state_dict().items()}
    loaded = _round_trip(merged, fresh, tmp_path / "m")
    assert root(loaded).fc1.out_features == 24 and root(loaded).fc1.weight.shape == (24, 8)
    _same_tasks(merged, loaded, _inputs(case))
    assert {n: tuple(v.shape) for n, v in fresh.state_dict().items()} == narrow   # fresh: not widened


# ---------------------------------------------------------------------------------------------
# the loaded model works like the saved one


def _mlp_merged(build="graph"):
    case = BY_NAME["mlp"]
    merged = tm.merge(_experts(case), example_inputs=_inputs(case), method="average", align=None,
                      correction=None, build=build).eval()
    _randomize_sites(merged)
    return case, merged


@pytest.mark.parametrize("build", ["graph", "inject"])
def test_training_the_loaded_model(build, tmp_path):
    case, merged = _mlp_merged(build)
    loaded = _round_trip(merged, _fresh(case), tmp_path / "m")
    for p in loaded.parameters():
        p.requires_grad_(False)
    trainable = list(loaded.task_parameters())
    for p in trainable:
        p.requires_grad_(True)
    (x,) = _inputs(case)
    loaded(x, task=1).square().sum().backward()
    assert all(p.grad is not None for s in loaded.sites().values() for p in s.parameters())
    assert all(p.grad is None for p in set(loaded.parameters()) - set(trainable))
    assert not any(p.data_ptr() == q.data_ptr() for p in loaded.parameters() for q in merged.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("build", ["graph", "inject"])
def test_torch_compile_the_loaded_model(build, tmp_path):
    case, merged = _mlp_merged(build)
    loaded = _round_trip(merged, _fresh(case), tmp_path / "m")
    compiled = torch.compile(loaded)
    (x,) = _inputs(case)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, task=1), merged(x, task=1))
        ids = torch.tensor([0, 1, 1, 0])
        torch.testing.assert_close(compiled(x, task=ids), merged(x, task=ids))


def test_dtype_and_tied_weights_survive(tmp_path):
    """A float64 merged model loads into a float32 fresh model as float64; tied weights stay tied."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.head(self.b(self.a(x).relu()).relu())
    torch.manual_seed(0)
    experts = [Tied().double(), Tied().double()]
    x = torch.randn(3, 6, dtype=torch.float64)
    for build in ("graph", "inject"):
        merged = tm.merge(experts, example_inputs=x, method="average", align=None, correction=None,
                          heads=["head"], build=build).eval()
        _randomize_sites(merged)
        loaded = _round_trip(merged, Tied(), tmp_path / build)
        manifest = json.loads((tmp_path / build / "torchmerge.json").read_text())
        assert manifest["weights"]["aliases"], "the tied weight is stored once"
        root = loaded.body if build == "graph" else loaded
        assert root.b.weight is root.a.weight and root.a.weight.dtype == torch.float64
        _same_tasks(merged, loaded, (x,))


def test_graph_build_with_leaf_modules_and_example_inputs(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) if x.sum() > -1e9 else x   # data-dependent: fx keeps it opaque

    torch.manual_seed(0)
    make = lambda k: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Block(), nn.Linear(8, k)).eval()  # noqa: E731
    x = torch.randn(3, 4)
    merged = tm.merge([make(2), make(3)], example_inputs=x, method="average", align=None,
                      correction=None, leaf_modules=(Block,), build="graph").eval()
    _randomize_sites(merged)
    merged.save(tmp_path / "m", example_inputs=torch.randn(5, 4))
    manifest = json.loads((tmp_path / "m" / "torchmerge.json").read_text())
    assert manifest["example"]["args"] == [{"shape": [5, 4], "dtype": "float32"}]
    assert manifest["trace_options"]["leaf_modules"][0]["class"].endswith("Block")
    loaded = tm.load(tmp_path / "m", make(2))
    assert loaded.trace_options["leaf_modules"] == (Block,)
    _same_tasks(merged, loaded, (x,))
    again = tm.load(tmp_path / "m", make(2), example_inputs=torch.ones(2, 4))
    _same_tasks(merged, again, (x,))


# ---------------------------------------------------------------------------------------------
# Hugging Face


def test_bert_round_trip_and_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    base = _bert(2, 0)
    experts = []
    for i, k in enumerate((2, 3)):
        expert = _bert(k, 10 + i)
        expert.load_state_dict({n: v for n, v in base.state_dict().items() if not n.startswith("classifier")},
                               strict=False)
        with torch.no_grad():
            for n, p in expert.named_parameters():
                if not n.startswith("classifier"):
                    p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        experts.append(expert)
    data = [_bert_batches(k, t) for t, k in enumerate((2, 3))]
    merged = tm.merge(experts, method="ties", base=base, data=data, align=None, correction="affine")
    merged.save(tmp_path / "bert")
    fresh = transformers.BertForSequenceClassification(base.config)   # random init, 2 labels
    loaded = tm.load(tmp_path / "bert", fresh)
    assert isinstance(loaded, transformers.BertForSequenceClassification) and isinstance(loaded, InjectedModel)
    with torch.no_grad():
        for t in range(2):
            batch = data[t][0]
            out, want = loaded(**batch, task=t), merged(**batch, task=t)
            assert torch.equal(out.logits, want.logits) and torch.equal(out.loss, want.loss)
            assert loaded.export(t).num_labels == merged.export(t).num_labels == (2, 3)[t]
    assert fresh.config.num_labels == 2 and fresh.classifier.out_features == 2   # untouched

    exported = loaded.export(1)
    exported.save_pretrained(tmp_path / "task1")
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "task1").eval()
    batch = {k: v for k, v in data[1][0].items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, exported(**batch).logits)
        torch.testing.assert_close(back(**batch).logits, merged(**batch, task=1).logits)
    assert back.config.num_labels == 3


# ---------------------------------------------------------------------------------------------
# errors


def test_wrong_architecture_is_listed(tmp_path):
    case, merged = _mlp_merged("inject")
    merged.save(tmp_path / "m")
    with pytest.raises(tm.TorchMergeError, match="VGG does not have the architecture of the saved model "
                       r"\(MLP, inject build\)") as err:
        tm.load(tmp_path / "m", BY_NAME["vgg"].make_model())
    message = str(err.value)
    assert "no head modules ['head']" in message and "tensors missing from the saved model" in message
    assert "4 tensors unexpected (not in the model): ['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight']" in message
    extra = copy.deepcopy(case.make_model())
    extra.extra = nn.Linear(2, 2)
    with pytest.raises(tm.TorchMergeError, match=r"missing from the saved model: \['extra.weight', 'extra.bias'\]"):
        tm.load(tmp_path / "m", extra)


def test_shape_differences_are_listed(tmp_path):
    def net(hidden, classes=3):
        return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    x = torch.randn(2, 4)
    for build in ("graph", "inject"):
        merged = tm.merge([net(8), net(8)], example_inputs=x, method="average", align=None,
                          correction=None, build=build)
        merged.save(tmp_path / build)
        with pytest.raises(tm.TorchMergeError, match=r"0.weight: the model has shape \(16, 4\), the saved tensor \(8, 4\)"):
            tm.load(tmp_path / build, net(16))
        with pytest.raises(tm.TorchMergeError, match=r"no head modules \['2'\]"):
            tm.load(tmp_path / build, nn.Sequential(nn.Linear(4, 8), nn.ReLU()))


def _saved(tmp_path):
    case, merged = _mlp_merged()
    merged.save(tmp_path / "m")
    return case, tmp_path / "m"


def test_newer_format_and_malformed_manifest(tmp_path):
    case, folder = _saved(tmp_path)
    file = folder / "torchmerge.json"
    manifest = json.loads(file.read_text())
    file.write_text(json.dumps({**manifest, "format_version": 99, "torchmerge_version": "9.0"}))
    with pytest.raises(tm.TorchMergeError, match="format 99 .*torchmerge 9.0.*reads formats up to 1: upgrade"):
        tm.load(folder, _fresh(case))
    file.write_text(json.dumps({**manifest, "sites": "nope", "build": "other"}))
    with pytest.raises(tm.TorchMergeError, match=r"malformed: bad or missing fields \['build', 'sites'\]"):
        tm.load(folder, _fresh(case))
    file.write_text("{not json")
    with pytest.raises(tm.TorchMergeError, match="is not valid JSON"):
        tm.load(folder, _fresh(case))
    file.write_text(json.dumps({"format": "other"}))
    with pytest.raises(tm.TorchMergeError, match="is not a torchmerge manifest"):
        tm.load(folder, _fresh(case))


def test_truncated_and_corrupted_weights(tmp_path):
    case, folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 40])
    with pytest.raises(tm.TorchMergeError, match=r"cannot read .*model\.safetensors: SafetensorError"):
        tm.load(folder, _fresh(case))
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF                                    # a weight's byte: the header still parses
    weights.write_bytes(bytes(flipped))
    with pytest.raises(tm.TorchMergeError, match=r"model\.safetensors is corrupted: its SHA-256"):
        tm.load(folder, _fresh(case))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header}" + data[24:])
    with pytest.raises(tm.TorchMergeError, match=r"cannot read .*model\.safetensors"):
        tm.load(folder, _fresh(case))
    weights.unlink()
    with pytest.raises(tm.TorchMergeError, match=r"model\.safetensors is missing"):
        tm.load(folder, _fresh(case))


@pytest.mark.parametrize("where, args, match", [
    ("empty", None, "no torchmerge.json in"),
    ("file", None, "is not a folder"),
    ("missing", None, "is not a folder"),
    ("ok", "merged", "freshly constructed model"),
    ("ok", "string", "freshly constructed model"),
])
def test_bad_load_arguments(where, args, match, tmp_path):
    case, folder = _saved(tmp_path)
    path = {"empty": tmp_path / "empty", "file": folder / "model.safetensors", "missing": tmp_path / "nope",
            "ok": folder}[where]
    (tmp_path / "empty").mkdir()
    model = {None: _fresh(case), "merged": tm.load(folder, _fresh(case)), "string": "mlp"}[args]
    with pytest.raises(tm.TorchMergeError, match=match):
        tm.load(path, model)


def test_bad_save_arguments(tmp_path):
    _, merged = _mlp_merged()
    (tmp_path / "file").write_text("x")
    with pytest.raises(tm.TorchMergeError, match="is a file"):
        merged.save(tmp_path / "file")
    with pytest.raises(tm.TorchMergeError, match="positional tensors only"):
        merged.save(tmp_path / "m", example_inputs={"x": torch.randn(2, 8)})
    with pytest.raises(tm.TorchMergeError, match="takes a merged model"):
        tm.io.save(nn.Linear(2, 2), tmp_path / "m")
    assert not (tmp_path / "m").exists()


class _Planted:
    """Unpickling this creates the marker file (what a malicious checkpoint could do instead)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_unpickles(tmp_path):
    case, folder = _saved(tmp_path)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Planted(str(marker)))
    for name in ("pytorch_model.bin", "model.pt", "merged.pt", "state.pkl"):
        (folder / name).write_bytes(payload)
    loaded = tm.load(folder, _fresh(case))
    assert not marker.exists()
    assert isinstance(loaded, GraphMergedModel)
    (folder / "model.safetensors").write_bytes(payload)   # a pickle in place of the weights
    with pytest.raises(tm.TorchMergeError, match="cannot read"):
        tm.load(folder, _fresh(case))
    assert not marker.exists()
    pickle.loads(payload).close()                         # the planted file is a live payload
    assert marker.exists()


def test_values_round_trip_through_json():
    values = [None, True, 3, -2.5, float("inf"), "s", [1, (2, 3)], {0: "a", "b": {"c": (None,)}}, ()]
    for v in values:
        assert decode(json.loads(json.dumps(encode(v)))) == v
    with pytest.raises(tm.TorchMergeError, match="not a plain value"):
        encode({"f": object()})
    with pytest.raises(tm.TorchMergeError, match="malformed value"):
        decode({"tensor": [1]})
