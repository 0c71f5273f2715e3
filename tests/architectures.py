"""A table of small architectures with hand-counted permutation groups.

Each :class:`Case` has a model factory (deterministic weights, every norm/bias/token randomised so
that permuting a tensor visibly changes it), an example-input factory, and the multiset of group
sizes ``tm.discover`` must find (``len(sizes)`` is the group count).  The comment next to every
``sizes`` derives it by hand from the rules in the brief:

* a Linear/Conv output starts a space; bias, the following norm and the next layer's input join it;
* ``a + b`` / ``a * b`` merge spaces (residual stream = one space);  flatten = block permutation;
* cat keeps the pieces' spaces, chunk/split splits a space into independent pieces;
* grouped conv / GroupNorm / attention heads refine a space into a product; each factor of size > 1
  is a group (the conv-group index is shared by a grouped conv's input and output);
* model input and output axes are never permuted; size-1 spaces are not groups.

Widths are tiny so the whole table runs in seconds on a CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- helpers

def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace every constant floating tensor (ones/zeros from default init) with random values so
    that a permutation of it is observable.  Scales/variances stay positive."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        for name, t in tensors:
            if not t.is_floating_point() or t.numel() < 2:
                continue
            if not bool((t == t.flatten()[0]).all()):
                continue  # already random (default init of Linear/Conv weights, Embedding)
            leaf = name.rsplit(".", 1)[-1]
            if t.flatten()[0] == 1 or leaf in ("running_var",):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif leaf == "mask":
                continue  # causal masks are structural, keep them
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
    return model


def _images(c: int, h: int, w: int | None = None):
    w = h if w is None else w

    def make(batch: int = 4, seed: int = 0):
        return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))
    return make


def _tensor(*shape: int):
    def make(batch: int = 4, seed: int = 0):
        return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    return make


def _ids(vocab: int, length: int):
    def make(batch: int = 4, seed: int = 0):
        return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return make


def _built(cls, *args, **kwargs):
    def make():
        torch.manual_seed(0)
        return randomize_(cls(*args, **kwargs), seed=1)
    return make


# --------------------------------------------------------------------------- MLP / VGG

class MLP(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 12)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _cbr(cin, cout, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class VGG(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 8), _cbr(8, 8), nn.MaxPool2d(2),
                                      _cbr(8, 16), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 12), nn.ReLU(),
                                        nn.Dropout(p=0.0), nn.Linear(12, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- ResNets

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: stem, layer1 = 2 identity blocks (8), layer2 = projection block + identity (16)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layer1 = PreActBlock(8, 8)
        self.layer2 = PreActBlock(8, 16, 2)
        self.bn = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        out = self.layer2(self.layer1(self.conv1(x)))
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4).flatten(1)
        return self.linear(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class BottleneckResNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = Bottleneck(16, 4)        # 16 -> 4 -> 4 -> 16, identity shortcut
        self.layer2 = Bottleneck(16, 8, 2)     # 16 -> 8 -> 8 -> 32, projection shortcut
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNeXtBlock(nn.Module):
    def __init__(self, c=16, width=12, groups=3):
        super().__init__()
        self.conv_a = nn.Conv2d(c, width, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(width)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn_b = nn.BatchNorm2d(width)
        self.conv_c = nn.Conv2d(width, c, 1, bias=False)
        self.bn_c = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn_a(self.conv_a(x)))
        out = F.relu(self.bn_b(self.conv_b(out)))
        return F.relu(x + self.bn_c(self.conv_c(out)))


class ResNeXt(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = ResNeXtBlock()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- transformers

class Attention(nn.Module):
    """Separate q/k/v projections, heads via reshape+transpose, SDPA."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q(x).reshape(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = self.k(x).reshape(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = self.v(x).reshape(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim=16, heads=2, hidden=32):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """8x8 images, 4x4 patches -> 4 tokens + cls token, dim 16, 2 heads of 8, depth 2."""

    def __init__(self, num_classes: int = 5, dim=16, depth=2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, 5, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)             # [B, 4, C]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed                 # [B, 5, C]
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class FusedAttention(nn.Module):
    """nanoGPT-style: fused qkv reshaped to [B, T, 3, h, d], causal mask, manual softmax."""

    def __init__(self, dim=16, heads=4, seq_len=5):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("mask", torch.tril(torch.ones(seq_len, seq_len)).view(1, 1, seq_len, seq_len))

    def forward(self, x):
        B, T, C = x.shape
        d = self.head_dim
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                   # [B, h, T, d]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
        att = att.masked_fill(self.mask == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.proj(y)


class ChunkAttention(nn.Module):
    """Fused qkv split with .chunk(3, dim=-1): q, k, v are independent pieces."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(B, T, self.heads, -1).transpose(1, 2)
        k = k.view(B, T, self.heads, -1).transpose(1, 2)
        v = v.view(B, T, self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class TokenTransformer(nn.Module):
    """Input [B, T, 6] -> Linear embed -> pre-norm blocks -> mean over tokens -> head."""

    def __init__(self, attn_cls, depth, num_classes=3, dim=16, hidden=24):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.ln1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attn = nn.ModuleList(attn_cls(dim) for _ in range(depth))
        self.ln2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.mlp = nn.ModuleList(Mlp(dim, hidden, nn.ReLU) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x)
        for ln1, attn, ln2, mlp in zip(self.ln1, self.attn, self.ln2, self.mlp):
            x = x + attn(ln1(x))
            x = x + mlp(ln2(x))
        return self.head(x.mean(dim=1))


class MHABlockNet(nn.Module):
    """nn.MultiheadAttention (internals opaque) inside a pre-norm residual block."""

    def __init__(self, num_classes=3, dim=16):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 32)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x)
        h = self.ln1(x)
        x = x + self.mha(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(dim=1))


