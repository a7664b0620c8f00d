"""Layer by layer: the per-stream table derived from the spec, and the trace of a real forward pass."""
from .spec import PAPER_NEURONS, Spec


def _ops(layer):
    ops = ["ReLU"] if layer.relu else []
    ops += ["LRN"] if layer.lrn else []
    ops += ["maxpool 3/2"] if layer.pool else []
    ops += [f"dropout {layer.dropout:g}"] if layer.dropout else []
    return ", ".join(ops) or "-"


def summary_table(spec: Spec, batch_size=128):
    s = spec.streams
    net = (" the paper's one-GPU comparison net (§3.2: conv1-conv4 halved, conv5 and fc6-fc8 kept)"
           if spec.net == "half" else "")
    out = [f"AlexNet (2012){net}, {s} stream{'s' if s > 1 else ''}, {spec.image_size}x{spec.image_size} px, "
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
    for r in spec.shapes:
        if r.pad_end:
            out.append(f"{r.layer.name}: {r.pad_end} zero pixel(s) on the right and bottom (cuda-convnet2's output "
                       f"size, 1 + ceil((2 pad + size - kernel) / stride)): {spec.image_size} px acts as "
                       f"{spec.image_size + r.pad_end}")
    if (spec.image_size in (224, 227) and (spec.in_channels, spec.num_classes, spec.net) == (3, 1000, "paper")):
        out.append(f"neurons as in the paper (§3.5): {', '.join(f'{n:,}' for n in PAPER_NEURONS)}; "
                   f"its first figure, 253,440, is not conv1's 55*55*96 = 290,400 (the paper does not say how "
                   f"it was counted)")
    out += ["", "exchanges (what one stream sends to the others, forward; the backward moves the same "
            "volume again at conv3..fc8):",
            f"{'before':<8}{'backward':<16}{'elements/image':>15}{'bytes/image':>13}"
            f"{f'bytes/batch {batch_size}':>18}"]
    for e in spec.exchanges:
        out.append(f"{e.name:<8}{e.backward:<16}{e.elements:>15,}{e.bytes:>13,}{e.bytes * batch_size:>18,}")
    total = spec.bytes_per_image()
    out.append(f"{'total':<24}{'':>15}{total:>13,}{total * batch_size:>18,}")
    dtype = {4: "fp32", 2: "16-bit"}.get(spec.dtype_bytes, f"{spec.dtype_bytes}-byte")
    out.append(f"({dtype} activations; {spec.streams - 1} peer(s) per stream. Data parallelism would instead "
               f"all-reduce every step a buffer of {spec.params_total:,} fp32 gradients, {4 * spec.params_total:,} B, "
               f"of which a ring sends 2(W-1)/W per rank: below)")
    out += ["", crossover_text(spec), "", compute_text(spec)]
    if spec.streams > 1:
        out += ["", alternatives_text(spec, batch_size)]
    return "\n".join(out)


# ---- compute beside bytes: every number from the spec's LayerShape.macs and Spec.exchanges ----

def _pct(part, whole):
    return f"{100 * part / whole:.1f} %"


def segment_macs(spec):
    """{exchange name: forward multiply-adds per image ONE stream does from that exchange to the next}."""
    out, current = {}, None
    for r in spec.shapes:
        if r.layer.reads == "all":
            current = r.layer.name
        if current is not None:
            out[current] = out.get(current, 0) + r.macs // spec.streams
    return out


def compute_text(spec: Spec):
    """Forward multiply-adds per layer and in total, the conv/fc split of compute and parameters, and
    each exchange's compute-to-communication ratio."""
    total, shapes = spec.macs_per_image(), spec.shapes
    out = ["compute (forward multiply-adds per image, all streams; a training step is "
           f"{spec.flops_per_image_step():,} FLOPs per image: 2 per multiply-add, the backward twice the forward, "
           "conv1's once):",
           f"{'layer':<8}{'multiply-adds':>15}{'share':>9}{'params share':>14}"]
    for r in shapes:
        out.append(f"{r.layer.name:<8}{r.macs:>15,}{_pct(r.macs, total):>9}{_pct(r.params_total, spec.params_total):>14}")
    out.append(f"{'total':<8}{total:>15,}")
    for kind in ("conv", "fc"):
        macs = sum(r.macs for r in shapes if r.layer.kind == kind)
        params = sum(r.params_total for r in shapes if r.layer.kind == kind)
        out.append(f"{kind} layers: {_pct(macs, total)} of the compute ({macs:,}), "
                   f"{_pct(params, spec.params_total)} of the parameters ({params:,})")
    if spec.streams == 1:
        return "\n".join(out)
    seg = segment_macs(spec)
    layer_macs = {r.layer.name: r.macs // spec.streams for r in shapes}
    out += ["", "compute per byte (forward, per image, one stream): the multiply-adds of the layer an exchange "
            "feeds, and of every layer until the next exchange, per byte the stream sends there",
            f"{'exchange':<10}{'bytes':>9}{'layer MACs':>14}{'MACs/B':>9}{'until next':>14}{'MACs/B':>9}"]
    for e in spec.exchanges:
        if e.name == "logits":
            out.append(f"{e.name:<10}{e.bytes:>9,}{'-':>14}{'-':>9}{'-':>14}{'-':>9}   (only the loss follows)")
            continue
        out.append(f"{e.name:<10}{e.bytes:>9,}{layer_macs[e.name]:>14,}{layer_macs[e.name] / e.bytes:>9,.0f}"
                   f"{seg[e.name]:>14,}{seg[e.name] / e.bytes:>9,.0f}")
    per_stream = total // spec.streams
    out.append(f"{'whole net':<10}{spec.bytes_per_image():>9,}{per_stream:>14,}"
               f"{per_stream / spec.bytes_per_image():>9,.0f}")
    return "\n".join(out)


def alternatives(spec: Spec, batch_size=128):
    """[(what, bytes per image, bytes per step at batch_size, against)] for other ways to place the net:
    bytes one rank sends, forward + backward, over W = spec.streams ranks."""
    from .hybrid import bytes_per_step as hybrid_bytes
    sh, ex = {r.layer.name: r for r in spec.shapes}, {e.name: e for e in spec.exchanges}
    w, d = spec.streams, spec.dtype_bytes
    rows = []
    if "conv3" in ex:  # row-parallel conv3: each stream sums its partial outputs of all 384 kernels
        c3 = sh["conv3"]
        row = spec._sent(c3.out_per_stream * c3.out_hw ** 2)      # reduce-scatter fwd, all-gather bwd
        rows.append(("row-parallel conv3 (reduce-scatter its output)", 2 * row, "conv3's gather",
                     2 * ex["conv3"].bytes))
    if {"fc7", "fc8"} <= ex.keys():  # Megatron: fc6 column-, fc7 row-parallel, then an all-reduce (g; f back)
        fc7 = spec.width(sh["fc7"].layer) * d
        megatron = 2 * 2 * (w - 1) * fc7 // w                      # g forward + f backward, ring all-reduces
        rows.append(("Megatron fc6/fc7 (all-reduce fc7's output)", megatron, "the fc7 + fc8 gathers",
                     2 * (ex["fc7"].bytes + ex["fc8"].bytes)))
    split = spec.bytes_per_image_step()
    ddp = spec.ddp_bytes_per_step()
    rows.append((f"data parallelism over {w} ranks", ddp / batch_size, "the split", split))
    hybrid = sum(hybrid_bytes(spec, batch_size, w).values())
    rows.append((f"the 2014 hybrid over {w} ranks", hybrid / batch_size, "the split", split))
    return [(what, per_image, per_image * batch_size, against, theirs) for what, per_image, against, theirs in rows]


WHY = {
    "row-parallel conv3": "conv3 widens {a} maps to {b} at the same {hw}x{hw}, so summing its wide output "
                          "sends {r:.2f}x what gathering its narrow input does",
    "Megatron fc6/fc7": "the same bytes either way: the paper's gathers split every fc layer by its "
                        "neurons, where Megatron's all-reduce leaves fc7's output whole on every stream "
                        "(its ReLU and dropout then run on all {n:,} neurons on each)",
    "data parallelism": "each GPU would hold all {p:,} parameters, and at batch {B} it sends {r:.1f}x the "
                        "split's bytes; §3.2: 'A single GTX 580 GPU has only 3GB of memory', so the net was split",
    "the 2014 hybrid": "two years later (Krizhevsky, 'One weird trick'): the conv layers hold {cp} of the "
                       "parameters, so all-reducing their gradients is cheap, and the fc layers {fp} of them but "
                       "small activations, so exchanging those is cheap: {r:.2f}x the split's bytes at batch {B}",
}


def alternatives_text(spec: Spec, batch_size=128):
    sh, shapes = {r.layer.name: r for r in spec.shapes}, spec.shapes
    conv_params = sum(r.params_total for r in shapes if r.layer.kind == "conv")
    out = [f"the alternatives, costed (bytes one rank sends, forward + backward; batch {batch_size}, "
           f"{spec.streams} ranks, activations {spec.dtype_bytes} B, gradients 4 B):",
           f"{'instead':<48}{'B/image':>12}{'B/step':>15}   {'against':<22}{'B/image':>10}{'B/step':>14}"]
    for what, per_image, per_step, against, theirs in alternatives(spec, batch_size):
        out.append(f"{what:<48}{per_image:>12,.0f}{per_step:>15,.0f}   {against:<22}{theirs:>10,}"
                   f"{theirs * batch_size:>14,}")
        key = next(k for k in WHY if what.startswith(k))
        c3 = sh.get("conv3")
        out.append("  why: " + WHY[key].format(
            a=c3.in_channels if c3 else 0, b=spec.width(c3.layer) if c3 else 0, hw=c3.out_hw if c3 else 0,
            r=per_image / theirs, n=spec.width(sh["fc7"].layer), p=spec.params_total, B=batch_size,
            cp=_pct(conv_params, spec.params_total), fp=_pct(spec.params_total - conv_params, spec.params_total)))
    return "\n".join(out)


def crossover_text(spec: Spec):
    """Split bytes against data parallelism's all-reduce, per rank and step (docs/concepts.md)."""
    w, per_image = spec.streams, spec.bytes_per_image_step()
    if w == 1:
        return "crossover: one stream sends nothing, and data parallelism over one rank neither"
    lines = [f"per training step one stream sends {per_image:,} B per image (forward + backward); "
             f"data parallelism over {w} ranks sends 2({w}-1)/{w} x {spec.params_total:,} gradients per rank:"]
    for grad_bytes, what in ((4, "fp32 gradients"), (2, "16-bit gradients")):
        lines.append(f"  {what}: {spec.ddp_bytes_per_step(grad_bytes):,} B per step; the split sends less "
                     f"below a batch of {spec.crossover_batch(grad_bytes):,.1f} images (crossover)")
    return "\n".join(lines)


# ---- the trace: a dummy image through a real model, every step's output shape per stream ----
#
# The d2l chapter's printout, `for layer in net: X = layer(X); print(layer.__class__.__name__,
# 'output shape:\t', X.shape)`, for a net whose layers are not a Sequential: the model runs its own
# forward, and the trace listens. `forward_plan`'s two callbacks are wrapped: `exchange` directly,
# and each stream's `layer_fn` under a TorchFunctionMode that sees the torch functions it calls
# (conv2d, relu, local_response_norm, max_pool2d, flatten, linear), so each step's shape is measured,
# not derived from the spec. The model code is not changed.

from dataclasses import dataclass  # noqa: E402, I001

_STEPS = {"conv2d": "conv", "relu": "relu", "local_response_norm": "lrn", "max_pool2d": "maxpool",
          "flatten": "flatten", "linear": "linear"}


@dataclass(frozen=True)
class View:
    """How --trace shows one layout: one column or one per stream, where it runs, and what each exchange
    is there (before conv3..fc8, for the logits)."""
    whole: bool
    where: str
    ops: tuple
    collective: bool = False    # the exchange a collective performs (every rank receives every part)


VIEWS = {
    "single": View(True, "one module, one device", ("identity (one device)", "identity (one device)")),
    "streams": View(False, "{S} stream modules in one process", ("copy + cat on every device",
                                                                  "copy + cat on device 0")),
    "split": View(False, "{S} ranks, shown in one process", ("all-gather, bwd reduce-scatter",
                                                            "all-gather, bwd keep own slice"), collective=True),
}
LAYOUTS = tuple(VIEWS)


@dataclass
class Step:
    layer: str    # conv1..fc8, or "logits"
    op: str       # conv, relu, lrn, maxpool, flatten, linear, exchange
    shapes: list  # one output shape per column (per stream; one column for the single layout)
    note: str = ""


class _Listen:
    """A TorchFunctionMode that records the output shape of the steps named in _STEPS."""

    def __new__(cls, record):
        from torch.overrides import TorchFunctionMode

        class Listen(TorchFunctionMode):
            def __init__(self):
                super().__init__()
                self.lrn_out = None

            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = getattr(func, "__name__", "")
                if name == "fn" and getattr(func, "__qualname__", "").startswith("boolean_dispatch"):
                    name = "max_pool2d"  # F.max_pool2d is a dispatcher without a name of its own
                if name in _STEPS and not (name == "flatten" and out.shape == args[0].shape):
                    record(_STEPS[name], tuple(out.shape), "")
                    self.lrn_out = out if name == "local_response_norm" else None
                elif name == "reshape" and self.lrn_out is not None and args[0] is self.lrn_out:
                    # the single layout runs LRN on (B * streams, C / streams, H, W): one group per
                    # stream, so the window never crosses streams; the step's output is the reshape back
                    note = (f"LRN ran on {tuple(self.lrn_out.shape)}: one group per stream"
                            if self.lrn_out.shape != out.shape else "")
                    record("lrn", tuple(out.shape), note, replace=True)
                    self.lrn_out = None
                return out
        return Listen()


def trace(spec: Spec, layout="streams"):
    """Run a (1, C, H, W) zero image through `layout`; return the Steps, one shape per stream."""
    import torch

    from . import model as model_module
    if layout not in VIEWS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    view = VIEWS[layout]
    columns = 1 if view.whole else spec.streams
    steps, current = [], {"layer": None}

    def record(column, op, shape, note="", replace=False):
        if replace:  # amend this column's last step (see _Listen)
            last = next(s for s in reversed(steps) if s.shapes[column] is not None)
            last.shapes[column], last.note = shape, note
            return
        # the step's row: the first row of this layer and op still empty in this column
        for s in steps:
            if s.layer == current["layer"] and s.op == op and s.shapes[column] is None:
                s.shapes[column] = shape
                s.note = s.note or note
                return
        steps.append(Step(current["layer"], op, [None] * columns, note))
        steps[-1].shapes[column] = shape

    def traced_layer_fn(column, layer_fn):
        def run(layer, x):
            current["layer"] = layer.name
            with _Listen(lambda *a, **k: record(column, *a, **k)):
                return layer_fn(layer, x)
        return run

    def traced_exchange(exchange):
        def run(name, x):
            current["layer"] = name
            out = exchange(name, x)
            outs = out if isinstance(out, (list, tuple)) else [out] + [None] * (columns - 1)
            op = view.ops[name == "logits"]
            steps.append(Step(name, "exchange", [None if t is None else tuple(t.shape) for t in outs], op))
            return out
        return run

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
        if view.whole:              # AlexNet.forward's plan, with the traced callbacks passed in
            net = model_module.AlexNet(spec=spec).eval()
            model_module.forward_plan(spec, x, traced_layer_fn(0, net.layer_fn), traced_exchange(net.exchange))
            return steps
        net = model_module.StreamsAlexNet(spec).eval()
        traced = [traced_layer_fn(s, stream.layer_fn) for s, stream in enumerate(net.streams)]

        def layer_fn(layer, xs):    # every stream's module on its part (StreamsAlexNet.plan_callbacks')
            return [run(layer, t) for run, t in zip(traced, xs)]

        if not view.collective:     # StreamsAlexNet.forward's exchange, as it runs
            exchange = net.plan_callbacks()[1]
        else:
            # split, in process: the streams' modules, and the exchange the collectives perform
            # (comm.gather_for_distinct_kernels / gather_for_same_computation): every rank
            # receives every rank's part, the logits included
            def exchange(name, xs):
                return [torch.cat(xs, dim=1) for _ in xs]
        model_module.forward_plan(spec, [x] * spec.streams, layer_fn, traced_exchange(exchange))
    return steps


def trace_table(spec: Spec, layout="streams"):
    """The trace as text: one line per step, one column per stream."""
    steps = trace(spec, layout)
    view = VIEWS[layout]
    cols = ["whole net"] if view.whole else [f"stream {s}" for s in range(spec.streams)]
    where = view.where.format(S=spec.streams)
    width = max(20, *(len(str(sh)) + 2 for s in steps for sh in s.shapes))
    readers = "" if view.whole else " read by every stream"
    out = [f"{layout} layout ({where}): input (1, {spec.in_channels}, {spec.image_size}, "
           f"{spec.image_size}){readers}; eval mode (dropout off)",
           "",
           f"{'layer':<8}{'step':<10}" + "".join(f"{c:<{width}}" for c in cols) + "note"]
    for s in steps:
        shapes = "".join(f"{'-' if sh is None else str(sh):<{width}}" for sh in s.shapes)
        out.append(f"{s.layer:<8}{s.op:<10}{shapes}{s.note}".rstrip())
    return "\n".join(out)
