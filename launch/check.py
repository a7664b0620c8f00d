"""Check that the layouts compute the same function as the single layout.

  torchrun --nproc_per_node=2 launch/check.py     # split: one process per stream (gloo on CPU, NCCL on GPUs)
  torchrun --nproc_per_node=4 launch/check.py --streams 2   # 2 streams x 2 replicas, global batch
  torchrun --nproc_per_node=4 launch/check.py --layout hybrid   # the 2014 hybrid over 4 ranks
  python launch/check.py                          # streams: every stream in this process
  python launch/check.py --image-size 67 --num-classes 10 --reads conv4=all   # another connectivity

Teaching switches (the exercises of docs/tutorial.md; each breaks one rule on purpose, so the check fails):
  torchrun --nproc_per_node=2 launch/check.py --image-size 67 --num-classes 10 --exercise keep-own-slice
  python launch/check.py --image-size 67 --num-classes 10 --exercise lrn-across-streams

Coding exercises (a backward you write, from exercises/*.py, graded by the check; answers: docs/solutions.md):
  torchrun --nproc_per_node=2 launch/check.py --image-size 67 --num-classes 10 --gather-backward FILE
  torchrun --nproc_per_node=2 launch/check.py --image-size 67 --num-classes 10 --logits-backward FILE
"""
import argparse
import time

import torch

