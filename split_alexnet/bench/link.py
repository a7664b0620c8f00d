"""Two GPUs on paper: a split step predicted from per-stream compute and the spec's bytes, for a link.

    python launch/bench.py --link --link-from runs/bench/bench.json           # the table, no steps run
    torchrun --nproc_per_node=2 launch/bench.py --link --link-from runs/bench/bench.json
                                                   # + gloo loopback measured, predicted vs measured split

The model (docs/benchmarks.md, "Two GPUs on paper"):

    collectives per step   n = forward all-gathers (one per exchange: conv3, fc6, fc7, fc8, logits)
                             + backward reduce-scatters (the exchanges whose backward is one: not logits)
    bytes per image        b = sum over those collectives of what one stream sends (Spec.exchanges,
                               in the activations' dtype: 244,688 B at 227 px, 2 streams, fp32)
    communication          K(B, M) = n * M * latency + B * b / bandwidth
    compute                C(B) = B * c          (c: per-stream compute per image, measured)
    step, no overlap       T = C + K(B, 1)
    step, M micro-batches  T = max(C, K) + min(C, K) / M      with K = K(B, M)

Assumptions, stated: compute is linear in the batch (true on CPU to ~15 %, not at small GPU batches);
every collective costs latency + bytes / bandwidth, one stream's part crossing the link in each
direction at once (two streams: all-gather and reduce-scatter each move one part per direction, so the
per-direction bandwidth is the one that counts); nothing else shares the link; the overlapped step is
a two-stage pipeline (compute of micro-batch m+1 while m's exchanges are on the link), which ignores
that the exchanges sit at five places in the net and that the first and last micro-batch cannot
overlap everything: read it as the best case.
"""
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..spec import Spec


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_gbs: float   # GB/s (1e9 bytes/s), per direction, as used
    latency_us: float      # per collective
    note: str = ""

    @property
    def bandwidth(self):
        return self.bandwidth_gbs * 1e9

    @property
    def latency(self):
        return self.latency_us * 1e-6


# Per-direction bandwidths. PCIe: 2.0 runs 5 GT/s per lane with 8b/10b coding = 500 MB/s per lane per
# direction, 8 GB/s at x16 (PCI-SIG, PCIe 2.0 base specification); 4.0 runs 16 GT/s with 128b/130b,
# 31.5 GB/s at x16. Effective figures are what a device-to-device copy reaches after packet overhead:
# NVIDIA's CUDA FAQ: "On PCI-Express 2.0 systems we have measured up to 6.0 GB/sec" (bandwidthTest,
# page-locked host memory); 5.5 is used, and PCIe 4.0 taken at the same ~80 % of theoretical (an estimate).
# NVLink 4 (H100 SXM): 18 links, 900 GB/s total, 450 GB/s per direction (NVIDIA H100 datasheet);
# no effective figure is assumed, so that row is the best case.
LINKS = (
    Link("PCIe 2.0 x16 (GTX 580)", 5.5, 10.0, "8 GB/s theoretical; ~5.5 effective used"),
    Link("PCIe 4.0 x16", 25.0, 10.0, "31.5 GB/s theoretical; ~25 effective used"),
    Link("NVLink 4 (H100)", 450.0, 2.5, "900 GB/s bidirectional = 450 per direction, theoretical"),
)

# The 2012 paper (section 5): about 90 passes over 1.2 million images took five to six days on two
# GTX 580 3GB GPUs, so the pair ran at 90 * 1.2e6 / (5.5 * 86400 s) = 227 images/s, 4.40 ms per image
# per stream, communication included (so an upper bound on their compute).
GTX580_MS_PER_IMAGE = 5.5 * 86400 / (90 * 1.2e6) * 1e3


def collectives(spec):
    """[(key, bytes per image one stream sends)] for every collective of one split step, in order."""
    out = [(f"{e.name}/fwd", e.bytes) for e in spec.exchanges]
    out += [(f"{e.name}/bwd", e.bytes) for e in reversed(spec.exchanges) if e.backward == "reduce-scatter"]
    return out


def comm_time(spec, batch, link, micro_batches=1):
    """K(B, M) = sum over collectives, each done once per micro-batch, of latency + bytes / bandwidth."""
    return sum(micro_batches * link.latency + batch * b / link.bandwidth for _, b in collectives(spec))


