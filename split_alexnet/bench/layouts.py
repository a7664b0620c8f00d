"""The layouts, built and ready to step: one `Run` per layout (and per thread count of single on CPU)."""
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from .. import comm
from ..layouts import get as get_layout
from ..model import AlexNet, SplitAlexNet, StreamsAlexNet
from ..overlap import overlapped_forward
from ..spec import Spec
from .config import cores, threads_per_rank, torchvision_image_size


@dataclass
class AllReduceStats:
    """What ddp's comm hook saw in one step: bytes sent, when the last bucket was issued, in-flight spans.

    Times are marks of `clock` (comm.HostClock / comm.EventClock, the step's): on CUDA an event on the
    backward stream where a bucket is issued, and one recorded in the future's callback, which runs on a
    stream made to wait for the all-reduce (so it marks the all-reduce's end on the device; under NCCL
    the host runs the callback at once, long before the data is there). measure.step turns them into
    seconds after the step."""
    bytes: int = 0
    last_issue: object = None
    intervals: list = field(default_factory=list)   # (issued, done) marks of clock per bucket
    clock: object = field(default_factory=comm.HostClock)

    def reset(self, clock=None):
        self.bytes, self.last_issue, self.intervals = 0, None, []
        self.clock = clock if clock is not None else self.clock


def _ddp_hook(stats, bucket, group=None):
    """DDP's default all-reduce, with bytes counted and the time each bucket is in flight recorded."""
    buf = bucket.buffer()
    world = dist.get_world_size(group)
    stats.bytes += 2 * (world - 1) * buf.numel() * buf.element_size() // world  # ring all-reduce
    issued = stats.last_issue = stats.clock.mark()

    def done(fut):
        stats.intervals.append((issued, stats.clock.mark()))
        return fut.value()

    return default_hooks.allreduce_hook(group, bucket).then(done)


def _replica_hook(state, bucket):
    """_ddp_hook in the mesh's replica group: state is (AllReduceStats, group)."""
    return _ddp_hook(state[0], bucket, state[1])


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
    allreduce: AllReduceStats = None                # ddp only
    samples: dict = field(default_factory=dict)   # batch -> list of per-step measure.Step
    memory: dict = field(default_factory=dict)    # batch -> memory dict (measure.MEM_KEYS)
    image_size: int = None                        # its own input size (torchvision); None: the spec's
    rows: tuple = None                            # (part, parts): the rows of the global batch it reads
    out_rows: tuple = None                        # the rows its logits cover (None: the whole batch)
    report: tuple = ()                            # its extra keys in bench.json (stats.summarise)
    net_spec: Spec = None                         # mesh / hybrid: the net's spec (its stream count)
    lrn_share: dict = field(default_factory=dict)  # batch -> LRN's share of the step (profiled), per step


def for_speed(cfg, layout, net, forward):
    """--channels-last (layouts with channels_last: single, streams, torchvision) and --compile (those with
    bench_compile: single, torchvision): the net and the forward a Run times. The split layouts stay as
    they are (their exchanges are comm.py's autograd Functions, not compiled here)."""
    if net is None:
        return net, forward
    entry = get_layout(layout, "--layouts")
    cl = cfg.channels_last and entry.channels_last
    if cl:
        net = net.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    if cfg.compile and entry.bench_compile:
        compiled = torch.compile(net)  # the whole forward (no per-layer profiler labels)
        return net, (lambda n, x: compiled(x.contiguous(memory_format=fmt)))
    if cl:
        return net, (lambda n, x, f=forward: f(n, x.contiguous(memory_format=fmt)))
    return net, forward


class Maker:
    """make(layout, label, devices, ranks, net, forward) -> a Run: the net on this rank's device and its
    SGD, where this rank computes (ranks), else none. Each layout's bench hook (layouts.py) calls it."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx, self.per_rank = cfg, ctx, threads_per_rank(ctx.world)
        self.every_rank = tuple(range(ctx.world))

    def __call__(self, layout, label, devices, ranks, net, forward, threads=None, **fields):
        if self.ctx.rank in ranks:
            if not isinstance(net, nn.parallel.DistributedDataParallel):
                net = net.to(self.ctx.device)  # fp32 weights; --precision bf16/fp16 is autocast
                net, forward = for_speed(self.cfg, layout, net, forward)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        else:
            net, opt = None, None
        return Run(layout, label, threads or self.per_rank, devices, ranks, net, opt, forward, **fields)


def build_runs(cfg, spec, ctx):
    """The configured layouts on this rank (net and optimizer only where this rank computes): each
    layout's bench hook (layouts.py), from the same seed on every rank."""
    make, runs = Maker(cfg, ctx), []
    for layout in cfg.layouts:
        torch.manual_seed(cfg.seed)  # the same weights on every rank
        runs += get_layout(layout, "--layouts").bench(cfg, spec, ctx, make)
    return runs


def _forward(n, x):
    """The net's own forward: forward_plan labels each layer and exchange, model.py the LRN."""
    return n(x)


