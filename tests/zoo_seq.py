"""Token/sequence test models (transformers, mixers, language models) for tests/architectures.py."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Mlp(nn.Module):
    def __init__(self, dim, hidden, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


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


class PosEmbLM(nn.Module):
    """nanoGPT-style learned positions: nn.Embedding(8, 16) indexed by torch.arange(T)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(20, 16); self.pos = nn.Embedding(8, 16); self.ln = nn.LayerNorm(16)
        self.mlp = Mlp(16, 32); self.head = nn.Linear(16, 20)
    def forward(self, ids):
        T = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        h = h + self.mlp(self.ln(h))
        return self.head(h)


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


class SquareMixer(nn.Module):
    """Mixer with tokens == channels == 16: axes must be told apart by position, not size."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16); self.ln = nn.LayerNorm(16); self.tok = Mlp(16, 8); self.ch = Mlp(16, 12)
        self.head = nn.Linear(16, 3)
    def forward(self, x):
        x = self.embed(x)
        x = x + self.tok(self.ln(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.ch(x)
        return self.head(x.mean(1))


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

