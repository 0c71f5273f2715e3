"""The whole pipeline on a GPU gives what it gives on the CPU (skipped without CUDA)."""
from __future__ import annotations

import copy

import pytest
import torch

import torchmerge as tm
from architectures import BY_NAME, randomize_
from merge_helpers import randomize_sites

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _setup(device):
    case = BY_NAME["resnet_basic"]
    experts = [randomize_(case.model_cls(), seed=s).eval().to(device) for s in range(2)]
    data = [[(case.make_input(16, 10 * t + b).to(device), torch.randint(0, 3, (16,)).to(device))
             for b in range(2)] for t in range(2)]
    return experts, data


@pytest.mark.parametrize("method, rank", [("ties", 0), ("tall", 0), ("regmean", 0), ("mats", 0), ("average", 2)])
def test_merge_on_cuda_matches_cpu(method, rank):
    """Task, mixed-batch and exported outputs on the GPU equal the CPU's; ``rank``: with low-rank
    site maps too (created on the model's device)."""
    outs = {}
    for device in ("cpu", "cuda"):
        experts, data = _setup(device)
        merged = tm.merge(experts, method=method, data=data, correction="affine")
        if rank:
            randomize_sites(merged, rank=rank)
        assert all(p.device.type == device for p in merged.parameters())
        x = data[0][0][0]
        with torch.no_grad():
            ids = torch.tensor([0, 1] * 8, device=device)
            outs[device] = [merged(x, task=0), merged(x, task=ids), merged.export(1)(x)]
    for a, b in zip(outs["cpu"], outs["cuda"]):
        torch.testing.assert_close(b.cpu(), a, atol=2e-3, rtol=2e-3)


def test_task_ids_on_another_device_are_an_error():
    experts, data = _setup("cuda")
    merged = tm.merge(experts, method="average", data=data, correction=None)
    with pytest.raises(tm.TorchMergeError, match="task ids are on cpu"):
        merged(data[0][0][0], task=torch.tensor([0, 1] * 8))


def test_bfloat16_on_cuda():
    experts, data = _setup("cuda")
    experts = [copy.deepcopy(e).to(torch.bfloat16) for e in experts]
    data = [[(x.to(torch.bfloat16), y) for x, y in d] for d in data]
    merged = tm.merge(experts, method="task_arithmetic", data=data, correction="affine")
    assert merged(data[0][0][0], task=1).dtype == torch.bfloat16

