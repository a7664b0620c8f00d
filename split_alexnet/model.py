"""AlexNet (2012) in three layouts that compute the same function.

- `AlexNet`        one module on one device: conv2/4/5 are grouped convolutions (groups=streams),
                   LRN runs within each group; its state_dict matches Caffe's bvlc_alexnet by name.
- `StreamsAlexNet` one process, stream s on devices[s]; exchanges are copies and concatenations.
- `SplitAlexNet`   one process per stream (torchrun); exchanges are the collectives in comm.py.

All three run the same loop over the spec (`forward_plan`): before every layer that reads all
streams, exchange; then the layer. Shapes below are for a 227 px input (the paper's 224 acts as 227: spec.pad_end) and 2 streams.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from . import comm
from .errors import UsageError
from .labels import LRN_LABEL, exchange_label
from .lrn import local_response_norm
from .spec import LRN, POOL, Spec


def forward_plan(spec, x, layer_fn, exchange):
    """The network: layer after layer, exchanging before each layer that reads every stream. Each layer
    and each exchange runs in a profiler range named for it (labels.py: "conv3", "exchange:conv3"), so a
    trace of any layout shows them; a range costs nothing when no profiler is active."""
    for layer in spec.layers:
        if layer.reads == "all":
            with record_function(exchange_label(layer.name)):
                x = exchange(layer.name, x)
        with record_function(layer.name):
            x = layer_fn(layer, x)
    with record_function(exchange_label("logits")):
        return exchange("logits", x)


# ---- dropout: counter-based masks, the same on every device ----------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """x * c mod 2^32, exactly, for 0 <= x < 2^32 (an int64 tensor or a Python int) and a 32-bit
    constant c: the products with c's two 16-bit halves stay below 2^48, so int64 never overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """lowbias32 (C. Wellons, hash-prospector): a bijection of [0, 2^32) with strong avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mask_keys(seed, draw):
    """Two 32-bit keys for draw number `draw` (a 0-dim int64 tensor or an int) of seed `seed` (any int)."""
    k1 = _mix32(_mix32(_mix32((draw & _M32) ^ (seed & _M32)) ^ ((draw >> 32) & _M32)) ^ ((seed >> 32) & _M32))
    return k1, _mix32(k1 ^ 0x9E3779B9)


def keep_mask(seed, draw, rows, cols, full_width, keep, device="cpu"):
    """The dropout mask's entries for rows [r0, r0 + nr) of the (global) batch and columns [c0, c0 + nc)
    of a layer `full_width` wide, rows = (r0, nr), cols = (c0, nc): True where the neuron is kept.

    Entry (i, j) of draw d is kept iff h < keep * 2^32, with h = mix(mix(n ^ k1) ^ k2), n = i * full_width
    + j its index in the full-width mask and (k1, k2) = keys(seed, d): a counter-based generator (as
    Philox is), computed with int64 tensor ops on 32-bit values, exact on every device and backend (no
    overflow, no floating point). So an entry depends only on (seed, d, i, j): not on the device, its
    model, the dtype, the batch size or how the batch is cut, and any slice of the mask is computed
    without the rest (every stream its columns, every replica and micro-batch its rows)."""
    (r0, nr), (c0, nc) = rows, cols
    if (r0 + nr) * full_width > 2**32:
        raise ValueError(f"a dropout mask of {r0 + nr} x {full_width} entries: at most 2^32 (a smaller batch)")
    i = torch.arange(r0, r0 + nr, dtype=torch.int64, device=device)
    j = torch.arange(c0, c0 + nc, dtype=torch.int64, device=device)
    k1, k2 = _mask_keys(seed, draw)
    h = _mix32(_mix32((i[:, None] * full_width + j) ^ k1) ^ k2)
    return h < round(keep * 2**32)


