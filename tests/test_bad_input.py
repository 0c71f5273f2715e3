"""A table of bad inputs: each raises a TorchMergeError subclass with a message that names what
went wrong and where (module path, fx node, shapes) and says what to do."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchmerge as tm
from architectures import MLP, randomize_
from invariants import notable_frozen


class Gate(nn.Module):
    """Data-dependent control flow: untraceable by torch.fx."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.body = nn.Sequential(nn.ReLU(), Gate())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(self.fc1(x)))


class FlagNet(nn.Module):
    """Python control flow on a non-tensor argument: fixed with concrete_args."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x, use_relu=True):
        h = self.fc1(x)
        if use_relu:
            h = F.relu(h)
        return self.fc2(h)


def mlp():
    torch.manual_seed(0)
    return randomize_(MLP())


X = torch.randn(4, 8)


def _spec():
    model = mlp()
    return model, tm.discover(model, X)


def _a_group(spec):
    name = sorted(spec.groups)[0]
    return name, spec.groups[name].size


# --------------------------------------------------------------------------- tracing

def test_data_dependent_control_flow_names_module_and_fix():
    with pytest.raises(tm.TraceError) as err:
        tm.discover(GatedNet(), X)
    msg = str(err.value)
    assert "'body.1'" in msg, f"message should name the module path 'body.1':\n{msg}"
    assert "leaf_modules=(Gate,)" in msg, f"message should suggest the leaf module fix:\n{msg}"
    assert "concrete_args" in msg, f"message should mention concrete_args:\n{msg}"
    assert isinstance(err.value, tm.TorchMergeError)


def test_data_dependent_control_flow_fixed_by_leaf_modules():
    model = GatedNet()
    spec = tm.discover(model, X, leaf_modules=(Gate,))
    twin = tm.permute(model, spec, spec.random_perms(seed=0))
    with torch.no_grad():
        assert torch.allclose(model(X), twin(X), rtol=1e-4, atol=1e-5)
    # fc1's output feeds the opaque Gate: it must be frozen, not permuted
    assert not any(m[0].startswith("fc1.") for g in spec.groups.values() for m in g.members)
    frozen = notable_frozen(spec)
    assert frozen, "the space entering the opaque leaf must be reported as frozen"
    assert any("body.1" in f.module_path or "body_1" in f.node for f in frozen), frozen


def test_control_flow_on_flag_fixed_by_concrete_args():
    """A Python-bool default is captured (no TraceError), with or without concrete_args, same spec."""
    model = FlagNet()
    plain = tm.discover(model, X)
    spec = tm.discover(model, X, concrete_args={"use_relu": True})
    assert [g.size for g in spec.groups.values()] == [16]
    assert {n: g.members for n, g in plain.groups.items()} == {n: g.members for n, g in spec.groups.items()}


# --------------------------------------------------------------------------- shapes

def test_wrong_input_shape_names_node_and_shapes():
    with pytest.raises(tm.ShapeError) as err:
        tm.discover(mlp(), torch.randn(4, 5))          # fc1 expects 8 features
    msg = str(err.value)
    assert "node 'fc1'" in msg, f"message should name the fx node fc1:\n{msg}"
    assert "(4, 5)" in msg, f"message should show the input shape:\n{msg}"
    assert "8" in msg, f"message should show the expected size:\n{msg}"


def test_wrong_number_of_inputs():
    with pytest.raises(tm.ShapeError, match=r"2 example input.*too many positional"):
        tm.discover(mlp(), (X, X))


# --------------------------------------------------------------------------- wrong types

class NotAModule:
    def __call__(self, x):
        return x


@pytest.mark.parametrize("model,inputs", [
    (NotAModule(), X),
    (lambda x: x, X),
    (torch.randn(3), X),
    (None, X),
], ids=["plain-callable", "lambda", "tensor", "none"])
def test_non_module_rejected(model, inputs):
    with pytest.raises(tm.TorchMergeError, match=r"expected a torch\.nn\.Module, got"):
        tm.discover(model, inputs)


@pytest.mark.parametrize("inputs", [
    [[0.0] * 8] * 4,
    "x",
    None,
    (X, "y"),
    {"x": [X]},
], ids=["nested-list", "string", "none", "tuple-with-str", "dict-of-list"])
def test_non_tensor_input_rejected(inputs):
    with pytest.raises(tm.ShapeError, match=r"expected a torch\.Tensor"):
        tm.discover(mlp(), inputs)


def test_dict_of_keyword_inputs_accepted():
    """A dict is the forward's keyword arguments (the Hugging Face convention)."""
    model = mlp()
    assert tm.discover(model, {"x": X}).groups.keys() == tm.discover(model, X).groups.keys()