def step_time(compute_s, comm_s, micro_batches=1):
    """T = C + K without overlap; with M micro-batches a two-stage pipeline: max(C, K) + min(C, K) / M."""
    if micro_batches == 1:
        return compute_s + comm_s
    return max(compute_s, comm_s) + min(compute_s, comm_s) / micro_batches


def predict(spec, batch, compute_per_image_s, link, micro_batches=1):
    """The predicted step at `batch`: compute, communication, step, exposed communication and its share."""
    c = batch * compute_per_image_s
    k = comm_time(spec, batch, link, micro_batches)
    t = step_time(c, k, micro_batches)
    return dict(batch=batch, micro_batches=micro_batches, compute_s=c, comm_s=k, step_s=t,
                exposed_s=t - c, share=(t - c) / t)


def smallest_batch(spec, compute_per_image_s, link, micro_batches, max_share, limit=1 << 16):
    """The smallest batch (a multiple of M) whose exposed communication is at most max_share of the step,
    or None if none up to `limit` is (the link is the bottleneck at every batch)."""
    for b in range(micro_batches, limit + 1, micro_batches):
        if predict(spec, b, compute_per_image_s, link, micro_batches)["share"] <= max_share:
            return b
    return None


def link_bound_below_us(spec, link):
    """Per-image link time b / bandwidth: a stream computing an image faster than this is link-bound
    (communication >= 50 % of the step) at every batch, without overlap."""
    return sum(b for _, b in collectives(spec)) / link.bandwidth * 1e6


def compute_from_bench(result):
    """(per-stream compute seconds per image, where it came from) from a bench.json's main batch.

    split: (step - communication) / batch, communication being the min-rank figure (the transfer the
    last rank to arrive waits for: comm_min_rank_s); the rest of the split's communication time is one
    rank waiting for a slower peer, which is imbalance and stays in the compute; else streams: step / streams / batch (the streams one after
    the other on one device); else single: step / streams / batch (each stream half the work)."""
    batch = result["batch_size"]
    rows = {r["layout"]: r for r in result["runs"] if r["batch_size"] == batch}
    streams = result.get("streams", 2)
    if "split" in rows:
        r = rows["split"]
        return (r["step_s"] - r["comm_min_rank_s"]) / batch, f"split, (step {r['step_s']:.4f} s - comm " \
            f"{r['comm_min_rank_s']:.4f} s) / {batch} images"
    for layout in ("streams", "single"):
        if layout in rows:
            r = rows[layout]
            return r["step_s"] / streams / batch, f"{r['label']}, step {r['step_s']:.4f} s / {streams} " \
                f"streams / {batch} images"
    raise ValueError("bench.json has no split, streams or single row at its main batch")


def fit_link(sizes, seconds):
    """latency + bytes / bandwidth through (bytes, seconds) points, least squares in RELATIVE error
    (weights 1 / seconds^2), so that the small sizes set the latency and the large ones the bandwidth
    (plain least squares lets the largest sizes pull the latency negative). Returns (latency s, bytes/s)."""
    w = [1.0 / y ** 2 for y in seconds]
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, sizes))
    sy = sum(wi * y for wi, y in zip(w, seconds))
    sxx = sum(wi * x * x for wi, x in zip(w, sizes))
    sxy = sum(wi * x * y for wi, x, y in zip(w, sizes, seconds))
    slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    return (sy - slope * sx) / sw, 1.0 / slope


