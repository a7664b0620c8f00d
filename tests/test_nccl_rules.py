"""What NCCL's rules ask of the set-up, checked on CPU: host tensors never reach a CUDA-only backend,
one visible GPU per rank (as SLURM binds them) is a valid plan, and gathers pad the dim they gather."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

from split_alexnet import distributed
from split_alexnet.cli import UsageError
from split_alexnet.comm import _gather_buffers

# A backend registered for CUDA only, as torch registers NCCL: any CPU tensor sent to a group made from
# it alone raises "No backend type associated with device type cpu". It is gloo underneath, so on a
# CPU-only machine the job runs wherever the set-up gave the CPU a backend of its own.
CUDA_ONLY = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    dist.Backend.register_backend("cudaonly", lambda store, rank, size, timeout:
                                  dist.ProcessGroupGloo(store, rank, size, timeout), devices=["cuda"])
    from split_alexnet.check import run_check
    from split_alexnet.distributed import group_backend, setup, teardown
    from split_alexnet.spec import Spec
    if sys.argv[1:] == ["bare"]:   # the group as it was made before: the device backend alone
        import torch
        dist.init_process_group("cudaonly")
        try:
            dist.all_reduce(torch.zeros(1, dtype=torch.float64))
        except RuntimeError as e:
            print("bare group refused a CPU tensor:", str(e).splitlines()[0], flush=True)
        dist.destroy_process_group()
        raise SystemExit(0)
    ctx = setup(backend="cudaonly", streams=2, timeout_s=60)
    try:
        assert group_backend("cudaonly") == "cpu:gloo,cuda:cudaonly"
        rows = run_check("split", Spec(streams=2, image_size=67, num_classes=10), batch_size=4, steps=1,
                         modes=("train",), device=ctx.device, rank=ctx.rank, ctx=ctx)
        if ctx.rank == 0:
            print(f"check under cpu:gloo beside a CUDA-only backend: {sum(r.ok for r in rows)}/{len(rows)}",
                  flush=True)
    finally:
        teardown()
""")


def _torchrun(tmp_path, nproc, *args):
    script = tmp_path / "cuda_only.py"
    script.write_text(CUDA_ONLY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_group_backend_pairs_a_cpu_backend_with_nccl():
    assert distributed.group_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert distributed.group_backend("gloo") == "gloo"


@pytest.mark.slow
def test_host_reductions_reach_a_cpu_backend_beside_a_cuda_only_one(tmp_path):
    # the control: a group of the CUDA-only backend alone refuses the host tensors the check reduces
    bare = _torchrun(tmp_path, 1, "bare")
    assert bare.returncode == 0, bare.stderr[-2000:]
    assert "bare group refused a CPU tensor: No backend type associated with device type cpu" in bare.stdout
    # setup()'s groups, and the mesh's stream and replica subgroups made from them, take them:
    # 2 replicas x 2 streams, so the check's float64 maxima cross the world and the replica group
    proc = _torchrun(tmp_path, 4)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("check under"))
    ok, total = map(int, line.rsplit(" ", 1)[1].split("/"))
    assert ok == total and total > 0, line


def _fake_gpus(monkeypatch, gpus, local_rank, local_world, visible):
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    for k in ("RANK", "TORCHELASTIC_RUN_ID"):          # not under torchrun: setup() picks, starts nothing
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(local_world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return set_to


def test_one_visible_gpu_per_rank_is_a_valid_plan(monkeypatch):
    # SLURM's --gpus-per-task=1: local rank 1 of 2 sees only its own GPU, as cuda:0
    set_to = _fake_gpus(monkeypatch, gpus=1, local_rank=1, local_world=2, visible="3")
    ctx = distributed.setup(backend="nccl")
    assert ctx.device == torch.device("cuda:0") and set_to == ["cuda:0"]


def test_all_gpus_visible_each_rank_takes_its_local_rank(monkeypatch):
    set_to = _fake_gpus(monkeypatch, gpus=2, local_rank=1, local_world=2, visible=None)
    assert distributed.setup(backend="nccl").device == torch.device("cuda:1") and set_to == ["cuda:1"]


def test_gloo_on_cuda_puts_local_ranks_on_distinct_gpus(monkeypatch):
    _fake_gpus(monkeypatch, gpus=2, local_rank=1, local_world=2, visible=None)
    assert distributed.setup(backend="gloo", device="cuda").device == torch.device("cuda:1")


@pytest.mark.parametrize("visible", [None, "0,1"])
def test_too_few_gpus_are_still_refused(monkeypatch, visible):
    # one GPU seen by two ranks (no per-rank binding) would put both on it: refused in one line
    _fake_gpus(monkeypatch, gpus=1, local_rank=0, local_world=2, visible=visible)
    with pytest.raises(UsageError, match="NCCL needs one GPU per process: 2 processes on this node but 1 GPU"):
        distributed.setup(backend="nccl")


def test_two_ranks_bound_to_one_gpu_are_named():
    every = [("n1", "GPU-a"), ("n1", "GPU-b"), ("n1", "GPU-a"), ("n2", "GPU-a")]
    assert distributed.duplicate_devices(every) == [0, 2]
    assert distributed.duplicate_devices(every[:2]) == []


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_uneven_gathers_pad_the_gathered_dim(dim):
    shape = [3, 4, 5]
    shape[dim] = 2                        # this rank's part is 2 wide, the largest is 3
    x = torch.randn(*shape)
    padded, buffers, sent = _gather_buffers(x, [3, 2], dim=dim)
    want = list(shape)
    want[dim] = 3
    assert list(padded.shape) == want and all(list(b.shape) == want for b in buffers)
    assert torch.equal(padded.narrow(dim, 0, 2), x)
    assert padded.narrow(dim, 2, 1).abs().sum() == 0
    assert sent == padded.numel() * padded.element_size()
