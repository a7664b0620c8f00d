"""The 2014 hybrid (Krizhevsky, "One weird trick for parallelizing convolutional neural networks",
arXiv 1404.5997): data parallel in the convolutional layers, model parallel in the fully connected ones.

W ranks, global batch B, each rank's slice b = B / W (rank r: rows [r*b, (r+1)*b)):

    conv1..conv5   every rank holds ALL conv weights (the same spec: conv2/4/5 grouped by spec.streams,
                   LRN within each group, as the single layout) and runs them on its b images
    fc6            all-gather pool5 along the BATCH dim -> (B, 9216) on every rank; rank r runs its
                   4096 / W fc6 neurons on the whole batch
    fc7, fc8       the split's exchanges over W ranks (gather features, dim 1), on the whole batch
    logits         (B, classes) on every rank; every rank computes the same global-batch loss

Backward, by comm.py's rule. pool5's gathered rows feed DIFFERENT kernels on every rank (each rank's
fc6 share), so the gradient of rank r's rows is the sum over ranks of their fc6 shares' contributions:
a reduce-scatter along the batch dim (comm.gather_for_distinct_kernels(..., dim=0)). The fc weights
need nothing more: each rank owns its neurons and saw the whole batch.

The conv gradients: SUM over ranks, not the mean. Every rank's loss is the global-batch mean
L = (1/B) sum_i l_i, and rank r's backward reaches the conv weights only through its own rows, so its
conv gradient is g_r = (1/B) sum_{i in slice r} dl_i/dw, and the single layout's gradient is
sum_r g_r. (DDP divides by W because each replica's loss is its own slice's mean (1/b) sum; here the
1/B is already in the loss.) sum_conv_grads does that all-reduce per parameter as soon as backward has
accumulated its gradient (async, overlapped with the rest of backward, waited for at backward's end).

Bytes per step each rank sends (ring all-reduce, spec.dtype_bytes): bytes_per_step below.

Two schedules. The default (forward above, one loss and one SGD step over the whole batch) equals the
single layout by design. --hybrid-schedule 2014 (step_2014) is cuda-convnet2's implementation of the
2014 paper: its layers/layer-params-imagenet-4gpu-data-model.cfg gives the fc layers updatePeriod=1 and
epsW dexp base 0.01 against the conv layers' 0.04 (4x) (layer.py:858: updatePeriod, "0 means update as
often as possible"); its MultiGPU wiki page (not in the repository) describes the fc layers' passes,
one per worker's batch. So: every rank runs conv1..conv5 on
its slice; then for k = 0..W-1 every rank runs its fc share on worker k's b images, with the loss the
mean over those b (cuda-convnet2 scales a gradient by 1 / numCases, weights.cu), and updates its fc
share after each pass (W fc updates per step, each pass seeing the previous pass's weights); worker k
receives the sum over ranks of the gradient at its rows; last, one conv update from the sum over
ranks of the conv gradients (the replicas' gradients are summed, weights.cu, aggregateReplicaGradients),
i.e. of sum_k d loss_k / d w. reference_step_2014 runs the same sequence on one device; the check
(launch/check.py --layout hybrid --hybrid-schedule 2014) compares the two.
"""
import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from . import comm
from .labels import exchange_label
from .model import Stream, _check_input, _Layers, shard_state_dict


def share_spec(spec, shares):
    """The net cut into the hybrid's `shares` fc shares: a Spec whose `streams` count the shares (the
    cut Stream and shard_state_dict make), while `spec.streams` stays the conv layers' groups."""
    return dataclasses.replace(spec, streams=shares)


def conv_layers(spec):
    return [layer for layer in spec.layers if layer.kind == "conv"]


