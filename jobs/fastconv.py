"""Winograd/FFT convolutions through NNPACK for fp32 work on a CPU: the same convolution, fewer multiplies.

A 3x3 convolution computed directly costs 9 multiply-adds per output and input channel; NNPACK's
Winograd transform (F(6x6, 3x3) on x86 AVX2 and ARM NEON) needs about a quarter of that, and its FFT
path does larger kernels (up to 16x16) with less still. PyTorch ships NNPACK but only picks it for
batches of 16 or more, never for the one-image forwards and backwards of style transfer. Measured on
a 2-core AVX2 CPU in fp32 (`bench/winograd_layers.py`, BENCHMARKS.md): 1.4-3.2x per layer for VGG-19's
64-512 channel layers, ~2x for the style network's 128-channel residual ones, 1.6-2.4x for its 9x9
ones; stride-2 convolutions and 3x3 ones on 3 input channels were slower, so they stay on PyTorch's.

`winograd_convs(model)` turns a model's eligible `nn.Conv2d` layers into `WinogradConv2d` in place
(same parameters, state-dict keys and outputs up to float rounding). Each call still checks that the
work is fp32 on a CPU outside autocast, NCHW or not, and otherwise runs the ordinary convolution, so
a bf16 machine, a GPU or a converted model moved to CUDA loses nothing. The backward gives the input
gradient through NNPACK too (a convolution with the rotated kernel) and weight and bias gradients
through PyTorch's own kernel, so frozen networks (Gatys' VGG) and trained ones both work.

Where it is used: the Gatys VGG, the served style networks and feed-forward style training (the
network and its VGG loss; a batch goes through NNPACK one image at a time, see `_nnpack`). Not for
the classifier or the CIFAR networks: ResNet-18 at 224 px ran at half the speed at batch 1 (its 7x7
and 14x14 layers are slower through NNPACK) and the small CIFAR network's training step (32 px maps,
weight gradients on PyTorch's NCHW kernel) was 1.6x slower than channels_last.
NNPACK's thread pool is sized once per process, by `torch.get_num_threads()` at its first
convolution: set the thread count before the first forward (Serve replicas and Ray tasks do).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

MAX_KERNEL = 16  # NNPACK's limit
MIN_TAPS = 64  # in_channels * kh * kw below this (a 3x3 on 3 channels) measured slower than direct
# NNPACK transforms the whole kernel at every call, which small maps do not repay: 3x3, 256-512 channels,
# 1 thread, output 8x8 0.47-0.49x, 12x12 0.88-0.94x, 16x16 1.33-1.37x PyTorch's speed (64 channels: 1.5x at 12x12)
MIN_OUTPUT_PIXELS = 256
_state = {"enabled": True}


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether this PyTorch build has NNPACK on this CPU. Also initialises NNPACK, which must happen
    before its first convolution (torch does it in this probe)."""
    try:
        return bool(torch._nnpack_available())
    except Exception:  # a build without the probe
        return False


@contextlib.contextmanager
def disabled():
    """Run every `WinogradConv2d` as a plain `nn.Conv2d` inside the block (benchmarks, checks)."""
    before, _state["enabled"] = _state["enabled"], False
    try:
        yield
    finally:
        _state["enabled"] = before


def applies(device: torch.device | str, dtype: torch.dtype | None) -> bool:
    """Whether converted layers run through NNPACK for work in autocast `dtype` (None: fp32) on `device`:
    fp32 on a CPU with NNPACK. Callers pick the memory format by it (NNPACK takes NCHW)."""
    return torch.device(device).type == "cpu" and dtype is None and _state["enabled"] and available()


def describe(model: nn.Module, device: torch.device | str, dtype: torch.dtype | None) -> str:
    """What a run prints and records as its convolutions: "winograd" (NNPACK) or "default" (PyTorch's)."""
    return "winograd" if applies(device, dtype) and is_winograd(model) else "default"


def eligible(conv: nn.Module) -> bool:
    """A layer NNPACK computes faster here: a plain zero-padded 2-D convolution, stride 1, no groups or
    dilation, a kernel up to 16x16, and at least MIN_TAPS input taps per output."""
    if type(conv) is not nn.Conv2d:
        return False
    kh, kw = conv.kernel_size
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and max(kh, kw) <= MAX_KERNEL and conv.in_channels * kh * kw >= MIN_TAPS)


