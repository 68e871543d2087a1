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
"""
from __future__ import annotations

import torch

PRECISIONS = ("auto", "fast", "fp32", "bf16", "fp16")
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
