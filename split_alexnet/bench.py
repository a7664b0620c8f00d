"""What model parallelism costs: the layouts timed side by side in one job (launch/bench.py).

Layouts (docs/benchmarks.md):
- single         the whole net on one device. Under torchrun rank 0 runs it while the others wait at a
                 barrier (a blocking wait: its CPU use is measured and reported). On CPU twice: with one
                 rank's threads ("one device") and with every core ("the whole machine").
- split          SplitAlexNet, one stream per rank, synchronous exchanges (comm.py).
- split-overlap  the same, micro-batched, exchanges started async and waited on only when needed
                 (overlap.py); the communication time it reports is the time blocked in wait().
- streams        (on request) StreamsAlexNet: every stream in rank 0's process on its device, one
                 after the other: the in-process two-stream layout, e.g. on one GPU.
- ddp            torch DDP of the single net over the same ranks: each rank takes batch/world images of
                 the same global batch, so every layout processes the same images per step.

Every step of every layout is one round of an interleaved schedule (A B C D, B C D A, ...), so a noisy
machine slows all layouts alike; statistics are over the steps after warm-up. A step is forward + loss,
backward, SGD (momentum 0.9) and zero_grad. A multi-rank number is the max over ranks (the slowest
rank sets the pace; the time of a collective is its max over ranks).
"""
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.profiler import record_function

from . import comm
from .cli import UsageError, log
from .model import AlexNet, SplitAlexNet, StreamsAlexNet, forward_plan
from .overlap import overlapped_forward
from .spec import Spec

LAYOUTS = ("single", "split", "split-overlap", "ddp")
EXTRA_LAYOUTS = ("streams",)  # on request: every stream in one process, on one device
PHASES = ("step_s", "fwd_s", "bwd_s", "opt_s", "idle_cpu_s", "inflight_s", "comm_min_rank_s")


@dataclass
class Config:
    batch_sizes: list              # the main batch first, then the rest of a sweep
    image_size: int = 227
    layouts: tuple = LAYOUTS
    steps: int = 5
    warmup: int = 1
    dtype: str = "fp32"
    micro_batches: int = 2
    profile: str = None
    out: str = None
    seed: int = 0
    command: str = ""
    streams: int = 2               # one process (no torchrun): the streams of single/streams layouts


def streams_of(cfg, world):
    """Under torchrun one stream per rank; alone, the configured number (the paper's 2)."""
    return world if world > 1 else cfg.streams


def cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def check_config(cfg, world, device_type):
    """Refuse bad input before any work: one line naming the problem and the fix."""
    if cfg.dtype not in ("fp32", "bf16"):
        raise UsageError(f"--dtype {cfg.dtype}: use fp32 or bf16")
    if cfg.dtype == "bf16" and device_type != "cuda":
        raise UsageError("--dtype bf16 is for GPUs (CPU bf16 kernels would measure emulation, not the "
                         "layouts): use --dtype fp32 on CPU")
    bad = [l for l in cfg.layouts if l not in LAYOUTS + EXTRA_LAYOUTS]
    if bad or not cfg.layouts:
        raise UsageError(f"--layouts {','.join(cfg.layouts)}: choose from {','.join(LAYOUTS + EXTRA_LAYOUTS)}")
    multi = [l for l in cfg.layouts if l not in ("single", "streams")]
    if multi and world < 2:
        raise UsageError(f"{','.join(multi)} need one process per stream: run under torchrun "
                         f"--nproc_per_node=2, or use --layouts single")
    if cfg.steps < 1 or cfg.warmup < 0 or cfg.micro_batches < 1:
        raise UsageError("--steps and --micro-batches must be at least 1, --warmup at least 0")
    for b in cfg.batch_sizes:
        if b < 1:
            raise UsageError(f"batch size {b}: use a positive batch size")
        if "ddp" in cfg.layouts and b % world:
            raise UsageError(f"batch {b} does not split over {world} ddp ranks: use a multiple of {world}")
        if "split-overlap" in cfg.layouts and b % cfg.micro_batches:
            raise UsageError(f"batch {b} does not divide into {cfg.micro_batches} micro-batches: use a "
                             f"multiple of {cfg.micro_batches} or change --micro-batches")
    try:
        Spec(streams=streams_of(cfg, world), image_size=cfg.image_size)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ---- the forward passes, with a profiler label per layer and per exchange ----

