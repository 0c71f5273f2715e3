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

Widths are tiny so the whole table runs in seconds on a CPU. The models live in zoo_conv.py,
zoo_seq.py (transformers, mixers, language models) and zoo_ops.py (one op or wiring pattern each).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from zoo_conv import (VGG, BasicBlock, BottleneckResNet, Conv1dNet, Conv3dNet, ConvNeXt, ConvTransposeAE,
                      DenseNet, GroupNormNet, MobileNet, PixelShuffleNet, PreActResNet, ResNet, ResNeXt,
                      SENet, SplitNet, UNet)
from zoo_ops import (MLP, BroadcastParams, ChannelOpsNet, CumsumNet, FlipNet, FunctionalNet, FunctionalNorms,
                     IAddBlock, InputResidualNet, Repeat, ReshapeSumNet, SharedLayerNet, SpatialBias, StackSum,
                     TokenCat, TokenFlattenNet, TwoOutputsNet)
from zoo_seq import (ChunkAttention, FusedAttention, FusedSwiGLUNet, MHABlockNet, Mixer, PosEmbLM, RNNNet,
                     SquareMixer, StreamOutNet, SwiGLUNet, TiedHeadLM, TiedLM, TokenTransformer,
                     TorchEncoderNet, ViT)

__all__ = ["CASES", "SAFETY_ONLY", "CASE_IDS", "BY_NAME", "Case", "randomize_", "BasicBlock", "MLP", "ResNet",
           "ViT", "TiedHeadLM"]


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
    # stream 16 (embed, LNs, MHA in/out embedding axis, fc2); mlp hidden 32. nn.MultiheadAttention
    # has a module rule (symbolic tracing): in_proj rows are cat(q, k, v), each heads 2 x dims 8;
    # q and k share their dims (8), v has its own (8, shared with out_proj's input); nothing frozen.
    _case("mha_block", MHABlockNet, _tensor(5, 6), [16, 32, 2, 8, 8], frozen=None),
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
    # conv 8; p (W axis) in no group.
    _case("spatial_bias", SpatialBias, _images(3, 8), [8]),
    # stream 16, token hidden 8, channel hidden 12 (token axis 16 fixed although same size).
    _case("square_mixer", SquareMixer, _tensor(16, 6), [16, 8, 12]),
    # a and b outputs merged (16).
    _case("token_cat", TokenCat, _tensor(5, 6), [16]),
    # stem 8 = c1 out (+=).
    _case("iadd_resblock", IAddBlock, _images(3, 8), [8]),
    # fc1 16 with w, b, rm, rv, w2.
    _case("functional_norms", FunctionalNorms, _tensor(8), [16]),
    # dim 16 (tok and pos embedding columns, LN, fc2 out, head in); hidden 32.
    _case("pos_embedding_lm", PosEmbLM, _ids(20, 6), [16, 32]),
    # a and b outputs merged by the sum over the stack axis (16).
    _case("stack_sum", StackSum, _tensor(8), [16]),
    # fc1 16 with gain[1].
    _case("broadcast_params", BroadcastParams, _tensor(8), [16]),
]

# Models whose group count is the implementation's choice (opaque torch.nn containers): only the
# safety invariants are checked (sizes=None skips the count).
SAFETY_ONLY = [
    _case("lstm", RNNNet, _tensor(5, 6), None, frozen=None, rnn=nn.LSTM),
    _case("gru", RNNNet, _tensor(5, 6), None, frozen=None, rnn=nn.GRU),
    _case("torch_encoder_layer", TorchEncoderNet, _tensor(5, 6), None, frozen=None),
    # ideal: [6] (repeat = cat(A, A)); freezing it is also safe.
    _case("repeat", Repeat, _tensor(8), None, frozen=None),
]

CASE_IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES + SAFETY_ONLY}
