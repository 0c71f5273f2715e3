"""Routing-based merging (Pari, Jelassi, Agrawal 2024): ``tm.merge(experts, method="route")``.

At each chosen block a small learned router (``Linear(d -> n_candidates)``, softmax over its top-k
logits) mixes the outputs of that block of every expert — and, with ``window=w``, of the experts'
blocks up to ``w`` positions above and below in the same run of identical blocks. The candidates
are frozen copies of the (aligned) experts' blocks; everything outside the blocks comes from the
first (reference) expert, except the task heads, which are each task's own expert's.

* Routing unit, per block, tested on the first batch: each token of a ``[B, N, D]`` input when
  the block is token-wise (running each token alone gives the same output: a transformer MLP;
  the block then runs on the selected tokens as ``[M, 1, D]``), else each sample (a whole
  transformer layer; the router sees the sample's mean token, an image's mean over ``H, W``).
* Top-k runs only the selected candidates on the units that selected them. Top-k >= 2: gates are
  the softmax over the k logits; top-1: the gate is 1 with the gradient of the picked candidate's
  softmax probability (straight-through), so top-1 routers learn.
* Routers: per task (``router="task"``: one per block and task; task t's data trains task t's) or
  shared (``router="shared"``: one per block for all tasks, trained on the tasks' batches in turn,
  each distilled to its own expert; the router then has to tell the tasks apart from the input);
  initialised to zero (a uniform mix).
* Training: Adam (``route_lr``, default 1e-2) for ``route_steps`` (default 100) steps per task,
  distilling expert t's outputs on task t's data (``route_loss="mse"`` on the output tensor, or
  ``"kl"`` on logits; labels are not used), seeded by ``seed``.
* Correction (``correction="affine"``, the default as for every method): after training, task t's
  channel affine after each routed block, fitted in closed form so its per-channel mean and variance
  match expert t's block (one pass per block, in forward order), kept per task only where it lowers
  that task's distillation loss (the routers were trained on it; ``info["training"]
  ["correction_kept"]`` says where); ``None`` leaves the mix as trained.
"""
from __future__ import annotations

import copy
import itertools
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import analysis
from .batches import Inputs, example_inputs_of, first_call, iter_calls, output_tensor
from .errors import TorchMergeError
from .merged import MergedModel
from .modules import check_task_ids, stitch_rows
from .progress import bar, stage
from .trace import eval_mode
from .tree import under as _under

LOSSES = ("mse", "kl")
ROUTERS = ("task", "shared")


class _TaskState:
    """The task the router blocks and heads of one model run (shared by them)."""

    def __init__(self):
        self.task = 0