from split_alexnet import flags, layouts
from split_alexnet.allocator import apply_keep_freed_memory
from split_alexnet.check import AUTOCAST, criterion, format_table, run_check, verdict
from split_alexnet.check_args import check_args
from split_alexnet.cli import DefaultsHelp, Parser, UsageError, env, log, run_main
from split_alexnet.comm import RuleError
from split_alexnet.distributed import setup, teardown
from split_alexnet.exercises import EXERCISES
from split_alexnet.precision import check_precision
from split_alexnet.spec import spec_or_usage_error


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=DefaultsHelp)
    p.add_argument("--layout", choices=layouts.names(checked=True), default=None,
                   help="default: split under torchrun, streams otherwise; hybrid: conv data parallel, fc "
                   "model parallel over every process (docs/scaling.md)")
    flags.add_net(p, "half: the paper's one-GPU net (§3.2), one stream: streams layout only (its one stream "
                  "against the single layout)")
    flags.add_streams(p, "streams of the net, default 2 (--net half: 1): split: processes per replica (N processes "
                      "run N / S replicas); hybrid: the conv layers' groups")
    p.add_argument("--no-allreduce", dest="allreduce", action="store_false",
                   help="leave the gradient all-reduce out (replicas, hybrid): the check must then FAIL")
    p.add_argument("--devices", default=None, help="streams layout: comma-separated devices, one per "
                   "stream (default: all on --device)")
    flags.add_image_size(p)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="SGD steps before the parameters are compared")
    p.add_argument("--update", choices=["torch", "paper"], default="torch", help="the SGD steps' rule: "
                   "torch.optim.SGD, or the paper's (split_alexnet.PaperSGD) (default: %(default)s)")
    p.add_argument("--hybrid-schedule", choices=["single", "2014"], default="single", help="hybrid: single "
                   "(one step over the whole batch: equals the single layout), or 2014 (cuda-convnet2's: an "
                   "fc pass and update per rank's slice, then one conv update at 4x the lr) against a "
                   "one-device run of the same updates (default: %(default)s)")
    p.add_argument("--modes", default="eval,train", help="eval, train (dropout on), or both")
    p.add_argument("--init", choices=["d2l", "paper"], default="d2l",
                   help="weights the layouts are compared at (see docs/equivalence.md)")
    flags.add_precision(p, "precision of the logits and loss: fp32 (float32), fp64 (float64), or bf16/fp16 "
                        "through torch.autocast with fp32 weights; gradients and SGD steps are always compared "
                        "in float64 (fp32 cannot rule on them: see docs/equivalence.md)", choices=None, dtype_alias=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK with NCCL, else cpu")
    p.add_argument("--backend", choices=["nccl", "gloo"], default=None)
    p.add_argument("--timeout", type=float, default=120, help="seconds a collective may wait for a peer")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="glibc: keep freed buffers for reuse (split_alexnet/allocator.py)")
    p.add_argument("--reads", default="", metavar="LAYER=own|all,...",
                   help="compare the layouts with another connectivity, e.g. conv4=all")
    p.add_argument("--exercise", choices=EXERCISES, default=None,
                   help="TEACHING SWITCH, breaks the model on purpose (docs/tutorial.md, exercises): "
                        "keep-own-slice (split layout: conv3..fc8's backward keeps its own slice instead "
                        "of summing), lrn-across-streams (the single layout's LRN spans every stream)")
    p.add_argument("--gather-backward", default=None, metavar="FILE",
                   help="EXERCISE (split layout): the backward of the exchange before conv3..fc8 is FILE's "
                        "backward(grad, sizes, group, dim) (template: exercises/gather_backward.py); "
                        "default: none, comm.py's reduce-scatter")
    p.add_argument("--logits-backward", default=None, metavar="FILE",
                   help="EXERCISE (split layout): the backward of the logits' gather is FILE's backward "
                        "(template: exercises/logits_backward.py); default: none, comm.py's keep own slice")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    _, allocator = apply_keep_freed_memory(args.keep_freed_memory)   # before any tensor of the check
    proc = env()
    entry, modes, dtype, opts, rules = check_args(args, proc)   # every refusal before any process group
    layout = entry.name
    ctx = setup(args.backend, args.device, args.timeout, layouts.setup_streams(entry, args.streams)) \
        if entry.torchrun else None
    try:
        streams = args.streams
        parts = layouts.batch_parts(entry, ctx)
        if args.batch_size % parts:
            raise UsageError(f"--batch-size {args.batch_size} does not split over {parts} "
                             f"{'replicas' if entry.processes == 'per-stream' else 'ranks'}: use a multiple of {parts}")
        spec = spec_or_usage_error(args.reads, streams=streams, image_size=args.image_size,
                                   in_channels=args.in_channels, num_classes=args.num_classes, net=args.net)
        device = ctx.device if ctx else torch.device(args.device or "cpu")
        devices = args.devices.split(",") if args.devices else [device] * streams
        if len(devices) != streams:
            raise UsageError(f"--devices names {len(devices)} devices for {streams} streams: give one per stream")
        where = (f"{ctx.world} processes, {ctx.backend}, {device}" if ctx
                 else f"1 process, devices {', '.join(map(str, devices))}")
        if entry.processes == "per-stream":
            where += f"; {ctx.replicas} replica(s) x {ctx.streams} streams, the global batch split over replicas"
        if entry.processes == "world":
            where += f"; {entry.about}, {ctx.world} ways, the batch split over ranks"
        if not args.allreduce:
            where += "; NO gradient all-reduce (must fail)"
        log(f"check: {layout} vs single, {streams} streams ({where}), {spec.image_size} px, "
            f"{spec.in_channels} channels, {spec.num_classes} classes, batch {args.batch_size}, "
            f"{args.steps} SGD steps ({args.update}'s update, lr 0.01, momentum 0.9, wd 5e-4"
            f"{'; hybrid 2014 schedule: fc lr 0.01, conv lr 0.04' if args.hybrid_schedule == '2014' else ''}), "
            f"modes {','.join(modes)}, init {args.init}")
        if dtype in AUTOCAST:
            check_precision({torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype], device.type)
        log(allocator)
        log(f"criterion: {criterion(dtype)} (see docs/equivalence.md)")
        t0 = time.perf_counter()
        if args.exercise:
            log(f"TEACHING SWITCH --exercise {args.exercise}: the model is broken on purpose; expect FAIL")
        for flag, key in (("--gather-backward", "gather_rule"), ("--logits-backward", "logits_rule")):
            if key in rules:
                log(f"EXERCISE {flag}: the split's backward rule is {getattr(args, flag[2:].replace('-', '_'))}")
        try:
            rows = run_check(layout, spec, args.batch_size, args.steps, modes, args.seed, device, devices,
                             rank=ctx.rank if ctx else 0, init=args.init, dtype=dtype, ctx=ctx,
                             allreduce=args.allreduce, update=args.update,
                             hybrid_schedule=args.hybrid_schedule, options=opts)
        except RuleError as e:
            raise UsageError(str(e)) from None
        log(format_table(rows))
        log(verdict(rows, layout, streams, spec.image_size, time.perf_counter() - t0))
        bad = [r for r in rows if not r.ok]
        if bad:  # the tensors that differ, each once (over the modes), in the table's order
            log("these differ: " + ", ".join(dict.fromkeys(r.tensor for r in bad)))
        return 0 if not bad else 1
    finally:
        teardown()


if __name__ == "__main__":
    run_main(main)
