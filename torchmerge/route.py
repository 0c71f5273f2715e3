"""Routing-based merging (Pari, Jelassi, Agrawal 2024): ``tm.merge(experts, method="route")``.

At each chosen block a small learned router (``Linear(d -> n_candidates)``, softmax over its top-k
logits) mixes the outputs of that block of every expert — and, with ``window=w``, of the experts'
blocks up to ``w`` positions above and below in the same run of identical blocks. The candidates
are frozen copies of the (aligned) experts' blocks; everything outside the blocks comes from the
first (reference) expert, except the task heads, which are each task's own expert's.

* Routing unit: each token for sequence inputs ``[B, N, D]`` (the block is called on the selected
  tokens as ``[M, 1, D]``: right for token-wise blocks such as transformer MLPs), each sample
  otherwise (images ``[B, C, H, W]`` are mean-pooled over ``H, W`` for the router).
* Top-k runs only the selected candidates on the units that selected them.
* Routers are per task (one router per block and task), initialised to zero (a uniform mix).
* Training: for each task t, Adam (``route_lr``, default 1e-2) for ``route_steps`` (default 100)
  steps over task t's batches, distilling expert t's outputs (``route_loss="mse"`` on the output
  tensor, or ``"kl"`` on logits; labels are not used), seeded by ``seed``.
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
from .tree import under as _under

LOSSES = ("mse", "kl")


class _TaskState:
    """The task the router blocks and heads of one model run (shared by them)."""

    def __init__(self):
        self.task = 0


class RouterBlock(nn.Module):
    """Mixes frozen ``candidates`` with per-task routers ``routers[t]: Linear(d, n)``, top-k."""

    def __init__(self, candidates, in_features: int, num_tasks: int, top_k: int, state: _TaskState):
        super().__init__()
        self.candidates = nn.ModuleList(candidates)
        self.routers = nn.ModuleList(nn.Linear(in_features, len(candidates)) for _ in range(num_tasks))
        for r in self.routers:
            nn.init.zeros_(r.weight)
            nn.init.zeros_(r.bias)
        self.top_k, self.state = top_k, state
        self.forced = None  # an int: every unit picks this candidate (for inspection and tests)

    def gates(self, x: torch.Tensor):
        """(top-k candidate indices, their renormalised probabilities), one row per routing unit."""
        feats = x.reshape(-1, x.shape[-1]) if x.dim() == 3 else x.flatten(2).mean(2) if x.dim() > 3 else x
        logits = self.routers[self.state.task](feats.reshape(feats.shape[0], -1))
        if self.forced is not None:
            idx = torch.full((logits.shape[0], 1), self.forced, device=x.device)
            return idx, torch.ones_like(idx, dtype=logits.dtype)
        top, idx = logits.topk(self.top_k, dim=-1)
        return idx, top.softmax(-1)

    def forward(self, x, *args, **kwargs):
        idx, probs = self.gates(x)
        units = x.reshape(-1, 1, x.shape[-1]) if x.dim() == 3 else x
        out = None
        for j, block in enumerate(self.candidates):
            hit = idx == j
            rows = hit.any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if (args or kwargs) and rows.numel() != units.shape[0]:
                raise TorchMergeError("a routed block called with extra arguments can only run all units "
                                      "through each candidate: pass top_k equal to the number of candidates")
            y = block(units[rows], *args, **kwargs)
            w = (probs * hit).sum(-1)[rows].to(y.dtype)
            out = (y.new_zeros((units.shape[0], *y.shape[1:])) if out is None else out)
            out = out.index_add(0, rows, y * w.view(-1, *[1] * (y.dim() - 1)))
        return out.reshape(*x.shape[:2], *out.shape[2:]) if x.dim() == 3 else out


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

    def router_blocks(self) -> dict:
        return {n: m for n, m in self.body.named_modules() if isinstance(m, RouterBlock)}

    def router_parameters(self, task=None):
        """The routers' parameters (of one task, or of all); the only trainable parameters."""
        for block in self.router_blocks().values():
            routers = block.routers if task is None else [block.routers[self.task_index(task)]]
            for r in routers:
                yield from r.parameters()

    def task_parameters(self):
        yield from self.router_parameters()

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
def _block_inputs(model, paths, call) -> dict:
    """The first positional input of each block on one call (for the routers' input sizes)."""
    seen, handles = {}, []
    for p in paths:
        handles.append(model.get_submodule(p).register_forward_pre_hook(
            lambda m, args, p=p: (seen.setdefault(p, args[0] if args else None), None)[1]))
    try:
        with torch.no_grad():
            call(model)
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in paths if not isinstance(seen.get(p), torch.Tensor)]
    if missing:
        raise TorchMergeError(f"blocks {missing} were not called with a tensor as first argument on the "
                              "first batch; choose other blocks")
    return seen


