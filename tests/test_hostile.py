"""Hostile input and faults (issue 18): a table of bad inputs to ``tm.merge`` / ``tm.calibrate``.

Each row raises a TorchMergeError (an ArgumentError/ShapeError is also a ValueError, an
ArgumentTypeError a TypeError) whose message names the argument, the expert/task index or module
path, what was expected and what to do — and after every failure the user's models are intact:
state dicts bit-identical, hooks as they were (none left by torchmerge), train/eval and
requires_grad flags unchanged. Inputs that used to be silently wrong (one-shot generators, forwards
modifying their input, user hooks, unaligned experts given to ``tm.calibrate``) are checked to
give the right result instead.
"""
from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, prune

import torchmerge as tm
from architectures import randomize_
from zoo_ops import MLP


def _mlp(seed):
    torch.manual_seed(seed)  # Linear's default init draws from the global generator
    return randomize_(MLP(), seed=seed).eval()


def experts_(n=2):
    return [_mlp(s) for s in range(n)]


def data_(n=2, batches=3, dim=8):
    gen = torch.Generator().manual_seed(0)
    return [[(torch.randn(16, dim, generator=gen) + t, torch.randint(0, 3, (16,), generator=gen))
             for _ in range(batches)] for t in range(n)]


# --------------------------------------------------------------------------- integrity


def _bits(t: torch.Tensor):
    if t.is_meta:
        return (tuple(t.shape), t.dtype)
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).clone()


class Integrity:
    """What a failed call must leave as it was: every tensor's bits, every hook, mode and flag."""

    def __init__(self, models):
        self.models = [m for m in models if isinstance(m, nn.Module)]
        self.before = [self._state(m) for m in self.models]

    @staticmethod
    def _state(model):
        tensors = {n: _bits(t) for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}
        hooks = {p: (list(m._forward_hooks), list(m._forward_pre_hooks), list(m._backward_hooks))
                 for p, m in model.named_modules()}
        modes = {p: m.training for p, m in model.named_modules()}
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        return tensors, hooks, modes, grads

    def check(self):
        for i, (model, (tensors, hooks, modes, grads)) in enumerate(zip(self.models, self.before)):
            now, now_hooks, now_modes, now_grads = self._state(model)
            assert now.keys() == tensors.keys(), f"model {i}: tensors added or removed"
            for name, bits in tensors.items():
                same = bits == now[name] if isinstance(bits, tuple) else torch.equal(bits, now[name])
                assert same, f"model {i}: {name} changed"
            assert now_hooks == hooks, f"model {i}: hooks changed {now_hooks} != {hooks}"
            assert now_modes == modes, f"model {i}: train/eval flags changed"
            assert now_grads == grads, f"model {i}: requires_grad flags changed"


def fails(call, models, error, *fragments):
    """``call()`` raises ``error`` with every fragment in its message; models stay intact."""
    guard = Integrity(models)
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    assert isinstance(info.value, tm.TorchMergeError)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in the message:\n{msg}"
    guard.check()
    return msg


# --------------------------------------------------------------------------- the table


def _nan(experts, kw):
    with torch.no_grad():
        experts[1].fc2.weight[0, 1] = float("nan")
    return experts, kw


def _inf_base(experts, kw):
    base = randomize_(MLP(), seed=9)
    with torch.no_grad():
        base.fc1.bias[3] = float("inf")
    return experts, {**kw, "base": base}


def _meta(experts, kw):
    with torch.device("meta"):
        meta = MLP()
    return [experts[0], meta], kw


def _double(experts, kw):
    return [experts[0], experts[1].double()], kw


def _pruned(experts, kw):
    prune.l1_unstructured(experts[1].fc1, "weight", amount=0.3)
    return experts, kw


def _weight_norm(experts, kw):
    parametrizations.weight_norm(experts[0].fc2)
    return experts, kw


