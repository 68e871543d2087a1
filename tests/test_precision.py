"""The precision table of jobs/precision.py, row by row, written out here rather than derived from it.

Both kinds of CPU are checked on any machine (`native_bf16` overrides the probe); CUDA rows need no
GPU because the rule only reads the device's type, except "gatys" on CUDA, which asks the GPU
whether it has bf16: that question is answered here by a stand-in.
"""
import copy

import pytest
import torch

from jobs.precision import autocast_dtype, dtype_name

BF16, FP16, FP32 = torch.bfloat16, torch.float16, None
WORKLOADS = ("train", "classify", "stylize", "gatys")

# (precision, workload) -> (CUDA, CPU with native bf16, other CPU)
TABLE = {
    ("fp32", "train"): (FP32, FP32, FP32), ("fp32", "classify"): (FP32, FP32, FP32),
    ("fp32", "stylize"): (FP32, FP32, FP32), ("fp32", "gatys"): (FP32, FP32, FP32),
    ("bf16", "train"): (BF16, BF16, BF16), ("bf16", "classify"): (BF16, BF16, BF16),
    ("bf16", "stylize"): (BF16, BF16, BF16), ("bf16", "gatys"): (BF16, BF16, BF16),
    ("fp16", "train"): (FP16, FP16, FP16), ("fp16", "classify"): (FP16, FP16, FP16),
    ("fp16", "stylize"): (FP16, FP16, FP16), ("fp16", "gatys"): (FP16, FP16, FP16),
    # "auto": training on CPU stays fp32 (the reference recipe's numbers); the style network stays fp32 on GPU
    ("auto", "train"): (FP16, FP32, FP32), ("auto", "classify"): (FP16, BF16, FP32),
    ("auto", "stylize"): (FP32, BF16, FP32), ("auto", "gatys"): ("bf16 if the GPU has it", BF16, FP32),
    # "fast": the quickest dtype that trains the fast recipe well on each device
    ("fast", "train"): (FP16, BF16, FP32), ("fast", "classify"): (FP16, BF16, FP32),
    ("fast", "stylize"): (FP16, BF16, FP32), ("fast", "gatys"): (FP16, BF16, FP32),
}


@pytest.mark.parametrize("precision, workload", sorted(TABLE))
def test_cpu_rows(precision, workload):
    _, native, other = TABLE[precision, workload]
    assert autocast_dtype(precision, "cpu", workload, native_bf16=True) is native
    assert autocast_dtype(precision, "cpu", workload, native_bf16=False) is other


@pytest.mark.parametrize("precision, workload", sorted(k for k in TABLE if k != ("auto", "gatys")))
def test_cuda_rows(precision, workload):
    # the CPU's bf16 has no say on a GPU
    for native_bf16 in (True, False):
        assert autocast_dtype(precision, "cuda", workload, native_bf16=native_bf16) is TABLE[precision, workload][0]
        assert autocast_dtype(precision, torch.device("cuda", 1), workload, native_bf16=native_bf16) \
            is TABLE[precision, workload][0]


@pytest.mark.parametrize("gpu_has_bf16, expected", [(True, BF16), (False, FP32)])
def test_gatys_auto_on_cuda_asks_the_gpu(monkeypatch, gpu_has_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_has_bf16)
    assert autocast_dtype("auto", "cuda", "gatys") is expected


def test_other_devices_run_auto_and_fast_in_fp32():
    for workload in WORKLOADS:
        for precision in ("auto", "fast"):
            assert autocast_dtype(precision, "mps", workload, native_bf16=True) is None
        assert autocast_dtype("bf16", "mps", workload) is BF16  # a fixed choice stays what it says


def test_the_probe_decides_when_not_overridden(monkeypatch):
    for native, expected in ((True, BF16), (False, FP32)):
        monkeypatch.setattr("jobs.precision.native_bf16_cpu", lambda: native)
        assert autocast_dtype("auto", "cpu", "classify") is expected
        assert autocast_dtype("auto", "cpu", "classify", native_bf16=not native) is (FP32 if native else BF16)


def test_workload_defaults_to_train():
    assert autocast_dtype("auto", "cpu", native_bf16=True) is None
    assert autocast_dtype("auto", "cuda") is FP16


@pytest.mark.parametrize("precision, workload", [("fp8", "train"), ("AUTO", "train"), ("auto", "segment"),
                                                 ("", "classify")])
def test_unknown_values_are_refused(precision, workload):
    with pytest.raises(ValueError, match="precision|workload"):
        autocast_dtype(precision, "cpu", workload)


def test_dtype_names():
    assert [dtype_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]
    with pytest.raises(KeyError):
        dtype_name(torch.float64)


def test_cpu_features_read_cpuinfo_flags_and_torch(tmp_path):
    from jobs.precision import cpu_features, describe_cpu

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    f = cpu_features(str(info))
    assert f["avx2"] and f["avx512"] and f["avx512_bf16"] and f["amx"]
    assert f["capability"] == str(torch.backends.cpu.get_cpu_capability())
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx\n")
    plain = cpu_features(str(info))
    # a flag missing from cpuinfo: torch's own probe decides
    assert plain["avx512_bf16"] == bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    assert not plain["avx2"] or str(plain["capability"]).startswith("AVX")
    missing = cpu_features(str(tmp_path / "absent"))  # no /proc (macOS, Windows): torch's probes alone
    assert set(missing) == {"avx2", "avx512", "avx512_bf16", "amx", "native_bf16", "capability"}
    line = describe_cpu({**f, "native_bf16": True})
    assert line.startswith("cpu: AVX2 yes, AVX-512 yes, AVX-512 BF16 yes, AMX yes (torch kernels: ")
    assert line.endswith("bf16 native)")


@pytest.mark.slow  # inductor compiles a forward and a backward (~20 s on a 2-core CPU)
def test_compile_model_compiles_in_place_and_computes_what_eager_does():
    """--compile: the module itself is compiled (its state-dict keys, what checkpoints and the
    Lookahead weights hold, stay the eager ones) and computes what the eager module does;
    "none" leaves it eager; a mode torch does not have is refused."""
    from torch import nn

    from jobs.precision import compile_model

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GELU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    compiled = compile_model(copy.deepcopy(eager), "default")
    assert compiled._compiled_call_impl is not None and eager._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randn(5, 3, 8, 8)
    for m in (eager, compiled):
        m(x).square().sum().backward()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    plain = nn.Linear(2, 2)
    assert compile_model(plain, "none") is plain and plain._compiled_call_impl is None
    with pytest.raises(ValueError, match="compile mode 'fastest' is not one of none, default"):
        compile_model(plain, "fastest")
