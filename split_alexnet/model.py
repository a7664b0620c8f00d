"""AlexNet (2012) in three layouts that compute the same function.

- `AlexNet`        one module on one device: conv2/4/5 are grouped convolutions (groups=streams),
                   LRN runs within each group; its state_dict matches Caffe's bvlc_alexnet by name.
- `StreamsAlexNet` one process, stream s on devices[s]; exchanges are copies and concatenations.
- `SplitAlexNet`   one process per stream (torchrun); exchanges are the collectives in comm.py.

All three run the same loop over the spec (`forward_plan`): before every layer that reads all
streams, exchange; then the layer. Shapes below are for the paper's 227 px input and 2 streams.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import comm
from .cli import UsageError
from .lrn import local_response_norm
from .spec import LRN, POOL, Spec


def forward_plan(spec, x, layer_fn, exchange):
    """The network: layer after layer, exchanging before each layer that reads every stream."""
    for layer in spec.layers:
        if layer.reads == "all":
            x = exchange(layer.name, x)
        x = layer_fn(layer, x)
    return exchange("logits", x)


class DropoutMasks:
    """Dropout masks drawn over a layer's FULL width from one seeded generator per stream.

    Every stream draws the same full-width mask and keeps its own slice, so all layouts drop the
    same neurons given the same seed: train mode can be compared exactly, not only eval mode.
    """

    def __init__(self, seed=0):
        self.seed, self.gen = seed, None

    def generator(self, device):
        device = torch.device(device)
        if self.gen is None:                       # first use: seeded on the device the masks are drawn on
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(self.seed)
        elif self.gen.device != device:            # the stream moved: its sequence moves with it
            self.gen = _moved(self.gen, device)
        return self.gen

    def draw(self, batch, full_width, keep, device):
        """The next (batch, full_width) mask of ones (kept) and zeros (dropped)."""
        mask = torch.empty(batch, full_width, device=device)
        return mask.bernoulli_(keep, generator=self.generator(device))

    def apply(self, x, p, full_width, offset):
        keep = 1.0 - p
        mask = self.draw(x.shape[0], full_width, keep, x.device)
        return x * mask[:, offset:offset + x.shape[1]].to(x.dtype) / keep

    def state(self):
        """The generator's device and state (for checkpoints), or None before the first mask."""
        return None if self.gen is None else (str(self.gen.device), self.gen.get_state())

    def load_state(self, state, device=None):
        """Continue the sequence of a saved generator on `device` (default: the one it was saved from).
        A CUDA state loads on any CUDA device (it is a seed and an offset, not tied to one GPU: a
        single-GPU run resumed as two streams on cuda:0 and cuda:1 keeps every stream's masks); a
        CPU state on the CPU. Across kinds there is no such state (mt19937 on the CPU, Philox on CUDA
        draw other sequences): refused with one line (check_dropout_state)."""
        if state is None:
            return
        saved, st = _unpack_dropout(state)
        target = torch.device(device) if device is not None else saved
        check_dropout_state(state, target)
        self.gen = torch.Generator(device=target)
        self.gen.set_state(st)


def _unpack_dropout(state):
    """(device, generator state) from a checkpoint's dropout entry: a (device, state) pair or a dict."""
    if isinstance(state, dict):
        return torch.device(state["device"]), state["state"]
    device, st = state
    return torch.device(device), st


def _moved(gen, device):
    """The generator's sequence on another device of its kind; a new seeded one across kinds."""
    new = torch.Generator(device=device)
    if gen.device.type == device.type:
        new.set_state(gen.get_state())
    else:                                          # CPU <-> CUDA: no state carries over; start afresh
        new.manual_seed(gen.initial_seed())
    return new


def check_dropout_state(state, device, where="the dropout state"):
    """One line (UsageError) if a saved dropout generator cannot continue on `device`."""
    if state is None:
        return
    saved, device = _unpack_dropout(state)[0], torch.device(device)
    if saved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{where}: its dropout masks come from a CUDA generator ({saved}) and this machine "
                         f"has no CUDA device: resume it on a GPU (a CPU generator draws other masks)")
    if saved.type != device.type:
        raise UsageError(f"{where}: its dropout masks come from a {saved.type} generator ({saved}) and this "
                         f"run draws them on {device}: resume on a {saved.type} device (the {device.type} "
                         f"generator draws other masks)")


