"""Training: build, run, evaluate, for the three layouts (single, streams, split); the config
(flags, recipes, checks) is in config.py.

The split layout runs one process per stream (torchrun). Every rank builds the same full AlexNet from
the same seed and keeps its shard, and every rank reads the same batches: the sampler's order and each
image's augmentation are drawn from (seed, epoch, index) alone (data.EpochSampler, data.Seeded), so no
rank has to broadcast data. SplitAlexNet returns the full logits on every rank, so loss and evaluation
are the same number on every rank without any extra collective.
"""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from . import guard, layouts, precision
from .augment import build_uint8_path
from .cli import UsageError, log, stop_all_on_error
from .config import Config
from .data import (
    Seeded,
    build_datasets,
    build_paper_transforms,
    build_transforms,
    dataset,
    fingerprint,
    mean_image_key,
    mean_image_path,
    paper_side,
)
from .layouts import Place
from .loader import DataBound, TrainLoader, encoded_view, one_line_errors, share_plan
from .meanimage import counted_path, run_mean_image
from .mesh import replica_batch, unwrap
from .model import AlexNet, check_dropout_state, init_weights
from .optim import DexpSchedule, PlateauOnError, check_resume_update, make_optimizer, parse_dexp
from .plots import plot_curves
from .precision import check_precision
from .spec import Spec, parse_reads

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


def for_speed(cfg, model):
    """--channels-last and --compile: the model the steps run; the parts stay the uncompiled modules
    (checkpoints hold their plain state dicts). single, streams: the whole forward is one graph. split:
    every layer of this rank's stream is compiled on its own and the exchanges run between the graphs
    (comm.py's autograd Functions, their collectives, the overlap's waits: _Layers.compile_layers)."""
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile and layouts.get(cfg.layout).compile_layers:
        unwrap(model).stream.compile_layers()       # in place: DDP and overlapped_forward keep the net
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
    try:
        spec = Spec(streams=streams, image_size=cfg.image_size, in_channels=data.channels,
                    num_classes=len(classes), net=cfg.net).with_reads(**parse_reads(cfg.reads))
    except ValueError as e:
        raise UsageError(str(e)) from None
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
    model = for_speed(cfg, built.net)
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


# ---- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(job):
    """Validation loss, top-1 and top-5 (None with 5 classes or fewer) over the whole validation set;
    the forward in the training's --precision."""
    model, cfg = job.model, job.cfg
    model.eval()
    val_set = job.val_set            # replicas: each evaluates every replicas-th image, summed below
    forward = job.built.evaluate if job.built is not None and job.built.evaluate else (lambda m, x: m(x))
    if job.replica_group is not None:
        val_set = torch.utils.data.Subset(val_set, range(job.replica, len(val_set), job.replicas))
    loader = DataLoader(val_set, batch_size=cfg.batch_size, num_workers=cfg.workers)
    n, loss_sum, top1, top5 = 0, 0.0, 0, 0
    k = min(5, job.spec.num_classes)
    half = precision.autocast_dtype(cfg.precision)
    for x, y in one_line_errors(loader):
        if x.dim() == 5:                           # ten crops: (B, 10, C, H, W), softmax averaged
            b = x.shape[0]
            with precision.autocast(job.device.type, half):
                logits = forward(model, x.flatten(0, 1).to(job.device))
            logp = logits.float().softmax(1).view(b, 10, -1).mean(1).clamp_min(1e-12).log()
        else:
            with precision.autocast(job.device.type, half):
                logits = forward(model, x.to(job.device))
            logp = logits.float().log_softmax(1)
        y = y.to(logp.device)
        loss_sum += F.nll_loss(logp, y, reduction="sum").item()
        best = logp.topk(k, 1).indices
        top1 += (best[:, 0] == y).sum().item()
        top5 += (best == y[:, None]).any(1).sum().item()
        n += len(y)
    if job.replica_group is not None:
        sums = torch.tensor([n, loss_sum, top1, top5], dtype=torch.float64)
        dist.all_reduce(sums, group=job.replica_group)
        n, loss_sum, top1, top5 = int(sums[0]), *sums[1:].tolist()
    model.train()
    return loss_sum / n, top1 / n, (top5 / n if job.spec.num_classes > 5 else None)


# ---- checkpoints ----------------------------------------------------------------------------------

