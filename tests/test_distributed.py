"""Set-up refusals and bounded failure: bad device plans are refused at once; a frozen peer ends the job."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO, run_torchrun


@pytest.mark.slow
def test_nccl_follows_the_hardware():
    # with a GPU per process NCCL runs the check; with fewer GPUs than processes it is refused at once
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    proc = run_torchrun(2, "check.py", "--backend", "nccl", "--image-size", 67, "--num-classes", 10,
                        "--batch-size", 2, "--steps", 1, timeout=300)
    if gpus >= 2:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "2 processes, nccl, cuda:0" in proc.stdout and "PASS: 68/68" in proc.stdout
    else:
        assert proc.returncode != 0
        assert f"error: NCCL needs one GPU per process: 2 processes on this node but {gpus} GPU(s)" in proc.stderr
        assert "--backend gloo --device cpu" in proc.stderr


FROZEN_PEER = textwrap.dedent("""
    import time, torch
    import torch.distributed as dist
    from split_alexnet import comm
    from split_alexnet.distributed import setup, teardown
    ctx = setup(timeout_s=5)
    try:
        if ctx.rank == 1:
            time.sleep(60)          # frozen: never joins the exchange
        else:
            t0 = time.perf_counter()
            try:
                comm.gather_for_distinct_kernels(torch.ones(2, 3), name="conv3")
                print("NO TIMEOUT")
            except Exception as e:
                print(f"rank 0 gave up after {time.perf_counter() - t0:.1f} s: {type(e).__name__}", flush=True)
                raise SystemExit(1)
    finally:
        teardown()
""")


@pytest.mark.slow
def test_a_frozen_peer_ends_the_job_in_bounded_time(tmp_path):
    script = tmp_path / "frozen.py"
    script.write_text(FROZEN_PEER)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert "rank 0 gave up after" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "NO TIMEOUT" not in proc.stdout
    assert elapsed < 50  # the 5 s collective timeout, torchrun then stops the frozen rank
