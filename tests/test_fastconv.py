"""Winograd/FFT convolutions through NNPACK (jobs.fastconv): same maps and gradients as nn.Conv2d, which
layers convert, when a converted layer falls back, and the style networks built on them."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jobs import fastconv
from jobs import style as S
from jobs.transformer_net import TransformerNet, UpsampleConv
from jobs.vgg import load_vgg

needs_nnpack = pytest.mark.skipif(not fastconv.available(), reason="this torch build has no NNPACK for this CPU")


def converted(conv: nn.Conv2d) -> nn.Conv2d:
    """A Winograd copy of `conv` (same parameters' values)."""
    twin = copy.deepcopy(conv)
    assert fastconv.winograd_convs(twin) == 1 and type(twin) is fastconv.WinogradConv2d
    return twin


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max())


@needs_nnpack
@pytest.mark.parametrize("c_in,c_out,k,pad,batch,h,w", [
    (16, 8, 3, 1, 1, 17, 19), (64, 32, 3, 1, 2, 16, 20), (3, 8, 9, 0, 1, 28, 24), (8, 3, 9, 4, 2, 18, 18),
    (32, 16, 5, 2, 1, 16, 17)])
def test_same_map_and_gradients_as_conv2d(c_in, c_out, k, pad, batch, h, w):
    torch.manual_seed(0)
    ref = nn.Conv2d(c_in, c_out, k, padding=pad)
    conv = converted(ref)
    x = torch.randn(batch, c_in, h, w, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    assert fastconv.runs(conv, x)  # NNPACK's path, not the fallback
    y, y_ref = conv(x), ref(x_ref)
    assert y.shape == y_ref.shape and close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert close(x.grad, x_ref.grad) and close(conv.weight.grad, ref.weight.grad)
    assert close(conv.bias.grad, ref.bias.grad)


@needs_nnpack
def test_frozen_weights_give_only_the_input_gradient():
    conv = converted(nn.Conv2d(16, 16, 3, padding=1)).requires_grad_(False)
    x = torch.randn(1, 16, 16, 16, requires_grad=True)
    assert fastconv.runs(conv, x)
    conv(x).square().sum().backward()
    assert x.grad is not None and conv.weight.grad is None and conv.bias.grad is None


def test_only_layers_nnpack_computes_faster_convert():
    """Stride 2, groups, dilation, a 3x3 on 3 channels (measured slower) and other padding modes stay."""
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1),                      # converts
        nn.Conv2d(3, 32, 9),                                  # converts: 243 taps
        nn.Conv2d(3, 64, 3, padding=1),                       # 27 taps
        nn.Conv2d(16, 16, 3, stride=2),
        nn.Conv2d(16, 16, 3, groups=2),
        nn.Conv2d(16, 16, 3, dilation=2),
        nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(16, 16, 17),                                # over NNPACK's 16x16
    )
    n = fastconv.winograd_convs(model)
    kinds = [type(m) is fastconv.WinogradConv2d for m in model]
    assert n == (2 if fastconv.available() else 0)
    assert kinds == [fastconv.available()] * 2 + [False] * 6
    keys = set(nn.Sequential(*[copy.deepcopy(m) for m in model]).state_dict())
    assert set(model.state_dict()) == keys  # parameters untouched: state dicts load either way