class DropoutMasks(nn.Module):
    """Dropout masks over a layer's FULL width, counter-based: entry (row, column) of the draw-th mask
    is a hash of (seed, draw, row * width + column) (`keep_mask`).

    Every stream computes its own columns of the same full-width mask, every replica (replicas.py) its
    rows of the global batch's, every micro-batch (overlap.py) its rows: all layouts drop the same
    neurons given the same seed, so train mode can be compared exactly, not only eval mode. The state
    is the seed and a draw counter (a 0-dim int64 buffer, not in the state_dict: checkpoints carry it
    as `state()`), advanced once per layer per batch, in place: under torch.compile the forward stays
    one graph and no step recompiles. The masks do not depend on the device or its model: a checkpoint
    resumes on any device (CPU, any GPU) with the masks the uninterrupted run draws."""

    def __init__(self, seed=0):
        super().__init__()
        self.seed = int(seed)
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64), persistent=False)

    def forward(self, x, p, full_width, offset, row=0, last=True):
        """x (rows, columns [offset, offset + x.shape[1]) of the layer) with dropout p: x * mask, where
        the mask holds 0 or 1 / (1 - p) in x's dtype (one multiply). row: x's first row in the global
        batch; last: whether x holds the batch's last rows (then the counter moves on)."""
        keep = 1.0 - p
        kept = keep_mask(self.seed, self.draws, (row, x.shape[0]), (offset, x.shape[1]), full_width, keep,
                         x.device)
        if last:
            self.draws.add_(1)
        return x * torch.where(kept, x.new_full((), 1.0 / keep), 0.0)

    def state(self):
        """What checkpoints keep: {"seed", "draws"} (a synchronisation on CUDA: outside the steps)."""
        return {"seed": self.seed, "draws": int(self.draws)}

    def load_state(self, state, device=None):
        """Continue the masks of a saved state (on any device: `device` is not needed and kept for
        callers). None (nothing saved) leaves the masks as they are; a torch.Generator state written
        before the masks were counter-based is refused in one line (check_dropout_state)."""
        if state is None:
            return
        check_dropout_state(state, device)
        self.seed = int(state["seed"])
        self.draws.fill_(int(state["draws"]))


def check_dropout_state(state, device=None, where="the dropout state"):
    """One line (UsageError) if a saved dropout state cannot be continued: it must be {"seed", "draws"}
    (DropoutMasks.state); the (device, generator state) of earlier versions draws other masks."""
    if state is None:
        return
    if isinstance(state, dict) and set(state) == {"seed", "draws"}:
        if all(isinstance(state[k], int) and not isinstance(state[k], bool) for k in state) and state["draws"] >= 0:
            return
        raise UsageError(f"{where}: a dropout state of seed {state['seed']!r} and draws {state['draws']!r}: "
                         f"both must be integers, draws 0 or more (a damaged checkpoint)")
    if isinstance(state, (tuple, list)) or isinstance(state, dict) and "state" in state:
        raise UsageError(f"{where}: its dropout masks come from a torch.Generator (a checkpoint written before "
                         f"the masks became counter-based) and this version cannot continue them: resume it "
                         f"with the split_alexnet that wrote it, or start a new run")
    raise UsageError(f"{where}: not a dropout state ({type(state).__name__}): a damaged checkpoint")