def save_checkpoint(job, state, write=torch.save):
    """Every rank writes its shards (replica 0's), then rank 0 meta.pt, then --keep-last prunes (rank 0).
    write(obj, file): how the bytes go out (torch.save). A full disk on any rank stops every rank with
    one line: the partial step folder is removed, and the previous checkpoint stays the newest."""
    path = os.path.join(job.out, "checkpoints", f"step{state['step']:07d}")
    guard.phase(f"checkpoint write at step {state['step']}")
    stop_all_on_error(lambda: _judge_weights(job, state), job.world)   # never save a diverged net

    def shards():                                  # this rank's files (layouts.Built: writes, state)
        built = job.built
        if built.state is not None:                # the layout's own (the hybrid's: a collective)
            files = built.state(job.optimizer)
        else:                                      # replicas: one copy per stream, replica 0's
            writes = built.parts if built.writes is None else built.writes
            files = {name: ckpt.stream_state(job.parts[name], job.optimizer) for name in writes}
        if files:
            ckpt.remove_stale_temps([job.out],     # this run's folder only, never a resume source's
                                    set(files) | ({"meta.pt"} if job.rank == 0 else set()))
            ckpt.save_files(path, files, write)

    def meta():
        if job.rank == 0:
            ckpt.save_meta(path, dict(
                layout=job.cfg.layout, streams=job.spec.streams, spec=ckpt.spec_dict(job.spec),
                step=state["step"], epoch=state["epoch"], batch=state["batch"],
                lr=job.optimizer.param_groups[0]["lr"], lrs=[g["lr"] for g in job.optimizer.param_groups],
                scheduler=job.scheduler.state_dict() if job.scheduler else None,
                scaler=job.scaler.state_dict() if job.scaler is not None else None,
                torch_rng=torch.get_rng_state(), config=asdict(job.cfg),
                train_images=len(job.train_set), data_fingerprint=_fingerprint(job)), write)
    try:
        for part in (shards, meta):                # each a collective: every shard is written before meta
            stop_all_on_error(part, job.world)
    except UsageError as e:                        # a full disk (ckpt.DiskFull) on the lowest such rank
        if job.rank == 0 and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "meta.pt")):
            shutil.rmtree(path, ignore_errors=True)   # every rank is past its write: the partial files go
        newest = ckpt.newest_complete(job.out)
        raise UsageError(f"{e}: removed the partial {path}; "
                         f"{f'{newest} stays the newest checkpoint' if newest else 'no earlier checkpoint'}: "
                         f"free space (or lower --keep-last) and run the same command to continue") from None
    if job.rank == 0 and job.cfg.keep_last:
        ckpt.prune(job.out, job.cfg.keep_last)
    if job.world > 1:
        dist.barrier()
    return path


def _fingerprint(job):
    if not job.fingerprint:
        job.fingerprint = fingerprint(getattr(job.train_set, "dataset", job.train_set))
    return job.fingerprint


def diverged(job, state, why):
    """The one line for a diverged run: what, where, and the checkpoint to go on from (every checkpoint
    of a run is judged before it is written, so the newest is from before the divergence)."""
    found = ckpt.newest_complete(job.out) or job.cfg.resume
    lr = job.optimizer.param_groups[0]["lr"]
    go_on = (f"resume from {found} with a lower --lr (now {lr:g})" if found else
             f"no checkpoint was written: start again with a lower --lr (now {lr:g})")
    return f"{why} at step {state['step']}: the training diverged; {go_on}, or use --init d2l"


def _judge_weights(job, state):
    why = job.divergence.weights(list(job.model.parameters())) if job.divergence else None
    if why:
        raise UsageError(diverged(job, state, why) + " (this step's weights were not saved)")


def check_data(job, meta, path):
    """A resume continues on the data its checkpoint was trained on, from a position inside it: refuse
    (one line) another training set, or a position past the epoch's last batch."""
    n, was = len(job.train_set), meta.get("train_images")
    if was is not None and (was != n or meta.get("data_fingerprint") not in (None, _fingerprint(job))):
        change = f"{was} images then, {n} now" if was != n else f"the same {n} images in number, other files"
        raise UsageError(f"--resume {path}: the training set changed since the checkpoint ({change}; "
                         f"fingerprint {meta.get('data_fingerprint')} then, {_fingerprint(job)} now): resume "
                         f"with the data it was trained on, or start a new run")
    steps = n // job.cfg.batch_size
    if not 0 <= meta["batch"] < max(steps, 1):
        raise UsageError(f"--resume {path}: its position (epoch {meta['epoch']}, batch {meta['batch']}) is past "
                         f"the {steps} batches of {job.cfg.batch_size} that {n} training images make: resume "
                         f"with the data and --batch-size it was trained with")


