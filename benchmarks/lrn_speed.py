"""Forward + backward of the closed-form LRN against F.local_response_norm, one thread, interleaved.

  PYTHONPATH=. python benchmarks/lrn_speed.py                     # glibc's default allocator
  PYTHONPATH=. python benchmarks/lrn_speed.py --keep-freed-memory # split_alexnet.allocator applied first

Shapes: one stream's conv1 (64, 48, 55, 55) and conv2 (64, 128, 27, 27) maps after ReLU (the single
layout runs both streams at once: batch 128 of the same shapes). Each round runs every (shape, impl)
once, in alternating order; the table gives medians over the rounds, min-max, and minor page faults.
"""
import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from split_alexnet.allocator import keep_freed_memory
from split_alexnet.lrn import local_response_norm
from split_alexnet.spec import LRN

SHAPES = {"conv1": (64, 48, 55, 55), "conv2": (64, 128, 27, 27)}
IMPLS = {"F.local_response_norm": F.local_response_norm, "split_alexnet.lrn": local_response_norm}


def step(fn, x, g):
    y = fn(x, **LRN)
    y.backward(g)
    x.grad = None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep-freed-memory", action="store_true")
    args = p.parse_args()
    if args.keep_freed_memory:
        print("allocator:", keep_freed_memory()[1])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = {}
    for name, shape in SHAPES.items():   # ReLU outputs of about conv1's scale: a third are zeros
        x = torch.relu(torch.randn(shape) * 20 + 5).requires_grad_()
        data[name] = (x, torch.randn(shape))
    keys = [(s, i) for s in SHAPES for i in IMPLS]
    times, faults = {k: [] for k in keys}, {k: [] for k in keys}
    for r in range(args.rounds + 1):                      # round 0 is warm-up
        order = keys if r % 2 == 0 else keys[::-1]
        for key in order:
            x, g = data[key[0]]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step(IMPLS[key[1]], x, g)
            dt = time.perf_counter() - t0
            if r:
                times[key].append(dt)
                faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(f"{'shape':<24} {'impl':<22} {'ms (median)':>11} {'min-max':>15} {'faults':>8} {'speedup':>8}")
    for s in SHAPES:
        base = statistics.median(times[(s, "F.local_response_norm")])
        for i in IMPLS:
            t = times[(s, i)]
            med = statistics.median(t)
            print(f"{s + ' ' + str(SHAPES[s]):<24} {i:<22} {med * 1e3:11.1f} "
                  f"{min(t) * 1e3:7.1f}-{max(t) * 1e3:<7.1f} {statistics.median(faults[(s, i)]):8.0f} "
                  f"{base / med:8.2f}")


if __name__ == "__main__":
    main()
