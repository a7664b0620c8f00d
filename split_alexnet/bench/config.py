"""The bench's configuration, and the checks that refuse bad input before any work."""
import os
from dataclasses import dataclass

import torch

from ..cli import UsageError
from ..spec import Spec

LAYOUTS = ("single", "split", "split-overlap", "ddp")
EXTRA_LAYOUTS = ("streams",)  # on request: every stream in one process, on one device


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

    @property
    def torch_dtype(self):
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32


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