class _Layers(nn.Module):
    """conv1..fc8 as plain nn.Conv2d / nn.Linear, for the whole net (stream=None: AlexNet) or one
    stream (Stream): the layers and layer_fn the layouts share."""

    def __init__(self, spec, stream=None, dropout_seed=0, init="paper", lrn_across_streams=False, lrn_fn=None):
        super().__init__()
        self.spec, self.stream = spec, stream
        self.lrn_across_streams = lrn_across_streams  # an exercise's argument (exercises.py); never in training
        self.lrn_fn = lrn_fn or local_response_norm   # another LRN implementation: a benchmark's argument
        self.dropout = DropoutMasks(dropout_seed)
        self.pad_end = {s.layer.name: s.pad_end for s in spec.shapes if s.pad_end}   # cuda-convnet2's rule
        self._compiled = {}                       # layer name -> its compiled function (compile_layers)
        for shape in spec.shapes:
            layer = shape.layer
            if stream is None:  # the whole layer: reading only its own stream becomes groups
                out = spec.width(layer)
                groups = spec.streams if layer.reads == "own" else 1
            else:
                out, groups = spec.out_sizes(layer)[stream], 1
            fan_in = shape.in_channels * groups
            if layer.kind == "conv":
                mod = nn.Conv2d(fan_in, out, layer.kernel, layer.stride, layer.pad, groups=groups)
            else:
                mod = nn.Linear(fan_in, out)
            self.add_module(layer.name, mod)
        init_weights(self, init)

    def offset(self, layer):
        """Where this module's neurons start in the layer's full width."""
        return 0 if self.stream is None else sum(self.spec.out_sizes(layer)[:self.stream])

    def compile_layers(self, **kwargs):
        """torch.compile (kwargs: its options) every layer's function on its own: the split layout's
        --compile. Its exchanges, the collectives inside comm.py's autograd Functions, then run eagerly
        between the graphs, so the meter counts them, the watchdog names them, and the overlapped
        forward's waits stay where they are. A layer boundary costs no fusion: the next conv or linear
        is a library kernel either way, and ReLU, LRN, max-pool and dropout fuse within their layer."""
        self._compiled = {layer.name: torch.compile(functools.partial(self._layer, layer), **kwargs)
                          for layer in self.spec.layers if hasattr(self, layer.name)}
        return self

    def layer_fn(self, layer, x, row=0, last=True):
        """One layer on x; row, last: where x's rows lie in the global batch (DropoutMasks.forward)."""
        compiled = self._compiled.get(layer.name)
        return self._layer(layer, x, row, last) if compiled is None else compiled(x, row, last)

    def _layer(self, layer, x, row=0, last=True):
        if layer.kind == "fc":
            x = x.flatten(1)                      # fc6: (B, 256*6*6), every stream's maps, gathered
        if layer.name in self.pad_end:            # conv1 at 224 px: 3 zero pixels right and bottom -> 55
            x = F.pad(x, (0, self.pad_end[layer.name], 0, self.pad_end[layer.name]))
        x = getattr(self, layer.name)(x)
        if layer.relu:                            # in place: conv and linear keep their input, not output
            x = F.relu(x, inplace=True)
        if layer.lrn:                             # within each stream, never across streams
            groups = self.spec.streams if self.stream is None and not self.lrn_across_streams else 1
            b, c, h, w = x.shape
            with record_function(LRN_LABEL):         # the profiler's "lrn" range, in every layout
                x = self.lrn_fn(x.reshape(b * groups, c // groups, h, w), **LRN).reshape(b, c, h, w)
        if layer.pool:
            x = F.max_pool2d(x, **POOL)
        if layer.dropout and self.training:
            x = self.dropout(x, layer.dropout, self.spec.width(layer), self.offset(layer), row, last)
        return x


def _spec(spec, kwargs):
    return spec if spec is not None else Spec(**kwargs)


class AlexNet(_Layers):
    """The single layout: the whole two-stream net on one device, as grouped convolutions."""

    def __init__(self, num_classes=1000, in_channels=3, streams=2, image_size=227, *,
                 dropout_seed=0, init="paper", spec=None, lrn_across_streams=False, lrn_fn=None):
        spec = _spec(spec, dict(num_classes=num_classes, in_channels=in_channels,
                                streams=streams, image_size=image_size))
        super().__init__(spec, None, dropout_seed, init, lrn_across_streams, lrn_fn)

    def exchange(self, name, x):                  # one device: every stream's maps are already here
        return x

    def forward(self, x):                         # (B, 3, 227, 227)
        _check_input(self.spec, x)
        return forward_plan(self.spec, x, self.layer_fn, self.exchange)  # (B, num_classes)


class Stream(_Layers):
    """One stream's share of every layer: width / streams kernels (fc8: its part of the classes).

    The building block of the streams and split layouts (rank r of the split holds Stream(spec, r)).
    Its parameters are named as the single layout's (conv1.weight, ...), cut along dim 0."""

    def __init__(self, spec, stream, dropout_seed=0, init="paper"):
        if not 0 <= stream < spec.streams:
            raise ValueError(f"stream {stream} of a {spec.streams}-stream net: use 0 to {spec.streams - 1}")
        super().__init__(spec, stream, dropout_seed, init)


class StreamsAlexNet(nn.Module):
    """The streams layout: every stream in this process, stream s on devices[s] (may repeat, or CPU)."""

    def __init__(self, spec=None, devices=None, *, dropout_seed=0, init="paper", **kwargs):
        super().__init__()
        self.spec = spec = _spec(spec, kwargs)
        self.devices = [torch.device(d) for d in (devices or ["cpu"] * spec.streams)]
        if len(self.devices) != spec.streams:
            raise ValueError(f"{len(self.devices)} devices for {spec.streams} streams: give one per stream")
        self.streams = nn.ModuleList(
            Stream(spec, s, dropout_seed, init).to(d) for s, d in enumerate(self.devices))

    def forward(self, x):                         # (B, 3, 227, 227) on any device
        _check_input(self.spec, x)
        layer_fn, exchange = self.plan_callbacks()
        xs = [x.to(d) for d in self.devices]      # every stream sees the whole image
        return forward_plan(self.spec, xs, layer_fn, exchange)  # (B, num_classes) on devices[0]

    def plan_callbacks(self):
        """forward_plan's layer_fn and exchange for this layout: lists of per-stream tensors."""
        def layer_fn(layer, xs):
            return [s.layer_fn(layer, t) for s, t in zip(self.streams, xs)]

        def exchange(name, xs):                   # every stream receives every stream's part
            if name == "logits":
                return torch.cat([t.to(self.devices[0]) for t in xs], dim=1)
            return [torch.cat([t.to(d) for t in xs], dim=1) for d in self.devices]

        return layer_fn, exchange


class SplitAlexNet(nn.Module):
    """The split layout: this process's stream of the net; the other streams are other ranks."""

    def __init__(self, spec=None, rank=0, group=None, *, dropout_seed=0, init="paper", replica=0, gather_rule=None,
                 logits_rule=None, micro_batches=1, **kwargs):
        super().__init__()
        self.spec, self.rank, self.group = _spec(spec, kwargs), rank, group
        # M > 1: the training forward is overlap.overlapped_forward over M micro-batches (the same
        # function); as the module's own forward, DDP (replicas.py) runs it and all-reduces its gradients
        self.micro_batches = micro_batches
        self.replica = replica   # streams x replicas (replicas.py): replica r's rows of the global batch start at r * b
        self.stream = Stream(self.spec, rank, dropout_seed, init)
        # the exercises' arguments (exercises.py): other backward rules for the exchanges; None in training
        self.gather_rule, self.logits_rule = gather_rule, logits_rule

    def layer_fn(self, layer, x, row=None, last=True):
        """One layer of this stream; row (default: this replica's first) of the global batch."""
        return self.stream.layer_fn(layer, x, self.replica * x.shape[0] if row is None else row, last)

    def exchange(self, name, x):
        if name == "logits":                      # one loss on every rank: backward keeps own slice
            return comm.gather_for_same_computation(x, self.spec.out_sizes(self.spec.layers[-1]),
                                                    self.group, name, rule=self.logits_rule)
        return comm.gather_for_distinct_kernels(x, self.group, name, rule=self.gather_rule)  # backward sums

    def forward(self, x):                         # (B, 3, 227, 227), the same batch on every rank
        _check_input(self.spec, x)
        if self.micro_batches > 1 and self.training:  # evaluation: any batch, the plain forward
            from .overlap import overlapped_forward
            return overlapped_forward(self, x, self.micro_batches)
        return forward_plan(self.spec, x, self.layer_fn, self.exchange)  # (B, num_classes)


def _check_input(spec, x):
    want = (spec.in_channels, spec.image_size, spec.image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"input of shape {tuple(x.shape)} does not fit this AlexNet: it expects "
                         f"(B, {want[0]}, {want[1]}, {want[2]}); resize the images or build the model "
                         f"with in_channels={x.shape[1] if x.dim() == 4 else '?'}, "
                         f"image_size={x.shape[-1] if x.dim() == 4 else '?'}")


@torch.no_grad()
def init_weights(model, recipe="paper"):
    """Initialise conv1..fc8 in place.

    paper:   N(0, 0.01) weights; biases 1 in conv2/4/5, fc6, fc7, 0 elsewhere (§5).
    caffe:   bvlc_alexnet's fix for the paper's ("gave flat loss"): fc6/fc7 N(0, 0.005), biases 0.1.
    kaiming: He et al. 2015, N(0, 2 / fan_in), biases 0: keeps the activations' scale through the
             eight ReLU layers, where N(0, 0.01) and Xavier shrink it layer by layer.
    d2l:     Xavier uniform, biases 0 (the seed chapter's).
    torch:   leave PyTorch's default initialisation.
    """
    if recipe not in ("paper", "caffe", "kaiming", "d2l", "torch"):
        raise ValueError(f"unknown init {recipe!r}: use paper, caffe, kaiming, d2l or torch")
    for name, mod in model.named_children():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or recipe == "torch":
            continue
        if recipe in ("paper", "caffe"):
            ones = name in ("conv2", "conv4", "conv5", "fc6", "fc7")
            std = 0.005 if recipe == "caffe" and name in ("fc6", "fc7") else 0.01
            nn.init.normal_(mod.weight, 0.0, std)
            nn.init.constant_(mod.bias, (1.0 if recipe == "paper" else 0.1) if ones else 0.0)
        elif recipe == "kaiming":
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            nn.init.zeros_(mod.bias)
        else:
            nn.init.xavier_uniform_(mod.weight)
            nn.init.zeros_(mod.bias)


# ---- weights between layouts: every parameter is cut along its output (dim 0) ----

def shard_state_dict(state, spec):
    """Cut a single-layout state_dict into one state_dict per stream."""
    shards = [{} for _ in range(spec.streams)]
    for layer in spec.layers:
        sizes = spec.out_sizes(layer)
        for kind in ("weight", "bias"):
            key = f"{layer.name}.{kind}"
            for s, part in enumerate(torch.split(state[key], sizes, dim=0)):
                shards[s][key] = part.clone()
    return shards


def join_state_dicts(shards, spec):
    """Join per-stream state_dicts back into one single-layout state_dict."""
    if len(shards) != spec.streams:
        raise ValueError(f"{len(shards)} shards for {spec.streams} streams")
    return {f"{layer.name}.{kind}": torch.cat([sh[f"{layer.name}.{kind}"] for sh in shards], dim=0)
            for layer in spec.layers for kind in ("weight", "bias")}


def streams_from_single(model, devices=None):
    """A StreamsAlexNet holding exactly the weights (and the dropout draw counter) of a single-layout AlexNet."""
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the caller's RNG
        net = StreamsAlexNet(model.spec, devices, dropout_seed=model.dropout.seed)
    net.to(model.conv1.weight.dtype)  # so that float64 weights load as float64
    for stream, shard in zip(net.streams, shard_state_dict(model.state_dict(), model.spec)):
        stream.load_state_dict(shard)
        stream.dropout.draws.copy_(model.dropout.draws)   # the seed is the constructor's
    return net


def split_from_single(model, rank, group=None, device="cpu", replica=0, **rules):
    """This rank's SplitAlexNet holding exactly its shard of a single-layout AlexNet (replica: its
    replica's index on a streams x replicas mesh, replicas.py; `rules`: the exercises' gather_rule /
    logits_rule, see SplitAlexNet)."""
    with torch.random.fork_rng(devices=[]):  # shards differ in size: keep every rank's RNG in step
        net = SplitAlexNet(model.spec, rank, group, dropout_seed=model.dropout.seed, replica=replica, **rules)
    net.to(device, model.conv1.weight.dtype)
    net.stream.load_state_dict(shard_state_dict(model.state_dict(), model.spec)[rank])
    net.stream.dropout.draws.copy_(model.dropout.draws)
    return net
