"""torch.compile over the layouts (issue 15, "Fast"): the single layout's train-mode forward is one
dynamo graph (the LRN's autograd Function and the counter-based dropout traced, no break), its dropout
counter does not recompile the step, and a compiled step computes what the eager step computes.

Error model for compiled against eager: the same operations on the same values, some of them fused or
reordered (AOTAutograd's functional form of the in-place ops, the LRN's traced branch that recomputes s
and s^-beta in the backward instead of saving them). In float64 such a difference is round-off of the
same sums, so the check's float64 tolerance applies unchanged: max|a - b| <= 1e-10 max|b| + 1e-14 per
tensor (split_alexnet/check.py). The equality tests use backend="aot_eager" (the graphs dynamo and
AOTAutograd build, run by eager kernels): Inductor's C++ compile takes minutes per graph on this 2-core
CPU; the graphs are what --compile hands Inductor."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import spawn

from split_alexnet.check import TOLERANCES
from split_alexnet.config import parse_config
from split_alexnet.model import AlexNet, DropoutMasks, split_from_single, streams_from_single
from split_alexnet.spec import Spec

SPEC = Spec(streams=2, image_size=67, num_classes=10)
RTOL, ATOL = TOLERANCES[torch.float64]


def _close(a, b, what):
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= RTOL * scale + ATOL, f"{what}: {err:.3e} against {RTOL * scale + ATOL:.3e}"


@pytest.mark.slow
def test_single_layout_train_forward_is_one_graph():
    net = AlexNet(spec=SPEC).train()
    explained = torch._dynamo.explain(net)(torch.randn(2, 3, 67, 67))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def _step(model, x, y, opt):
    opt.zero_grad()
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    opt.step()
    return logits.detach()


@pytest.mark.slow
def test_compiled_single_and_streams_steps_equal_eager_without_recompiling():
    """Three SGD steps in train mode (three draws of each mask): compiled equals eager, and the single
    layout's forward is compiled once (the draw counter is a buffer, not a guarded Python int)."""
    torch.manual_seed(0)
    ref = AlexNet(spec=SPEC, init="d2l").double().train()
    graphs = []

    def counting(gm, inputs):                      # a backend that counts the graphs dynamo hands it
        graphs.append(gm)
        return gm.forward

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, 67, 67, dtype=torch.float64, generator=gen),
                torch.randint(0, 10, (2,), generator=gen)) for _ in range(3)]
    for layout in ("single", "streams"):
        eager = AlexNet(spec=SPEC).double().train()
        eager.load_state_dict(ref.state_dict())
        if layout == "streams":
            eager = streams_from_single(eager).train()
        comp = AlexNet(spec=SPEC).double().train()
        comp.load_state_dict(ref.state_dict())
        if layout == "streams":
            comp = streams_from_single(comp).train()
        compiled = torch.compile(comp, backend=counting if layout == "single" else "aot_eager")
        opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (eager, comp)]
        for k, (x, y) in enumerate(batches):
            _close(_step(compiled, x, y, opts[1]), _step(eager, x, y, opts[0]), f"{layout} logits, step {k + 1}")
        for (name, a), b in zip(comp.named_parameters(), eager.parameters()):
            _close(a.detach(), b.detach(), f"{layout} {name} after 3 steps")
        masks = [m for m in comp.modules() if isinstance(m, DropoutMasks)]
        assert masks and all(int(m.draws) == 6 for m in masks)  # fc6 and fc7, three steps
    assert len(graphs) == 1


def _split_compiled_equals_eager(rank, world):
    torch.manual_seed(0)
    full = AlexNet(spec=SPEC, init="d2l").double().train()
    eager = split_from_single(full, rank).train()
    comp = split_from_single(full, rank).train()
    comp.stream.compile_layers(backend="aot_eager")      # what --compile does for the split (train.for_speed)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (eager, comp)]
    gen = torch.Generator().manual_seed(1)
    for k in range(2):                                   # the same batch on every rank
        x = torch.randn(2, 3, 67, 67, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 10, (2,), generator=gen)
        _close(_step(comp, x, y, opts[1]), _step(eager, x, y, opts[0]), f"rank {rank} logits, step {k + 1}")
    for (name, a), b in zip(comp.named_parameters(), eager.parameters()):
        _close(a.detach(), b.detach(), f"rank {rank} {name} after 2 steps")
    assert int(comp.stream.dropout.draws) == int(eager.stream.dropout.draws) == 4
    assert len(comp.stream._compiled) == len(SPEC.layers)
    dist.barrier()


@pytest.mark.slow
def test_compiled_split_step_equals_eager():
    """2 gloo ranks: each layer compiled on its own, the exchanges eager between the graphs."""
    spawn(_split_compiled_equals_eager, 2)


def test_compile_is_accepted_for_every_layout(monkeypatch):
    for layout in ("single", "streams"):
        assert parse_config(["--layout", layout, "--compile"]).compile
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_config(["--compile"]).layout == "split"
