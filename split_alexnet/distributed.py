"""Process-group set-up for the split layout: one process per stream, NCCL on GPUs, gloo on CPU."""
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .cli import UsageError, env
from .spec import allowed_streams


@dataclass
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl", "gloo", or "none" for one process without torchrun

    @property
    def is_main(self):
        return self.rank == 0


def setup(backend=None, device=None, timeout_s=120):
    """Join the torchrun job (or run alone): refuse bad world sizes and device plans before any work."""
    proc = env()
    rank, world, local_rank, local_world = proc.rank, proc.world, proc.local_rank, proc.local_world
    if world not in allowed_streams():
        raise UsageError(f"{world} processes cannot hold the streams: the widths (96, 256, 384, 4096) "
                         f"divide into {', '.join(map(str, allowed_streams()))} streams; "
                         f"use torchrun --nproc_per_node=2 (the paper's split) or another of those")
    backend = backend or ("nccl" if torch.cuda.is_available() and not (device or "").startswith("cpu")
                          else "gloo")
    if backend == "nccl":
        gpus = torch.cuda.device_count()
        if gpus < local_world:
            raise UsageError(f"NCCL needs one GPU per process: {local_world} processes on this node but "
                             f"{gpus} GPU(s); use --nproc_per_node={gpus} or --backend gloo --device cpu")
        if device not in (None, f"cuda:{local_rank}"):
            raise UsageError(f"with NCCL rank {rank} runs on cuda:{local_rank}, not {device}: "
                             f"drop --device (each process takes the GPU of its LOCAL_RANK)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    device = torch.device(device or "cpu")
    if proc.torchrun:  # launched by torchrun (even with one process)
        kwargs = dict(device_id=device) if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    else:
        backend = "none"
    return Context(rank, world, local_rank, device, backend)


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

