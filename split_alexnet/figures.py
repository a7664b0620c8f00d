"""The teaching figures, drawn from the spec (matplotlib, Agg): `python launch/figures.py` writes them.

- `towers`:      the network as one tower per device (the paper's Fig. 2, turned upright): every layer
                 with its per-stream output shape, and the exchanges labelled with the collective and
                 the bytes one stream sends per image (`Spec.exchanges`).
- `collectives`: all-gather and reduce-scatter on two devices, what each holds before and after, and
                 the two gradient rules of comm.py beside them.

Every label is a string built here from the spec (`tower_labels`), so a test can compare the drawing
with `Spec.shapes` and `Spec.exchanges`, and `figure_texts` reads back what a figure shows.
"""
from dataclasses import dataclass

from .spec import Spec

# one colour per stream / device, the same in every figure (matplotlib's tab10)
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
DPI = 100
GREY = "#555555"

# what each exchange is, by the function comm.py uses for it
DISTINCT = ("gather_for_distinct_kernels", "forward: all-gather  ·  backward: reduce-scatter (sum)")
SAME = ("gather_for_same_computation", "forward: all-gather  ·  backward: keep own slice")


def _tint(colour, amount=0.82):
    """colour mixed with white: box fills light enough for black text."""
    rgb = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    return tuple(c + (1 - c) * amount for c in rgb)


def _dims(*sizes):
    return "×".join(str(s) for s in sizes)


# ---- figure 1: the towers ----

@dataclass
class Box:
    title: str   # e.g. "conv1  48×55×55": the layer and its per-stream output (before pooling)
    detail: str  # kernel and what follows: "11×11 stride 4 · ReLU · LRN · max-pool → 48×27×27"


@dataclass
class ExchangeLabel:
    name: str    # the layer whose input is gathered, or "logits"
    lines: tuple  # where, the function, forward/backward, bytes


def tower_labels(spec: Spec):
    """Every text of the towers figure, from the spec: the image, the layers per stream, the exchanges.

    Returns (image, rows, exchanges): image a Box; rows a list of (layer name, [Box per stream]),
    the logits last; exchanges {layer name or "logits": ExchangeLabel}.
    """
    image = Box(f"image  {_dims(spec.in_channels, spec.image_size, spec.image_size)}",
                "every stream reads all of it")
    rows = []
    for r in spec.shapes:
        layer, boxes = r.layer, []
        for s, n in enumerate(spec.out_sizes(layer)):
            if layer.kind == "conv":
                title = f"{layer.name}  {_dims(n, r.out_hw, r.out_hw)}"
                stride = f"/{layer.stride}" if layer.stride > 1 else ""
                ops = [f"{layer.kernel}×{layer.kernel}{stride}"]
                ops += ["ReLU"] * layer.relu + ["LRN"] * layer.lrn
                if layer.pool:
                    ops.append(f"pool → {_dims(n, r.post_hw, r.post_hw)}")
            else:
                title = f"{layer.name}  {n}"
                ops = ["ReLU"] * layer.relu + [f"dropout {layer.dropout:g}"] * bool(layer.dropout)
                if layer.name == spec.layers[-1].name:
                    start = sum(spec.out_sizes(layer)[:s])
                    ops.append(f"classes {start}–{start + n - 1}")
            boxes.append(Box(title, " · ".join(ops)))
        rows.append((layer.name, boxes))
    rows.append(("logits", [Box(f"logits  {spec.num_classes}", "one loss, the same on every stream")
                            for _ in range(spec.streams)]))

    shapes = {r.layer.name: r for r in spec.shapes}
    names = [r.layer.name for r in spec.shapes]
    exchanges = {}
    for e in spec.exchanges:
        prev = shapes[names[names.index(e.name) - 1]] if e.name != "logits" else spec.shapes[-1]
        fn, rule = SAME if e.name == "logits" else DISTINCT
        part = (_dims(prev.out_per_stream, prev.post_hw, prev.post_hw) if prev.layer.kind == "conv"
                else str(prev.out_per_stream))
        peers = spec.streams - 1
        where = "the logits" if e.name == "logits" else f"before {e.name}"
        exchanges[e.name] = ExchangeLabel(e.name, (
            f"{where}: {fn}",
            rule,
            f"{e.bytes:,} B per image sent by each stream",
            f"= {peers} peer{'s' * (peers != 1)} × {part} × {spec.dtype_bytes} B"))
    return image, rows, exchanges