class SwiGLU(nn.Module):
    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class SwiGLUNet(nn.Module):
    def __init__(self, num_classes=4, dim=16):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.Sequential(SwiGLU(dim), SwiGLU(dim))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))))


class TiedLM(nn.Module):
    """Embedding(20, 16) + learned positions + 2 residual MLP blocks; logits via the tied weight."""

    def __init__(self, vocab=20, dim=16, max_len=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(1, max_len, dim))
        self.lns = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.mlps = nn.ModuleList(Mlp(dim, 32) for _ in range(2))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, ids):
        T = ids.shape[1]
        h = self.emb(ids) + self.pos[:, :T]
        for ln, mlp in zip(self.lns, self.mlps):
            h = h + mlp(ln(h))
        h = self.ln_f(h)
        return h @ self.emb.weight.T


# --------------------------------------------------------------------------- other conv nets

class MobileNet(nn.Module):
    """Depthwise-separable blocks with ReLU6, then one inverted residual (expand/dw/project + x)."""

    def __init__(self, num_classes=5):
        super().__init__()

        def cbr6(cin, cout, k=3, s=1, g=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))
        self.stem = cbr6(3, 8, s=2)
        self.dw1, self.pw1 = cbr6(8, 8, g=8), cbr6(8, 16, k=1)
        self.dw2, self.pw2 = cbr6(16, 16, s=2, g=16), cbr6(16, 16, k=1)
        self.expand = cbr6(16, 32, k=1)
        self.dw3 = cbr6(32, 32, g=32)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.pw1(self.dw1(self.stem(x)))
        x = self.pw2(self.dw2(x))
        x = x + self.project(self.dw3(self.expand(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth=4):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dense = nn.Sequential(DenseLayer(8), DenseLayer(12))          # 8 -> 12 -> 16 channels
        self.trans = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False),
                                   nn.AvgPool2d(2))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.trans(self.dense(self.stem(x)))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class UNet(nn.Module):
    def __init__(self, out_ch=2):
        super().__init__()

        def double(cin, cout):
            return nn.Sequential(_cbr(cin, cout), _cbr(cout, cout))
        self.enc = double(3, 8)
        self.mid = double(8, 16)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                nn.Conv2d(16, 8, 3, padding=1))
        self.dec = double(16, 8)
        self.out = nn.Conv2d(8, out_ch, 1)

    def forward(self, x):
        s = self.enc(x)                                   # [B, 8, 8, 8]
        b = self.mid(F.max_pool2d(s, 2))                  # [B, 16, 4, 4]
        u = self.up(b)                                    # [B, 8, 8, 8]
        return self.out(self.dec(torch.cat([u, s], dim=1)))


class ConvTransposeAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.ConvTranspose2d(8, 3, 4, 2, 1))

    def forward(self, x):
        return self.dec(self.enc(x))


class Conv1dNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(2, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 4, 12), nn.Linear(12, num_classes)

    def forward(self, x):                                 # [B, 2, 16]
        x = F.max_pool1d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool1d(F.relu(self.conv2(x)), 2)        # [B, 8, 4]
        x = x.view(x.size(0), -1)                         # [B, 32]
        return self.fc2(F.relu(self.fc1(x)))


class Conv3dNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                                  nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class GroupNormNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 8, 3, padding=1), nn.GroupNorm(8, 8), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