def resume(job, path):
    """Load a checkpoint into the job: on every rank all files are checked before any is loaded."""
    def read():
        found = ckpt.find_checkpoint(path)
        meta = ckpt.read_meta(found)
        ckpt.check_matches(meta, job.spec, job.cfg.layout, found)
        if not job.cfg.eval_only:
            check_data(job, meta, found)
        reads = job.built.reads or list(job.parts)     # the hybrid: the single layout's file, cut on load
        expected = None if job.built.reads else \
            {name: {k: v.shape for k, v in m.state_dict().items()} for name, m in job.parts.items()}
        dtype = next(iter(job.parts.values())).conv1.weight.dtype      # the model's: no cast on load
        states = ckpt.load_files(found, meta, list(reads), expected, dtype)
        for name, state in states.items():    # an old checkpoint's generator state: one line, here
            check_dropout_state(state.get("dropout"), job.device, os.path.join(found, name))
        return found, meta, states
    path, meta, states = stop_all_on_error(read, job.world)   # one rank's bad shard stops every rank
    if not job.cfg.eval_only:                     # evaluating reads the weights alone, never the velocities
        check_resume_update(meta.get("config"), job.cfg.update, path)
    if job.built.load is not None:
        job.built.load(states, job.optimizer)
    else:
        for name, m in job.parts.items():
            ckpt.load_stream_state(m, None, states[name])
        ckpt.load_optimizer_states(job.optimizer, [(m, states[name]) for name, m in job.parts.items()])
    if meta.get("scaler") and job.cfg.precision == "fp16":   # the loss scale and its growth count go on
        job.scaler = torch.amp.GradScaler(job.device.type)
        job.scaler.load_state_dict(meta["scaler"])
    # every group's (scheduled) lr from the checkpoint, unless this run's --lr differs from the one the
    # checkpoint's ran with: then this run's, as the groups were built (biases at --bias-lr-mult times it)
    saved = meta.get("config", {})
    if job.cfg.lr != saved.get("lr", job.cfg.lr) or job.cfg.bias_lr_mult != saved.get("bias_lr_mult",
                                                                                       job.cfg.bias_lr_mult):
        lrs = [g["lr"] for g in job.optimizer.param_groups]
    else:
        lrs = meta.get("lrs") or [meta["lr"]] * len(job.optimizer.param_groups)   # older: one group
    if len(lrs) != len(job.optimizer.param_groups):
        raise UsageError(f"checkpoint {path} holds {len(lrs)} parameter groups, this run "
                         f"{len(job.optimizer.param_groups)}: resume with the recipe it was trained with")
    for group, lr in zip(job.optimizer.param_groups, lrs):
        group["lr"] = lr
    if job.scheduler and meta["scheduler"]:
        try:
            job.scheduler.load_state_dict(meta["scheduler"])
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"checkpoint {path}: meta.pt field scheduler {meta['scheduler']!r:.80} is not the "
                             f"state of this run's --schedule {job.cfg.schedule}: resume with the schedule it "
                             f"was trained with") from None
        job.scheduler.configure(job.cfg.lr_factor, job.cfg.lr_patience, job.cfg.lr_drops)   # this run's flags
    torch.set_rng_state(meta["torch_rng"])
    return path, {"step": meta["step"], "epoch": meta["epoch"], "batch": meta["batch"]}


# ---- the run --------------------------------------------------------------------------------------

