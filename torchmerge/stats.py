"""Streaming activation statistics gathered with forward hooks.

One machinery for every consumer that needs statistics of a model's activations:

- :class:`Moments` — per-channel count / mean / variance (variance-collapse correction, REPAIR);
- :class:`Gram` — channel × channel second moments, covariance and Pearson correlation, of one stream
  (RegMean/MaTS input Gram matrices) or of two aligned streams (``cross=True``: activation matching);
- :func:`collect` / :func:`collect_paired` — run a model (or two) over batches with hooks on chosen
  modules and stream one statistic per module.
- :func:`layer_input_grams` — the RegMean / MaTS input Gram sums ``{"<path>.weight": XᵀX}`` of every
  Linear and (unfolded) Conv layer, in the format :func:`torchmerge.methods.regmean` expects.

Numerics: every statistic keeps ``count`` (a Python int), means and *centred* co-moments
(``M2 = Σ (x - mean)(x - mean)ᵀ``) in float64 on the activation's device, and combines blocks of
samples (batches, merged stats, ranks) with Chan's parallel formula, so large means do not cancel.
:class:`Moments` reduces each batch in the activation's dtype (float32 for float32/half data) *after*
subtracting a per-channel shift close to the running mean, adds the sums to float64 accumulators and
folds them every few batches; on CPU the shift is 0 (no subtraction pass) while every channel's
|mean| stays within a few stds, checked per batch (see :class:`Moments`).  :class:`Gram` centres each
batch on its own mean in float64.  No device sync on the hot path (the CPU check is a host read).

Channel axis: all axes other than the channel axis are samples (batch, tokens, spatial).  The default
is :func:`default_channel_axis`: ``1`` for tensors with ``ndim >= 3`` produced by (or fed to)
convolution / normalisation / pooling modules (``[B, C, *spatial]``), otherwise ``-1`` (``[B, C]`` and
token layouts ``[B, T, C]``).  Pass ``channel_axis=`` (an int or a ``{name: int}`` dict) to override.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten())
>>> stats = collect(net, ["0"], [torch.randn(4, 3, 8, 8) for _ in range(3)])
>>> stats["0"].mean.shape, stats["0"].count
(torch.Size([8]), 432)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .batches import iter_calls
from .errors import TorchMergeError
from .progress import bar, batch_total
from .tree import device_of as _device_of

__all__ = [
    "Moments", "Gram", "iter_calls", "collect", "collect_paired", "default_channel_axis",
    "CHANNEL_FIRST_MODULES", "layer_input_grams", "UNFOLD_CHUNK_BYTES",
]

#: Modules whose (>= 3-d) inputs and outputs are laid out ``[B, C, *spatial]``.
CHANNEL_FIRST_MODULES: tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm, nn.LocalResponseNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)


def default_channel_axis(module: nn.Module, tensor: torch.Tensor) -> int:
    """1 for ``[B, C, *spatial]`` tensors of conv/norm/pool modules, else -1 (``[B, C]``, ``[B, T, C]``).

    >>> default_channel_axis(torch.nn.Conv2d(3, 4, 1), torch.zeros(2, 4, 5, 5))
    1
    >>> default_channel_axis(torch.nn.Linear(3, 4), torch.zeros(2, 7, 4))
    -1
    """
    return 1 if tensor.ndim >= 3 and isinstance(module, CHANNEL_FIRST_MODULES) else -1


# --------------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------------

def _samples(x: torch.Tensor, axis: int, what: str) -> tuple[int, list[int]]:
    """Normalise ``axis``; return it and the sample axes, or raise naming the shape."""
    if not isinstance(x, torch.Tensor):
        raise TorchMergeError(f"{what}: expected a Tensor, got {type(x).__name__}")
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise TorchMergeError(f"{what}: channel_axis={axis} is out of range for a tensor of shape "
                              f"{tuple(x.shape)}; pass channel_axis= (an int or a {{name: int}} dict)")
    axis %= x.ndim
    return axis, [d for d in range(x.ndim) if d != axis]


def _work(x: torch.Tensor) -> torch.Tensor:
    # float32 per-batch reductions are exact enough after centring and keep the hook one fused pass;
    # float64 data stays float64, half/bfloat16/integer data is widened to float32.
    return x.detach() if x.dtype in (torch.float32, torch.float64) else x.detach().float()


def _channel_view(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``[P, C, Q]`` with Q the contiguous trailing sample axes (Q = 1 when channels are innermost
    in memory: ``[B, T, C]``, channels_last conv outputs) — a view whenever the layout allows."""
    last = x.movedim(axis, -1)
    if last.is_contiguous():
        return last.reshape(-1, x.shape[axis], 1)
    return x.reshape(math.prod(x.shape[:axis]), x.shape[axis], -1)