class RouterBlock(nn.Module):
    """Mixes frozen ``candidates`` with routers ``routers[r]: Linear(d, n)`` (one per task, or one
    shared by all tasks), top-k, per routing ``unit`` ("token" or "sample"); then, with the
    correction, task t's channel affine ``out · scale[t] + shift[t]``."""

    def __init__(self, candidates, in_features: int, num_routers: int, top_k: int, unit: str, state: _TaskState):
        super().__init__()
        self.candidates = nn.ModuleList(candidates)
        self.routers = nn.ModuleList(nn.Linear(in_features, len(candidates)) for _ in range(num_routers))
        for r in self.routers:
            nn.init.zeros_(r.weight)
            nn.init.zeros_(r.bias)
        self.top_k, self.unit, self.state = top_k, unit, state
        self.scale = self.shift = None  # [T, C] parameters once the correction is fitted
        self.forced = None  # an int: every unit picks this candidate (for inspection and tests)
        self.record = None  # a callable given each output before the affine (the correction's fit)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The router's input, one row per unit: tokens of ``[B, N, D]``; else each sample's
        (tokens mean-pooled for ``[B, N, D]``, ``H, W`` for images)."""
        if self.unit == "token":
            return x.reshape(-1, x.shape[-1])
        if x.dim() > 3:
            return x.flatten(2).mean(2)
        return x.mean(1) if x.dim() == 3 else x.reshape(x.shape[0], -1)

    def gates(self, x: torch.Tensor):
        """(top-k candidate indices, their gates), one row per routing unit. Top-k ≥ 2: softmax over
        the k logits. Top-1: the gate is 1 in value (the picked block unchanged) with the gradient
        of the picked candidate's softmax probability (straight-through), so top-1 routers learn."""
        router = self.routers[self.state.task if len(self.routers) > 1 else 0]
        logits = router(self.features(x))
        if self.forced is not None:
            idx = torch.full((logits.shape[0], 1), self.forced, device=x.device)
            return idx, torch.ones_like(idx, dtype=logits.dtype)
        top, idx = logits.topk(self.top_k, dim=-1)
        if self.top_k == 1:
            p = logits.softmax(-1).gather(-1, idx)
            return idx, 1 + p - p.detach()
        return idx, top.softmax(-1)

    def forward(self, x, *args, **kwargs):
        idx, gate = self.gates(x)
        token = self.unit == "token"
        call = Inputs((x.reshape(-1, 1, x.shape[-1]) if token else x, *args), kwargs)
        n, out = idx.shape[0], None
        for j, block in enumerate(self.candidates):
            hit = idx == j
            rows = hit.any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            y = (call if rows.numel() == n else call.rows(rows))(block)
            if not isinstance(y, torch.Tensor):
                raise TorchMergeError(f"a routed block returned a {type(y).__name__}; routing mixes blocks "
                                      "that return one tensor: choose other blocks (e.g. the MLPs)")
            w = (gate * hit).sum(-1)[rows].to(y.dtype)
            out = y.new_zeros((n, *y.shape[1:])) if out is None else out
            out = out.index_add(0, rows, y * w.view(-1, *[1] * (y.dim() - 1)))
        if token:
            out = out.reshape(*x.shape[:2], *out.shape[2:])
        if self.record is not None:
            self.record(out)
        if self.scale is None:
            return out
        shape = [1] * out.dim()
        shape[channel_axis(out)] = -1
        t = self.state.task
        return out * self.scale[t].view(shape).to(out.dtype) + self.shift[t].view(shape).to(out.dtype)


def channel_axis(out: torch.Tensor) -> int:
    """The channel axis of a block output: last for token layouts ``[B, N, D]``, else 1."""
    return out.dim() - 1 if out.dim() == 3 else min(1, out.dim() - 1)


class TaskHead(nn.Module):
    """One head module per task; runs the active task's."""

    def __init__(self, heads, state: _TaskState):
        super().__init__()
        self.per_task, self.state = nn.ModuleList(heads), state

    def forward(self, *args, **kwargs):
        return self.per_task[self.state.task](*args, **kwargs)


