"""From the measured steps to the rows of bench.json: medians over steps, and the spec's bytes."""
from statistics import median

from .measure import exchange_keys

PEERS = ("torchvision", "torchvision-all")   # the ratios' denominators (bench/layouts.py: bench_torchvision)


def spec_bytes_per_step(spec, layout, batch, world, streams=2):
    """What each rank sends per step, from the spec: the layout's line (layouts.py; split: activations in
    spec.dtype_bytes; ddp: a ring all-reduce of the fp32 gradients; mesh, hybrid), 0 for one process."""
    from .scaling import bytes_at
    return int(round(bytes_at(layout, spec, world, batch, streams)))


def summarise(run, spec, batch, world):
    """One row of bench.json's `runs`: `run` at `batch`, medians over its measured steps."""
    steps = run.samples[batch]
    keys = exchange_keys(spec)
    comm_fwd = [sum(s.comm[k] for k in keys if k.endswith("/fwd")) for s in steps]
    comm_bwd = [sum(s.comm[k] for k in keys if k.endswith("/bwd")) for s in steps]
    ips = [batch / s.step_s for s in steps]
    mem = run.memory[batch]
    out = dict(
        layout=run.layout, label=run.label, batch_size=batch, devices=run.devices, threads=run.threads,
        images_per_s=median(ips), images_per_s_min=min(ips), images_per_s_max=max(ips),
        step_s=median(s.step_s for s in steps),
        comm_s=median(f + b for f, b in zip(comm_fwd, comm_bwd)),
        bytes_sent_per_step=int(median([sum(s.bytes[k] for k in keys) for s in steps])),
        spec_bytes_sent_per_step=spec_bytes_per_step(spec, run.layout, batch, world,
                                                     run.net_spec.streams if run.net_spec else 2),
        peak_mem_bytes=int(mem.get("cuda_peak_bytes") or mem["tracked_bytes"]),
        memory={k: int(v) for k, v in mem.items()},
        breakdown=dict(
            fwd_compute_s=median(max(0.0, s.fwd_s - c) for s, c in zip(steps, comm_fwd)),
            bwd_compute_s=median(max(0.0, s.bwd_s - c) for s, c in zip(steps, comm_bwd)),
            comm_fwd_s=median(comm_fwd), comm_bwd_s=median(comm_bwd),
            optimizer_s=median(s.opt_s for s in steps),
            comm_per_exchange_s={k: median(s.comm[k] for s in steps) for k in keys
                                 if any(s.bytes[k] for s in steps)},
        ),
        comm_min_rank_s=median(s.comm_min_rank_s for s in steps),
        cpu_s_per_step=median(s.cpu_s for s in steps),
        # the share of its threads' time the layout got the CPU for: < 1 means it waited (for a peer, or
        # for a core another process held); CPU seconds per step are the work, wall time is the speed
        cpu_util=median(s.cpu_s / (s.step_s * run.threads * len(run.ranks)) for s in steps),
        steps=len(steps),
        image_size=run.image_size or spec.image_size,
        # LRN's share of the step, forward + backward, median over the profiled steps (max over ranks);
        # None without --profile, or where no step had an "lrn" range (torchvision's; profile.lrn_shares)
        lrn_share=median(run.lrn_share[batch]) if run.lrn_share.get(batch) else None,
    )
    if "waiting_rank_cpu_s" in run.report:      # one rank computes, the others wait (single)
        out["waiting_rank_cpu_s"] = median(s.idle_cpu_s for s in steps)
    if "allreduce_in_flight_s" in run.report:   # ddp's buckets in flight
        out["breakdown"]["allreduce_in_flight_s"] = median(s.inflight_s for s in steps)
    return out


def exchanges_table(runs, spec, batch):
    """Per exchange: bytes per image from the spec and as counted, and seconds (split; overlap exposed)."""
    by = {r.layout: r for r in runs}
    split, over = by.get("split"), by.get("split-overlap")
    src = split or over
    rows = []
    for e in spec.exchanges:
        fwd, bwd = f"{e.name}/fwd", f"{e.name}/bwd"
        row = dict(name=e.name, backward=e.backward, bytes_per_image=e.bytes,
                   bwd_bytes_per_image=e.bytes if e.backward == "reduce-scatter" else 0)
        if src is not None:
            steps = src.samples[batch]
            row["counted_bytes_per_image"] = median(s.bytes[fwd] for s in steps) / batch
            row["counted_bwd_bytes_per_image"] = median(s.bytes[bwd] for s in steps) / batch
        if split is not None:
            steps = split.samples[batch]
            row["fwd_s"] = median(s.comm[fwd] for s in steps)
            row["bwd_s"] = median(s.comm[bwd] for s in steps)
        if over is not None:
            steps = over.samples[batch]
            row["overlap_fwd_s"] = median(s.comm[fwd] for s in steps)
            row["overlap_bwd_s"] = median(s.comm[bwd] for s in steps)
        rows.append(row)
    return rows


def ratios(rows):
    """Per row: images/s over torchvision's at the same batch, one rank's threads and every core.

    [{label, layout, batch_size, vs_torchvision, vs_torchvision_all}]; a key is None where that
    torchvision row was not run."""
    peers = {(r["layout"], r["batch_size"]): r["images_per_s"] for r in rows
             if r["layout"] in PEERS}
    if not peers:
        return []
    out = []
    for r in rows:
        row = dict(label=r["label"], layout=r["layout"], batch_size=r["batch_size"])
        for key, peer in (("vs_torchvision", "torchvision"), ("vs_torchvision_all", "torchvision-all")):
            ips = peers.get((peer, r["batch_size"]))
            row[key] = r["images_per_s"] / ips if ips else None
        out.append(row)
    return out
