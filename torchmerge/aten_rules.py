"""Coupling rules for the ATen training-IR ops that ``torch.export`` graphs hold.

Each entry maps an ``OpOverloadPacket`` (``torch.ops.aten.linear``: every overload) to a rule of
:mod:`torchmerge.rules`, through a small adapter where ATen orders its arguments differently from
the ``torch`` function. Adding an op: one line here and a tiny test model (tests/zoo_aten.py).
An op missing here is frozen by the walker's fallback, never guessed.
"""
from __future__ import annotations

import torch

from . import rules as R
from .coupling import Ctx
from .layout import Prod

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# adapters: ATen argument order -> the shared rule cores


def _batch_norm(c: Ctx, x, weight=None, bias=None, mean=None, var=None, *a, **k):
    return R.channel_norm_core(c, R._tensor_arg(c, x), [c.val(t) for t in (weight, bias, mean, var)])


def _native_batch_norm(c: Ctx, x, weight=None, bias=None, mean=None, var=None, *a, **k):
    out = _batch_norm(c, x, weight, bias, mean, var)
    return (out,) + tuple(c.fixed_like(s, "batch-norm statistics") for s in c.out_shape[1:])


def _instance_norm(c: Ctx, x, weight=None, bias=None, mean=None, var=None, *a, **k):
    return _batch_norm(c, x, weight, bias, mean, var)


def _layer_norm(c: Ctx, x, normalized_shape, weight=None, bias=None, *a, **k):
    return R.layer_norm_core(c, R._tensor_arg(c, x), [c.val(weight), c.val(bias)], len(normalized_shape))


def _native_layer_norm(c: Ctx, x, normalized_shape, weight=None, bias=None, *a, **k):
    out = _layer_norm(c, x, normalized_shape, weight, bias)
    return (out,) + tuple(c.fixed_like(s, "layer-norm statistics") for s in c.out_shape[1:])


def _rms_norm(c: Ctx, x, normalized_shape, weight=None, *a, **k):
    return _layer_norm(c, x, normalized_shape, weight)


def _group_norm(c: Ctx, x, num_groups, weight=None, bias=None, *a, **k):
    return R.group_norm_core(c, R._tensor_arg(c, x), [c.val(weight), c.val(bias)], num_groups)


def _embedding(c: Ctx, weight, ids, *a, **k):
    return R.embedding_core(c, R._tensor_arg(c, ids), R._tensor_arg(c, weight))


