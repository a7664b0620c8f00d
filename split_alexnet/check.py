"""The check: the single layout and another layout, given the same weights and batch, compute the same
logits, loss, gradients and (after SGD steps with momentum and weight decay) the same parameters.

Error model. The layouts never compute different things; they sum the same products in another order
(a grouped convolution vs two convolutions, one GEMM vs two halves, a reduce-scatter's sum). A sum of K
terms in a precision with unit round-off u carries an error of order sqrt(K) * u of its largest terms
(K up to 9216 at fc6: ~1e-5 in fp32), so per tensor we require

    max|a - b| <= RTOL * max|b| + ATOL,   fp32: RTOL 1e-4, ATOL 1e-7;   float64: RTOL 1e-10, ATOL 1e-14

(ten times the bound, for the accumulation through eight layers and a few SGD steps).

That model holds for VALUES: logits and loss are continuous functions of the inputs and weights, so a
round-off difference in a pre-activation stays a round-off difference in the logits. It does not hold
for DERIVATIVES: the gradient jumps at ReLU's kink and where max-pool's argmax changes. When a
pre-activation lies within round-off of zero, or two entries of a pooling window lie within round-off of
each other, the two layouts may take different sides, and one activation's whole gradient moves or
vanishes. In fp32 that happens by chance, more often at larger batches and after SGD steps have moved
the layouts' weights apart by round-off (measured: batch 4, 227 px, the second SGD step, one pool5
argmax of 4*256*6*6 differs and the conv gradients part by 2.5e-3 of their scale, while each layout is
1e-6 from float64). So no fp32 tolerance can rule on gradients on every machine. The check therefore
compares values in the requested dtype and derivatives (gradients, parameters after SGD steps) in
float64, where such a coincidence needs |z| ~ 1e-16 of the scale. A real bug (a missing sum over
streams, a wrong slice, a mask off by one stream) is an O(1) relative error in float64 as in fp32.
"""
import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .model import AlexNet, shard_state_dict, split_from_single, streams_from_single
from .precision import UNIT_ROUNDOFF, ieee_fp32

RTOL, ATOL = 1e-4, 1e-7
# bf16/fp16 (autocast, --precision): weights stay fp32, each convolution and matmul accumulates in fp32
# (oneDNN on CPU, cuBLAS/cuDNN on CUDA) and rounds its output to the half dtype once. The two layouts'
# fp32 sums differ by fp32 round-off, which is nothing at half precision except where it flips that
# final rounding: one half ulp (2u) of the entry. Such a difference passes on through the later
# layers at about its size (ReLU, max-pool and LRN do not amplify it; a layer's weighted sum of
# differences of random sign grows no faster than the layer's output), and each of the 8 layers adds
# its own: 2u x 8 layers = 16u relative to the tensor's scale. The accumulation depth K does not
# enter, because the accumulation is fp32; a backend accumulating in half precision would add
# sqrt(K) u per layer and fail this on purpose. u = 2^-8 (bf16), 2^-11 (fp16).
HALF_LAYERS_FACTOR = 2 * 8
TOLERANCES = {torch.float32: (RTOL, ATOL), torch.float64: (1e-10, 1e-14),
              torch.bfloat16: (HALF_LAYERS_FACTOR * UNIT_ROUNDOFF[torch.bfloat16], ATOL),
              torch.float16: (HALF_LAYERS_FACTOR * UNIT_ROUNDOFF[torch.float16], ATOL)}
AUTOCAST = (torch.bfloat16, torch.float16)  # compared under torch.autocast with fp32 weights
DERIVATIVES_DTYPE = torch.float64  # gradients and SGD trajectories: see the error model above
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


class Row(NamedTuple):
    mode: str         # "eval" or "train" (dropout on)
    tensor: str       # "logits", "loss", "conv1.weight.grad", "conv1.weight (after 3 SGD steps)", ...
    dtype: str        # the precision this tensor was compared in
    abs_diff: float   # max |layout - single| over the tensor (over every stream's shard)
    rel_diff: float   # abs_diff / max |single|
    tol: float        # RTOL * max |single| + ATOL
    ok: bool

    @property
    def of_tol(self):
        """abs_diff as a fraction of the tolerance: the criterion (<= 1 passes)."""
        return self.abs_diff / self.tol


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


def _compare(layout, spec, state, x, y, mode, steps, dtype, values, derivatives, seed, device, devices, rank):
    """One mode in one dtype: [(mode, tensor, dtype, abs diff, reference max)] for what is asked.
    bf16/fp16: fp32 weights and input, forward and loss under torch.autocast (values only)."""
    half = dtype in AUTOCAST
    assert not (half and derivatives), "derivatives are compared in float64"
    state = {k: v.to(torch.float32 if half else dtype) for k, v in state.items()}
    x = x.to(device, torch.float32 if half else dtype)
    device_type = torch.device(device).type
    name = str(dtype).replace("torch.", "")
    ref, net, streams = _build(layout, spec, state, seed, device, devices, rank)
    for m in (ref, net):
        m.train(mode == "train")
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
            for m in (ref, net)]
    out = []
    for step in range(steps if derivatives else 1):
        with torch.autocast(device_type, dtype=dtype) if half else contextlib.nullcontext():
            out_ref, out_net = ref(x), net(x)
            loss_ref, loss = F.cross_entropy(out_ref, y), F.cross_entropy(out_net.to(device), y)
        if half:
            assert out_ref.dtype == out_net.dtype == dtype, (out_ref.dtype, out_net.dtype)
        if step == 0 and values:
            out.append((mode, "logits", name, *_diff(out_net, out_ref)))
            out.append((mode, "loss", name, *_diff(loss, loss_ref)))
        if not derivatives:
            break
        for opt in opts:
            opt.zero_grad()
        loss_ref.backward()
        loss.backward()
        if step == 0:
            out += _compare_params(mode, "grad", name, ref, streams, spec, lambda p: p.grad)
        for opt in opts:
            opt.step()
    if derivatives:
        out += _compare_params(mode, f"after {steps} SGD steps", name, ref, streams, spec, lambda p: p)
    return out


