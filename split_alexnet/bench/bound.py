"""The device's bound: how many images/s one device could train at most, and the fraction reached.

From the spec, per image of a training step and per layer (all streams on one device):
- FLOPs: Spec.train_flops_per_image (forward, input gradient, weight gradient; 4.14 GFLOP at 227 px);
- bytes: the least a layer must move if everything around its matmul (bias, ReLU, LRN, pooling,
  dropout) were fused into it: forward reads its input and writes its output; backward reads the
  output's gradient and the input and writes the input's gradient (not the image's); the fp32 weights
  are read in forward and backward and their gradient written, once per step, so per image / batch;
  and the SGD step (momentum, weight decay) reads weights, gradients and momentum and writes weights
  and momentum: 5 fp32 passes over the parameters per step. Activations in the run's dtype (2 bytes
  under autocast), weights in fp32.
- time per image >= the sum over layers of max(FLOPs / peak FLOP/s, bytes / peak bandwidth), plus the
  optimizer's bytes / bandwidth (a roofline per layer: each layer is held by its own limit).
The bytes are a lower bound and the peaks upper ones, so the images/s are an upper bound: a run can
only reach a fraction of it. The peaks come from a short probe on the device (a square matmul in the
run's dtype, fp32 as TF32 where cuDNN convolves fp32 in TF32, torch's default on Ampere and later;
a large copy), timed on the device's clock (CUDA events on GPU); the table of datasheet peaks below
is printed beside it where the device's name is in it, and is the fallback if the probe fails.

On paper, from the table's peaks (no device needed):

    python launch/bench.py --bound-table H100 --precision bf16 --sweep-batch 128,256,512,1024
"""
from dataclasses import dataclass

import torch

from ..comm import clock_for

# Datasheet peaks, dense (no sparsity): {name contains: (bf16/fp16 TFLOP/s, tf32 TFLOP/s, fp32 TFLOP/s,
# memory TB/s)}. NVIDIA's H100 SXM, H200 SXM and A100 SXM 80 GB datasheets.
TABLE = {
    "H200": (989.0, 494.7, 66.9, 4.8),
    "H100": (989.0, 494.7, 66.9, 3.35),
    "A100": (312.0, 156.0, 19.5, 2.039),
}
OPT_PASSES = 5        # SGD with momentum: read w, g, m; write w, m (fp32)
WEIGHT_BYTES = 4


@dataclass(frozen=True)
class Peak:
    flops: float       # FLOP/s
    bandwidth: float   # bytes/s
    source: str        # "probe: ...", or "table: ..."
    clock: str         # the clock the probe was timed on ("cuda_events", "host"), or "datasheet"


def layer_costs(spec, batch, act_bytes):
    """[(layer, training FLOPs per image, bytes per image)], and the optimizer's bytes per image."""
    flops = spec.train_flops_per_image()
    rows, prev_elems = [], spec.in_channels * spec.image_size ** 2
    first = spec.layers[0].name
    for r in spec.shapes:
        name = r.layer.name
        out_elems = spec.width(r.layer) * r.out_hw ** 2
        weights = r.params_total * WEIGHT_BYTES / batch
        fwd = (prev_elems + out_elems) * act_bytes + weights
        bwd = (out_elems + prev_elems + (0 if name == first else prev_elems)) * act_bytes + 2 * weights
        rows.append((name, flops[name], fwd + bwd))
        prev_elems = spec.width(r.layer) * r.post_hw ** 2
    return rows, OPT_PASSES * spec.params_total * WEIGHT_BYTES / batch


def bound(spec, batch, act_bytes, peak):
    """dict: FLOPs and bytes per image, seconds per image at the peaks, and the images/s bound."""
    rows, opt_bytes = layer_costs(spec, batch, act_bytes)
    seconds = sum(max(f / peak.flops, b / peak.bandwidth) for _, f, b in rows) + opt_bytes / peak.bandwidth
    return dict(batch_size=batch, flops_per_image=sum(f for _, f, _ in rows),
                bytes_per_image=sum(b for _, _, b in rows) + opt_bytes,
                seconds_per_image=seconds, images_per_s=1.0 / seconds)


