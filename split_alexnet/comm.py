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


def _gather_buffers(x, sizes):
    """x padded to the largest part (parts differ only for fc8's 2-D logits), receive buffers, bytes sent."""
    big = max(sizes)
    x = x.contiguous()
    if x.shape[1] < big:
        x = torch.nn.functional.pad(x, (0, big - x.shape[1]))
    sent = (len(sizes) - 1) * x.numel() * x.element_size()  # each part reaches the S-1 other streams
    return x, [torch.empty_like(x) for _ in sizes], sent


def _scatter_buffers(grad, sizes, group):
    """grad cut into the streams' parts, this stream's receive buffer, bytes sent."""
    chunks = [c.contiguous() for c in grad.split(sizes, dim=1)]
    out = torch.empty_like(chunks[dist.get_rank(group)])
    return chunks, out, grad.numel() * grad.element_size() - out.numel() * out.element_size()


def _all_gather(x, sizes, group, name):
    """Concatenate every stream's x along dim 1 (padded to the largest part, trimmed on arrival)."""
    x, parts, sent = _gather_buffers(x, sizes)
    _metered(name, sent, lambda: dist.all_gather(parts, x, group=group))
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)


def _reduce_scatter(grad, sizes, group, name):
    """Sum grad over streams and keep this stream's slice of dim 1."""
    chunks, out, sent = _scatter_buffers(grad, sizes, group)
    _metered(name, sent, lambda: dist.reduce_scatter(out, chunks, group=group))
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


# ---- asynchronous exchanges, for overlapping communication with computation (the bench's overlap mode)
#
# An exchange in flight is a `Pending`: `start_*` issues the all-gather with async_op=True and returns at
# once; `Pending.result()` waits and returns the gathered tensor. In backward the pairing is mirrored:
# the node that waited in forward issues the reduce-scatter, and the node that started the gather waits
# for it, so the autograd engine can run other micro-batches' backward while it is in flight. With a
# Meter installed, bytes are counted when a collective is issued and seconds are the time spent blocked
# in wait() (the exposed, not hidden, part of the communication).


class Pending:
    """An exchange in flight: its work handle, the gathered parts, and (in backward) the reduced slice."""

    def __init__(self, name, group, sizes, keep_slice):
        self.name, self.group, self.sizes, self.keep_slice = name, group, sizes, keep_slice
        self.work, self.parts, self.reduced, self.chunks, self.value = None, None, None, None, None

    def wait(self, key):
        if self.work is None:
            return
        t0 = time.perf_counter()
        self.work.wait()
        if _meter is not None:
            _meter.seconds[key] += time.perf_counter() - t0
        self.work = None

    def result(self):
        """The gathered tensor (all streams' parts concatenated on dim 1); waits for the all-gather."""
        if self.value is None:
            wait = _WaitGatherKeepSlice if self.keep_slice else _WaitGatherStartReduceScatter
            self.value = wait.apply(self, *self.parts)
        return self.value


def _count(key, nbytes):
    if _meter is not None:
        _meter.bytes[key] += nbytes
        _meter.calls[key] += 1


def _start_all_gather(pending, x):
    x, parts, sent = _gather_buffers(x, pending.sizes)
    _count(f"{pending.name}/fwd", sent)
    pending.work = dist.all_gather(parts, x, group=pending.group, async_op=True)
    return tuple(parts)


class _StartGatherWaitReduceScatter(torch.autograd.Function):
    """forward: start all-gather, backward: wait for reduce-scatter."""

    @staticmethod
    def forward(ctx, x, pending):
        ctx.pending = pending
        return _start_all_gather(pending, x)

    @staticmethod
    def backward(ctx, *grads):
        p = ctx.pending
        p.wait(f"{p.name}/bwd")
        reduced, p.reduced, p.chunks = p.reduced, None, None
        return reduced, None


class _WaitGatherStartReduceScatter(torch.autograd.Function):
    """forward: wait for all-gather, backward: start reduce-scatter."""

    @staticmethod
    def forward(ctx, pending, *parts):
        ctx.pending = pending
        pending.wait(f"{pending.name}/fwd")
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.pending
        p.chunks, p.reduced, sent = _scatter_buffers(grad, p.sizes, p.group)
        _count(f"{p.name}/bwd", sent)
        p.work = dist.reduce_scatter(p.reduced, p.chunks, group=p.group, async_op=True)
        return (None, *p.chunks)


class _StartGatherKeepSlice(torch.autograd.Function):
    """forward: start all-gather, backward: keep own slice."""

    @staticmethod
    def forward(ctx, x, pending):
        ctx.pending, ctx.width = pending, x.shape[1]
        return _start_all_gather(pending, x)

    @staticmethod
    def backward(ctx, *grads):
        return grads[dist.get_rank(ctx.pending.group)][:, :ctx.width].contiguous(), None


class _WaitGatherKeepSlice(torch.autograd.Function):
    """forward: wait for all-gather, backward: split the gradient into the streams' (padded) parts."""

    @staticmethod
    def forward(ctx, pending, *parts):
        ctx.pending, ctx.big = pending, parts[0].shape[1]
        pending.wait(f"{pending.name}/fwd")
        return torch.cat([p[:, :n] for p, n in zip(parts, pending.sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        pad = torch.nn.functional.pad
        return (None, *(pad(g, (0, ctx.big - g.shape[1])) for g in grad.split(ctx.pending.sizes, dim=1)))


def _done(x, name):
    p = Pending(name, None, [x.shape[1]], True)
    p.value = x
    return p


def start_gather_for_distinct_kernels(x, group=None, name="exchange"):
    """Start gathering x (equal parts) from all streams; `.result()` later. Backward: reduce-scatter."""
    if _world(group) == 1:
        return _done(x, name)
    p = Pending(name, group, [x.shape[1]] * _world(group), keep_slice=False)
    p.parts = _StartGatherWaitReduceScatter.apply(x, p)
    return p


def start_gather_for_same_computation(x, sizes, group=None, name="logits"):
    """Start gathering x (parts of `sizes`) from all streams; `.result()` later. Backward: own slice."""
    if _world(group) == 1:
        return _done(x, name)
    p = Pending(name, group, list(sizes), keep_slice=True)
    p.parts = _StartGatherKeepSlice.apply(x, p)
    return p
