"""Shared plumbing for merge methods: task vectors, input validation, :class:`MergeResult`.

Every method takes *aligned* expert state dicts (``{name: tensor}``, same keys and shapes) and works
**key by key**: a task vector ``τ_i[key] = θ_i[key] − θ₀[key]`` is computed when that key is merged
and dropped right after, so merging T experts holds the inputs, the output and a few per-key
temporaries — never T full task-vector copies.

The base θ₀:

- ``base=None``: θ₀ := the element-wise **mean of the experts**; then ``Σ_i τ_i = 0``, so Task
  Arithmetic returns the average, TALL and Consensus the average for every task, and TIES/DARE
  act on deviations from the mean: those methods warn (:func:`check_degenerate`) — pass a base;
- one state dict: θ₀ := base;
- a list of state dicts, one per expert (e.g. each expert's own aligned initialisation):
  θ₀ := mean of the bases and ``τ_i = θ_i − base_i``.

Only floating-point tensors are merged; integer buffers (BatchNorm ``num_batches_tracked``) are
taken from the first expert. Keys or shapes that differ between experts raise
:class:`~torchmerge.errors.TorchMergeError` — pass only the shared (non-head) keys.

>>> import torch
>>> from torchmerge.methods import task_vectors
>>> a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 2.0])}
>>> base, taus = task_vectors([a, b], base=None)
>>> base["w"].tolist(), [t["w"].tolist() for t in taus]
([2.0, 2.0], [[-1.0, 0.0], [1.0, 0.0]])
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ArgumentError, ArgumentTypeError, ShapeError, TorchMergeError

__all__ = ["MergeResult", "task_vectors", "pack_masks", "unpack_mask"]


# ----------------------------------------------------------------------------- validation helpers
def _real(name: str, value) -> float:
    """``value`` as a float if it is a finite real number (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name}={value!r} is a {type(value).__name__}; pass a number")
    if not math.isfinite(value):
        raise ArgumentError(f"{name}={value!r} must be a finite number")
    return float(value)


def check_fraction(name: str, value, *, closed_low: bool = False, closed_high: bool = True) -> float:
    """``value`` must be a number in (0, 1] (or [0, 1) etc. as given); else TorchMergeError."""
    number = _real(name, value)
    lo_ok = number >= 0 if closed_low else number > 0
    hi_ok = number <= 1 if closed_high else number < 1
    if not (lo_ok and hi_ok):
        interval = ("[" if closed_low else "(") + "0, 1" + ("]" if closed_high else ")")
        raise ArgumentError(f"{name}={value!r} must be a number in {interval}")
    return number