EXIT_PREEMPTED = 75    # EX_TEMPFAIL: stopped on SIGTERM/SIGUSR1 with a checkpoint saved; the same command continues
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """SIGTERM and SIGUSR1 set a flag on this rank; agreed(), at every step boundary, MAX-reduces the
    ranks' flags (a CPU tensor: the process group's gloo half, beside NCCL on GPUs: distributed.group_backend),
    so every rank stops at the same step.
    A second signal more than `again_s` seconds after the first stops this process at once (the
    signal's default action); one within `again_s` is the same request delivered twice (a scheduler
    signalling every process, and torchrun's agent passing it on to its ranks)."""

    def __init__(self, world, again_s=2.0):
        self.world, self.again_s, self.signum, self.first, self.previous = world, again_s, 0, None, {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():   # where Python runs signal handlers
            self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.first is None:
            self.signum, self.first = signum, time.monotonic()
        elif time.monotonic() - self.first > self.again_s:
            signal.signal(signum, signal.SIG_DFL)  # the second: at once; the last complete checkpoint stays
            os.kill(os.getpid(), signum)

    def agreed(self):
        """The signal some rank received (0: none); a collective with world > 1."""
        if self.world == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def run(job, write=torch.save):
    """Train for cfg.epochs (or cfg.max_steps); evaluate each epoch (or each cfg.eval_every steps).
    SIGTERM / SIGUSR1: every rank stops at the next step boundary with a checkpoint (summary["stopped"]).
    write(obj, file): how checkpoint files are written (torch.save)."""
    cfg = job.cfg
    if cfg.eval_only:
        return evaluate_checkpoint(job)
    steps_per_epoch = len(job.train_set) // cfg.batch_size        # drop_last: every batch full
    state, resumed_from, rows, sinks = start(job)
    # the steps left counted from the position (epoch, batch): after a --batch-size change on resume the
    # steps taken so far were of another size, so `epochs x steps_per_epoch` would overrun
    total = state["step"] + (cfg.epochs - state["epoch"]) * steps_per_epoch - state["batch"]
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    if job.divergence:
        job.divergence.weights(list(job.model.parameters()))      # the norm this run starts from
    progress = Progress(job, total, state["step"], rows, sinks)
    announce(job, progress, steps_per_epoch, resumed_from, state)
    job.model.train()
    last_val, n_images, t_start, stopped = None, 0, time.perf_counter(), 0
    first = state["step"]
    bound = DataBound(cfg)
    comm_share = CommShare(job)
    with Preemption(job.world) as preemption:
        while state["step"] < total and not stopped:
            t_prev, position = time.perf_counter(), dict(state)
            for x, y in epoch_loader(job, state):
                guard.phase(f"training step {state['step'] + 1}")
                if isinstance(job.scheduler, DexpSchedule):   # cuda-convnet2's rates by training progress
                    job.scheduler.before_step(state["step"], cfg.epochs * steps_per_epoch)   # --max-steps: a stop
                # --sync-debug: from the third step of this run on (the first two tune cuDNN, compile, and
                # let DDP rebuild its buckets), a host synchronisation inside the step is an error on CUDA
                with precision.no_host_sync(job.device, cfg.sync_debug and state["step"] >= first + 2):
                    loss = comm_share.measure(lambda: train_step(job, x, y))   # a device tensor: read by progress
                    if job.replica_group is not None:  # the global batch's loss: the replicas' mean
                        loss = _replica_mean(job, loss)
                state["step"] += 1
                state["batch"] += 1
                now = time.perf_counter()
                n_images += cfg.batch_size
                progress.step(state, loss, cfg.batch_size / (now - t_prev), n_images / (now - t_start),
                              data_s=job.loader.data_s, step_s=now - t_prev)
                line = bound.update(job.loader.data_s, now - t_prev)
                if line:
                    progress.say(line)
                t_prev = now
                end_of_epoch = state["batch"] == steps_per_epoch
                scheduled = bool(cfg.eval_every and state["step"] % cfg.eval_every == 0
                                 or not cfg.eval_every and end_of_epoch)
                if scheduled or state["step"] == total:
                    progress.flush()                   # the train rows before the val row
                    last_val = evaluate_and_log(job, state, progress, scheduled)
                if end_of_epoch:
                    state["epoch"] += 1
                    state["batch"] = 0
                saved = cfg.save_every and (state["step"] % cfg.save_every == 0 or state["step"] == total)
                if saved:
                    progress.flush()                   # a diverged loss stops before it is saved
                    save_checkpoint(job, state, write)
                stopped = preemption.agreed() if state["step"] < total else 0   # the last step: just finish
                if stopped:                            # every rank, at this step: save (unless just saved)
                    progress.flush()
                    path = save_checkpoint(job, state, write) if not saved else \
                        os.path.join(job.out, "checkpoints", f"step{state['step']:07d}")
                    progress.say(f"stopped on {signal.Signals(stopped).name} at step {state['step']}: saved "
                                 f"{path}; the same command continues the run in place (exit status "
                                 f"{EXIT_PREEMPTED})")
                    break
                if state["step"] >= total or end_of_epoch:
                    break
            if state == position:                  # no batch: the loop would spin for ever
                raise UsageError(f"epoch {state['epoch']} from batch {state['batch']} yields no batch of "
                                 f"{cfg.batch_size} from {len(job.train_set)} training images: resume with the "
                                 f"data and --batch-size the checkpoint was trained with")
    summary = finish(job, progress, state, last_val, n_images, time.perf_counter() - t_start, stopped, comm_share)
    return dict(summary, stopped=signal.Signals(stopped).name if stopped else None)


class CommShare:
    """The exchanges' measured share of the step time: comm.metered() over this run's steps FIRST..LAST
    only (the first step warms up). The step and the collectives are timed by one clock
    (comm.clock_for: the host's on CPU, CUDA events on the compute stream on GPUs), which adds no
    synchronisation (--sync-debug holds); the marks are read when its line closes the run (finish)."""
    FIRST, LAST = 2, 11

    def __init__(self, job):
        self.job, self.done, self.steps = job, 0, 0
        self.step_s = self.comm_s = 0.0
        self.bytes = 0
        self.spans = []                            # (meter, mark before the step, mark after it)

    def measure(self, step_fn):
        self.done += 1
        if self.job.world == 1 or not self.FIRST <= self.done <= self.LAST:
            return step_fn()
        from . import comm
        clock = comm.clock_for(self.job.device.type)
        a = clock.mark()
        with comm.metered(clock) as m:
            out = step_fn()
        self.spans.append((m, a, clock.mark()))
        return out

    def _resolve(self):
        """The marks so far as seconds (on CUDA: waits for the marked work, done by the run's end)."""
        spans, self.spans = self.spans, []
        for m, a, b in spans:
            self.step_s += m.clock.seconds(a, b)
            self.comm_s += sum(m.seconds.values())
            self.bytes += sum(m.bytes.values())
            self.steps += 1

    def lines(self):
        self._resolve()
        if self.job.world == 1:
            return ["communication: none in one process; the split's exchanges, measured: "
                    "torchrun --nproc_per_node=2 launch/bench.py (README.md, the first measurement)"]
        if not self.steps:
            return [f"communication: not measured (it is measured over steps {self.FIRST}-{self.LAST} of a run)"]
        n = self.steps
        return [f"communication: the exchanges took {100 * self.comm_s / self.step_s:.1f} % of the step time on "
                f"rank {self.job.rank} ({self.comm_s / n:.3f} of {self.step_s / n:.3f} s per step, over "
                f"{n} step(s) from step {self.FIRST}, waiting for the peer included; {self.bytes // n:,} B sent "
                f"per step)",
                "  where it goes, by exchange and against data parallelism: torchrun --nproc_per_node=2 "
                "launch/bench.py (docs/benchmarks.md)"]


def evaluate_checkpoint(job):
    """--eval-only: the checkpoint of --resume on the validation set, one line; nothing trained or written."""
    found, state = resume(job, job.cfg.resume)
    guard.phase(f"evaluation of {found}")
    loss, top1, top5 = evaluate(job)
    if not job.cfg.quiet:
        log(f"eval: {found} (step {state['step']}, epoch {state['epoch']}) on {len(job.val_set)} {job.cfg.dataset} "
            f"val images{' (ten crops)' if job.cfg.ten_crop else ''}: loss {loss:.4f} top1 {top1:.4f} "
            f"top5 {_fmt(top5)}")
    val = dict(split="val", step=state["step"], epoch=state["epoch"], loss=loss, top1=top1, top5=top5)
    return dict(steps=state["step"], seconds=0.0, images_per_s=0.0, val=val, out=None, checkpoint=found)


def start(job):
    """Resume if asked; write config.json and run.json (rank 0); in place, cut metrics.jsonl back to the
    checkpoint's step. Returns (the state to start from, the checkpoint, the metrics rows kept, the
    metrics sinks: TensorBoard, W&B)."""
    state, resumed_from, rows = {"step": 0, "epoch": 0, "batch": 0}, None, []
    if job.cfg.resume:
        resumed_from, state = resume(job, job.cfg.resume)
    info = run_info(job, resumed_from, state)      # a collective (every rank's host)
    if job.rank == 0:
        os.makedirs(job.out, exist_ok=True)
        if resumed_from and in_place(job.cfg, job.out):
            rows, job.dropped_rows = cut_metrics(os.path.join(job.out, "metrics.jsonl"), state["step"])
        with open(os.path.join(job.out, "config.json"), "w") as f:
            json.dump(dict(asdict(job.cfg), out=job.out, spec=ckpt.spec_dict(job.spec),
                           torch=torch.__version__), f, indent=1)
        write_run_json(os.path.join(job.out, "run.json"), info)
    sinks = stop_all_on_error(lambda: metric_sinks(job, state["step"]) if job.rank == 0 else [], job.world)
    return state, resumed_from, rows, sinks


def cut_metrics(path, step):
    """metrics.jsonl's rows up to `step` (a resumed run appends after them); the rows past it, and a
    line cut short by a kill, are dropped from the file. Returns (rows kept, lines dropped)."""
    if not os.path.isfile(path):
        return [], 0
    kept, lines, dropped = [], [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or row.get("step", step + 1) > step:
                dropped += 1
                continue
            kept.append(row)
            lines.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)
    return kept, dropped


def _git(*args):
    """git's answer about the checkout this code runs from, or None (not a checkout, no git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        p = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=20)
        return p.stdout.strip() if p.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def run_info(job, resumed_from, state):
    """How this start ran (run.json): the command line, the code's git commit and whether the tree had
    changes, the versions (Python, torch, torchvision, CUDA, cuDNN, NCCL), world size, replicas and
    streams, every rank's host, the start time, torchrun's run id and restart count, the SLURM job, where
    the input's mean came from, and the checkpoint it resumed from. A collective with world > 1."""
    import platform
    import shlex

    import torchvision
    hosts = [socket.gethostname()]
    if job.world > 1:
        hosts = [None] * job.world
        dist.all_gather_object(hosts, socket.gethostname())
    if job.rank != 0:
        return None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception:                              # a build without NCCL
        nccl = None
    return dict(
        command=shlex.join(sys.argv), cwd=os.getcwd(), git_commit=commit,
        git_dirty=None if status is None else bool(status),
        python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        nccl=nccl, backend=dist.get_backend() if dist.is_initialized() else None, device=str(job.device),
        layout=job.cfg.layout, world_size=job.world, replicas=job.replicas, streams=job.spec.streams,
        host=hosts[0], hosts=hosts, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        torchelastic_run_id=os.environ.get("TORCHELASTIC_RUN_ID"),
        torchelastic_restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"), mean_image=job.mean_source,
        resumed_from=resumed_from, start_step=state["step"])


def write_run_json(path, info):
    """This start's record; a run continued in place keeps its earlier starts' under "earlier"."""
    earlier = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
            earlier = old.pop("earlier", []) + [old]
        except (OSError, ValueError):
            pass
    with open(path, "w") as f:
        json.dump(dict(info, earlier=earlier), f, indent=1)


class TensorBoardSink:
    """--tensorboard: each metrics row's numbers as scalars SPLIT/KEY at its step (OUT/tensorboard)."""

    def __init__(self, log_dir, purge_step):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard: the tensorboard package is not installed: pip install tensorboard "
                             "(or pip install -e '.[tensorboard]'), or drop --tensorboard") from None
        self.writer = SummaryWriter(log_dir, purge_step=purge_step)   # in place: drops events past the resume

    def __call__(self, row):
        for k, v in _numbers(row).items():
            self.writer.add_scalar(f"{row['split']}/{k}", v, row["step"], walltime=row.get("time"))

    def close(self):
        self.writer.close()


