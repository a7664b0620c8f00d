"""Communication between streams: each exchange a tiny autograd Function (after Megatron-LM's mappings).

The gradient rule (../shared/reference/alexnet-2012.md): an all-gather feeding DIFFERENT kernels on
every stream (conv3, fc6, fc7, fc8) must sum the incoming gradients in backward (reduce-scatter); a
gather feeding the SAME computation on every stream (the logits -> one loss) only keeps its own slice.
Tensors are gathered along dim 1 (channels / features), in stream order. With one stream both are
the identity. A `Meter` may be installed to count bytes sent and time each collective (the bench).
"""
import time
from collections import defaultdict

import torch
import torch.distributed as dist


class Meter:
    """Bytes sent and seconds spent per (exchange, direction), for the bench and the tests."""

    def __init__(self, sync=None):
        self.bytes = defaultdict(int)
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.sync = sync  # e.g. torch.cuda.synchronize, so a collective's time is its own

    def time(self, key, nbytes, fn):
        if self.sync:
            self.sync()
        t0 = time.perf_counter()
        out = fn()
        if self.sync:
            self.sync()
        self.seconds[key] += time.perf_counter() - t0
        self.bytes[key] += nbytes
        self.calls[key] += 1
        return out

    def reset(self):
        self.bytes.clear(), self.seconds.clear(), self.calls.clear()


_meter = None


def set_meter(meter):
    """Install a Meter (or None); returns the previous one."""
    global _meter
    prev, _meter = _meter, meter
    return prev


def _metered(name, nbytes, fn):
    return fn() if _meter is None else _meter.time(name, nbytes, fn)


def _world(group):
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_gather(x, sizes, group, name):
    """Concatenate every stream's x along dim 1; parts may differ in size by padding to the largest."""
    big = max(sizes)
    x = x.contiguous()
    if x.shape[1] < big:  # uneven parts (fc8's logits only, which are 2-D): pad, gather, trim
        x = torch.nn.functional.pad(x, (0, big - x.shape[1]))
    parts = [torch.empty_like(x) for _ in sizes]
    sent = (len(sizes) - 1) * x.numel() * x.element_size()  # a ring: each part travels to S-1 peers
    _metered(name, sent, lambda: dist.all_gather(parts, x, group=group))
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)


def _reduce_scatter(grad, sizes, group, name):
    """Sum grad over streams and keep this stream's slice of dim 1."""
    chunks = [c.contiguous() for c in grad.split(sizes, dim=1)]
    out = torch.empty_like(chunks[dist.get_rank(group)])
    _metered(name, grad.numel() * grad.element_size() - out.numel() * out.element_size(),
             lambda: dist.reduce_scatter(out, chunks, group=group))
    return out


def _own_slice(x, sizes, group):
    rank = dist.get_rank(group)
    return x.narrow(1, sum(sizes[:rank]), sizes[rank]).contiguous()


class _GatherForDistinctKernels(torch.autograd.Function):
    """forward: all-gather, backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group, name):
        ctx.group, ctx.name, ctx.sizes = group, name, [x.shape[1]] * _world(group)
        return _all_gather(x, ctx.sizes, group, f"{name}/fwd")

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.sizes, ctx.group, f"{ctx.name}/bwd"), None, None


class _GatherForSameComputation(torch.autograd.Function):
    """forward: all-gather, backward: split (keep own slice)."""

    @staticmethod
    def forward(ctx, x, sizes, group, name):
        ctx.group, ctx.sizes = group, sizes
        return _all_gather(x, sizes, group, f"{name}/fwd")

    @staticmethod
    def backward(ctx, grad):
        return _own_slice(grad, ctx.sizes, ctx.group), None, None, None


def gather_for_distinct_kernels(x, group=None, name="exchange"):
    """All streams' x (equal parts) concatenated on dim 1, for per-stream kernels; grads are summed."""
    if _world(group) == 1:
        return x
    return _GatherForDistinctKernels.apply(x, group, name)


def gather_for_same_computation(x, sizes, group=None, name="logits"):
    """All streams' x (parts of `sizes`) concatenated on dim 1, for a computation every stream repeats."""
    if _world(group) == 1:
        return x
    return _GatherForSameComputation.apply(x, list(sizes), group, name)