def _single_net(cfg, spec):
    return AlexNet(spec=Spec(streams=spec.streams, image_size=spec.image_size, net=spec.net), dropout_seed=cfg.seed)


def bench_single(cfg, spec, ctx, make):
    one = _single_net(cfg, spec) if ctx.rank == 0 else None
    if ctx.device.type != "cpu":
        return [make("single", "single", 1, (0,), one, _forward, report=("waiting_rank_cpu_s",))]
    run = make("single", f"single ({make.per_rank} thr)", 1, (0,), one, _forward,
               report=("waiting_rank_cpu_s",))
    if cores() == make.per_rank:
        return [run]
    return [run, Run("single", f"single ({cores()} thr)", cores(), 1, (0,), run.net, run.opt, run.forward,
                     report=("waiting_rank_cpu_s",))]     # the whole machine: the same model, every core


def bench_streams(cfg, spec, ctx, make):
    net = StreamsAlexNet(spec, [ctx.device] * spec.streams, dropout_seed=cfg.seed) if ctx.rank == 0 else None
    return [make("streams", "streams (1 dev)", 1, (0,), net, lambda n, x: n(x))]


def bench_split(cfg, spec, ctx, make, overlap=False):
    net = SplitAlexNet(spec, ctx.rank, dropout_seed=cfg.seed)
    fwd = (lambda n, x, m=cfg.micro_batches: overlapped_forward(n, x, m)) if overlap else _forward
    layout = "split-overlap" if overlap else "split"
    return [make(layout, layout, ctx.world, make.every_rank, net, fwd)]


def bench_split_overlap(cfg, spec, ctx, make):
    return bench_split(cfg, spec, ctx, make, overlap=True)


def bench_ddp(cfg, spec, ctx, make):
    net = _single_net(cfg, spec).to(ctx.device)   # forward_plan labels its layers and exchanges
    kwargs = dict(device_ids=[ctx.device]) if ctx.device.type == "cuda" else {}
    ddp = nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=True, **kwargs)
    mine = (ctx.rank, ctx.world)                  # each rank its slice of the same global batch
    run = make("ddp", "ddp", ctx.world, make.every_rank, ddp, lambda n, x: n(x), rows=mine, out_rows=mine,
               report=("allreduce_in_flight_s",))
    run.allreduce = AllReduceStats()
    ddp.register_comm_hook(run.allreduce, _ddp_hook)
    return [run]


def bench_mesh(cfg, spec, ctx, make):
    """streams x replicas: its own (replica, stream) mesh over the same ranks."""
    import dataclasses

    from ..distributed import build_mesh
    from ..replicas import wrap_replicas
    sub = dataclasses.replace(ctx, streams=cfg.streams,
                              mesh=build_mesh(ctx.device.type, ctx.world // cfg.streams, cfg.streams))
    net_spec = Spec(streams=cfg.streams, image_size=spec.image_size, dtype_bytes=spec.dtype_bytes)
    net = SplitAlexNet(net_spec, sub.stream_rank, sub.stream_group, dropout_seed=cfg.seed,
                       replica=sub.replica).to(ctx.device)
    net = wrap_replicas(net, sub)
    mine = (sub.replica, sub.replicas)            # its replica's rows in and out
    run = make("mesh", f"mesh {sub.replicas}x{sub.streams}", ctx.world, make.every_rank, net, lambda n, x: n(x),
               rows=mine, out_rows=mine, net_spec=net_spec)
    if sub.replicas > 1:
        run.allreduce = AllReduceStats()
        net.register_comm_hook((run.allreduce, sub.replica_group), _replica_hook)
    return [run]


def bench_hybrid(cfg, spec, ctx, make):
    """conv data parallel, fc model parallel (hybrid.py): its rows in, the whole batch's logits out."""
    from ..hybrid import HybridAlexNet, sum_conv_grads
    net_spec = Spec(streams=cfg.streams, image_size=spec.image_size, dtype_bytes=spec.dtype_bytes)
    net = sum_conv_grads(HybridAlexNet(net_spec, ctx.rank, ctx.world, dropout_seed=cfg.seed).to(ctx.device))
    return [make("hybrid", f"hybrid W={ctx.world}", ctx.world, make.every_rank, net, lambda n, x: n(x),
                 rows=(ctx.rank, ctx.world), net_spec=net_spec)]


def bench_torchvision(cfg, spec, ctx, make, every_core=False):
    """The peer: torchvision.models.alexnet (no LRN, no groups, 224 px), untouched, on rank 0."""
    import torchvision
    net = torchvision.models.alexnet(num_classes=spec.num_classes) if ctx.rank == 0 else None
    layout = "torchvision-all" if every_core else "torchvision"
    threads = cores() if every_core else make.per_rank
    label = f"{layout} ({threads} thr)" if ctx.device.type == "cpu" else layout
    return [make(layout, label, 1, (0,), net, lambda n, x: n(x), threads=threads,
                 image_size=torchvision_image_size(spec.image_size))]


def bench_torchvision_all(cfg, spec, ctx, make):
    return bench_torchvision(cfg, spec, ctx, make, every_core=True)
