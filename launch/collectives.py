"""The collectives of model and data parallelism on tiny tensors, and the conjugate rule in numbers.

  torchrun --nproc_per_node=2 launch/collectives.py

Runs broadcast, all-reduce, all-gather, reduce-scatter, and all-reduce as a reduce-scatter followed by
an all-gather, with gloo on the CPU, and prints what each rank holds before and after and the bytes it
sent. Then the backward of a gather (docs/concepts.md, "Collectives and their conjugates"): the 2 x 2
example of the docs, run through comm.py's two autograd Functions, showing the `grad` that reaches
backward on each rank and what each rule makes of it. Rank 0 prints everything, in rank order.

Bytes: all-gather and reduce-scatter are counted by comm.py's Meter (what leaves the rank: its own part
to each of the W - 1 others; the W - 1 parts it does not keep); broadcast as a direct send from the root,
(W - 1) x N; all-reduce as a ring sends it, 2 (W - 1) / W x N. gloo's own algorithms may schedule them
otherwise; at W = 2 these are also the least any algorithm can send.
"""
import argparse

import torch
import torch.distributed as dist

from split_alexnet import comm
from split_alexnet.cli import UsageError, env, run_main
from split_alexnet.distributed import setup, teardown
from split_alexnet.exercises import keep_own_slice


def ring_allreduce_bytes(nbytes, world):
    """What one rank sends in a ring all-reduce of a tensor of `nbytes`: a reduce-scatter, then an all-gather."""
    return 2 * (world - 1) * nbytes // world


def show(t):
    return "[" + ", ".join(f"{v:g}" for v in t.detach().flatten().tolist()) + "]"


class Report:
    """Lines from every rank, printed by rank 0 in rank order."""

    def __init__(self, rank, world):
        self.rank, self.world, self.lines = rank, world, []

    def section(self, title):
        self.lines.append(("title", title))

    def rank_line(self, text):
        self.lines.append(("rank", f"  rank {self.rank}: {text}"))

    def note(self, text):
        self.lines.append(("note", f"  {text}"))

    def print(self):
        every = [None] * self.world
        dist.all_gather_object(every, self.lines)
        if self.rank != 0:
            return
        i = 0
        while i < len(every[0]):                    # every rank records the same sections in the same order
            kind, text = every[0][i]
            if kind == "rank":
                for lines in every:
                    print(lines[i][1])
            else:
                print(("\n" + text) if kind == "title" else text)
            i += 1


def metered_bytes(fn):
    with comm.metered() as m:
        out = fn()
    return out, sum(m.bytes.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    if not env().torchrun:
        raise UsageError("collectives need several processes: run torchrun --nproc_per_node=2 launch/collectives.py")
    ctx = setup("gloo", "cpu")
    try:
        r, w = ctx.rank, ctx.world
        rep = Report(r, w)
        f32 = dict(dtype=torch.float32)
        mine = torch.tensor([1.0 + 2 * r, 2.0 + 2 * r], **f32)        # rank r: [2r+1, 2r+2]
        n = mine.numel() * mine.element_size()

        rep.section(f"broadcast from rank 0: every rank receives rank 0's tensor ({n} B)")
        x = mine.clone()
        dist.broadcast(x, src=0)
        rep.rank_line(f"before {show(mine)}  after {show(x)}  sent {(w - 1) * n if r == 0 else 0} B")

        rep.section(f"all-reduce (sum): every rank receives the sum ({n} B each)")
        x = mine.clone()
        dist.all_reduce(x)
        rep.rank_line(f"before {show(mine)}  after {show(x)}  sent {ring_allreduce_bytes(n, w)} B")

        rep.section(f"all-gather: every rank receives every rank's part, in rank order ({n} B each)")
        x, sent = metered_bytes(lambda: comm._all_gather(mine, [2] * w, None, "all-gather", dim=0))
        rep.rank_line(f"before {show(mine)}  after {show(x)}  sent {sent} B")

        full = torch.arange(1.0 + 2 * w * r, 1.0 + 2 * w * (r + 1), **f32)   # rank r: 2W numbers
        m = full.numel() * full.element_size()
        rep.section(f"reduce-scatter (sum): rank r receives part r of the sum ({m} B each, {w} parts)")
        x, sent = metered_bytes(lambda: comm._reduce_scatter(full, [2] * w, None, "reduce-scatter", dim=0))
        rep.rank_line(f"before {show(full)}  after {show(x)}  sent {sent} B")

        rep.section("all-reduce = reduce-scatter, then all-gather (the ring's two halves)")

        def both():
            part = comm._reduce_scatter(full, [2] * w, None, "rs", dim=0)
            return comm._all_gather(part, [2] * w, None, "ag", dim=0)

        x, sent = metered_bytes(both)
        direct = full.clone()
        dist.all_reduce(direct)
        assert torch.equal(x, direct), (x, direct)
        rep.rank_line(f"before {show(full)}  after {show(x)}  sent {sent} B "
                      f"(= 2 (W-1)/W x {m} B = {ring_allreduce_bytes(m, w)} B; dist.all_reduce gives the same)")

        # The conjugate rule. Rank r holds x_r = r + 1 and a row of kernels W_r over the gathered
        # [x_0, ..., x_{W-1}] (W_0 = [1, 2], W_1 = [3, 4] at W = 2); y_r = W_r . gather(x); L = sum_r y_r.
        weights = torch.arange(1.0 + w * r, 1.0 + w * (r + 1), **f32)
        rep.section("backward of a gather feeding DISTINCT kernels: y_r = W_r . gather(x), L = sum of the y_r")
        for label, rule in (("reduce-scatter (comm.py)", None), ("keep own slice (wrong)", keep_own_slice)):
            x = torch.tensor([1.0 + r], requires_grad=True)
            gathered = comm.gather_for_distinct_kernels(x, None, "distinct", dim=0, rule=rule)
            arrived = {}
            gathered.register_hook(lambda g: arrived.setdefault("grad", g.clone()))
            (weights * gathered).sum().backward()
            rep.rank_line(f"x {show(x)}  W_r {show(weights)}  grad arriving {show(arrived['grad'])}  "
                          f"{label}: dL/dx_r {show(x.grad)}")
        truth = sum(torch.arange(1.0 + w * s, 1.0 + w * (s + 1)) for s in range(w))   # sum_s W_s
        rep.note(f"true dL/dx = sum over ranks of W_r = {show(truth)}: rank r needs entry r, a sum over ranks")

        rep.section("backward of a gather feeding the SAME computation: z = gather(x), one loss "
                    "L = c . z on every rank")
        c = torch.arange(1.0, 1.0 + w, **f32)
        for label, rule in (("keep own slice (comm.py)", None),
                            ("reduce-scatter (wrong)", lambda g, sizes, group, dim:
                             comm._reduce_scatter(g, sizes, group, "wrong", dim))):
            x = torch.tensor([[1.0 + r]], requires_grad=True)
            z = comm.gather_for_same_computation(x, [1] * w, None, "same", rule=rule)
            arrived = {}
            z.register_hook(lambda g: arrived.setdefault("grad", g.clone()))
            (c * z).sum().backward()
            rep.rank_line(f"x {show(x)}  grad arriving {show(arrived['grad'])}  {label}: dL/dx_r {show(x.grad)}")
        rep.note(f"true dL/dx = c = {show(c)}: every rank already holds it; summing counts it {w} times")
        rep.print()
        return 0
    finally:
        teardown()


if __name__ == "__main__":
    run_main(main)
