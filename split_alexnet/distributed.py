"""Process-group set-up: NCCL on GPUs, gloo on CPU, and the (replica, stream) device mesh.

N processes hold N / S replicas of the S-stream net. Ranks are laid out replica-major,
mesh = arange(N).reshape(replicas, streams): stream group r is the contiguous ranks [r*S, (r+1)*S),
so with --nproc_per_node a multiple of S a stream group (the per-layer exchanges) never leaves a node,
and the replica groups (one gradient all-reduce per step) are the ones that cross nodes.
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .cli import attempt_prefix, env, rendezvous
from .errors import RankError, UsageError
from .spec import allowed_streams, streams_rule


@dataclass
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl", "gloo", or "none" for one process without torchrun
    streams: int = 1    # S: processes per replica (one per stream; the hybrid: the world)
    mesh: object = None  # DeviceMesh (replica, stream) under torchrun, else None

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def replicas(self):
        return self.world // self.streams

    @property
    def stream_rank(self):
        """Which stream this rank holds (its rank in the stream group)."""
        return self.rank % self.streams

    @property
    def replica(self):
        """Which replica this rank belongs to (its rank in the replica group)."""
        return self.rank // self.streams

    @property
    def stream_group(self):
        """The streams of this rank's replica (the mesh's "stream" dimension): the exchanges run in it."""
        return self.mesh["stream"].get_group() if self.mesh is not None else None

    @property
    def replica_group(self):
        """This stream's copies across the replicas (the mesh's "replica" dimension): gradients are averaged in it."""
        return self.mesh["replica"].get_group() if self.mesh is not None else None


def check_world(world, streams):
    """Refuse a world that does not hold whole replicas of a net of `streams` streams (one line)."""
    if streams not in allowed_streams():
        raise UsageError(f"--streams {streams}: {streams_rule()}; use one of those")
    if world % streams:
        raise UsageError(f"{world} processes cannot hold replicas of the {streams}-stream net: use a "
                         f"multiple of {streams} (e.g. torchrun --nproc_per_node={streams * max(1, world // streams)}) "
                         f"or --streams {', '.join(str(s) for s in allowed_streams() if world % s == 0)}")


def setup(backend=None, device=None, timeout_s=120, streams=None):
    """Join the torchrun job (or run alone): refuse bad world sizes and device plans before any work.

    streams: processes per replica (None: all of them, one replica). Under torchrun the
    (replica, stream) DeviceMesh is built once here and returned in the Context."""
    proc = env()
    rank, world, local_rank, local_world = proc.rank, proc.world, proc.local_rank, proc.local_world
    if streams is None and world not in allowed_streams():
        raise UsageError(f"{world} processes cannot hold the streams: {streams_rule()}; "
                         f"use torchrun --nproc_per_node=2 (the paper's split) or another of those")
    streams = world if streams is None else streams
    check_world(world, streams)
    backend = backend or ("nccl" if torch.cuda.is_available() and not (device or "").startswith("cpu")
                          else "gloo")
    cuda = backend == "nccl" or (device or "").startswith("cuda")
    gpus = torch.cuda.device_count() if cuda else 0
    device = pick_device(backend, device, rank, local_rank, local_world, gpus,
                         os.environ.get("CUDA_VISIBLE_DEVICES"))
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    device = torch.device(device or "cpu")
    if proc.torchrun:  # launched by torchrun (even with one process)
        # device_id starts NCCL at once; where each rank sees one GPU of its own, NCCL starts at the first
        # exchange instead, after refuse_shared_gpus has compared the GPUs over gloo
        kwargs = dict(device_id=device) if backend == "nccl" and gpus >= local_world else {}
        if not rendezvous()[2]:                    # by hand: this job's own store, checked first
            kwargs.update(store=hand_launch_store(rank, world, timeout_s), rank=rank, world_size=world)
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":   # the agent's one store: keys by attempt
            kwargs.update(store=attempt_store(timeout_s), rank=rank, world_size=world)
        dist.init_process_group(group_backend(backend), timeout=timedelta(seconds=timeout_s), **kwargs)
        if device.type == "cuda":
            refuse_shared_gpus(device, world)
        mesh = build_mesh(device.type, world // streams, streams)
    else:
        backend, mesh = "none", None
    return Context(rank, world, local_rank, device, backend, streams, mesh)


def group_backend(backend):
    """The backend string every process group is made with. A device backend (NCCL) runs CUDA tensors
    only; the host-side reductions (the check's float64 maxima, evaluation sums, start-up agreement,
    replica means) are CPU tensors, so gloo serves the CPU beside it. Subgroups (the mesh's stream and
    replica groups) inherit both."""
    return backend if backend == "gloo" else f"cpu:gloo,cuda:{backend}"


def pick_device(backend, device, rank, local_rank, local_world, gpus, visible=None):
    """This rank's device: cuda:LOCAL_RANK when the node's GPUs are all visible to every rank, cuda:0
    when each rank sees one GPU of its own (CUDA_VISIBLE_DEVICES set per rank, as SLURM binds them;
    refuse_shared_gpus checks after start-up that no two ranks got the same one), else a refusal."""
    own_gpu = gpus == 1 and visible is not None and len([v for v in visible.split(",") if v.strip()]) == 1
    if backend == "nccl" or device == "cuda":
        if gpus >= local_world:
            index = local_rank
        elif own_gpu:
            index = 0
        elif backend == "nccl":
            raise UsageError(f"NCCL needs one GPU per process: {local_world} processes on this node but "
                             f"{gpus} GPU(s); use --nproc_per_node={gpus} or --backend gloo --device cpu")
        else:
            raise UsageError(f"--device cuda: {local_world} processes on this node but {gpus} GPU(s); "
                             f"use --nproc_per_node={gpus}, or give each rank its GPU (--device cuda:N)")
        if backend == "nccl" and device not in (None, "cuda", f"cuda:{index}"):
            raise UsageError(f"with NCCL rank {rank} runs on cuda:{index}, not {device}: "
                             f"drop --device (each process takes the GPU of its LOCAL_RANK)")
        return f"cuda:{index}"
    return device or "cpu"


def refuse_shared_gpus(device, world):
    """Two ranks on one GPU (a CUDA_VISIBLE_DEVICES that binds the same GPU twice) would hang or fail
    inside NCCL: compare the GPUs' UUIDs over the CPU group and refuse in one line."""
    import socket
    here = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
    every = [None] * world
    dist.all_gather_object(every, here)
    shared = duplicate_devices(every)
    if shared:
        raise UsageError(f"ranks {shared} run on the same GPU ({every[shared[0]][1]} on {every[shared[0]][0]}): "
                         f"give each rank its own GPU (one CUDA_VISIBLE_DEVICES entry per rank, or all GPUs visible)")


