"""Coupling rules: for each op, how output axes relate to input axes and parameters.

A rule receives a :class:`~torchmerge.coupling.Ctx` and the node's arguments, unifies the terms
that must share a permutation and returns the output's value. Rules are looked up by module type,
function or method name; anything without a rule is frozen by the walker's fallback.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .coupling import UNIT, Ctx, Lazy, tensor_terms, unsupported
from .layout import Cat, Prod

# ---------------------------------------------------------------------------------------------
# shared helpers


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _tensor_arg(c: Ctx, a):
    v = c.val(a)
    if not isinstance(v, list):
        unsupported("expected a tensor argument")
    return v


def broadcast(c: Ctx, layouts: list, out_shape) -> list:
    """Right-align ``layouts`` under broadcasting; axes of equal size > 1 are unified."""
    out = []
    for k in range(1, len(out_shape) + 1):
        size = out_shape[-k]
        cands = [L[-k] for L in layouts if len(L) >= k and c.spaces.resolve(L[-k]).size == size]
        if size == 1 or not cands:
            out.append(UNIT if size == 1 else c.fixed(size))
            continue
        for t in cands[1:]:
            c.unify(cands[0], t, "broadcast element-wise op")
        out.append(cands[0])
    return out[::-1]


def reshape_layout(c: Ctx, layout: list, in_shape, out_shape) -> list:
    """Map axes through a reshape by splitting the row-major factor list at the new axis sizes.

    The axes are first cut into independent segments (runs of input and output axes with equal
    products: (B, H, W, C) -> (B, H/2, 2, W/2, 2, C) is B | H | W | C); a segment whose factors
    cannot be matched is frozen alone, so a spatial reshape never freezes the channel axis."""
    out = []
    for ins, outs in _segments(tuple(c.spaces.resolve(t).size for t in layout), tuple(out_shape)):
        seg = _reshape_segment(c, layout[ins], out_shape[outs])
        if seg is None:
            c.freeze(layout[ins], "reshape mixes a concatenated space with other axes")
            seg = [c.fixed(s) for s in out_shape[outs]]
        out += seg
    return out


def _segments(a: tuple, b: tuple) -> list:
    """(input slice, output slice) pairs of a reshape from shape ``a`` to shape ``b`` whose sizes
    multiply to the same number, as fine as possible; one segment when a size is 0."""
    whole = [(slice(0, len(a)), slice(0, len(b)))]
    if 0 in a or 0 in b:
        return whole
    segs, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        si, sj, pa, pb = i, j, 1, 1
        if i < len(a):
            pa, i = a[i], i + 1
        if j < len(b):
            pb, j = b[j], j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa, i = pa * a[i], i + 1
            elif pb < pa and j < len(b):
                pb, j = pb * b[j], j + 1
            else:
                return whole
        segs.append((slice(si, i), slice(sj, j)))
    return segs


def _reshape_segment(c: Ctx, layout: list, out_shape) -> list | None:
    factors = []
    for t in layout:
        r = c.spaces.resolve(t)
        factors.extend(r.terms if isinstance(r, Prod) else ([] if r.size == 1 else [r]))
    out = []
    for size in out_shape:
        taken, have = [], 1
        while have < size:
            if not factors:
                return None
            f = c.spaces.resolve(factors.pop(0))
            need = size // have
            if size % have == 0 and f.size <= need and need % f.size == 0:
                taken.append(f)
                have *= f.size
            elif hasattr(f, "parent") and f.size % need == 0:  # split an atom: (need, rest)
                head, tail = c.spaces.split(f, (need, f.size // need)).terms
                taken.append(head)
                factors.insert(0, tail)
                have *= need
            else:
                return None
        out.append(Prod(tuple(taken)) if len(taken) != 1 else taken[0])
    if factors:
        return None
    return out


# ---------------------------------------------------------------------------------------------
# element-wise and broadcasting


def passthrough(c: Ctx, x, *args, **kwargs):
    return _tensor_arg(c, x)


def elementwise(c: Ctx, *args, **kwargs):
    tensors = [c.val(a) for a in list(args) + list(kwargs.values())]
    tensors = [t for t in tensors if isinstance(t, list)]
    if isinstance(c.out_shape, tuple):
        return broadcast(c, tensors, c.out_shape)
    unsupported("element-wise op with a non-tensor output")


def like(c: Ctx, x, *args, **kwargs):
    """zeros_like / ones_like / full_like: constant values, equivariant under any permutation."""
    return _tensor_arg(c, x)


# ---------------------------------------------------------------------------------------------
# reductions


def _reduce(c: Ctx, x, dims, lazy_why=None):
    X = _tensor_arg(c, x)
    nd = len(X)
    dims = range(nd) if dims is None else ([dims] if isinstance(dims, int) else dims)
    dims = {_dim(d, nd) for d in dims}
    out_shape = c.out_shape[0] if isinstance(c.out_shape, list) else c.out_shape
    keep = len(out_shape) == nd
    out = [UNIT if i in dims else X[i] for i in range(nd) if keep or i not in dims]
    return out


def reduction(c: Ctx, x, dim=None, *args, **kwargs):
    dim = kwargs.get("dim", dim if not isinstance(dim, bool) else None)
    if kwargs.get("axis") is not None:
        dim = kwargs["axis"]
    return _reduce(c, x, dim)


def norm(c: Ctx, x, p="fro", dim=None, *args, **kwargs):
    return _reduce(c, x, kwargs.get("dim", dim))


def max_min(c: Ctx, x, dim=None, *args, **kwargs):
    """max(x), max(x, y) (element-wise) or max(x, dim) -> (values, indices)."""
    dim = kwargs.get("dim", dim)
    if isinstance(c.val(dim) if hasattr(dim, "op") else None, list):
        return elementwise(c, x, dim)
    if dim is None:
        return _reduce(c, x, None)
    X = _tensor_arg(c, x)
    values = _reduce(c, x, dim)
    reduced = X[_dim(dim, len(X))]
    indices = Lazy(list(values), [reduced], "arg-max/arg-min indices depend on channel order")
    return (values, indices)


def arg_reduction(c: Ctx, x, dim=None, *args, **kwargs):
    X = _tensor_arg(c, x)
    dim = kwargs.get("dim", dim)
    c.freeze(X if dim is None else [X[_dim(dim, len(X))]], "arg-max/arg-min depends on channel order")
    return c.fixed_like(c.out_shape)


def along_dim_order(c: Ctx, x, dim=None, *args, **kwargs):
    """cumsum / sort / topk: the order along ``dim`` matters; freeze that axis only."""
    X = _tensor_arg(c, x)
    dim = kwargs.get("dim", dim if isinstance(dim, int) else -1)
    c.freeze([X[_dim(dim, len(X))]], "op depends on the order along this axis")
    if isinstance(c.out_shape, list):
        return c.fixed_like(c.out_shape)
    return X


def roll(c: Ctx, x, shifts=None, dims=None, *args, **kwargs):
    """torch.roll: the rolled axes are shifted (frozen); others pass through."""
    X = _tensor_arg(c, x)
    dims = kwargs.get("dims", dims)
    if dims is None or dims == () or dims == []:
        unsupported("roll over the flattened tensor")
    dims = [dims] if isinstance(dims, int) else dims
    c.freeze([X[_dim(d, len(X))] for d in dims], "roll shifts indices along this axis")
    return X


# ---------------------------------------------------------------------------------------------
# axes: reshape, transpose, expand, index


def reshape(c: Ctx, x, *args, **kwargs):
    X = _tensor_arg(c, x)
    return reshape_layout(c, X, c.shape(x), c.out_shape)


def transpose(c: Ctx, x, d0=0, d1=1, *args, **kwargs):
    X = list(_tensor_arg(c, x))
    if len(X) < 2:
        return X
    d0, d1 = _dim(kwargs.get("dim0", d0), len(X)), _dim(kwargs.get("dim1", d1), len(X))
    X[d0], X[d1] = X[d1], X[d0]
    return X


def permute(c: Ctx, x, *dims, **kwargs):
    X = _tensor_arg(c, x)
    dims = kwargs.get("dims", dims)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return [X[_dim(d, len(X))] for d in dims]


def movedim(c: Ctx, x, source, destination, *args, **kwargs):
    X = _tensor_arg(c, x)
    src = [source] if isinstance(source, int) else list(source)
    dst = [destination] if isinstance(destination, int) else list(destination)
    order = [None] * len(X)
    for s, d in zip(src, dst):
        order[_dim(d, len(X))] = _dim(s, len(X))
    rest = iter(i for i in range(len(X)) if i not in {_dim(s, len(X)) for s in src})
    return [X[o if o is not None else next(rest)] for o in order]


def expand(c: Ctx, x, *args, **kwargs):
    X = _tensor_arg(c, x)
    out_shape, in_shape = c.out_shape, c.shape(x)
    out = []
    for k in range(1, len(out_shape) + 1):
        same = len(in_shape) >= k and in_shape[-k] == out_shape[-k]
        out.append(X[-k] if same else c.fixed(out_shape[-k], "broadcast axis"))
    return out[::-1]


def getattr_rule(c: Ctx, x, name):
    if name in ("T", "mT"):
        X = _tensor_arg(c, x)
        return X[::-1] if name == "T" else X[:-2] + [X[-1], X[-2]]
    if name == "data":
        return _tensor_arg(c, x)
    if c.out_shape is None or name in ("shape", "dtype", "device", "ndim", "is_cuda"):
        return None
    unsupported(f"attribute .{name} of a tensor")


def getitem(c: Ctx, x, idx):
    v = c.w.env.get(x) if hasattr(x, "op") else None
    if isinstance(v, tuple):
        return c.val(x)[idx] if not isinstance(v[idx], Lazy) else _consume(c, v[idx])
    if v is None:
        return None if c.out_shape is None else unsupported("indexing a non-tensor")
    return _index_tensor(c, c.val(x), idx if isinstance(idx, tuple) else (idx,))


def _consume(c: Ctx, lazy: Lazy):
    for t in lazy.freeze_terms:
        c.spaces.freeze(t, c.reason(lazy.why))
    return lazy.layout


def _index_tensor(c: Ctx, X: list, idx: tuple):
    if any(hasattr(i, "op") or isinstance(i, (list, torch.Tensor)) for i in idx):
        if all(isinstance(i, fx.Node) or (isinstance(i, slice) and i == slice(None)) for i in idx):
            return index_core(c, X, [i if isinstance(i, fx.Node) else None for i in idx])
        unsupported("advanced (tensor) indexing")
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        fill = len(X) - sum(i is not None for i in idx if i is not Ellipsis)
        idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
    out, axis = [], 0
    for i in idx:
        if i is None:
            out.append(UNIT)
            continue
        if isinstance(i, slice) and i == slice(None):
            out.append(X[axis])
        elif isinstance(i, slice):
            out.append(slice_piece(c, X[axis], i))  # None: sized from the output shape below
        elif isinstance(i, int):
            c.freeze([X[axis]], "integer index selects fixed channels")
        else:
            unsupported(f"index {i!r}")
        axis += 1
    out += X[axis:]
    shape = c.out_shape
    return [t if t is not None else c.fixed(s, "sliced axis") for t, s in zip(out, shape)]


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8)  # not bool / uint8: masks


def index_core(c: Ctx, X: list, indices: list):
    """x[i0, i1, ...] with integer index tensors (``None``: a full slice), e.g. a relative-position
    bias table read at a buffer of indices: the indexed axes are read by value, so they are
    frozen; the index tensors' broadcast axes replace them (in place when the indexed axes are
    adjacent, in front otherwise); every other axis passes through."""
    pos = [i for i, t in enumerate(indices) if t is not None]
    if not pos:
        return list(X)
    for i in pos:
        dtype = indices[i].meta.get("dtype") or getattr(indices[i].meta.get("val"), "dtype", None)
        if dtype not in _INDEX_DTYPES:
            unsupported("indexing with a tensor that is not an integer index")
    c.freeze([X[i] for i in pos], "tensor index reads these positions by value")
    shape = torch.broadcast_shapes(*(c.shape(indices[i]) for i in pos))
    idx = broadcast(c, [_tensor_arg(c, indices[i]) for i in pos], shape)
    if pos == list(range(pos[0], pos[-1] + 1)):
        return X[:pos[0]] + idx + X[pos[-1] + 1:]
    return idx + [X[j] for j in range(len(X)) if j not in pos]


# The slice bounds may follow the input's shape (x[:, :seq_len] of a position table): indices this
# trace drops, and no other slice keeps, may be read by another input, so they are never permuted
# (the walker freezes them at the end; rotate_half's two halves keep each other's).
_DROPPED = "dropped by a slice (other input shapes may use it)"


def slice_piece(c: Ctx, term, i: slice):
    """x[..., lo:hi] on one axis (fx getitem and aten.slice alike): the term itself at full width,
    else the block of a concatenation or the refined piece of an atom it covers (a subgroup of
    the space's permutations); None, with the axis frozen, for a strided slice or one that
    crosses a product's blocks."""
    size = c.spaces.resolve(term).size
    bounds = (i.start, i.stop, i.step)
    if all(b is None or isinstance(b, int) for b in bounds):
        lo, hi, step = i.indices(size)
        if step == 1 and lo == 0 and hi == size:
            return term
        piece = slice_term(c, term, lo, hi) if step == 1 and lo < hi else None
        if piece is not None:
            c.w.sliced.append((piece, True, None))
            return piece
    c.freeze([term], "slicing part of a channel space")
    return None


def slice_term(c: Ctx, term, lo: int, hi: int):
    """The sub-term covering indices [lo, hi) of ``term``, splitting atoms at the bounds; None if
    the range crosses a product's blocks."""
    r = c.spaces.resolve(term)
    if lo == 0 and hi == r.size:
        return r
    if isinstance(r, Cat):
        parts, offset = [], 0
        for t in r.terms:
            a, b = max(lo, offset), min(hi, offset + t.size)
            if a < b:
                part = slice_term(c, t, a - offset, b - offset)
                if part is None:
                    return None
                parts.append(part)
            else:
                c.w.sliced.append((t, None, c.reason(_DROPPED)))
            offset += t.size
        return parts[0] if len(parts) == 1 else Cat(tuple(parts))
    if isinstance(r, Prod):
        inner = r.size // r.terms[0].size
        if lo % inner or hi % inner:
            return None
        head = slice_term(c, r.terms[0], lo // inner, hi // inner)
        return None if head is None else Prod((head,) + r.terms[1:])
    sizes = [s for s in (lo, hi - lo, r.size - hi) if s > 0]
    pieces = c.spaces.split(r, sizes, kind=Cat).terms
    kept = pieces[1] if lo > 0 else pieces[0]
    c.w.sliced += [(p, None, c.reason(_DROPPED)) for p in pieces if p is not kept]
    return kept


# ---------------------------------------------------------------------------------------------
# concatenation and splitting


def cat(c: Ctx, tensors, dim=0, *args, **kwargs):
    dim = kwargs.get("axis", dim)
    Xs = [_tensor_arg(c, t) for t in tensors]
    nd = len(Xs[0])
    d = _dim(dim, nd)
    for X in Xs[1:]:
        for i in range(nd):
            if i != d:
                c.unify(Xs[0][i], X[i], "torch.cat inputs")
    out = list(Xs[0])
    out[d] = Cat(tuple(X[d] for X in Xs))
    return out


def stack(c: Ctx, tensors, dim=0, *args, **kwargs):
    Xs = [_tensor_arg(c, t) for t in tensors]
    for X in Xs[1:]:
        for a, b in zip(Xs[0], X):
            c.unify(a, b, "torch.stack inputs")
    out = list(Xs[0])
    out.insert(_dim(dim, len(out) + 1), c.fixed(len(Xs), "stack index"))
    return out


def split(c: Ctx, x, size_or_sections=None, dim=0, *args, **kwargs):
    """split / chunk / tensor_split: the space along ``dim`` becomes a concatenation of pieces."""
    X = _tensor_arg(c, x)
    dim = _dim(kwargs.get("dim", dim), len(X))
    shapes = c.out_shape
    sizes = tuple(s[dim] for s in shapes)
    r = c.spaces.resolve(X[dim])
    if isinstance(r, Cat) and tuple(t.size for t in r.terms) == sizes:
        pieces = r.terms
    elif hasattr(r, "parent") and all(s > 0 for s in sizes):
        pieces = c.spaces.split(r, sizes, kind=Cat).terms if len(sizes) > 1 else (r,)
    else:
        c.freeze([X[dim]], "split does not follow the concatenation's blocks")
        pieces = tuple(c.fixed(s) for s in sizes)
    return tuple(X[:dim] + [p] + X[dim + 1:] for p in pieces)


def unbind(c: Ctx, x, dim=0, *args, **kwargs):
    X = _tensor_arg(c, x)
    dim = _dim(kwargs.get("dim", dim), len(X))
    c.freeze([X[dim]], "unbind selects fixed indices")
    return tuple(X[:dim] + X[dim + 1:] for _ in c.out_shape)


# ---------------------------------------------------------------------------------------------
# matrix products and attention


def matmul(c: Ctx, a, b, *args, **kwargs):
    A, B = _tensor_arg(c, a), _tensor_arg(c, b)
    A2 = [UNIT] + A if len(A) == 1 else A
    B2 = B + [UNIT] if len(B) == 1 else B
    c.unify(A2[-1], B2[-2], "contracted axis of a matrix product")
    batch_shape = torch.broadcast_shapes(c.shape(a)[:-2] if len(A) > 1 else (),
                                         c.shape(b)[:-2] if len(B) > 1 else ())
    out = broadcast(c, [A2[:-2], B2[:-2]], batch_shape) + [A2[-2], B2[-1]]
    if len(B) == 1:
        out.pop(-1)
    if len(A) == 1:
        out.pop(-2 if len(B) > 1 else -1)
    return out


def einsum(c: Ctx, equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if "..." in equation or "->" not in equation:
        unsupported("einsum with '...' or an implicit output")
    lhs, rhs = equation.replace(" ", "").split("->")
    letters: dict = {}
    for spec, op in zip(lhs.split(","), operands):
        for ch, t in zip(spec, _tensor_arg(c, op)):
            if c.spaces.resolve(t).size == 1:
                continue
            if ch in letters:
                c.unify(letters[ch], t, f"einsum index '{ch}'")
            else:
                letters[ch] = t
    return [letters.get(ch, UNIT) for ch in rhs]


def sdpa(c: Ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
    """softmax(q kᵀ·scale) v: q,k share the feature space; k,v share the key axis; batch axes unify."""
    if kwargs.get("enable_gqa"):
        unsupported("grouped-query attention")
    Q, K, V = (_tensor_arg(c, t) for t in (q, k, v))
    c.unify(Q[-1], K[-1], "query/key features")
    c.unify(K[-2], V[-2], "key/value sequence axis")
    batch = broadcast(c, [Q[:-2], K[:-2], V[:-2]], c.out_shape[:-2])
    mask = kwargs.get("attn_mask", attn_mask)
    if mask is not None and c.val(mask) is not None:  # a placeholder that is None (attn_mask=None) is no mask
        broadcast(c, [batch + [Q[-2], K[-2]], _tensor_arg(c, mask)], c.out_shape[:-1] + (c.shape(k)[-2],))
    return batch + [Q[-2], V[-1]]


# ---------------------------------------------------------------------------------------------
# layers (module and functional forms share one core)


def linear_core(c: Ctx, X, W, B):
    c.unify(X[-1], W[1], "linear input features")
    if B is not None:
        c.unify(W[0], B[0], "linear bias")
    return X[:-1] + [W[0]]


def conv_core(c: Ctx, X, W, B, groups: int, transposed=False):
    k = len(W) - 2
    ch = len(X) - k - 1
    c.freeze(W[2:], "convolution kernel positions")
    w_in, w_out = (W[0], W[1]) if transposed else (W[1], W[0])
    if groups == 1:
        c.unify(X[ch], w_in, "conv input channels")
        out_ch = w_out
    else:  # grouped conv: channels = (group index) x (channels per group)
        g = c.spaces.atom(groups)
        per_in = c.spaces.resolve(w_in).size // (groups if transposed else 1)
        if transposed:
            c.unify(X[ch], Prod((g, c.spaces.atom(per_in))), "grouped conv input channels")
            c.unify(w_in, X[ch], "grouped conv weight")
            out_ch = Prod((g, w_out))
        else:
            c.unify(X[ch], Prod((g, w_in)), "grouped conv input channels")
            per_out = c.spaces.resolve(w_out).size // groups
            c.unify(w_out, Prod((g, c.spaces.atom(per_out))), "grouped conv output channels")
            out_ch = w_out
    if B is not None:
        c.unify(out_ch, B[0], "conv bias")
    spatial = [c.fixed(s, "spatial axis") for s in c.out_shape[ch + 1:]]
    return X[:ch] + [out_ch] + spatial


def channel_norm_core(c: Ctx, X, params, axis=1):
    """BatchNorm / InstanceNorm: per-channel statistics and parameters along ``axis``."""
    for P in params:
        if P is not None:
            c.unify(X[axis], P[0], "per-channel norm parameter")
    return X


def layer_norm_core(c: Ctx, X, params, ndims: int):
    for P in params:
        if P is not None:
            for i in range(ndims):
                c.unify(X[len(X) - ndims + i], P[i], "layer-norm parameter")
    return X


def group_norm_core(c: Ctx, X, params, groups: int):
    size = c.spaces.resolve(X[1]).size
    if 1 < groups < size:  # statistics per contiguous block: permute blocks and within blocks
        c.unify(X[1], Prod((c.spaces.atom(groups), c.spaces.atom(size // groups))), "GroupNorm blocks")
    return channel_norm_core(c, X, params)


def embedding_core(c: Ctx, ids, W):
    c.freeze([W[0]], "embedding rows are indexed by input ids")
    return list(ids) + [W[1]]


def spatial_core(c: Ctx, X, n_spatial: int):
    """Pooling / upsampling: leading (batch, channel) axes pass through, spatial axes are fixed."""
    if isinstance(c.out_shape, list):
        unsupported("pooling that returns indices")
    n_spatial = min(n_spatial, len(X) - 1)
    lead = X[: len(X) - n_spatial]
    return lead + [c.fixed(s, "spatial axis") for s in c.out_shape[len(lead):]]


# ---------------------------------------------------------------------------------------------
# module rules: (types, rule(c, module, path, *args, **kwargs))


def _spatial_dims(m) -> int:
    name = type(m).__name__
    return int(name[-2]) if name[-1] == "d" and name[-2].isdigit() else 2


def _m_linear(c, m, path, x, *a, **k):
    W, B = c.module_params(path, ["weight", "bias"])
    return linear_core(c, _tensor_arg(c, x), W, B)


def _m_conv(c, m, path, x, *a, **k):
    W, B = c.module_params(path, ["weight", "bias"])
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    return conv_core(c, _tensor_arg(c, x), W, B, m.groups, transposed)


def _m_batchnorm(c, m, path, x, *a, **k):
    params = c.module_params(path, ["weight", "bias", "running_mean", "running_var"])
    return channel_norm_core(c, _tensor_arg(c, x), params)


def _m_layernorm(c, m, path, x, *a, **k):
    params = c.module_params(path, ["weight", "bias"])
    return layer_norm_core(c, _tensor_arg(c, x), params, len(m.normalized_shape))


def _m_groupnorm(c, m, path, x, *a, **k):
    return group_norm_core(c, _tensor_arg(c, x), c.module_params(path, ["weight", "bias"]), m.num_groups)


def _m_embedding(c, m, path, ids, *a, **k):
    return embedding_core(c, _tensor_arg(c, ids), c.param(f"{path}.weight"))


def _m_prelu(c, m, path, x, *a, **k):
    X = _tensor_arg(c, x)
    W = c.param(f"{path}.weight")
    if c.spaces.resolve(W[0]).size > 1:
        c.unify(X[1 if len(X) > 1 else 0], W[0], "PReLU per-channel slope")
    return X


def _m_passthrough(c, m, path, x, *a, **k):
    return _tensor_arg(c, x)


def _m_spatial(c, m, path, x, *a, **k):
    return spatial_core(c, _tensor_arg(c, x), _spatial_dims(m))


def _m_upsample(c, m, path, x, *a, **k):
    X = _tensor_arg(c, x)
    return spatial_core(c, X, len(X) - 2)


def _m_flatten(c, m, path, x, *a, **k):
    return reshape(c, x)


def _m_pixel_shuffle(c, m, path, x, *a, **k):
    """PixelShuffle: channels (C·r·r) -> C with r x r sub-pixels moved into space (and back)."""
    X = _tensor_arg(c, x)
    ch = len(X) - 3
    if isinstance(m, nn.PixelShuffle):
        r = m.upscale_factor
        sub = (c.fixed(r, "sub-pixel position"), c.fixed(r, "sub-pixel position"))
        out_ch = c.spaces.atom(c.out_shape[ch])
        c.unify(X[ch], Prod((out_ch,) + sub), "pixel shuffle channels")
    else:
        r = m.downscale_factor
        out_ch = Prod((X[ch], c.fixed(r, "sub-pixel position"), c.fixed(r, "sub-pixel position")))
    return X[:ch] + [out_ch] + [c.fixed(s, "spatial axis") for s in c.out_shape[ch + 1:]]


def _mha_supported(m) -> bool:
    return m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn


_MHA_OPTIONS = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _m_mha(c, m, path, query, key, value, *a, **k):
    """nn.MultiheadAttention: the packed in-projection's rows are (q, k, v) x (heads, head dim);
    q and k share heads and head dims (q_h . k_h), v shares the heads; out_proj reads (heads, v dim).
    Key and value share their batch and sequence axes, the query its batch axis."""
    if not _mha_supported(m):
        unsupported("nn.MultiheadAttention with separate k/v dims, bias_k or add_zero_attn")
    opts = {"need_weights": True, "average_attn_weights": True, **dict(zip(_MHA_OPTIONS, a)), **k}
    W_in, b_in = c.module_params(path, ["in_proj_weight", "in_proj_bias"])
    W_out, b_out = c.module_params(f"{path}.out_proj", ["weight", "bias"])
    Q, K, V = (_tensor_arg(c, t) for t in (query, key, value))
    for X in (Q, K, V):
        c.unify(X[-1], W_in[1], "attention input embedding")
    heads, dim = m.num_heads, m.head_dim
    H, D_qk, D_v = c.spaces.atom(heads), c.spaces.atom(dim), c.spaces.atom(dim)
    qk = Prod((H, D_qk))
    c.unify(W_in[0], Cat((qk, qk, Prod((H, D_v)))), "attention in-projection (q, k, v) x (heads, dims)")
    if b_in is not None:
        c.unify(W_in[0], b_in[0], "attention input bias")
    c.unify(W_out[1], Prod((H, D_v)), "attention output projection (heads, dims)")
    if b_out is not None:
        c.unify(W_out[0], b_out[0], "attention output bias")
    for x, y in zip(K[:-1], V[:-1]):
        c.unify(x, y, "key/value batch and sequence axes")
    batched = len(Q) == 3
    b = 0 if m.batch_first else 1
    if batched:
        c.unify(Q[b], K[b], "attention batch axis")
    q_seq, k_seq = (Q[1 - b], K[1 - b]) if batched else (Q[0], K[0])
    mask = opts.get("attn_mask")
    if mask is not None and c.val(mask) is not None:  # (L, S) or (batch x heads, L, S)
        M = _tensor_arg(c, mask)
        c.unify(M[-2], q_seq, "attention mask query axis")
        c.unify(M[-1], k_seq, "attention mask key axis")
        if len(M) == 3:
            c.freeze([M[0], H], "3-D attention mask is indexed by (batch x heads)")
    padding = opts.get("key_padding_mask")
    if padding is not None and c.val(padding) is not None:  # (batch, S) or (S,)
        P = _tensor_arg(c, padding)
        c.unify(P[-1], k_seq, "key padding mask")
        if batched and len(P) == 2:
            c.unify(P[0], Q[b], "key padding mask batch axis")
    out = Q[:-1] + [W_out[0]]
    if c.out_shape[1] is None:
        return (out, None)
    lead = [Q[b]] if batched else []
    if opts.get("need_weights") and not opts.get("average_attn_weights"):
        return (out, lead + [H, q_seq, k_seq])
    return (out, lead + [q_seq, k_seq])


ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Threshold, nn.Hardshrink, nn.Softshrink,
)
POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
         nn.InstanceNorm3d, nn.SyncBatchNorm)

MODULE_RULES = [
    ((nn.Linear,), _m_linear),
    ((nn.modules.conv._ConvNd,), _m_conv),
    (NORMS, _m_batchnorm),
    ((nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()), _m_layernorm),
    ((nn.GroupNorm,), _m_groupnorm),
    ((nn.Embedding,), _m_embedding),
    ((nn.PReLU,), _m_prelu),
    (ACTIVATIONS, _m_passthrough),
    (POOLS, _m_spatial),
    ((nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d), _m_upsample),
    ((nn.Flatten, nn.Unflatten), _m_flatten),
    ((nn.MultiheadAttention,), _m_mha),
    ((nn.PixelShuffle, nn.PixelUnshuffle), _m_pixel_shuffle),
]


# ---------------------------------------------------------------------------------------------
# functional forms


def _f_linear(c, x, weight, bias=None):
    return linear_core(c, _tensor_arg(c, x), _tensor_arg(c, weight), c.val(bias))


def _f_conv(c, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return conv_core(c, _tensor_arg(c, x), _tensor_arg(c, weight), c.val(bias), groups)


def _f_layer_norm(c, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return layer_norm_core(c, _tensor_arg(c, x), [c.val(weight), c.val(bias)], len(normalized_shape))


def _f_batch_norm(c, x, running_mean, running_var, weight=None, bias=None, *a, **k):
    params = [c.val(t) for t in (running_mean, running_var, weight, bias)]
    return channel_norm_core(c, _tensor_arg(c, x), params)


def _f_group_norm(c, x, num_groups, weight=None, bias=None, eps=1e-5):
    return group_norm_core(c, _tensor_arg(c, x), [c.val(weight), c.val(bias)], num_groups)


def _f_embedding(c, ids, weight, *a, **k):
    return embedding_core(c, _tensor_arg(c, ids), _tensor_arg(c, weight))


def _f_spatial(c, x, *a, **k):
    X = _tensor_arg(c, x)
    return spatial_core(c, X, len(X) - 2)


def _f_pad(c, x, pad, *a, **k):
    X = list(_tensor_arg(c, x))
    for i in range(len(pad) // 2):
        if pad[2 * i] or pad[2 * i + 1]:
            axis = len(X) - 1 - i
            c.freeze([X[axis]], "padding shifts indices along this axis")
            X[axis] = c.fixed(c.out_shape[axis], "padded axis")
    return X


def _f_normalize(c, x, p=2.0, dim=1, *a, **k):
    return _tensor_arg(c, x)


UNARY = [
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu,
    F.leaky_relu, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.logsigmoid,
    F.tanhshrink, F.threshold, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.exp, torch.log,
    torch.abs, torch.neg, operator.neg, torch.sqrt, torch.rsqrt, torch.square, torch.sin, torch.cos,
    torch.erf, torch.clamp, torch.clip, torch.sign, torch.reciprocal, torch.nan_to_num, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.softmax,
    F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, torch.floor, torch.ceil, torch.round,
    torch.trunc, torch.detach, torch.clone,
]
BINARY = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.eq, operator.ne,
    operator.gt, operator.lt, operator.ge, operator.le, operator.and_, operator.or_,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.where, torch.pow, torch.lerp, torch.eq,
    torch.ne, torch.gt, torch.lt, torch.ge, torch.le, torch.masked_fill, torch.addcmul, torch.addcdiv,
    torch.fmod, torch.remainder, torch.atan2, torch.rsub,
]
REDUCTIONS = [torch.mean, torch.sum, torch.amax, torch.amin, torch.nansum, torch.nanmean,
              torch.logsumexp, torch.prod, torch.var, torch.std, torch.all, torch.any]

FUNCTION_RULES = {
    **{f: passthrough for f in UNARY},
    **{f: elementwise for f in BINARY},
    **{f: reduction for f in REDUCTIONS},
    **{f: like for f in (torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
                         torch.rand_like, torch.randn_like)},
    torch.norm: norm, torch.linalg.vector_norm: norm, torch.max: max_min, torch.min: max_min,
    torch.argmax: arg_reduction, torch.argmin: arg_reduction,
    torch.cumsum: along_dim_order, torch.cumprod: along_dim_order, torch.sort: along_dim_order,
    torch.topk: along_dim_order, torch.flip: along_dim_order, torch.roll: roll,
    torch.reshape: reshape, torch.flatten: reshape, torch.squeeze: reshape, torch.unsqueeze: reshape,
    torch.unflatten: reshape, torch.transpose: transpose, torch.swapaxes: transpose,
    torch.swapdims: transpose, torch.permute: permute, torch.movedim: movedim, torch.t: transpose,
    torch.broadcast_to: expand, getattr: getattr_rule, operator.getitem: getitem,
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat, torch.stack: stack,
    torch.split: split, torch.chunk: split, torch.tensor_split: split, torch.unbind: unbind,
    torch.matmul: matmul, operator.matmul: matmul, torch.bmm: matmul, torch.mm: matmul,
    torch.einsum: einsum, F.scaled_dot_product_attention: sdpa,
    F.linear: _f_linear, F.conv1d: _f_conv, F.conv2d: _f_conv, F.conv3d: _f_conv,
    F.layer_norm: _f_layer_norm, F.batch_norm: _f_batch_norm, F.group_norm: _f_group_norm,
    F.embedding: _f_embedding, F.pad: _f_pad, F.normalize: _f_normalize,
    F.interpolate: _f_spatial, F.max_pool1d: _f_spatial, F.max_pool2d: _f_spatial,
    F.max_pool3d: _f_spatial, F.avg_pool1d: _f_spatial, F.avg_pool2d: _f_spatial,
    F.avg_pool3d: _f_spatial, F.adaptive_avg_pool1d: _f_spatial, F.adaptive_avg_pool2d: _f_spatial,
    F.adaptive_avg_pool3d: _f_spatial, F.adaptive_max_pool2d: _f_spatial,
}
if hasattr(F, "rms_norm"):
    FUNCTION_RULES[F.rms_norm] = _f_layer_norm

# Functions of optional packages that torch.fx keeps as calls (``torch.fx.wrap``), keyed by
# (module, name) so that the package need not be imported.
WRAPPED_RULES = {
    # input * (per-sample or per-batch Bernoulli noise / survival rate); the input in eval mode
    ("torchvision.ops.stochastic_depth", "stochastic_depth"): passthrough,
}


def function_rule(target):
    """The rule of a call_function target: a torch function, or a wrapped function of WRAPPED_RULES."""
    try:
        rule = FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None
    if rule is None:
        rule = WRAPPED_RULES.get((getattr(target, "__module__", None), getattr(target, "__name__", None)))
    return rule


METHOD_RULES = {
    **{m: passthrough for m in (
        "relu", "relu_", "sigmoid", "tanh", "exp", "log", "abs", "neg", "sqrt", "rsqrt", "square",
        "sin", "cos", "clamp", "clamp_", "clip", "sign", "reciprocal", "contiguous", "clone", "detach",
        "float", "double", "half", "bfloat16", "to", "type", "type_as", "requires_grad_", "cpu",
        "cuda", "softmax", "log_softmax", "floor", "ceil", "round", "nan_to_num", "erf")},
    **{m: elementwise for m in (
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum",
        "masked_fill", "masked_fill_", "where", "lerp", "eq", "ne", "gt", "lt", "ge", "le", "rsub",
        "addcmul")},
    **{m: reduction for m in ("mean", "sum", "amax", "amin", "nansum", "logsumexp", "prod", "var",
                              "std", "all", "any")},
    "norm": norm, "max": max_min, "min": max_min, "argmax": arg_reduction, "argmin": arg_reduction,
    "cumsum": along_dim_order, "sort": along_dim_order, "topk": along_dim_order, "flip": along_dim_order,
    "roll": roll,
    **{m: reshape for m in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                            "view_as", "reshape_as", "squeeze_", "unsqueeze_")},
    "transpose": transpose, "swapaxes": transpose, "swapdims": transpose, "t": transpose,
    "permute": permute, "movedim": movedim, "expand": expand, "expand_as": expand,
    "broadcast_to": expand, "split": split, "chunk": split, "tensor_split": split, "unbind": unbind,
    "matmul": matmul, "bmm": matmul, "mm": matmul,
    **{m: like for m in ("zero_", "fill_", "new_zeros", "new_ones")},
}


# ---------------------------------------------------------------------------------------------
# dispatch


def apply(c: Ctx):
    """Value of ``c.node`` under the rules (raises ``_Unsupported`` for the walker's fallback)."""
    node = c.node
    if node.op == "placeholder":
        return c.fixed_like(c.out_shape, "model input")
    if node.op == "output":
        for v in fx_values(c, node.args):
            c.freeze(tensor_terms(v), "model output")
        return None
    if node.op == "get_attr":
        return _get_attr(c, node.target)
    if c.out_shape is None and node.op != "call_module":
        return None  # sizes, dtypes, Python numbers: no channel spaces
    if node.op == "call_module":
        m = c.w.gm.get_submodule(node.target)
        if _is_user_leaf(c, m, node.target):
            unsupported("marked opaque with leaf_modules")
        for types, rule in MODULE_RULES:
            if isinstance(m, types):
                return rule(c, m, node.target, *node.args, **node.kwargs)
        unsupported(f"no coupling rule for module type {type(m).__name__}")
    rule = function_rule(node.target) if node.op == "call_function" else None
    if rule is not None:
        return rule(c, *node.args, **node.kwargs)
    if node.op == "call_function":
        from .aten_rules import rule_for  # the ATen vocabulary of torch.export graphs

        if (c.w.user_leaf_paths or c.w.user_leaf_types) and _in_user_leaf(c):
            unsupported("marked opaque with leaf_modules")
        rule = rule_for(node.target)
        if rule is not None:
            return rule(c, *node.args, **node.kwargs)
    if node.op == "call_method" and node.target in METHOD_RULES:
        return METHOD_RULES[node.target](c, *node.args, **node.kwargs)
    unsupported(f"no coupling rule for {node.op} {getattr(node.target, '__name__', node.target)}")


def weak_nodes(gm: fx.GraphModule, leaf_modules=()) -> list:
    """Nodes of a symbolically traced graph whose spaces the rules would freeze wholesale (an op
    without a rule, or a module whose internals stay opaque): torch.export sees inside them."""
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    leaf_paths = {m for m in leaf_modules if isinstance(m, str)}
    weak = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if node.target in leaf_paths or isinstance(m, leaf_types):
                continue
            if (isinstance(m, nn.MultiheadAttention) and not _mha_supported(m)) \
                    or not any(isinstance(m, t) for t, _ in MODULE_RULES):
                weak.append(node)
        elif node.op == "call_function" and function_rule(node.target) is None \
                and node.meta.get("shape") is not None:
            weak.append(node)
        elif node.op == "call_method" and node.target not in METHOD_RULES \
                and node.meta.get("shape") is not None:
            weak.append(node)
    return weak


def _in_user_leaf(c: Ctx) -> bool:
    """torch.export graphs inline every module: a node inside a leaf module is opaque."""
    stack = c.node.meta.get("nn_module_stack") or {}
    for value in stack.values():
        if isinstance(value, tuple) and value[0]:
            path = value[0]
            if path in c.w.user_leaf_paths:
                return True
            if c.w.user_leaf_types:
                try:
                    if isinstance(c.w.model.get_submodule(path), c.w.user_leaf_types):
                        return True
                except AttributeError:
                    continue
    return False


def fx_values(c: Ctx, args) -> list:
    found = []
    fx.node.map_arg(args, found.append)
    return [c.val(n) for n in found]


def _get_attr(c: Ctx, target: str):
    if not isinstance(c.out_shape, tuple) or not c.node.users:
        return None  # torch.export lists every tensor, used or not: unused ones stay in spec.unused
    try:
        tensor = _lookup(c.w.model, target)
    except AttributeError:
        tensor = None
    if id(tensor) not in c.w.canonical:
        return c.fixed_like(c.out_shape, "tensor constant that is not a parameter or buffer")
    return c.param(target)


def _lookup(obj, qualname: str):
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _is_user_leaf(c: Ctx, m, path: str) -> bool:
    return path in c.w.user_leaf_paths or isinstance(m, c.w.user_leaf_types)


__all__ = ["apply", "weak_nodes", "function_rule", "MODULE_RULES", "FUNCTION_RULES", "WRAPPED_RULES",
           "METHOD_RULES"]