def draw_towers(spec: Spec):
    """Figure 1: one tower per stream, top to bottom; shaded bands where the streams exchange."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

    image, rows, exchanges = tower_labels(spec)
    S = spec.streams
    col_w, col_gap = (2.9, 0.45) if S <= 2 else (2.7, 0.35) if S <= 4 else (2.3, 0.3)
    detail_size = 9.5 * min(1.0, col_w / 2.9)  # the longest detail (conv1's) fills a box
    box_h, own_gap, ex_gap = 0.62, 0.34, 0.95
    left, top = 0.35, 1.45
    towers_w = S * col_w + (S - 1) * col_gap
    label_x = left + towers_w + 0.45
    width = label_x + 4.35
    col_x = [left + s * (col_w + col_gap) for s in range(S)]

    # rows top to bottom: (y of the box's top, the gap above it is an exchange?)
    reads_all = {layer.name for layer in spec.layers if layer.reads == "all"} | {"logits"}
    y, ys = top + box_h + own_gap, []  # the image box sits at `top`
    for name, _ in rows:
        if name in reads_all:
            y += ex_gap - own_gap
        ys.append(y)
        y += box_h + own_gap
    height = y - own_gap + 0.95

    fig = plt.figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")

    def box(x, y, w, b, colour):
        ax.add_patch(FancyBboxPatch((x, y), w, box_h, boxstyle="round,pad=0,rounding_size=0.08",
                                    facecolor=_tint(colour), edgecolor=colour, linewidth=1.6))
        ax.text(x + w / 2, y + 0.22, b.title, ha="center", va="center", fontsize=12.5, weight="bold")
        ax.text(x + w / 2, y + 0.46, b.detail, ha="center", va="center", fontsize=detail_size,
                color="#222222")

    def arrow(x0, y0, x1, y1, colour, lw=1.6):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=13,
                                     color=colour, linewidth=lw, shrinkA=0, shrinkB=1))

    ax.text(0.35, 0.38, f"AlexNet (2012) as {S} tower{'s' * (S > 1)}, one per device",
            fontsize=16, weight="bold", va="center")
    dtype = "fp32" if spec.dtype_bytes == 4 else f"{spec.dtype_bytes}-byte"
    ax.text(0.35, 0.66, f"Boxes: one stream's output shape at {spec.image_size} px (channels×height×width, "
            "before pooling).\nBands: the streams exchange; bytes: what one stream sends per image in the "
            f"forward pass ({dtype}).", fontsize=10.5, va="center", color=GREY, linespacing=1.4)
    for s in range(S):
        ax.text(col_x[s] + col_w / 2, top - 0.2, f"stream {s}  ·  device {s}", ha="center", va="center",
                fontsize=12, weight="bold", color=COLOURS[s])
    box(left, top, towers_w, image, "#7f7f7f")
    for s in range(S):
        x = col_x[s] + col_w / 2
        arrow(x, top + box_h, x, ys[0], GREY)

    for i, (name, boxes) in enumerate(rows):
        if name in reads_all:  # the exchange band: every stream's part to every stream
            y0, y1 = ys[i - 1] + box_h, ys[i]
            ax.add_patch(Rectangle((0.1, y0 + 0.04), width - 0.2, y1 - y0 - 0.08, facecolor="#eeeeee",
                                   edgecolor="none", zorder=0))
            for src in range(S):
                for dst in range(S):
                    xa = col_x[src] + col_w * (dst + 1) / (S + 1)
                    xb = col_x[dst] + col_w * (src + 1) / (S + 1)
                    arrow(xa, y0, xb, y1, COLOURS[src], lw=1.6 if src == dst else 1.3)
            lines = exchanges[name].lines
            ym = (y0 + y1) / 2
            ax.text(label_x, ym - 0.27, lines[0], fontsize=11, weight="bold", va="center")
            ax.text(label_x, ym - 0.06, lines[1], fontsize=10, va="center")
            ax.text(label_x, ym + 0.15, lines[2], fontsize=11, va="center", color="#8b0000", weight="bold")
            ax.text(label_x, ym + 0.34, lines[3], fontsize=9.5, va="center", color=GREY)
        elif i > 0:  # reads="own": the stream's own maps only, straight down
            for s in range(S):
                x = col_x[s] + col_w / 2
                arrow(x, ys[i - 1] + box_h, x, ys[i], COLOURS[s])
        for s, b in enumerate(boxes):
            box(col_x[s], ys[i], col_w, b, COLOURS[s])

    total = spec.bytes_per_image()
    ax.text(0.35, height - 0.45, "Straight arrows: the layer reads only its own stream's maps "
            "(reads=\"own\"); crossing arrows: it reads every stream's (reads=\"all\").\nThe backward pass "
            "sends as much again at each reduce-scatter, nothing at the logits. Total sent per stream, "
            f"forward: {total:,} B per image.", fontsize=10.5, va="center", color=GREY, linespacing=1.4)
    return fig


# ---- figure 2: the collectives and the gradient rules ----

def collective_labels():
    """The rows of the collectives figure: (title, arrow label, before, after, rule lines); blocks are
    (text, colour indices) per device: one index a plain block, two a sum of both devices' parts."""
    fwd = ("forward of both functions: all-gather", "all-gather",
           [[("A0", (0,)), None], [None, ("A1", (1,))]],
           [[("A0", (0,)), ("A1", (1,))], [("A0", (0,)), ("A1", (1,))]],
           ("Every device ends with every part",
            "A0, A1: each device's own part x_s (e.g. conv2's pooled maps),",
            "concatenated in stream order. Each device sends its part to",
            "the S−1 others: (S−1)·|x_s| values per device."))
    rs = (f"backward of {DISTINCT[0]}: reduce-scatter", "reduce-scatter",
          [[("G0a", (0,)), ("G0b", (0,))], [("G1a", (1,)), ("G1b", (1,))]],
          [[("G0a+G1a", (0, 1)), None], [None, ("G0b+G1b", (0, 1))]],
          ("Rule 1: DIFFERENT kernels on each device → sum",
           r"conv3, fc6, fc7, fc8: device $r$ computes $y_r = W_r\,x$ from the gathered $x$,",
           r"$\partial L/\partial x_s = \sum_r\, W_r[:, s]^{\top}\, \partial L/\partial y_r$",
           "every device's kernels add to every part's gradient: sum over",
           "devices, each keeps its own part."))
    keep = (f"backward of {SAME[0]}: keep own slice", "keep own slice",
            [[("Ga", (2,)), ("Gb", (2,))], [("Ga", (2,)), ("Gb", (2,))]],
            [[("Ga", (2,)), None], [None, ("Gb", (2,))]],
            ("Rule 2: the SAME computation on each device → keep own slice",
             "the logits z feed one loss, computed alike on every device: each",
             "already holds the whole ∂L/∂z, and a sum would multiply it by",
             "the number of devices. Nothing is sent."))
    return [fwd, rs, keep]


