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

from split_alexnet import comm
from split_alexnet.check import run_check
from split_alexnet.cli import UsageError
from split_alexnet.distributed import Context, build_mesh, check_world
from split_alexnet.spec import Spec
from conftest import REPO, run_torchrun, spawn
from test_check import _passed

SMALL = ["--image-size", 67, "--num-classes", 10, "--batch-size", 4, "--steps", 2]


def _ctx(rank, world, streams):
    """A Context over the spawned gloo group, with its own (replica, stream) mesh."""
    return Context(rank, world, rank, torch.device("cpu"), "gloo", streams, build_mesh("cpu", world // streams, streams))


def _bad(rows):
    return {r.tensor for r in rows if not r.ok}


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
