"""The layouts, as one registry: how a single-layout AlexNet is laid out over processes and devices.

Train, check, bench, summary, checkpoint and convert read a layout's entry here; none of them tests
its name. An entry (`Layout`) says:

- `processes`: "one" (python), "per-stream" (torchrun: N processes hold N / S replicas of the S-stream
  net) or "world" (torchrun: every process holds a share of one net, the hybrid);
- `build(full, place, allreduce, options)`: this rank's part of a single-layout AlexNet `full`, as a
  `Built` (the net, its checkpoint files, the rows of the global batch it reads, and what the check
  compares); the weights are exactly `full`'s, so a layout is built from the single one (checkpoints
  and the check) and back (`files`: the checkpoint's file set, "single" or "shards", which
  convert.py moves between);
- `line(spec, world, streams)`: (fixed bytes, bytes per image of the global batch) one rank sends per
  step, from the spec's formulas (spec.py; hybrid.bytes_per_step);
- `mesh_dims`, `micro_batches`, `compile_layers`: what it uses and supports;
- `bench(cfg, spec, ctx, make)`: its timed runs (bench/layouts.py: bench_<name>), or None.

Adding a layout is its module plus one `register(Layout(...))` line; docs/layouts.md says how.
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .errors import UsageError


class Place(NamedTuple):
    """Where this rank's part goes: its rank and world, the torchrun Context (or None), its device, the
    streams layout's devices (one per stream), and --micro-batches (a layout with micro_batches)."""
    rank: int = 0
    world: int = 1
    ctx: object = None
    device: torch.device = torch.device("cpu")
    devices: tuple = None
    micro_batches: int = 1


class Built(NamedTuple):
    """One rank's part of a layout, built from a single-layout AlexNet."""
    net: object               # the module the steps run
    parts: dict               # checkpoint file -> module this rank loads it into
    rows: tuple = None        # (part, parts): the rows of the global batch its net reads; None: all
    out_rows: tuple = None    # the rows of the global batch its logits cover; None: all
    loss_group: object = None  # the group over which the per-rank losses are averaged (replicas)
    writes: tuple = None      # the files of `parts` this rank writes (None: all of them)
    params: Callable = None   # (get, ref) -> [(name, this rank's tensor, the reference's same part)]
    labels: Callable = None   # the global batch's labels from this rank's (None: its own rows are enough)
    state: Callable = None    # (optimizer) -> {file: state} this rank writes (None: ckpt.stream_state of parts)
    load: Callable = None     # (states, optimizer) -> None (None: ckpt.load_stream_state into parts)
    reads: tuple = None       # the files this rank reads on resume (None: those of `parts`)
    evaluate: Callable = None  # (net, x) -> logits of x when every rank evaluates every image


@dataclass(frozen=True)
class Layout:
    name: str
    about: str
    processes: str = "one"            # "one", "per-stream" or "world" (module docstring)
    build: Callable = None            # (full, place, allreduce=True, options=None) -> Built; None: bench only
    files: str = "shards"             # the checkpoint's file set: "single" (single.pt) or "shards" (stream<s>.pt)
    line: Callable = None             # (spec, world, streams) -> (fixed bytes, bytes per image), or None: none
    mesh_dims: tuple = ()
    micro_batches: bool = False       # --micro-batches M > 1 (the overlapped forward, overlap.py)
    compile_layers: bool = False      # --compile per layer (the exchanges between graphs), not the whole net
    channels_last: bool = False       # --channels-last in the bench (the split keeps its own layout)
    bench_compile: bool = False       # --compile in the bench: the whole forward as one graph
    bench: Callable = None            # (cfg, spec, ctx, make) -> [bench Run], or None: not benched
    bench_default: bool = True        # in the bench's default --layouts (else on request)
    scaled: bool = True               # with a line: a row of the bench's scaling table (bench/scaling.py)
    checked: bool = True              # launch/check.py compares it against the single layout
    exercises: bool = False           # takes the exercises' backward rules (options["split"], exercises.py)
    schedules: tuple = ("single",)    # the check's schedules: "single" (one SGD step), the hybrid's "2014"

    @property
    def trains(self):
        return self.build is not None

    @property
    def torchrun(self):
        return self.processes != "one"


