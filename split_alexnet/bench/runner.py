"""The whole benchmark on one rank: build the layouts, measure every batch size, summarise."""
import os
import platform
import resource
import time

import torch
import torch.distributed as dist

from ..cli import log
from ..comm import clock_for
from ..errors import UsageError
from ..spec import Spec
from . import profile
from .bound import bound_section
from .config import cores, streams_of, threads_per_rank
from .layouts import build_runs
from .measure import measure, over_ranks
from .progress import BenchProgress
from .stats import exchanges_table, ratios, summarise


def _rss_peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def sweep(batches, measure_one, world=1, device="the device"):
    """measure_one(batch) for each batch in order; (batches measured, None or where and why it stopped).

    Out of memory at a batch after the first stops the sweep there with a line (one process: with
    several ranks the others would wait in a collective the failed one never reaches, so the error
    stands); at the first batch there is nothing to report: a one-line error naming the fix."""
    done = []
    for batch in batches:
        try:
            measure_one(batch)
        except torch.OutOfMemoryError:
            if world > 1:
                raise
            if not done:
                raise UsageError(f"batch {batch} does not fit in {device}'s memory: use a smaller --batch-size") from None
            log(f"  batch {batch}: out of memory on {device}; the sweep stops at batch {done[-1]}")
            return done, dict(batch_size=batch, reason="out of memory")
        done.append(batch)
    return done, None


def clocks(device_type, profiled):
    """bench.json's `clocks`: which clock each figure came from (docs/benchmarks.md, "The clocks")."""
    device = clock_for(device_type).name  # "cuda_events" on GPU, "host" elsewhere
    return dict(step=device, phases=device, exchanges=device, exposed_comm=device, ddp_in_flight=device,
                cpu_s="host_process_time", lrn_share=profile.clock_name(device_type == "cuda") if profiled else None,
                bound_probe=device)


def run_bench(cfg, ctx):
    """The whole benchmark on this rank; returns the result dict (complete on every rank, but `bound`:
    rank 0 alone probes the device, the others hold None)."""
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
    device = (torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda"
              else f"{platform.machine()} CPU, {cores()} cores")

    def measure_one(batch):
        try:
            measure(runs, spec, batch, cfg, ctx, profile_dir=cfg.profile if batch == cfg.batch_sizes[0] else None,
                    progress=progress)
        except torch.OutOfMemoryError:
            for r in runs:  # nothing of a batch that did not finish
                for d in (r.samples, r.memory, r.lrn_share):
                    d.pop(batch, None)
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        log(f"  batch {batch} done ({time.perf_counter() - t0:.0f} s)")

    try:
        batches, stopped = sweep(cfg.batch_sizes, measure_one, ctx.world, device)  # the LRN labels itself
    finally:
        progress.close()
    rows = [summarise(r, spec, b, ctx.world) for b in batches for r in runs]
    main = batches[0]
    exchanges = exchanges_table(runs, spec, main) if any(r.layout.startswith("split") for r in runs) else []
    (rss,) = over_ranks([_rss_peak_bytes()], ctx.device, dist.ReduceOp.MAX)
    bound = bound_section(spec, batches, cfg.precision, cfg.dtype_bytes, ctx.device, device, rows) \
        if ctx.rank == 0 else None
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
        sweep=batches if len(cfg.batch_sizes) > 1 else None, sweep_stopped=stopped,
        clocks=clocks(ctx.device.type, bool(cfg.profile)), bound=bound,
        torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command=cfg.command, load_average_before=load_before, load_average_after=os.getloadavg(),
        wall_s=time.perf_counter() - t0, rss_peak_bytes_max_rank=int(rss),
        runs=rows, exchanges=exchanges, ratios=ratios(rows),
    )
