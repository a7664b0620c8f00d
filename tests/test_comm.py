"""Each comm Function on two (and four) gloo ranks: forward values, backward values, bytes counted
(inside `comm.metered()` only)."""
import pytest
import torch
import torch.distributed as dist
from conftest import spawn

from split_alexnet import comm


def _distinct_kernels(rank, world):
    # each rank's part: (B=2, C=3) filled with rank-dependent values
    x = (torch.arange(6.0).reshape(2, 3) + 10 * rank).requires_grad_()
    with comm.metered() as meter:
        y = comm.gather_for_distinct_kernels(x, name="fc6")
        expect = torch.cat([torch.arange(6.0).reshape(2, 3) + 10 * r for r in range(world)], dim=1)
        assert torch.equal(y, expect)
        # a different upstream gradient on every rank (each rank's own kernels read the whole y)
        g = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape) * (rank + 1)
        y.backward(g)
    # backward = reduce-scatter: sum over ranks of g_r, then this rank's slice
    total = sum(torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape) * (r + 1) for r in range(world))
    assert torch.equal(x.grad, total[:, 3 * rank:3 * rank + 3])
    part_bytes = 6 * 4
    assert meter.bytes["fc6/fwd"] == (world - 1) * part_bytes
    assert meter.bytes["fc6/bwd"] == (world - 1) * part_bytes
    assert meter.calls["fc6/fwd"] == meter.calls["fc6/bwd"] == 1


def _same_computation(rank, world):
    sizes = [3, 3, 2, 2][:world] if world == 4 else [3, 2]
    x = torch.full((2, sizes[rank]), float(rank + 1), requires_grad=True)
    y = comm.gather_for_same_computation(x, sizes, name="logits")
    expect = torch.cat([torch.full((2, n), float(r + 1)) for r, n in enumerate(sizes)], dim=1)
    assert torch.equal(y, expect)
    # every rank computes the same loss from y: the gradient is identical, only the own slice returns
    weights = torch.arange(float(sum(sizes)))
    (y * weights).sum().backward()
    start = sum(sizes[:rank])
    assert torch.equal(x.grad, weights[start:start + sizes[rank]].expand(2, -1))


def _chain_matches_one_process(rank, world):
    # conv-like composite: the gather feeds a per-rank linear map; compare with the unsplit computation
    torch.manual_seed(0)
    xs = [torch.randn(4, 5) for _ in range(world)]
    ws = [torch.randn(5 * world, 3) for _ in range(world)]
    x = xs[rank].clone().requires_grad_()
    out_own = comm.gather_for_distinct_kernels(x, name="conv3") @ ws[rank]
    logits = comm.gather_for_same_computation(out_own, [3] * world, name="logits")
    logits.pow(2).sum().backward()
    # the same function in one process, on the whole width
    full = torch.cat(xs, dim=1).requires_grad_()
    ref = torch.cat([full @ w for w in ws], dim=1)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, full.grad[:, 5 * rank:5 * rank + 5], rtol=1e-6, atol=1e-6)


def _metered_counts_only_inside_the_block(rank, world):
    x = torch.ones(2, 3, requires_grad=True)
    part_bytes = 6 * 4
    comm.gather_for_distinct_kernels(x, name="before").sum().backward()  # no meter: nothing to count in
    assert comm.active_meter() is None
    with comm.metered() as outer:
        comm.gather_for_distinct_kernels(x, name="conv3").sum().backward()
        with comm.metered() as inner:  # the innermost block counts; the outer one resumes after it
            comm.gather_for_same_computation(x, [3] * world, name="logits").sum().backward()
        assert comm.active_meter() is outer
        comm.gather_for_distinct_kernels(x, name="fc6")
    assert comm.active_meter() is None
    comm.gather_for_distinct_kernels(x, name="after").sum().backward()  # after the block: not counted
    assert dict(outer.bytes) == {"conv3/fwd": (world - 1) * part_bytes, "conv3/bwd": (world - 1) * part_bytes,
                                 "fc6/fwd": (world - 1) * part_bytes}
    assert dict(outer.calls) == {"conv3/fwd": 1, "conv3/bwd": 1, "fc6/fwd": 1}
    assert set(outer.seconds) == {"conv3/fwd", "conv3/bwd", "fc6/fwd"}
    assert dict(inner.bytes) == {"logits/fwd": (world - 1) * part_bytes}  # own slice: no backward comm
    assert dict(inner.calls) == {"logits/fwd": 1}


