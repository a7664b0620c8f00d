"""Keep freed memory in the process, so CPU training does not page-fault every step.

glibc's malloc serves a request above its mmap threshold (dynamic, at most 32 MiB on 64-bit) with a
fresh mmap and unmaps it on free; it also gives the top of the heap back once more than
M_TRIM_THRESHOLD of it is free. AlexNet's activation buffers are tens of MiB, so every step maps them
anew and the kernel zero-fills every page on first touch: minor page faults, serialised in the kernel.
`keep_freed_memory()` does from inside the process what the environment variables
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> do: no mmap for large blocks (they come from the
heap) and no trimming, so a freed buffer is reused by the next step's allocation of the same size.
The price: the process keeps its peak heap (RSS does not fall after a step), which is what a training
loop reuses anyway.

M_MMAP_THRESHOLD cannot do it alone: glibc refuses thresholds above 32 MiB, and conv1's maps are
larger. The constants are from glibc's <malloc.h>: M_TRIM_THRESHOLD -1, M_MMAP_MAX -4.
"""
import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1          # mallopt takes an int


def keep_freed_memory():
    """Tell glibc malloc to keep freed memory for reuse. Returns (applied, reason).

    Call it once, early (before the model and the first batch are allocated; chunks mapped before
    the call are still unmapped when freed). A no-op, with the reason, where the C library is not
    glibc (musl, macOS, Windows) or mallopt refuses; CUDA memory is not affected either way (torch's
    caching allocator already keeps it).
    """
    libc_name, _ = platform.libc_ver()
    if platform.system() != "Linux" or libc_name != "glibc":
        return False, f"not glibc ({platform.system()} {libc_name or 'unknown libc'}): left as is"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        return False, f"mallopt not found ({e}): left as is"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok_mmap = mallopt(M_MMAP_MAX, 0)                  # large blocks from the heap, not fresh maps
    ok_trim = mallopt(M_TRIM_THRESHOLD, _INT_MAX)     # never give the heap's top back (below 2 GiB)
    if not (ok_mmap and ok_trim):
        return False, f"mallopt refused (M_MMAP_MAX: {ok_mmap}, M_TRIM_THRESHOLD: {ok_trim})"
    return True, "glibc: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB - 1"


def apply_keep_freed_memory(enabled=True):
    """What launch/train.py, check.py and bench.py call first in main(), on every rank (it is per
    process): keep_freed_memory() unless --no-keep-freed-memory. Returns (applied, the line to log)."""
    if not enabled:
        return False, "allocator: default malloc (--no-keep-freed-memory)"
    applied, why = keep_freed_memory()
    return applied, f"allocator: {'keep freed memory' if applied else 'default malloc'}: {why}"
