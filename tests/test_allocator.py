"""keep_freed_memory(): applied on glibc (in a child process: it changes the process's malloc)."""
import platform
import subprocess
import sys

import pytest

CHILD = """
import resource, torch
from split_alexnet.allocator import keep_freed_memory
applied, why = keep_freed_memory()
assert applied, why
for _ in range(4):                     # warm-up: the first blocks settle where the heap has room
    x = torch.empty(64, 48, 55, 55); x.fill_(1.0); del x   # 37 MiB: above glibc's mmap threshold
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    x = torch.empty(64, 48, 55, 55); x.fill_(1.0); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only; elsewhere it is a no-op")
def test_freed_buffers_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 1000   # default glibc: ~9,000 faults per 37 MiB buffer, every time
