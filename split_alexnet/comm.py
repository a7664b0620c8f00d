"""Exchanges between streams: tiny autograd Functions named for their forward/backward pairing.

The gradient rule (the paper's §3.2 split; docs/equivalence.md checks it): a gather whose result feeds
DIFFERENT kernels on every stream (conv3, fc6, fc7, fc8) must sum the streams' gradients in backward
(reduce-scatter); a gather whose result feeds the SAME computation on every stream (the logits -> one
loss) keeps only its own slice. Gathers run along dim 1 (channels / features) in stream order, or along
`dim=0` (the batch: the hybrid layout's fc6, hybrid.py, where every rank's pool5 rows feed every rank's
fc6 neurons, so the same rule applies: backward is a reduce-scatter of rows); with one rank both are the
identity. The Megatron-LM equivalents (megatron/core/tensor_parallel/mappings.py,
which gathers along the first or last dim):

| here                          | forward    | backward        | Megatron-LM                                  |
|-------------------------------|------------|-----------------|----------------------------------------------|
| `gather_for_distinct_kernels` | all-gather | reduce-scatter  | `_GatherFromSequenceParallelRegion`          |
|                               |            |                 | (tensor_parallel_output_grad=True)           |
| `gather_for_same_computation` | all-gather | keep own slice  | `_GatherFromSequenceParallelRegion`          |
|                               |            |                 | (tensor_parallel_output_grad=False), or      |
|                               |            |                 | `_GatherFromModelParallelRegion`             |
| (not needed here)             | identity   | all-reduce      | `_CopyToModelParallelRegion`, "f"            |
| (not needed here)             | all-reduce | identity        | `_ReduceFromModelParallelRegion`, "g"        |

`with metered() as m:` counts every collective's bytes sent, calls and seconds in `m` while the block
runs (the bench, the tests). The async variants for overlapping are in comm_async.py.

Which clock times a collective is an argument (`metered(clock)`, `clock_for(device_type)`):
- `HostClock` (CPU, gloo): the host's wall time. Right where the collective blocks the host until
  it is done, as gloo does on CPU tensors.
- `EventClock` (CUDA): two CUDA events recorded on the current (compute) stream, one before the
  collective and one after it, read only when `m.seconds` is read after the step. Under NCCL a
  collective is queued on NCCL's stream and its wait() only makes the compute stream wait: the host
  returns at once, so host time reads about 0. The events measure what the compute stream waited.
Neither adds a synchronisation: the meter never calls torch.cuda.synchronize.

With one stream the gathers are the identity and no collective runs; `force=True` runs the Functions
and their collectives anyway (a world of one: NCCL's code path on one GPU, scripts/gpu_check.sh).
"""
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist


class HostClock:
    """The host's wall time: a mark is time.perf_counter(). For collectives that block the host (gloo)."""
    name = "host"

    def mark(self):
        return time.perf_counter()

    def seconds(self, a, b):
        return b - a


class EventClock:
    """CUDA events on the current stream: a mark is an event recorded where the stream has got to.

    `seconds(a, b)` is the device time between the two marks on the stream, read after the work is
    done (it waits for b if it is not: call it after the step's synchronisation, where that is free).
    A mark adds no synchronisation. `event` makes the events (torch.cuda.Event; a test passes its own)."""
    name = "cuda_events"

    def __init__(self, event=None):
        self.event = event if event is not None else torch.cuda.Event

    def mark(self):
        e = self.event(enable_timing=True)
        e.record()
        return e

    def seconds(self, a, b):
        b.synchronize()                 # done already once the step has synchronised
        return a.elapsed_time(b) / 1e3  # milliseconds


def clock_for(device_type, event=None):
    """The clock that times work on `device_type`: CUDA events on "cuda", the host clock elsewhere."""
    return EventClock(event) if device_type == "cuda" else HostClock()


class Meter:
    """Bytes sent, calls and seconds per key (e.g. "conv3/fwd"), filled while `metered()` runs.

    Times are kept as pairs of the clock's marks and turned into seconds when `seconds` is read, so on
    CUDA it must be read after the measured work (the bench: after the step's one synchronize)."""

    def __init__(self, clock=None):
        self.bytes, self.calls = defaultdict(int), defaultdict(int)
        self.clock = clock if clock is not None else HostClock()
        self._seconds, self._spans = defaultdict(float), []

    def count(self, key, nbytes):
        self.bytes[key] += nbytes
        self.calls[key] += 1

    def span(self, key, a, b):
        """Add the time between two marks of self.clock to key (read later, in `seconds`)."""
        self._spans.append((key, a, b))

    def time(self, key, fn):
        a = self.clock.mark()
        out = fn()
        self.span(key, a, self.clock.mark())
        return out

    @property
    def seconds(self):
        """{key: seconds}: every span so far, resolved (on CUDA: after the work is done)."""
        spans, self._spans = self._spans, []
        for key, a, b in spans:
            self._seconds[key] += self.clock.seconds(a, b)
        return self._seconds


# The Meter of the innermost `metered()` block: a global the block sets and restores, not a ContextVar,
# because on GPU autograd runs backward (and so the backward collectives) on its own device threads.
_meter = None


@contextmanager
def metered(clock=None):
    """`with metered() as m:` m counts the collectives issued (on any thread) while the block runs;
    clock: HostClock() (the default) or EventClock() (CUDA), e.g. clock_for(device.type)."""
    global _meter
    prev, meter = _meter, Meter(clock)
    _meter = meter
    try:
        yield meter
    finally:
        _meter = prev


