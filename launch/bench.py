"""Measure what model parallelism costs: single vs split vs split+overlap vs DDP, interleaved, one job.

  torchrun --nproc_per_node=2 launch/bench.py                      # batch 64, 227 px, fp32: the table
  torchrun --nproc_per_node=2 launch/bench.py --sweep-batch 16,32,64,128 --out runs/sweep
  torchrun --nproc_per_node=2 launch/bench.py --profile runs/prof  # Perfetto / chrome://tracing traces
  torchrun --nproc_per_node=4 launch/bench.py --layouts split,mesh,hybrid,ddp   # 1x4, 2x2, hybrid, DDP
  python launch/bench.py --layouts single,streams,torchvision  # one process (e.g. one GPU)
  python launch/bench.py --layouts single,torchvision --precision bf16   # autocast bf16
  python launch/bench.py --device cuda:0 --layouts single,torchvision  # a GPU: batch 64..1024 (until out of
                                                                  #   memory), 30 steps, the device's bound
  python launch/bench.py --bound-table H100 --precision bf16      # the bound on paper (no steps)
  python launch/bench.py --link --link-from runs/bench/bench.json      # two GPUs on paper (no steps)
  python launch/bench.py --data /data/imagenet --workers 1             # the data path (bench.json 'data')
  torchrun --nproc_per_node=2 launch/bench.py --link --link-from runs/bench/bench.json  # + loopback check

On CPU each rank uses cores/ranks threads (1 on a 2-core machine) so the ranks do not oversubscribe the
cores; single and torchvision's AlexNet (the peer) run once with that many threads (one "device") and
once with every core (torchvision-all); the ratios block divides every layout's images/s by the peer's. On
CPU every figure is timed on the host's clock, on CUDA with CUDA events (bench.json's `clocks`). See
docs/benchmarks.md for what is measured and the JSON schema.
"""
import argparse
import os
import shlex
import sys

import torch

from split_alexnet import flags
from split_alexnet.allocator import apply_keep_freed_memory
from split_alexnet.bench import (
    EXTRA_LAYOUTS,
    LAYOUTS,
    BenchConfig,
    check_config,
    format_ratios,
    format_table,
    run_bench,
    write_outputs,
)
from split_alexnet.bench.bound import format_bound
from split_alexnet.cli import DefaultsHelp, Parser, UsageError, env, log, run_main
from split_alexnet.distributed import setup, teardown
from split_alexnet.precision import dtype_bytes
from split_alexnet.spec import default_streams, spec_or_usage_error

CUDA_SWEEP = "128,256,512,1024"   # after --batch-size (64): the sweep on a GPU, as far as memory allows
CUDA_STEPS, CPU_STEPS, CUDA_WARMUP = 30, 5, 3


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=DefaultsHelp)
    p.add_argument("--batch-size", type=int, default=64, help="global batch: every layout processes it")
    p.add_argument("--sweep-batch", default=None, help="comma-separated batch sizes to measure as well, "
                   "e.g. 16,32,64,128 (throughput and memory against batch size); default: "
                   f"{CUDA_SWEEP} on CUDA (stopped with a line at the first that runs out of memory), none on "
                   "CPU; 'none': no sweep")
    flags.add_image_size(p)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated: {','.join(LAYOUTS)} "
                   f"(the default), or {','.join(EXTRA_LAYOUTS)} (every stream in one process, one device); "
                   "one process without torchrun: single (default) and streams only")
    flags.add_net(p, "half: the paper's one-GPU net (§3.2), one stream, one process: layouts single and torchvision")
    flags.add_streams(p, "streams of single/streams when run without torchrun, default 2 (--net half: 1; under "
                      "torchrun split has one per process); mesh: streams per replica; hybrid: the conv layers' groups")
    p.add_argument("--steps", type=int, default=None, help="measured steps per layout (per batch size); "
                   f"default {CUDA_STEPS} on CUDA, {CPU_STEPS} on CPU")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per layout, not measured; "
                   f"default {CUDA_WARMUP} on CUDA (cuDNN's algorithm search, the allocator), 1 on CPU")
    flags.add_precision(p, "fp32, bf16 or fp16: bf16/fp16 run forward + loss under torch.autocast (weights and "
                        "gradients stay fp32); the exchanges then carry 2-byte activations", choices=None, dtype_alias=True)
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches of split-overlap")
    p.add_argument("--profile", default=None, metavar="DIR", help="write a torch.profiler trace per rank "
                   "of the measured steps (first batch size) to DIR")
    p.add_argument("--out", default="runs/bench", metavar="DIR", help="where bench.json and bench.png go")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK with GPUs, else cpu")
    p.add_argument("--backend", choices=["nccl", "gloo"], default=None)
    p.add_argument("--timeout", type=float, default=600, help="seconds a rank may wait for its peers "
                   "(the waiting ranks sit in a barrier while single runs on rank 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="glibc: keep freed buffers for reuse, no page faults per step (split_alexnet/allocator.py); "
                   "recorded in bench.json")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs for the "
                   "single, streams and torchvision layouts (for GPUs: slower on CPU, benchmarks/README.md)")
    p.add_argument("--compile", action="store_true", help="torch.compile the single and torchvision layouts")
    p.add_argument("--log-every", type=int, default=0, metavar="N", help="progress on stderr (rank 0): a bar "
                   "on a terminal, else a line with the time left every N layout-steps (0: one per round "
                   "of every layout)")
    p.add_argument("--bound-table", default=None, metavar="NAME", help="print the bound on paper from a "
                   "datasheet's peaks (NAME: H100, H200 or A100; split_alexnet/bench/bound.py) for --batch-size "
                   "and --sweep-batch in --precision, and run no steps (default: off)")
    g = p.add_argument_group("link model (--link: print predictions, run no steps; split_alexnet/bench/link.py)")
    g.add_argument("--link", action="store_true", help="predict a two-GPU split step for PCIe 2.0/4.0 and "
                   "NVLink 4 from measured compute and the spec's bytes; under torchrun also measure the "
                   "gloo loopback link and compare the prediction with the bench.json's split step")
    g.add_argument("--link-from", default="runs/bench/bench.json", metavar="JSON",
                   help="a bench.json whose split (else streams, else single) row gives the compute")
    g.add_argument("--compute-ms", default=None, help="per-stream compute per image in ms instead of "
                   "--link-from's, or 'gtx580' (the 2012 paper's 5.5 days for 90 epochs: 4.40 ms)")
    g.add_argument("--link-spec", action="append", default=[], metavar="NAME:GBPS:US",
                   help="another link: name, bandwidth GB/s per direction, latency us (repeatable)")
    g = p.add_argument_group("data path (--data DIR: time the input pipeline, no model; split_alexnet/bench/data.py)")
    g.add_argument("--data", default=None, metavar="DIR", help="an ImageNet-format folder (DIR/train/<class>/*) "
                   "or launch/prepare.py's output: each stage and the whole delivered path, images/s per core, "
                   "written to bench.json under 'data' (default: off, the model bench)")
    g.add_argument("--workers", type=int, default=1, help="--data: loader processes of the whole paths (default 1)")
    g.add_argument("--data-images", type=int, default=256, help="--data: images of the folder to use at most (default 256)")
    g.add_argument("--data-rounds", type=int, default=3, help="--data: rounds of the interleaved whole paths "
                   "(the median is reported; default 3)")
    return p.parse_args(argv)