def test_dict_with_unknown_keys_lists_forward_parameters():
    with pytest.raises(tm.ShapeError, match=r"forward\(x\)"):
        tm.discover(mlp(), {"pixel_values": X})


def test_permute_non_module_rejected():
    model, spec = _spec()
    with pytest.raises(tm.TorchMergeError, match=r"expected a torch\.nn\.Module, got str"):
        tm.permute("not a model", spec, spec.random_perms(seed=0))


@pytest.mark.parametrize("bad", ["spec", None, {"fc1.weight:0": 16}], ids=["str", "none", "dict"])
def test_permute_non_spec_rejected(bad):
    want = rf"expected a PermutationSpec from tm\.discover, got {type(bad).__name__}$"
    with pytest.raises(tm.SpecError, match=want):
        tm.permute(mlp(), bad, {})


def test_perms_not_a_dict_rejected():
    model, spec = _spec()
    with pytest.raises(tm.SpecError, match="must be a dict"):
        tm.permute(model, spec, [torch.arange(16)])


# --------------------------------------------------------------------------- bad permutations

def _bad_perms(kind: str, spec):
    perms = spec.random_perms(seed=0)
    name, size = _a_group(spec)
    if kind == "too-short":
        perms[name] = torch.arange(size - 1)
    elif kind == "too-long":
        perms[name] = torch.arange(size + 1)
    elif kind == "duplicate":
        p = torch.arange(size)
        p[0] = p[1]
        perms[name] = p
    elif kind == "out-of-range":
        perms[name] = torch.arange(size) + 1
    elif kind == "negative":
        perms[name] = torch.arange(size) - 1
    elif kind == "two-dim":
        perms[name] = torch.arange(size).view(1, size)
    elif kind == "float":
        perms[name] = torch.arange(size).float()
    elif kind == "unknown-group":
        perms["no_such_group"] = torch.arange(3)
    return perms, name


BAD_PERMS = ["too-short", "too-long", "duplicate", "out-of-range", "negative", "two-dim", "float",
             "unknown-group"]


@pytest.mark.parametrize("kind", BAD_PERMS)
def test_bad_permutation_raises_spec_error(kind):
    model, spec = _spec()
    perms, name = _bad_perms(kind, spec)
    with pytest.raises(tm.SpecError) as err:
        tm.permute(model, spec, perms)
    msg = str(err.value)
    if kind == "unknown-group":
        assert "unknown group 'no_such_group'" in msg and name in msg, msg   # lists valid groups
    else:
        size = spec.groups[name].size
        assert f"perms[{name!r}]" in msg and f"range({size})" in msg, msg


def test_spec_from_other_architecture_raises_spec_error():
    """A spec discovered on a wider model does not fit: SpecError naming the tensor."""

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(8, 20), nn.Linear(20, 12), nn.Linear(12, 3)

        def forward(self, x):
            return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))

    spec = tm.discover(Wide(), X)
    with pytest.raises(tm.SpecError, match="fc1|fc2"):
        tm.permute(mlp(), spec, spec.random_perms(seed=0))


def test_errors_are_also_builtin_exceptions():
    """Generic handlers keep working: ShapeError/SpecError are ValueErrors."""
    assert issubclass(tm.ShapeError, ValueError) and issubclass(tm.SpecError, ValueError)
    assert issubclass(tm.TraceError, tm.TorchMergeError)


# --------------------------------------------------------------------------- advice that applies
# (issue 13.6): every suggestion in a message must be something the called function accepts.

def _net(hidden=16, out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, out))


@pytest.mark.parametrize("align", ["weight", None])
def test_width_mismatch_suggests_what_merge_takes(align):
    """tm.merge takes no exclude=; the message says the experts need the same widths instead."""
    with pytest.raises(tm.TorchMergeError) as err:
        tm.merge([_net(16), _net(12)], method="average", example_inputs=X, correction=None, align=align)
    msg = str(err.value)
    assert "0.weight" in msg and "(16, 8)" in msg and "(12, 8)" in msg, msg
    assert "same layer widths" in msg and "heads='auto'" in msg, msg
    assert "pass exclude=[...]" not in msg and "align the models first" not in msg, msg


