"""keep_freed_memory(): applied on glibc (in a child process: it changes the process's malloc)."""
import platform
import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from split_alexnet.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    applied, why = keep_freed_memory()
    assert applied, why
for _ in range(4):                     # warm-up: the first blocks settle where the heap has room
    x = torch.empty(64, 48, 55, 55); x.fill_(1.0); del x   # 37 MiB: above glibc's mmap threshold
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.empty(64, 48, 55, 55); x.fill_(1.0); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""
PAGES = 64 * 48 * 55 * 55 * 4 // 4096   # 9,075 pages of 4 KiB: one buffer's first touch


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only; elsewhere it is a no-op")
@pytest.mark.slow
def test_freed_buffers_are_reused_without_page_faults():
    # default glibc maps and unmaps the buffer every time: ~PAGES faults in each of the 20 rounds
    assert _faults("default") >= 10 * PAGES
    # kept: the freed chunk is reused. A small allocation may split it now and then, and the heap then
    # grows by one buffer (measured: 0 or 1 such growth in 20 rounds); never once per round
    assert _faults("keep") <= 2 * PAGES
