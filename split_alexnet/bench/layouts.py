"""The layouts, built and ready to step: one `Run` per layout (and per thread count of single on CPU)."""
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.profiler import record_function

from .. import comm
from ..labels import exchange_label
from ..model import AlexNet, SplitAlexNet, StreamsAlexNet, forward_plan
from ..overlap import overlapped_forward
from ..spec import Spec
from .config import cores, threads_per_rank, torchvision_image_size


def labelled_forward(net, x):
    """AlexNet.forward or SplitAlexNet.forward (the same plan and comm Functions), labelled per layer
    and per exchange; the LRN labels itself ("lrn", model.py's layer function), in every layout."""
    spec, layer_fn, exchange = net.spec, net.layer_fn, net.exchange

    def labelled_layer(layer, t):
        with record_function(layer.name):
            return layer_fn(layer, t)

    def labelled_exchange(name, t):
        with record_function(exchange_label(name)):
            return exchange(name, t)

    return forward_plan(spec, x, labelled_layer, labelled_exchange)


class Labelled(nn.Module):
    """A module whose forward is labelled_forward(net, x): what DDP wraps."""

    def __init__(self, net):
        super().__init__()
        self.net, self.spec = net, net.spec

    def forward(self, x):
        return labelled_forward(self.net, x)


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
    net_spec: Spec = None                         # mesh / hybrid: the net's spec (its stream count)
    lrn_share: dict = field(default_factory=dict)  # batch -> LRN's share of the step (profiled), per step


def for_speed(cfg, layout, net, forward):
    """--channels-last (single, streams, torchvision) and --compile (single, torchvision): the net and
    the forward a Run times. The split layouts stay as they are (their exchanges are comm.py's
    autograd Functions, not compiled here)."""
    if net is None:
        return net, forward
    cl = cfg.channels_last and layout in ("single", "streams", "torchvision", "torchvision-all")
    if cl:
        net = net.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    if cfg.compile and layout in ("single", "torchvision", "torchvision-all"):
        compiled = torch.compile(net)  # the whole forward (no per-layer profiler labels)
        return net, (lambda n, x: compiled(x.contiguous(memory_format=fmt)))
    if cl:
        return net, (lambda n, x, f=forward: f(n, x.contiguous(memory_format=fmt)))
    return net, forward


def build_runs(cfg, spec, ctx):
    """The configured layouts on this rank (net and optimizer only where this rank computes)."""
    per_rank = threads_per_rank(ctx.world)
    runs = []

    def make(layout, label, devices, ranks, net, forward):
        if ctx.rank in ranks:
            if not isinstance(net, nn.parallel.DistributedDataParallel):
                net = net.to(ctx.device)  # fp32 weights; --precision bf16/fp16 is autocast
                net, forward = for_speed(cfg, layout, net, forward)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        else:
            net, opt = None, None
        runs.append(Run(layout, label, per_rank, devices, ranks, net, opt, forward))
        return runs[-1]

    def single_net():
        return AlexNet(spec=Spec(streams=spec.streams, image_size=spec.image_size, net=spec.net),
                       dropout_seed=cfg.seed)

    every_rank = tuple(range(ctx.world))
    for layout in cfg.layouts:
        torch.manual_seed(cfg.seed)  # the same weights on every rank
        if layout == "single":
            one = single_net() if ctx.rank == 0 else None
            if ctx.device.type == "cpu":
                run = make("single", f"single ({per_rank} thr)", 1, (0,), one, labelled_forward)
                if cores() != per_rank:  # the whole machine: the same model, every core
                    runs.append(Run("single", f"single ({cores()} thr)", cores(), 1, (0,),
                                    run.net, run.opt, run.forward))
            else:
                make("single", "single", 1, (0,), one, labelled_forward)
        elif layout == "streams":
            net = StreamsAlexNet(spec, [ctx.device] * spec.streams, dropout_seed=cfg.seed) \
                if ctx.rank == 0 else None
            make("streams", "streams (1 dev)", 1, (0,), net, lambda n, x: n(x))
        elif layout in ("split", "split-overlap"):
            net = SplitAlexNet(spec, ctx.rank, dropout_seed=cfg.seed)
            fwd = (labelled_forward if layout == "split"
                   else (lambda n, x, m=cfg.micro_batches: overlapped_forward(n, x, m)))
            make(layout, layout, ctx.world, every_rank, net, fwd)
        elif layout == "ddp":
            net = Labelled(single_net()).to(ctx.device)
            kwargs = dict(device_ids=[ctx.device]) if ctx.device.type == "cuda" else {}
            ddp = nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=True, **kwargs)
            run = make("ddp", "ddp", ctx.world, every_rank, ddp, lambda n, x: n(x))
            run.allreduce = AllReduceStats()
            ddp.register_comm_hook(run.allreduce, _ddp_hook)
        elif layout == "mesh":  # streams x replicas: its own (replica, stream) mesh over the same ranks
            import dataclasses

            from ..distributed import build_mesh
            from ..mesh import wrap_replicas
            sub = dataclasses.replace(ctx, streams=cfg.streams,
                                      mesh=build_mesh(ctx.device.type, ctx.world // cfg.streams, cfg.streams))
            net_spec = Spec(streams=cfg.streams, image_size=spec.image_size, dtype_bytes=spec.dtype_bytes)
            net = SplitAlexNet(net_spec, sub.stream_rank, sub.stream_group, dropout_seed=cfg.seed,
                              replica=sub.replica).to(ctx.device)
            net = wrap_replicas(net, sub)
            run = make("mesh", f"mesh {sub.replicas}x{sub.streams}", ctx.world, every_rank, net, lambda n, x: n(x))
            run.rows, run.net_spec = (sub.replica, sub.replicas), net_spec
            if sub.replicas > 1:
                run.allreduce = AllReduceStats()
                net.register_comm_hook((run.allreduce, sub.replica_group), _replica_hook)
        elif layout == "hybrid":  # conv data parallel, fc model parallel (hybrid.py)
            from ..hybrid import HybridAlexNet, sum_conv_grads
            net_spec = Spec(streams=cfg.streams, image_size=spec.image_size, dtype_bytes=spec.dtype_bytes)
            net = sum_conv_grads(HybridAlexNet(net_spec, ctx.rank, ctx.world, dropout_seed=cfg.seed).to(ctx.device))
            run = make("hybrid", f"hybrid W={ctx.world}", ctx.world, every_rank, net, lambda n, x: n(x))
            run.rows, run.net_spec = (ctx.rank, ctx.world), net_spec
        elif layout in ("torchvision", "torchvision-all"):
            # the peer: torchvision.models.alexnet (no LRN, no groups, 224 px), untouched, on rank 0
            import torchvision
            net = torchvision.models.alexnet(num_classes=spec.num_classes) if ctx.rank == 0 else None
            threads = per_rank if layout == "torchvision" else cores()
            label = f"{layout} ({threads} thr)" if ctx.device.type == "cpu" else layout
            if ctx.rank == 0:
                net, forward = for_speed(cfg, layout, net.to(ctx.device), lambda n, x: n(x))
                opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            else:
                opt, forward = None, None
            runs.append(Run(layout, label, threads, 1, (0,), net, opt, forward,
                            image_size=torchvision_image_size(spec.image_size)))
    return runs
