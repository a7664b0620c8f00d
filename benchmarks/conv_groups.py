"""conv2/4/5 of the single layout: one grouped convolution (groups=2) against two half-width ones.

  PYTHONPATH=. python benchmarks/conv_groups.py [--keep-freed-memory] [--channels-last]

Forward + backward (input, weight and bias gradients), batch 64, one thread, interleaved rounds,
medians. "split" runs the two streams' convolutions one after the other on the input's halves and
concatenates, which is what the streams layout does; it computes the same function.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

from split_alexnet.allocator import keep_freed_memory

LAYERS = {"conv2": (96, 256, 5, 2, 27), "conv4": (384, 384, 3, 1, 13), "conv5": (384, 256, 3, 1, 13)}


class Split(nn.Module):
    def __init__(self, conv):
        super().__init__()
        g, cin, cout = conv.groups, conv.in_channels // conv.groups, conv.out_channels // conv.groups
        self.parts = nn.ModuleList(nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding)
                                   for _ in range(g))
        with torch.no_grad():
            for i, part in enumerate(self.parts):
                part.weight.copy_(conv.weight[i * cout:(i + 1) * cout])
                part.bias.copy_(conv.bias[i * cout:(i + 1) * cout])

    def forward(self, x):
        return torch.cat([p(t) for p, t in zip(self.parts, x.chunk(len(self.parts), 1))], 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--keep-freed-memory", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    if args.keep_freed_memory:
        print("allocator:", keep_freed_memory()[1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    cases = {}
    for name, (cin, cout, k, pad, hw) in LAYERS.items():
        grouped = nn.Conv2d(cin, cout, k, 1, pad, groups=2)
        x = torch.randn(args.batch_size, cin, hw, hw).to(memory_format=fmt).requires_grad_()
        g = torch.randn(args.batch_size, cout, hw, hw).to(memory_format=fmt)
        split = Split(grouped)
        torch.testing.assert_close(split(x), grouped(x), rtol=1e-4, atol=1e-4)
        cases[(name, "grouped")] = (grouped.to(memory_format=fmt), x, g)
        cases[(name, "split")] = (split.to(memory_format=fmt), x, g)
    times = {k: [] for k in cases}
    keys = list(cases)
    for r in range(args.rounds + 1):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            mod, x, g = cases[key]
            t0 = time.perf_counter()
            mod(x).backward(g)
            dt = time.perf_counter() - t0
            x.grad = None
            mod.zero_grad(set_to_none=True)
            if r:
                times[key].append(dt)
    print(f"batch {args.batch_size}, 1 thread, {'channels_last' if args.channels_last else 'NCHW'}, "
          f"fwd+bwd ms, median of {args.rounds}")
    for name in LAYERS:
        a, b = statistics.median(times[(name, "grouped")]), statistics.median(times[(name, "split")])
        print(f"{name}: grouped {a * 1e3:7.1f}  split {b * 1e3:7.1f}  grouped/split {a / b:5.2f}")


if __name__ == "__main__":
    main()