def _old_weight_norm(experts, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(experts[0].fc2)
    return experts, kw


def _compiled(experts, kw):
    return [torch.compile(experts[0]), experts[1]], kw


def _with(**extra):
    return lambda experts, kw: (experts, {**kw, **extra})


def _task_data(fn):
    def make(experts, kw):
        data = data_()
        data[1] = fn(data[1])
        return experts, {**kw, "data": data}
    return make


class Gen:
    """A fresh one-shot generator of the batches (each call)."""

    def __init__(self, batches):
        self.batches = batches

    def __call__(self):
        return (b for b in self.batches)


ArgErr, TypeErr = tm.ArgumentError, tm.ArgumentTypeError

# id: (prepare(experts, kwargs) -> (experts, kwargs), error, message fragments)
CASES = {
    # silently wrong before: now raise
    "nan-weight": (_nan, ArgErr, ["experts[1]'s parameter 'fc2.weight' holds nan at index (0, 1)",
                                  "fix or reload"]),
    "inf-base": (_inf_base, ArgErr, ["base[0]'s parameter 'fc1.bias' holds inf at index (3,)"]),
    "lam-inf": (_with(lam=float("inf")), ArgErr, ["lam=inf for method 'task_arithmetic'", "finite"]),
    "k-nan": (_with(method="ties", k=float("nan")), ArgErr, ["k=nan for method 'ties'", "finite"]),
    "k-range": (_with(method="ties", k=1.5), ArgErr, ["method 'ties': k=1.5 must be a number in (0, 1]"]),
    "tall-lams": (_with(method="tall", lam=[0.1, 0.2, 0.3]), ArgErr,
                  ["lam has 3 values but there are 2 tasks"]),
    "eps-0": (_with(calibration={"eps": 0}), ArgErr,
              ["calibration option eps=0 is invalid", "a finite number > 0"]),
    "eps-neg": (_with(calibration={"eps": -1}), ArgErr, ["eps=-1", "> 0"]),
    "eps-nan": (_with(calibration={"eps": float("nan")}), ArgErr, ["eps=nan", "finite"]),
    "tune-lr-inf": (_with(calibration={"tune_lr": float("inf")}), ArgErr, ["tune_lr=inf", "finite"]),
    "passes-0": (_with(calibration={"passes": 0}), ArgErr, ["passes=0", "an int >= 1"]),
    "duplicate-names": (_with(task_names=["a", "a"]), ArgErr,
                        ["task_names has 'a' twice (positions 0 and 1)", "unique"]),
    "names-string": (_with(task_names="ab"), TypeErr,
                     ["task_names='ab' is a string", "task_names=['task0', 'task1']"]),
    "names-not-str": (_with(task_names=["a", 2]), TypeErr, ["task_names[1] is 2", "strings"]),
    "none-data-regmean": (lambda e, kw: (e, {**kw, "method": "regmean", "data": [data_()[0], None]}),
                          ArgErr, ["data[1] is None, but method='regmean' needs every task's data"]),
    # raw errors before: now clear ones
    "empty-data": (_with(data=[[], []]), ArgErr, ["data[0] is empty: give at least one batch"]),
    "meta-expert": (_meta, ArgErr, ["experts[1] has tensors on the meta device", "to_empty"]),
    "mixed-dtype": (_double, ArgErr, ["experts[1]'s 'fc1.weight' is torch.float64 but experts[0]'s is "
                                      "torch.float32", "cast them"]),
    "one-batch-per-task": (lambda e, kw: (e, {**kw, "data": [d[0] for d in data_()]}), ArgErr,
                           ["data[0] is one batch (a tuple of 2 tensors, shapes [(16, 8), (16,)])",
                            "Pass a list of batches: data[0] = [(x, y)]"]),
    "k-string": (_with(method="ties", k="0.2"), TypeErr,
                 ["k='0.2' for method 'ties' is a str; expected a number (default 0.2)"]),
    "mtl-int": (_with(method="tall", mtl=3), TypeErr, ["mtl=3 for method 'tall'", "expected a string"]),
    "rescale-str": (_with(method="dare", rescale="yes"), TypeErr, ["rescale='yes'", "True or False"]),
    "max-iter-float": (_with(method="mats", max_iter=10.0), TypeErr, ["max_iter=10.0", "expected an int"]),
    "unknown-hyper": (_with(method="ties", kappa=1), ArgErr,
                      ["unknown hyper-parameter(s) ['kappa'] for method 'ties'; valid: k, lam"]),
    "pleas-unknown": (_with(method="pleas", correction=None, foo=1), ArgErr,
                      ["for method 'pleas'; valid: width, ridge, max_direct, cg_iters"]),
    "pleas-ridge-inf": (_with(method="pleas", correction=None, ridge=float("inf")), ArgErr, ["ridge=inf"]),
    "data-int": (_with(data=5), TypeErr, ["data is a int", "one iterable of batches per task"]),
    "data-tensor": (_with(data=torch.randn(4, 8)), TypeErr, ["data is a Tensor"]),
    "task-data-int": (_task_data(lambda d: 5), TypeErr, ["data[1] is a int; expected an iterable of batches"]),
    "names-int": (_with(task_names=5), TypeErr, ["task_names is a int"]),
    "calibration-foo": (_with(calibration={"foo": 1}), ArgErr,
                        ["unknown calibration option 'foo'",
                         "valid keys: passes, eps, tune_steps, tune_lr, tune_loss, tune_heads, tune_rank, tune_holdout, progress"]),
    "calibration-own": (_with(calibration={"max_batches": 2}), ArgErr,
                        ["pass max_batches= to tm.merge itself"]),
    "calibration-list": (_with(calibration=[1]), TypeErr, ["calibration is a list", "valid keys"]),
    "tune-loss": (_with(calibration={"tune_loss": "l1"}), ArgErr, ["tune_loss='l1'", "'kl' or 'mse'"]),
    "alignment-typo": (_with(alignment={"max_iters": 5}), ArgErr,
                       ["unknown alignment option 'max_iters' (did you mean 'max_iter'?)",
                        "valid keys: max_iter, probes_per_group"]),
    "alignment-own": (_with(alignment={"seed": 1}), ArgErr, ["pass seed= to tm.merge itself"]),
    "alignment-zero": (_with(alignment={"max_iter": 0}), ArgErr, ["max_iter=0 is invalid", "an int >= 1"]),
    "alignment-float": (_with(alignment={"max_iter": 5.0}), TypeErr, ["max_iter=5.0 is invalid"]),
    "alignment-list": (_with(alignment=[5]), TypeErr, ["alignment is a list", "valid keys"]),
    "experts-one-module": (lambda e, kw: (e[0], kw), TypeErr,
                           ["experts must be a non-empty list of torch.nn.Module, got one MLP"]),
    "experts-str": (lambda e, kw: ([e[0], "mlp"], kw), TypeErr, ["experts[1] is a str"]),
    "method-int": (_with(method=3), TypeErr, ["method is a int"]),
    "seed-str": (_with(seed="0"), TypeErr, ["seed='0'", "an int"]),
    "allow-str": (_with(allow_uncorrected="yes"), TypeErr, ["allow_uncorrected='yes'", "True or False"]),
    "heads-str": (_with(heads="head"), ArgErr, ["heads must be 'auto'", "got heads='head'", "heads=['head']"]),
    "sites-str": (_with(sites="layers"), ArgErr, ["sites must be 'layer' or 'block', a list of module paths",
                                                 "got sites='layers'"]),
    "sites-int": (_with(sites=3), TypeErr, ["sites must be", "got 3"]),
    "concrete-args": (_with(concrete_args=5), TypeErr, ["concrete_args is a int", "dict"]),
    # misdirecting errors before
    "task-shape": (_task_data(lambda d: [(torch.randn(16, 5), y) for _, y in d]), tm.ShapeError,
                   ["data[1]'s first batch (args [(16, 5)]) does not fit experts[1] (MLP)",
                    "data[0]'s first batch is args [(16, 8)]", "same features"]),
    "task-dtype": (_task_data(lambda d: [(x.double(), y) for x, y in d]), tm.ShapeError,
                   ["data[1]'s first batch", "does not fit experts[1]"]),
    "max-batches-0": (_with(max_batches=0), ArgErr, ["max_batches=0", "an int >= 1"]),
    "max-batches-neg": (_with(max_batches=-1), ArgErr, ["max_batches=-1"]),
    "max-batches-str": (_with(max_batches="2"), TypeErr, ["max_batches='2' is a str"]),
    "pruned": (_pruned, ArgErr, ["experts[1]'s module 'fc1' (Linear) is pruned with torch.nn.utils.prune",
                                 "torch.nn.utils.prune.remove(module, 'weight')"]),
    "weight-norm": (_weight_norm, ArgErr, ["experts[0]'s module 'fc2' (ParametrizedLinear) has parametrized "
                                           "tensors ['weight']", "remove_parametrizations(module, 'weight')"]),
    "old-weight-norm": (_old_weight_norm, ArgErr, ["experts[0]'s module 'fc2' (Linear) uses "
                                                   "torch.nn.utils.weight_norm", "remove_weight_norm"]),
    "compiled": (_compiled, ArgErr, ["experts[0] is a torch.compile'd module (OptimizedModule)",
                                     "pass the original module (experts[0]._orig_mod)"]),
    "leaf-int": (_with(leaf_modules=(5,)), TypeErr, ["leaf_modules[0] is a int (5)", "module class"]),
    "leaf-path": (_with(leaf_modules=("fc9",)), ArgErr,
                  ["leaf_modules[0]='fc9' is not a module path of experts[0] (MLP)",
                   "valid paths: ['fc1', 'fc2', 'head']"]),
    "leaf-bare-class": (_with(leaf_modules=nn.Linear), TypeErr, ["pass a tuple", "leaf_modules=(MyBlock,)"]),
    "leaf-not-module": (_with(leaf_modules=(int,)), TypeErr, ["leaf_modules[0] is the class int"]),
    "align": (_with(align="telepathy"), ArgErr, ["unknown alignment method 'telepathy'"]),
    # a hang before: endless iterables without max_batches
    "cycle": (_task_data(itertools.cycle), ArgErr,
              ["data[1] is an endless itertools.cycle", "Pass max_batches=N"]),
    "repeat": (_task_data(lambda d: itertools.repeat(d[0])), ArgErr, ["data[1] is an endless itertools.repeat"]),
    "count": (_task_data(lambda d: itertools.count()), ArgErr, ["data[1] is an endless itertools.count"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_merge_input(case):
    prepare, error, fragments = CASES[case]
    experts, kw = prepare(experts_(), {"method": "task_arithmetic", "data": data_()})
    models = list(experts) if isinstance(experts, list) else [experts]
    models += [kw["base"]] if isinstance(kw.get("base"), nn.Module) else []
    fails(lambda: tm.merge(experts, **kw), models, error, *fragments)


def test_error_classes_are_builtin_exceptions_too():
    assert issubclass(tm.ArgumentError, ValueError) and issubclass(tm.ArgumentTypeError, TypeError)
    assert issubclass(tm.ArgumentError, tm.TorchMergeError) and issubclass(tm.ArgumentTypeError, tm.TorchMergeError)


def test_device_mismatch_named():
    """Mixed devices, without a second device: the per-name layout check on meta vs cpu tensors."""
    from torchmerge.validate import _check_layout

    mine, ref = {"fc1.weight": torch.empty(2, device="meta")}, {"fc1.weight": torch.empty(2)}
    with pytest.raises(tm.ArgumentError, match=r"experts\[1\]'s 'fc1.weight' is on meta but experts\[0\]'s "
                                               r"is on cpu: move every model to one device"):
        _check_layout(mine, ref, "experts[1]", "experts[0]")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_experts_on_two_devices():
    experts = experts_()
    experts[1].cuda()
    fails(lambda: tm.merge(experts, data=data_()), experts, tm.ArgumentError,
          "experts[1]'s 'fc1.weight' is on cuda:0 but experts[0]'s is on cpu")


# --------------------------------------------------------------------------- task ids


@pytest.mark.parametrize("ids, fragment", [
    (torch.tensor([-1, 0]), "task ids must lie in [0, 1], got ids from -1 to 0"),
    (torch.tensor([0, 2]), "task ids must lie in [0, 1], got ids from 0 to 2"),
    (torch.tensor([0.0, 1.0]), "task ids must be an int or a 1-D LongTensor"),
    (torch.tensor([0, 1, 1]), "task ids have 3 entries but the batch has 2"),
    (-1, "task -1 out of range: the model has 2 tasks"),
    ("nope", "unknown task 'nope'; tasks: ['task0', 'task1']"),
])
def test_bad_task_ids(ids, fragment):
    merged = tm.merge(experts_(), data=data_(), correction=None)
    with pytest.raises(tm.TorchMergeError) as info:
        merged(torch.randn(2, 8), task=ids)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------- silently wrong -> right


def test_one_shot_generators_lose_no_batch():
    """Tracing reads the first batch: a generator would have lost it (and been empty for every later
    stage). Generators are read once into lists: the calibration counts every batch and the result
    equals the merge from lists."""
    data = data_(batches=3)
    want = tm.merge(experts_(), data=data)
    merged = tm.merge(experts_(), data=[Gen(d)() for d in data])
    tasks = merged.info["calibration"]["tasks"]
    assert [tasks[t]["batches"] for t in ("task0", "task1")] == [3, 3]
    x = data[1][0][0]
    assert torch.equal(merged(x, task=1), want(x, task=1))


def test_endless_iterable_with_max_batches():
    data = data_()
    merged = tm.merge(experts_(), data=[itertools.cycle(d) for d in data], max_batches=2)
    assert merged.info["calibration"]["tasks"]["task1"]["batches"] == 2


class InplaceMLP(MLP):
    """A forward that modifies its input in place."""

    def forward(self, x):
        return super().forward(x.mul_(2))


class CopyMLP(MLP):
    def forward(self, x):
        return super().forward(x * 2)


def _twins():
    inplace = [randomize_(InplaceMLP(), seed=s).eval() for s in range(2)]
    copies = [CopyMLP().eval() for _ in range(2)]
    for c, e in zip(copies, inplace):
        c.load_state_dict(e.state_dict())
    return inplace, copies


@pytest.mark.parametrize("method", ["task_arithmetic", "regmean", "fisher"])
def test_forward_modifying_its_input_changes_no_batch(method):
    inplace, copies = _twins()
    data = data_()
    before = copy.deepcopy(data)
    kw = dict(method=method, align=None, heads=["head"], correction="affine")
    merged = tm.merge(inplace, data=data, **kw)
    assert all(torch.equal(a[0], b[0]) for da, db in zip(data, before) for a, b in zip(da, db))
    want = tm.merge(copies, data=data, **kw)
    x = before[1][0][0]
    torch.testing.assert_close(merged(x.clone(), task=1), want(x, task=1), rtol=0, atol=0)


def test_forward_modifying_its_input_with_discovery():
    inplace, copies = _twins()
    data = data_()
    merged = tm.merge(inplace, data=data)
    want = tm.merge(copies, data=data)
    x = data[1][0][0]
    torch.testing.assert_close(merged(x.clone(), task=1), want(x, task=1), rtol=0, atol=0)


def test_user_hooks_stay_out_of_merged_and_exported_models():
    experts = experts_()
    calls = []
    for e in experts:
        e.fc1.register_forward_hook(lambda m, a, o: calls.append("hook"))
        e.fc2.register_forward_pre_hook(lambda m, a: None)
    guard = Integrity(experts)
    for build in ("graph", "inject"):
        merged = tm.merge(experts, data=data_(), build=build)
        for exported in (merged, merged.export(0), merged.export(1, like=experts[1])):
            for path, m in exported.named_modules():
                user = [h for h in m._forward_hooks.values() if type(h).__name__ != "SiteHook"]
                assert not user and not m._forward_pre_hooks, f"{build}: a user hook copied to {path!r}"
        calls.clear()
        merged(torch.randn(2, 8), task=0)
        assert not calls
    guard.check()  # the experts keep their own hooks


def test_calibrate_permutes_original_experts_and_rejects_strangers():
    experts, data = experts_(), data_()
    merged = tm.merge(experts, data=data, correction=None)
    spec, perms = merged.info["spec"], merged.info["merge_info"]["perms"]
    aligned = [tm.permute(e, spec, p) for e, p in zip(experts, perms)]
    reference = copy.deepcopy(merged)
    assert tm.calibrate(reference, aligned, data).get("permuted_experts") is None
    guard = Integrity(experts)
    report = tm.calibrate(merged, experts, data)   # the originals: permuted for the user
    guard.check()
    assert report["permuted_experts"] == [1]
    x = data[1][0][0]
    assert torch.equal(merged(x, task=1), reference(x, task=1))
    strangers = [experts[0], _mlp(7)]
    fails(lambda: tm.calibrate(merged, strangers, data), strangers, tm.ArgumentError,
          "experts[1] is neither the expert tm.merge was given for task 1 nor its aligned copy",
          "tm.permute(expert, merged.info['spec'], merged.info['merge_info']['perms'][1])")


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"eps": 0}, tm.ArgumentError, "calibration option eps=0 is invalid"),
    ({"passes": 1.5}, tm.ArgumentTypeError, "passes=1.5"),
    ({"max_batches": 0}, tm.ArgumentError, "max_batches=0"),
    ({"mode": "bn"}, tm.ArgumentError, "unknown correction 'bn'"),
    ({"data": [[], []]}, tm.ArgumentError, "data[0] is empty"),
    ({"data": [itertools.cycle([torch.randn(2, 8)])] * 2}, tm.ArgumentError, "data[0] is an endless"),
    ({"experts": "x"}, tm.ArgumentTypeError, "experts must be a non-empty list"),
    ({"merged": torch.nn.Linear(2, 2)}, tm.ArgumentTypeError, "merged is a Linear"),
])
def test_bad_calibrate_input(kwargs, error, fragment):
    experts, data = experts_(), data_()
    merged = tm.merge(experts, data=data, correction=None)
    args = {"merged": merged, "experts": experts, "data": data, **kwargs}
    state = copy.deepcopy(merged.state_dict())
    fails(lambda: tm.calibrate(**args), experts, error, fragment)
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in state.items())