def draw_collectives():
    """Figure 2: what each of two devices holds before and after each exchange, and why."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    colours = (COLOURS[0], COLOURS[1], "#9467bd")  # device 0, device 1, the same value on both
    blk_w, blk_h, gap_dev = 1.05, 0.42, 0.18
    x_before, x_after = 1.25, 4.7
    x_rule = 7.05
    width, row_h, top = 12.8, 2.0, 1.05
    rows = collective_labels()
    height = top + len(rows) * row_h + 0.75

    fig = plt.figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    ax.text(0.3, 0.38, "Exchanges on two devices: what each holds before and after", fontsize=16,
            weight="bold", va="center")
    ax.text(0.3, 0.72, "split_alexnet/comm.py: both functions all-gather in the forward pass; "
            "they differ in the backward pass", fontsize=10.5, color=GREY, va="center")

    def block(x, y, text, idx):
        if len(idx) == 1:
            ax.add_patch(Rectangle((x, y), blk_w, blk_h, facecolor=_tint(colours[idx[0]], 0.6),
                                   edgecolor=colours[idx[0]], linewidth=1.6))
        else:  # a sum of both devices' parts: half in each colour
            for k, i in enumerate(idx):
                ax.add_patch(Rectangle((x + k * blk_w / 2, y), blk_w / 2, blk_h,
                                       facecolor=_tint(colours[i], 0.6), edgecolor="none"))
            ax.add_patch(Rectangle((x, y), blk_w, blk_h, facecolor="none", edgecolor="#333333",
                                   linewidth=1.6))
        ax.text(x + blk_w / 2, y + blk_h / 2, text, ha="center", va="center", fontsize=11.5,
                weight="bold")

    def holding(x0, y0, devices, names=True):
        for d, parts in enumerate(devices):
            y = y0 + d * (blk_h + gap_dev)
            if names:
                ax.text(x0 - 0.12, y + blk_h / 2, f"device {d}", ha="right", va="center", fontsize=10.5,
                        color=COLOURS[d], weight="bold")
            for k, part in enumerate(parts):
                x = x0 + k * blk_w
                if part is None:
                    ax.add_patch(Rectangle((x, y), blk_w, blk_h, facecolor="none", edgecolor="#bbbbbb",
                                           linewidth=1, linestyle=(0, (3, 3))))
                else:
                    block(x, y, *part)

    for i, (title, op, before, after, rule) in enumerate(rows):
        y = top + i * row_h
        if i:
            ax.plot([0.3, width - 0.3], [y - 0.12, y - 0.12], color="#dddddd", linewidth=1)
        ax.text(0.3, y + 0.12, title, fontsize=12.5, weight="bold", va="center")
        yb = y + 0.62
        ax.text(x_before + blk_w, yb - 0.14, "before", ha="center", fontsize=10, color=GREY)
        ax.text(x_after + blk_w, yb - 0.14, "after", ha="center", fontsize=10, color=GREY)
        holding(x_before, yb, before)
        holding(x_after, yb, after, names=False)  # the same rows: device 0 above, device 1 below
        ym = yb + blk_h + gap_dev / 2
        xa, xb = x_before + 2 * blk_w + 0.2, x_after - 0.2
        ax.add_patch(FancyArrowPatch((xa, ym), (xb, ym), arrowstyle="-|>", mutation_scale=18,
                                     color="#333333", linewidth=2))
        ax.text((xa + xb) / 2, ym - 0.13, op, ha="center", va="bottom", fontsize=10, style="italic")
        for k, line in enumerate(rule):
            maths = line.startswith("$")
            ax.text(x_rule, yb - 0.1 + k * 0.29, line, fontsize=13 if maths else 10.5,
                    weight="bold" if k == 0 else "normal", va="center",
                    color="#8b0000" if maths else "black")
    ax.text(0.3, height - 0.4, "blue: held or computed on device 0;  orange: on device 1;  two colours: "
            "the sum of both;  purple: the same value on both devices;  dashed: not held.\n"
            "G0a: device 0's gradient for part a (device 0's part of x);  Ga: the loss's gradient for "
            "device 0's logits.", fontsize=10, color=GREY, va="center", linespacing=1.4)
    return fig


# ---- writing and reading back ----

def figure_texts(fig):
    """Every string the figure shows (for the tests)."""
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]


def save(fig, path):
    """A PNG of 128 colours (flat fills and text need no more: a quarter of the bytes); no version
    stamp, so the same figure gives the same bytes."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    plt.close(fig)
    image = Image.open(buf).convert("RGB").quantize(128, dither=Image.Dither.NONE)
    image.save(path, format="png", optimize=True)


FIGURES = {  # file name -> how to draw it
    "towers.png": lambda: draw_towers(Spec()),
    "towers-4-streams.png": lambda: draw_towers(Spec(streams=4)),
    "collectives.png": draw_collectives,
}


def write_all(out_dir):
    """Draw every figure into out_dir; returns the paths written."""
    from pathlib import Path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in FIGURES.items():
        save(draw(), out / name)
        paths.append(out / name)
    return paths
