"""The whole benchmark on one rank: build the layouts, measure every batch size, summarise."""
import os
import platform
import resource
import time

import torch
import torch.distributed as dist

from ..cli import log
from ..spec import Spec
from .config import cores, streams_of, threads_per_rank
from .layouts import build_runs, lrn_labelled
from .measure import measure, over_ranks
from .progress import BenchProgress
from .stats import exchanges_table, ratios, summarise


def _rss_peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_bench(cfg, ctx):
    """The whole benchmark on this rank; returns the result dict (complete on every rank)."""
    spec = Spec(streams=streams_of(cfg, ctx.world), image_size=cfg.image_size, dtype_bytes=cfg.dtype_bytes,
                net=cfg.net)
    per_rank = threads_per_rank(ctx.world)
    torch.set_num_threads(per_rank)
    load_before = os.getloadavg()
    runs = build_runs(cfg, spec, ctx)
    log(f"bench: {', '.join(r.label for r in runs)}; {ctx.world} ranks ({ctx.backend}, {ctx.device}), "
        f"{per_rank} thread(s) per rank of {cores()} cores; {cfg.image_size} px, {cfg.precision}; batch "
        f"{','.join(map(str, cfg.batch_sizes))}; {cfg.warmup} warm-up + {cfg.steps} measured steps each, "
        f"interleaved; load average {load_before[0]:.2f}")
    t0 = time.perf_counter()
    progress = BenchProgress(len(cfg.batch_sizes) * (cfg.warmup + cfg.steps) * len(runs), ctx.rank,
                             cfg.log_every)
    try:
        with lrn_labelled():  # a profiler range "lrn" around each LRN
            for i, batch in enumerate(cfg.batch_sizes):
                measure(runs, spec, batch, cfg, ctx, profile_dir=cfg.profile if i == 0 else None,
                        progress=progress)
                log(f"  batch {batch} done ({time.perf_counter() - t0:.0f} s)")
    finally:
        progress.close()
    rows = [summarise(r, spec, b, ctx.world) for b in cfg.batch_sizes for r in runs]
    main = cfg.batch_sizes[0]
    exchanges = exchanges_table(runs, spec, main) if any(r.layout.startswith("split") for r in runs) else []
    (rss,) = over_ranks([_rss_peak_bytes()], ctx.device, dist.ReduceOp.MAX)
    device = (torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda"
              else f"{platform.machine()} CPU, {cores()} cores")
    bytes_table = None
    if ctx.world > 1:  # bytes per step of the multi-process layouts and where each sends the fewest
        from .scaling import MULTI, cheapest_ranges, format_bytes_table, line
        streams = cfg.streams if ctx.world % cfg.streams == 0 else ctx.world
        bytes_table = dict(text=format_bytes_table(spec, ctx.world, streams, main),
                           lines={l: line(l, spec, ctx.world, streams) for l in MULTI},
                           cheapest=cheapest_ranges(spec, ctx.world, streams))
    return dict(
        device=device, bytes_model=bytes_table, backend=ctx.backend, batch_size=main, image_size=cfg.image_size,
        streams=spec.streams, dtype=cfg.precision, precision=cfg.precision, world=ctx.world, threads_per_rank=per_rank,
        micro_batches=cfg.micro_batches, warmup=cfg.warmup, steps=cfg.steps, allocator=cfg.allocator,
        channels_last=cfg.channels_last, compile=cfg.compile,
        sweep=cfg.batch_sizes if len(cfg.batch_sizes) > 1 else None,
        torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command=cfg.command, load_average_before=load_before, load_average_after=os.getloadavg(),
        wall_s=time.perf_counter() - t0, rss_peak_bytes_max_rank=int(rss),
        runs=rows, exchanges=exchanges, ratios=ratios(rows),
    )