def check_nonneg(name: str, value) -> float:
    number = _real(name, value)
    if not number >= 0:
        raise ArgumentError(f"{name}={value!r} must be a non-negative number")
    return number


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise TorchMergeError(f"{name}={value!r} is not one of {sorted(choices)}")
    return value


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Arithmetic happens in at least float32 (half/bfloat16 experts are upcast per key)."""
    return torch.promote_types(t.dtype, torch.float32)


# ----------------------------------------------------------------------------- aligned experts
class Aligned:
    """Validated experts plus the base, serving θ₀ and task vectors one key at a time."""

    def __init__(self, experts, base=None, *, need_float_base: bool = True):
        if isinstance(experts, Mapping) or not isinstance(experts, Sequence) or len(experts) == 0:
            raise TorchMergeError(
                f"experts must be a non-empty list of state dicts, got {type(experts).__name__}")
        for i, e in enumerate(experts):
            if not isinstance(e, Mapping):
                raise TorchMergeError(f"experts[{i}] is a {type(e).__name__}, not a state dict "
                                      "(pass model.state_dict())")
        self.experts = list(experts)
        self.keys = list(self.experts[0].keys())
        self._check_same(self.experts, "experts")
        self.float_keys = [k for k in self.keys if self.experts[0][k].is_floating_point()]
        self.bases = self._check_base(base) if need_float_base else None

    @property
    def num_tasks(self) -> int:
        return len(self.experts)

    def _check_same(self, dicts, what: str, ref=None):
        ref = self.experts[0] if ref is None else ref
        ref_keys = set(ref.keys())
        for i, d in enumerate(dicts):
            missing, extra = ref_keys - set(d.keys()), set(d.keys()) - ref_keys
            if missing or extra:
                bad = sorted(missing)[:1] or sorted(extra)[:1]
                where = "missing from" if missing else "only in"
                raise TorchMergeError(
                    f"key {bad[0]!r} is {where} {what}[{i}] (differences: missing={sorted(missing)[:5]}, "
                    f"extra={sorted(extra)[:5]}); pass only the keys all models share (drop task heads)")
            for k in self.keys:
                a, b = ref[k], d[k]
                if not torch.is_tensor(b):
                    raise TorchMergeError(f"{what}[{i}][{k!r}] is a {type(b).__name__}, not a tensor")
                if a.shape != b.shape:
                    raise ShapeError(
                        f"key {k!r}: shape {tuple(b.shape)} in {what}[{i}] but {tuple(a.shape)} in "
                        "experts[0]: the models must share one architecture (the same layer "
                        "widths); only task heads may differ, and they are not merged (tm.merge "
                        "finds them, heads='auto'; for merge_states, leave them out of the dicts)")
                if a.is_floating_point() != b.is_floating_point():
                    raise TorchMergeError(f"key {k!r}: dtype {b.dtype} in {what}[{i}] but {a.dtype} "
                                          "in experts[0]")

    def _check_base(self, base):
        if base is None:
            return None
        if isinstance(base, Mapping):
            bases = [base]
        elif isinstance(base, Sequence) and len(base) == self.num_tasks:
            bases = list(base)
        else:
            n = len(base) if isinstance(base, Sequence) else type(base).__name__
            raise TorchMergeError(f"base must be None, one state dict, or a list of {self.num_tasks} "
                                  f"state dicts (one per expert); got {n}")
        for i, b in enumerate(bases):
            if not isinstance(b, Mapping):
                raise TorchMergeError(f"base[{i}] is a {type(b).__name__}, not a state dict")
            for k in self.float_keys:
                if k not in b:
                    raise TorchMergeError(f"key {k!r} is missing from base[{i}]; the base needs every "
                                          "merged (floating-point) key")
                if b[k].shape != self.experts[0][k].shape:
                    raise ShapeError(f"key {k!r}: shape {tuple(b[k].shape)} in base[{i}] but "
                                     f"{tuple(self.experts[0][k].shape)} in experts[0]")
        return bases

    # --- per-key accessors ------------------------------------------------------------------
    def expert(self, i: int, key: str) -> torch.Tensor:
        return self.experts[i][key].to(compute_dtype(self.experts[0][key]))

    def base(self, key: str) -> torch.Tensor:
        """θ₀[key] in compute dtype (mean of experts / of the bases when needed)."""
        dt = compute_dtype(self.experts[0][key])
        if self.bases is None:
            acc = sum(e[key].to(dt) for e in self.experts)
            return acc / self.num_tasks
        if len(self.bases) == 1:
            return self.bases[0][key].to(device=self.experts[0][key].device, dtype=dt)
        return sum(b[key].to(dt) for b in self.bases) / len(self.bases)

    def tau(self, i: int, key: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """τ_i[key]; ``base`` is θ₀[key] when it is already at hand (saves recomputing a mean)."""
        if self.bases is not None and len(self.bases) > 1:
            return self.expert(i, key) - self.bases[i][key].to(compute_dtype(self.experts[0][key]))
        return self.expert(i, key) - (self.base(key) if base is None else base)

    def passthrough(self, key: str) -> torch.Tensor:
        """Non-float tensors (integer buffers) come from the first expert."""
        return self.experts[0][key].clone()

    def out(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Cast a merged value back to the experts' dtype."""
        return value.to(self.experts[0][key].dtype)

    def identical(self) -> bool:
        """True when there are ≥ 2 experts and all are equal (every merge then returns that model)."""
        e0 = self.experts[0]
        return self.num_tasks > 1 and all(torch.equal(e[k], e0[k]) for e in self.experts[1:]
                                          for k in self.float_keys)


# ----------------------------------------------------------------------------- honest results
def flag(info: dict, message: str, stacklevel: int = 3) -> None:
    """Warn (``UserWarning``) and record ``message`` in ``info["warnings"]``: a degenerate setting,
    a fallback or an unconverged solver must never pass silently."""
    info.setdefault("warnings", []).append(message)
    warnings.warn(message, UserWarning, stacklevel=stacklevel)


def check_degenerate(al: Aligned, info: dict, around_mean: str | None = None,
                     zero: str | None = None) -> None:
    """Warn where the inputs make ``info["method"]`` degenerate: identical experts; ``base=None``
    for a task-vector method (``around_mean``: what happens then); a setting (``zero``) that
    ignores the experts.

    >>> import warnings, torch
    >>> al = Aligned([{"w": torch.ones(2)}, {"w": torch.zeros(2)}])
    >>> info = {"method": "task_arithmetic"}
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     check_degenerate(al, info, around_mean="the result is the average")
    >>> info["warnings"][0].startswith("method='task_arithmetic' with base=None: task vectors")
    True
    """
    method = info["method"]
    if al.identical():
        flag(info, f"method={method!r}: all {al.num_tasks} experts are identical (after alignment; "
                   "task heads are not compared), so the merge returns their weights unchanged; check "
                   "that distinct experts were passed", 4)
        return
    if around_mean and al.bases is None:
        flag(info, f"method={method!r} with base=None: task vectors are taken around the experts' "
                   f"mean, so they sum to zero and {around_mean}; pass base=<the shared pretrained "
                   "model> (or one base per expert, e.g. each expert's initialisation), or use a "
                   "method that needs no base (regmean, fisher, mats, average)", 4)
    if zero:
        flag(info, f"method={method!r} with {zero}", 4)