class RoutedModel(MergedModel):
    """The reference expert with router blocks and task heads in place; the experts' blocks frozen."""

    def __init__(self, body: nn.Module, state: _TaskState, task_names):
        super().__init__()
        self.body, self.state = body, state
        self._init_tasks(task_names)

    def set_task(self, task) -> None:
        """Also the task of the body's own methods called directly (``merged.generate(...)``)."""
        super().set_task(task)
        self.state.task = self.active_task

    def __getattr__(self, name: str):
        """The user's model's attributes (``config``, ``generate``, ...) reach through to the body."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "body":  # not set yet (during __init__)
                raise
            return getattr(super().__getattr__("body"), name)

    def router_blocks(self) -> dict:
        return {n: m for n, m in self.body.named_modules() if isinstance(m, RouterBlock)}

    def router_parameters(self, task=None):
        """The routers' parameters: of one task (with ``router="shared"``, the shared ones), or all."""
        for block in self.router_blocks().values():
            shared = len(block.routers) == 1
            routers = block.routers if task is None else [block.routers[0 if shared else self.task_index(task)]]
            for r in routers:
                yield from r.parameters()

    def task_parameters(self):
        """The routers' parameters and, with the correction, the per-task affines after the blocks."""
        yield from self.router_parameters()
        for block in self.router_blocks().values():
            if block.scale is not None:
                yield from (block.scale, block.shift)

    def forward(self, *inputs, task=None, **kwargs):
        if isinstance(task, torch.Tensor):
            call = Inputs(inputs, kwargs)
            check_task_ids(task, self.num_tasks, call.batch_size, where=" (model(x, task=ids))")
            parts = [(rows, self._run(t, call.rows(rows)))
                     for t in task.unique().tolist() for rows in [(task == t).nonzero().squeeze(1)]]
            return stitch_rows(parts, task.shape[0])
        t = self.active_task if task is None else self.task_index(task)
        return self._run(t, Inputs(inputs, kwargs))

    def _run(self, t: int, call: Inputs):
        previous, self.state.task = self.state.task, t
        try:
            return self.body(*call.args, **call.kwargs)
        finally:
            self.state.task = previous

    def export(self, task=None, like=None):
        raise TorchMergeError("a routed model mixes several experts' blocks per input, chosen by its "
                              "routers at run time: there is no single plain module to export; use the "
                              "RoutedModel itself (model.set_task(t) or model(x, task=t))")

    def save(self, path, example_inputs=None):
        raise TorchMergeError("saving routed models is not supported (tm.load rebuilds weight-merged "
                              "models only); keep the experts and call torch.save(model.state_dict())")


# -- block selection ---------------------------------------------------------------------------
def _signature(module: nn.Module):
    return (type(module).__name__,
            tuple((n, tuple(p.shape)) for n, p in itertools.chain(module.named_parameters(),
                                                                 module.named_buffers())))


def auto_blocks(model: nn.Module) -> list:
    """Runs of >= 2 consecutive sibling modules of identical structure in a ModuleList/Sequential
    (each with submodules); for transformer layers holding an ``mlp``/``feed_forward``/``ffn``
    submodule, that submodule. Returns a list of runs, each a list of module paths."""
    runs = []
    for path, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(container.named_children())
        for _, group in itertools.groupby(children, key=lambda c: _signature(c[1])):
            group = [(n, m) for n, m in group if len(list(m.children())) > 0]
            if len(group) >= 2:
                runs.append([_mlp_of(f"{path}.{n}" if path else n, m) for n, m in group])
    return runs


def _mlp_of(path: str, module: nn.Module) -> str:
    for name in ("mlp", "feed_forward", "ffn"):
        if isinstance(getattr(module, name, None), nn.Module):
            return f"{path}.{name}"
    return path


def select_blocks(model: nn.Module, blocks) -> list:
    """Runs of block paths for ``blocks="auto"``, a list of paths, or a predicate ``(path, module)``."""
    names = dict(model.named_modules())
    if blocks == "auto":
        runs = auto_blocks(model)
        if not runs:
            raise TorchMergeError("blocks='auto' found no repeated sibling blocks (>= 2 identical modules "
                                  "in a ModuleList/Sequential); pass blocks=[module paths]. Modules: "
                                  f"{_listing(names)}")
        return runs
    if callable(blocks):
        paths = [p for p, m in names.items() if p and blocks(p, m)]
    elif isinstance(blocks, (list, tuple)) and all(isinstance(p, str) for p in blocks):
        bad = [p for p in blocks if p not in names or not p]
        if bad:
            raise TorchMergeError(f"blocks {bad} name no module of the model; valid paths: {_listing(names)}")
        paths = list(blocks)
    else:
        raise TorchMergeError(f"blocks={blocks!r} is invalid: pass 'auto', a list of module paths or a "
                              "predicate (path, module) -> bool")
    if not paths:
        raise TorchMergeError(f"blocks matched no module; valid paths: {_listing(names)}")
    nested = [p for p in paths if any(q != p and _under(p, [q]) for q in paths)]
    if nested:
        raise TorchMergeError(f"blocks {nested} lie inside other chosen blocks; choose one level")
    groups = {}
    for p in paths:  # candidates across depths only between blocks of one structure
        groups.setdefault(_signature(names[p]), []).append(p)
    return list(groups.values())


