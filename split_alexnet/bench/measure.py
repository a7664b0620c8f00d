"""Timing the layouts: one training step (times, communication, memory) and the interleaved schedule.

Every step of every layout is one round of an interleaved schedule (A B C D, B C D A, ...), so a noisy
machine slows all layouts alike. A step is forward + loss, backward, SGD and zero_grad. A multi-rank
number is the max over ranks (the slowest rank sets the pace; the time of a collective is its max over
ranks), except CPU seconds (summed over ranks) and `comm_min_rank_s` (min over ranks).
"""
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import record_function

from .. import comm, precision
from . import profile
from .config import threads_per_rank

TIMES = ("step_s", "fwd_s", "bwd_s", "opt_s", "idle_cpu_s", "inflight_s")
MEM_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "tracked_bytes",
            "cuda_peak_bytes")


def exchange_keys(spec):
    """"conv3/fwd", "conv3/bwd", ..., "logits/bwd", "allreduce/bwd" (ddp, mesh) and "conv-allreduce/bwd" (hybrid)."""
    return ([f"{e.name}/{d}" for e in spec.exchanges for d in ("fwd", "bwd")] + ["allreduce/bwd"] +
            ["conv-allreduce/bwd"])


@dataclass
class Step:
    """One step of one layout. Seconds unless named otherwise; dicts are keyed by exchange_keys/MEM_KEYS."""
    step_s: float = 0.0
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    opt_s: float = 0.0
    idle_cpu_s: float = 0.0        # single: the CPU the waiting rank used meanwhile
    inflight_s: float = 0.0        # ddp: the time all-reduce buckets were in flight
    comm: dict = field(default_factory=dict)     # exchange key -> seconds in (or blocked on) it
    bytes: dict = field(default_factory=dict)    # exchange key -> bytes sent
    memory: dict = field(default_factory=dict)   # MEM_KEYS -> bytes (the first step only)
    cpu_s: float = 0.0             # CPU seconds of the computing ranks' processes, summed
    comm_min_rank_s: float = 0.0   # communication, min over ranks: about the transfer itself

    def values(self, xkeys):
        """The fields reduced over ranks, as one flat list (the same order on every rank)."""
        return ([getattr(self, k) for k in TIMES] + [self.comm.get(k, 0.0) for k in xkeys] +
                [self.bytes.get(k, 0) for k in xkeys] + [self.memory.get(k, 0) for k in MEM_KEYS])

    @classmethod
    def from_values(cls, values, xkeys):
        it = iter(values)
        times = {k: next(it) for k in TIMES}
        comm_s, sent = {k: next(it) for k in xkeys}, {k: next(it) for k in xkeys}
        return cls(**times, comm=comm_s, bytes=sent, memory={k: next(it) for k in MEM_KEYS})


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward (the activations), each storage counted once."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.storages = {}

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.params:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self):
        return sum(self.storages.values())


