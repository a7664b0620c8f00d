import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO / "tests" / "fixtures" / "mnist"  # the first 3,000 MNIST test images (its README)


def run_torchrun(nproc, script, *args, timeout=300):
    """Run `torchrun --standalone --nproc_per_node=N launch/<script> args`; returns CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "launch" / script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_python(script, *args, timeout=300):
    cmd = [sys.executable, str(REPO / "launch" / script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _worker(rank, world, init_file, fn, args):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world=2, *args):
    """Run fn(rank, world, *args) on `world` gloo ranks; an assertion failing on any rank fails the test.

    fn must be a module-level function (it is pickled into the child processes).
    """
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), fn, args), nprocs=world, join=True)

