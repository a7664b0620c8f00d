"""The comm Functions at world size 1, forced: NCCL's code path through comm.py on one GPU.

  torchrun --nproc_per_node=1 scripts/comm_world1.py --backend nccl --device cuda   # one GPU
  torchrun --nproc_per_node=1 scripts/comm_world1.py --backend gloo --device cpu    # the dry run

With one stream the exchanges are the identity and skip the Functions (comm.py), so one GPU never runs
a collective through them. Here every exchange of a one-stream split net is forced through them
(`force=True`): the synchronous Functions in forward and backward, and the async ones (comm_async.py).
At world size 1 an all-gather and a reduce-scatter copy their one part, so the logits and every
gradient must equal the plain forward's bit for bit (cuDNN set deterministic, so that a convolution's
backward sums in one order in both runs); the meter must count one call per exchange and direction and
read its seconds from the device's clock (CUDA events under NCCL) without a synchronize of its own.
Prints one line per check, writes --out (JSON), exits 1 if a check fails.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F

from split_alexnet import comm, comm_async
from split_alexnet.cli import UsageError, log, run_main
from split_alexnet.distributed import setup, teardown
from split_alexnet.model import SplitAlexNet, forward_plan
from split_alexnet.spec import Spec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="default: nccl with a GPU, else gloo")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK with a GPU, else cpu")
    p.add_argument("--image-size", type=int, default=227)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timeout", type=float, default=120, help="seconds a collective may take")
    p.add_argument("--out", default=None, metavar="JSON", help="write the checks here (default: none)")
    return p.parse_args(argv)


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def run_checks(net, x, y, device_type):
    """[(check, ok, detail)] of the forced Functions against the plain forward of `net` (one stream)."""
    spec = net.spec
    sizes = spec.out_sizes(spec.layers[-1])

    def forced(name, t):
        if name == "logits":
            return comm.gather_for_same_computation(t, sizes, None, name, force=True)
        return comm.gather_for_distinct_kernels(t, None, name, force=True)

    ref = net(x)                                   # one stream: the exchanges are the identity
    F.cross_entropy(ref, y).backward()
    ref_grads = _grads(net)
    net.zero_grad(set_to_none=True)
    clock = comm.clock_for(device_type)
    with comm.metered(clock) as meter:
        out = forward_plan(spec, x, net.layer_fn, forced)
        F.cross_entropy(out, y).backward()
    if device_type == "cuda":
        torch.cuda.synchronize()                   # after the step, as the bench does: the events are done
    grads = _grads(net)
    want = {f"{e.name}/fwd": 1 for e in spec.exchanges}
    want.update({f"{e.name}/bwd": 1 for e in spec.exchanges if e.backward == "reduce-scatter"})
    seconds = dict(meter.seconds)
    rows = [("sync: logits equal the plain forward's", torch.equal(out, ref), f"max |diff| {(out - ref).abs().max().item():.3g}"),
            ("sync: every gradient equals the plain backward's", all(torch.equal(grads[n], g) for n, g in ref_grads.items()),
             ", ".join(n for n, g in ref_grads.items() if not torch.equal(grads[n], g)) or "all equal"),
            ("sync: one call per exchange and direction", dict(meter.calls) == want, str(dict(meter.calls))),
            ("sync: nothing sent at world size 1", sum(meter.bytes.values()) == 0, f"{sum(meter.bytes.values())} B"),
            (f"sync: seconds from the {clock.name} clock, one per call",
             sorted(seconds) == sorted(want) and all(s >= 0 for s in seconds.values()),
             ", ".join(f"{k} {1e6 * v:.0f} us" for k, v in seconds.items()))]

    # the async Functions: a gather started and waited on, forward and backward
    t = torch.randn(x.shape[0], 6, device=x.device, requires_grad=True)
    w = torch.randn(x.shape[0], 6, device=x.device)
    with comm.metered(clock) as meter:
        distinct = comm_async.start_gather_for_distinct_kernels(t, None, "fc6", force=True).result()
        same = comm_async.start_gather_for_same_computation(t, [6], None, "logits", force=True).result()
        ((distinct * w).sum() + (same * w).sum()).backward()
    if device_type == "cuda":
        torch.cuda.synchronize()
    seconds = dict(meter.seconds)
    rows += [("async: the gathers are the identity", torch.equal(distinct, t) and torch.equal(same, t), ""),
             ("async: the gradient is both paths' upstream", torch.equal(t.grad, 2 * w), ""),
             ("async: exposed seconds from the device's clock", set(seconds) == {"fc6/fwd", "fc6/bwd", "logits/fwd"}
              and all(s >= 0 for s in seconds.values()), ", ".join(f"{k} {1e6 * v:.0f} us" for k, v in seconds.items()))]
    return rows


def main(argv=None):
    args = parse_args(argv)
    ctx = setup(args.backend, args.device, args.timeout)
    try:
        if ctx.backend == "none" or ctx.world != 1:
            raise UsageError("run it as one process under torchrun: torchrun --nproc_per_node=1 "
                             "scripts/comm_world1.py (a process group of one)")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            spec = Spec(streams=1, image_size=args.image_size, num_classes=args.num_classes)
        except ValueError as e:
            raise UsageError(str(e)) from None
        torch.manual_seed(0)
        net = SplitAlexNet(spec, 0, dropout_seed=0, init="d2l").to(ctx.device).eval()  # eval: no masks drawn
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch_size, 3, spec.image_size, spec.image_size, generator=gen).to(ctx.device)
        y = torch.randint(0, spec.num_classes, (args.batch_size,), generator=gen).to(ctx.device)
        rows = run_checks(net, x, y, ctx.device.type)
        log(f"comm at world size 1, forced through the Functions: {ctx.backend}, {ctx.device}, "
            f"{spec.image_size} px, batch {args.batch_size}")
        for name, ok, detail in rows:
            log(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        bad = [name for name, ok, _ in rows if not ok]
        log("PASS" if not bad else f"FAIL: {len(bad)} of {len(rows)} checks")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(dict(backend=ctx.backend, device=str(ctx.device), passed=not bad,
                               checks=[dict(check=n, ok=bool(o), detail=d) for n, o, d in rows]), f, indent=2)
        return 0 if not bad else 1
    finally:
        teardown()


if __name__ == "__main__":
    run_main(main)