class WandbSink:
    """--wandb: each metrics row to Weights & Biases (project $WANDB_PROJECT, default split_alexnet; one
    W&B run per run folder, continued on a resume in place)."""

    def __init__(self, job):
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb: the wandb package is not installed: pip install wandb, or drop --wandb") from None
        import hashlib
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "split_alexnet"), dir=job.out,
                              name=os.path.basename(os.path.abspath(job.out)), config=asdict(job.cfg),
                              id=hashlib.sha1(os.path.abspath(job.out).encode()).hexdigest()[:16], resume="allow")

    def __call__(self, row):
        self.run.log({f"{row['split']}/{k}": v for k, v in _numbers(row).items()}, step=row["step"])

    def close(self):
        self.run.finish()


def _numbers(row):
    return {k: v for k, v in row.items()
            if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def metric_sinks(job, step):
    sinks = []
    if job.cfg.tensorboard:
        sinks.append(TensorBoardSink(os.path.join(job.out, "tensorboard"), step + 1 if step else None))
    if job.cfg.wandb:
        sinks.append(WandbSink(job))
    return sinks


def epoch_loader(job, state):
    """The batches of epoch state["epoch"] from batch state["batch"] on, x float on the device: the same
    on every rank (replica r: its rows of each global batch). One loader, its workers kept across epochs."""
    cfg = job.cfg
    if job.loader is None:
        job.loader = TrainLoader(job.train_set, batch_size=cfg.batch_size, seed=cfg.seed, device=job.device,
                                 augment=job.augment, workers=cfg.workers, prefetch_factor=cfg.prefetch_factor,
                                 replicas=job.replicas, replica=job.replica, share=job.share, decode=cfg.decode,
                                 side=paper_side(cfg.image_size), size=cfg.image_size)
    return job.loader.epoch(state["epoch"], state["batch"] * cfg.batch_size)


def train_step(job, x, y):
    """One SGD step on the batch; returns its loss, a 0-dim tensor on the device, unread: nothing in the
    step waits for the device (Progress reads the losses every --log-every steps). --precision bf16/fp16:
    forward and loss under autocast (fp32 weights, gradients and SGD); fp16 scales the loss (GradScaler).
    --micro-batches M > 1 (split): the overlapped forward (overlap.py), the same function in another
    summation order."""
    cfg = job.cfg
    x = x.to(job.device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with precision.autocast(job.device.type, precision.autocast_dtype(cfg.precision)):
        logits = job.model(x)        # (B, classes); --micro-batches M: overlapped (SplitAlexNet's argument)
        y = y.to(logits.device, non_blocking=True)
        if job.built is not None and job.built.labels is not None:
            y = job.built.labels(y)                # the hybrid: its logits cover the global batch
        loss = F.cross_entropy(logits.float(), y)
    job.optimizer.zero_grad(set_to_none=True)
    if cfg.precision != "fp16":
        loss.backward()
        job.optimizer.step()
        return loss.detach()
    if job.scaler is None:
        job.scaler = torch.amp.GradScaler(job.device.type)
    job.scaler.scale(loss).backward()
    if job.world > 1:
        _skip_together(job)
    job.scaler.step(job.optimizer)                 # skipped when a gradient overflowed (fused SGD: on the
    job.scaler.update()                            # device; otherwise the scaler reads found_inf)
    return loss.detach()


def _skip_together(job):
    """fp16, split: every rank holds only its shard's gradients, so one rank may overflow alone. Then
    every rank must skip the step and lower the scale, or the shards part: agree on it (one MAX
    all-reduce), and mark a local gradient inf where only a peer overflowed, for the scaler to see."""
    grads = [p.grad for p in job.model.parameters() if p.grad is not None]
    bad = torch.stack([~torch.isfinite(g).all() for g in grads]).any().float().reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    # inf where any rank overflowed, unread on the host (a rank's own non-finite gradient stays non-finite)
    grads[0].add_(torch.where(bad > 0, float("inf"), 0.0).to(grads[0].dtype))


def _replica_mean(job, loss):
    """The replicas' mean of a 0-dim loss tensor, on its device (not read on the host)."""
    t = loss.detach().to(torch.float64).reshape(1)
    dist.all_reduce(t, group=job.replica_group)
    return t[0] / job.replicas


def evaluate_and_log(job, state, progress, scheduled=True):
    """Evaluate, record it, and step the plateau schedule on it if this evaluation was scheduled."""
    guard.phase(f"evaluation at step {state['step']}")
    loss, top1, top5 = evaluate(job)
    row = dict(split="val", step=state["step"], epoch=state["epoch"], loss=loss, top1=top1, top5=top5,
               time=time.time())
    progress.metrics.write(row)
    if job.scheduler and scheduled:                # not the extra evaluation where a run stops: a
        if job.scheduler.step(1.0 - top1):         # resumed run must see the same schedule
            progress.say(f"lr / {1 / job.cfg.lr_factor:g} (validation top-1 error has not improved for "
                         f"{job.cfg.lr_patience + 1} evaluations; drop {job.scheduler.drops} of "
                         f"{job.cfg.lr_drops}): lr {job.optimizer.param_groups[0]['lr']:g}")
    progress.say(f"val  step {state['step']} epoch {state['epoch']}: loss {loss:.4f} top1 {top1:.4f} "
                 f"top5 {_fmt(top5)}")
    return row


def finish(job, progress, state, last_val, n_images, seconds, stopped=0, share=None):
    """Close the bar, plot (unless --no-plot), say the result, what the run folder holds and how to go on
    from it; returns the run's summary."""
    progress.flush()
    progress.close()
    if job.rank == 0 and job.cfg.plot:
        plot_curves(progress.metrics.rows, os.path.join(job.out, "curves.png"))
    summary = dict(steps=state["step"], seconds=seconds, images_per_s=n_images / max(seconds, 1e-9),
                   val=last_val, out=job.out)
    if last_val and not stopped:
        progress.say(f"done: {state['step']} steps in {seconds:.0f} s "
                     f"({summary['images_per_s']:.1f} img/s); val loss {last_val['loss']:.4f} top1 {last_val['top1']:.4f} "
                     f"top5 {_fmt(last_val['top5'])}; out {job.out}")
    for line in share.lines() if share else []:
        progress.say(line)
    if not progress.quiet:                         # rank 0: what the folder holds, how to go on
        for line in next_steps(job):
            progress.say(line)
    return summary


def launcher(job):
    """The command that starts this run's layout again (for the lines that say how to go on)."""
    import shlex
    cfg = job.cfg
    entry = layouts.get(cfg.layout)
    cmd = (f"torchrun --nproc_per_node={job.world} launch/train.py" if entry.torchrun
           else f"python launch/train.py --layout {cfg.layout}") + (layouts.flag(cfg.layout) if entry.torchrun else "")
    if job.spec.streams != 2:
        cmd += f" --streams {job.spec.streams}"
    if cfg.devices:                                # the streams layout's devices
        cmd += f" --devices {shlex.quote(cfg.devices)}"
    if cfg.dataset != "shapes" and cfg.data_dir != "data":    # not taken from the checkpoint
        cmd += f" --data-dir {shlex.quote(cfg.data_dir)}"
    return cmd


def next_steps(job):
    """What the run folder holds, and the commands that resume or evaluate it (or how to keep a checkpoint)."""
    import shlex
    out, cfg = job.out, job.cfg
    held = [f for f in ("config.json", "run.json", "metrics.jsonl", "curves.png") if os.path.isfile(os.path.join(out, f))]
    found = ckpt.newest_complete(out)
    run_dir, cmd = shlex.quote(out), launcher(job)
    if found is None:
        return [f"{out} holds {', '.join(held)}; no checkpoint (add --save-every N to keep one, for --resume "
                f"and --eval-only)"]
    more = f"--epochs {cfg.epochs + 1}" + (" --max-steps 0" if cfg.max_steps else "")
    return [f"{out} holds {', '.join(held)}, checkpoints/{os.path.basename(found)} (newest)",
            f"  evaluate: {cmd} --resume {run_dir} --eval-only",
            f"  resume:   {cmd} --resume {run_dir} {more}   # (to epoch {cfg.epochs + 1}; a new run folder)"]


def processes(job):
    """' (N processes: ...)' for a layout over several processes, else ''."""
    entry = layouts.get(job.cfg.layout)
    if entry.processes == "per-stream":
        return f" ({job.world} processes: {job.world // job.spec.streams} replica(s) x {job.spec.streams} streams)"
    if entry.processes == "world":
        return f" ({job.world} processes: {entry.about})"
    return ""


def announce(job, progress, steps_per_epoch, resumed_from, state):
    """The run in two lines: layout, data and devices; recipe and schedule."""
    cfg = job.cfg
    progress.say(f"train: {'' if cfg.net == 'paper' else 'net half (one-GPU, §3.2), '}{cfg.layout} layout, "
                 f"{job.spec.streams} streams"
                 f"{processes(job)} on {job.device}; "
                 f"{cfg.dataset} ({len(job.train_set)} train / {len(job.val_set)} val images, "
                 f"{len(job.classes)} classes) at {cfg.image_size} px, {job.spec.in_channels} channel(s)")
    progress.say(f"recipe {cfg.recipe}: init {cfg.init}, SGD ({cfg.update}'s update) lr {cfg.lr:g} momentum {cfg.momentum:g} weight "
                 f"decay {cfg.weight_decay:g} (biases: lr x{cfg.bias_lr_mult:g}, decay {cfg.bias_decay}), "
                 f"input {cfg.preprocess}, batch {cfg.batch_size}, {cfg.epochs} epochs of {steps_per_epoch} "
                 f"steps{f' (stop at step {cfg.max_steps})' if cfg.max_steps else ''}, schedule {cfg.schedule}"
                 f"{f' (top-1, patience {cfg.lr_patience}, at most {cfg.lr_drops} drops)' if cfg.schedule == 'plateau' else ''}, "
                 f"crop {cfg.crop}, flip {cfg.flip}, lighting {cfg.lighting:g}, ten-crop {cfg.ten_crop}, "
                 f"seed {cfg.seed}; out {job.out}")
    if resumed_from and in_place(cfg, job.out):
        progress.say(f"resumed in place from {resumed_from} at step {state['step']}: appending to "
                     f"{os.path.join(job.out, 'metrics.jsonl')} ({job.dropped_rows} row(s) past step "
                     f"{state['step']} dropped)")
    elif resumed_from:
        progress.say(f"resumed from {resumed_from} at step {state['step']}")


class Metrics:
    """metrics.jsonl (appended, one strict-JSON row a line) and the sinks (TensorBoard, W&B) each row
    also goes to; `rows`: the run's rows so far (those kept from before a resume in place first)."""

    def __init__(self, path, enabled, rows=(), sinks=()):
        self.path, self.enabled, self.rows, self.sinks = path, enabled, list(rows), list(sinks)

    def write(self, row):
        self.rows.append(row)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(strict_json(row), allow_nan=False) + "\n")
        for sink in self.sinks:
            sink(row)

    def close(self):
        for sink in self.sinks:
            sink.close()


def strict_json(row):
    """NaN and Inf are not JSON: each becomes null, with KEY_nonfinite: true beside it."""
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k], out[f"{k}_nonfinite"] = None, True
        else:
            out[k] = v
    return out