@needs_nnpack
def test_other_precisions_devices_and_disabled_run_the_default_kernels(monkeypatch):
    conv = converted(nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(1, 16, 16, 16)
    calls = []
    monkeypatch.setattr(fastconv._Conv, "apply", lambda *a: calls.append(1) or F.conv2d(a[0], a[1], a[2], 1, a[3]))
    conv(x)
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    with fastconv.disabled():
        conv(x)
    conv(x[..., :12, :12])  # a 12x12 output: NNPACK's kernel transform costs more than it saves
    conv.double()(x.double())
    assert calls == [1]  # bf16 autocast, disabled(), a small map and fp64 took nn.Conv2d's path
    assert fastconv.applies("cpu", None) and not fastconv.applies("cpu", torch.bfloat16)
    assert not fastconv.applies("cuda", None)
    with fastconv.disabled():
        assert not fastconv.applies("cpu", None)


@needs_nnpack
@pytest.mark.parametrize("h,w", [(6, 9), (1, 2), (18, 16)])
def test_upsample_conv_phases_equal_upsample_then_conv(h, w):
    """The four-phase form against nearest 2x upsampling, reflection padding and a 3x3 conv: map and
    every gradient."""
    torch.manual_seed(1)
    up = UpsampleConv(8, 4)
    ref = copy.deepcopy(up)
    fastconv.winograd_convs(up)
    x = torch.randn(2, 8, h, w, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = fastconv.upsample2_conv3x3(x, up.conv.conv)
    y_ref = ref(x_ref, (2 * h, 2 * w))
    assert y.shape == (2, 4, 2 * h, 2 * w) and close(y, y_ref)
    assert close(up(x, (2 * h, 2 * w)), y_ref)  # UpsampleConv takes the phase form at exactly 2x
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert close(x.grad, x_ref.grad) and close(up.conv.conv.weight.grad, ref.conv.conv.weight.grad)
    assert close(up.conv.conv.bias.grad, ref.conv.conv.bias.grad)


@needs_nnpack
@pytest.mark.parametrize("hw", [(64, 64), (37, 23), (5, 5)])
def test_style_network_output_is_unchanged_at_any_size(hw):
    """Odd sizes upsample to a size that is not 2x: those layers keep the interpolation path."""
    torch.manual_seed(0)
    ref = TransformerNet().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the initialisation's zero biases and unit norms
    model = copy.deepcopy(ref)
    assert fastconv.winograd_convs(model) == 14  # every stride-1 layer; the two stride-2 ones stay
    x = torch.rand(1, 3, *hw)
    with torch.no_grad():
        assert close(model(x), ref(x), 1e-4)


@needs_nnpack
def test_gatys_extractor_is_winograd_in_fp32_on_cpu_and_channels_last_otherwise():
    features = load_vgg("random", 0)
    ext = S.build_extractor(S.StyleConfig(weights="random", precision="fp32"), copy.deepcopy(features))
    assert S.conv_kernels(ext, "fp32") == "winograd" and S.conv_kernels(ext, "bf16") == "default"
    first = ext.layers[0]  # 3 input channels: the default kernels
    assert type(first) is nn.Conv2d and not first.weight.is_contiguous(memory_format=torch.channels_last)
    plain = S.build_extractor(S.StyleConfig(weights="random", precision="fp32", winograd=False),
                              copy.deepcopy(features))
    bf16 = S.build_extractor(S.StyleConfig(weights="random", precision="bf16"), copy.deepcopy(features))
    for e in (plain, bf16):
        assert S.conv_kernels(e, "fp32") == "default"
        assert e.layers[2].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 40, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    layers = [0, 5, 10]
    a, b = ext(x, layers), plain(x_ref, layers)
    assert all(close(a[i], b[i]) for i in layers)
    sum(a[i].square().mean() for i in layers).backward()
    sum(b[i].square().mean() for i in layers).backward()
    assert close(x.grad, x_ref.grad, 1e-3)


@needs_nnpack
def test_a_compiled_model_keeps_inductors_kernels():
    """torch.compile's tracer cannot run NNPACK's op: converted layers trace as nn.Conv2d. The graph
    Dynamo hands its backend (recorded here instead of compiled by inductor) holds conv2d, no NNPACK."""
    torch.manual_seed(0)
    ref = nn.Conv2d(16, 8, 3, padding=1)
    conv = converted(ref)
    x = torch.randn(2, 16, 20, 20)  # 400 output pixels: eager runs NNPACK at this size
    assert fastconv.runs(conv, x)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(conv, backend=record, fullgraph=True)
    assert close(compiled(x), ref(x))
    code = "".join(g.code for g in graphs)
    assert len(graphs) == 1 and "conv2d" in code and "nnpack" not in code.lower(), code
