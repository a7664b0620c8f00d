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

from .hybrid import _hybrid_params
from .layouts import Place
from .layouts import get as get_layout
from .model import AlexNet
from .optim import make_optimizer
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


def _build(layout, spec, state, seed, device, devices, rank, ctx=None, allreduce=True, options=None):
    """The reference (a single-layout AlexNet holding `state`) and `layout`'s part of it on this rank
    (layouts.py: a Built, whose rows, out_rows, loss_group and params say what this rank compares)."""
    options = options or {}
    entry = get_layout(layout)
    if options.get("split") and not entry.exercises:
        raise ValueError(f"an exercise's backward rule is for the split layout, not {layout}: "
                         f"run it under torchrun --nproc_per_node=2")
    ref = AlexNet(spec=spec, dropout_seed=seed, **options.get("single", {})).to(device, state["conv1.weight"].dtype)
    ref.load_state_dict(state)
    world = ctx.world if ctx is not None else dist.get_world_size() if dist.is_initialized() else 1
    place = Place(rank, world, ctx, torch.device(device), tuple(devices) if devices else None)
    return ref, entry.build(ref, place, allreduce, options)


def _slice(rows, batch):
    """rows: None (the whole batch) or (part, parts): that part's rows of the batch."""
    if rows is None:
        return slice(None)
    part, parts = rows
    b = batch // parts
    return slice(part * b, (part + 1) * b)


def _labels(plan, y):
    return plan.labels(y) if plan.labels is not None else y


def _diff(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).abs().max().item(), b.abs().max().item()


def _compare(layout, spec, state, x, y, mode, steps, dtype, values, derivatives, seed, device, devices, rank,
             ctx=None, allreduce=True, update="torch", options=None):
    """One mode in one dtype: [(mode, tensor, dtype, abs diff, reference max)] for what is asked.
    bf16/fp16: fp32 weights and input, forward and loss under torch.autocast (values only)."""
    half = dtype in AUTOCAST
    assert not (half and derivatives), "derivatives are compared in float64"
    state = {k: v.to(torch.float32 if half else dtype) for k, v in state.items()}
    x = x.to(device, torch.float32 if half else dtype)
    device_type = torch.device(device).type
    name = str(dtype).replace("torch.", "")
    ref, plan = _build(layout, spec, state, seed, device, devices, rank, ctx, allreduce, options)
    net, rows, out_rows = plan.net, _slice(plan.rows, len(x)), _slice(plan.out_rows, len(x))
    y_net = y[rows] if plan.labels is not None else y[out_rows]    # the hybrid gathers its rows' labels
    for m in (ref, net):
        m.train(mode == "train")
    opts = [make_optimizer(update, m.parameters(), LR, MOMENTUM, WEIGHT_DECAY) for m in (ref, net)]
    out = []
    for step in range(steps if derivatives else 1):
        with torch.autocast(device_type, dtype=dtype) if half else contextlib.nullcontext():
            out_ref, out_net = ref(x), net(x[rows])
            loss_ref, loss = F.cross_entropy(out_ref, y), F.cross_entropy(out_net.to(device), _labels(plan, y_net))
        if half:
            assert out_ref.dtype == out_net.dtype == dtype, (out_ref.dtype, out_net.dtype)
        if step == 0 and values:
            shown = loss.detach().clone()
            if plan.loss_group is not None:           # replicas: the global loss is their losses' mean
                dist.all_reduce(shown, group=plan.loss_group)
                shown /= dist.get_world_size(plan.loss_group)
            out.append((mode, "logits", name, *_diff(out_net, out_ref[out_rows])))
            out.append((mode, "loss", name, *_diff(shown, loss_ref)))
        if not derivatives:
            break
        for opt in opts:
            opt.zero_grad()
        loss_ref.backward()
        loss.backward()
        if step == 0:
            out += _compare_params(mode, "grad", name, ref, plan.params, lambda p: p.grad)
        for opt in opts:
            opt.step()
    if derivatives:
        out += _compare_params(mode, f"after {steps} SGD steps", name, ref, plan.params, lambda p: p)
    return out


