"""Process-level settings of the machine a run executes on (nothing here changes a result, only its speed or what
happens to a worker process when its parent dies).

glibc's malloc serves blocks above its mmap threshold (128 kB, adapting up to 32 MB) with fresh `mmap`s and
returns them to the kernel on free. On CPU a cpu-small micro-batch's logits and their gradient are
8 x 256 x 8192 floats = 67 MB each, so every step faults its big buffers in again as fresh zero pages (~140k minor
faults, 0.46 s of kernel time a step here). Raising the mmap and trim thresholds keeps freed blocks in the heap
for reuse: 15x fewer faults, 0.04 s of kernel time, a step's CPU time a median 1.05x lower (noisy: 0.92-1.22
between repeats; `benchmarks/bench_malloc.py`, benchmarks/results/malloc.md). mallopt only reaches glibc; with
jemalloc or tcmalloc preloaded (PyTorch's CPU performance guide) the allocator already reuses such blocks.
The reuse starts once the heap has grown: in a fresh process the first few 64 MB blocks after the call still
fault (the faults stop after 2 to 9 allocations, varying between runs), so a run pays it in its first steps only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from (and return to) the heap


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks up to 1 GiB in the heap (once per process). Returns whether it took
    effect (False off Linux/glibc). The heap then holds its high-water mark until the process exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux; a no-op elsewhere). For pool workers: a
    worker left running after its parent was stopped would go on training queued cells into a grid or a cache that
    a new invocation is using."""
    if not sys.platform.startswith("linux"):
        return
    import signal

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