def _router_width(x: torch.Tensor) -> int:
    return x.shape[-1] if x.dim() == 3 else x.shape[1] if x.dim() > 3 else x[0].numel()


def build_routed(aligned, plan, head_paths, call, top_k, task_names) -> RoutedModel:
    """The reference's copy with router blocks at ``plan``'s paths and task heads at ``head_paths``."""
    body, state = copy.deepcopy(aligned[0]), _TaskState()
    inputs = _block_inputs(aligned[0], list(plan), call)
    for path, cands in plan.items():
        blocks = [copy.deepcopy(aligned[e].get_submodule(q)) for e, q in cands]
        k = len(blocks) if top_k is None else top_k
        _replace(body, path, RouterBlock(blocks, _router_width(inputs[path]), len(aligned), k, state))
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


def train_routers(model, experts, data, steps: int, lr: float, kind: str, seed: int, max_batches=None):
    """Adam on each task's routers, distilling expert t's outputs on task t's data."""
    torch.manual_seed(seed)
    for t, (expert, batches) in enumerate(zip(experts, data)):
        calls = list(iter_calls(batches, max_batches))
        params = list(model.router_parameters(t))
        if steps == 0 or not calls or not params:
            continue
        opt = torch.optim.Adam(params, lr=lr)
        with stage(f"route: routers of task {t}"):
            for step in bar(range(steps), f"route: task {t}"):
                call = calls[step % len(calls)]
                with torch.no_grad():
                    target = call(expert)
                loss = distill_loss(call(model, task=t), target, kind)
                opt.zero_grad()
                loss.backward()
                opt.step()


def _flops(model, call, **extra) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call(model, **extra)
    return counter.get_total_flops() / max(call.batch_size or 1, 1)


def cost_report(model: RoutedModel, expert, call) -> dict:
    """Parameters and FLOPs per sample relative to one expert (FLOPs measured on ``call``)."""
    n_expert = sum(p.numel() for p in expert.parameters())
    active = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.router_parameters())
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


def cka_report(experts, aligned, data, paths, max_batches) -> dict:
    """Mean linear CKA over the chosen blocks between expert 0 and each other expert, before and
    after alignment (``tm.analysis.cka`` on the blocks' outputs, task 0's data)."""
    batches = list(itertools.islice(iter(data[0]), max_batches or 4))
    report = {"before": [], "after": []}
    for i in range(1, len(experts)):
        for key, models in (("before", experts), ("after", aligned)):
            values = analysis.cka(models[0], models[i], batches, layers=list(paths))
            report[key].append(sum(values.values()) / max(len(values), 1))
    return report


def degenerate(plan, top_k) -> list:
    sizes = {len(c) for c in plan.values()}
    if sizes == {1}:
        return ["routing over one candidate per block (one expert, window=0): the routed model is the "
                "expert itself; top_k has no effect"]
    if top_k == 1:
        return ["top_k=1: the gate renormalised over one candidate is always 1, so training gives the "
                "routers no gradient and they keep their initial choice; use top_k >= 2 to learn routes"]
    return []


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