class HybridAlexNet(nn.Module):
    """Share `share` of `world` (the rank in `group`, every process of the job by default): `conv` holds
    conv1..conv5 whole, `fc` share `share` of fc6..fc8 (share_spec: the fc layers cut `world` ways)."""

    def __init__(self, spec, share=0, world=1, group=None, *, dropout_seed=0, init="paper"):
        super().__init__()
        self.spec, self.share, self.world, self.group = spec, share, world, group
        self.share_spec = share_spec(spec, world)
        self.conv = _Layers(dataclasses.replace(spec, layers=tuple(conv_layers(spec))), None, dropout_seed, init)
        self.fc = Stream(self.share_spec, share, dropout_seed, init)
        for layer in conv_layers(spec):              # the fc share's own (thin) conv layers: not used
            delattr(self.fc, layer.name)

    @property
    def dropout(self):                                # only fc6, fc7 drop: masks over the whole batch
        return self.fc.dropout

    def forward(self, x):                             # (b, C, H, W): this rank's slice of the batch
        _check_input(self.spec, x)
        for layer in self.spec.layers:                # each layer and exchange in its profiler range
            if layer.kind == "conv":
                with record_function(layer.name):
                    x = self.conv.layer_fn(layer, x)
                continue
            with record_function(exchange_label(layer.name)):
                if layer.name == "fc6":               # (b, 256, 6, 6) -> (B, 9216): the batch, gathered
                    x = comm.gather_for_distinct_kernels(x.flatten(1), self.group, "fc6", dim=0)
                else:                                 # (B, 4096 / W) -> (B, 4096): the features
                    x = comm.gather_for_distinct_kernels(x, self.group, layer.name)
            with record_function(layer.name):
                x = self.fc.layer_fn(layer, x)
        sizes = self.share_spec.out_sizes(self.spec.layers[-1])
        with record_function(exchange_label("logits")):
            return comm.gather_for_same_computation(x, sizes, self.group, "logits")  # (B, classes), every rank


CONV_LR_MULT_2014 = 4.0   # conv epsW base 0.04 over fc 0.01 (layer-params-imagenet-4gpu-data-model.cfg)


def conv_features(layers, spec, x):
    """conv1..conv5 of `layers` (a _Layers holding them) on x, flattened: (n, 256 * 6 * 6)."""
    for layer in conv_layers(spec):
        x = layers.layer_fn(layer, x)
    return x.flatten(1)


def fc_logits(net, feats):
    """This rank's fc share on feats (n, 9216), the same rows on every rank: the logits (n, classes)."""
    x = feats
    for layer in net.spec.layers:
        if layer.kind == "fc":
            if layer.name != "fc6":
                x = comm.gather_for_distinct_kernels(x, net.group, layer.name)
            x = net.fc.layer_fn(layer, x)
    sizes = net.share_spec.out_sizes(net.spec.layers[-1])
    return comm.gather_for_same_computation(x, sizes, net.group, "logits")


def step_2014(net, x, y, fc_opt, conv_opt):
    """One step of the 2014 schedule (module docstring) on share net.share: x its slice (b images), y the
    global batch's labels (W b). fc_opt steps this rank's fc share, conv_opt its conv layers (whose
    gradients sum_conv_grads all-reduces). Returns the W passes' losses."""
    world, group = net.world, net.group
    feats = conv_features(net.conv, net.spec, x)           # (b, 9216)
    b = feats.shape[0]
    parts = [feats.detach()]
    if world > 1:
        parts = [torch.empty_like(feats) for _ in range(world)]
        dist.all_gather(parts, feats.detach().contiguous(), group=group)
    own, losses = None, []
    for k in range(world):
        rows = parts[k].clone().requires_grad_(True)
        loss = F.cross_entropy(fc_logits(net, rows), y[k * b:(k + 1) * b])
        fc_opt.zero_grad(set_to_none=True)
        loss.backward()
        grad = rows.grad
        if world > 1:                                       # worker k's rows: every fc share's part
            dist.reduce(grad, dst=k if group is None else dist.get_global_rank(group, k), group=group)
        if k == net.share:
            own = grad
        fc_opt.step()
        losses.append(loss.detach())
    conv_opt.zero_grad(set_to_none=True)
    feats.backward(own)
    conv_opt.step()
    return torch.stack(losses)