def measure_loopback(device, sizes=(1 << 10, 1 << 14, 1 << 17, 1 << 19, 1 << 21, 1 << 23), repeats=7):
    """The split's two collectives on the current process group: all_gather and reduce_scatter, each
    rank sending `sizes` bytes (fp32); median seconds of `repeats`, max over ranks, after a barrier.
    Returns {"all_gather": (sent, seconds), "reduce_scatter": (sent, seconds)} and a Link fitted to
    both together (the model has one link figure for both)."""
    world = dist.get_world_size()
    rank = dist.get_rank()
    data = {}
    for kind in ("all_gather", "reduce_scatter"):
        times = []
        for nbytes in sizes:
            n = nbytes // 4
            if kind == "all_gather":
                x = torch.ones(n, device=device)
                parts = [torch.empty_like(x) for _ in range(world)]
                op = lambda: dist.all_gather(parts, x)  # noqa: E731
            else:  # each rank sends the world-1 parts it does not keep
                chunks = [torch.ones(n, device=device) for _ in range(world)]
                out = torch.empty_like(chunks[rank])
                op = lambda: dist.reduce_scatter(out, chunks)  # noqa: E731
            op()  # warm-up
            ts = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                op()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            t = torch.tensor(sorted(ts)[len(ts) // 2], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(t.item())
        data[kind] = ([(world - 1) * s for s in sizes], times)  # what one rank sends
    sent = data["all_gather"][0] + data["reduce_scatter"][0]
    secs = data["all_gather"][1] + data["reduce_scatter"][1]
    latency, bandwidth = fit_link(sent, secs)
    return data, Link("loopback (gloo, measured)", bandwidth / 1e9, latency * 1e6, "fitted")


def _fmt_batch(b):
    return "never" if b is None else str(b)


def format_link_tables(spec, compute_per_image_s, source, links, micro_batches=2, batch=64,
                       batches=(1, 4, 16, 64, 256, 1024), hide_share=0.10):
    """The printed link model: one row per link at `batch`, then communication share against batch."""
    coll = collectives(spec)
    b_img = sum(b for _, b in coll)
    lines = [f"link model: {spec.streams} streams, {spec.image_size} px, {spec.dtype_bytes}-byte activations; "
             f"{len(coll)} collectives per step carrying {b_img:,} B per image (one stream's sends)",
             f"compute c = {compute_per_image_s * 1e3:.3f} ms per image per stream ({source})",
             "K(B,M) = n*M*latency + B*b/bandwidth;  T = B*c + K (no overlap);  "
             f"T = max(B*c, K) + min(B*c, K)/M (M = {micro_batches} micro-batches)",
             "",
             f"{'link':<28}{'GB/s':>7}{'lat us':>8}{'us/img':>8}{'comm s':>9}{'step s':>9}{'share':>7}"
             f"{'M step s':>9}{'M share':>8}{'comm<=50% from B':>18}{f'M: <={hide_share:.0%} from B':>18}"]
    for link in links:
        p1 = predict(spec, batch, compute_per_image_s, link, 1)
        pm = predict(spec, batch, compute_per_image_s, link, micro_batches)
        b50 = smallest_batch(spec, compute_per_image_s, link, 1, 0.5)
        bhide = smallest_batch(spec, compute_per_image_s, link, micro_batches, hide_share)
        lines.append(f"{link.name:<28}{link.bandwidth_gbs:>7.1f}{link.latency_us:>8.1f}"
                     f"{link_bound_below_us(spec, link):>8.1f}{p1['comm_s']:>9.4f}{p1['step_s']:>9.4f}"
                     f"{100 * p1['share']:>6.1f}%{pm['step_s']:>9.4f}{100 * pm['share']:>7.1f}%"
                     f"{_fmt_batch(b50):>18}{_fmt_batch(bhide):>18}")
    lines += ["", f"(step s and share at batch {batch}; us/img = b / bandwidth: a stream faster than that per "
              "image is link-bound at any batch without overlap)", "",
              "communication share of the step against batch (no overlap / "
              f"{micro_batches} micro-batches)",
              f"{'link':<28}" + "".join(f"{'B=' + str(b):>14}" for b in batches)]
    for link in links:
        cells = []
        for b in batches:
            s1 = predict(spec, b, compute_per_image_s, link, 1)["share"]
            mb = micro_batches if b % micro_batches == 0 else 1
            sm = predict(spec, b, compute_per_image_s, link, mb)["share"]
            cells.append(f"{100 * s1:>6.1f}/{100 * sm:>5.1f}%")
        lines.append(f"{link.name:<28}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


# ---- launch/bench.py --link: the tables, the loopback fit and its check ------------------------------

def run_link(args, world):
    """--link: the link model's tables; under torchrun also the loopback fit and predicted vs measured."""
    import json
    import os

    from ..cli import env, log
    from ..distributed import setup, teardown
    from ..errors import UsageError
    from ..precision import dtype_bytes
    from ..spec import spec_or_usage_error
    result = None
    if os.path.exists(args.link_from):
        with open(args.link_from) as f:
            result = json.load(f)
    if args.compute_ms is not None:
        try:
            ms = GTX580_MS_PER_IMAGE if args.compute_ms == "gtx580" else float(args.compute_ms)
        except ValueError:
            raise UsageError(f"--compute-ms {args.compute_ms!r}: give milliseconds, e.g. 4.4, or gtx580") from None
        compute, source = ms / 1e3, ("the 2012 paper's GTX 580 pair, 5.5 days for 90 epochs"
                                     if args.compute_ms == "gtx580" else "--compute-ms")
    elif result is not None:
        compute, source = compute_from_bench(result)
        source = f"{args.link_from}: {source}, {result.get('device', '?')}"
    else:
        raise UsageError(f"--link needs a bench.json for the compute: {args.link_from} does not exist; run "
                         f"the bench first, pass --link-from, or give --compute-ms")
    links = list(LINKS)
    for text in args.link_spec:
        try:
            name, gbs, us = text.rsplit(":", 2)
            links.append(Link(name, float(gbs), float(us)))
        except ValueError:
            raise UsageError(f"--link-spec {text!r}: use NAME:GBPS:US, e.g. 'PCIe 3.0 x16:12:10'") from None
    spec = spec_or_usage_error(image_size=args.image_size, dtype_bytes=dtype_bytes(args.precision))
    check = None
    if world > 1:
        if result is None or not any(r["layout"] == "split" for r in result["runs"]):
            raise UsageError(f"the loopback check compares with a measured split step: {args.link_from} has "
                             f"none; run torchrun --nproc_per_node=2 launch/bench.py first")
        ctx = setup("gloo", "cpu", args.timeout)
        try:
            sweep, loop = measure_loopback(ctx.device)
        finally:
            teardown()
        links.append(loop)
        check = loopback_check(result, loop)
        check.update(sweep={k: dict(bytes_sent=v[0], seconds=v[1]) for k, v in sweep.items()})
    log(format_link_tables(spec, compute, source, links, args.micro_batches, args.batch_size))
    if check:
        log("")
        for kind, (sent, secs) in sweep.items():
            log(f"loopback {kind:<15}" + "  ".join(f"{b:,} B {t * 1e3:.3f} ms" for b, t in zip(sent, secs)))
        log(f"loopback fit (both collectives, 2 gloo ranks, relative least squares): latency "
            f"{loop.latency_us:.1f} us, bandwidth {loop.bandwidth_gbs:.2f} GB/s")
        for row in check["rows"]:
            log(f"{row['layout']:<14} batch {row['batch']}: predicted {row['predicted_step_s']:.4f} s (compute "
                f"{row['compute_s']:.4f} + comm {row['predicted_comm_s']:.4f}), measured {row['measured_step_s']:.4f} s "
                f"(comm {row['measured_comm_s']:.4f}, min-rank {row['measured_comm_min_rank_s']:.4f}): "
                f"{100 * (row['predicted_step_s'] / row['measured_step_s'] - 1):+.1f} %")
    if env().rank == 0 and args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "link.json"), "w") as f:
            json.dump(dict(compute_per_image_s=compute, source=source, micro_batches=args.micro_batches,
                           links=[dict(name=l.name, bandwidth_gbs=l.bandwidth_gbs, latency_us=l.latency_us,
                                       at_batch=predict(spec, args.batch_size, compute, l, 1),
                                       overlapped=predict(spec, args.batch_size, compute, l,
                                                             args.micro_batches)) for l in links],
                           loopback_check=check), f, indent=2)
    return 0


def loopback_check(result, loop):
    """The measured split (and split-overlap) step of bench.json against the model fed the loopback fit
    and the split's own compute (step - its transfer time, the min-rank communication; the split row's
    compute for both)."""
    from ..precision import dtype_bytes
    batch = result["batch_size"]
    spec = Spec(streams=result["streams"], image_size=result["image_size"],
                dtype_bytes=dtype_bytes(result.get("precision", result.get("dtype"))))
    rows = {r["layout"]: r for r in result["runs"] if r["batch_size"] == batch}
    compute, _ = compute_from_bench(result)  # split: step - transfer (min-rank communication)
    out = []
    for layout, m in (("split", 1), ("split-overlap", result.get("micro_batches", 2))):
        if layout in rows:
            p = predict(spec, batch, compute, loop, m)
            r = rows[layout]
            out.append(dict(layout=layout, batch=batch, micro_batches=m, compute_s=p["compute_s"],
                            predicted_comm_s=p["comm_s"], predicted_step_s=p["step_s"],
                            measured_step_s=r["step_s"], measured_comm_s=r["comm_s"],
                            measured_comm_min_rank_s=r["comm_min_rank_s"]))
    return dict(rows=out, latency_us=loop.latency_us, bandwidth_gbs=loop.bandwidth_gbs)