class RootGate(nn.Module):
    """Data-dependent control flow in the root forward itself: no submodule to make a leaf."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


@pytest.mark.parametrize("capture_method", ["fx", "auto"])
def test_untraceable_root_forward_is_not_suggested_as_a_leaf(capture_method):
    with pytest.raises(tm.TraceError) as err:
        tm.discover(RootGate(), X.abs(), capture_method=capture_method)
    msg = str(err.value)
    assert "RootGate (the root model)" in msg, msg
    assert "leaf_modules=(RootGate,)" not in msg and "submodule.path" not in msg, msg
    assert "torch.where" in msg, msg
    if capture_method == "fx":
        assert "capture_method='auto'" in msg, msg


def test_wrong_feature_size_in_data_blames_the_data_batch():
    """Without example_inputs the experts are traced with data[0]'s first batch: a wrong size there
    is reported as the data's (task index and shapes), not as example_inputs'."""
    data = [[(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))] for _ in range(2)]
    with pytest.raises(tm.ShapeError) as err:
        tm.merge([_net(), _net()], method="average", data=data)
    msg = str(err.value)
    assert "data[0]'s first batch (args [(4, 5)]) does not fit experts[0]" in msg, msg
    assert "x5 and 8x16" in msg and "fix that task's data" in msg, msg
    assert "example_inputs" not in msg, msg


def test_valid_methods_come_from_the_registry(monkeypatch):
    with pytest.raises(tm.ArgumentError) as err:
        tm.merge([_net(), _net()], method="nope", example_inputs=X, correction=None)
    assert "'pleas'" in str(err.value) and "'mats'" in str(err.value), str(err.value)
    monkeypatch.setitem(tm.methods.METHODS, "my_method", tm.methods.METHODS["average"])
    with pytest.raises(tm.ArgumentError, match="'my_method'"):
        tm.merge([_net(), _net()], method="nope", example_inputs=X, correction=None)


@pytest.mark.parametrize("kwargs, phrase", [
    ({"method": "tie"}, "unknown merge method 'tie' (did you mean 'ties'?); valid: 'average'"),
    ({"method": "TIES"}, "(did you mean 'ties'? names are case-sensitive)"),
    ({"method": "plea"}, "(did you mean 'pleas'?)"),
    ({"align": "Weight"}, "unknown alignment method 'Weight' (did you mean 'weight'? names are case-sensitive)"),
    ({"correction": "afine"}, "unknown correction 'afine' (did you mean 'affine'?); valid: None, 'affine'"),
    ({"build": "injct"}, "unknown build 'injct' (did you mean 'inject'?)"),
    ({"sites": "layers"}, "got sites='layers' (did you mean 'layer'?)"),
    ({"heads": "Auto"}, "got heads='Auto' (did you mean 'auto'? names are case-sensitive)"),
    ({"calibration": {"tune_loss": "KL"}}, "tune_loss must be 'kl' or 'mse' (did you mean 'kl'?"),
])
def test_misspelt_names_get_did_you_mean(kwargs, phrase):
    """Names are exact (case-sensitive); a near miss names the closest valid one, then all of them."""
    kwargs = {"method": "average", "example_inputs": X, "correction": None, **kwargs}
    if "calibration" in kwargs:
        kwargs.update(correction="affine", data=[[X], [X]])
    with pytest.raises(tm.ArgumentError) as err:
        tm.merge([_net(), _net()], **kwargs)
    assert phrase in str(err.value), str(err.value)


def test_misspelt_capture_method_gets_did_you_mean():
    with pytest.raises(tm.TorchMergeError, match=r"unknown capture method 'FX' \(did you mean 'fx'\? "
                                                  r"names are case-sensitive\); valid: 'auto', 'fx', 'export'"):
        tm.discover(_net(), X, capture_method="FX")


@pytest.mark.parametrize("kwargs, phrase", [
    ({}, "correction='affine' needs data=[one iterable of batches per task]; or pass correction=None to merge"),
    ({"method": "regmean", "correction": None}, "method='regmean' needs data=[one iterable of batches per task]; "
                                                "or pass a data-free method (method='average', or method='ties' with base=)"),
    ({"method": "regmean", "align": "activation"}, "align='activation' and method='regmean' and "
                                                   "correction='affine' need data="),
])
def test_data_needed_message_grammar_and_advice(kwargs, phrase):
    with pytest.raises(tm.ArgumentError) as err:
        tm.merge([_net(), _net()], **{"method": "average", "example_inputs": X, **kwargs})
    assert phrase in str(err.value), str(err.value)