def _cudnn_tf32():
    """Whether cuDNN convolves fp32 in TF32 (torch's default; True where torch refuses to say)."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # torch refuses the legacy flag once the new fp32_precision API was used
        return True


def table_peak(device_name, precision):
    """The datasheet Peak of a device whose name contains a TABLE key, else None."""
    for key, (half, tf32, fp32, tbs) in TABLE.items():
        if key in device_name:
            tflops = half if precision in ("bf16", "fp16") else tf32 if _cudnn_tf32() else fp32
            return Peak(tflops * 1e12, tbs * 1e12, f"table: {key} datasheet, dense", "datasheet")
    return None


def probe(device, precision, clock=None, n=None, copy_bytes=None, reps=5):
    """The device's peaks, measured: a square n x n matmul in the run's dtype (fp32: TF32 where cuDNN
    runs fp32 convolutions in TF32) and a copy of copy_bytes; the best of reps, on clock (default the
    device's: CUDA events on GPU). Small sizes on CPU, where this only exercises the code."""
    cuda = device.type == "cuda"
    clock = clock if clock is not None else clock_for(device.type)
    n = n or (8192 if cuda else 512)
    copy_bytes = copy_bytes or ((1 << 30) if cuda else (1 << 24))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    tf32 = cuda and dtype == torch.float32 and _cudnn_tf32()
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 or matmul_tf32
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        src = torch.empty(copy_bytes // 4, device=device)
        dst = torch.empty_like(src)
        marks = {"matmul": [], "copy": []}
        for kind, fn in (("matmul", lambda: a @ b), ("copy", lambda: dst.copy_(src))):
            fn()  # warm-up (cuBLAS handles, allocations)
            for _ in range(reps):
                m0 = clock.mark()
                fn()
                marks[kind].append((m0, clock.mark()))
        if cuda:
            torch.cuda.synchronize()  # the probe's one synchronisation: every mark readable
        best = {k: min(clock.seconds(m0, m1) for m0, m1 in v) for k, v in marks.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    name = f"{precision}{' as tf32' if tf32 else ''}"
    return Peak(2 * n ** 3 / best["matmul"], 2 * copy_bytes / best["copy"],
                f"probe: {n}x{n} {name} matmul, {copy_bytes >> 20} MiB copy, best of {reps}", clock.name)


# the layouts whose every device runs the whole spec's net (the bound is one device's): the fraction is
# given for these only; torchvision's AlexNet is another net (no groups, 224 px), the split a share
ONE_DEVICE = ("single", "streams")


def bound_section(spec, batches, precision, act_bytes, device, device_name, rows, peak=None):
    """bench.json's `bound`: the peaks (probe, and the table's where the device is in it), the bound
    per batch, and each one-device row's fraction of it. peak: a measured Peak (default: probe())."""
    table = table_peak(device_name, precision) if device.type == "cuda" else None
    if peak is None:
        try:
            peak = probe(device, precision)
        except RuntimeError as e:  # e.g. out of memory beside a large run: the table then, if any
            if table is None:
                return dict(error=f"probe failed: {e}".splitlines()[0])
            peak = table
    return section(spec, batches, act_bytes, peak, table, rows)


def section(spec, batches, act_bytes, peak, table=None, rows=()):
    """The `bound` dict of bound_section, for a given Peak."""
    out = dict(peak=peak.__dict__, table=table.__dict__ if table else None, act_bytes=act_bytes,
               batches=[bound(spec, b, act_bytes, peak) for b in batches], fractions=[])
    by_batch = {b["batch_size"]: b for b in out["batches"]}
    for r in rows:
        if r["layout"] in ONE_DEVICE and r["batch_size"] in by_batch:
            out["fractions"].append(dict(label=r["label"], batch_size=r["batch_size"],
                                         images_per_s=r["images_per_s"],
                                         fraction=r["images_per_s"] / by_batch[r["batch_size"]]["images_per_s"]))
    return out


def format_bound(section):
    """The printed bound: peaks, FLOPs and bytes per image and the bound per batch, fractions reached."""
    if "error" in section:
        return f"bound: {section['error']}"
    p = section["peak"]
    lines = [f"bound (one device, the spec's net; bench/bound.py): peak {p['flops'] / 1e12:,.1f} TFLOP/s, "
             f"{p['bandwidth'] / 1e9:,.0f} GB/s ({p['source']}; clock {p['clock']})"]
    if section["table"]:
        t = section["table"]
        lines.append(f"  datasheet: {t['flops'] / 1e12:,.1f} TFLOP/s, {t['bandwidth'] / 1e9:,.0f} GB/s ({t['source']})")
    lines.append(f"{'batch':>6}{'GFLOP/img':>11}{'MB/img':>9}{'bound img/s':>13}")
    for b in section["batches"]:
        lines.append(f"{b['batch_size']:>6}{b['flops_per_image'] / 1e9:>11.3f}{b['bytes_per_image'] / 1e6:>9.2f}"
                     f"{b['images_per_s']:>13,.0f}")
    for f in section["fractions"]:
        over = "  (above 1: the probe fell short of the device's peak; this bound is not one)" if f["fraction"] > 1 else ""
        lines.append(f"{f['label']:<24}{f['batch_size']:>6}{f['images_per_s']:>12,.1f} img/s = "
                     f"{100 * f['fraction']:.2f} % of the bound{over}")
    return "\n".join(lines)