def labelled_forward(net, x):
    """AlexNet.forward or SplitAlexNet.forward (the same plan and comm Functions), labelled per layer."""
    spec, layer_fn, exchange = net.spec, net.layer_fn, net.exchange

    def labelled_layer(layer, t):
        with record_function(layer.name):
            return layer_fn(layer, t)

    def labelled_exchange(name, t):
        with record_function(f"exchange:{name}"):
            return exchange(name, t)

    return forward_plan(spec, x, labelled_layer, labelled_exchange)


class Labelled(nn.Module):
    """A module whose forward is labelled_forward(net, x): what DDP wraps."""

    def __init__(self, net):
        super().__init__()
        self.net, self.spec = net, net.spec

    def forward(self, x):
        return labelled_forward(self.net, x)


# ---- one layout, ready to step ----

@dataclass
class Run:
    layout: str
    label: str
    threads: int
    devices: int
    ranks: tuple        # the ranks that compute (single: rank 0)
    net: nn.Module = None
    opt: torch.optim.Optimizer = None
    forward: object = None
    meter: comm.Meter = field(default_factory=comm.Meter)
    hook_state: dict = None
    samples: dict = field(default_factory=dict)   # batch -> list of per-step dicts
    memory: dict = field(default_factory=dict)    # batch -> memory dict


def _ddp_hook(state, bucket):
    """DDP's default all-reduce, with bytes counted and the time each bucket is in flight recorded."""
    buf = bucket.buffer()
    world = dist.get_world_size()
    state["bytes"] += 2 * (world - 1) * buf.numel() * buf.element_size() // world  # ring all-reduce
    t0 = time.perf_counter()
    state["last_issue"] = t0

    def done(fut):
        state["intervals"].append((t0, time.perf_counter()))
        return fut.value()

    return default_hooks.allreduce_hook(None, bucket).then(done)


def build_runs(cfg, spec, ctx):
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    per_rank = max(1, cores() // max(ctx.world, 1))
    runs = []

    def make(layout, label, threads, devices, ranks, net, forward):
        if ctx.rank in ranks:
            if not isinstance(net, nn.parallel.DistributedDataParallel):
                net = net.to(ctx.device, dtype)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        else:
            net, opt = None, None
        sync = torch.cuda.synchronize if ctx.device.type == "cuda" else None  # a collective's own time
        runs.append(Run(layout, label, threads, devices, ranks, net, opt, forward, comm.Meter(sync)))
        return runs[-1]

    for layout in cfg.layouts:
        torch.manual_seed(cfg.seed)  # the same weights on every rank
        if layout == "single":
            one = AlexNet(spec=Spec(streams=spec.streams, image_size=spec.image_size),
                          dropout_seed=cfg.seed) if ctx.rank == 0 else None
            if ctx.device.type == "cpu":
                make("single", f"single ({per_rank} thr)", per_rank, 1, (0,), one, labelled_forward)
                if cores() != per_rank:  # the whole machine: the same model, every core
                    runs.append(Run("single", f"single ({cores()} thr)", cores(), 1, (0,),
                                    runs[-1].net, runs[-1].opt, labelled_forward, comm.Meter()))
            else:
                make("single", "single", per_rank, 1, (0,), one, labelled_forward)
        elif layout == "streams":
            net = StreamsAlexNet(spec, [ctx.device] * spec.streams, dropout_seed=cfg.seed) \
                if ctx.rank == 0 else None
            make("streams", "streams (1 dev)", per_rank, 1, (0,), net, lambda n, x: n(x))
        elif layout in ("split", "split-overlap"):
            net = SplitAlexNet(spec, ctx.rank, dropout_seed=cfg.seed)
            fwd = (labelled_forward if layout == "split"
                   else (lambda n, x, m=cfg.micro_batches: overlapped_forward(n, x, m)))
            make(layout, layout, per_rank, ctx.world, tuple(range(ctx.world)), net, fwd)
        elif layout == "ddp":
            net = Labelled(AlexNet(spec=Spec(streams=spec.streams, image_size=spec.image_size),
                                   dropout_seed=cfg.seed)).to(ctx.device, dtype)
            kwargs = dict(device_ids=[ctx.device]) if ctx.device.type == "cuda" else {}
            ddp = nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=True, **kwargs)
            run = make("ddp", "ddp", per_rank, ctx.world, tuple(range(ctx.world)), ddp,
                       lambda n, x: n(x))
            run.hook_state = {"bytes": 0, "last_issue": 0.0, "intervals": []}
            ddp.register_comm_hook(run.hook_state, _ddp_hook)
    return runs