class _Layers(nn.Module):
    """conv1..fc8 as plain nn.Conv2d / nn.Linear, for the whole net (stream=None: AlexNet) or one
    stream (Stream): the layers and layer_fn the layouts share."""

    def __init__(self, spec, stream=None, dropout_seed=0, init="paper", lrn_across_streams=False):
        super().__init__()
        self.spec, self.stream = spec, stream
        self.lrn_across_streams = lrn_across_streams  # an exercise's argument (exercises.py); never in training
        self.dropout = DropoutMasks(dropout_seed)
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

    def layer_fn(self, layer, x):
        if layer.kind == "fc":
            x = x.flatten(1)                      # fc6: (B, 256*6*6), every stream's maps, gathered
        x = getattr(self, layer.name)(x)
        if layer.relu:
            x = F.relu(x)
        if layer.lrn:                             # within each stream, never across streams
            groups = self.spec.streams if self.stream is None and not self.lrn_across_streams else 1
            b, c, h, w = x.shape
            x = local_response_norm(x.reshape(b * groups, c // groups, h, w), **LRN).reshape(b, c, h, w)
        if layer.pool:
            x = F.max_pool2d(x, **POOL)
        if layer.dropout and self.training:
            x = self.dropout.apply(x, layer.dropout, self.spec.width(layer), self.offset(layer))
        return x


def _spec(spec, kwargs):
    return spec if spec is not None else Spec(**kwargs)


class AlexNet(_Layers):
    """The single layout: the whole two-stream net on one device, as grouped convolutions."""

    def __init__(self, num_classes=1000, in_channels=3, streams=2, image_size=227, *,
                 dropout_seed=0, init="paper", spec=None, lrn_across_streams=False):
        spec = _spec(spec, dict(num_classes=num_classes, in_channels=in_channels,
                                streams=streams, image_size=image_size))
        super().__init__(spec, None, dropout_seed, init, lrn_across_streams)

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
        xs = [x.to(d) for d in self.devices]      # every stream sees the whole image

        def layer_fn(layer, xs):
            return [s.layer_fn(layer, t) for s, t in zip(self.streams, xs)]

        def exchange(name, xs):                   # every stream receives every stream's part
            if name == "logits":
                return torch.cat([t.to(self.devices[0]) for t in xs], dim=1)
            return [torch.cat([t.to(d) for t in xs], dim=1) for d in self.devices]

        return forward_plan(self.spec, xs, layer_fn, exchange)  # (B, num_classes) on devices[0]


class SplitAlexNet(nn.Module):
    """The split layout: this process's stream of the net; the other streams are other ranks."""

    def __init__(self, spec=None, rank=0, group=None, *, dropout_seed=0, init="paper", gather_rule=None,
                 logits_rule=None, **kwargs):
        super().__init__()
        self.spec, self.rank, self.group = _spec(spec, kwargs), rank, group
        self.stream = Stream(self.spec, rank, dropout_seed, init)
        # the exercises' arguments (exercises.py): other backward rules for the exchanges; None in training
        self.gather_rule, self.logits_rule = gather_rule, logits_rule

    def layer_fn(self, layer, x):
        return self.stream.layer_fn(layer, x)

    def exchange(self, name, x):
        if name == "logits":                      # one loss on every rank: backward keeps own slice
            return comm.gather_for_same_computation(x, self.spec.out_sizes(self.spec.layers[-1]),
                                                    self.group, name, rule=self.logits_rule)
        return comm.gather_for_distinct_kernels(x, self.group, name, rule=self.gather_rule)  # backward sums

    def forward(self, x):                         # (B, 3, 227, 227), the same batch on every rank
        _check_input(self.spec, x)
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
    """A StreamsAlexNet holding exactly the weights of a single-layout AlexNet."""
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the caller's RNG
        net = StreamsAlexNet(model.spec, devices, dropout_seed=model.dropout.seed)
    net.to(model.conv1.weight.dtype)  # so that float64 weights load as float64
    for stream, shard in zip(net.streams, shard_state_dict(model.state_dict(), model.spec)):
        stream.load_state_dict(shard)
    return net


def split_from_single(model, rank, group=None, device="cpu", **rules):
    """This rank's SplitAlexNet holding exactly its shard of a single-layout AlexNet (`rules`: the
    exercises' gather_rule / logits_rule, see SplitAlexNet)."""
    with torch.random.fork_rng(devices=[]):  # shards differ in size: keep every rank's RNG in step
        net = SplitAlexNet(model.spec, rank, group, dropout_seed=model.dropout.seed, **rules)
    net.to(device, model.conv1.weight.dtype)
    net.stream.load_state_dict(shard_state_dict(model.state_dict(), model.spec)[rank])
    return net