class Progress:
    """What a run reports: metrics.jsonl (rank 0) and, from rank 0 unless --quiet, a bar on a terminal
    or else a log line every --log-every steps. The steps' losses stay on the device until a flush (every
    --log-every steps, the first and the last step, before an evaluation or a checkpoint): one
    synchronisation for many steps, none inside a step."""

    def __init__(self, job, total, initial, rows=(), sinks=()):
        from tqdm import tqdm
        self.job, self.total, self.first = job, total, initial + 1
        self.metrics = Metrics(os.path.join(job.out, "metrics.jsonl"), job.rank == 0, rows, sinks)
        self.quiet = job.cfg.quiet or job.rank != 0
        self.pending = []                         # (state, loss tensor, row, mean images/s if logged) per step
        tty = sys.stderr.isatty()
        sized = tty and os.get_terminal_size(sys.stderr.fileno()).columns > 0   # a pty may report 0 columns
        self.bar = tqdm(total=total, initial=initial, disable=self.quiet or not tty, desc="train",
                        dynamic_ncols=sized, ncols=None if sized else 100)

    def say(self, line):                           # rank 0, not --quiet; above the bar if there is one
        if not self.quiet:
            self.bar.write(line) if not self.bar.disable else log(line)

    def step(self, state, loss, images_per_s, mean_images_per_s, data_s=None, step_s=None):
        """A training step (loss: a tensor, or a number): kept, and flushed every --log-every steps.
        data_s: the wait for the batch and its device work; step_s: the whole step, data included (host
        seconds: on CUDA, with no synchronisation in the step, the time to queue it until the queue is full)."""
        groups = self.job.optimizer.param_groups
        row = dict(lr=groups[0]["lr"], **{f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(groups)},
                   images_per_s=images_per_s, data_s=data_s, step_s=step_s, time=time.time())
        logged = state["step"] % self.job.cfg.log_every == 0 or state["step"] in (self.first, self.total)
        self.pending.append((dict(state), loss, row, mean_images_per_s if logged else None))
        self.bar.update(1)
        if logged:
            self.flush()

    def flush(self):
        """The pending steps' metrics rows (their losses read in one transfer); a non-finite loss stops the
        run, named by its step; the bar's loss, or a log line for the last of them."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        values = [torch.as_tensor(p[1]).detach().reshape(()) for p in pending]
        losses = torch.stack([v.to(values[0].device) for v in values]).to(torch.float64).tolist()
        for (state, _, row, _), loss in zip(pending, losses):
            self.metrics.write(dict(split="train", step=state["step"], epoch=state["epoch"], loss=loss, **row))
            why = (self.job.divergence.loss(loss) if self.job.divergence else
                   None if math.isfinite(loss) else f"the training loss became {loss}")
            if why:                                # NaN, or grown a hundredfold (guard.Divergence)
                raise UsageError(diverged(self.job, state, why))
        self.bar.set_postfix(epoch=pending[-1][0]["epoch"], loss=f"{losses[-1]:.3f}", refresh=False)
        (state, _, row, mean_images_per_s), loss = pending[-1], losses[-1]
        lr = row["lr"]
        if self.bar.disable and not self.quiet and mean_images_per_s is not None:   # a logged step
            self.say(f"step {state['step']}/{self.total} epoch {state['epoch']}: loss {loss:.4f} "
                     f"lr {lr:g} {mean_images_per_s:.1f} img/s")

    def close(self):
        self.bar.close()
        self.metrics.close()


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"