def reference_step_2014(ref, x, y, world, fc_opt, conv_opt):
    """The same sequence as step_2014 over `world` workers, on one device: ref a single-layout AlexNet,
    x and y the global batch, fc_opt over its fc layers, conv_opt over its conv layers."""
    feats = conv_features(ref, ref.spec, x)
    b = feats.shape[0] // world
    grads, losses = [], []
    for k in range(world):
        rows = feats.detach()[k * b:(k + 1) * b].clone().requires_grad_(True)
        h = rows
        for layer in ref.spec.layers:
            if layer.kind == "fc":
                h = ref.layer_fn(layer, h)
        loss = F.cross_entropy(h, y[k * b:(k + 1) * b])
        fc_opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append(rows.grad)
        fc_opt.step()
        losses.append(loss.detach())
    conv_opt.zero_grad(set_to_none=True)
    feats.backward(torch.cat(grads))
    conv_opt.step()
    return torch.stack(losses)


def sum_conv_grads(net, group=None):
    """All-reduce (SUM) every conv gradient over `group` as soon as backward has accumulated it; the end
    of backward waits for them all (DDP's overlap, unbucketed, and without DDP's 1 / W: see above)."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return net
    pending = []

    def wait_all():
        for work in pending:
            work.wait()
        pending.clear()

    def hook(p):
        if not pending:                               # the first conv gradient of this backward
            torch.autograd.Variable._execution_engine.queue_callback(wait_all)
        meter, nbytes = comm.active_meter(), p.grad.numel() * p.grad.element_size()
        if meter is not None:                         # a ring all-reduce sends 2 (W - 1) / W of it
            meter.count("conv-allreduce/bwd", 2 * (world - 1) * nbytes // world)
        pending.append(dist.all_reduce(p.grad, group=group, async_op=True))

    for p in net.conv.parameters():
        p.register_post_accumulate_grad_hook(hook)
    return net


def hybrid_from_single(model, share, world, group=None, device="cpu", allreduce=True):
    """Share `share`'s HybridAlexNet holding exactly a single-layout AlexNet's conv weights and its fc share."""
    with torch.random.fork_rng(devices=[]):
        net = HybridAlexNet(model.spec, share, world, group, dropout_seed=model.dropout.seed)
    net.to(device, model.conv1.weight.dtype)
    state = model.state_dict()
    fc_names = [layer.name for layer in model.spec.layers if layer.kind == "fc"]
    net.conv.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] not in fc_names})
    mine = shard_state_dict(state, net.share_spec)[share]
    net.fc.load_state_dict({k: v for k, v in mine.items() if k.split(".")[0] in fc_names})  # its fc share
    return sum_conv_grads(net, group) if allreduce else net


def bytes_per_step(spec, batch, world):
    """{part: bytes} each rank sends per step (forward + backward), from the spec."""
    if world == 1:
        return {}
    shapes = {s.layer.name: s for s in spec.shapes}
    d, b = spec.dtype_bytes, batch // world
    conv_params = sum(shapes[layer.name].params_total for layer in conv_layers(spec))
    pool5 = shapes["fc6"].in_channels                       # 256 * 6 * 6 features per image
    fs = share_spec(spec, world)
    out = {"conv-allreduce": 2 * (world - 1) * conv_params * 4 // world,  # fp32 gradients
           "fc6": 2 * (world - 1) * b * pool5 * d}                      # all-gather + reduce-scatter
    for prev, layer in zip(spec.layers, spec.layers[1:]):
        if layer.kind == "fc" and layer.name != "fc6":                  # features of the whole batch
            out[layer.name] = 2 * (world - 1) * batch * (spec.width(prev) // world) * d
    out["logits"] = (world - 1) * batch * max(fs.out_sizes(spec.layers[-1])) * d  # forward only
    return out


# ---- the hybrid as a layout (layouts.py): train, check, checkpoints ------------------------------

def _fc_names(spec):
    return [layer.name for layer in spec.layers if layer.kind == "fc"]


def _hybrid_params(net):
    """params(get, ref) for a HybridAlexNet: conv whole, fc this rank's share of the reference's."""
    def params(get, ref):
        shard = shard_state_dict({n: get(p) for n, p in ref.named_parameters()}, net.share_spec)[net.share]
        full = {n: get(p) for n, p in ref.named_parameters()}
        conv = dict(net.conv.named_parameters())
        own = {n: get(p) for n, p in conv.items()}
        own.update({n: get(p) for n, p in net.fc.named_parameters()})
        return [(n, own[n], full[n] if n in conv else shard[n]) for n in full]
    return params


def join_shares(conv, shares, spec):
    """A checkpoint file of the single layout from rank 0's conv state and every rank's fc share
    (checkpoint.stream_state's {model, optimizer, dropout}): the fc tensors (weights and the optimizer's
    per-parameter tensors) joined along dim 0, the rest as they are."""
    fc = set(_fc_names(spec))

    def cat(name, values):
        if name.split(".")[0] in fc and all(torch.is_tensor(v) and v.dim() > 0 for v in values):
            return torch.cat(values, 0)
        return values[0]
    model = dict(conv["model"])
    model.update({k: cat(k, [s["model"][k] for s in shares]) for k in shares[0]["model"]})
    state = dict(conv["optimizer"]["state"])
    for name, st in shares[0]["optimizer"]["state"].items():
        state[name] = {k: cat(name, [s["optimizer"]["state"][name][k] for s in shares]) for k in st}
    return {"model": model, "optimizer": {"state": state, "param_groups": conv["optimizer"]["param_groups"]},
            "dropout": shares[0]["dropout"]}     # every share draws the global batch's masks: one state


def cut_share(single, spec, share, world):
    """(conv state, fc state) of share `share` from a single-layout file's state: join_shares' inverse."""
    fs, fc = share_spec(spec, world), set(_fc_names(spec))
    sizes = {f"{layer.name}.{k}": fs.out_sizes(layer) for layer in spec.layers for k in ("weight", "bias")}

    def part(name, v):
        return torch.split(v, sizes[name], 0)[share].clone() if torch.is_tensor(v) and v.dim() > 0 else v

    def of(keep):
        model = {k: (part(k, v) if keep is fc else v) for k, v in single["model"].items()
                 if (k.split(".")[0] in fc) == (keep is fc)}
        opt = single["optimizer"]
        state = {n: {k: (part(n, v) if keep is fc else v) for k, v in st.items()}
                 for n, st in opt["state"].items() if (n.split(".")[0] in fc) == (keep is fc)}
        return {"model": model, "optimizer": {"state": state, "param_groups": opt["param_groups"]},
                "dropout": single["dropout"]}
    return of(None), of(fc)


def hybrid_built(full, place, allreduce=True):
    """layouts.Built for rank place.rank of the hybrid over every process. Its checkpoint is the single
    layout's file (single.pt): at a save every rank's fc share goes to rank 0 (gather_object), which joins
    them; at a resume every rank reads single.pt and cuts its share (so convert.py and the single
    layout read a hybrid checkpoint as it is)."""
    from . import checkpoint as ckpt
    from .layouts import Built
    rank, world = place.rank, place.world            # the train's and the check's Place carry the ctx's
    net = hybrid_from_single(full, rank, world, None, place.device, allreduce)
    spec = full.spec

    def labels(y):                                  # the logits cover the global batch: so must y
        if world == 1:
            return y
        parts = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(parts, y.contiguous())
        return torch.cat(parts)

    def state(optimizer):                           # a collective: every rank calls it
        share = ckpt.stream_state(net.fc, optimizer)
        shares = [None] * world if rank == 0 else None
        if world > 1:
            dist.gather_object(share, shares, dst=0)
        else:
            shares = [share]
        if rank != 0:
            return {}
        return {"single.pt": join_shares(ckpt.stream_state(net.conv, optimizer), shares, spec)}

    def load(states, optimizer):
        conv, fc = cut_share(states["single.pt"], spec, rank, world)
        ckpt.load_stream_state(net.conv, None, conv)
        ckpt.load_stream_state(net.fc, None, fc)
        ckpt.load_optimizer_states(optimizer, [(net.conv, conv), (net.fc, fc)])

    return Built(net, {"conv": net.conv, "fc": net.fc}, rows=(rank, world) if world > 1 else None,
                 params=_hybrid_params(net), labels=labels, state=state, load=load, reads=("single.pt",),
                 evaluate=lambda n, x: n(x)[:len(x)])   # every rank the whole batch: W copies, the first
