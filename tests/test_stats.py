"""Streaming statistics: exactness against a float64 one-shot reference, hooks, batch formats."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torchmerge.errors import TorchMergeError
from torchmerge.batches import Inputs
from torchmerge.stats import Gram, Moments, collect, collect_paired, iter_calls

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


@pytest.mark.parametrize("fold_every", [2, 32])
def test_unshifted_fast_path_switches_with_conditioning(monkeypatch, fold_every):
    """CPU fast path (no shift) for centred data; batches with |mean| ≫ std are redone with a shift,
    and the path comes back once the running mean is within a few stds again."""
    monkeypatch.setattr(Moments, "FOLD_EVERY", fold_every)
    g = torch.Generator().manual_seed(5)
    offsets = [0.0, 0.5, 5.4, 3e3, 3e3, 0.0, -2.0, 1e4, 0.0, 0.0]        # 5.4σ: just inside RAW_FACTOR
    chunks = [(o + torch.randn(32, 3, 5, generator=g)).float() for o in offsets for _ in range(3)]
    m = Moments()
    m.update(chunks[0], channel_axis=1)
    assert m._raw                                                      # centred: no subtraction pass
    for c in chunks[1:]:
        m.update(c, channel_axis=1)
    n, mean, var = ref_moments(chunks, 1)
    assert m.count == n
    close(m.mean, mean, scale=1e4, rtol=1e-6)
    close(m.var, var, rtol=1e-5)
    centred = Moments()
    for c in chunks[:6]:
        centred.update(c, channel_axis=1)
    _, mean, var = ref_moments(chunks[:6], 1)
    assert centred._raw
    close(centred.var, var, rtol=1e-5)


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
    with pytest.raises(TorchMergeError, match=r"cross=True needs y= \(the aligned second stream\)"):
        Gram(cross=True).update(torch.zeros(2, 3))
    with pytest.raises(TorchMergeError, match="samples"):
        Gram(cross=True).update(torch.zeros(2, 3), y=torch.zeros(3, 3))
    m = Moments().update(torch.zeros(2, 5))
    with pytest.raises(TorchMergeError, match=r"\(2, 4\) has 4 channels.*had 5"):
        m.update(torch.zeros(2, 4))


# ---------------------------------------------------------------- batch formats
x0 = torch.arange(6.0).view(2, 3)
GOOD = [  # (label, batch, expected Inputs)
    ("tensor", x0, Inputs((x0,), {})),
    ("tuple", (x0, torch.tensor([0, 1])), Inputs((x0,), {})),
    ("list", [x0, torch.tensor([0, 1])], Inputs((x0,), {})),
    ("dict", {"pixel_values": x0}, Inputs((), {"pixel_values": x0})),
    ("dict with labels", {"input_ids": x0, "attention_mask": -x0, "labels": 1},
     Inputs((), {"input_ids": x0, "attention_mask": -x0})),
    ("(dict, y)", ({"x": x0}, torch.tensor([0, 1])), Inputs((), {"x": x0})),
]


@pytest.mark.parametrize("label,batch,want", GOOD, ids=[g[0] for g in GOOD])
def test_batch_formats(label, batch, want):
    (got,) = list(iter_calls([batch], device="cpu"))
    assert len(got.args) == len(want.args) and all(torch.equal(a, b) for a, b in zip(got.args, want.args))
    assert got.kwargs.keys() == want.kwargs.keys()
    assert all(torch.equal(got.kwargs[k], want.kwargs[k]) for k in want.kwargs)


BAD = [
    ("int", 3, "int"),
    ("dict of labels only", {"labels": x0, "label": 1}, r"only labels"),
    ("empty tuple", (), "tuple"),
    ("tuple of str", ("a", x0), "str"),
    ("none", None, "NoneType"),
]


@pytest.mark.parametrize("label,batch,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_batches_raise(label, batch, msg):
    with pytest.raises(TorchMergeError, match=msg):
        list(iter_calls([x0, batch]))


def test_iter_calls_single_batch_and_max_batches():
    assert len(list(iter_calls(x0))) == 1  # a bare Tensor is one batch, not its rows
    assert len(list(iter_calls({"x": x0}))) == 1
    assert len(list(iter_calls([x0] * 10, max_batches=3))) == 3
    with pytest.raises(TorchMergeError, match="iterable"):
        list(iter_calls(5))
    with pytest.raises(TorchMergeError, match="max_batches"):
        list(iter_calls([x0], max_batches=0))


def test_dict_batches_reach_the_forward_as_keywords():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, features, scale=1.0):
            return self.fc(features) * scale

    net = Net()
    stats = collect(net, ["fc"], [{"features": x0, "labels": torch.tensor([0, 1])}] * 2)
    assert stats["fc"].count == 4


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


# ---------------------------------------------------------------- layer_input_grams (RegMean / MaTS)
import torch.nn.functional as F  # noqa: E402

from torchmerge.methods import regmean  # noqa: E402
from torchmerge.stats import layer_input_grams  # noqa: E402


def ref_conv_rows(conv, x):
    """[N, C·k…] by explicit loops over output positions, independent of the implementation."""
    x = x.double()
    ns = x.ndim - 2
    pad = [conv.padding[i] for i in range(ns)]
    xp = F.pad(x, [p for i in reversed(range(ns)) for p in (pad[i], pad[i])])
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    outs = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(ns)]
    rows = []
    for b in range(x.shape[0]):
        for pos in torch.cartesian_prod(*[torch.arange(o) for o in outs]).view(-1, ns).tolist():
            idx = [torch.arange(k[i]) * d[i] + pos[i] * s[i] for i in range(ns)]
            patch = xp[b][(slice(None), *torch.meshgrid(*idx, indexing="ij"))]   # [C, *k]
            rows.append(patch.reshape(-1))
    r = torch.stack(rows)
    # the reference really is the conv's X: X Wᵀ + b equals the conv output (channels last)
    y = conv.double()(x).movedim(1, -1).reshape(-1, conv.out_channels)
    conv.float()
    w = conv.weight.double().reshape(conv.out_channels, -1)
    torch.testing.assert_close(r @ w.T + conv.bias.double(), y)
    return r


def gram_close(actual, rows):
    expected = rows.T @ rows
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("shape", [(7, 5), (3, 6, 5)], ids=["[B,C]", "[B,T,C]"])
def test_input_grams_linear(shape):
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    data = [torch.randn(*shape) + 3 for _ in range(3)]
    out = layer_input_grams(lin, data)
    assert set(out) == {"weight"}                                   # the state-dict key
    r = torch.cat([x.reshape(-1, 5) for x in data]).double()
    rows_ = torch.stack([v for x in data for v in x.reshape(-1, 5)]).double()   # explicit loop
    assert torch.equal(r, rows_)
    gram_close(next(iter(out.values())), rows_)


CONVS = [
    ("conv1d", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (2, 3, 11)),
    ("conv2d", lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (2, 3, 7, 6)),
    ("conv2d 1x1", lambda: nn.Conv2d(3, 4, 1), (2, 3, 4, 5)),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), (2, 2, 3, 4, 3)),
]


@pytest.mark.parametrize("label,make,shape", CONVS, ids=[c[0] for c in CONVS])
def test_input_grams_conv_match_explicit_patches(label, make, shape):
    torch.manual_seed(1)
    net = nn.Sequential(make())
    data = [torch.randn(*shape) for _ in range(2)]
    out = layer_input_grams(net, data)
    assert list(out) == ["0.weight"]
    rows_ = torch.cat([ref_conv_rows(net[0], x) for x in data])
    gram_close(out["0.weight"], rows_)


def test_input_grams_conv2d_match_f_unfold_and_small_chunks(monkeypatch):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2)
    x = torch.randn(4, 3, 9, 8)
    u = F.unfold(x.double(), 3, dilation=2, padding=1, stride=2)          # [B, C·9, L]
    rows_ = u.transpose(1, 2).reshape(-1, 27)
    full = layer_input_grams(nn.Sequential(conv), x)["0.weight"]
    gram_close(full, rows_)
    import torchmerge.stats as S
    monkeypatch.setattr(S, "UNFOLD_CHUNK_BYTES", 27 * 4 * 3)             # 3 rows a block: < 1 sample
    gram_close(layer_input_grams(nn.Sequential(conv), x)["0.weight"], rows_)
    monkeypatch.setattr(S, "UNFOLD_CHUNK_BYTES", 27 * 4 * 40)            # 2 samples a block
    gram_close(layer_input_grams(nn.Sequential(conv), x)["0.weight"], rows_)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_input_grams_padding_same_matches_conv():
    torch.manual_seed(3)
    same = nn.Conv1d(2, 3, 4, padding="same")
    valid = nn.Conv1d(2, 3, 4)
    valid.load_state_dict(same.state_dict())
    x = torch.randn(3, 2, 9)
    xp = F.pad(x, [1, 2])                       # 'same' with k=4: 1 left, 2 right (extra on the right)
    with torch.no_grad():
        torch.testing.assert_close(same(x), valid(xp))
    gram_close(layer_input_grams(same, x)["weight"], ref_conv_rows(valid, xp))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)          # grouped: no entry
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)             # transposed: no entry
        self.circ = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")   # not zeros: no entry
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        self.unused = nn.Linear(2, 2)                               # never runs: no entry

    def forward(self, x):
        return self.fc(self.pool(self.circ(self.up(self.dw(self.conv(x))))).flatten(1))


def test_input_grams_skip_grouped_transposed_and_restore_model():
    net = Mixed().train()
    net.fc.eval()
    out = layer_input_grams(net, [(torch.randn(2, 3, 5, 5), 0)] * 2)
    assert set(out) == {"conv.weight", "fc.weight"}
    assert out["conv.weight"].shape == (27, 27) and out["fc.weight"].shape == (4, 4)
    assert hook_count(net) == 0 and net.training and not net.fc.training
    assert set(layer_input_grams(net, torch.randn(1, 3, 4, 4), layers=["fc", "dw"])) == {"fc.weight"}
    assert set(layer_input_grams(net, torch.randn(1, 3, 4, 4), layers="conv.weight")) == {"conv.weight"}
    with pytest.raises(TorchMergeError, match="no submodule 'nope'"):
        layer_input_grams(net, torch.randn(1, 3, 4, 4), layers=["nope"])


def test_input_grams_hooks_removed_on_error_and_max_batches():
    net = Net(fail_on=2).train()
    with pytest.raises(RuntimeError, match="boom"):
        layer_input_grams(net, batches())
    assert hook_count(net) == 0 and net.training
    net = Net()
    one = layer_input_grams(net, batches(3), max_batches=1)
    ref = layer_input_grams(net, batches(1))
    assert one.keys() == {"conv.weight", "fc.weight"}
    torch.testing.assert_close(one["fc.weight"], ref["fc.weight"])


def test_input_grams_shared_module_gets_every_path():
    lin = nn.Linear(3, 3)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(4, 3)
    out = layer_input_grams(net, x)
    assert set(out) == {"0.weight", "2.weight"}
    with torch.no_grad():
        rows_ = torch.cat([x, torch.relu(lin(x))]).double()
    gram_close(out["0.weight"], rows_)
    gram_close(out["2.weight"], rows_)


def test_regmean_of_identical_experts_with_input_grams_is_the_expert():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Identity(), nn.Flatten(2), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 2))
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    grams = layer_input_grams(net, data)
    assert set(grams) == {"0.weight", "4.weight", "6.weight"}
    experts = [copy.deepcopy(net).state_dict() for _ in range(3)]
    merged = regmean(experts, [grams] * 3).state
    for k, v in net.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_input_grams_on_cuda_match_cpu():
    net = Net()
    ref = layer_input_grams(net, batches())
    out = layer_input_grams(copy.deepcopy(net).cuda(), batches())
    for k in ref:
        assert out[k].device.type == "cuda"
        torch.testing.assert_close(out[k].cpu(), ref[k], rtol=1e-4, atol=1e-4)
