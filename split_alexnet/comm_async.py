"""The exchanges of comm.py, started asynchronously: for overlapping communication with computation.

An exchange in flight is a `Pending`: `start_*` issues the all-gather with async_op=True and returns at
once; `Pending.result()` waits and returns the gathered tensor. In backward the pairing is mirrored:
the node that waited in forward issues the reduce-scatter, and the node that started the gather waits
for it, so the autograd engine can run other micro-batches' backward while it is in flight. Inside
`comm.metered()`, bytes are counted when a collective is issued and seconds are the time spent blocked
in wait() (the exposed, not hidden, part of the communication), on the meter's clock: the host's on
CPU (gloo's wait() blocks the host until the data is here), CUDA events on GPU, recorded on the
compute stream just before and just after wait(): under NCCL wait() returns to the host at once and
only makes the compute stream wait for NCCL's, so the exposed time is the gap between those two
events on the compute stream, and the host's clock would read about 0. Its only user is overlap.py.
"""
import torch
import torch.distributed as dist

from . import comm
from .comm import _gather_buffers, _scatter_buffers, _world, active_meter


class Pending:
    """An exchange in flight: its work handle, the gathered parts, and (in backward) the reduced slice."""

    def __init__(self, name, group, sizes, keep_own_slice):
        self.name, self.group, self.sizes, self.keep_own_slice = name, group, sizes, keep_own_slice
        self.work, self.parts, self.reduced, self.chunks, self.value = None, None, None, None, None

    def wait(self, key):
        if self.work is None:
            return
        comm.entered(key)                           # what guard's watchdog names if the peer never answers
        meter = active_meter()
        if meter is None:
            self.work.wait()
        else:
            meter.time(key, self.work.wait)  # on the compute stream (CUDA): what it waited for the data
        self.work = None

    def result(self):
        """The gathered tensor (all streams' parts concatenated on dim 1); waits for the all-gather.
        Call it once. The Pending keeps no tensor afterwards: the autograd nodes hold it (ctx.pending),
        so a Pending holding their outputs would close a reference cycle through the graph that Python's
        garbage collector does not see, and every step's activations would leak (measured: the split's
        training with --micro-batches 2 grew by ~15 MB/s per rank)."""
        if self.value is not None:                  # one stream: nothing was exchanged (_done)
            return self.value
        wait = _WaitGatherKeepOwnSlice if self.keep_own_slice else _WaitGatherStartReduceScatter
        value, self.parts = wait.apply(self, *self.parts), None
        return value


def _count(key, nbytes):
    meter = active_meter()
    if meter is not None:
        meter.count(key, nbytes)


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


class _StartGatherKeepOwnSlice(torch.autograd.Function):
    """forward: start all-gather, backward: keep own slice."""

    @staticmethod
    def forward(ctx, x, pending):
        ctx.pending, ctx.width = pending, x.shape[1]
        return _start_all_gather(pending, x)

    @staticmethod
    def backward(ctx, *grads):
        return grads[dist.get_rank(ctx.pending.group)][:, :ctx.width].contiguous(), None


class _WaitGatherKeepOwnSlice(torch.autograd.Function):
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


def start_gather_for_distinct_kernels(x, group=None, name="exchange", force=False):
    """Start gathering x (equal parts) from all streams; `.result()` later. Backward: reduce-scatter.
    force: run the Functions and their collectives with one stream too (comm.py)."""
    if _world(group) == 1 and not force:
        return _done(x, name)
    p = Pending(name, group, [x.shape[1]] * _world(group), keep_own_slice=False)
    p.parts = _StartGatherWaitReduceScatter.apply(x, p)
    return p


def start_gather_for_same_computation(x, sizes, group=None, name="logits", force=False):
    """Start gathering x (parts of `sizes`) from all streams; `.result()` later. Backward: own slice.
    force: as start_gather_for_distinct_kernels'."""
    if _world(group) == 1 and not force:
        return _done(x, name)
    p = Pending(name, group, list(sizes), keep_own_slice=True)
    p.parts = _StartGatherKeepOwnSlice.apply(x, p)
    return p