def _tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _covered(intervals):
    """The total length of the union of (t0, t1) intervals (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def step(run, x, y, clock, track_memory=False, autocast_dtype=None):
    """One training step of `run` on this rank: times, comm per exchange, and (optionally) memory.

    clock (comm.HostClock or comm.EventClock, comm.clock_for(device type)) times the phases, every
    exchange and ddp's buckets. Nothing inside the step synchronises for the measurement: on CUDA the
    marks are events on the stream, and one torch.cuda.synchronize after the step (the one a step ends
    with anyway, to know it is done) makes them all readable.

    With autocast_dtype (bf16/fp16) forward and loss run under torch.autocast; backward and SGD follow
    autocast's dtypes (fp32 weights and gradients). fp16 runs without a GradScaler: this times a step,
    it does not train (a scaler adds an unscale pass and an inf check per step).
    """
    if run.allreduce is not None:
        run.allreduce.reset(clock)
    cuda = x.device.type == "cuda"
    if cuda:  # before the step: the device idle, so the step's first mark is its start
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    params = list(run.net.parameters())
    saved = _SavedBytes(params) if track_memory else None
    with comm.metered(clock) as meter, record_function(f"step:{run.label}"):
        m0 = clock.mark()
        with precision.autocast(x.device.type, autocast_dtype):
            if saved:
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                    out = run.forward(run.net, x)
            else:
                out = run.forward(run.net, x)
            loss = F.cross_entropy(out.float(), y)
        m1 = clock.mark()
        loss.backward()
        m2 = clock.mark()
        grad_bytes = _tensor_bytes(p.grad for p in params)
        run.opt.step()
        run.opt.zero_grad()
        m3 = clock.mark()
    if cuda:
        torch.cuda.synchronize()  # the step's one synchronisation: every mark above is done now
    sec = clock.seconds
    rec = Step(step_s=sec(m0, m3), fwd_s=sec(m0, m1), bwd_s=sec(m1, m2), opt_s=sec(m2, m3),
               comm=dict(meter.seconds), bytes=dict(meter.bytes))
    if run.allreduce is not None:  # ddp: exposed = backward's tail after the last bucket was issued
        h = run.allreduce
        rec.comm["allreduce/bwd"] = max(0.0, sec(h.last_issue, m2)) if h.last_issue is not None else 0.0
        rec.bytes["allreduce/bwd"] = h.bytes
        rec.inflight_s = _covered([(sec(m0, a), sec(m0, b)) for a, b in h.intervals])
    if track_memory:
        param_bytes = _tensor_bytes(params)
        opt_bytes = _tensor_bytes(t for st in run.opt.state.values() for t in st.values()
                                  if torch.is_tensor(t))
        run_resident = param_bytes + opt_bytes
        rec.memory = dict(param_bytes=param_bytes, grad_bytes=grad_bytes, optimizer_bytes=opt_bytes,
                          activation_bytes=saved.total,
                          tracked_bytes=param_bytes + grad_bytes + opt_bytes + saved.total)
        if cuda:  # this run's peak: the step's peak above what was resident, plus its own weights/state
            rec.memory["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - resident + run_resident
    return rec


def over_ranks(values, device, op):
    """values (floats) reduced element-wise over ranks with `op` (as they are with one rank)."""
    vec = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        vec = vec.to(device) if device.type == "cuda" else vec
        dist.all_reduce(vec, op=op)
    return vec.cpu().tolist()


def _barrier(ctx):
    if ctx.world > 1:
        dist.barrier()


def measure(runs, spec, batch, cfg, ctx, profile_dir=None, progress=None, clock=None):
    """Interleaved steps of every run at one batch size; fills run.samples[batch] and run.memory[batch].
    progress (progress.BenchProgress): told of every layout's step. clock: what times the steps
    (default comm.clock_for(the device's type): CUDA events on GPU, the host clock on CPU)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=gen).to(ctx.device)
    y = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(ctx.device)
    inputs = {spec.image_size: x}  # the same labels; other input sizes (torchvision's 224 px) their own
    for size in {r.image_size for r in runs if r.image_size and r.image_size != spec.image_size}:
        g = torch.Generator().manual_seed(cfg.seed + 2)
        inputs[size] = torch.randn(batch, 3, size, size, generator=g).to(ctx.device)
    per_rank = threads_per_rank(ctx.world)
    clock = clock if clock is not None else comm.clock_for(ctx.device.type)
    xkeys = exchange_keys(spec)
    prof = None
    for i in range(cfg.warmup + cfg.steps):
        if i == cfg.warmup and profile_dir:
            prof = profile.start(ctx.device)
        for run in runs[i % len(runs):] + runs[:i % len(runs)]:  # A B C, B C A, C A B, ...
            _barrier(ctx)
            c0 = time.process_time()
            if ctx.rank in run.ranks:
                xr, yr = inputs[run.image_size or spec.image_size], y
                if run.rows:  # ddp, mesh: its rows in and out; hybrid: its rows in, the whole batch's logits out
                    xr = x[_rows(run.rows, batch)]
                    yr = y[_rows(run.out_rows, batch)] if run.out_rows else y
                torch.set_num_threads(run.threads)
                c1 = time.process_time()
                rec = step(run, xr, yr, clock, track_memory=(i == 0), autocast_dtype=cfg.autocast_dtype)
                cpu = time.process_time() - c1  # this process's CPU seconds (all its threads) in the step
                torch.set_num_threads(per_rank)
            else:
                rec, cpu = Step(), 0.0
            _barrier(ctx)
            if ctx.rank not in run.ranks:  # CPU the waiting rank burned while the others computed
                rec.idle_cpu_s = time.process_time() - c0
            (cpu,) = over_ranks([cpu], ctx.device, dist.ReduceOp.SUM)
            least = over_ranks([rec.comm.get(k, 0.0) for k in xkeys], ctx.device, dist.ReduceOp.MIN)
            rec = Step.from_values(over_ranks(rec.values(xkeys), ctx.device, dist.ReduceOp.MAX), xkeys)
            rec.cpu_s = cpu
            # the rank that reaches a collective last waits only for the transfer itself: min over ranks
            rec.comm_min_rank_s = sum(least)
            if i == 0:
                run.memory[batch] = rec.memory
            if i >= cfg.warmup:
                run.samples.setdefault(batch, []).append(rec)
            if progress is not None:
                progress.step(batch, i, cfg.warmup, cfg.steps, run.label, len(runs))
    if prof is not None:
        shares = profile.stop(prof, profile_dir, ctx.rank, device_time=ctx.device.type == "cuda")  # label -> [LRN share per profiled step]
        for run in runs:  # max over ranks, like every multi-rank figure (0 on a rank that did not compute)
            mine = shares.get(run.label, [])
            n = max(over_ranks([len(mine)], ctx.device, dist.ReduceOp.MAX)[0], 0)
            pad = [profile.NO_LRN] * (int(n) - len(mine))  # a rank that did not compute this layout
            vals = over_ranks(mine + pad, ctx.device, dist.ReduceOp.MAX) if n else []
            run.lrn_share[batch] = [v for v in vals if v >= 0]  # NO_LRN: no "lrn" range on any rank


def _rows(rows, batch):
    """(part, parts): that part's rows of the global batch."""
    part, parts = rows
    n = batch // parts
    return slice(part * n, (part + 1) * n)
