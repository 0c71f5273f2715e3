"""torchmerge: merge expert PyTorch models — including non-local ones — into one multi-task module.

>>> import torch, torchmerge as tm
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
>>> spec = tm.discover(net, torch.randn(2, 4))
>>> twin = tm.permute(net, spec, spec.random_perms(seed=1))
>>> torch.allclose(twin(torch.ones(1, 4)), net(torch.ones(1, 4)), atol=1e-6)
True
"""
from . import analysis, io, manifest, methods
from .align import AlignResult, align, align_many
from .correct import calibrate
from .discover import discover, verify_spec
from .io import load
from .errors import (ArgumentError, ArgumentTypeError, ShapeError, SpecError, TorchMergeError, TraceError,
                     VerificationError)
from .merged import MergedModel
from .modules import ChannelAffine, TaskAffine, TaskHeads
from .pipeline import merge
from .spec import FrozenSpace, Group, PermutationSpec, permute, permute_state_dict
from .task_weights import TaskWeights

__version__ = "0.1.0"

__all__ = [
    "merge", "load", "MergedModel", "calibrate", "TaskAffine", "TaskHeads", "ChannelAffine", "TaskWeights",
    "methods", "analysis", "align", "align_many", "AlignResult", "discover", "verify_spec", "permute", "permute_state_dict", "PermutationSpec", "Group",
    "FrozenSpace", "TorchMergeError", "TraceError", "ShapeError", "SpecError", "VerificationError",
    "ArgumentError", "ArgumentTypeError",
]