def zero_lam(lam: float) -> str | None:
    """``zero=`` of :func:`check_degenerate` for θ₀ + λ·(...) methods."""
    return None if lam else "lam=0: the result is the base θ₀ (the experts are ignored); pass lam > 0"


def add_to_base(src, lam: float, merged_tau) -> dict:
    """``θ₀ + λ·merged_tau(key, θ₀)`` for every floating key of ``src``; other keys pass through."""
    state = {}
    for key in src.keys:
        if key not in src.float_keys:
            state[key] = src.passthrough(key)
            continue
        theta0 = src.base(key)
        state[key] = src.out(key, theta0 + lam * merged_tau(key, theta0))
    return state


def summed_taus(src):
    """``merged_tau`` for :func:`add_to_base`: Σ_i τ_i (Task Arithmetic)."""
    return lambda key, theta0: sum(src.tau(i, key, theta0) for i in range(src.num_tasks))


def task_vectors(experts, base=None):
    """Return ``(θ₀, [τ_1, …, τ_T])`` as full state dicts (floating-point keys only).

    This materialises T task-vector copies; methods themselves work key by key and never call it.
    See the module docstring for the three forms of ``base``.

    >>> import torch
    >>> e = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}]
    >>> b = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}]   # one base per expert
    >>> theta0, taus = task_vectors(e, b)
    >>> theta0["w"].item(), [t["w"].item() for t in taus]
    (1.0, [1.0, 2.0])
    """
    al = Aligned(experts, base)
    theta0 = {k: al.out(k, al.base(k)) for k in al.float_keys}
    taus = [{k: al.out(k, al.tau(i, k)) for k in al.float_keys} for i in range(al.num_tasks)]
    return theta0, taus


# ----------------------------------------------------------------------------- bit-packed masks
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Pack a boolean ``[T, n]`` tensor into uint8 ``[T, ceil(n/8)]`` (big-endian bits, as
    ``numpy.packbits``), on the masks' device."""
    t, n = masks.shape
    pad = (-n) % 8
    m = torch.nn.functional.pad(masks.to(torch.uint8), (0, pad)).view(t, -1, 8)
    w = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=masks.device)
    return (m * w).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_masks` for one row (``[ceil(n/8)]`` uint8 -> ``[n]`` bool)."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:n].bool()


@dataclass
class MergeResult:
    """Output of every merge method.

    ``state``: the merged state dict (for TALL: the multi-task model θ₀ + τ_MTL).
    ``masks``: None, or ``{key: uint8 [T, ceil(numel/8)]}`` bit-packed per-task masks (TALL).
    ``base``: θ₀ for task-conditioned results (what masked-off entries fall back to), else None.
    ``info``: method name and hyper-parameters actually used (plus e.g. CG iterations for MaTS).

    >>> import torch
    >>> r = MergeResult(state={"w": torch.tensor([1.0, 2.0])})
    >>> r.task_state(0)["w"].tolist()
    [1.0, 2.0]
    """

    state: dict
    masks: dict | None = None
    base: dict | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_tasks(self) -> int | None:
        if not self.masks:
            return None
        return next(iter(self.masks.values())).shape[0]

    def mask(self, t: int, key: str) -> torch.Tensor:
        """Task ``t``'s boolean mask for ``key``, in the parameter's shape."""
        if self.masks is None:
            raise TorchMergeError("this MergeResult has no task masks (only TALL produces them)")
        if key not in self.masks:
            raise TorchMergeError(f"no mask for key {key!r}; masked keys: {sorted(self.masks)[:8]}")
        if not 0 <= t < self.num_tasks:
            raise TorchMergeError(f"task index {t} out of range for {self.num_tasks} tasks")
        shape = self.state[key].shape
        return unpack_mask(self.masks[key][t], math.prod(shape)).view(shape)

    def task_state(self, t: int) -> dict:
        """Task ``t``'s weights: θ₀ + m_t ∘ τ_MTL for TALL (masked-off entries take θ₀), the shared
        ``state`` (same tensors, not copies) for every other method."""
        if self.masks is None:
            return self.state
        out = {}
        for k, v in self.state.items():
            out[k] = torch.where(self.mask(t, k), v, self.base[k].to(v)) if k in self.masks else v
        return out

    def mask_bytes(self) -> int:
        return sum(m.numel() for m in (self.masks or {}).values())