def duplicate_devices(every):
    """The ranks whose (host, GPU) another rank also holds, in rank order; [] when all are distinct."""
    return [r for r, d in enumerate(every) if every.count(d) > 1]


def build_mesh(device_type, replicas, streams):
    """The (replica, stream) DeviceMesh over the initialised process group (ranks replica-major)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (replicas, streams), mesh_dim_names=("replica", "stream"))


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()



def attempt_store(timeout_s):
    """A client of torchrun's agent store whose keys are this attempt's (cli.attempt_prefix): a restarted
    rank never reads a peer's address left by the attempt before."""
    addr, port, _ = rendezvous()
    return dist.PrefixStore(attempt_prefix(), dist.TCPStore(addr, port, is_master=False,
                                                             timeout=timedelta(seconds=timeout_s)))


def hand_launch_store(rank, world, timeout_s, answer_s=10.0):
    """Ranks started by hand (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, no torchrun): rank 0
    listens on MASTER_PORT, the others connect to it. A busy port, or a port held by another program
    (which accepts the connection and never answers, where torch's store would wait forever), is
    refused with one line instead."""
    import socket
    import threading
    import time
    addr, port, _ = rendezvous()
    fix = ("set MASTER_PORT to a free port on every rank, or launch with torchrun --standalone, which "
           "picks one")
    if rank == 0:
        try:
            return dist.TCPStore(addr, port, world, True, timeout=timedelta(seconds=timeout_s))
        except Exception as e:
            if "EADDRINUSE" in str(e) or "address already in use" in str(e):
                raise UsageError(f"MASTER_PORT {port} is in use by another program: {fix}") from None
            raise
    deadline = time.monotonic() + timeout_s
    while True:                                    # rank 0 may not have started yet
        try:
            socket.create_connection((addr, port), timeout=5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RankError(f"rank {rank}: nothing listens on MASTER_ADDR:MASTER_PORT {addr}:{port} after "
                                 f"{timeout_s:g} s: start rank 0 with the same MASTER_ADDR and MASTER_PORT") from None
            time.sleep(0.5)
    result = []
    t = threading.Thread(target=lambda: result.append(
        dist.TCPStore(addr, port, world, False, timeout=timedelta(seconds=timeout_s))), daemon=True)
    t.start()
    t.join(answer_s)
    if not result:
        raise RankError(f"rank {rank}: {addr}:{port} accepted the connection but did not answer as rank 0's "
                         f"store within {answer_s:g} s: another program holds MASTER_PORT {port}; {fix}")
    return result[0]
