"""The bench's configuration, and the checks that refuse bad input before any work."""
import os
from dataclasses import dataclass

from .. import precision
from ..errors import UsageError
from ..layouts import LAYOUTS as REGISTRY
from ..precision import check_precision, compile_available
from ..spec import spec_or_usage_error

# the registry's (split_alexnet/layouts.py): the default --layouts, those on request (streams: one process,
# one device; mesh: W / --streams replicas of the --streams-stream net; hybrid: conv data parallel, fc model
# parallel), and those that run on rank 0 (or alone)
LAYOUTS = tuple(n for n, e in REGISTRY.items() if e.bench and e.bench_default)
EXTRA_LAYOUTS = tuple(n for n, e in REGISTRY.items() if e.bench and not e.bench_default)
TORCHVISION_MIN_SIZE = 63  # torchvision's alexnet: 63 px -> 15 -> 7 -> 3 -> 3 -> 1 (adaptive pool after)


def torchvision_image_size(image_size):
    """torchvision's AlexNet takes 224 px where the paper's takes 227: scaled alike, at least 63."""
    return max(TORCHVISION_MIN_SIZE, round(image_size * 224 / 227))


@dataclass
class BenchConfig:
    batch_sizes: list              # the main batch first, then the rest of a sweep
    image_size: int = 227
    layouts: tuple = LAYOUTS
    steps: int = 5
    warmup: int = 1
    precision: str = "fp32"        # fp32, or bf16/fp16 through torch.autocast around forward + loss
    micro_batches: int = 2
    profile: str = None
    out: str = None
    seed: int = 0
    command: str = ""
    streams: int = 2               # one process (no torchrun): the streams of single/streams layouts
    net: str = "paper"             # "half": the paper's one-GPU comparison net (one stream, one process)
    allocator: str = ""            # launch/bench.py's apply_keep_freed_memory line (bench.json)
    channels_last: bool = False    # single, streams, torchvision: channels_last weights and inputs
    compile: bool = False          # single, torchvision: torch.compile
    log_every: int = 0             # without a terminal: a progress line every N layout-steps (0: each round)

    @property
    def autocast_dtype(self):
        """The dtype autocast runs forward + loss in, or None for fp32 (no autocast): precision.py's."""
        return precision.autocast_dtype(self.precision)

    @property
    def dtype_bytes(self):
        return precision.dtype_bytes(self.precision)


def streams_of(cfg, world):
    """Under torchrun one stream per rank; alone, the configured number (the paper's 2)."""
    return world if world > 1 else cfg.streams


def cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def threads_per_rank(world):
    """cores / ranks (at least 1), so the ranks do not oversubscribe the cores."""
    return max(1, cores() // max(world, 1))


def check_config(cfg, world, device_type):
    """Refuse bad input before any work: one line naming the problem and the fix."""
    check_precision(cfg.precision, device_type)
    if cfg.compile:
        ok, why = compile_available()
        if not ok:
            raise UsageError(f"--compile: {why}: drop --compile")
    benched = [n for n, e in REGISTRY.items() if e.bench]   # as registered now (a toy layout too)
    bad = [l for l in cfg.layouts if l not in benched]
    if bad or not cfg.layouts:
        raise UsageError(f"--layouts {','.join(cfg.layouts)}: choose from {','.join(benched)}")
    multi = [l for l in cfg.layouts if REGISTRY[l].torchrun]
    if multi and world < 2:
        raise UsageError(f"{','.join(multi)} need one process per stream: run under torchrun "
                         f"--nproc_per_node=2, or use --layouts single")
    if cfg.steps < 1 or cfg.warmup < 0 or cfg.micro_batches < 1 or cfg.log_every < 0:
        raise UsageError("--steps and --micro-batches must be at least 1, --warmup and --log-every at least 0")
    for b in cfg.batch_sizes:
        if b < 1:
            raise UsageError(f"batch size {b}: use a positive batch size")
        if "ddp" in cfg.layouts and b % world:
            raise UsageError(f"batch {b} does not split over {world} ddp ranks: use a multiple of {world}")
        if "hybrid" in cfg.layouts and b % world:
            raise UsageError(f"batch {b} does not split over {world} hybrid ranks: use a multiple of {world}")
        if "mesh" in cfg.layouts and (world % cfg.streams or b % (world // cfg.streams)):
            raise UsageError(f"mesh: {world} processes as replicas of {cfg.streams} streams need a world "
                             f"that is a multiple of --streams and a batch that is a multiple of the replicas")
        if "split-overlap" in cfg.layouts and b % cfg.micro_batches:
            raise UsageError(f"batch {b} does not divide into {cfg.micro_batches} micro-batches: use a "
                             f"multiple of {cfg.micro_batches} or change --micro-batches")
    spec_or_usage_error(streams=streams_of(cfg, world), image_size=cfg.image_size, net=cfg.net)