def _convolution(c: Ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    return R.conv_core(c, R._tensor_arg(c, x), R._tensor_arg(c, weight), c.val(bias), groups, transposed)


def _conv_transpose(c: Ctx, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, *a):
    return R.conv_core(c, R._tensor_arg(c, x), R._tensor_arg(c, weight), c.val(bias), groups, True)


def _addmm(c: Ctx, bias, a, b, *args, **kwargs):
    """bias + a @ b (also baddbmm): a matrix product whose output broadcasts with ``bias``."""
    out = R.matmul(c, a, b)
    return R.broadcast(c, [out, R._tensor_arg(c, bias)], c.out_shape)


def _select(c: Ctx, x, dim, index):
    X = R._tensor_arg(c, x)
    d = R._dim(dim, len(X))
    c.freeze([X[d]], "integer index selects fixed channels")
    return X[:d] + X[d + 1:]


def _slice(c: Ctx, x, dim=0, start=None, end=None, step=1):
    """x[..., start:end:step] on one axis: see :func:`torchmerge.rules.slice_piece`."""
    X = list(R._tensor_arg(c, x))
    d = R._dim(dim, len(X))
    piece = R.slice_piece(c, X[d], slice(start, end, step))
    X[d] = piece if piece is not None else c.fixed(c.out_shape[d], "sliced axis")
    return X


def _index(c: Ctx, x, indices):
    """aten.index.Tensor: see :func:`torchmerge.rules.index_core`."""
    return R.index_core(c, R._tensor_arg(c, x), list(indices))


def _index_select(c: Ctx, x, dim, index):
    X = list(R._tensor_arg(c, x))
    d = R._dim(dim, len(X))
    c.freeze([X[d]], "tensor index reads these positions by value")
    X[d] = R._tensor_arg(c, index)[0]
    return X


def _split_with_sizes(c: Ctx, x, sizes, dim=0):
    return R.split(c, x, sizes, dim)


def _topk(c: Ctx, x, k, dim=-1, *a, **kw):
    return R.along_dim_order(c, x, dim)


def _flip(c: Ctx, x, dims):
    X = R._tensor_arg(c, x)
    c.freeze([X[R._dim(d, len(X))] for d in dims], "flip reverses the order along this axis")
    return X


def _sort(c: Ctx, x, dim=-1, *a, **k):
    return R.along_dim_order(c, x, dim)


def _fixed(c: Ctx, *args, **kwargs):
    """A new tensor whose values do not depend on its input's channel order (new_zeros, ...)."""
    return c.fixed_like(c.out_shape, "new tensor")


def _sdpa(c: Ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    """scaled_dot_product_attention; with ``enable_gqa`` query heads are (kv head, group member)."""
    Q, K = R._tensor_arg(c, q), R._tensor_arg(c, k)
    hq, hk = c.spaces.resolve(Q[-3]).size if len(Q) > 2 else 1, c.spaces.resolve(K[-3]).size if len(K) > 2 else 1
    if not enable_gqa or hq == hk:
        return R.sdpa(c, q, k, v, attn_mask, dropout_p, is_causal)
    V = R._tensor_arg(c, v)
    c.unify(Q[-3], Prod((K[-3], c.spaces.atom(hq // hk))), "grouped-query heads (kv head, group)")
    c.unify(K[-3], V[-3], "key/value heads")
    c.unify(Q[-1], K[-1], "query/key features")
    c.unify(K[-2], V[-2], "key/value sequence axis")
    batch = R.broadcast(c, [Q[:-3], K[:-3], V[:-3]], c.out_shape[:-3])
    if attn_mask is not None:
        mask = R._tensor_arg(c, attn_mask)
        R.broadcast(c, [batch + [Q[-3], Q[-2], K[-2]], mask], c.out_shape[:-1] + (c.shape(k)[-2],))
    return batch + [Q[-3], Q[-2], V[-1]]


def _pixel_shuffle(c: Ctx, x, r):
    X = R._tensor_arg(c, x)
    ch = len(X) - 3
    sub = (c.fixed(r, "sub-pixel position"), c.fixed(r, "sub-pixel position"))
    out_ch = c.spaces.atom(c.out_shape[ch])
    c.unify(X[ch], Prod((out_ch,) + sub), "pixel shuffle channels")
    return X[:ch] + [out_ch] + [c.fixed(s, "spatial axis") for s in c.out_shape[ch + 1:]]


def _pixel_unshuffle(c: Ctx, x, r):
    X = R._tensor_arg(c, x)
    ch = len(X) - 3
    out_ch = Prod((X[ch], c.fixed(r, "sub-pixel position"), c.fixed(r, "sub-pixel position")))
    return X[:ch] + [out_ch] + [c.fixed(s, "spatial axis") for s in c.out_shape[ch + 1:]]


def _channel_shuffle(c: Ctx, x, groups):
    """(B, g·k, ...) -> (B, k·g, ...): the channel axis is (g, k) in, (k, g) out."""
    X = R._tensor_arg(c, x)
    size = c.spaces.resolve(X[1]).size
    g, k = c.spaces.atom(groups), c.spaces.atom(size // groups)
    c.unify(X[1], Prod((g, k)), "channel shuffle groups")
    return [X[0], Prod((k, g))] + X[2:]


def _prelu(c: Ctx, x, weight):
    X, W = R._tensor_arg(c, x), R._tensor_arg(c, weight)
    if c.spaces.resolve(W[0]).size > 1:
        c.unify(X[1 if len(X) > 1 else 0], W[0], "PReLU per-channel slope")
    return X


def _max_dim(c: Ctx, x, dim=None, keepdim=False):
    return R.max_min(c, x, dim)


def _arg(c: Ctx, x, dim=None, keepdim=False):
    return R.arg_reduction(c, x, dim)


def _dropout_pair(c: Ctx, x, *a, **k):
    """native_dropout -> (output, mask): both keep the input's layout."""
    X = R._tensor_arg(c, x)
    return (X, list(X))


def _einsum(c: Ctx, equation, tensors, *a, **k):
    return R.einsum(c, equation, *tensors)


# ---------------------------------------------------------------------------------------------
# the table

_UNARY = [
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "exp",
    "log", "log1p", "expm1", "neg", "abs", "sqrt", "rsqrt", "erf", "sin", "cos", "square", "hardtanh",
    "hardtanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_",
    "elu", "elu_", "selu", "celu", "mish", "mish_", "softplus", "log_sigmoid_forward", "clamp", "clamp_",
    "clamp_min", "clamp_max", "sign", "reciprocal", "floor", "ceil", "round", "trunc", "dropout",
    "dropout_", "alpha_dropout", "feature_dropout", "feature_alpha_dropout", "contiguous", "clone",
    "detach", "alias", "lift_fresh_copy", "to", "_to_copy", "type_as", "nan_to_num", "logical_not",
    "bitwise_not", "softmax", "_softmax", "log_softmax", "_log_softmax", "exp2", "tan", "atan",
    "sinh", "cosh", "asinh", "erfc", "sgn", "threshold", "glu_backward", "softshrink", "hardshrink",
    "_safe_softmax", "isnan", "isinf", "isfinite", "relu6",
]
_BINARY = [
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum",
    "where", "masked_fill", "masked_fill_", "eq", "ne", "lt", "gt", "le", "ge", "__and__", "__or__",
    "__xor__", "bitwise_and", "bitwise_or", "logical_and", "logical_or", "logical_xor", "fmod",
    "remainder", "atan2", "addcmul", "addcdiv", "lerp", "copysign", "floor_divide", "hypot", "xlogy",
    "true_divide", "fmax", "fmin", "copy", "copy_",
]
_REDUCTIONS = ["mean", "sum", "amax", "amin", "var", "std", "logsumexp", "prod", "any", "all",
               "nansum", "nanmean", "count_nonzero"]
_RESHAPES = ["view", "reshape", "_unsafe_view", "view_copy", "flatten", "unflatten", "squeeze",
             "squeeze_", "unsqueeze", "unsqueeze_", "view_as", "reshape_as"]
_SPATIAL = ["max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
            "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
            "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
            "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d", "_upsample_nearest_exact2d",
            "_upsample_bilinear2d_aa", "lp_pool2d"]

_NAMED = {
    "linear": R._f_linear, "conv1d": R._f_conv, "conv2d": R._f_conv, "conv3d": R._f_conv,
    "convolution": _convolution, "conv_transpose1d": _conv_transpose, "conv_transpose2d": _conv_transpose,
    "conv_transpose3d": _conv_transpose, "layer_norm": _layer_norm, "native_layer_norm": _native_layer_norm,
    "rms_norm": _rms_norm, "batch_norm": _batch_norm, "_native_batch_norm_legit_no_training": _native_batch_norm,
    "native_batch_norm": _native_batch_norm, "instance_norm": _instance_norm, "group_norm": _group_norm,
    "embedding": _embedding, "matmul": R.matmul, "bmm": R.matmul, "mm": R.matmul,
    "addmm": _addmm, "baddbmm": _addmm, "einsum": _einsum, "scaled_dot_product_attention": _sdpa,
    "permute": R.permute, "transpose": R.transpose, "t": R.transpose, "swapaxes": R.transpose,
    "movedim": R.movedim, "expand": R.expand, "expand_as": R.expand, "select": _select,
    "slice": _slice, "index": _index, "index_select": _index_select, "cat": R.cat, "concat": R.cat,
    "stack": R.stack, "split": R.split,
    "split_with_sizes": _split_with_sizes, "chunk": R.split, "tensor_split": R.split, "unbind": R.unbind,
    "max": _max_dim, "min": _max_dim, "argmax": _arg, "argmin": _arg, "cumsum": R.along_dim_order,
    "cumprod": R.along_dim_order, "sort": _sort, "topk": _topk, "flip": _flip, "roll": R.roll,
    "norm": R.norm, "linalg_vector_norm": R.norm, "constant_pad_nd": R._f_pad, "pad": R._f_pad,
    "pixel_shuffle": _pixel_shuffle, "pixel_unshuffle": _pixel_unshuffle,
    "channel_shuffle": _channel_shuffle, "native_channel_shuffle": _channel_shuffle, "prelu": _prelu,
    "_prelu_kernel": _prelu, "native_dropout": _dropout_pair, "zeros_like": R.like, "ones_like": R.like,
    "full_like": R.like, "empty_like": R.like, "rand_like": R.like, "randn_like": R.like,
    "new_zeros": _fixed, "new_ones": _fixed, "new_full": _fixed, "new_empty": _fixed,
}


def _table() -> dict:
    table = {}
    groups = [(_UNARY, R.passthrough), (_BINARY, R.elementwise), (_REDUCTIONS, R.reduction),
              (_RESHAPES, R.reshape), (_SPATIAL, R._f_spatial)]
    named = [(name, rule) for names, rule in groups for name in names] + list(_NAMED.items())
    for name, rule in named:
        packet = getattr(aten, name, None)
        if packet is not None:
            table[packet] = rule
    return table


ATEN_RULES = _table()


def rule_for(target):
    """The rule of an ATen op overload (``aten.linear.default``), or None."""
    packet = getattr(target, "overloadpacket", None)
    return ATEN_RULES.get(packet) if packet is not None else None


__all__ = ["ATEN_RULES", "rule_for"]