def _listing(names) -> str:
    paths = [p for p in names if p]
    return ", ".join(paths[:40]) + (" ..." if len(paths) > 40 else "")


def candidate_plan(runs, window: int, top_k, n_experts: int) -> dict:
    """{block path: [(expert, path), ...]}: the experts' blocks l, l±1..window within its run."""
    depth = max(len(r) for r in runs)
    if not isinstance(window, int) or isinstance(window, bool) or window < 0 or window > depth - 1:
        raise TorchMergeError(f"window={window!r} is invalid: valid windows are 0..{depth - 1} (the longest "
                              f"run of blocks has {depth}: {runs[[len(r) for r in runs].index(depth)]})")
    plan = {}
    for run in runs:
        for l, path in enumerate(run):
            near = run[max(0, l - window): l + window + 1]
            plan[path] = [(e, q) for q in near for e in range(n_experts)]
    sizes = sorted({len(c) for c in plan.values()})
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= sizes[0]):
        raise TorchMergeError(f"top_k={top_k!r} is invalid: valid values are 1..{sizes[0]} (the fewest "
                              f"candidates at a block; candidates per block: {sizes}) or None (all)")
    return plan


# -- build, train, report ----------------------------------------------------------------------
def _block_calls(model, paths, call) -> dict:
    """``{path: Inputs}``: each block's arguments on one call (router sizes, routing units)."""
    seen, handles = {}, []
    for p in paths:
        handles.append(model.get_submodule(p).register_forward_pre_hook(
            lambda m, args, kwargs, p=p: (seen.setdefault(p, Inputs(args, kwargs)), None)[1], with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model):
            call(model)
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in paths if p not in seen or not seen[p].args or not isinstance(seen[p].args[0], torch.Tensor)]
    if missing:
        raise TorchMergeError(f"blocks {missing} were not called with a tensor as first argument on the "
                              "first batch; choose other blocks")
    return seen


def routing_unit(block: nn.Module, inputs: Inputs) -> str:
    """"token" when ``block`` is token-wise on this input — a ``[B, N, D]`` tensor, no other tensor
    argument, and each token run alone gives the same output (a transformer MLP) — else "sample"
    (a whole transformer layer mixes tokens: it must see its sample's tokens together)."""
    x, rest = inputs.args[0], Inputs(inputs.args[1:], inputs.kwargs)
    if x.dim() != 3 or rest.tensors():
        return "sample"
    with torch.no_grad(), eval_mode(block):
        whole = block(x, *rest.args, **rest.kwargs)
        try:  # a probe: a block that cannot run on single tokens is simply not token-wise
            alone = block(x.reshape(-1, 1, x.shape[-1]), *rest.args, **rest.kwargs)
        except (RuntimeError, ValueError, TypeError, IndexError):
            return "sample"
    if not (isinstance(whole, torch.Tensor) and isinstance(alone, torch.Tensor)) or alone.numel() != whole.numel():
        return "sample"
    tol = 1e-4 * whole.abs().max().item() + 1e-6
    return "token" if torch.allclose(alone.reshape(whole.shape), whole, rtol=1e-4, atol=tol) else "sample"


