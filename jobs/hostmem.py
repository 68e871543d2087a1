"""Keep freed CPU tensor memory in the process, so that large tensors do not page-fault on every call.

glibc's malloc serves every block of 32 MiB or more (and, from a thread's own arena, every block that
does not fit its 64 MiB heaps) with a fresh `mmap`, and gives it back to the kernel when the tensor
is freed. The next call's tensor of the same size then touches brand-new pages: one page fault and
one page zeroed per 4 KiB. The classifier's batch of 16 (ResNet-18 at 224 px: first maps of 51 MB)
took ~37,600 minor faults per forward, a 512x512 style-network forward ~100,000. With the settings
below: none, and on a 2-core AVX2 CPU in fp32 (`bench/malloc_probe.py`, BENCHMARKS.md "Serving") the
batch-16 forward ran 1.26x faster, the 512x512 style forward 1.20x, Gatys steps 1.12x; one image 0.97x.

The settings: no mmap for large blocks (`MALLOC_MMAP_MAX_=0`), no trimming of the heap's free top
(`MALLOC_TRIM_THRESHOLD_` 1 GiB), and one arena (`MALLOC_ARENA_MAX=1`), because Serve replicas
compute in threads, and a thread's arena unmaps its heaps when they empty whatever the trim
threshold. The costs: memory (a process keeps its peak heap between calls: +27-172 MB for those
workloads), and one arena shared by every thread, which made the unbatched classifier (single
224 px images: small maps, nothing to gain) ~8% slower under 32 concurrent clients, and the
service's hostile-input test (tests/test_serve_ops.py, fuzz: many small requests on every route)
took 35-37 s instead of 20-22 s, its replicas' start-up ~9 s longer. So they are opt-in
(RAYCV_KEEP_FREED_MEMORY=1), for a service whose load is batches or large images, and then only the
replicas whose models compute large maps take them (the batching classifier, both style pools).
glibc reads them when a process starts, so a process that wants them gets `ENV` in its environment
(`runtime_env()` for Ray). Other C libraries (musl, macOS) do not read these variables.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

TRIM_THRESHOLD = 1 << 30
# read by glibc when a process starts (`mallopt` could set the last two later, but not the arena count:
# a running process's threads already have their arenas)
ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
SWITCH = "RAYCV_KEEP_FREED_MEMORY"


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc's handle on Linux, None elsewhere (or where it cannot be loaded)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has mallopt as a no-op stub, and no such function)
        return libc
    except (OSError, AttributeError):
        return None


def runtime_env(large_maps: bool = True) -> dict:
    """A Ray `runtime_env` whose processes start with the settings, or {}: opt-in, by
    RAYCV_KEEP_FREED_MEMORY=1 (for processes whose work has large maps: `large_maps`, the caller knows)
    or =force (for every process asked; benchmarks' ablations); {} without glibc."""
    wanted = os.environ.get(SWITCH, "0")
    if not _glibc() or not (wanted == "force" or (wanted == "1" and large_maps)):
        return {}
    return {"env_vars": dict(ENV)}