def _nnpack(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding) -> torch.Tensor:
    """One image at a time: for a batch torch calls NNPACK's batched algorithm, which measured 2-2.3x
    slower per image than its one-image (inference) one for 3x3 layers at 32-256 px, 64-512 channels."""
    x, weight, padding = x.contiguous(), weight.contiguous(), list(padding)
    if len(x) == 1:
        return torch._nnpack_spatial_convolution(x, weight, bias, padding, [1, 1])
    return torch.cat([torch._nnpack_spatial_convolution(x[i:i + 1], weight, bias, padding, [1, 1])
                      for i in range(len(x))])


class _Conv(torch.autograd.Function):
    """y = conv2d(x, weight, bias, padding), stride 1, with NNPACK forward and input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.padding = padding
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return _nnpack(x, weight, bias, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kh, kw = weight.shape[-2:]
        (ph, pw), grad = ctx.padding, grad.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # a full correlation with the kernel rotated by 180 degrees
            rotated = weight.flip(2, 3).transpose(0, 1)
            gx = _nnpack(grad, rotated, None, (kh - 1 - ph, kw - 1 - pw))
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [ph, pw], [1, 1],
                False, [0, 0], 1, [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return gx, gw, gb, None


class WinogradConv2d(nn.Conv2d):
    """An `nn.Conv2d` that runs through NNPACK when the work is fp32 on a CPU (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not runs(self, x):
            return super().forward(x)
        return _Conv.apply(x, self.weight, self.bias, self.padding)


def runs(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether `conv` computes `x` through NNPACK: a converted layer, fp32 work on a CPU outside autocast and
    outside torch.compile (whose tracer cannot run NNPACK's op: a compiled model keeps inductor's kernels),
    a 4-D input with an output of at least MIN_OUTPUT_PIXELS, and a padding below the kernel size (NNPACK's
    limit)."""
    if not (isinstance(conv, WinogradConv2d) and _state["enabled"] and not torch.compiler.is_compiling()
            and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
            and conv.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and available()):
        return False
    out = [n + 2 * p - k + 1 for n, p, k in zip(x.shape[-2:], conv.padding, conv.kernel_size)]
    return out[0] * out[1] >= MIN_OUTPUT_PIXELS and all(p < k for p, k in zip(conv.padding, conv.kernel_size))


def upsample2_conv3x3(x: torch.Tensor, conv: WinogradConv2d) -> torch.Tensor:
    """conv(reflection_pad_1(nearest_upsample_2x(x))) for a 3x3 `conv` without padding, computed at x's size.

    Each of the four output phases (even/odd row, even/odd column) of the upsampled convolution reads
    a 2x2 neighbourhood of x with row and column taps summed ([w0, w1 + w2] or [w0 + w1, w2]), and the
    reflected border of the upsampled map is x's replicated border. So one 3x3 convolution of the
    replicate-padded x with 4x the output channels, then a pixel shuffle, gives the same map (up to
    float rounding) without building the 4x larger upsampled and padded input.
    """
    w = conv.weight  # (O, I, 3, 3)

    def phases(k: torch.Tensor, dim: int) -> torch.Tensor:  # taps along `dim` -> the 2 phases' taps, at dim 1
        a, b, c = k.unbind(dim)
        z = torch.zeros_like(a)
        return torch.stack([torch.stack([a, b + c, z], dim), torch.stack([z, a + b, c], dim)], 1)

    rows = phases(w, 2)  # (O, 2, I, 3, 3): row phase
    both = phases(rows.flatten(0, 1), 3)  # (2O, 2, I, 3, 3): column phase
    kernel = both.reshape(w.shape[0] * 4, *w.shape[1:])  # output channel o*4 + row_phase*2 + col_phase
    bias = None if conv.bias is None else conv.bias.repeat_interleave(4)
    y = _Conv.apply(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, bias, (0, 0))
    return F.pixel_shuffle(y, 2)


def winograd_convs(model: nn.Module) -> int:
    """Turn `model`'s eligible `nn.Conv2d` layers into `WinogradConv2d` in place; return how many.

    Nothing changes where NNPACK is not available. Parameters, buffers and hooks stay where they are
    (only the class of each layer changes), so state dicts, optimizers and DDP see the same model.
    """
    if not available():
        return 0
    n = 0
    for m in model.modules():
        if eligible(m):
            m.__class__ = WinogradConv2d
            n += 1
    return n


def is_winograd(model: nn.Module) -> bool:
    """Whether any of `model`'s layers runs through NNPACK (for what a run prints and records)."""
    return any(isinstance(m, WinogradConv2d) for m in model.modules())