def build_routed(aligned, plan, head_paths, call, top_k, task_names, shared: bool) -> RoutedModel:
    """The reference's copy with router blocks at ``plan``'s paths and task heads at ``head_paths``."""
    body, state = copy.deepcopy(aligned[0]), _TaskState()
    inputs = _block_calls(aligned[0], list(plan), call)
    for path, cands in plan.items():
        blocks = [copy.deepcopy(aligned[e].get_submodule(q)) for e, q in cands]
        k = len(blocks) if top_k is None else top_k
        unit = routing_unit(aligned[0].get_submodule(path), inputs[path])
        probe = RouterBlock(blocks, 1, 1, k, unit, state)
        width = probe.features(inputs[path].args[0]).shape[-1]
        _replace(body, path, RouterBlock(blocks, width, 1 if shared else len(aligned), k, unit, state))
    for path in head_paths:
        _replace(body, path, TaskHead([copy.deepcopy(a.get_submodule(path)) for a in aligned], state))
    for name, p in body.named_parameters():
        p.requires_grad_(".routers." in f".{name}")
    return RoutedModel(body, state, task_names)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def distill_loss(pred, target, kind: str):
    pred, target = output_tensor(pred).float(), output_tensor(target).float()
    if kind == "kl":
        return F.kl_div(pred.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean")
    return F.mse_loss(pred, target)


def mean_loss(model, experts, data, kind="mse", max_batches=None) -> list:
    """Per task, the mean distillation loss of ``model`` (task t) against expert t on task t's data."""
    out = []
    with torch.no_grad():
        for t, (e, d) in enumerate(zip(experts, data)):
            losses = [distill_loss(c(model, task=t), c(e), kind).item() for c in iter_calls(d, max_batches)]
            out.append(sum(losses) / max(len(losses), 1))
    return out


def _schedules(model, data, steps: int, shared: bool, max_batches) -> list:
    """``[(description, parameters, [(task, call), ...])]``: per-task routers each train on their
    task's batches; a shared router trains on the tasks' batches in turn (``steps`` per task)."""
    calls = [list(iter_calls(d, max_batches)) for d in data]
    if shared:
        order = [(t, calls[t][(s // len(calls)) % len(calls[t])]) for s in range(steps * len(calls))
                 for t in [s % len(calls)] if calls[t]]
        return [("shared router", list(model.router_parameters()), order)]
    return [(f"task {t}", list(model.router_parameters(t)), [(t, c[s % len(c)]) for s in range(steps)])
            for t, c in enumerate(calls) if c]


def train_routers(model, experts, data, steps: int, lr: float, kind: str, seed: int, max_batches=None,
                  shared: bool = False):
    """Adam on the routers, distilling expert t's outputs on task t's data (the task-t model)."""
    torch.manual_seed(seed)
    for what, params, order in _schedules(model, data, steps, shared, max_batches):
        if not order or not params:
            continue
        opt = torch.optim.Adam(params, lr=lr)
        with stage(f"route: routers ({what})"):
            for t, call in bar(order, f"route: {what}"):
                with torch.no_grad():
                    target = call(experts[t])
                loss = distill_loss(call(model, task=t), target, kind)
                opt.zero_grad()
                loss.backward()
                opt.step()


def _channel_moments(out: torch.Tensor) -> torch.Tensor:
    """``[3, C]``: count, sum and sum of squares per channel (float64)."""
    v = out.detach().movedim(channel_axis(out), -1).reshape(-1, out.shape[channel_axis(out)]).double()
    return torch.stack([torch.full_like(v[0], v.shape[0]), v.sum(0), (v * v).sum(0)])


def _moments(model, paths, calls, modules_of, **extra) -> dict:
    """Per-channel moments of each path's output over ``calls`` (hooks on ``modules_of(path)``)."""
    acc = {}

    def add(p, out):
        m = _channel_moments(output_tensor(out))
        acc[p] = m if p not in acc else acc[p] + m

    handles = [modules_of(p, add) for p in paths]
    try:
        with torch.no_grad():
            for c in calls:
                c(model, **extra)
    finally:
        for h in handles:
            h()
    return acc


def fit_route_affines(model: RoutedModel, experts, data, max_batches=None, eps: float = 1e-5) -> dict:
    """Task t's affine after each router block so that its per-channel mean and variance match
    expert t's block (Sharma et al. 2024's correction, at the routed blocks). Blocks are fitted in
    forward order, one pass each over task t's batches, so every block is fitted on inputs that the
    blocks before it already corrected: exact at every block. Returns ``{task: {block: mean scale}}``."""
    blocks = model.router_blocks()
    if not blocks:
        return {}
    report = {}
    for t, (expert, d) in enumerate(zip(experts, data)):
        calls = list(iter_calls(d, max_batches))
        if not calls:
            continue
        hooks = lambda p, add: expert.get_submodule(p).register_forward_hook(  # noqa: E731
            lambda m, a, out, p=p: add(p, out)).remove
        with eval_mode(expert):
            target = _moments(expert, blocks, calls, hooks)
        for p in bar(list(blocks), f"route: correction of task {t}"):
            def record(q, add):
                blocks[q].record = lambda out: add(q, out)
                return lambda: setattr(blocks[q], "record", None)
            with eval_mode(model):
                seen = _moments(model, [p], calls, record, task=t)
            _set_affine(blocks[p], t, model.num_tasks, target[p], seen[p], eps)
        report[model.task_names[t]] = {p: float(b.scale[t].detach().mean()) for p, b in blocks.items()}
    return report


def keep_helpful_affines(model: RoutedModel, loss_after, loss_corrected) -> dict:
    """The routers were trained on the distillation loss itself, so matching block statistics can
    undo part of that: a task's affines are kept only where they lower its loss, else reset to the
    identity. Returns ``{task: kept}`` (in ``merged.info["training"]["correction_kept"]``)."""
    kept = {}
    for t, (after, corrected) in enumerate(zip(loss_after, loss_corrected)):
        kept[model.task_names[t]] = corrected <= after
        if corrected > after:
            with torch.no_grad():
                for block in model.router_blocks().values():
                    if block.scale is not None:
                        block.scale[t], block.shift[t] = 1.0, 0.0
    return kept


def _set_affine(block: RouterBlock, t: int, num_tasks: int, target, seen, eps: float) -> None:
    """``scale = sqrt((var_e + eps) / (var_m + eps))``, ``shift = mean_e − scale · mean_m``."""
    (n_e, s_e, q_e), (n_m, s_m, q_m) = target, seen
    mean_e, mean_m = s_e / n_e, s_m / n_m
    var_e, var_m = (q_e / n_e - mean_e ** 2).clamp_min(0), (q_m / n_m - mean_m ** 2).clamp_min(0)
    scale = ((var_e + eps) / (var_m + eps)).sqrt()
    if block.scale is None:
        ref = next(block.candidates.parameters())
        block.scale = nn.Parameter(torch.ones(num_tasks, scale.numel(), device=ref.device, dtype=ref.dtype))
        block.shift = nn.Parameter(torch.zeros(num_tasks, scale.numel(), device=ref.device, dtype=ref.dtype))
    with torch.no_grad():
        block.scale[t] = scale.to(block.scale.dtype)
        block.shift[t] = (mean_e - scale * mean_m).to(block.shift.dtype)


def _flops(model, call, **extra) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call(model, **extra)
    return counter.get_total_flops() / max(call.batch_size or 1, 1)


def cost_report(model: RoutedModel, expert, call) -> dict:
    """Parameters and FLOPs per sample relative to one expert (FLOPs measured on ``call``)."""
    n_expert = sum(p.numel() for p in expert.parameters())
    extra = sum(p.numel() for p in model.task_parameters())
    active = sum(p.numel() for p in model.parameters()) - extra
    heads = [m for m in model.body.modules() if isinstance(m, TaskHead)]
    active -= sum(sum(p.numel() for p in h.per_task.parameters()) * (1 - 1 / len(h.per_task)) for h in heads)
    for b in model.router_blocks().values():
        block = sum(p.numel() for p in b.candidates.parameters())
        active -= block - block / len(b.candidates) * b.top_k
    f_expert = _flops(expert, call)
    return {"params_ratio": sum(p.numel() for p in model.parameters()) / n_expert,
            "active_params_ratio": float(active) / n_expert,
            "router_params": sum(p.numel() for p in model.router_parameters()),
            "flops_ratio": _flops(model, call, task=0) / f_expert if f_expert else float("nan")}


def compatibility_report(experts, aligned, data, paths, max_batches) -> dict:
    """How compatible expert 0's blocks are with each other expert's, on the blocks' outputs (task
    0's data): linear CKA (``tm.analysis.cka``: invariant to permutations, so alignment cannot
    change it) and the mean per-unit correlation (``tm.analysis.unit_correlation``: unit j against
    unit j, which alignment is meant to raise) of the experts as given and, with ``aligned``, after
    alignment. One value per other expert, each the mean over the blocks."""
    batches = list(itertools.islice(iter(data[0]), max_batches or 4))
    mean = lambda d: sum(d.values()) / max(len(d), 1)  # noqa: E731
    others = range(1, len(experts))
    report = {"cka": [mean(analysis.cka(experts[0], experts[i], batches, layers=list(paths))) for i in others],
              "unit_correlation": [mean(analysis.unit_correlation(experts[0], experts[i], batches,
                                                                  layers=list(paths))) for i in others]}
    if aligned is not None:
        report["unit_correlation_aligned"] = [mean(analysis.unit_correlation(aligned[0], aligned[i], batches,
                                                                             layers=list(paths))) for i in others]
    return report


def degenerate(plan, shared: bool, num_tasks: int) -> list:
    notes = []
    if {len(c) for c in plan.values()} == {1}:
        notes.append("routing over one candidate per block (one expert, window=0): the routed model is the "
                     "expert itself; top_k has no effect")
    if shared and num_tasks == 1:
        notes.append("router='shared' with one task is the same as router='task'")
    return notes


def _auto_heads(model: nn.Module) -> list:
    """The last leaf module with parameters (the output layer): each task keeps its expert's."""
    leaves = [p for p, m in model.named_modules() if p and not list(m.children()) and
              any(True for _ in m.parameters(recurse=False))]
    return leaves[-1:]


def _heads(model, heads) -> list:
    if heads == "auto":
        return _auto_heads(model)
    if heads is None:
        return []
    names = dict(model.named_modules())
    paths = [p for p, m in names.items() if p and heads(p, m)] if callable(heads) else list(heads)
    bad = [p for p in paths if p not in names]
    if bad:
        raise TorchMergeError(f"heads {bad} name no module of the model; valid paths: {_listing(names)}")
    return paths


def _check_options(experts, data, correction, loss, steps, lr, router):
    if not isinstance(experts, (list, tuple)) or not experts or not all(isinstance(e, nn.Module) for e in experts):
        raise TorchMergeError("method='route' needs experts: a non-empty list of nn.Module")
    if data is None or len(data) != len(experts):
        raise TorchMergeError(f"method='route' trains routers on task data: pass data= with one iterable of "
                              f"batches per expert ({len(experts)})")
    if correction not in (None, "affine"):
        raise TorchMergeError(f"correction={correction!r} does not apply to method='route'; valid: 'affine' "
                              "(a per-task affine after each routed block) or None")
    if loss not in LOSSES:
        raise TorchMergeError(f"route_loss={loss!r} is invalid; valid losses: {LOSSES}")
    if router not in ROUTERS:
        raise TorchMergeError(f"router={router!r} is invalid; valid routers: {ROUTERS}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise TorchMergeError(f"route_steps={steps!r} is invalid: pass an int >= 0")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise TorchMergeError(f"route_lr={lr!r} is invalid: pass a positive float")


def _aligned(experts, example, align, data, heads, seed, max_batches, options):
    """The experts permuted onto expert 0 with the pipeline's discovery and alignment."""
    from .align import align_many
    from .discover import discover
    from .pipeline import _permuted, _union

    spec = discover(experts[0], example)
    exclude = set(spec.heads) | {p for p, _ in spec.axes if _under(p, heads)}
    perms, runs = align_many(experts, spec, method=align, seed=seed, exclude=exclude, return_results=True,
                             data=None if align == "weight" else _union(data, max_batches), **options)
    aligned = [_permuted(e, spec, p) for e, p in zip(experts, perms)]
    return aligned, {"method": align, "converged": [r.converged if r else True for r in runs]}


def merge_route(experts, data, *, blocks="auto", window: int = 0, top_k=None, router: str = "task", align=None,
                heads="auto", task_names=None, correction="affine", max_batches=None, seed: int = 0,
                route_steps: int = 100, route_lr: float = 1e-2, route_loss: str = "mse",
                example_inputs=None, alignment_options=None) -> RoutedModel:
    """``tm.merge(experts, method="route", data=...)``: see the module docstring.

    >>> import torch, torchmerge as tm
    >>> def net():
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 8), *[torch.nn.Sequential(
    ...         torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(3)], torch.nn.Linear(8, 3))
    >>> experts = [net(), net()]
    >>> data = [[torch.randn(16, 4)] for _ in experts]
    >>> merged = tm.merge(experts, method="route", data=data, window=1, top_k=2, route_steps=5)
    >>> merged(torch.randn(5, 4), task=torch.tensor([0, 1, 1, 0, 1])).shape
    torch.Size([5, 3])
    >>> merged.info["blocks"], merged.info["units"]["2"]
    (['1', '2', '3'], 'sample')
    """
    data = None if data is None else list(data)  # once: a generator of tasks is read a single time
    _check_options(experts, data, correction, route_loss, route_steps, route_lr, router)
    names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(experts))]
    head_paths = _heads(experts[0], heads)
    runs = select_blocks(experts[0], blocks)
    plan = candidate_plan(runs, window, top_k, len(experts))
    call = first_call(data[0]) if example_inputs is None else example_inputs_of(example_inputs)
    aligned, alignment = list(experts), None
    if align is not None:
        aligned, alignment = _aligned(experts, call, align, data, head_paths, seed, max_batches,
                                      alignment_options or {})
    compatibility = (compatibility_report(experts, aligned if align else None, data, plan, max_batches)
                     if len(experts) > 1 else None)
    model = build_routed(aligned, plan, head_paths, call, top_k, names, shared=router == "shared")
    loss = lambda: mean_loss(model, aligned, data, route_loss, max_batches)  # noqa: E731
    training = {"loss": route_loss, "optimizer": "Adam", "lr": route_lr, "steps": route_steps, "seed": seed,
                "router": router, "loss_before": loss()}
    train_routers(model, aligned, data, route_steps, route_lr, route_loss, seed, max_batches, router == "shared")
    training["loss_after"] = loss()
    affines = None
    if correction == "affine":
        with stage("route: affine correction"):
            affines = fit_route_affines(model, aligned, data, max_batches)
        training["loss_corrected"] = loss()
        training["correction_kept"] = keep_helpful_affines(model, training["loss_after"],
                                                           training["loss_corrected"])
        training["loss_corrected"] = [c if kept else a for c, a, kept in zip(
            training["loss_corrected"], training["loss_after"], training["correction_kept"].values())]
        affines = {n: v if training["correction_kept"][n] else None for n, v in affines.items()}
    notes = degenerate(plan, router == "shared", len(experts))
    for n in notes:
        warnings.warn(n, UserWarning, stacklevel=3)
    blocks_ = model.router_blocks()
    model.info = {"method": "route", "align": align, "alignment": alignment, "blocks": list(plan),
                  "candidates": {p: [f"expert{e}:{q}" for e, q in c] for p, c in plan.items()},
                  "top_k": {p: b.top_k for p, b in blocks_.items()}, "units": {p: b.unit for p, b in blocks_.items()},
                  "window": window, "router": router, "heads": head_paths, "correction": correction,
                  "affine_scales": affines, "compatibility": compatibility, "warnings": notes,
                  "training": training, **cost_report(model, aligned[0], call)}
    return model