class _Scratch:
    """One reusable work buffer: fresh activation-sized allocations (page faults on CPU) cost more
    than the arithmetic. :func:`collect` shares one between all its sites (they run one at a time)."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def like(self, v: torch.Tensor) -> torch.Tensor:
        b = self.buf
        if b is None or b.numel() < v.numel() or b.dtype != v.dtype or b.device != v.device:
            b = self.buf = torch.empty(v.numel(), dtype=v.dtype, device=v.device)
        return b[: v.numel()].view(v.shape)


def _shifted_sums(v: torch.Tensor, shift: torch.Tensor | None, scratch: _Scratch) -> torch.Tensor:
    """``[2, C]`` (v's dtype): Σ(x − s) and Σ(x − s)² over the samples of ``v = [P, C, Q]``
    (``shift=None``: s = 0 — two reads of ``v``, no subtraction pass and no write)."""
    # centring before squaring is what keeps float32 sums exact enough
    d = v if shift is None else torch.sub(v, shift.view(1, -1, 1), out=scratch.like(v))
    if d.shape[2] == 1:
        d = d.squeeze(2)
        return torch.stack([d.sum(0), torch.linalg.vector_norm(d, dim=0).square_()])
    # contiguous per-row reductions are several times faster on CPU than a strided one; the row
    # norm gives Σd² in one read, without a squared copy
    return torch.stack([d.sum(2), torch.linalg.vector_norm(d, dim=2).square_()]).sum(1)


def _well_conditioned(block: torch.Tensor, n: int, factor: float) -> bool:
    """Whether Σx² ≤ factor · Σ(x − x̄)² for every channel of a ``[2, C]`` block of raw sums: then the
    rounding error of the raw sums is at most ~factor·eps relative to the centred M2 (host read)."""
    t1, t2 = block
    return bool((t2 <= (t2 - t1 * t1 / n) * factor).all())


class Centred(NamedTuple):
    """A batch of activations as ``[P, C, Q]``, centred on its float64 per-channel ``mean``."""

    v: torch.Tensor
    mean: torch.Tensor
    n: int


def _centred(x, axis: int, what: str) -> Centred:
    """``x`` as a ``[P, C, Q]`` view (no transposing copy) centred on its own per-channel mean, in
    float32 (float64 data stays float64); the mean in float64. A :class:`Centred` passes through."""
    if isinstance(x, Centred):
        return x
    axis, _ = _samples(x, axis, what)
    v = _channel_view(_work(x), axis)
    n = v.shape[0] * v.shape[2]
    mean = _channel_sum(v) / max(n, 1)
    return Centred(v - mean.to(v.dtype)[None, :, None], mean, n)


def _channel_sum(v: torch.Tensor) -> torch.Tensor:
    """Σ over samples of a ``[P, C, Q]`` view, as float64 ``[C]``: the contiguous Q axis first, then
    P (float32 partial sums of centred data are exact enough; a strided float64 reduction is ~5x
    slower)."""
    return v.sum(2).sum(0).double()


def _as_rows(v: torch.Tensor) -> torch.Tensor:
    """A ``[P, C, Q]`` view as ``[P·Q, C, 1]`` rows, samples in the same (lexicographic) order."""
    return v.transpose(1, 2).reshape(-1, v.shape[1], 1)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_samples a bᵀ for ``[P, C, Q]`` and ``[P, D, Q]`` views: one matmul (Q = 1) or one batched
    matmul over P (no transposing copy), float32 products summed into float64."""
    if a.shape[2] == 1 and b.shape[2] == 1:
        return (a[:, :, 0].T @ b[:, :, 0]).double()
    return torch.bmm(a, b.transpose(1, 2)).sum(0).double()


def _outer(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a * b if like.ndim == 1 else torch.outer(a, b)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo/mpi are happy with CPU tensors.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Streaming:
    """Chan-mergeable state: ``count``, means ``[μ_0, μ_1, …]`` and centred co-moments.

    ``_PAIRS[k] = (i, j)`` says co-moment ``k`` is Σ (x_i − μ_i)(x_j − μ_j)ᵀ (elementwise when 1-d).
    """

    _PAIRS: tuple[tuple[int, int], ...] = ()

    def __init__(self) -> None:
        self._n = 0
        self._means: list[torch.Tensor] | None = None
        self._co: list[torch.Tensor] | None = None

    @property
    def count(self) -> int:
        """Number of samples seen (rows after moving the channel axis last and flattening)."""
        self._flush()
        return self._n

    # -- merging --------------------------------------------------------------------------------
    def _absorb(self, n: int, means: list[torch.Tensor], co: list[torch.Tensor]) -> None:
        """Fold in a block of ``n`` samples given its (fresh, float64) means and co-moments."""
        if n == 0:
            return
        if self._means is None:
            self._n, self._means, self._co = n, means, co
            return
        self._check_shapes([m.shape for m in means], type(self).__name__ + ".merge")
        dev = self._means[0].device
        means, co = [m.to(dev) for m in means], [c.to(dev) for c in co]
        total = self._n + n
        deltas = [m - mine for m, mine in zip(means, self._means)]
        weight = self._n * n / total  # Chan et al.: M2 = M2_a + M2_b + δδᵀ n_a n_b / n
        for k, (i, j) in enumerate(self._PAIRS):
            self._co[k] += co[k] + _outer(deltas[i], deltas[j], co[k]) * weight
        for mine, d in zip(self._means, deltas):
            mine += d * (n / total)
        self._n = total

    def _check_shapes(self, shapes: list[torch.Size], what: str) -> None:
        mine = [m.shape for m in self._means]
        if list(shapes) != mine:
            raise TorchMergeError(f"{what}: channel counts {[tuple(s) for s in shapes]} do not match "
                                  f"the ones accumulated so far {[tuple(s) for s in mine]}")

    def merge(self, other: "_Streaming") -> "_Streaming":
        """Fold ``other`` (same type, same channels) into ``self``; returns ``self``."""
        if type(other) is not type(self) or getattr(other, "cross", None) != getattr(self, "cross", None):
            raise TorchMergeError(f"cannot merge {other!r} into {self!r}")
        self._flush()
        other._flush()
        if other._means is not None:
            self._absorb(other._n, [m.clone() for m in other._means], [c.clone() for c in other._co])
        return self

    # -- distributed ----------------------------------------------------------------------------
    def all_reduce(self) -> "_Streaming":
        """Make every rank hold the statistics of the union of all ranks' data (no-op when
        ``torch.distributed`` is not initialised). Collective: every rank must call it.
        Also finalises buffered sums and frees work buffers (``collect`` calls it at the end)."""
        self._flush()
        self._release()
        if not _dist_ready():
            return self
        dist, dev = torch.distributed, _comm_device()
        self._init_empty(dev)
        home = self._means[0].device
        n = float(self._n)
        means = [m.to(dev) for m in self._means]
        # 1) global count and mean: Σ n_r μ_r / Σ n_r
        packed = torch.cat([torch.tensor([n], dtype=torch.float64, device=dev)] + [m * n for m in means])
        dist.all_reduce(packed)
        total = packed[0].item()
        sums = packed[1:].split([m.numel() for m in means])
        gmeans = [s / total if total > 0 else s for s in sums]
        # 2) co-moments about the *global* mean: Σ_r [M2_r + n_r (μ_r − μ)(μ_r − μ)ᵀ] — no cancellation
        deltas = [m - g for m, g in zip(means, gmeans)]
        co = [c.to(dev) + _outer(deltas[i], deltas[j], c) * n
              for c, (i, j) in zip(self._co, self._PAIRS)]
        flat = torch.cat([c.flatten() for c in co])
        dist.all_reduce(flat)
        self._n = int(round(total))
        self._means = [g.to(home) for g in gmeans]
        self._co = [f.view_as(c).to(home) for f, c in zip(flat.split([c.numel() for c in co]), co)]
        return self

    def _init_empty(self, dev: torch.device) -> None:
        """Agree on channel counts across ranks so a rank that saw no data can still take part."""
        k = max(i for pair in self._PAIRS for i in pair) + 1
        sizes = torch.tensor([m.numel() for m in self._means] if self._means is not None else [0] * k,
                             dtype=torch.float64, device=dev)
        mine = sizes.clone()
        torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
        if self._means is None:
            self._means = [torch.zeros(int(s), dtype=torch.float64, device=dev) for s in sizes.tolist()]
            self._co = [torch.zeros(self._co_shape(i, j), dtype=torch.float64, device=dev)
                        for i, j in self._PAIRS]
        elif not torch.equal(mine, sizes):
            raise TorchMergeError(f"{type(self).__name__}.all_reduce: this rank has channel counts "
                                  f"{mine.tolist()}, another has {sizes.tolist()}")

    def _co_shape(self, i: int, j: int) -> tuple[int, ...]:
        n_i, n_j = self._means[i].numel(), self._means[j].numel()
        return (n_i,) if i == j and self._co_is_vector(i, j) else (n_i, n_j)

    def _co_is_vector(self, i: int, j: int) -> bool:
        return True

    def _flush(self) -> None:
        """Fold any buffered hot-path sums into (count, means, co-moments)."""

    def _release(self) -> None:
        """Free work buffers (they are re-created on the next update)."""

    def _need(self, what: str) -> None:
        self._flush()
        if self._means is None:
            raise TorchMergeError(f"{type(self).__name__}.{what}: no data accumulated yet "
                                  "(call update() or collect() first)")


class Moments(_Streaming):
    """Streaming per-channel count, mean and variance (float64 on the activation's device).

    Hot path (one hook call): subtract a per-channel shift (≈ the running mean), then two fast
    contiguous sums, Σ(x − s) and Σ(x − s)², added to float64 accumulators — no host sync. Every
    ``FOLD_EVERY`` batches (and before any read) the block is folded into (mean, M2) with Chan's
    formula and the shift moves to the new mean, so the sums stay centred even if the data drift.

    CPU fast path: when every channel's |mean| is within a few standard deviations (Σx² ≤
    ``RAW_FACTOR`` · M2, the usual case for activations), the shift is 0 and the subtraction pass
    (a full read and write of the activation) is skipped; each such batch is checked (a free host
    read on CPU) and recomputed with a shift if it is not well conditioned, so the rounding error
    stays ≲ ``RAW_FACTOR`` · eps relative to the variance. CUDA tensors always take the shifted path.

    >>> m = Moments()
    >>> for chunk in torch.arange(12.).view(3, 2, 2):       # 3 batches of [B=2, C=2]
    ...     _ = m.update(chunk, channel_axis=-1)
    >>> m.count, m.mean.tolist(), [round(v, 4) for v in m.var.tolist()]
    (6, [5.0, 6.0], [11.6667, 11.6667])
    """

    _PAIRS = ((0, 0),)
    FOLD_EVERY = 32
    RAW_FACTOR = 32.0

    def __init__(self, scratch: _Scratch | None = None) -> None:
        super().__init__()
        self._scratch = scratch if scratch is not None else _Scratch()
        self._shift: torch.Tensor | None = None   # [C], work dtype
        self._sums: torch.Tensor | None = None    # [2, C] float64: Σ(x − s), Σ(x − s)² since last fold
        self._pending = (0, 0)                     # (samples, batches) in _sums
        self._raw = False                          # shift is 0 and skipped (CPU fast path)
        self._last = None                          # (n, shift, [2, C] sums) of the latest batch

    def update(self, x: torch.Tensor, channel_axis: int = -1) -> "Moments":
        """Add the samples of ``x`` (every axis except ``channel_axis`` is a sample axis)."""
        axis, _ = _samples(x, channel_axis, "Moments.update")
        c = x.shape[axis]
        n = x.numel() // max(c, 1)
        if n == 0:
            return self
        v = _channel_view(_work(x), axis)
        if self._shift is None:
            self._raw = v.device.type == "cpu"   # try the unshifted fast path first
            self._shift = v.new_zeros(c) if self._raw else v.mean((0, 2))  # a centre for the first block
        elif self._shift.numel() != c:
            raise TorchMergeError(f"Moments.update: tensor of shape {tuple(x.shape)} has {c} channels "
                                  f"on axis {axis}; earlier batches had {self._shift.numel()}")
        if self._shift.dtype != v.dtype:
            self._shift = self._shift.to(v.dtype)
        if self._raw:
            block = _shifted_sums(v, None, self._scratch)
            if not _well_conditioned(block, n, self.RAW_FACTOR):  # mean ≫ std: redo it centred
                self._flush()
                self._raw, self._shift = False, block[0] / n
                block = _shifted_sums(v, self._shift, self._scratch)
        else:
            block = _shifted_sums(v, self._shift, self._scratch)  # per batch in v's dtype
        self._last = (n, self._shift, block)
        self._sums = block.double() if self._sums is None else self._sums.add_(block)
        self._pending = (self._pending[0] + n, self._pending[1] + 1)
        if self._pending[1] >= self.FOLD_EVERY:
            self._flush()
        return self

    def _flush(self) -> None:
        n = self._pending[0]
        if n == 0:
            return
        t1, t2 = self._sums
        mean = self._shift.double() + t1 / n
        m2 = (t2 - t1.square() / n).clamp_min_(0)  # centred sums: tiny cancellation only
        self._sums, self._pending = None, (0, 0)
        self._absorb(n, [mean], [m2])
        mean, m2 = self._means[0], self._co[0]
        # back to (or stay on) the unshifted CPU path when the running mean is within a few stds
        self._raw = mean.device.type == "cpu" and bool(
            (mean.square() * self._n <= m2 * (self.RAW_FACTOR - 1)).all())
        self._shift = torch.zeros_like(mean, dtype=self._shift.dtype) if self._raw else \
            mean.to(self._shift.dtype, copy=True)

    def _release(self) -> None:
        self._scratch.buf = None

    def last_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, population variance), float64 ``[C]``, of the latest ``update``'s batch alone, from
        the sums that update took (no second pass over the activation)."""
        if self._last is None:
            raise TorchMergeError("Moments.last_batch: no data accumulated yet (call update() first)")
        n, shift, (t1, t2) = self._last
        t1, t2 = t1.double() / n, t2.double() / n
        return shift.double() + t1, (t2 - t1.square()).clamp_min_(0)

    def mapped(self, scale: torch.Tensor, shift: torch.Tensor) -> "Moments":
        """The moments of ``scale · x + shift`` (per channel, float64 ``[C]``), exactly: a new
        :class:`Moments` (e.g. a BatchNorm's output from its input's)."""
        self._need("mapped")
        out = Moments()
        out._n, out._means = self._n, [self._means[0] * scale + shift]
        out._co = [self._co[0] * scale.square()]
        return out

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean, float64 ``[C]``."""
        self._need("mean")
        return self._means[0]

    @property
    def var(self) -> torch.Tensor:
        """Per-channel population variance (divides by ``count``), float64 ``[C]``."""
        self._need("var")
        return self._co[0] / max(self._n, 1)

    @property
    def std(self) -> torch.Tensor:
        """Per-channel population standard deviation, float64 ``[C]``."""
        return self.var.sqrt()

    def __repr__(self) -> str:
        c = None if self._shift is None else self._shift.numel()
        return f"Moments(count={self._n + self._pending[0]}, channels={c})"


def shared_moments(names) -> dict:
    """One :class:`Moments` per name, sharing one work buffer: sites of one forward update one at
    a time, and a buffer per site would hold a whole forward's activations.

    >>> stats = shared_moments(["a", "b"])
    >>> _ = stats["a"].update(torch.full((4, 2), 3.0)), stats["b"].update(torch.arange(12.0).view(4, 3))
    >>> stats["a"].mean.tolist(), stats["b"].mean.tolist()
    ([3.0, 3.0], [4.5, 5.5, 6.5])
    """
    scratch = _Scratch()
    return {name: Moments(scratch) for name in names}


class Gram(_Streaming):
    """Streaming channel × channel second moments of one stream, or of two aligned ones (``cross``).

    Single stream: ``update(x)``; :meth:`second_moment` is E[x xᵀ] (RegMean's Gram is
    ``count * second_moment()`` = XᵀX), :meth:`covariance` and :meth:`correlation` are C × C.
    Cross mode: ``update(x, y=y)`` with the same samples in both; ``second_moment`` is E[x yᵀ],
    ``covariance``/``correlation`` are Cx × Cy cross matrices (activation matching, ZipIt!).

    >>> g = Gram(cross=True)
    >>> x = torch.randn(100, 3, dtype=torch.float64)
    >>> _ = g.update(x, y=-2 * x[:, [2, 0, 1]])
    >>> (g.correlation() < -0.999).nonzero().tolist()     # x_0 ~ y_1, x_1 ~ y_2, x_2 ~ y_0
    [[0, 1], [1, 2], [2, 0]]
    """

    def __init__(self, cross: bool = False) -> None:
        super().__init__()
        self.cross = bool(cross)
        # means [μx(, μy)]; co-moments [Cxx] or [Cxy, diag Cxx, diag Cyy]
        self._PAIRS = ((0, 1), (0, 0), (1, 1)) if self.cross else ((0, 0),)

    def _co_is_vector(self, i: int, j: int) -> bool:
        return self.cross  # cross mode keeps only the diagonals of Cxx and Cyy

    def update(self, x: torch.Tensor, channel_axis: int = -1, y: torch.Tensor | None = None,
               y_channel_axis: int | None = None) -> "Gram":
        """Add samples of ``x`` (and of the aligned ``y`` in cross mode). Per batch in float64."""
        xc, mx, n = _centred(x, channel_axis, "Gram.update(x)")
        if not self.cross:
            if y is not None:
                raise TorchMergeError("Gram.update: y= given but this Gram was built with cross=False")
            self._absorb(n, [mx], [_cross(xc, xc)])
            return self
        if y is None:
            raise TorchMergeError("Gram.update: cross=True needs y= (the aligned second stream)")
        yc, my, ny = _centred(y, channel_axis if y_channel_axis is None else y_channel_axis,
                              "Gram.update(y)")
        if n == ny and (xc.shape[0], xc.shape[2]) != (yc.shape[0], yc.shape[2]):
            xc, yc = _as_rows(xc), _as_rows(yc)  # different layouts, same sample order: as rows
        if n != ny:
            raise TorchMergeError(f"Gram.update: x of shape {tuple(xc.shape)} ([P, C, Q]) and y of "
                                  f"shape {tuple(y.shape)} have {n} vs {ny} samples; "
                                  "cross statistics need the same samples in both streams")
        yc = yc.to(xc.device, xc.dtype)
        squares = [_channel_sum(v.square()) for v in (xc, yc)]
        self._absorb(n, [mx, my.to(mx.device)], [_cross(xc, yc), *squares])
        return self

    @property
    def mean(self) -> torch.Tensor:
        """Mean of x, float64 ``[Cx]``."""
        self._need("mean")
        return self._means[0]

    @property
    def mean_y(self) -> torch.Tensor:
        """Mean of y (cross mode), float64 ``[Cy]``."""
        self._need("mean_y")
        return self._means[1 if self.cross else 0]

    @property
    def var(self) -> torch.Tensor:
        """Population variance of x, float64 ``[Cx]``."""
        self._need("var")
        return (self._co[1] if self.cross else self._co[0].diagonal()) / max(self._n, 1)

    @property
    def var_y(self) -> torch.Tensor:
        """Population variance of y (cross mode), float64 ``[Cy]``."""
        self._need("var_y")
        return (self._co[2] if self.cross else self._co[0].diagonal()) / max(self._n, 1)

    def covariance(self) -> torch.Tensor:
        """Population (cross-)covariance, float64 ``[Cx, Cx]`` or ``[Cx, Cy]``."""
        self._need("covariance")
        return self._co[0] / max(self._n, 1)

    def second_moment(self) -> torch.Tensor:
        """E[x xᵀ] (or E[x yᵀ] in cross mode), float64."""
        return self.covariance() + torch.outer(self.mean, self.mean_y)

    def correlation(self, eps: float = 1e-8) -> torch.Tensor:
        """Pearson (cross-)correlation; dead units (std product < ``eps``) get correlation ~0."""
        denom = torch.outer(self.var.sqrt(), self.var_y.sqrt()).clamp_min(eps)
        return self.covariance() / denom

    def __repr__(self) -> str:
        shape = None if self._co is None else tuple(self._co[0].shape)
        return f"Gram(cross={self.cross}, count={self._n}, shape={shape})"


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[[], Any]] = {"moments": Moments, "gram": Gram}