def _every_function(rank, world):
    _distinct_kernels(rank, world)
    _same_computation(rank, world)
    _chain_matches_one_process(rank, world)
    _metered_counts_only_inside_the_block(rank, world)


# one spawn per world size (starting ranks is the slow part); each Function is checked on its own inside
@pytest.mark.slow
def test_comm_functions_two_ranks():
    spawn(_every_function, 2)


@pytest.mark.slow
def test_comm_functions_four_ranks():
    spawn(_every_function, 4)


def test_one_stream_is_the_identity():
    assert not dist.is_initialized()
    x = torch.randn(2, 3)
    assert comm.gather_for_distinct_kernels(x) is x
    assert comm.gather_for_same_computation(x, [3]) is x


def _overlap_keeps_no_activations(rank, world):
    # every tensor the async exchanges hand out must be freed with the step's graph: a Pending that kept
    # its result closed a cycle through ctx.pending that the garbage collector did not see, and the
    # split's training with micro-batches leaked every step's activations (~15 MB/s per rank)
    import gc
    import weakref

    from split_alexnet import comm_async
    from split_alexnet.model import SplitAlexNet
    from split_alexnet.overlap import overlapped_forward
    from split_alexnet.spec import Spec
    torch.manual_seed(0)
    net = SplitAlexNet(Spec(streams=world, image_size=67, num_classes=10), rank)
    handed_out, result = [], comm_async.Pending.result

    def recording(self):
        value = result(self)
        handed_out.append(weakref.ref(value))
        return value
    comm_async.Pending.result = recording
    try:
        out = overlapped_forward(net, torch.randn(4, 3, 67, 67), micro_batches=2)
        out.sum().backward()
    finally:
        comm_async.Pending.result = result
    del out
    gc.collect()
    assert len(handed_out) == 5 * 2              # conv3, fc6, fc7, fc8 and the logits, 2 micro-batches each
    assert all(ref() is None for ref in handed_out), sum(ref() is not None for ref in handed_out)


@pytest.mark.slow
def test_overlap_keeps_no_activations_after_the_step():
    spawn(_overlap_keeps_no_activations, 2)


def _forced_at_world_one(rank, world):
    # one rank: without force the gathers are the identity and no Function runs; with force=True the
    # Functions run their collectives (what NCCL on one GPU would otherwise never execute): a copy of the
    # one part, so values and gradients are those of the identity, and the meter counts every call
    from split_alexnet import comm_async
    x = torch.arange(6.0).reshape(2, 3).requires_grad_()
    with comm.metered() as meter:
        assert comm.gather_for_distinct_kernels(x, name="fc6") is x           # bypassed: not counted
        y = comm.gather_for_distinct_kernels(x, name="fc7", force=True)
        z = comm.gather_for_same_computation(x, [3], name="logits", force=True)
        a = comm_async.start_gather_for_distinct_kernels(x, name="conv3", force=True).result()
        assert y is not x and torch.equal(y, x) and torch.equal(z, x) and torch.equal(a, x)
        g = torch.arange(6.0).reshape(2, 3)
        (y * g).sum().backward()
        (z * 2 * g).sum().backward()
        (a * 3 * g).sum().backward()
    assert torch.equal(x.grad, 6 * g)
    assert dict(meter.calls) == {"fc7/fwd": 1, "fc7/bwd": 1, "logits/fwd": 1, "conv3/fwd": 1, "conv3/bwd": 1}
    assert dict(meter.bytes) == {"fc7/fwd": 0, "fc7/bwd": 0, "logits/fwd": 0, "conv3/fwd": 0, "conv3/bwd": 0}
    assert set(meter.seconds) == {"fc7/fwd", "fc7/bwd", "logits/fwd", "conv3/fwd", "conv3/bwd"}


@pytest.mark.slow
def test_force_runs_the_functions_at_world_size_one():
    spawn(_forced_at_world_one, 1)