# --------------------------------------------------------------------------- half-done state


class Flaky:
    """A loader that raises at batch ``at`` of every pass after the first ``clean`` passes."""

    def __init__(self, batches, at, clean=0):
        self.batches, self.at, self.clean, self.passes = batches, at, clean, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        for i, b in enumerate(self.batches):
            if i == self.at and self.passes > self.clean:
                raise RuntimeError("disk on fire")
            yield b


@pytest.mark.parametrize("mode", ["affine", "repair", "affine+tune"])
def test_failed_calibration_leaves_the_model_as_it_was(mode):
    experts, data = experts_(), data_()
    merged = tm.merge(experts, data=data, correction="affine")   # fitted: not the identity
    before = copy.deepcopy(merged.state_dict())
    info = dict(merged.info)
    # task 0 fits fully, task 1's loader fails mid-pass (its first batch is read by the checks)
    flaky = [data[0], Flaky(data[1], at=2, clean=1)]
    with pytest.raises(RuntimeError, match="disk on fire"):
        tm.calibrate(merged, experts, flaky, mode=mode, tune_steps=3, tune_heads=True)
    after = merged.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "a half-fitted model was left"
    assert merged.info == info
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())


def test_failed_merge_leaves_the_experts_as_they_were():
    experts, data = experts_(), data_()
    for e in experts:
        e.fc1.register_forward_hook(lambda m, a, o: None)
    experts[1].train()
    experts[0].fc1.weight.requires_grad_(False)
    guard = Integrity(experts)
    with pytest.raises(RuntimeError, match="disk on fire"):
        tm.merge(experts, method="regmean", data=[data[0], Flaky(data[1], at=1, clean=1)])
    guard.check()