def _resolve_targets(model: nn.Module, targets: Any) -> dict[str, nn.Module]:
    """``{name: module}`` from a dict, a name, a list of names, or module type(s) to select."""
    if isinstance(targets, type) or (isinstance(targets, tuple) and targets
                                     and all(isinstance(t, type) for t in targets)):
        return {n: m for n, m in model.named_modules() if n and isinstance(m, targets)}
    if isinstance(targets, str):
        targets = [targets]
    items = targets.items() if isinstance(targets, Mapping) else ((t, t) for t in targets)
    out = {}
    for name, mod in items:
        if isinstance(mod, str):
            try:
                mod = model.get_submodule(mod)
            except AttributeError:
                known = [n for n, _ in model.named_modules() if n][:12]
                raise TorchMergeError(f"{type(model).__name__} has no submodule {mod!r}; "
                                      f"known names start with {known}") from None
        if not isinstance(mod, nn.Module):
            raise TorchMergeError(f"target {name!r} is a {type(mod).__name__}, not an nn.Module")
        out[str(name)] = mod
    return out


def _factory(stat: Any) -> Callable[[], Any]:
    if isinstance(stat, str):
        if stat not in _FACTORIES:
            raise TorchMergeError(f"stat={stat!r}; expected one of {list(_FACTORIES)} or a callable "
                                  "returning an object with update(tensor, channel_axis)")
        return _FACTORIES[stat]
    if not callable(stat):
        raise TorchMergeError(f"stat must be 'moments', 'gram' or a callable, got {type(stat).__name__}")
    return stat