# ---- timing one step ----

class Clock:
    """Wall time; on GPU after torch.cuda.synchronize(), so a phase's time covers its kernels."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


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


def _union(intervals):
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def step(run, x, y, clock, track_memory=False):
    """One training step of `run` on this rank: times, comm per exchange, and (optionally) memory."""
    prev = comm.set_meter(run.meter)
    run.meter.reset()
    if run.hook_state is not None:
        run.hook_state.update(bytes=0, last_issue=0.0, intervals=[])
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    params = list(run.net.parameters())
    saved = _SavedBytes(params) if track_memory else None
    try:
        with record_function(f"step:{run.label}"):
            t0 = clock()
            if saved:
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                    out = run.forward(run.net, x)
            else:
                out = run.forward(run.net, x)
            loss = F.cross_entropy(out.float(), y)
            t1 = clock()
            loss.backward()
            t2 = clock()
            grad_bytes = _tensor_bytes(p.grad for p in params)
            run.opt.step()
            run.opt.zero_grad()
            t3 = clock()
    finally:
        comm.set_meter(prev)
    rec = dict(step_s=t3 - t0, fwd_s=t1 - t0, bwd_s=t2 - t1, opt_s=t3 - t2)
    for key, s in run.meter.seconds.items():
        rec[f"comm:{key}"] = s
    for key, b in run.meter.bytes.items():
        rec[f"bytes:{key}"] = b
    if run.hook_state is not None:  # ddp: exposed = backward's tail after the last bucket was issued
        h = run.hook_state
        rec["comm:allreduce/bwd"] = max(0.0, t2 - h["last_issue"]) if h["last_issue"] else 0.0
        rec["bytes:allreduce/bwd"] = h["bytes"]
        rec["inflight_s"] = _union(h["intervals"])
    if track_memory:
        param_bytes = _tensor_bytes(params)
        opt_bytes = _tensor_bytes(t for st in run.opt.state.values() for t in st.values()
                                  if torch.is_tensor(t))
        run_resident = param_bytes + opt_bytes
        mem = dict(param_bytes=param_bytes, grad_bytes=grad_bytes, optimizer_bytes=opt_bytes,
                   activation_bytes=saved.total,
                   tracked_bytes=param_bytes + grad_bytes + opt_bytes + saved.total)
        if cuda:  # this run's peak: the step's peak above what was resident, plus its own weights/state
            mem["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - resident + run_resident
        rec.update({f"mem:{k}": v for k, v in mem.items()})
    return rec


def _max_over_ranks(rec, keys, device, op=None):
    vec = torch.tensor([float(rec.get(k, 0.0)) for k in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        vec = vec.to(device) if device.type == "cuda" else vec
        dist.all_reduce(vec, op=op or dist.ReduceOp.MAX)
    return dict(zip(keys, vec.cpu().tolist()))


def _barrier(ctx):
    if ctx.world > 1:
        dist.barrier()


def measure(runs, spec, batch, cfg, ctx, profile_dir=None):
    """Interleaved steps of every run at one batch size; fills run.samples[batch] and run.memory[batch]."""
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=gen).to(ctx.device, dtype)
    y = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(ctx.device)
    per_rank = max(1, cores() // max(ctx.world, 1))
    clock = Clock(ctx.device)
    keys = list(PHASES) + [f"comm:{k}" for k in exchange_keys(spec)] + \
        [f"bytes:{k}" for k in exchange_keys(spec)] + [f"mem:{k}" for k in MEM_KEYS]
    profiler = None
    for i in range(cfg.warmup + cfg.steps):
        if i == cfg.warmup and profile_dir:
            profiler = _start_profiler(ctx.device)
        for run in runs[i % len(runs):] + runs[:i % len(runs)]:  # A B C, B C A, C A B, ...
            _barrier(ctx)
            c0 = time.process_time()
            if ctx.rank in run.ranks:
                xr, yr = x, y
                if run.layout == "ddp":  # each rank its slice of the same global batch
                    n = batch // ctx.world
                    xr, yr = x[ctx.rank * n:(ctx.rank + 1) * n], y[ctx.rank * n:(ctx.rank + 1) * n]
                torch.set_num_threads(run.threads)
                c1 = time.process_time()
                rec = step(run, xr, yr, clock, track_memory=(i == 0))
                cpu = time.process_time() - c1  # this process's CPU seconds (all its threads) in the step
                torch.set_num_threads(per_rank)
            else:
                rec, cpu = {}, 0.0
            _barrier(ctx)
            if ctx.rank not in run.ranks:  # CPU the waiting rank burned while the others computed
                rec["idle_cpu_s"] = time.process_time() - c0
            cpu = _max_over_ranks({"cpu_s": cpu}, ["cpu_s"],
                                  ctx.device, op=dist.ReduceOp.SUM if ctx.world > 1 else None)
            comm_keys = [k for k in keys if k.startswith("comm:")]
            least = _max_over_ranks(rec, comm_keys, ctx.device, op=dist.ReduceOp.MIN if ctx.world > 1 else None)
            rec = _max_over_ranks(rec, keys, ctx.device)
            rec.update(cpu)  # CPU seconds summed over the computing ranks
            # the rank that reaches a collective last waits only for the transfer itself: min over ranks
            rec["comm_min_rank_s"] = sum(least.values())
            if i == 0:
                run.memory[batch] = {k[4:]: v for k, v in rec.items() if k.startswith("mem:")}
            if i >= cfg.warmup:
                run.samples.setdefault(batch, []).append(rec)
    if profiler is not None:
        _stop_profiler(profiler, profile_dir, ctx.rank)


MEM_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "tracked_bytes",
            "cuda_peak_bytes")


def exchange_keys(spec):
    return [f"{e.name}/{d}" for e in spec.exchanges for d in ("fwd", "bwd")] + ["allreduce/bwd"]


def _start_profiler(device):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts)
    prof.__enter__()
    return prof


def _stop_profiler(prof, out_dir, rank):
    prof.__exit__(None, None, None)
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, f"trace_rank{rank}.json"))
    with open(os.path.join(out_dir, f"ops_rank{rank}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    with open(os.path.join(out_dir, f"steps_rank{rank}.txt"), "w") as f:
        f.write(summarise_trace(os.path.join(out_dir, f"trace_rank{rank}.json")))


def summarise_trace(path, top=20):
    """Per profiled step: seconds in each forward layer, exchange, and backward operator (by name)."""
    events = [e for e in json.load(open(path))["traceEvents"] if e.get("ph") == "X"]
    layers = {l.name for l in Spec().layers}
    lines = []
    for st in (e for e in events if e["name"].startswith("step:")):
        t0, t1 = st["ts"], st["ts"] + st["dur"]
        total = {}
        for e in events:
            if e.get("tid") != st.get("tid") or e["ts"] < t0 or e["ts"] + e["dur"] > t1:
                continue
            name = e["name"].replace("autograd::engine::evaluate_function: ", "backward: ")
            if name in layers or name.startswith(("exchange:", "backward: ")):
                total[name] = total.get(name, 0.0) + e["dur"] / 1e6
        lines.append(f"{st['name']}  {st['dur'] / 1e6:.3f} s")
        for name, sec in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {name:<56}{sec:>8.3f}")
    return "\n".join(lines) + "\n"


# ---- summaries ----

def _stats(values):
    return statistics.median(values), min(values), max(values)


def spec_bytes_per_step(spec, layout, batch, world):
    """What each rank sends per step, from the spec (split: activations; ddp: a ring all-reduce)."""
    if layout in ("split", "split-overlap"):
        return batch * sum(e.bytes * (2 if e.backward == "reduce-scatter" else 1) for e in spec.exchanges)
    if layout == "ddp":
        return 2 * (world - 1) * spec.params_total * spec.dtype_bytes // world
    return 0


def summarise(run, spec, batch, world):
    s = run.samples[batch]
    keys = exchange_keys(spec)
    comm_fwd = [sum(r[f"comm:{k}"] for k in keys if k.endswith("/fwd")) for r in s]
    comm_bwd = [sum(r[f"comm:{k}"] for k in keys if k.endswith("/bwd")) for r in s]
    ips = [batch / r["step_s"] for r in s]
    med, lo, hi = _stats(ips)
    mem = run.memory[batch]
    counted = statistics.median([sum(r[f"bytes:{k}"] for k in keys) for r in s])
    out = dict(
        layout=run.layout, label=run.label, batch_size=batch, devices=run.devices, threads=run.threads,
        images_per_s=med, images_per_s_min=lo, images_per_s_max=hi,
        step_s=statistics.median(r["step_s"] for r in s),
        comm_s=statistics.median(f + b for f, b in zip(comm_fwd, comm_bwd)),
        bytes_sent_per_step=int(counted),
        spec_bytes_sent_per_step=spec_bytes_per_step(spec, run.layout, batch, world),
        peak_mem_bytes=int(mem.get("cuda_peak_bytes") or mem["tracked_bytes"]),
        memory={k: int(v) for k, v in mem.items()},
        breakdown=dict(
            fwd_compute_s=statistics.median(max(0.0, r["fwd_s"] - c) for r, c in zip(s, comm_fwd)),
            bwd_compute_s=statistics.median(max(0.0, r["bwd_s"] - c) for r, c in zip(s, comm_bwd)),
            comm_fwd_s=statistics.median(comm_fwd), comm_bwd_s=statistics.median(comm_bwd),
            optimizer_s=statistics.median(r["opt_s"] for r in s),
            comm_per_exchange_s={k: statistics.median(r[f"comm:{k}"] for r in s) for k in keys
                                 if any(r[f"bytes:{k}"] for r in s)},
        ),
        comm_min_rank_s=statistics.median(r["comm_min_rank_s"] for r in s),
        cpu_s_per_step=statistics.median(r["cpu_s"] for r in s),
        # the share of its threads' time the layout got the CPU for: < 1 means it waited (for a peer, or
        # for a core another process held); CPU seconds per step are the work, wall time is the speed
        cpu_util=statistics.median(r["cpu_s"] / (r["step_s"] * run.threads * len(run.ranks)) for r in s),
        steps=len(s),
    )
    if run.layout == "single":
        out["waiting_rank_cpu_s"] = statistics.median(r["idle_cpu_s"] for r in s)
    if run.layout == "ddp":
        out["breakdown"]["allreduce_in_flight_s"] = statistics.median(r["inflight_s"] for r in s)
    return out


def exchanges_table(runs, spec, batch):
    """Per exchange: bytes per image from the spec and as counted, and seconds (split; overlap exposed)."""
    by = {r.layout: r for r in runs}
    split, over = by.get("split"), by.get("split-overlap")
    src = split or over
    rows = []
    for e in spec.exchanges:
        row = dict(name=e.name, backward=e.backward, bytes_per_image=e.bytes,
                   bwd_bytes_per_image=e.bytes if e.backward == "reduce-scatter" else 0)
        if src is not None:
            s = src.samples[batch]
            row["counted_bytes_per_image"] = statistics.median(r[f"bytes:{e.name}/fwd"] for r in s) / batch
            row["counted_bwd_bytes_per_image"] = statistics.median(r[f"bytes:{e.name}/bwd"] for r in s) / batch
        if split is not None:
            s = split.samples[batch]
            row["fwd_s"] = statistics.median(r[f"comm:{e.name}/fwd"] for r in s)
            row["bwd_s"] = statistics.median(r[f"comm:{e.name}/bwd"] for r in s)
        if over is not None:
            s = over.samples[batch]
            row["overlap_fwd_s"] = statistics.median(r[f"comm:{e.name}/fwd"] for r in s)
            row["overlap_bwd_s"] = statistics.median(r[f"comm:{e.name}/bwd"] for r in s)
        rows.append(row)
    return rows


def targets(rows):
    """The issue's targets, evaluated on the main batch's rows (None where a layout is missing)."""
    single = sorted((r for r in rows if r["layout"] == "single"), key=lambda r: r["threads"])
    split = next((r for r in rows if r["layout"] == "split"), None)
    over = next((r for r in rows if r["layout"] == "split-overlap"), None)
    out = []

    def add(name, value, goal, ok):
        out.append(dict(target=name, value=value, goal=goal, met=None if value is None else ok(value)))

    if split and single:
        add("split / single (one device) images/s", split["images_per_s"] / single[0]["images_per_s"],
            ">= 1.9", lambda v: v >= 1.9)
        add("split / single (whole machine) images/s", split["images_per_s"] / single[-1]["images_per_s"],
            ">= 1.4", lambda v: v >= 1.4)
    if split:
        add("communication share of the split step", split["comm_s"] / split["step_s"], "<= 0.03",
            lambda v: v <= 0.03)
    if split and over:
        hidden = 1 - over["comm_s"] / split["comm_s"] if split["comm_s"] else None
        add("share of split communication the overlap hides", hidden, ">= 0.5", lambda v: v >= 0.5)
        add("split-overlap / split images/s", over["images_per_s"] / split["images_per_s"], "(report)",
            lambda v: True)
    if split and single:
        add("per-stream parameter bytes / single", split["memory"]["param_bytes"] /
            single[0]["memory"]["param_bytes"], "<= 0.51", lambda v: v <= 0.51)
    return out


# ---- output ----

def _mb(b):
    return f"{b / 2**20:,.1f}"


def format_table(rows, exchanges, goals):
    lines = [f"{'layout':<18}{'batch':>6}{'img/s':>8}{'[min-max]':>15}{'step s':>8}{'fwd':>7}{'bwd':>7}"
             f"{'comm':>7}{'(min)':>7}{'opt':>6}{'comm%':>7}{'CPU s':>7}{'util':>6}{'MB sent/step':>14}{'spec MB':>9}{'peak MB':>9}"]
    for r in rows:
        b = r["breakdown"]
        lines.append(
            f"{r['label']:<18}{r['batch_size']:>6}{r['images_per_s']:>8.2f}"
            f"{'[' + format(r['images_per_s_min'], '.2f') + '-' + format(r['images_per_s_max'], '.2f') + ']':>15}"
            f"{r['step_s']:>8.3f}{b['fwd_compute_s']:>7.3f}{b['bwd_compute_s']:>7.3f}{r['comm_s']:>7.3f}"
            f"{r['comm_min_rank_s']:>7.3f}{b['optimizer_s']:>6.3f}{100 * r['comm_s'] / r['step_s']:>6.2f}%"
            f"{r['cpu_s_per_step']:>7.2f}{r['cpu_util']:>6.2f}"
            f"{_mb(r['bytes_sent_per_step']):>14}{_mb(r['spec_bytes_sent_per_step']):>9}"
            f"{_mb(r['peak_mem_bytes']):>9}")
    if exchanges:
        lines.append("")
        lines.append(f"{'exchange':<10}{'B/image spec':>13}{'counted':>10}{'bwd spec':>10}{'counted':>10}"
                     f"{'fwd s':>9}{'bwd s':>9}{'overlap fwd s':>15}{'overlap bwd s':>15}")
        for e in exchanges:
            def g(k, fmt):
                return format(e[k], fmt) if k in e else "-"
            lines.append(f"{e['name']:<10}{e['bytes_per_image']:>13,}{g('counted_bytes_per_image', ',.0f'):>10}"
                         f"{e['bwd_bytes_per_image']:>10,}{g('counted_bwd_bytes_per_image', ',.0f'):>10}"
                         f"{g('fwd_s', '.4f'):>9}{g('bwd_s', '.4f'):>9}{g('overlap_fwd_s', '.4f'):>15}"
                         f"{g('overlap_bwd_s', '.4f'):>15}")
    if goals:
        lines.append("")
        for t in goals:
            v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            if t["goal"] == "(report)":
                verdict = ""
            lines.append(f"{t['target']:<48} {v:>7}  goal {t['goal']:<9} {verdict}")
    return "\n".join(lines)


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    main = [r for r in result["runs"] if r["batch_size"] == result["batch_size"]]
    sweep = sorted({r["batch_size"] for r in result["runs"]})
    ncols = 3 if len(sweep) > 1 else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    parts = [("fwd compute", lambda r: r["breakdown"]["fwd_compute_s"]),
             ("bwd compute", lambda r: r["breakdown"]["bwd_compute_s"]),
             ("communication (exposed)", lambda r: r["comm_s"]),
             ("optimizer", lambda r: r["breakdown"]["optimizer_s"])]
    labels = [r["label"] for r in main]
    bottom = [0.0] * len(main)
    for name, get in parts:
        vals = [get(r) for r in main]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds per step (median)")
    ax.set_title(f"batch {result['batch_size']}, {result['image_size']} px, {result['dtype']}, "
                 f"{result['device']}")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8)
    if ncols > 1:
        for ax, key, ylabel in ((axes[0][1], "images_per_s", "images/s (median)"),
                                (axes[0][2], "peak_mem_bytes", "peak memory per device (MiB)")):
            for label in dict.fromkeys(r["label"] for r in result["runs"]):
                pts = sorted((r["batch_size"], r[key]) for r in result["runs"] if r["label"] == label)
                ys = [v / 2**20 if key == "peak_mem_bytes" else v for _, v in pts]
                ax.plot([b for b, _ in pts], ys, marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rss_peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_bench(cfg, ctx):
    """The whole benchmark on this rank; returns the result dict (complete on every rank)."""
    dtype_bytes = 2 if cfg.dtype == "bf16" else 4
    spec = Spec(streams=streams_of(cfg, ctx.world), image_size=cfg.image_size, dtype_bytes=dtype_bytes)
    per_rank = max(1, cores() // max(ctx.world, 1))
    torch.set_num_threads(per_rank)
    load_before = os.getloadavg()
    runs = build_runs(cfg, spec, ctx)
    log(f"bench: {', '.join(r.label for r in runs)}; {ctx.world} ranks ({ctx.backend}, {ctx.device}), "
        f"{per_rank} thread(s) per rank of {cores()} cores; {cfg.image_size} px, {cfg.dtype}; batch "
        f"{','.join(map(str, cfg.batch_sizes))}; {cfg.warmup} warm-up + {cfg.steps} measured steps each, "
        f"interleaved; load average {load_before[0]:.2f}")
    t0 = time.perf_counter()
    for i, batch in enumerate(cfg.batch_sizes):
        measure(runs, spec, batch, cfg, ctx, profile_dir=cfg.profile if i == 0 else None)
        log(f"  batch {batch} done ({time.perf_counter() - t0:.0f} s)")
    rows = [summarise(r, spec, b, ctx.world) for b in cfg.batch_sizes for r in runs]
    main = cfg.batch_sizes[0]
    exchanges = exchanges_table(runs, spec, main) if any(r.layout.startswith("split") for r in runs) else []
    goals = targets([r for r in rows if r["batch_size"] == main])
    rss = _max_over_ranks({"rss": _rss_peak_bytes()}, ["rss"], ctx.device)["rss"]
    device = (torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda"
              else f"{platform.machine()} CPU, {cores()} cores")
    return dict(
        device=device, backend=ctx.backend, batch_size=main, image_size=cfg.image_size,
        streams=spec.streams, dtype=cfg.dtype, world=ctx.world, threads_per_rank=per_rank,
        micro_batches=cfg.micro_batches, warmup=cfg.warmup, steps=cfg.steps,
        sweep=cfg.batch_sizes if len(cfg.batch_sizes) > 1 else None,
        torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command=cfg.command, load_average_before=load_before, load_average_after=os.getloadavg(),
        wall_s=time.perf_counter() - t0, rss_peak_bytes_max_rank=int(rss),
        runs=rows, exchanges=exchanges, targets=goals,
    )


def write_outputs(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(out_dir, "bench.png"))
