"""The training job: the data sets, the model in its layout (layouts.py), the optimizer and the schedule,
built from a Config (config.py) on every rank."""
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from . import checkpoint as ckpt
from . import guard, layouts, precision
from .augment import build_uint8_path
from .cli import log, stop_all_on_error
from .config import Config
from .data import (
    Seeded,
    build_datasets,
    build_paper_transforms,
    build_transforms,
    dataset,
    mean_image_key,
    mean_image_path,
    paper_side,
)
from .errors import UsageError
from .layouts import Place
from .loader import encoded_view, share_plan
from .meanimage import counted_path, run_mean_image
from .model import AlexNet, init_weights
from .optim import DexpSchedule, PlateauOnError, make_optimizer, parse_dexp
from .precision import check_precision
from .replicas import replica_batch, unwrap
from .spec import Spec, spec_or_usage_error

# ---- build ----------------------------------------------------------------------------------------

@dataclass
class Job:
    cfg: Config
    spec: Spec
    model: nn.Module
    parts: dict          # checkpoint file name -> module (a Stream, or the AlexNet for single)
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_set: object
    val_set: object
    classes: list
    device: torch.device
    rank: int = 0
    world: int = 1
    out: str = ""
    scaler: object = None  # fp16: the GradScaler, made at the first step (train_step)
    replicas: int = 1            # the parts of the global batch (layouts.Built.rows): replica r loads part r
    replica: int = 0
    replica_group: object = None  # the group whose per-rank losses are averaged (replicas), or None
    built: object = None         # layouts.Built: this rank's part of the layout
    divergence: object = None    # guard.Divergence: the loss and the weights' norm judged
    fingerprint: str = ""        # data.fingerprint of the training set (checkpoints hold it)
    mean_source: str = ""        # where the input's mean came from (run.json)
    dropped_rows: int = 0        # a resume in place: metrics.jsonl rows past the checkpoint, dropped
    augment: object = None       # the float work on the device (augment.DeviceAugment)
    share: object = None         # (stream group, S, s): stream s decodes rows s::S (loader.py), or None
    loader: object = None        # the training loader (loader.TrainLoader), made at the first epoch


def build_model(cfg, spec, ctx_rank, device, ctx=None):
    """The full AlexNet from cfg.seed on CPU, then this layout's part of it (layouts.py: a Built): every
    layout with the same seed starts from the same weights."""
    torch.manual_seed(cfg.seed)
    full = AlexNet(spec=spec, dropout_seed=cfg.dropout_seed, init="torch")
    init_weights(full, cfg.init)
    place = Place(ctx_rank, ctx.world if ctx else 1, ctx, device,
                  tuple(cfg.devices.split(",")) if cfg.devices else None, cfg.micro_batches)
    return layouts.get(cfg.layout).build(full, place)


def _mean_image_rank0_first(cfg, train_raw, channels, rank, world):
    """The training set's mean image for --preprocess paper: read from the cache beside the data if rank 0
    finds it, else computed by every rank in parallel and cached (meanimage.py: resumable, outside
    --timeout); generated data sets compute it on every rank, in memory."""
    side = paper_side(cfg.image_size)
    key = mean_image_key(train_raw, cfg.bad_images) if dataset(cfg.dataset).files else ""
    train_raw = Seeded(train_raw, lambda img: img, cfg.seed)   # read as training reads: --bad-images applies
    train_raw.bad_images = cfg.bad_images
    cache = None
    if dataset(cfg.dataset).files:                 # main's keyed name, then --mean-images' -n<N>
        cache = counted_path(mean_image_path(cfg.dataset, cfg.data_dir, side, cfg.split_test, len(train_raw), key),
                             cfg.mean_images, len(train_raw))
    return run_mean_image(cache, train_raw, side, channels, rank=rank, world=world if cache else 1,
                          workers=cfg.workers, count=cfg.mean_images, bar=rank == 0 and not cfg.quiet)


