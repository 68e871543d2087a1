"""The one precision rule: which autocast dtype a piece of work runs in, decided where it runs.

A `--precision` value is resolved on the machine that does the work (a Train worker, a Serve
replica), never on the driver: on a cluster whose nodes differ, only the worker knows its CPU.

| precision | CUDA                         | CPU with native bf16 (AVX-512 BF16, AMX) | other CPU |
|-----------|------------------------------|------------------------------------------|-----------|
| fp32      | fp32                         | fp32                                     | fp32      |
| bf16      | bf16                         | bf16                                     | bf16 (emulated: slow) |
| fp16      | fp16                         | fp16                                     | fp16      |
| auto      | AUTO_CUDA[workload]          | AUTO_NATIVE_CPU[workload]                | fp32      |
| fast      | fp16                         | bf16                                     | fp32      |

"auto" differs by workload only where a workload was checked in one precision and not the other:
training on CPU stays fp32 by default (the reference recipe's numbers), the feed-forward style
network stays fp32 on GPU, Gatys' VGG runs bf16 on a GPU that supports it. "fast" is the fast
recipe's choice: the quickest dtype that trains it well on each device.

Compilation (`--compile`, `compile_model`) is the other half of how a training job's arithmetic
runs: off by default, because on the CPUs it was measured on (2-core AVX2) inductor's training step
of the fast network was slower than eager (BENCHMARKS.md, "torch.compile").
"""
from __future__ import annotations

import torch

PRECISIONS = ("auto", "fast", "fp32", "bf16", "fp16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
WORKLOADS = ("train", "classify", "stylize", "gatys")
FIXED = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# "auto" on CUDA ("bf16?" = bf16 where the GPU supports it, else fp32)
AUTO_CUDA = {"train": torch.float16, "classify": torch.float16, "stylize": None, "gatys": "bf16?"}
# "auto" on a CPU with native bfloat16
AUTO_NATIVE_CPU = {"train": None, "classify": torch.bfloat16, "stylize": torch.bfloat16, "gatys": torch.bfloat16}


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


CPU_FLAGS = {"avx2": "avx2", "avx512": "avx512f", "avx512_bf16": "avx512_bf16", "amx": "amx_tile"}


def cpu_features(cpuinfo: str | None = "/proc/cpuinfo") -> dict[str, object]:
    """What this CPU offers the kernels, as recorded with every run: {"avx2", "avx512", "avx512_bf16",
    "amx": bool, "native_bf16": bool (`native_bf16_cpu`), "capability": torch's dispatch level
    (torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "DEFAULT", ...)}. The flags come
    from /proc/cpuinfo where it exists (Linux; `cpuinfo` None or missing: torch's probes alone)."""
    flags: set[str] = set()
    try:
        with open(cpuinfo or "") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):  # x86 "flags", ARM "Features"
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an old or unusual build
        capability = "unknown"
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported",
              "avx512": "_is_avx512_supported"}
    features: dict[str, object] = {}
    for name, flag in CPU_FLAGS.items():
        probe = getattr(torch.cpu, probes.get(name, ""), None)
        features[name] = flag in flags or bool(probe and probe()) or (name == "avx2" and capability.startswith("AVX"))
    features["native_bf16"] = native_bf16_cpu()
    features["capability"] = capability
    return features


def describe_cpu(features: dict[str, object]) -> str:
    """One line: "cpu: AVX2 yes, AVX-512 no, AVX-512 BF16 no, AMX no (torch kernels: AVX2; bf16 emulated)"."""
    names = {"avx2": "AVX2", "avx512": "AVX-512", "avx512_bf16": "AVX-512 BF16", "amx": "AMX"}
    have = ", ".join(f"{label} {'yes' if features.get(k) else 'no'}" for k, label in names.items())
    bf16 = "bf16 native" if features.get("native_bf16") else "bf16 emulated"
    return f"cpu: {have} (torch kernels: {features.get('capability')}; {bf16})"


def autocast_dtype(precision: str, device: torch.device | str, workload: str = "train",
                   native_bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: plain fp32), by the table above.

    `native_bf16` overrides the CPU probe (tests check both kinds of CPU on either).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if precision in FIXED:
        return FIXED[precision]
    device = torch.device(device)
    if device.type == "cuda":
        dtype = torch.float16 if precision == "fast" else AUTO_CUDA[workload]
        if dtype == "bf16?":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return dtype
    if device.type == "cpu" and (native_bf16_cpu() if native_bf16 is None else native_bf16):
        return torch.bfloat16 if precision == "fast" else AUTO_NATIVE_CPU[workload]
    return None


def dtype_name(dtype: torch.dtype | None) -> str:
    """None -> "fp32", torch.bfloat16 -> "bf16", torch.float16 -> "fp16": what results and /healthz report."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """`torch.compile` `model` in place (inductor in `mode`, one of COMPILE_MODES; "none" leaves it
    eager). In place (`nn.Module.compile`), so its state-dict keys, checkpoints, Lookahead weights
    and the DDP wrapper put around it later are those of the eager module. Compiling happens at the
    first calls: the first training steps (inside a time budget), then the first evaluation, and
    again for each new input shape (progressive resizing, a last batch of another size)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if mode != "none":
        model.compile(mode=None if mode == "default" else mode)
    return model