class SplitNet(nn.Module):
    """Stem output chunked into two branches, concatenated back."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.conv_a = nn.Conv2d(6, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(6, 5, 3, padding=1)
        self.conv_m = nn.Conv2d(9, 8, 1)
        self.bn_m = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        y = torch.cat([F.relu(self.conv_a(a)), F.relu(self.conv_b(b))], dim=1)
        z = F.relu(self.bn_m(self.conv_m(y)))
        return self.fc(z.mean(dim=(2, 3)))


class SENet(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(pool(x)))))."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        s = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        x = F.relu(self.conv2(x * s))
        return self.fc(x.mean(dim=(2, 3)))


class CumsumNet(nn.Module):
    """cumsum along features depends on their order: that space must be frozen and reported."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 16), nn.Linear(16, num_classes)

    def forward(self, x):
        h = F.relu(self.fc1(F.relu(self.fc0(x))))
        return self.fc2(torch.cumsum(h, dim=1))


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm written with mean over dim 1 and w[:, None, None]."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))           # layer scale

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)                     # channels last
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, num_classes=5, dim=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), LayerNorm2d(dim))
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean([-2, -1])))


class MixerBlock(nn.Module):
    def __init__(self, tokens=5, dim=16, tok_hidden=8, ch_hidden=32):
        super().__init__()
        self.ln1, self.tok = nn.LayerNorm(dim), Mlp(tokens, tok_hidden)
        self.ln2, self.ch = nn.LayerNorm(dim), Mlp(dim, ch_hidden)

    def forward(self, x):                                          # [B, T, C]
        x = x + self.tok(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ch(self.ln2(x))


class Mixer(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.embed, self.block = nn.Linear(6, 16), MixerBlock()
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.block(self.embed(x))).mean(dim=1))


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


class FusedSwiGLUNet(nn.Module):
    """gate and up fused in one Linear, split with chunk, recombined by gate * up."""

    def __init__(self, num_classes=4, dim=16, hidden=32):
        super().__init__()
        self.embed, self.norm = nn.Linear(8, dim), nn.LayerNorm(dim)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.norm_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x)
        a, b = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        x = x + self.down(F.silu(a) * b)
        return self.head(self.norm_f(x))


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


class StreamOutNet(nn.Module):
    """Returns the residual stream itself (no head): the stream is a model output, fixed."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.lns = nn.ModuleList(nn.LayerNorm(16) for _ in range(2))
        self.mlps = nn.ModuleList(Mlp(16, 32) for _ in range(2))

    def forward(self, x):
        x = self.embed(x)
        for ln, mlp in zip(self.lns, self.mlps):
            x = x + mlp(ln(x))
        return x


class TwoOutputsNet(nn.Module):
    """Returns (logits, features): the feature space is an output, fixed."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, num_classes)

    def forward(self, x):
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.head(h), h