def run_check(layout, spec, batch_size=8, steps=3, modes=("eval", "train"), seed=0,
              device="cpu", devices=None, rank=0, init="d2l", dtype=torch.float32):
    """Compare `layout` against the single layout: logits and loss in `dtype` (float32, float64, or
    bfloat16/float16 under torch.autocast), gradients and parameters after `steps` SGD steps in float64
    (see the module docstring). Returns a list of `Row`.

    For the split layout every rank calls this; each compares its own shard and the per-tensor
    maxima are reduced over ranks, so every rank returns the same rows.
    """
    torch.manual_seed(seed)
    state = AlexNet(spec=spec, init=init).state_dict()  # seeded: the same on every rank
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, spec.in_channels, spec.image_size, spec.image_size, generator=gen)
    y = torch.randint(0, spec.num_classes, (batch_size,), generator=gen).to(device)
    args = (seed, device, devices, rank)
    results = []
    with ieee_fp32():  # the fp32 tolerance is for IEEE fp32, not the TF32 cuDNN uses by default on GPUs
        for mode in modes:
            if dtype != DERIVATIVES_DTYPE:
                results += _compare(layout, spec, state, x, y, mode, steps, dtype, True, False, *args)
            results += _compare(layout, spec, state, x, y, mode, steps, DERIVATIVES_DTYPE,
                                dtype == DERIVATIVES_DTYPE, True, *args)
    if layout == "split" and dist.is_initialized():
        maxima = torch.tensor([r[3:] for r in results], dtype=torch.float64)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        results = [(*r[:3], a, b) for r, (a, b) in zip(results, maxima.tolist())]
    rows = []
    for mode, name, dt, abs_diff, ref_max in results:
        rtol, atol = TOLERANCES[getattr(torch, dt)]
        tol = rtol * ref_max + atol
        rows.append(Row(mode, name, dt, abs_diff, abs_diff / ref_max if ref_max else 0.0, tol, abs_diff <= tol))
    return rows


def _compare_params(mode, what, dtype, ref, streams, spec, get):
    """Each stream's parameter (or its grad) against the same shard of the single layout's."""
    full = {n: get(p) for n, p in ref.named_parameters()}
    shards = shard_state_dict(full, spec)
    out = []
    for name, _ in ref.named_parameters():
        diffs = [_diff(get(dict(stream.named_parameters())[name]), shards[s][name]) for s, stream in streams]
        suffix = ".grad" if what == "grad" else f" ({what})"
        out.append((mode, name + suffix, dtype, max(d[0] for d in diffs), max(d[1] for d in diffs)))
    return out


def criterion(dtype):
    """The rule the verdict applies, in one line."""
    rows = [(dtype, "logits, loss")] if dtype != DERIVATIVES_DTYPE else []
    rows.append((DERIVATIVES_DTYPE, "logits, loss, gradients, parameters after SGD steps"
                 if dtype == DERIVATIVES_DTYPE else "gradients, parameters after SGD steps"))
    parts = [f"{what} in {str(dt).replace('torch.', '')}: rtol {TOLERANCES[dt][0]:g}, atol {TOLERANCES[dt][1]:g}"
             for dt, what in rows]
    return "max|layout - single| <= rtol * max|single| + atol per tensor; " + "; ".join(parts)


def verdict(rows, layout, streams, image_size, seconds):
    """The summary line: PASS/FAIL, how many agree, and the row closest to (or furthest past) its tolerance."""
    bad = [r for r in rows if not r.ok]
    worst = max(rows, key=lambda r: r.of_tol)
    return (f"{'PASS' if not bad else 'FAIL'}: {len(rows) - len(bad)}/{len(rows)} tensors agree ({layout}, "
            f"{streams} streams, {image_size} px); largest difference {worst.of_tol:.3g} x its tolerance "
            f"({worst.mode} {worst.tensor}, {worst.dtype}: {worst.abs_diff:.2e} against {worst.tol:.2e}); "
            f"{seconds:.1f} s")


def format_table(rows):
    lines = [f"{'mode':<6} {'tensor':<34} {'dtype':<8} {'max abs diff':>13} {'max rel diff':>13} "
             f"{'tolerance':>10}  ok"]
    for r in rows:
        lines.append(f"{r.mode:<6} {r.tensor:<34} {r.dtype:<8} {r.abs_diff:>13.3e} {r.rel_diff:>13.3e} "
                     f"{r.tol:>10.2e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
