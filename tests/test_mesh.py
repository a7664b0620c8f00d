"""Streams x replicas on a device mesh, and the 2014 hybrid: each equals the single layout on the same
global batch (docs/scaling.md); leaving the gradient all-reduce out fails the check; checkpoints resume
at another replica count; two torchrun agents on loopback form one 2 x 2 job; bad worlds get one line."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_torchrun, spawn
from test_check import _passed

from split_alexnet import checkpoint as ckpt
from split_alexnet import comm
from split_alexnet.check import ATOL, RTOL, run_check
from split_alexnet.cli import UsageError
from split_alexnet.distributed import Context, build_mesh, check_world
from split_alexnet.spec import Spec

SMALL = ["--image-size", 67, "--num-classes", 10, "--batch-size", 4, "--steps", 2]


def _ctx(rank, world, streams):
    """A Context over the spawned gloo group, with its own (replica, stream) mesh."""
    return Context(rank, world, rank, torch.device("cpu"), "gloo", streams, build_mesh("cpu", world // streams, streams))


def _bad(rows):
    return {r.tensor for r in rows if not r.ok}


@pytest.mark.slow
def test_check_two_streams_two_replicas():
    # the launcher end to end: 4 gloo ranks = 2 replicas x 2 streams, eval and train (dropout), global batch 4
    proc = run_torchrun(4, "check.py", "--streams", 2, *SMALL)
    _passed(proc)
    assert "2 replica(s) x 2 streams" in proc.stdout


def _missing_allreduce(rank, world):
    ctx = _ctx(rank, world, 2)
    spec = Spec(streams=2, image_size=67, num_classes=10)
    rows = run_check("split", spec, batch_size=4, steps=1, modes=("eval",), rank=rank, ctx=ctx, allreduce=False)
    bad = _bad(rows)
    assert {"logits", "loss"}.isdisjoint(bad)                # forward is right: each replica its rows
    assert {"conv1.weight.grad", "fc6.weight.grad", "fc8.bias.grad"} <= bad   # one replica's gradient


@pytest.mark.slow
def test_check_fails_without_the_replica_allreduce():
    spawn(_missing_allreduce, 4)


def _every_shape(rank, world):
    spec = Spec(streams=2, image_size=67, num_classes=10)
    for streams in (1, 4):                                    # 4 replicas of 1 stream; 1 replica of 4
        ctx = _ctx(rank, world, streams)
        s = Spec(streams=streams, image_size=67, num_classes=10)
        rows = run_check("split", s, batch_size=4, steps=2, modes=("eval", "train"), rank=ctx.stream_rank,
                         ctx=ctx, dtype=torch.float64)
        assert not _bad(rows), (streams, _bad(rows))
    # the hybrid: conv data parallel, fc model parallel over 4 ranks
    rows = run_check("hybrid", spec, batch_size=4, steps=2, modes=("eval", "train"), rank=rank)
    assert len(rows) == 68 and not _bad(rows), _bad(rows)
    rows = run_check("hybrid", spec, batch_size=4, steps=1, modes=("eval",), rank=rank, allreduce=False)
    assert "conv1.weight.grad" in _bad(rows) and "fc6.weight.grad" not in _bad(rows)  # fc needs no sum
    # one step's bytes, counted by the comm Functions and the conv hooks, are the spec's formula
    from split_alexnet.hybrid import bytes_per_step, hybrid_from_single
    from split_alexnet.model import AlexNet
    torch.manual_seed(0)
    net = hybrid_from_single(AlexNet(spec=spec), rank, world)
    x, y = torch.randn(8, 3, 67, 67), torch.randint(0, 10, (8,))
    with comm.metered() as m:
        torch.nn.functional.cross_entropy(net(x[2 * rank:2 * rank + 2]), y).backward()
    counted = {}
    for key, n in m.bytes.items():
        counted[key.split("/")[0]] = counted.get(key.split("/")[0], 0) + n
    assert counted == bytes_per_step(spec, 8, world)


@pytest.mark.slow
def test_one_by_four_four_by_one_and_the_hybrid():
    spawn(_every_shape, 4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_agents_on_loopback_form_one_two_by_two_job():
    # what two nodes run (docs/scaling.md), both on this machine: 2 agents x 2 processes, c10d rendezvous
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
         "--node-rank", str(n), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", "loopback", str(REPO / "launch" / "check.py"), "--streams", "2", "--modes", "eval",
         *map(str, SMALL)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in (0, 1)]
    outs = [a.communicate(timeout=300) for a in agents]
    assert all(a.returncode == 0 for a in agents), [o[1][-2000:] for o in outs]
    stdout = "".join(o[0] for o in outs)                      # rank 0 is on whichever agent joined first
    assert "4 processes" in stdout and "2 replica(s) x 2 streams" in stdout
    assert "PASS: 34/34 tensors agree" in stdout


TINY = ["--dataset", "shapes", "--train-size", "64", "--val-size", "8", "--image-size", "67", "--batch-size", "8",
        "--lr", "0.001", "--quiet", "--seed", "0"]


def _train(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "launch" / "train.py"), *TINY, *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def _ckpt(out, step, stream):
    return torch.load(os.path.join(out, "checkpoints", f"step{step:07d}", f"stream{stream}.pt"), weights_only=False)


@pytest.mark.slow
def test_resume_at_another_replica_count(tmp_path):
    # 2 x 2 to step 6 (saving at 2, 4); 2 x 1 resumes its step 2 to step 4; 2 x 2 resumes that to step 6
    full, one, back = (str(tmp_path / n) for n in ("full", "one", "back"))
    _train(4, "--max-steps", 6, "--save-every", 2, "--out", full)
    assert sorted(os.listdir(os.path.join(full, "checkpoints", "step0000002"))) == ["meta.pt", "stream0.pt",
                                                                                     "stream1.pt"]
    _train(2, "--max-steps", 4, "--save-every", 4, "--out", one, "--resume", os.path.join(full, "checkpoints",
                                                                                          "step0000002"))
    _train(4, "--max-steps", 6, "--out", back, "--resume", one)
    ref, got = _losses(full), {**_losses(one), **_losses(back)}
    assert sorted(got) == [3, 4, 5, 6]
    for step, loss in got.items():   # fp32, another summation order (DDP's average): test_train's 1e-5
        assert abs(loss - ref[step]) <= 1e-5 * abs(ref[step]), (step, loss, ref[step])
    for s in (0, 1):                 # the same weights and momentum at step 4, reached either way, by the
        a, b = ({"model": x["model"], "momentum": ckpt.momentum(x)}   # check's fp32 criterion
                for x in (_ckpt(full, 4, s), _ckpt(one, 4, s)))     # (split_alexnet/check.py)
        assert set(a["momentum"]) == set(b["momentum"]) == set(a["model"])
        for part in ("model", "momentum"):
            for k, want in a[part].items():
                assert (b[part][k] - want).abs().max() <= RTOL * want.abs().max() + ATOL, (part, k)


@pytest.mark.slow
def test_world_size_refusals_are_one_line():
    with pytest.raises(UsageError, match=r"^--streams 3: the widths \(96, 256, 384, 4096\) divide into "
                                         r"1, 2, 4, 8 streams; use one of those$"):
        check_world(6, 3)
    with pytest.raises(UsageError, match=r"^6 processes cannot hold replicas of the 4-stream net: use a "
                                         r"multiple of 4 \(e.g. torchrun --nproc_per_node=4\) or --streams 1, 2$"):
        check_world(6, 4)
    proc = run_torchrun(2, "check.py", "--streams", 3, timeout=120)   # before any process group
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --streams 3: the widths (96, 256, 384, 4096) divide into 1, 2, 4, 8 streams; "
                      "use one of those"], proc.stderr[-2000:]
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr   # each child's status: torchrun's report


@pytest.mark.slow
def test_bench_rows_for_the_mesh_and_the_hybrid(tmp_path):
    proc = run_torchrun(4, "bench.py", "--layouts", "mesh,hybrid", "--image-size", 67, "--batch-size", 4,
                        "--steps", 1, "--warmup", 0, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["label"]: r for r in result["runs"]}
    assert set(rows) == {"mesh 2x2", "hybrid W=4"}
    for r in rows.values():                                   # what was counted is the spec's formula
        assert r["bytes_sent_per_step"] == r["spec_bytes_sent_per_step"] > 0, r["label"]
    assert "fewest bytes: split (4 streams)      for 1 <= B" in proc.stdout