def _axis_for(name: str, module: nn.Module, x: torch.Tensor, channel_axis: Any) -> int:
    if isinstance(channel_axis, Mapping):
        channel_axis = channel_axis.get(name)
    return default_channel_axis(module, x) if channel_axis is None else int(channel_axis)


def _pick(value: Any, name: str, where: str) -> torch.Tensor:
    """The tensor a hook sees: the output (first element of a tuple output) or the first input."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TorchMergeError(f"module {name!r}: its {where} is a {type(value).__name__}, not a Tensor; "
                              f"hook a submodule whose {where} is a Tensor")
    return value


@contextlib.contextmanager
def _hooked(modules: dict[str, nn.Module], where: str, fn: Callable[[str, nn.Module, torch.Tensor], None]):
    """Register one hook per module; always removed on exit (also when a forward raises)."""
    if where not in ("output", "input"):
        raise TorchMergeError(f"where={where!r}; expected 'output' or 'input'")
    handles = []
    try:
        for name, mod in modules.items():
            if where == "output":
                hook = (lambda n, m: lambda _m, _a, out: fn(n, m, _pick(out, n, "output")))(name, mod)
                handles.append(mod.register_forward_hook(hook))
            else:  # pre-hook: sees the input before an in-place module (ReLU(inplace=True)) edits it
                hook = (lambda n, m: lambda _m, args: fn(n, m, _pick(args, n, "input")))(name, mod)
                handles.append(mod.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _mode(models: list[nn.Module], train_mode: bool):
    """no_grad + eval (or train) mode; every submodule's own ``training`` flag restored on exit."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.train(train_mode)
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _progress(it: Iterable, enabled: bool | None, batches: Any, max_batches: int | None,
              desc: str = "torchmerge stats") -> Iterable:
    """A bar over a pass (:func:`torchmerge.progress.bar`; ``enabled`` None: the caller's setting)."""
    return bar(it, desc, total=batch_total(batches, max_batches), progress=enabled)


