"""The check: the single layout and another layout, given the same weights and batch, compute the same
logits, loss, gradients and (after SGD steps with momentum and weight decay) the same parameters.

Tolerance (fp32): layouts differ only in the order of floating-point sums (a grouped convolution vs
two convolutions, one GEMM vs two halves, a reduce-scatter's sum), never in what is summed. Each such
sum carries a relative error of order sqrt(K) * 2^-24 for K terms (K up to 9216 at fc6, so ~1e-5 of
the largest term), so we require   max|a - b| <= RTOL * max|b| + ATOL   per tensor, with RTOL 1e-4
(ten times that bound: it absorbs the few steps of accumulation through 8 layers and SGD) and ATOL
1e-7 for tensors whose reference is (nearly) all zeros. A real bug (a missing sum over streams, a
wrong slice, a mask off by one stream) is off by O(1) relative error, four orders above RTOL.

One thing round-off can do that no tolerance covers: when a pre-activation lies within round-off of
ReLU's kink (|z| ~ 1e-8), the two layouts may put it on opposite sides, and the gradient of that one
neuron is then entirely present in one layout and absent in the other. That is a property of fp32,
not of the layouts (in float64 they agree to ~1e-15 on the same inputs); `--dtype float64` separates
the two: RTOL64 = 1e-10 there, where a kink would need |z| ~ 1e-16. Small nets (67 px) with several
streams hit such a neuron at some seeds; the tests compare those in float64.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .model import AlexNet, shard_state_dict, split_from_single, streams_from_single

RTOL, ATOL = 1e-4, 1e-7
TOLERANCES = {torch.float32: (RTOL, ATOL), torch.float64: (1e-10, 1e-14)}
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


class Row(NamedTuple):
    """One tensor's comparison: max|a - b|, that over max|b|, the tolerance, and whether it holds."""
    mode: str        # "eval" or "train" (dropout on)
    tensor: str      # "logits", "loss", "conv1.weight.grad", "conv1.weight (after 3 SGD steps)", ...
    abs_diff: float
    rel_diff: float
    tolerance: float
    ok: bool


def _build(layout, spec, state, seed, device, devices, rank):
    ref = AlexNet(spec=spec, dropout_seed=seed).to(device, state["conv1.weight"].dtype)
    ref.load_state_dict(state)
    if layout == "streams":
        net = streams_from_single(ref, devices)
        return ref, net, list(enumerate(net.streams))
    if layout == "split":
        net = split_from_single(ref, rank, device=device)
        return ref, net, [(rank, net.stream)]
    raise ValueError(f"unknown layout {layout!r}: use streams or split")


def _diff(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).abs().max().item(), b.abs().max().item()


def run_check(layout, spec, batch_size=8, steps=3, modes=("eval", "train"), seed=0,
              device="cpu", devices=None, rank=0, init="d2l", dtype=torch.float32):
    """Compare `layout` against the single layout. Returns a Row per tensor.

    For the split layout every rank calls this; each compares its own shard and the per-tensor
    maxima are reduced over ranks, so every rank returns the same rows.
    """
    torch.manual_seed(seed)
    state = AlexNet(spec=spec, init=init).state_dict()  # seeded: the same on every rank
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, spec.in_channels, spec.image_size, spec.image_size, generator=gen)
    y = torch.randint(0, spec.num_classes, (batch_size,), generator=gen)
    x, y = x.to(device, dtype), y.to(device)
    state = {k: v.to(dtype) for k, v in state.items()}
    results = []  # (mode, name, abs diff, reference max)
    for mode in modes:
        ref, net, streams = _build(layout, spec, state, seed, device, devices, rank)
        for m in (ref, net):
            m.train(mode == "train")
        opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
                for m in (ref, net)]
        for step in range(steps):
            out_ref, out = ref(x), net(x)
            loss_ref, loss = F.cross_entropy(out_ref, y), F.cross_entropy(out.to(device), y)
            for opt in opts:
                opt.zero_grad()
            loss_ref.backward()
            loss.backward()
            if step == 0:
                results.append((mode, "logits", *_diff(out, out_ref)))
                results.append((mode, "loss", *_diff(loss, loss_ref)))
                results += _compare_params(mode, "grad", ref, streams, spec, lambda p: p.grad)
            for opt in opts:
                opt.step()
        results += _compare_params(mode, f"after {steps} SGD steps", ref, streams, spec, lambda p: p)
    if layout == "split" and dist.is_initialized():
        maxima = torch.tensor([[a, b] for _, _, a, b in results], dtype=torch.float64)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        results = [(m, n, a, b) for (m, n, _, _), (a, b) in zip(results, maxima.tolist())]
    rows, (rtol, atol) = [], TOLERANCES[dtype]
    for mode, name, abs_diff, ref_max in results:
        tol = rtol * ref_max + atol
        rows.append(Row(mode, name, abs_diff, abs_diff / ref_max if ref_max else 0.0, tol, abs_diff <= tol))
    return rows


def _compare_params(mode, what, ref, streams, spec, get):
    """Each stream's parameter (or its grad) against the same shard of the single layout's."""
    full = {n: get(p) for n, p in ref.named_parameters()}
    shards = shard_state_dict(full, spec)
    out = []
    for name, _ in ref.named_parameters():
        diffs = [_diff(get(dict(stream.named_parameters())[name]), shards[s][name]) for s, stream in streams]
        suffix = ".grad" if what == "grad" else f" ({what})"
        out.append((mode, name + suffix, max(d[0] for d in diffs), max(d[1] for d in diffs)))
    return out


def format_table(rows):
    lines = [f"{'mode':<6} {'tensor':<34} {'max abs diff':>13} {'max rel diff':>13} {'tolerance':>10}  ok"]
    for r in rows:
        lines.append(f"{r.mode:<6} {r.tensor:<34} {r.abs_diff:>13.3e} {r.rel_diff:>13.3e} {r.tolerance:>10.2e}  "
                     f"{'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
