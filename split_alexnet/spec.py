"""The 2012 two-GPU AlexNet as data: one spec from which models, tables, byte counts and docs derive.

Sources: Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep Convolutional Neural
Networks", NIPS 2012, §3 (cited as §); Krizhevsky's cuda-convnet2 (its two-GPU layer config and
layer.py); Caffe's models/bvlc_alexnet. docs/reproduction.md says where they disagree.
"""
from dataclasses import dataclass, field, replace

MIN_IMAGE_SIZE = 67  # smallest input for which pool5 is still 1x1 (67 -> 15 -> 7 -> 3 -> 3 -> 1)


@dataclass(frozen=True)
class Layer:
    name: str          # the paper's name: conv1..conv5, fc6..fc8
    kind: str          # "conv" or "fc"
    width: int         # kernels (conv) or neurons (fc), all streams together
    kernel: int = 0
    stride: int = 1
    pad: int = 0
    reads: str = "own"  # "image": the input; "own": this stream's maps only; "all": every stream's
    #                     ("all" is an exchange: the streams gather each other's maps first)
    relu: bool = True
    lrn: bool = False
    pool: bool = False  # overlapping max-pool, window 3, stride 2 (§3.4)
    dropout: float = 0.0
    # ceil_out: cuda-convnet2's output-size rule (layer.py:1097, LocalLayerParser.parse, which its
    # ConvLayerParser inherits): modulesX = 1 + ceil((2 * padding + imgSize - filterSize) / stride), so a
    # window may start where fewer than filterSize pixels remain; those are zeros on the right and bottom
    # (pad_end below). conv1 only: at 224 px its output is 55, as in the paper (§3.5, Fig. 2); 227 px
    # (Caffe's crop) needs no such padding.
    ceil_out: bool = False


# §3.5, Fig. 2. The widths are totals over both streams; each stream holds width / streams.
LAYERS = (
    Layer("conv1", "conv", 96, kernel=11, stride=4, pad=0, reads="image", lrn=True, pool=True, ceil_out=True),
    Layer("conv2", "conv", 256, kernel=5, pad=2, reads="own", lrn=True, pool=True),
    Layer("conv3", "conv", 384, kernel=3, pad=1, reads="all"),
    Layer("conv4", "conv", 384, kernel=3, pad=1, reads="own"),
    Layer("conv5", "conv", 256, kernel=3, pad=1, reads="own", pool=True),
    Layer("fc6", "fc", 4096, reads="all", dropout=0.5),
    Layer("fc7", "fc", 4096, reads="all", dropout=0.5),
    Layer("fc8", "fc", 1000, reads="all", relu=False),  # width replaced by num_classes
)

# Local response normalisation (§3.3) as cuda-convnet2 ran it: torch's LocalResponseNorm divides
# alpha by size, and so did Krizhevsky's code (layer.py: scale /= size), so alpha=1e-4 here equals
# what ran; the paper's formula read literally would be alpha=5e-4 in torch's terms. Applied within
# each stream only: the window never crosses the stream boundary.
# The paper's one-GPU comparison net (§3.2 and its footnote): "a net with half as many kernels in each
# convolutional layer trained on one GPU", except that "the one-GPU net actually has the same number of
# kernels as the two-GPU net in the final convolutional layer. [...] we did not halve the size of the final
# convolutional layer (nor the fully-connected layers which follow)". One stream, no groups: conv1-conv4
# halved (48, 128, 192, 192), conv5 and fc6-fc8 as in the two-GPU net (256, 4096, 4096, classes).
LAYERS_HALF = (
    Layer("conv1", "conv", 48, kernel=11, stride=4, pad=0, reads="image", lrn=True, pool=True, ceil_out=True),
    Layer("conv2", "conv", 128, kernel=5, pad=2, reads="own", lrn=True, pool=True),
    Layer("conv3", "conv", 192, kernel=3, pad=1, reads="all"),
    Layer("conv4", "conv", 192, kernel=3, pad=1, reads="own"),
    Layer("conv5", "conv", 256, kernel=3, pad=1, reads="own", pool=True),
    Layer("fc6", "fc", 4096, reads="all", dropout=0.5),
    Layer("fc7", "fc", 4096, reads="all", dropout=0.5),
    Layer("fc8", "fc", 1000, reads="all", relu=False),
)
NETS = {"paper": LAYERS, "half": LAYERS_HALF}   # --net: the two-GPU net, or §3.2's one-GPU net

LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
POOL = dict(kernel_size=3, stride=2)
# Fig. 2's text (§3.5); the first is not 55 * 55 * 96 = 290,400, the others are the layers' outputs
PAPER_NEURONS = (253_440, 186_624, 64_896, 64_896, 43_264, 4096, 4096, 1000)