def _finish(stats: dict[str, Any]) -> dict[str, Any]:
    for s in stats.values():  # fixed (target) order: identical collective sequence on every rank
        if hasattr(s, "all_reduce"):
            s.all_reduce()
    return stats


def collect(model: nn.Module, targets: Any, batches: Iterable[Any], stat: Any = "moments", *,
            where: str = "output", channel_axis: int | Mapping[str, int] | None = None,
            max_batches: int | None = None, device: torch.device | str | None = None,
            progress: bool | None = None, train_mode: bool = False) -> dict[str, Any]:
    """Stream a statistic of each target module's output (or first input) over ``batches``.

    ``targets``: ``{name: module}``, module names of ``model``, or module type(s) to select.
    ``stat``: ``"moments"`` (:class:`Moments`), ``"gram"`` (:class:`Gram`) or a zero-argument
    callable returning an object with ``update(tensor, channel_axis)`` (and optionally ``all_reduce()``).
    Runs under ``torch.no_grad()`` in eval mode (``train_mode=True``: train mode, which also updates
    BatchNorm running statistics); training flags are restored and hooks removed even on error.
    Inputs go to ``device`` (default: the model's). Stats are all-reduced across ranks at the end.

    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU())
    >>> out = collect(net, {"fc": net[0]}, [torch.randn(8, 4)] * 2, stat="gram", where="input")
    >>> out["fc"].second_moment().shape
    torch.Size([4, 4])
    """
    modules, make = _resolve_targets(model, targets), _factory(stat)
    _check_axis_keys(channel_axis, modules)
    # Moments of sites that run one at a time share one work buffer
    stats = shared_moments(modules) if make is Moments else {name: make() for name in modules}

    def hook(name: str, module: nn.Module, x: torch.Tensor) -> None:
        stats[name].update(x, _axis_for(name, module, x, channel_axis))

    device = device if device is not None else _device_of(model)
    with _hooked(modules, where, hook), _mode([model], train_mode):
        for inputs in _progress(iter_calls(batches, max_batches, device), progress, batches, max_batches):
            inputs(model)
    return _finish(stats)