def _compare_2014(spec, state, x, y, mode, steps, seed, device, rank, allreduce, update):
    """The hybrid's 2014 schedule (hybrid.step_2014) against the same sequence of updates on one device
    (hybrid.reference_step_2014), in float64: every pass's loss, and the parameters after `steps` steps."""
    from .hybrid import CONV_LR_MULT_2014, hybrid_from_single, reference_step_2014, step_2014
    dtype = DERIVATIVES_DTYPE
    state = {k: v.to(dtype) for k, v in state.items()}
    x = x.to(device, dtype)
    world = dist.get_world_size() if dist.is_initialized() else 1
    ref = AlexNet(spec=spec, dropout_seed=seed).to(device, dtype)
    ref.load_state_dict(state)
    net = hybrid_from_single(ref, rank, world, None, device, allreduce)
    for m in (ref, net):
        m.train(mode == "train")
    fc_names = {layer.name for layer in spec.layers if layer.kind == "fc"}
    ref_fc = [p for n, p in ref.named_parameters() if n.split(".")[0] in fc_names]
    ref_conv = [p for n, p in ref.named_parameters() if n.split(".")[0] not in fc_names]
    opts = [make_optimizer(update, ps, lr, MOMENTUM, WEIGHT_DECAY)
            for ps, lr in ((ref_fc, LR), (ref_conv, LR * CONV_LR_MULT_2014),
                           (list(net.fc.parameters()), LR), (list(net.conv.parameters()), LR * CONV_LR_MULT_2014))]
    b = len(x) // world
    losses_ref, losses = [], []
    for _ in range(steps):
        losses_ref.append(reference_step_2014(ref, x, y, world, opts[0], opts[1]))
        losses.append(step_2014(net, x[rank * b:(rank + 1) * b], y, opts[2], opts[3]))
    out = [(mode, "loss (2014 passes)", "float64", *_diff(torch.stack(losses), torch.stack(losses_ref)))]
    return out + _compare_params(mode, f"after {steps} SGD steps, 2014", "float64", ref, _hybrid_params(net),
                                 lambda p: p)


def run_check(layout, spec, batch_size=8, steps=3, modes=("eval", "train"), seed=0,
              device="cpu", devices=None, rank=0, init="d2l", dtype=torch.float32, ctx=None,
              allreduce=True, update="torch", hybrid_schedule="single", options=None):
    """Compare `layout` against the single layout: logits and loss in `dtype` (float32, float64, or
    bfloat16/float16 under torch.autocast), gradients and parameters after `steps` SGD steps in float64
    (see the module docstring). Returns a list of `Row`.

    For the split and hybrid layouts every rank calls this; each compares its own shard and the
    per-tensor maxima are reduced over ranks, so every rank returns the same rows. With a ctx of
    several replicas (distributed.Context) the split runs as streams x replicas on the global batch;
    allreduce=False leaves the gradient all-reduce out (replicas' average, the hybrid's conv sum), which
    must fail. update: the SGD steps' rule ("torch": torch.optim.SGD, "paper": PaperSGD).
    hybrid_schedule "2014" (hybrid layout): the derivatives compare hybrid.step_2014 against
    hybrid.reference_step_2014 instead of one SGD step over the whole batch against the single layout.
    `options`: an exercise's arguments (exercises.py), {"single": AlexNet's keywords, "split":
    SplitAlexNet's}, which break or replace one rule on purpose.
    """
    if hybrid_schedule not in get_layout(layout).schedules:
        raise ValueError(f"hybrid_schedule {hybrid_schedule!r} with layout {layout!r}: use "
                         f"{' or '.join(map(repr, get_layout(layout).schedules))}")
    torch.manual_seed(seed)
    state = AlexNet(spec=spec, init=init).state_dict()  # seeded: the same on every rank
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, spec.in_channels, spec.image_size, spec.image_size, generator=gen)
    y = torch.randint(0, spec.num_classes, (batch_size,), generator=gen).to(device)
    args = (seed, device, devices, rank, ctx, allreduce, update, options)
    results = []
    with ieee_fp32():  # the fp32 tolerance is for IEEE fp32, not the TF32 cuDNN uses by default on GPUs
        for mode in modes:
            if dtype != DERIVATIVES_DTYPE or hybrid_schedule == "2014":
                results += _compare(layout, spec, state, x, y, mode, steps, dtype, True, False, *args)
            if hybrid_schedule == "2014":
                results += _compare_2014(spec, state, x, y, mode, steps, seed, device, rank, allreduce, update)
                continue
            results += _compare(layout, spec, state, x, y, mode, steps, DERIVATIVES_DTYPE,
                                dtype == DERIVATIVES_DTYPE, True, *args)
    if get_layout(layout).torchrun and dist.is_initialized():
        maxima = torch.tensor([r[3:] for r in results], dtype=torch.float64)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        results = [(*r[:3], a, b) for r, (a, b) in zip(results, maxima.tolist())]
    rows = []
    for mode, name, dt, abs_diff, ref_max in results:
        rtol, atol = TOLERANCES[getattr(torch, dt)]
        tol = rtol * ref_max + atol
        rows.append(Row(mode, name, dt, abs_diff, abs_diff / ref_max if ref_max else 0.0, tol, abs_diff <= tol))
    return rows


def _compare_params(mode, what, dtype, ref, params, get):
    """This rank's parameters (or their grads) against the same parts of the single layout's."""
    diffs = {}
    for name, mine, theirs in params(get, ref):
        diffs.setdefault(name, []).append(_diff(mine, theirs))
    suffix = ".grad" if what == "grad" else f" ({what})"
    return [(mode, name + suffix, dtype, max(d[0] for d in ds), max(d[1] for d in ds)) for name, ds in diffs.items()]


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