def _conv_out(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


def pad_end(size, kernel, stride, pad):
    """The zero pixels on the right and bottom that cuda-convnet2's output-size rule adds (ceil_out):
    1 + ceil((2 pad + size - kernel) / stride) outputs need (out - 1) stride + kernel input pixels."""
    out = 1 + -(-(2 * pad + size - kernel) // stride)
    return (out - 1) * stride + kernel - (size + 2 * pad)


def split_sizes(total, streams):
    """Sizes of `streams` nearly equal parts of `total` (torch.tensor_split's rule)."""
    return [total // streams + (1 if s < total % streams else 0) for s in range(streams)]


@dataclass(frozen=True)
class LayerShape:
    layer: Layer
    in_channels: int   # input channels (conv) or features (fc) one stream's kernels read
    out_per_stream: int
    out_hw: int        # spatial size after the layer's conv (before pooling); 1 for fc
    post_hw: int       # spatial size after pooling; 1 for fc
    weight_shape: tuple  # one stream's weight (the largest shard when fc8 does not divide)
    params_total: int
    neurons: int       # the paper's count: conv output before pooling, all streams
    macs: int          # multiply-adds per image in the forward pass, all streams (the conv or the matmul)
    pad_end: int = 0   # zero pixels added on the right and bottom before the conv (ceil_out)


@dataclass(frozen=True)
class Spec:
    """AlexNet for a given input and split: every derived number comes from here."""
    streams: int = 2
    image_size: int = 227
    in_channels: int = 3
    num_classes: int = 1000
    dtype_bytes: int = 4
    net: str = "paper"   # "paper": the two-GPU net (LAYERS); "half": §3.2's one-GPU net (LAYERS_HALF)
    layers: tuple = field(default=None, repr=False)   # None: NETS[net]

    def __post_init__(self):
        if self.net not in NETS:
            raise ValueError(f"unknown net {self.net!r}: use {' or '.join(NETS)}")
        if self.layers is None:
            object.__setattr__(self, "layers", NETS[self.net])
        if self.net == "half" and self.streams != 1:
            raise ValueError(f"--net half is the paper's one-GPU net (§3.2): it has one stream, not "
                             f"{self.streams}; use --streams 1 and the single layout")
        check_streams(self.streams)
        if not isinstance(self.image_size, int) or self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image size {self.image_size} is too small for AlexNet: "
                             f"use --image-size {MIN_IMAGE_SIZE} or more (227 is the paper's)")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.num_classes < self.streams:
            raise ValueError(f"num_classes {self.num_classes} is smaller than the {self.streams} "
                             f"streams fc8 is split over: use at least {self.streams} classes")

    def width(self, layer):
        return self.num_classes if layer.name == "fc8" else layer.width

    def out_sizes(self, layer):
        """Output features of each stream for this layer (only fc8 may be uneven)."""
        return split_sizes(self.width(layer), self.streams)

    @property
    def shapes(self):
        rows, hw, chans = [], self.image_size, self.in_channels  # chans: total input maps
        for layer in self.layers:
            width = self.width(layer)
            per = self.out_sizes(layer)
            if layer.kind == "conv":
                fan_in = chans // self.streams if layer.reads == "own" else chans  # image or all
                end = pad_end(hw, layer.kernel, layer.stride, layer.pad) if layer.ceil_out else 0
                out_hw = _conv_out(hw + end, layer.kernel, layer.stride, layer.pad)
                post_hw = _conv_out(out_hw, POOL["kernel_size"], POOL["stride"], 0) if layer.pool else out_hw
                weight = (per[0], fan_in, layer.kernel, layer.kernel)
                params = width * (fan_in * layer.kernel ** 2 + 1)
                neurons = width * out_hw * out_hw
                macs = neurons * fan_in * layer.kernel ** 2
                hw, chans = post_hw, width
            else:
                fan_in = chans * hw * hw
                out_hw = post_hw = 1
                weight = (per[0], fan_in)
                params = width * (fan_in + 1)
                neurons = width
                macs = width * fan_in
                hw, chans = 1, width
            rows.append(LayerShape(layer, fan_in, per[0], out_hw, post_hw, weight, params, neurons, macs,
                                   end if layer.kind == "conv" else 0))
        return rows

    @property
    def params_total(self):
        return sum(r.params_total for r in self.shapes)

    def macs_per_image(self):
        """Forward multiply-adds per image, all streams (the convolutions' and matmuls' alone: ReLU,
        LRN, pooling and dropout are elementwise and counted in bytes, not here)."""
        return sum(r.macs for r in self.shapes)

    def flops_per_image_step(self):
        """FLOPs per image of a training step, all layers (train_flops_per_image summed): 4.14 G at 227 px."""
        return sum(self.train_flops_per_image().values())

    def params_per_stream(self, stream=0):
        total = 0
        for r in self.shapes:
            out = self.out_sizes(r.layer)[stream]
            k2 = r.layer.kernel ** 2 if r.layer.kind == "conv" else 1
            total += out * (r.in_channels * k2 + 1)
        return total

    @property
    def exchanges(self):
        """Where the streams exchange, and what each stream sends per image (forward)."""
        out, shapes = [], self.shapes
        for prev, r in zip([None] + shapes[:-1], shapes):
            if r.layer.reads == "all" and prev is not None:
                elems = prev.out_per_stream * prev.post_hw ** 2
                out.append(Exchange(r.layer.name, "reduce-scatter", elems, self._sent(elems)))
        fc8 = shapes[-1]
        elems = fc8.out_per_stream  # the largest part: uneven parts are padded to it
        out.append(Exchange("logits", "split", elems, self._sent(elems)))
        return out

    def _sent(self, elements):
        # each stream's part reaches the other S-1 streams: what one stream sends, in a ring or not
        return (self.streams - 1) * elements * self.dtype_bytes

    def bytes_per_image(self):
        return sum(e.bytes for e in self.exchanges)

    # ---- arithmetic (bench/bound.py: the device's bound; summary.py) ----

    def flops_per_image(self):
        """{layer: forward FLOPs per image, every stream}: 2 per multiply-add (LayerShape.macs)."""
        return {r.layer.name: 2 * r.macs for r in self.shapes}

    def train_flops_per_image(self):
        """{layer: FLOPs per image of a training step}: forward, the input's gradient and the weights'
        gradient each cost a forward (3x), except conv1, whose input (the image) needs no gradient (2x)."""
        return {r.layer.name: 2 * r.macs * (2 if r.layer.reads == "image" else 3) for r in self.shapes}

    # ---- communication against data parallelism (docs/concepts.md derives these) ----

    def bytes_per_image_step(self):
        """What one stream sends per image in a training step: forward all-gathers plus backward
        reduce-scatters (the logits' backward keeps its own slice and sends nothing)."""
        return sum(e.bytes * (2 if e.backward == "reduce-scatter" else 1) for e in self.exchanges)

    def ddp_bytes_per_step(self, grad_bytes=4):
        """What one rank sends per step when data parallelism over `streams` ranks all-reduces the
        whole net's gradients in a ring: 2 (W - 1) / W of them, whatever the batch."""
        w = self.streams
        return 2 * (w - 1) * self.params_total * grad_bytes // w

    def crossover_batch(self, grad_bytes=4):
        """The batch at which the split sends as many bytes per rank and step as data parallelism's
        all-reduce: below it the split sends less. `dtype_bytes` sizes the activations, `grad_bytes`
        the gradients (fp32 under autocast, so 4 unless the all-reduce itself is compressed)."""
        per_image = self.bytes_per_image_step()
        return self.ddp_bytes_per_step(grad_bytes) / per_image if per_image else float("inf")

    def with_reads(self, **reads):
        """This spec with other connectivity, e.g. `spec.with_reads(conv4="all")`: conv2..conv5 may
        read "own" (their stream's maps: a grouped convolution) or "all" (an exchange first). conv1
        reads the image and the fc layers read every stream (their fan-in assumes it)."""
        names = {layer.name: layer for layer in self.layers}
        for name, how in reads.items():
            if name not in names:
                raise ValueError(f"--reads {name}={how}: no layer {name!r}; use one of {', '.join(names)}")
            if names[name].kind != "conv" or names[name].reads == "image":
                raise ValueError(f"--reads {name}={how}: only conv2..conv5 may change what they read "
                                 f"(conv1 reads the image, the fc layers read every stream)")
            if how not in ("own", "all"):
                raise ValueError(f"--reads {name}={how}: use own or all")
        layers = tuple(replace(layer, reads=reads.get(layer.name, layer.reads)) for layer in self.layers)
        return replace(self, layers=layers)


@dataclass(frozen=True)
class Exchange:
    name: str        # the layer whose input is gathered, or "logits"
    backward: str    # "reduce-scatter" (feeds per-stream kernels) or "split" (feeds a replicated loss)
    elements: int    # per image: one stream's part
    bytes: int       # per image, sent by one stream in the forward pass: (streams - 1) * part


def parse_reads(text):
    """"conv4=all,conv2=all" -> {"conv4": "all", "conv2": "all"} (the --reads flag of the launchers)."""
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, sep, how = item.partition("=")
        if not sep:
            raise ValueError(f"--reads {item}: write LAYER=own or LAYER=all, e.g. --reads conv4=all")
        out[name.strip()] = how.strip()
    return out


def allowed_streams():
    """Stream counts that divide every layer width except fc8 (which may split unevenly)."""
    from math import gcd
    g = 0
    for layer in LAYERS[:-1]:
        g = gcd(g, layer.width)
    return tuple(s for s in range(1, 9) if g % s == 0)


WIDTHS = "the widths (96, 256, 384, 4096)"


def streams_rule():
    """The allowed stream counts, as the launchers' refusals say it."""
    return f"{WIDTHS} divide into {', '.join(map(str, allowed_streams()))} streams"


def check_streams(streams):
    if streams not in allowed_streams():
        raise ValueError(f"{streams} streams do not divide the layer {WIDTHS[4:]}: use "
                         f"{', '.join(map(str, allowed_streams()))} streams")


def default_streams(streams, net="paper"):
    """--streams, or its default: the paper's 2, and 1 for --net half (the one-GPU net has one stream)."""
    return streams or (1 if net == "half" else 2)


def spec_or_usage_error(reads="", **fields):
    """Spec(**fields) with --reads, or the ValueError that refuses it as one line (UsageError, exit 2)."""
    from .errors import UsageError
    try:
        return Spec(**fields).with_reads(**parse_reads(reads))
    except ValueError as e:
        raise UsageError(str(e)) from None