def _check_axis_keys(channel_axis: Any, *module_dicts: dict[str, nn.Module]) -> None:
    if isinstance(channel_axis, Mapping):
        unknown = set(channel_axis) - {n for d in module_dicts for n in d}
        if unknown:
            raise TorchMergeError(f"channel_axis names {sorted(unknown)} are not among the targets "
                                  f"{sorted(module_dicts[0])}")


def collect_paired(model_a: nn.Module, model_b: nn.Module, targets_a: Any, targets_b: Any,
                   batches: Iterable[Any], *, where: str = "output",
                   channel_axis: int | Mapping[str, int] | None = None, max_batches: int | None = None,
                   progress: bool | None = None, train_mode: bool = False) -> dict[str, Gram]:
    """Cross statistics (:class:`Gram` with ``cross=True``) between corresponding sites of two models.

    ``model_b`` may be a list of models: model A then runs once per batch for all of them, and a
    list of result dicts (one per model B) is returned.

    ``targets_a``/``targets_b`` are resolved like :func:`collect`'s ``targets`` and paired in order
    (``targets_b=None``: the same names in ``model_b``). Results are keyed by ``targets_a``'s names;
    ``x`` is model A's activation, ``y`` model B's. Each model gets the inputs on its own device.

    >>> a = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU())
    >>> b = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> out = collect_paired(a, b, ["0"], None, [torch.randn(16, 4) for _ in range(2)])
    >>> out["0"].correlation().shape
    torch.Size([5, 3])
    """
    mods_a = _resolve_targets(model_a, targets_a)
    many = isinstance(model_b, (list, tuple))
    models_b = list(model_b) if many else [model_b]
    mods_bs = [_resolve_targets(m, list(mods_a) if targets_b is None else targets_b) for m in models_b]
    for mods_b in mods_bs:
        if len(mods_a) != len(mods_b):
            raise TorchMergeError(f"collect_paired: {len(mods_a)} targets in model_a but {len(mods_b)} "
                                  f"in model_b ({list(mods_a)} vs {list(mods_b)})")
    _check_axis_keys(channel_axis, mods_a)
    stats = [{name: Gram(cross=True) for name in mods_a} for _ in models_b]
    pending: dict[str, list] = {name: [] for name in mods_a}  # this batch's model-A activations
    used: dict[str, int] = {}  # how many of them the running model B has consumed

    running_a = [False]  # model A may also be a model B (the same module): record only its own run

    def hook_a(name: str, module: nn.Module, x: torch.Tensor) -> None:
        # centred at once: a new tensor, so a later in-place op in model A (ReLU(inplace=True))
        # cannot overwrite it, and no extra copy is kept
        if running_a[0]:
            axis = _axis_for(name, module, x, channel_axis)
            pending[name].append((_centred(x, axis, "collect_paired (model_a)"), axis))

    def hook_b(k: int, name: str, name_b: str, module: nn.Module, y: torch.Tensor) -> None:
        if running_a[0]:
            return  # the same module is hooked for A too: this is A's run
        i = used.get(name, 0)
        if i >= len(pending[name]):
            raise TorchMergeError(f"collect_paired: module {name_b!r} of model_b ran more often than "
                                  f"{name!r} of model_a (output shape {tuple(y.shape)})")
        used[name] = i + 1
        x, axis = pending[name][i]
        stats[k][name].update(x, axis, y=y, y_channel_axis=_axis_for(name, module, y, channel_axis))

    hooks = [_hooked(mods_b, where, _for_model(hook_b, k, dict(zip(mods_b, mods_a))))
             for k, mods_b in enumerate(mods_bs)]
    devices = [_device_of(m) for m in models_b]
    with _hooked(mods_a, where, hook_a), contextlib.ExitStack() as stack, \
            _mode([model_a, *models_b], train_mode):
        for h in hooks:
            stack.enter_context(h)
        for inputs in _progress(iter_calls(batches, max_batches), progress, batches, max_batches,
                                "torchmerge paired stats"):
            running_a[0] = True
            try:
                inputs.to(_device_of(model_a))(model_a)  # once, however many models B
            finally:
                running_a[0] = False
            for model, dev in zip(models_b, devices):
                used.clear()
                inputs.to(dev)(model)
                _check_drained(pending, used)
            for q in pending.values():
                q.clear()
    done = [_finish(st) for st in stats]
    return done if many else done[0]