def build_optimizer(model, cfg, device=None):
    """SGD by --update (paper: PaperSGD, the paper's form; torch: torch.optim.SGD) with two parameter
    groups: the weights (group 0: lr, weight decay), and the biases (group 1: lr x --bias-lr-mult, weight
    decay only with --bias-decay), as Caffe's bvlc_alexnet (lr_mult 2, decay_mult 0) and, at its start,
    cuda-convnet2 (epsB 0.04 against epsW 0.02, no wc on biases) train them. Every layout names its
    parameters conv1.weight ... fc8.bias, so the rule is the same for the whole net and for each stream.
    --fused-sgd (default: on with CUDA): torch's fused SGD kernel, one launch for all parameters."""
    named = list(model.named_parameters())
    fused = precision.fused_sgd(device.type if device is not None else "cpu", cfg.fused_sgd)
    weights = [p for n, p in named if not n.endswith("bias")]
    biases = [p for n, p in named if n.endswith("bias")]
    return make_optimizer(cfg.update, [
        dict(params=weights, lr=cfg.lr, weight_decay=cfg.weight_decay, name="weights"),
        dict(params=biases, lr=cfg.lr * cfg.bias_lr_mult,
             weight_decay=cfg.weight_decay if cfg.bias_decay else 0.0, name="biases"),
    ], lr=cfg.lr, momentum=cfg.momentum, fused=fused)


def build_scheduler(optimizer, cfg):
    """--schedule: plateau (PlateauOnError), dexp (optim.DexpSchedule, from each group's lr), or None."""
    if cfg.schedule == "plateau":
        return PlateauOnError(optimizer, cfg.lr_factor, cfg.lr_patience, cfg.lr_drops)
    if cfg.schedule == "dexp":
        return DexpSchedule(optimizer, [(cfg.lr, *parse_dexp(cfg.dexp_weights, "--dexp-weights")),
                                        (cfg.lr * cfg.bias_lr_mult, *parse_dexp(cfg.dexp_biases, "--dexp-biases"))])
    return None


def for_speed(cfg, model, parts=None):
    """--channels-last and --compile: the model the steps run; the parts stay the uncompiled modules
    (checkpoints hold their plain state dicts). single, streams: the whole forward is one graph. split,
    hybrid (layouts with compile_layers): every layer of this rank's parts is compiled on its own and the
    exchanges run between the graphs (comm.py's autograd Functions, their collectives, the overlap's
    waits: _Layers.compile_layers)."""
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile and layouts.get(cfg.layout).compile_layers:
        for part in (parts or {"net": unwrap(model).stream}).values():
            part.compile_layers()                   # in place: DDP and overlapped_forward keep the net
    elif cfg.compile:
        model = torch.compile(model)
    return model


def _datasets_rank0_first(cfg, rank, world):
    """Rank 0 reads (or downloads) first; the others read after it, or all stop with its message."""
    def load(download):
        return build_datasets(cfg.dataset, cfg.data_dir, seed=cfg.seed, download=download,
                              split_test=cfg.split_test, train_size=cfg.train_size, val_size=cfg.val_size)
    result = stop_all_on_error(lambda: load(cfg.download) if rank == 0 else None, world)
    return result if rank == 0 else load(False)


def run_folder(cfg, world):
    """--out, or a new folder under runs/ named by rank 0's clock (a collective when it is not given)."""
    out = [cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.layout}-{cfg.dataset}")]
    if world > 1 and not cfg.out:                  # rank 0's clock names the run for every rank
        dist.broadcast_object_list(out, src=0)
    return out[0]