LAYOUTS = {}


def default(torchrun):
    """--layout's default: split under torchrun, single otherwise."""
    return "split" if torchrun else "single"


def flag(name):
    """' --layout NAME' for a command line, or '' where NAME is its launcher's default."""
    return "" if name == default(get(name).torchrun) else f" --layout {name}"


def register(layout):
    LAYOUTS[layout.name] = layout
    return layout


def unregister(name):
    LAYOUTS.pop(name, None)


def get(name, flag="--layout"):
    if name not in LAYOUTS:
        raise UsageError(f"{flag} {name}: no such layout; use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def names(trains=None, checked=None):
    """The registered layouts' names, those that train / that the check compares, where asked."""
    return [n for n, e in LAYOUTS.items() if (trains is None or e.trains == trains)
            and (checked is None or (e.checked and e.trains) == checked)]


def batch_parts(layout, ctx):
    """How many parts the global batch splits into: the replicas (per-stream), the ranks (world)."""
    if ctx is None or layout.processes == "one":
        return 1
    return ctx.replicas if layout.processes == "per-stream" else ctx.world


def setup_streams(layout, streams):
    """distributed.setup's `streams` for this layout: processes per replica (None: the world)."""
    return streams if layout.processes == "per-stream" else None


# ---- the built-in layouts -------------------------------------------------------------------------

def _shard_params(spec, streams):
    """params(get, ref) for streams [(s, Stream)]: each stream's tensor against shard s of the reference."""
    from .model import shard_state_dict

    def params(get, ref):
        shards = shard_state_dict({n: get(p) for n, p in ref.named_parameters()}, spec)
        return [(name, get(dict(stream.named_parameters())[name]), shards[s][name])
                for s, stream in streams for name, _ in ref.named_parameters()]
    return params


def _build_single(full, place, allreduce=True, options=None):
    model = full.to(place.device)
    return Built(model, {"single.pt": model},
                 params=lambda get, ref: [(n, get(p), get(q)) for (n, p), q in
                                          zip(model.named_parameters(), ref.parameters())])


def _build_streams(full, place, allreduce=True, options=None):
    from .model import streams_from_single
    spec = full.spec
    devices = list(place.devices) if place.devices else [place.device] * spec.streams
    if len(devices) != spec.streams:
        raise UsageError(f"--devices names {len(devices)} devices for {spec.streams} streams: give one per stream")
    net = streams_from_single(full, devices)
    return Built(net, {f"stream{s}.pt": m for s, m in enumerate(net.streams)},
                 params=_shard_params(spec, list(enumerate(net.streams))))


def _build_split(full, place, allreduce=True, options=None):
    """This rank's stream; on a mesh of several replicas one replica of it (replicas.py: DDP over the
    replica group, the global batch's rows of its replica)."""
    from .model import split_from_single
    from .replicas import unwrap, wrap_replicas
    ctx, rules = place.ctx, (options or {}).get("split", {})
    overlap = dict(micro_batches=place.micro_batches) if place.micro_batches > 1 else {}
    replicas = ctx.replicas if ctx is not None and ctx.mesh is not None else 1
    if rules and replicas > 1:
        raise ValueError("an exercise's backward rule is for the split layout of one replica: "
                         "run it under torchrun --nproc_per_node=2")
    if ctx is None or ctx.mesh is None:
        net = split_from_single(full, place.rank, None, place.device, **rules, **overlap)
        stream, replica = place.rank, 0
    else:
        stream, replica = ctx.stream_rank, ctx.replica
        net = wrap_replicas(split_from_single(full, stream, ctx.stream_group, place.device, replica=replica,
                                              **rules, **overlap), ctx, allreduce)
    mine = (replica, replicas) if replicas > 1 else None
    parts = {f"stream{stream}.pt": unwrap(net).stream}
    return Built(net, parts, rows=mine, out_rows=mine, loss_group=ctx.replica_group if mine else None,
                 writes=tuple(parts) if replica == 0 else (),      # one copy per stream: replica 0's
                 params=_shard_params(full.spec, [(stream, unwrap(net).stream)]))


def _build_hybrid(full, place, allreduce=True, options=None):
    from .hybrid import hybrid_built
    return hybrid_built(full, place, allreduce)


def _split_line(spec, world, streams):
    return 0.0, float(_at(spec, world).bytes_per_image_step())


def _mesh_line(spec, world, streams):
    net, replicas = _at(spec, streams), world // streams
    grads = 2 * (replicas - 1) * net.params_per_stream(0) * 4 / replicas       # a ring all-reduce, fp32
    return grads, net.bytes_per_image_step() / replicas


def _hybrid_line(spec, world, streams):
    from .hybrid import bytes_per_step
    parts = bytes_per_step(_at(spec, streams), world, world)       # at B = W: one image per rank
    fixed = parts.pop("conv-allreduce")
    return float(fixed), sum(parts.values()) / world              # the rest is linear in B


def _ddp_line(spec, world, streams):
    return float(_at(spec, world).ddp_bytes_per_step()), 0.0       # fp32 gradients, whatever the precision


def _at(spec, streams):
    """spec's net (image size, channels, classes, activation dtype) at another stream count."""
    from .spec import Spec
    return Spec(streams=streams, image_size=spec.image_size, in_channels=spec.in_channels,
                num_classes=spec.num_classes, dtype_bytes=spec.dtype_bytes)


def _bench(name):
    """The bench's runs for a built-in layout: bench/layouts.py's bench_<name> (imported when run)."""
    def runs(cfg, spec, ctx, make):
        from .bench import layouts
        return getattr(layouts, "bench_" + name.replace("-", "_"))(cfg, spec, ctx, make)
    return runs


register(Layout("single", "the whole net in one module (conv2, conv4, conv5 grouped by stream)",
                build=_build_single, files="single", channels_last=True, bench_compile=True, bench=_bench("single"),
                checked=False))
register(Layout("streams", "every stream in this process, stream s on its own device (or all on one)",
                build=_build_streams, channels_last=True, bench=_bench("streams"), bench_default=False))
register(Layout("split", "one process per stream (torchrun), exchanging at conv3 and fc6-fc8; N processes "
                "run N / S replicas (DDP over the replica group)", processes="per-stream", build=_build_split,
                line=_split_line, mesh_dims=("replica", "stream"), micro_batches=True, compile_layers=True,
                exercises=True, bench=_bench("split")))
# bench only: the split's overlapped forward, the mesh at --streams
register(Layout("split-overlap", "the split with --micro-batches M overlapped (overlap.py)", processes="per-stream",
                line=_split_line, scaled=False, micro_batches=True, bench=_bench("split-overlap")))
register(Layout("mesh", "the split as --streams streams x world / streams replicas", processes="per-stream",
                line=_mesh_line, mesh_dims=("replica", "stream"), bench=_bench("mesh"), bench_default=False))
register(Layout("hybrid", "the 2014 hybrid: conv data parallel, fc6-fc8 model parallel over every process",
                processes="world", build=_build_hybrid, files="single", line=_hybrid_line, mesh_dims=("stream",),
                compile_layers=True,
                schedules=("single", "2014"), bench=_bench("hybrid"), bench_default=False))
# bench only: data parallelism, and the peer
register(Layout("ddp", "data parallelism: the whole net on every process, gradients all-reduced (DDP)",
                processes="world", line=_ddp_line, bench=_bench("ddp")))
register(Layout("torchvision", "torchvision.models.alexnet, the peer (224 px, no LRN, no groups)",
                channels_last=True, bench_compile=True, bench=_bench("torchvision")))
register(Layout("torchvision-all", "torchvision's AlexNet with every core", channels_last=True, bench_compile=True,
                bench=_bench("torchvision-all")))
