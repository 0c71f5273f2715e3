"""Streaming statistics: exactness against a float64 one-shot reference, hooks, batch formats."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torchmerge.errors import TorchMergeError
from torchmerge.stats import INPUT_KEYS, Gram, Moments, collect, collect_paired, iter_inputs

HYP = settings(max_examples=25, deadline=None, derandomize=True)


# ---------------------------------------------------------------- references on concatenated data
def rows(x, axis):
    """[N, C] float64: channel axis last, every other axis a sample."""
    return x.movedim(axis, -1).reshape(-1, x.shape[axis]).double()


def ref_moments(chunks, axis):
    r = rows(torch.cat(chunks), axis)
    return r.shape[0], r.mean(0), r.var(0, unbiased=False)


def ref_cov(x, y):
    xc, yc = x - x.mean(0), y - y.mean(0)
    return xc.T @ yc / x.shape[0]


def split(data, cuts):
    """Split along dim 0 at the sorted, de-duplicated cut points (empty pieces dropped)."""
    edges = [0, *sorted({c % data.shape[0] for c in cuts} - {0}), data.shape[0]]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def close(actual, expected, scale=1.0, rtol=1e-9):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=rtol * scale)


data_cases = st.tuples(
    st.sampled_from([(37, 5), (12, 4, 3), (9, 3, 4, 2)]),   # [B, C], [B, T, C] / [B, C, L], [B, C, H, W]
    st.sampled_from([0.0, 3.0, 1e4, 1e8]),                    # mean offset: 1e8 breaks naive sums
    st.lists(st.integers(0, 1000), max_size=6),              # batch cut points
    st.integers(0, 2**16),                                    # seed
)


@HYP
@given(case=data_cases, axis=st.sampled_from([1, -1]))
def test_moments_match_reference_for_random_splits(case, axis):
    shape, offset, cuts, seed = case
    g = torch.Generator().manual_seed(seed)
    data = offset + torch.randn(*shape, generator=g, dtype=torch.float64) * torch.rand(1, generator=g) * 3
    chunks = split(data, cuts)
    m = Moments()
    for c in chunks:
        m.update(c, channel_axis=axis)
    n, mean, var = ref_moments(chunks, axis)
    assert m.count == n
    close(m.mean, mean, scale=max(offset, 1.0))
    close(m.var, var, scale=var.max().item(), rtol=1e-7)
    close(m.std, var.sqrt(), scale=var.sqrt().max().item(), rtol=1e-7)


def test_large_mean_beats_naive_sums():
    """Mean 1e8, std 1: E[x²] − E[x]² in float64 is off by O(1); Chan merging is not."""
    g = torch.Generator().manual_seed(0)
    data = 1e8 + torch.randn(4000, 3, generator=g, dtype=torch.float64)
    m = Moments()
    for c in data.split(333):
        m.update(c)
    ref = data.var(0, unbiased=False)
    naive = (data.square().mean(0) - data.mean(0).square())
    assert (naive - ref).abs().max() > 1e-3
    close(m.var, ref, rtol=1e-7)


def test_float32_activations_are_reduced_stably():
    """float32 data with a large mean: per-batch centred float32 moments + float64 merging."""
    g = torch.Generator().manual_seed(1)
    data = (1e4 + torch.randn(64, 8, 16, 16, generator=g)).float()
    m = Moments()
    for c in data.split(7):
        m.update(c, channel_axis=1)
    _, mean, var = ref_moments([data], 1)
    assert m.mean.dtype == torch.float64
    close(m.mean, mean, scale=1e4, rtol=1e-6)
    close(m.var, var, rtol=1e-4)


def test_drifting_float32_data_over_many_folds():
    """Means drifting by 1e4 over 100 batches (> FOLD_EVERY): the shift follows the running mean."""
    g = torch.Generator().manual_seed(3)
    chunks = [(i * 100.0 + torch.randn(16, 3, 4, 4, generator=g) * 0.5).float() for i in range(100)]
    m = Moments()
    for c in chunks:
        m.update(c, channel_axis=1)
    n, mean, var = ref_moments(chunks, 1)
    assert m.count == n
    close(m.mean, mean, scale=1e4, rtol=1e-6)
    close(m.var, var, rtol=1e-5)


def test_channels_last_and_half_inputs():
    g = torch.Generator().manual_seed(4)
    x = 7 + torch.randn(6, 5, 4, 3, generator=g)
    _, mean, var = ref_moments([x], 1)
    for variant in (x.to(memory_format=torch.channels_last), x.half(), x.permute(0, 2, 1, 3)):
        axis = 2 if variant.shape[1] == 4 else 1
        m = Moments().update(variant, channel_axis=axis)
        rtol = 1e-2 if variant.dtype == torch.half else 1e-6
        close(m.mean, mean, scale=7, rtol=rtol)
        close(m.var, var, rtol=rtol * 10)


@HYP
@given(case=data_cases)
def test_gram_matches_reference(case):
    shape, offset, cuts, seed = case
    g = torch.Generator().manual_seed(seed)
    data = offset + torch.randn(*shape, generator=g, dtype=torch.float64)
    gram = Gram()
    for c in split(data, cuts):
        gram.update(c, channel_axis=-1)
    r = rows(data, -1)
    cov = ref_cov(r, r)
    scale = max(offset, 1.0) ** 2
    close(gram.covariance(), cov, rtol=1e-7)
    close(gram.second_moment(), r.T @ r / r.shape[0], scale=scale, rtol=1e-9)
    close(gram.correlation(), torch.corrcoef(r.T), rtol=1e-7)
    close(gram.mean, r.mean(0), scale=max(offset, 1.0))
    assert gram.count == r.shape[0]


@HYP
@given(case=data_cases, cy=st.integers(1, 6))
def test_cross_gram_matches_reference(case, cy):
    shape, offset, cuts, seed = case
    g = torch.Generator().manual_seed(seed)
    x = offset + torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randn(*shape[:-1], cy, generator=g, dtype=torch.float64) + x[..., :1]  # correlated
    gram = Gram(cross=True)
    for cx_, cy_ in zip(split(x, cuts), split(y, cuts)):
        gram.update(cx_, -1, y=cy_)
    rx, ry = rows(x, -1), rows(y, -1)
    close(gram.covariance(), ref_cov(rx, ry), rtol=1e-7)
    close(gram.var, rx.var(0, unbiased=False), rtol=1e-7)
    close(gram.var_y, ry.var(0, unbiased=False), rtol=1e-7)
    close(gram.mean_y, ry.mean(0))
    full = torch.corrcoef(torch.cat([rx, ry], 1).T)
    close(gram.correlation(), full[: rx.shape[1], rx.shape[1]:], rtol=1e-7)


@pytest.mark.parametrize("make", [Moments, Gram, lambda: Gram(cross=True)])
def test_merge_equals_one_pass(make):
    g = torch.Generator().manual_seed(2)
    data = 50 + torch.randn(90, 4, generator=g, dtype=torch.float64)
    kw = (lambda c: {"y": c[:, :3] * 2}) if getattr(make(), "cross", False) else (lambda c: {})
    one, a, b, empty = make(), make(), make(), make()
    for i, c in enumerate(data.split(11)):
        one.update(c, **kw(c))
        (a if i % 2 else b).update(c, **kw(c))
    a.merge(b).merge(empty)
    assert a.count == one.count == 90
    close(a.mean, one.mean, scale=50)
    close(a.var, one.var, rtol=1e-9)
    if isinstance(a, Gram):
        close(a.covariance(), one.covariance(), rtol=1e-9)
    with pytest.raises(TorchMergeError):
        Moments().merge(Gram())


def test_dead_units_have_zero_correlation():
    x = torch.randn(50, 3, dtype=torch.float64)
    x[:, 1] = 2.0  # dead unit
    corr = Gram().update(x).correlation()
    assert torch.isfinite(corr).all() and corr[1].abs().max() == 0


def test_stat_errors():
    with pytest.raises(TorchMergeError, match=r"channel_axis=3.*\(2, 5\)"):
        Moments().update(torch.zeros(2, 5), channel_axis=3)
    with pytest.raises(TorchMergeError, match="no data"):
        Moments().mean
    with pytest.raises(TorchMergeError, match="y="):
        Gram(cross=True).update(torch.zeros(2, 3))
    with pytest.raises(TorchMergeError, match="samples"):
        Gram(cross=True).update(torch.zeros(2, 3), y=torch.zeros(3, 3))
    m = Moments().update(torch.zeros(2, 5))
    with pytest.raises(TorchMergeError, match=r"\(2, 4\) has 4 channels.*had 5"):
        m.update(torch.zeros(2, 4))


# ---------------------------------------------------------------- batch formats
x0 = torch.arange(6.0).view(2, 3)
GOOD = [
    ("tensor", x0),
    ("tuple", (x0, torch.tensor([0, 1]))),
    ("list", [x0, torch.tensor([0, 1])]),
    *[(f"dict[{k}]", {k: x0, "label": 1}) for k in INPUT_KEYS],
    ("dict order", {"input_ids": -x0, "x": x0}),
]


@pytest.mark.parametrize("label,batch", GOOD, ids=[g[0] for g in GOOD])
def test_batch_formats(label, batch):
    (got,) = list(iter_inputs([batch], device="cpu"))
    assert torch.equal(got, x0)


BAD = [
    ("int", 3, "int"),
    ("dict without input", {"image": x0, "label": 1}, r"\['image', 'label'\]"),
    ("empty tuple", (), "tuple"),
    ("tuple of str", ("a", x0), "str"),
    ("none", None, "NoneType"),
]


@pytest.mark.parametrize("label,batch,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_batches_raise(label, batch, msg):
    with pytest.raises(TorchMergeError, match=msg):
        list(iter_inputs([x0, batch]))


def test_iter_inputs_single_batch_and_max_batches():
    assert len(list(iter_inputs(x0))) == 1  # a bare Tensor is one batch, not its rows
    assert len(list(iter_inputs({"x": x0}))) == 1
    assert len(list(iter_inputs([x0] * 10, max_batches=3))) == 3
    with pytest.raises(TorchMergeError, match="iterable"):
        list(iter_inputs(5))


# ---------------------------------------------------------------- collect
class Net(nn.Module):
    def __init__(self, fail_on=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 5)
        self.fail_on = fail_on
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("boom")
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, 6, 6, generator=g) for _ in range(n)]


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_collect_matches_direct_activations_and_leaves_model_untouched():
    torch.manual_seed(0)
    net = Net()
    net.train()
    net.bn.eval()                      # mixed flags must come back exactly
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = collect(net, ["conv", "bn", "fc"], batches(), stat="moments")
    assert hook_count(net) == 0
    assert net.training and not net.bn.training and net.fc.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net.eval()
    with torch.no_grad():
        acts = [net.conv(b) for b in batches()]
        fcs = [net(b) for b in batches()]
    _, mean, var = ref_moments(acts, 1)                    # conv output: default channel axis 1
    close(out["conv"].mean, mean, rtol=1e-5)
    close(out["conv"].var, var, rtol=1e-5)
    _, mean, var = ref_moments(fcs, -1)                    # linear output: -1
    close(out["fc"].var, var, rtol=1e-5)
    assert out["bn"].mean.shape == (4,)


def test_hooks_removed_and_flags_restored_when_forward_raises():
    net = Net(fail_on=2).train()
    with pytest.raises(RuntimeError, match="boom"):
        collect(net, {"c": net.conv, "f": net.fc}, batches(), where="input")
    assert hook_count(net) == 0 and net.training and net.conv.training


def test_input_hook_sees_input_before_inplace_op():
    net = Net().eval()
    out = collect(net, ["act", "bn"], batches(), where="input", channel_axis=1)  # ReLU: no default
    pre_relu = collect(net, ["bn"], batches())["bn"]
    close(out["act"].mean, pre_relu.mean, rtol=1e-6)


def test_channel_axis_override_types_selection_and_custom_stat():
    net = Net()
    out = collect(net, (nn.Conv2d, nn.Linear), batches(), channel_axis={"conv": -1})
    assert set(out) == {"conv", "fc"} and out["conv"].mean.shape == (6,)  # W axis as channels
    seen = []

    class Shapes:
        def update(self, x, channel_axis):
            seen.append((tuple(x.shape), channel_axis))

    collect(net, ["pool"], batches(1), stat=Shapes, channel_axis=2)
    assert seen == [((5, 4, 2, 2), 2)]


def test_token_layout_default_axis_and_gram():
    lin = nn.Linear(3, 4)
    toks = [torch.randn(2, 7, 3) for _ in range(2)]
    out = collect(lin, {"lin": lin}, toks, stat="gram", where="input")
    r = rows(torch.cat(toks), -1)
    close(out["lin"].second_moment(), r.T @ r / r.shape[0], rtol=1e-6)


def test_collect_errors():
    net = Net()
    with pytest.raises(TorchMergeError, match="no submodule 'nope'"):
        collect(net, ["nope"], batches())
    with pytest.raises(TorchMergeError, match="stat="):
        collect(net, ["conv"], batches(), stat="fisher")
    with pytest.raises(TorchMergeError, match="where="):
        collect(net, ["conv"], batches(), where="grad")
    with pytest.raises(TorchMergeError, match="not among the targets"):
        collect(net, ["conv"], batches(), channel_axis={"fc": 1})
    assert hook_count(net) == 0


def test_progress_without_tqdm_is_silent(capsys):
    collect(Net(), ["fc"], batches(2), progress=True)
    assert capsys.readouterr().out == ""


def test_collect_paired_finds_permutation():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    b = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight[perm])
        b[0].bias.copy_(a[0].bias[perm])
    data = [(torch.randn(32, 4), torch.zeros(32)) for _ in range(3)]
    out = collect_paired(a, b, ["0", "1"], None, data)
    for name in ("0", "1"):
        assert out[name].cross and out[name].count == 96
        assert torch.equal(out[name].correlation().argmax(0), perm)
    assert hook_count(a) == hook_count(b) == 0
    with pytest.raises(TorchMergeError, match="2 targets in model_a but 1"):
        collect_paired(a, b, ["0", "1"], ["0"], data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_statistics_stay_on_the_activation_device():
    net = Net().cuda()
    out = collect(net, ["conv", "fc"], batches())             # CPU batches follow the model
    assert out["conv"].mean.device.type == "cuda" and out["conv"].mean.dtype == torch.float64
    ref = collect(copy.deepcopy(net).cpu(), ["conv"], batches())
    close(out["conv"].var.cpu(), ref["conv"].var, rtol=1e-5)