def build(cfg, ctx=None):
    rank, world = (ctx.rank, ctx.world) if ctx else (0, 1)
    if ctx is not None:
        device = ctx.device
    else:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    streams = cfg.streams
    entry = layouts.get(cfg.layout)
    replica_batch(cfg.batch_size, layouts.batch_parts(entry, ctx))   # one line unless the batch divides
    data = dataset(cfg.dataset)
    train_raw, val_raw, classes = _datasets_rank0_first(cfg, rank, world)
    spec = spec_or_usage_error(cfg.reads, streams=streams, image_size=cfg.image_size, in_channels=data.channels,
                               num_classes=len(classes), net=cfg.net)
    if len(train_raw) // cfg.batch_size < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} is more than the {len(train_raw)} training images: "
                         f"use a smaller batch")
    aug = dict(crop=cfg.crop, flip=cfg.flip, lighting=cfg.lighting)
    how = f"the {cfg.dataset} data set's per-channel mean and std (data.py)"
    if cfg.preprocess == "paper":
        mean, how = _mean_image_rank0_first(cfg, train_raw, spec.in_channels, rank, world)
        if rank == 0 and not cfg.quiet:
            log(f"mean image {tuple(mean.shape)}: {how}")
        aug.update(subtract_mean=cfg.subtract_mean, lighting_pca=cfg.lighting_pca)
        train_tf, augment = build_uint8_path(cfg.image_size, spec.in_channels, "paper", mean_image=mean, **aug)
        val_tf = build_paper_transforms(cfg.image_size, spec.in_channels, mean, train=False,
                                        ten_crop=cfg.ten_crop, **aug)
    else:
        train_tf, augment = build_uint8_path(cfg.image_size, spec.in_channels, "channel", mean=data.mean,
                                             std=data.std, ten_crop=cfg.ten_crop, **aug)
        val_tf = build_transforms(cfg.image_size, spec.in_channels, data.mean, data.std, train=False,
                                  ten_crop=cfg.ten_crop, **aug)
    if cfg.decode == "gpu":                        # the workers read the files, the device decodes them
        train_raw, train_tf = encoded_view(cfg, train_raw, spec.in_channels, aug)
    train_set, val_set = Seeded(train_raw, train_tf, cfg.seed), Seeded(val_raw, val_tf, cfg.seed)
    train_set.bad_images = val_set.bad_images = cfg.bad_images
    check_precision(cfg.precision, device.type)
    precision.set_cudnn_benchmark(device.type, cfg.cudnn_benchmark)
    built = build_model(cfg, spec, rank, device, ctx)
    model = for_speed(cfg, built.net, built.parts)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    out = run_folder(cfg, world)
    if not cfg.eval_only and os.path.exists(os.path.join(out, "metrics.jsonl")) and not in_place(cfg, out):
        raise UsageError(f"--out {out} already holds metrics.jsonl and no checkpoint to continue from: give "
                         f"another --out (runs are never overwritten; a run continues in its folder only from "
                         f"a checkpoint: --save-every N)")     # every rank: all stop together
    replica, replicas = built.rows or (0, 1)
    return Job(cfg, spec, model, built.parts, optimizer, scheduler, train_set, val_set, list(classes), device,
               rank, world, out, replicas=replicas, replica=replica, replica_group=built.loss_group, built=built,
               divergence=guard.Divergence(len(classes)), mean_source=how, augment=augment,
               share=share_plan(cfg, ctx, replicas) if entry.processes == "per-stream" else None)


def in_place(cfg, out):
    """Does this run continue the run in `out` (its --resume is one of out's checkpoints)?"""
    return bool(cfg.resume) and os.path.realpath(ckpt.run_dir_of(cfg.resume)) == os.path.realpath(out)


def resume_source(cfg):
    """Where a run continues from, before any work (every rank alike): cfg with --out and --resume set.

    --out holding a checkpoint that verifies (or --resume auto): its newest, in place, so that the same
    command run again (torchrun --max-restarts, a SLURM requeue) continues the run. A torchrun restart
    without --out finds its run folder by torchrun's run id (run.json). --out with metrics.jsonl but no
    checkpoint is refused (build); --resume PATH elsewhere resumes into a new folder, as before."""
    from dataclasses import replace
    out, auto = cfg.out or restarted_out(), cfg.resume == "auto"
    if auto and not out:
        raise UsageError("--resume auto continues the run in --out: give --out DIR (the same on every restart)")
    if not out or (cfg.resume and not auto):
        return cfg
    if ckpt.newest_complete(out) is None:
        if cfg.eval_only:
            raise UsageError(f"--eval-only --resume auto: {out} holds no checkpoint: give --resume a checkpoint "
                             f"or a run directory saved with --save-every")
        return replace(cfg, out=out, resume="")
    found = ckpt.find_checkpoint(out, "--out")     # its newest that verifies (the skipped ones logged)
    return replace(cfg, out=out, resume=found)


def restarted_out():
    """Under torchrun, after a restart (TORCHELASTIC_RESTART_COUNT > 0): the run folder under runs/ whose
    run.json names this torchrun job's run id, else "" (a first start names a new folder)."""
    run_id, restarts = os.environ.get("TORCHELASTIC_RUN_ID"), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not run_id or restarts == 0 or not os.path.isdir("runs"):
        return ""
    for d in sorted(os.listdir("runs"), reverse=True):
        try:
            with open(os.path.join("runs", d, "run.json")) as f:
                if json.load(f).get("torchelastic_run_id") == run_id:
                    return os.path.join("runs", d)
        except (OSError, ValueError):
            continue
    return ""
