"""The split layout with communication overlapped with computation: micro-batches and async exchanges.

The batch is cut into M micro-batches and the net into segments at its exchanges:

    conv1 conv2 | conv3 conv4 conv5 | fc6 | fc7 | fc8 | (logits)
                ^ exchange          ^     ^     ^     ^

Segment after segment, every micro-batch computes its part and *starts* its exchange (all-gather with
async_op=True) without waiting; the next segment waits for micro-batch m's exchange only when it is
about to compute micro-batch m. So micro-batch m's all-gather is in flight while m+1 computes. In
backward the mirrored Functions in comm_async.py start each reduce-scatter as soon as its gradient
exists and wait only when the layer below needs it; autograd runs the other micro-batches' backward
meanwhile.

Same function as `SplitAlexNet.forward`: the same layers on the same rows, logits concatenated back in
batch order, and the full batch's dropout masks (each micro-batch computes its rows of the layer's
counter-based mask, model.keep_mask; the last micro-batch moves the counter on). What differs is only floating-point
summation order: a weight gradient summed over M micro-batches instead of in one GEMM, and kernels
that may block differently for a smaller batch (the tolerance: split_alexnet/check.py, tested).
"""
import torch
from torch.profiler import record_function

from .comm_async import start_gather_for_distinct_kernels, start_gather_for_same_computation
from .model import SplitAlexNet


def segments(spec):
    """[(exchange before the segment or None, [layers])], the net cut at its exchanges."""
    out = []
    for layer in spec.layers:
        if layer.reads == "all" or not out:
            out.append((layer.name if layer.reads == "all" else None, []))
        out[-1][1].append(layer)
    return out


def overlapped_forward(net: SplitAlexNet, x, micro_batches=2):
    """SplitAlexNet's forward, over `micro_batches` micro-batches with async exchanges. (B, classes)."""
    spec, group = net.spec, net.group
    batch = x.shape[0]
    if batch % micro_batches:
        raise ValueError(f"batch {batch} does not divide into {micro_batches} micro-batches: "
                         f"use a batch size that is a multiple of {micro_batches}")
    fc8_sizes = spec.out_sizes(spec.layers[-1])
    plan, rows = segments(spec), batch // micro_batches
    cur = list(x.chunk(micro_batches))                  # M x (B/M, 3, 227, 227); later M x Pending
    for i, (exchange, layers) in enumerate(plan):
        after = plan[i + 1][0] if i + 1 < len(plan) else "logits"
        for m in range(micro_batches):
            if exchange is None:
                t = cur[m]
            else:
                with record_function(f"exchange:{exchange}/wait"):
                    t = cur[m].result()                 # e.g. (B/M, 256, 13, 13) at conv3
            for layer in layers:                        # micro-batch m: rows [m B/M, (m+1) B/M) of the masks
                with record_function(layer.name):
                    t = net.layer_fn(layer, t, net.replica * batch + m * rows, m == micro_batches - 1)
            with record_function(f"exchange:{after}/start"):
                if after == "logits":
                    cur[m] = start_gather_for_same_computation(t, fc8_sizes, group, after)
                else:
                    cur[m] = start_gather_for_distinct_kernels(t, group, after)
    with record_function("exchange:logits/wait"):
        return torch.cat([p.result() for p in cur], dim=0)  # (B, num_classes)