def active_meter():
    """The Meter of the innermost `metered()` block, or None."""
    return _meter


# The key of the last collective this process entered ("conv3/fwd"...): what guard's watchdog names
# when a peer stops answering.
last_exchange = None


def entered(key):
    """Note the collective this process now waits in (comm_async's waits call it too)."""
    global last_exchange
    last_exchange = key


def _collective(key, nbytes, fn):
    entered(key)
    if _meter is None:
        return fn()
    _meter.count(key, nbytes)
    return _meter.time(key, fn)


def _world(group):
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _gather_buffers(x, sizes, dim=1):
    """x padded on `dim` to the largest part (parts differ only for fc8's logits), receive buffers, bytes sent."""
    big = max(sizes)
    x = x.contiguous()
    if x.shape[dim] < big:  # F.pad's pairs run from the last dim back: zeros before `dim`'s pair
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1 - dim % x.dim()) + (0, big - x.shape[dim]))
    sent = (len(sizes) - 1) * x.numel() * x.element_size()  # each part reaches the S-1 other streams
    return x, [torch.empty_like(x) for _ in sizes], sent


def _scatter_buffers(grad, sizes, group, dim=1):
    """grad cut into the streams' parts, this stream's receive buffer, bytes sent."""
    chunks = [c.contiguous() for c in grad.split(sizes, dim=dim)]
    out = torch.empty_like(chunks[dist.get_rank(group)])
    return chunks, out, grad.numel() * grad.element_size() - out.numel() * out.element_size()


def _all_gather(x, sizes, group, key, dim=1):
    """Every stream's x concatenated on dim: (B, sizes[s], ...) -> (B, sum(sizes), ...) for dim 1."""
    x, parts, sent = _gather_buffers(x, sizes, dim)
    _collective(key, sent, lambda: dist.all_gather(parts, x, group=group))
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def _reduce_scatter(grad, sizes, group, key, dim=1):
    """grad summed over streams, this stream's slice of dim: (B, sum(sizes), ...) -> (B, sizes[s], ...)."""
    chunks, out, sent = _scatter_buffers(grad, sizes, group, dim)
    _collective(key, sent, lambda: dist.reduce_scatter(out, chunks, group=group))
    return out


def keep_own_slice(x, sizes, group, dim=1):
    """This rank's slice of x along dim: the backward of a gather whose output feeds the same computation
    on every rank (the logits' loss), where each rank's part of the gradient is already whole."""
    rank = dist.get_rank(group)
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()


class _GatherForDistinctKernels(torch.autograd.Function):
    """forward: all-gather, backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group, name, dim, rule=None):
        ctx.group, ctx.name, ctx.dim, ctx.sizes = group, name, dim, [x.shape[dim]] * _world(group)
        ctx.rule = rule
        return _all_gather(x, ctx.sizes, group, f"{name}/fwd", dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.rule is not None:  # an exercise's rule (exercises.py), in place of the reduce-scatter
            return _apply_rule(ctx.rule, grad, ctx.sizes, ctx.group, ctx.dim), None, None, None, None
        return _reduce_scatter(grad, ctx.sizes, ctx.group, f"{ctx.name}/bwd", ctx.dim), None, None, None, None


class _GatherForSameComputation(torch.autograd.Function):
    """forward: all-gather, backward: split (keep own slice)."""

    @staticmethod
    def forward(ctx, x, sizes, group, name, rule=None):
        ctx.group, ctx.sizes, ctx.rule = group, sizes, rule
        return _all_gather(x, sizes, group, f"{name}/fwd")

    @staticmethod
    def backward(ctx, grad):
        if ctx.rule is not None:  # an exercise's rule (exercises.py), in place of keeping its own slice
            return _apply_rule(ctx.rule, grad, ctx.sizes, ctx.group, 1), None, None, None, None
        return keep_own_slice(grad, ctx.sizes, ctx.group), None, None, None, None


class RuleError(ValueError):
    """An exercise's backward rule raised or returned the wrong shape (launch/check.py prints it in one line)."""


def _apply_rule(rule, grad, sizes, group, dim):
    """rule(grad, sizes, group, dim) -> this rank's gradient: a learner's backward, its shape checked."""
    out = rule(grad, list(sizes), group, dim)
    rank = dist.get_rank(group)
    want = grad.shape[:dim] + (sizes[rank],) + grad.shape[dim + 1:]
    if not isinstance(out, torch.Tensor) or out.shape != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuleError(f"the backward rule {getattr(rule, '__name__', rule)} returned {got} on rank {rank}: "
                        f"it must return this rank's gradient, shape {tuple(want)} (grad is {tuple(grad.shape)})")
    return out


def gather_for_distinct_kernels(x, group=None, name="exchange", dim=1, force=False, rule=None):
    """All streams' x (equal parts) concatenated on `dim`, for per-stream kernels; grads are summed.
    force: run the Function and its collectives with one stream too (else the identity).
    `rule`: the exercises' argument (exercises.py), a function (grad, sizes, group, dim) -> this rank's
    gradient that replaces the reduce-scatter in backward; None in training."""
    if _world(group) == 1 and not force:
        return x
    return _GatherForDistinctKernels.apply(x, group, name, dim, rule)


def gather_for_same_computation(x, sizes, group=None, name="logits", force=False, rule=None):
    """All streams' x (parts of `sizes`) concatenated on dim 1, for a computation every stream repeats.
    force: as gather_for_distinct_kernels'. `rule`: as above, in place of keeping its own slice."""
    if _world(group) == 1 and not force:
        return x
    return _GatherForSameComputation.apply(x, list(sizes), group, name, rule)