def _for_model(hook_b, k: int, b_to_a: dict):
    return lambda name_b, module, y: hook_b(k, b_to_a[name_b], name_b, module, y)


def _check_drained(pending: dict[str, list], used: dict[str, int]) -> None:
    left = {name: len(q) - used.get(name, 0) for name, q in pending.items() if len(q) > used.get(name, 0)}
    if left:
        for q in pending.values():
            q.clear()
        raise TorchMergeError(f"collect_paired: sites {sorted(left)} of model_a ran without a matching "
                              "call of the paired model_b module in the same batch")


# --------------------------------------------------------------------------------------------------
# Input Gram matrices for RegMean / MaTS
# --------------------------------------------------------------------------------------------------

#: Upper bound (bytes) on one block of unfolded conv patches (or Linear rows) materialised at a time.
UNFOLD_CHUNK_BYTES = 256 * 2**20

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _gram_width(module: nn.Module) -> int | None:
    """d of the module's input Gram, or None when it gets no entry (grouped / transposed / padded
    with a mode other than zeros / lazy / not a Linear or Conv)."""
    if isinstance(module, nn.Linear) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return module.in_features
    if isinstance(module, _CONVS) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        if module.transposed or module.groups != 1 or module.padding_mode != "zeros":
            return None
        return module.in_channels * math.prod(module.kernel_size)
    return None


def _conv_pads(conv: nn.Module) -> list[int]:
    """``[left_0, right_0, left_1, …]`` zero padding per spatial dim (``'same'``: extra on the right,
    as PyTorch does)."""
    pads = []
    for i, (k, d) in enumerate(zip(conv.kernel_size, conv.dilation)):
        if conv.padding == "valid":
            lo = hi = 0
        elif conv.padding == "same":
            total = d * (k - 1)
            lo, hi = total // 2, total - total // 2
        else:
            lo = hi = conv.padding[i]
        pads += [lo, hi]
    return pads


def _patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """View ``[B, *L, C, *k]`` of ``x`` ``[B, C, *spatial]``: the input patch of every output position,
    so that ``patches.reshape(-1, d) @ W.reshape(out, -1).T + b`` is the conv's output (channels last)."""
    ns = len(conv.kernel_size)
    pads = _conv_pads(conv)
    if any(pads):  # F.pad wants the last dim's pair first
        x = torch.nn.functional.pad(x, [p for i in reversed(range(ns)) for p in pads[2 * i: 2 * i + 2]])
    for i, (k, s, d) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends a window axis of length d(k-1)+1
        if d > 1:
            x = x[..., ::d]
    # [B, C, *L, *k] → [B, *L, C, *k]
    return x.movedim(1, 1 + ns)


def _add_rows(acc: torch.Tensor, rows: torch.Tensor) -> None:
    """acc (float64) += rowsᵀ rows; the product in float32 (float64 for float64 data)."""
    rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    acc.add_(rows.T @ rows if rows.dtype == torch.float64 else (rows.T @ rows).double())


