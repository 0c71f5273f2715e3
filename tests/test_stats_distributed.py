"""collect() under torch.distributed: 2 CPU ranks (gloo), each with half the data, must end up with
the statistics of one process run on the union — including a rank that saw no data at all."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torchmerge.stats import collect, collect_paired

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2


def make_models():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 5))
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5))
    return a.double(), b.double()  # float64 end to end: rank split vs one pass agree to ~1e-12


def make_data():
    g = torch.Generator().manual_seed(1)
    return [100 + torch.randn(4 + i, 3, 6, 6, generator=g, dtype=torch.float64)  # uneven batches
            for i in range(6)]


def summarise(stats):
    """Plain float64 tensors for every statistic (what the ranks send back)."""
    out = {}
    for name, s in stats.items():
        out[name] = {"count": torch.tensor(s.count), "mean": s.mean.cpu(), "var": s.var.cpu()}
        if hasattr(s, "covariance"):
            out[name]["cov"] = s.covariance().cpu()
    return out


def run_all(data, lopsided):
    a, b = make_models()
    return {
        "moments": summarise(collect(a, ["0", "1", "4"], data)),
        "gram": summarise(collect(a, ["4"], data, stat="gram", where="input")),
        "paired": summarise(collect_paired(a, b, ["0", "4"], None, data)),
        # one rank gets no batch at all: it must still join the reduction and receive the result
        "lopsided": summarise(collect(a, ["0"], lopsided)),
    }


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data = make_data()[rank::WORLD]
        lopsided = data if rank == 0 else []
        torch.save(run_all(data, lopsided), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_rank_holds_the_union_statistics(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    union = make_data()
    expected = run_all(union, union[0::WORLD])
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for kind, per_site in expected.items():
            for site, fields in per_site.items():
                for field, want in fields.items():
                    have = got[kind][site][field]
                    scale = want.abs().max().item() if want.numel() else 1.0
                    torch.testing.assert_close(have, want, rtol=1e-9, atol=1e-9 * max(scale, 1.0),
                                               msg=f"rank {rank} {kind}/{site}/{field}")