def data_main(args):
    """--data DIR: the data bench (one process)."""
    from split_alexnet.bench import data as db
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = db.run_data_bench(args.data, size=args.image_size, batch=args.batch_size, workers=args.workers,
                               rounds=args.data_rounds, batches=args.steps, images=args.data_images,
                               streams=args.streams or 2, device=device)
    log(db.format_rows(result))
    log(f"wrote {db.write_data(result, args.out)} (load average {result['load_average_before'][0]:.2f} before, "
        f"{result['load_average_after'][0]:.2f} after)")
    return 0


def bound_table(args, batches):
    """--bound-table: the bound from a datasheet's peaks (no device, no steps)."""
    from split_alexnet.bench import bound as bd
    peak = bd.table_peak(args.bound_table, args.precision)
    if peak is None:
        raise UsageError(f"--bound-table {args.bound_table}: the table has {', '.join(bd.TABLE)}")
    act_bytes = dtype_bytes(args.precision)
    spec = spec_or_usage_error(image_size=args.image_size, dtype_bytes=act_bytes)
    log(bd.format_bound(bd.section(spec, batches, act_bytes, peak)))
    return 0


def _ints(text, flag):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated integers, e.g. 16,32,64,128") from None


def main(argv=None):
    args = parse_args(argv)
    _, allocator = apply_keep_freed_memory(args.keep_freed_memory)   # every rank, before any tensor
    world = env().world
    if args.link:
        from split_alexnet.bench.link import run_link
        return run_link(args, world)
    if args.data:
        return data_main(args)
    gpu = args.device.startswith("cuda") if args.device else (torch.cuda.is_available() and args.backend != "gloo")
    sweep = args.sweep_batch if args.sweep_batch is not None else (CUDA_SWEEP if gpu else "")
    batches = [args.batch_size] + [b for b in _ints("" if sweep == "none" else sweep, "--sweep-batch")
                                   if b != args.batch_size]
    layouts = tuple(l for l in args.layouts.split(",") if l)
    if world == 1 and args.layouts == ",".join(LAYOUTS):
        layouts = ("single", "torchvision")  # the default without torchrun
    if args.net == "half" and world > 1:
        raise UsageError("--net half is the paper's one-GPU net: it runs in one process; use "
                         "python launch/bench.py --net half (layouts single, torchvision)")
    if args.bound_table is not None:
        return bound_table(args, batches)
    steps = args.steps if args.steps is not None else (CUDA_STEPS if gpu else CPU_STEPS)
    warmup = args.warmup if args.warmup is not None else (CUDA_WARMUP if gpu else 1)
    cfg = BenchConfig(batch_sizes=batches, image_size=args.image_size, layouts=layouts, steps=steps,
                 warmup=warmup, precision=args.precision, micro_batches=args.micro_batches,
                 profile=args.profile, out=args.out, seed=args.seed, net=args.net,
                 streams=default_streams(args.streams, args.net), allocator=allocator,
                 channels_last=args.channels_last, compile=args.compile, log_every=args.log_every,
                 command=" ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]))
    check_config(cfg, world, "cuda" if gpu else "cpu")  # before any process group: fail fast
    ctx = setup(args.backend, args.device, args.timeout)
    try:
        log(allocator)
        result = run_bench(cfg, ctx)
        log(format_table(result["runs"], result["exchanges"]))
        log(format_ratios(result["ratios"], result["runs"]))
        if result.get("bound"):
            log("")
            log(format_bound(result["bound"]))
        log(f"clocks: {', '.join(f'{k} {v}' for k, v in result['clocks'].items() if v)}")
        if result.get("bytes_model"):
            log("")
            log(result["bytes_model"]["text"])
        if ctx.rank == 0:
            write_outputs(result, args.out)
        log(f"wrote {os.path.join(args.out, 'bench.json')} and bench.png ({result['wall_s']:.0f} s; load "
            f"average {result['load_average_before'][0]:.2f} before, {result['load_average_after'][0]:.2f} after)")
        return 0
    finally:
        teardown()


if __name__ == "__main__":
    run_main(main)