def _accumulate_input_gram(module: nn.Module, d: int, x: torch.Tensor, acc: torch.Tensor,
                           name: str, budget: int) -> int:
    """Add one input's XᵀX to ``acc``; return the number of rows (samples) added."""
    x = x.detach()
    rows_per_block = max(1, budget // (d * max(x.element_size(), 4)))
    if isinstance(module, nn.Linear):
        if x.shape[-1] != d:
            raise TorchMergeError(f"layer_input_grams: input of Linear {name!r} has shape "
                                  f"{tuple(x.shape)}; expected last dim in_features={d}")
        rows = x.reshape(-1, d)
        for block in rows.split(rows_per_block):
            _add_rows(acc, block)
        return rows.shape[0]
    ns = len(module.kernel_size)
    if x.ndim == ns + 1:  # unbatched [C, *spatial]
        x = x.unsqueeze(0)
    if x.ndim != ns + 2 or x.shape[1] != module.in_channels:
        raise TorchMergeError(f"layer_input_grams: input of {type(module).__name__} {name!r} has shape "
                              f"{tuple(x.shape)}; expected [B, {module.in_channels}, *spatial({ns})]")
    p = _patches(module, x)                                # [B, *L, C, *k] view
    per_sample = math.prod(p.shape[1: 1 + ns])
    if per_sample <= rows_per_block:                       # whole samples per block
        for block in p.split(max(1, rows_per_block // max(per_sample, 1))):
            _add_rows(acc, block.reshape(-1, d))
    else:                                                  # one sample, slices of the first output axis
        step = max(1, rows_per_block // max(1, per_sample // p.shape[1]))
        for sample in p.split(1):
            for block in sample.split(step, dim=1):
                _add_rows(acc, block.reshape(-1, d))
    return p.shape[0] * per_sample


def _gram_sites(model: nn.Module, layers: Iterable[str] | None) -> dict[nn.Module, tuple[list[str], int]]:
    """``{module: ([paths…], d)}`` for every supported module (every alias path of shared modules)."""
    by_path = dict(model.named_modules(remove_duplicate=False))
    if layers is not None:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        chosen = []
        for path in wanted:
            if not isinstance(path, str):
                raise TorchMergeError(f"layer_input_grams: layers must be module paths (str); got "
                                      f"{type(path).__name__} {path!r}")
            if path not in by_path and path.endswith(".weight") and path[:-7] in by_path:
                path = path[:-7]  # a Gram key ("fc.weight") names its module
            if path not in by_path:
                known = [n for n, m in by_path.items() if n and _gram_width(m) is not None][:12]
                raise TorchMergeError(f"layer_input_grams: {type(model).__name__} has no submodule "
                                      f"{path!r}; Linear/Conv paths start with {known}")
            chosen.append(path)
        by_path = {p: by_path[p] for p in chosen}
    sites: dict[nn.Module, tuple[list[str], int]] = {}
    for path, mod in by_path.items():
        d = _gram_width(mod)
        if d is not None:
            sites.setdefault(mod, ([], d))[0].append(path)
    return sites


def layer_input_grams(model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None,
                      layers: Iterable[str] | None = None, device: torch.device | str | None = None,
                      progress: bool | None = None) -> dict[str, torch.Tensor]:
    """RegMean / MaTS input Gram matrices ``{"<module path>.weight": XᵀX}`` of a model over ``batches``
    (the state-dict key of each weight; ``"weight"`` when ``model`` itself is the layer).

    X is the input of every ``nn.Linear`` (rows: all leading axes, e.g. batch × tokens; d =
    ``in_features``) and of every ``nn.Conv1d/2d/3d`` with ``groups == 1`` and zero padding (rows:
    output positions; columns: the unfolded input patch with the conv's padding, stride and dilation,
    d = ``in_channels · prod(kernel_size)`` — the X with ``conv(x) = X @ W.reshape(out, -1).T + b``).
    Grouped, transposed and non-zero-padded convs (and modules that never ran) get no entry.
    ``G`` is the **sum** over all samples (not the mean), float32 ``[d, d]`` on the model's device,
    accumulated in float64 (per-block products in float32 for float32/half data). ``layers``
    restricts to these module paths. Runs under ``no_grad`` in eval mode (flags restored, hooks
    removed even on error); inputs go to ``device`` (default: the model's); conv patches are
    unfolded in blocks of at most ``UNFOLD_CHUNK_BYTES``. Summed across ranks under
    ``torch.distributed``. Shared modules get one entry per path.

    >>> import torch
    >>> from torchmerge.methods import regmean
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 8 * 8, 2))
    >>> grams = layer_input_grams(net, [torch.randn(5, 3, 8, 8) for _ in range(2)])
    >>> {k: tuple(g.shape) for k, g in grams.items()}
    {'0.weight': (27, 27), '2.weight': (256, 256)}
    >>> x = torch.randn(6, 3, 8, 8)
    >>> bool(torch.isclose(layer_input_grams(net, x)["0.weight"][0, 0], x[:, 0, :-1, :-1].square().sum()))
    True
    >>> merged = regmean([net.state_dict()] * 2, [grams] * 2).state    # N identical experts → the expert
    >>> torch.allclose(merged["0.weight"], net[0].weight, atol=1e-5)
    True
    """
    sites = _gram_sites(model, layers)
    modules = {paths[0]: mod for mod, (paths, _) in sites.items()}
    dev = _device_of(model)
    accs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, module: nn.Module, x: torch.Tensor) -> None:
        d = sites[module][1]
        if name not in accs:
            accs[name] = torch.zeros(d, d, dtype=torch.float64, device=x.device)
            counts[name] = 0
        counts[name] += _accumulate_input_gram(module, d, x, accs[name], name, UNFOLD_CHUNK_BYTES)

    device = device if device is not None else dev
    with _hooked(modules, "input", hook), _mode([model], False):
        for inputs in _progress(iter_calls(batches, max_batches, device), progress, batches, max_batches,
                                "torchmerge Grams"):
            inputs(model)
    if _dist_ready():
        _all_reduce_grams(modules, sites, accs, counts)
    out: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        if counts.get(name, 0) == 0:
            continue
        g = accs[name].to(device=dev if dev is not None else accs[name].device, dtype=torch.float32)
        for i, path in enumerate(sites[mod][0]):
            out[f"{path}.weight" if path else "weight"] = g if i == 0 else g.clone()
    return out


def _all_reduce_grams(modules: dict[str, nn.Module], sites: dict, accs: dict, counts: dict) -> None:
    """Sum Grams and counts over ranks, in ``modules`` order (identical on every rank)."""
    dist, comm = torch.distributed, _comm_device()
    n = torch.tensor([float(counts.get(name, 0)) for name in modules], dtype=torch.float64, device=comm)
    dist.all_reduce(n)
    for (name, mod), total in zip(modules.items(), n.tolist()):
        d = sites[mod][1]
        g = accs[name].to(comm) if name in accs else torch.zeros(d, d, dtype=torch.float64, device=comm)
        dist.all_reduce(g)
        home = accs[name].device if name in accs else (_device_of(mod) or comm)
        accs[name], counts[name] = g.to(home), int(round(total))
