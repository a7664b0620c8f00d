"""Measure what model parallelism costs: single vs split vs split+overlap vs DDP, interleaved, one job.

  torchrun --nproc_per_node=2 launch/bench.py                      # batch 64, 227 px, fp32: the table
  torchrun --nproc_per_node=2 launch/bench.py --sweep-batch 16,32,64,128 --out runs/sweep
  torchrun --nproc_per_node=2 launch/bench.py --profile runs/prof  # Perfetto / chrome://tracing traces
  python launch/bench.py --layouts single,streams   # one process (e.g. one GPU): single and streams

On CPU each rank uses cores/ranks threads (1 on a 2-core machine) so the ranks do not oversubscribe the
cores; single runs once with that many threads (one "device") and once with every core. See
docs/benchmarks.md for what is measured and the JSON schema.
"""
import argparse
import os
import shlex
import sys

import torch

from split_alexnet.bench import EXTRA_LAYOUTS, LAYOUTS, Config, check_config, format_table, run_bench, write_outputs
from split_alexnet.cli import UsageError, env, log, run_main
from split_alexnet.distributed import setup, teardown


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64, help="global batch: every layout processes it")
    p.add_argument("--sweep-batch", default=None, help="comma-separated batch sizes to measure as well, "
                   "e.g. 16,32,64,128 (throughput and memory against batch size)")
    p.add_argument("--image-size", type=int, default=227)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated: {','.join(LAYOUTS)} "
                   f"(the default), or {','.join(EXTRA_LAYOUTS)} (every stream in one process, one device); "
                   "one process without torchrun: single (default) and streams only")
    p.add_argument("--streams", type=int, default=2, help="streams of single/streams when run without "
                   "torchrun (under torchrun: one per process)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per layout (per batch size)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per layout, not measured")
    p.add_argument("--dtype", default="fp32", help="fp32, or bf16 (GPU only)")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches of split-overlap")
    p.add_argument("--profile", default=None, metavar="DIR", help="write a torch.profiler trace per rank "
                   "of the measured steps (first batch size) to DIR")
    p.add_argument("--out", default="runs/bench", metavar="DIR", help="where bench.json and bench.png go")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK with GPUs, else cpu")
    p.add_argument("--backend", choices=["nccl", "gloo"], default=None)
    p.add_argument("--timeout", type=float, default=600, help="seconds a rank may wait for its peers "
                   "(the waiting ranks sit in a barrier while single runs on rank 0)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _ints(text, flag):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated integers, e.g. 16,32,64,128") from None


def main(argv=None):
    args = parse_args(argv)
    world = env().world
    batches = [args.batch_size] + [b for b in _ints(args.sweep_batch or "", "--sweep-batch")
                                   if b != args.batch_size]
    layouts = tuple(l for l in args.layouts.split(",") if l)
    if world == 1 and args.layouts == ",".join(LAYOUTS):
        layouts = ("single",)  # the default without torchrun
    gpu = args.device.startswith("cuda") if args.device else (torch.cuda.is_available() and args.backend != "gloo")
    cfg = Config(batch_sizes=batches, image_size=args.image_size, layouts=layouts, steps=args.steps,
                 warmup=args.warmup, dtype=args.dtype, micro_batches=args.micro_batches,
                 profile=args.profile, out=args.out, seed=args.seed, streams=args.streams,
                 command=" ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]))
    check_config(cfg, world, "cuda" if gpu else "cpu")  # before any process group: fail fast
    ctx = setup(args.backend, args.device, args.timeout)
    try:
        result = run_bench(cfg, ctx)
        log(format_table(result["runs"], result["exchanges"]))
        if ctx.rank == 0:
            write_outputs(result, args.out)
        log(f"wrote {os.path.join(args.out, 'bench.json')} and bench.png ({result['wall_s']:.0f} s; load "
            f"average {result['load_average_before'][0]:.2f} before, {result['load_average_after'][0]:.2f} after)")
        return 0
    finally:
        teardown()


if __name__ == "__main__":
    run_main(main)