class TiedHeadLM(nn.Module):
    """GPT-style tying: lm_head is a Linear module whose weight IS the embedding's."""

    def __init__(self, vocab=20, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lns = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.mlps = nn.ModuleList(Mlp(dim, 32) for _ in range(2))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        for ln, mlp in zip(self.lns, self.mlps):
            h = h + mlp(ln(h))
        return self.lm_head(self.ln_f(h))


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


class FlipNet(nn.Module):
    """flip along features depends on their order: fc1's space must be frozen."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 16), nn.Linear(16, num_classes)

    def forward(self, x):
        h = F.relu(self.fc1(F.relu(self.fc0(x))))
        return self.fc2(torch.flip(h, dims=[1]))


class PixelShuffleNet(nn.Module):
    """conv 16 -> PixelShuffle(2) -> 4 channels: the conv's output is (4 x 2 x 2), 2 x 2 spatial."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1, self.shuffle = nn.Conv2d(3, 16, 3, padding=1), nn.PixelShuffle(2)
        self.conv2, self.fc = nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.conv2(self.shuffle(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class RNNNet(nn.Module):
    """nn.LSTM / nn.GRU are opaque leaves: whatever is discovered around them must stay safe."""

    def __init__(self, rnn=nn.LSTM, num_classes=3):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.rnn = rnn(16, 12, batch_first=True)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        out = self.rnn(F.relu(self.embed(x)))[0]
        return self.head(out[:, -1])


class TorchEncoderNet(nn.Module):
    """nn.TransformerEncoderLayer (opaque torch.nn module) between a Linear embed and a head."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.enc(self.embed(x)).mean(1))


# --------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    make_input: Callable[..., object]      # (batch=4, seed=0) -> Tensor or tuple
    sizes: tuple | None                    # hand-derived multiset of group sizes (None: not checked)
    # non-routine frozen spaces (see invariants.notable_frozen): True = some, False = none,
    # None = don't care, a tuple = exactly these sizes (axes that are rightly fixed and reported)
    frozen: bool | tuple | None = False
    model_cls: type | None = field(default=None, compare=False)

    @property
    def n_groups(self) -> int:
        return len(self.sizes)

    def __str__(self):
        return self.name


def _case(name, cls, make_input, sizes, frozen=False, **kw):
    sizes = None if sizes is None else tuple(sorted(sizes))
    return Case(name, _built(cls, **kw), make_input, sizes, frozen, cls)


CASES = [
    # fc1 out (16), fc2 out (12); input 8 and logits 3 fixed.
    _case("mlp", MLP, _tensor(8), [16, 12]),
    # conv 8, conv 8, conv 16 (flatten -> Linear(64) input is a 16x4 block perm of it), fc 12.
    _case("vgg", VGG, _images(3, 8), [8, 8, 16, 12]),
    # stream8 = stem + layer1 outputs (identity adds); stream16 = layer2.0 conv2 + projection
    # shortcut + layer2.1 output; one mid per block: 8, 8, 16, 16.
    _case("resnet_basic", ResNet, _images(3, 8), [8, 8, 8, 16, 16, 16]),
    # stream8 = stem conv + layer1 out (+ bn1 of both blocks); mid 8 (layer1), mid 16 (layer2);
    # stream16 = layer2 conv2 + shortcut conv + final bn.
    _case("preact_resnet", PreActResNet, _images(3, 8), [8, 8, 16, 16]),
    # stream16 (stem + layer1 out), layer1 mids 4, 4; layer2 mids 8, 8; stream32 (conv3+downsample).
    _case("resnet_bottleneck", BottleneckResNet, _images(3, 8), [16, 4, 4, 8, 8, 32]),
    # stream 16 (patch conv, cls, pos, LNs, proj/fc2 outputs, head input); per block (x2):
    # heads 2 (q,k,v shared), q/k d 8, v/proj-in d 8, mlp hidden 32.
    _case("vit", ViT, _images(3, 8), [16] + 2 * [2, 8, 8, 32]),
    # stream 16; per block (x2): heads 4, one d 4 shared by q,k,v (fused [3,h,d]), mlp 24.
    # Reported frozen: the q/k/v role axis (size 3) of each block's qkv output, picked by qkv[0..2].
    _case("fused_qkv", TokenTransformer, _tensor(5, 6), [16] + 2 * [4, 4, 24], frozen=(3, 3),
          attn_cls=FusedAttention, depth=2),
    # stream 16; one block: heads 2, q/k d 8, v d 8 (chunk => independent pieces), mlp 24.
    _case("chunk_qkv", TokenTransformer, _tensor(5, 6), [16, 2, 8, 8, 24],
          attn_cls=ChunkAttention, depth=1),
    # stream 16 (embed, RMSNorm, down outputs); per block the gate*up hidden 32 is one group.
    _case("swiglu", SwiGLUNet, _tensor(5, 8), [16, 32, 32]),
    # stem 8 (= dw1, depthwise keeps the space), pw1 16 (= dw2), pw2 16 (= project, residual add),
    # expand 32 (= dw3).
    _case("mobilenet", MobileNet, _images(3, 16), [8, 16, 16, 32]),
    # x0 8 (stem), y1 4, y2 4 (cat keeps pieces), transition 8.
    _case("densenet", DenseNet, _images(3, 8), [8, 4, 4, 8]),
    # enc 8, 8 (skip s); mid 16, 16; up conv 8; dec 8, 8; out conv 2 fixed.
    _case("unet", UNet, _images(3, 8), [8, 8, 16, 16, 8, 8, 8]),
    # conv1 8, conv2 8 (view(B,-1) -> fc1 input is a block perm), fc1 12.
    _case("conv1d", Conv1dNet, _tensor(2, 16), [8, 8, 12]),
    # conv 4, conv 8.
    _case("conv3d", Conv3dNet, _tensor(1, 4, 8, 8), [4, 8]),
    # conv1 8 under GN(2,8) -> 2 x 4; conv2 16 under GN(4,16) -> 4 x 4; conv3 8 under GN(8,8) -> 8 x 1.
    _case("groupnorm", GroupNormNet, _images(3, 8), [2, 4, 4, 4, 8]),
    # embedding dim 16 = stream (emb, pos, LNs, fc2 outs, tied logits' reduction axis); hidden 32 x2.
    # Reported frozen: pos's token axis (max_len 8), sliced to the sequence length.
    _case("tied_lm", TiedLM, _ids(20, 6), [16, 32, 32], frozen=(8,)),
    # stream 16 (embed, LNs, MHA in/out embedding axis, fc2); mlp hidden 32. MHA heads stay opaque.
    _case("mha_block", MHABlockNet, _tensor(5, 6), [16, 32], frozen=None),
    # stream 16; groups=3 conv on width 12: conv-group index 3 (shared by its input and output),
    # conv_a per-group 4, conv_b per-group 4.
    _case("resnext", ResNeXt, _images(3, 8), [16, 3, 4, 4]),
    # conv 8, conv 16, convT 8; last convT output 3 fixed.
    _case("conv_transpose", ConvTransposeAE, _images(3, 8), [8, 16, 8]),
    # stem 12 chunked -> 6 | 6 independent; conv_a 4, conv_b 5 (cat keeps them); conv_m 8.
    _case("split_cat", SplitNet, _images(3, 8), [6, 6, 4, 5, 8]),
    # stem 16 (= se2 output, x * s merges); se hidden 4; conv2 8.
    _case("squeeze_excite", SENet, _images(3, 8), [16, 4, 8]),
    # fc0 12; fc1's 16 feeds cumsum over features -> frozen (reported), not a group.
    _case("frozen_cumsum", CumsumNet, _tensor(8), [12], frozen=True),
    # stream 16 (stem conv, LayerNorm2d, depthwise convs, LNs, pwconv2 outs, gamma, final norm);
    # pwconv hidden 32 per block.
    _case("convnext", ConvNeXt, _images(3, 8), [16, 32, 32]),
    # stream 16; token-mixing hidden 8 (token axis itself is the input's, fixed); channel hidden 32.
    _case("mlp_mixer", Mixer, _tensor(5, 6), [16, 8, 32]),
    # conv 16 (w1 rows, b1, w2 cols); linear 10 (w2 rows, b2, w3 cols).
    _case("functional_params", FunctionalNet, _images(3, 8), [16, 10]),
    # stem out = fc in = fc out (fc applied to its own output): one group of 16.
    _case("shared_layer", SharedLayerNet, _tensor(8), [16]),
    # stream 16; gate_up output = cat(A, A) with the same 32-group on both halves (a * b merges).
    _case("fused_swiglu", FusedSwiGLUNet, _tensor(5, 8), [16, 32]),
    # fc1 8 (inner factor of fc2's 40 inputs, tokens fixed), fc2 10.
    _case("token_flatten", TokenFlattenNet, _tensor(5, 6), [8, 10]),
    # fc1's output is added to the model input: fixed; only fc2 (12) is a group.
    _case("input_residual", InputResidualNet, _tensor(8), [12]),
    # the stream is returned: fixed; mlp hiddens 32, 32.
    _case("stream_output", StreamOutNet, _tensor(5, 6), [32, 32]),
    # fc2's 12 features are returned: fixed; fc1 16.
    _case("two_outputs", TwoOutputsNet, _tensor(8), [16]),
    # as tied_lm, with the tie through lm_head.weight = emb.weight: dim 16, hiddens 32, 32.
    _case("tied_head_lm", TiedHeadLM, _ids(20, 6), [16, 32, 32]),
    # softmax over features is an activation (equivariant), mean over features is invariant: 16, 12.
    _case("channel_ops", ChannelOpsNet, _tensor(8), [16, 12]),
    # fc1 16 viewed as (2, 8): factor 2 (summed out) and factor 8 (= fc2's input); fc2 6 (amax
    # over features is invariant).
    _case("reshape_sum", ReshapeSumNet, _tensor(8), [2, 8, 6]),
    # fc0 12; fc1's 16 feeds flip over features -> frozen (reported).
    _case("frozen_flip", FlipNet, _tensor(8), [12], frozen=True),
    # conv1 16 = (4 channels x 2 x 2 sub-pixels): the 4 is a group (= conv2's input); conv2 8.
    _case("pixel_shuffle", PixelShuffleNet, _images(3, 4), [4, 8]),
]

# Models whose group count is the implementation's choice (opaque torch.nn containers): only the
# safety invariants are checked (sizes=None skips the count).
SAFETY_ONLY = [
    _case("lstm", RNNNet, _tensor(5, 6), None, frozen=None, rnn=nn.LSTM),
    _case("gru", RNNNet, _tensor(5, 6), None, frozen=None, rnn=nn.GRU),
    _case("torch_encoder_layer", TorchEncoderNet, _tensor(5, 6), None, frozen=None),
]

CASE_IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES + SAFETY_ONLY}
