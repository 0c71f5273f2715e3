"""Small models that each exercise one op or wiring pattern, for tests/architectures.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 12)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CumsumNet(nn.Module):
    """cumsum along features depends on their order: that space must be frozen and reported."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 16), nn.Linear(16, num_classes)

    def forward(self, x):
        h = F.relu(self.fc1(F.relu(self.fc0(x))))
        return self.fc2(torch.cumsum(h, dim=1))


class FlipNet(nn.Module):
    """flip along features depends on their order: fc1's space must be frozen."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 16), nn.Linear(16, num_classes)

    def forward(self, x):
        h = F.relu(self.fc1(F.relu(self.fc0(x))))
        return self.fc2(torch.flip(h, dims=[1]))


class FunctionalNet(nn.Module):
    """Raw Parameters used through F.conv2d / F.linear (get_attr nodes, no modules)."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(0.2 * torch.randn(16, 3, 3, 3)), nn.Parameter(0.1 * torch.randn(16))
        self.w2, self.b2 = nn.Parameter(0.2 * torch.randn(10, 16)), nn.Parameter(0.1 * torch.randn(10))
        self.w3 = nn.Parameter(0.3 * torch.randn(num_classes, 10))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1)).mean((2, 3))
        return F.linear(F.relu(F.linear(x, self.w2, self.b2)), self.w3)


class SharedLayerNet(nn.Module):
    """One Linear applied twice: its input and output axes are forced into one space."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem, self.fc, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, num_classes)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.fc(h))
        return self.head(F.relu(self.fc(h)))


class TokenFlattenNet(nn.Module):
    """[B, T, C] flattened to [B, T*C]: channels are the inner factor of the Linear's input."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(5 * 8, 10), nn.Linear(10, num_classes)

    def forward(self, x):
        h = F.relu(self.fc1(x)).flatten(1)
        return self.head(F.relu(self.fc2(h)))


class InputResidualNet(nn.Module):
    """h = x + f(x): f's output lives in the model-input space, which is fixed."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 12), nn.Linear(12, num_classes)

    def forward(self, x):
        h = x + F.relu(self.fc1(x))
        return self.head(F.relu(self.fc2(h)))


class TwoOutputsNet(nn.Module):
    """Returns (logits, features): the feature space is an output, fixed."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, num_classes)

    def forward(self, x):
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.head(h), h


class ChannelOpsNet(nn.Module):
    """softmax over features (equivariant) and centring by the feature mean (invariant)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, num_classes)

    def forward(self, x):
        h = F.softmax(self.fc1(x), dim=-1)
        h = F.relu(self.fc2(h))
        return self.head(h - h.mean(dim=1, keepdim=True))


class ReshapeSumNet(nn.Module):
    """view(B, 2, 8).sum(1) refines fc1's 16 into 2 x 8 (the 2 summed away); amax over features."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(8, 6), nn.Linear(6, num_classes)

    def forward(self, x):
        h = F.relu(self.fc1(x)).view(x.shape[0], 2, 8).sum(1)
        h = F.relu(self.fc2(h))
        return self.head(h) + h.amax(dim=1, keepdim=True)


class SpatialBias(nn.Module):
    """A [8] Parameter added to [B, 8, 8, 8] broadcasts along W, not channels: never a member."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1); self.p = nn.Parameter(torch.randn(8))
        self.fc = nn.Linear(8, 3)
    def forward(self, x):  # x [B,3,8,8]; p broadcasts along W, not channels
        return self.fc(F.relu(self.conv(x) + self.p).mean((2, 3)))


class TokenCat(nn.Module):
    """cat along tokens (not channels) of two branches merges their channel spaces."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 16); self.c = nn.Linear(16, 3)
    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)).mean(1)


class IAddBlock(nn.Module):
    """Residual written in place: out += x."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1); self.c1 = nn.Conv2d(8, 8, 3, padding=1); self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)
    def forward(self, x):
        x = F.relu(self.stem(x))
        out = self.bn(self.c1(x))
        out += x
        out = F.relu(out)
        return self.fc(out.mean((2, 3)))


class FunctionalNorms(nn.Module):
    """F.layer_norm / F.batch_norm with raw Parameters and buffers."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16); self.w = nn.Parameter(torch.rand(16) + .5); self.b = nn.Parameter(torch.randn(16))
        self.register_buffer("rm", torch.randn(16) * .1); self.register_buffer("rv", torch.rand(16) + .5)
        self.w2 = nn.Parameter(torch.rand(16) + .5)
        self.head = nn.Linear(16, 3)
    def forward(self, x):
        h = F.layer_norm(self.fc1(x), (16,), self.w, self.b)
        h = F.batch_norm(h, self.rm, self.rv, self.w2, None, False)
        return self.head(F.relu(h))


class Repeat(nn.Module):
    """x.repeat(1, 2): [B, 6] -> [B, 12] = cat(A, A)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6); self.fc2 = nn.Linear(12, 3)
    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)).repeat(1, 2))


class StackSum(nn.Module):
    """torch.stack of two branches on a new axis, summed: their spaces merge."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 16); self.c = nn.Linear(16, 3)
    def forward(self, x):
        return self.c(torch.stack([F.relu(self.a(x)), torch.tanh(self.b(x))], 1).sum(1))


class BroadcastParams(nn.Module):
    """x * alpha (shape [1], not a member) * gain (shape [1, 16], axis 1 joins the space)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16); self.alpha = nn.Parameter(torch.tensor([0.7])); self.fc2 = nn.Linear(16, 3)
        self.gain = nn.Parameter(torch.rand(1, 16) + .5)
    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)) * self.alpha * self.gain)

