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
    model = FlagNet()
    try:
        tm.discover(model, X)
    except tm.TraceError as err:  # tracing a Python bool default may or may not fail: if so, helpfully
        assert "concrete_args" in str(err) or "leaf_modules" in str(err), str(err)
    spec = tm.discover(model, X, concrete_args={"use_relu": True})
    assert [g.size for g in spec.groups.values()] == [16]


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
    with pytest.raises(tm.TorchMergeError, match=r"(?i)spec"):
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