def _check_options(experts, data, correction, loss, steps, lr):
    if not isinstance(experts, (list, tuple)) or not experts or not all(isinstance(e, nn.Module) for e in experts):
        raise TorchMergeError("method='route' needs experts: a non-empty list of nn.Module")
    if data is None or len(data) != len(experts):
        raise TorchMergeError(f"method='route' trains routers on task data: pass data= with one iterable of "
                              f"batches per expert ({len(experts)})")
    if correction not in (None, "affine"):
        raise TorchMergeError(f"correction={correction!r} does not apply to method='route' (the candidates "
                              "are the experts' own blocks); pass correction=None")
    if loss not in LOSSES:
        raise TorchMergeError(f"route_loss={loss!r} is invalid; valid losses: {LOSSES}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise TorchMergeError(f"route_steps={steps!r} is invalid: pass an int >= 0")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise TorchMergeError(f"route_lr={lr!r} is invalid: pass a positive float")


def _aligned(experts, example, align, data, heads, seed, max_batches):
    """The experts permuted onto expert 0 with the pipeline's discovery and alignment."""
    from .align import align_many
    from .discover import discover
    from .pipeline import _permuted, _union

    spec = discover(experts[0], example)
    exclude = set(spec.heads) | {p for p, _ in spec.axes if _under(p, heads)}
    perms, runs = align_many(experts, spec, method=align, seed=seed, exclude=exclude, return_results=True,
                             data=None if align == "weight" else _union(data, max_batches))
    aligned = [_permuted(e, spec, p) for e, p in zip(experts, perms)]
    return aligned, {"method": align, "converged": [r.converged if r else True for r in runs]}


def merge_route(experts, data, *, blocks="auto", window: int = 0, top_k=None, align=None, heads="auto",
                task_names=None, correction=None, max_batches=None, seed: int = 0, route_steps: int = 100,
                route_lr: float = 1e-2, route_loss: str = "mse", example_inputs=None) -> RoutedModel:
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
    >>> merged.info["blocks"]
    ['1', '2', '3']
    """
    data = None if data is None else list(data)  # once: a generator of tasks is read a single time
    _check_options(experts, data, correction, route_loss, route_steps, route_lr)
    names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(experts))]
    head_paths = _heads(experts[0], heads)
    runs = select_blocks(experts[0], blocks)
    plan = candidate_plan(runs, window, top_k, len(experts))
    call = first_call(data[0]) if example_inputs is None else example_inputs_of(example_inputs)
    aligned, alignment, cka = list(experts), None, None
    if align is not None:
        aligned, alignment = _aligned(experts, call, align, data, head_paths, seed, max_batches)
        if len(experts) > 1:
            cka = cka_report(experts, aligned, data, plan, max_batches)
    model = build_routed(aligned, plan, head_paths, call, top_k, names)
    before = mean_loss(model, aligned, data, route_loss, max_batches)
    train_routers(model, aligned, data, route_steps, route_lr, route_loss, seed, max_batches)
    notes = degenerate(plan, top_k)
    for n in notes:
        warnings.warn(n, UserWarning, stacklevel=3)
    model.info = {"method": "route", "align": align, "alignment": alignment, "blocks": list(plan),
                  "candidates": {p: [f"expert{e}:{q}" for e, q in c] for p, c in plan.items()},
                  "top_k": {p: b.top_k for p, b in model.router_blocks().items()}, "window": window,
                  "heads": head_paths, "cka": cka, "warnings": notes,
                  "training": {"loss": route_loss, "optimizer": "Adam", "lr": route_lr, "steps": route_steps,
                               "seed": seed, "loss_before": before,
                               "loss_after": mean_loss(model, aligned, data, route_loss, max_batches)},
                  **cost_report(model, aligned[0], call)}
    return model
