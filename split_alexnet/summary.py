"""The per-stream layer table (the seed's layer-by-layer shape printout, per stream), from the spec."""
from .spec import PAPER_NEURONS, Spec


def _ops(layer):
    ops = ["ReLU"] if layer.relu else []
    ops += ["LRN"] if layer.lrn else []
    ops += ["maxpool 3/2"] if layer.pool else []
    ops += [f"dropout {layer.dropout:g}"] if layer.dropout else []
    return ", ".join(ops) or "-"


def summary_table(spec: Spec, batch_size=128):
    s = spec.streams
    out = [f"AlexNet (2012), {s} stream{'s' if s > 1 else ''}, {spec.image_size}x{spec.image_size} px, "
           f"{spec.in_channels} input channel(s), {spec.num_classes} classes",
           "",
           f"{'layer':<7}{'reads':<7}{'kernel':<12}{'output per stream':<22}{'then':<42}"
           f"{'params/stream':>14}{'params total':>14}{'neurons':>10}",
           f"{'input':<7}{'':<7}{'':<12}{str((1, spec.in_channels, spec.image_size, spec.image_size)):<22}"]
    for r in spec.shapes:
        layer = r.layer
        per = spec.out_sizes(layer)
        if layer.kind == "conv":
            kernel = f"{layer.kernel}x{layer.kernel} s{layer.stride} p{layer.pad}"
            shape = (1, per[0], r.post_hw, r.post_hw)
            conv_hw = f" ({r.out_hw}x{r.out_hw} before pool)" if layer.pool else ""
        else:
            kernel, shape, conv_hw = f"{r.in_channels}->", (1, per[0]), ""
        per_stream = per[0] * (r.params_total // spec.width(layer))
        uneven = "*" if len(set(per)) > 1 else ""
        out.append(f"{layer.name:<7}{layer.reads:<7}{kernel:<12}{str(shape) + uneven:<22}"
                   f"{_ops(layer) + conv_hw:<42}{per_stream:>14,}{r.params_total:>14,}{r.neurons:>10,}")
    per_stream = [spec.params_per_stream(i) for i in range(s)]
    out.append(f"total parameters: {spec.params_total:,}; per stream: "
               + ", ".join(f"{p:,}" for p in per_stream) + " (fc8 split by output)")
    if any(len(set(spec.out_sizes(r.layer))) > 1 for r in spec.shapes):
        out.append(f"* fc8's {spec.num_classes} classes do not divide by {s}: streams hold "
                   f"{spec.out_sizes(spec.layers[-1])} outputs (the first stream's shape is shown)")
    if (spec.image_size, spec.in_channels, spec.num_classes) == (227, 3, 1000):
        out.append(f"neurons as in the paper (§3.5): {', '.join(f'{n:,}' for n in PAPER_NEURONS)}; "
                   f"its first figure, 253,440, is an erratum for 55*55*96 = 290,400")
    out += ["", "exchanges (what one stream sends to the others, forward; the backward moves the same "
            "volume again at conv3..fc8):",
            f"{'before':<8}{'backward':<16}{'elements/image':>15}{'bytes/image':>13}"
            f"{f'bytes/batch {batch_size}':>18}"]
    for e in spec.exchanges:
        out.append(f"{e.name:<8}{e.backward:<16}{e.elements:>15,}{e.bytes:>13,}{e.bytes * batch_size:>18,}")
    total = spec.bytes_per_image()
    out.append(f"{'total':<24}{'':>15}{total:>13,}{total * batch_size:>18,}")
    out.append(f"(fp32; {spec.streams - 1} peer(s) per stream; data parallelism would all-reduce "
               f"{spec.params_total:,} gradients = {4 * spec.params_total:,} bytes per step instead)")
    return "\n".join(out)
