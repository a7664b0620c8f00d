"""Training: config, build, run, evaluate, for the three layouts (single, streams, split).

The split layout runs one process per stream (torchrun). Every rank builds the same full AlexNet from
the same seed and keeps its shard, and every rank reads the same batches: the sampler's order and each
image's augmentation are drawn from (seed, epoch, index) alone (data.EpochSampler, data.Seeded), so no
rank has to broadcast data. SplitAlexNet returns the full logits on every rank, so loss and evaluation
are the same number on every rank without any extra collective.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .data import (CHANNELS, DATASETS, NORMS, EpochSampler, Seeded, build_datasets, build_transforms)
from .cli import UsageError, log
from .model import AlexNet, init_weights, split_from_single, streams_from_single
from .spec import Spec

# Every value here can be overridden by its flag (--lr, --momentum, ...).
# §4-5 of the paper: SGD with momentum and weight decay, lr / 10 on a validation plateau, N(0, 0.01)
# weights with biases 1 in conv2/4/5, fc6, fc7, random crops + flips + PCA lighting.
_PAPER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, init="paper", batch_size=128, epochs=90,
              schedule="plateau", crop=True, flip=True, lighting=0.1)
RECIPES = {
    "paper": _PAPER,
    # the default: the paper's recipe with He initialisation. The paper's N(0, 0.01) with biases 1 gave a
    # flat loss here (as Caffe's readme says it did there), and so did Xavier: see docs/training.md.
    "paper-he": {**_PAPER, "init": "kaiming"},
    # the seed (d2l's AlexNet chapter): Xavier, plain SGD lr 0.01, images resized, 3 epochs.
    "d2l": dict(lr=0.01, momentum=0.0, weight_decay=0.0, init="d2l", batch_size=128, epochs=3,
                schedule="none", crop=False, flip=False, lighting=0.0),
}
# The data set's own defaults, applied over the recipe (and under any flag): the shapes demo is sized
# for a 2-core CPU (67 px, 600 steps of 64), with the paper's lr per image (0.01 per 128 -> 0.005 per
# 64; at 0.01 its loss fell and then jumped back to chance, twice in 200 steps); the other sets are
# resized to the model's input.
DATASET_DEFAULTS = {
    "shapes": dict(image_size=67, epochs=3, batch_size=64, lr=0.005),
    "mnist": dict(image_size=227), "fashion-mnist": dict(image_size=227), "cifar10": dict(image_size=227),
    "imagefolder": dict(image_size=227), "random": dict(image_size=227),
}
INITS = ("paper", "caffe", "kaiming", "d2l", "torch")


@dataclass
class Config:
    layout: str = "single"
    dataset: str = "shapes"
    data_dir: str = "data"
    download: bool = True
    split_test: int = 0
    train_size: int = 0
    val_size: int = 0
    recipe: str = "paper-he"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    init: str = "d2l"
    batch_size: int = 128
    epochs: int = 3
    max_steps: int = 0
    schedule: str = "none"
    lr_factor: float = 0.1
    lr_patience: int = 0
    crop: bool = False
    flip: bool = False
    lighting: float = 0.0
    ten_crop: bool = False
    image_size: int = 227
    streams: int = 2
    seed: int = 0
    dropout_seed: int = 0
    workers: int = 0
    device: str = ""
    devices: str = ""
    backend: str = ""
    timeout: float = 300.0
    out: str = ""
    save_every: int = 0
    resume: str = ""
    plot: bool = False
    quiet: bool = False
    log_every: int = 50
    eval_every: int = 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input
        raise UsageError(f"{message} (see --help)")


def parse_config(argv=None):
    p = _Parser(description="Train the 2012 two-stream AlexNet.",
                epilog="torchrun --nproc_per_node=2 launch/train.py   # split layout, shapes, defaults")
    B = argparse.BooleanOptionalAction
    p.add_argument("--layout", choices=["single", "streams", "split"], default=None,
                   help="default: split under torchrun, single otherwise")
    p.add_argument("--dataset", choices=DATASETS, default="shapes")
    p.add_argument("--data-dir", default="data", help="where the data set's files are (or are downloaded)")
    p.add_argument("--download", action=B, default=True, help="let torchvision download missing files")
    p.add_argument("--split-test", type=int, default=0, metavar="N", help="mnist/fashion-mnist: train on "
                   "the test files but their last N images, validate on those N (when only t10k-* exist)")
    p.add_argument("--train-size", type=int, default=0, help="shapes/random: images per epoch")
    p.add_argument("--val-size", type=int, default=0, help="shapes/random: validation images")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="paper-he",
                   help="paper-he (default): the paper's with He init; paper: as published; d2l: the seed's")
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--init", choices=INITS, help="paper: N(0,0.01), biases 1; caffe: bvlc_alexnet's "
                   "(N(0,0.01), fc6/fc7 N(0,0.005), biases 0.1); kaiming: He normal, biases 0; d2l: Xavier; "
                   "torch: PyTorch's default")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many SGD steps (0: no limit)")
    p.add_argument("--schedule", choices=["none", "plateau"], help="plateau: lr * --lr-factor when the "
                   "validation loss stops improving for --lr-patience evaluations")
    p.add_argument("--lr-factor", type=float, default=0.1)
    p.add_argument("--lr-patience", type=int, default=0)
    p.add_argument("--crop", action=B, help="random crops from a resize to size*256/224 (eval: centre crop)")
    p.add_argument("--flip", action=B, help="random horizontal flips")
    p.add_argument("--lighting", type=float, help="PCA colour lighting sigma (0: off; RGB only)")
    p.add_argument("--ten-crop", action="store_true", help="evaluate on 10 crops, softmax averaged")
    p.add_argument("--image-size", type=int, help="the model's input (>= 67)")
    p.add_argument("--streams", type=int, default=2, help="single/streams layouts (split: one per process)")
    p.add_argument("--seed", type=int, default=0, help="weights, data order and augmentation")
    p.add_argument("--dropout-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="data loader processes per rank")
    p.add_argument("--device", default="", help="default: cuda:LOCAL_RANK with NCCL, cuda if any, else cpu")
    p.add_argument("--devices", default="", help="streams layout: comma-separated, one per stream")
    p.add_argument("--backend", choices=["nccl", "gloo"], default="")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective waits for a peer before the job ends")
    p.add_argument("--out", default="", help="default: a new folder under runs/")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps and at the end")
    p.add_argument("--resume", default="", help="a checkpoint (or run) directory to continue from")
    p.add_argument("--plot", action="store_true", help="write curves.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no log lines but errors")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines without a bar")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: each epoch)")
    a = p.parse_args(argv)
    if a.layout is None:
        a.layout = "split" if "RANK" in os.environ else "single"
    values = dict(RECIPES[a.recipe], **DATASET_DEFAULTS[a.dataset])
    given = {k: v for k, v in vars(a).items() if v is not None}
    values.update(given)
    if "workers" not in given:
        values["workers"] = 0 if not torch.cuda.is_available() else min(4, (os.cpu_count() or 1) // 2)
    cfg = Config(**{f.name: values[f.name] for f in fields(Config) if f.name in values})
    validate(cfg)
    return cfg


def validate(cfg):
    checks = [
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: use 1 or more"),
        (cfg.epochs >= 1, f"--epochs {cfg.epochs}: use 1 or more"),
        (cfg.max_steps >= 0, f"--max-steps {cfg.max_steps}: use 0 (no limit) or more"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr {cfg.lr}: use a positive number such as 0.01"),
        (0 <= cfg.momentum < 1, f"--momentum {cfg.momentum}: use 0 <= momentum < 1"),
        (cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay}: use 0 or more"),
        (0 < cfg.lr_factor < 1, f"--lr-factor {cfg.lr_factor}: use 0 < factor < 1"),
        (cfg.lighting >= 0, f"--lighting {cfg.lighting}: use 0 (off) or a sigma such as 0.1"),
        (cfg.workers >= 0, f"--workers {cfg.workers}: use 0 or more"),
        (cfg.timeout > 0, f"--timeout {cfg.timeout}: use a positive number of seconds"),
        (cfg.save_every >= 0, f"--save-every {cfg.save_every}: use 0 (only at the end: off) or more"),
        (cfg.log_every >= 1 and cfg.eval_every >= 0, "--log-every must be >= 1 and --eval-every >= 0"),
        (cfg.split_test >= 0 and cfg.train_size >= 0 and cfg.val_size >= 0,
         "--split-test, --train-size and --val-size must be 0 or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.layout != "split" and world > 1:
        raise UsageError(f"--layout {cfg.layout} runs in one process: use python launch/train.py, not "
                         f"torchrun with {world} processes")
    if cfg.layout == "split" and "RANK" not in os.environ:
        raise UsageError("--layout split runs one process per stream: launch it with "
                         "torchrun --nproc_per_node=2 launch/train.py")


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


def build_model(cfg, spec, ctx_rank, device):
    """The full AlexNet from cfg.seed on CPU, then this layout's part of it: split and single with the
    same seed start from the same weights."""
    torch.manual_seed(cfg.seed)
    full = AlexNet(spec=spec, dropout_seed=cfg.dropout_seed, init="torch")
    init_weights(full, cfg.init)
    if cfg.layout == "single":
        model = full.to(device)
        return model, {"single.pt": model}
    if cfg.layout == "streams":
        devices = cfg.devices.split(",") if cfg.devices else [device] * spec.streams
        if len(devices) != spec.streams:
            raise UsageError(f"--devices names {len(devices)} devices for {spec.streams} streams: "
                             f"give one per stream")
        model = streams_from_single(full, devices)
        return model, {f"stream{s}.pt": m for s, m in enumerate(model.streams)}
    model = split_from_single(full, ctx_rank, None, device)
    return model, {f"stream{ctx_rank}.pt": model.stream}


def _datasets_rank0_first(cfg, rank, world):
    """Rank 0 reads (or downloads) first; the others read after it, or all stop with its message."""
    def load(download):
        return build_datasets(cfg.dataset, cfg.data_dir, seed=cfg.seed, download=download,
                              split_test=cfg.split_test, train_size=cfg.train_size, val_size=cfg.val_size)
    if world == 1:
        return load(cfg.download)
    result, error = None, None
    if rank == 0:
        try:
            result = load(cfg.download)
        except UsageError as e:
            error = str(e)
    errors = [None] * world
    dist.all_gather_object(errors, error)
    if errors[0]:
        raise UsageError(errors[0])
    return result if rank == 0 else load(False)


def build(cfg, ctx=None):
    rank, world = (ctx.rank, ctx.world) if ctx else (0, 1)
    if ctx is not None:
        device = ctx.device
    else:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    streams = world if cfg.layout == "split" else cfg.streams
    train_raw, val_raw, classes = _datasets_rank0_first(cfg, rank, world)
    try:
        spec = Spec(streams=streams, image_size=cfg.image_size, in_channels=CHANNELS[cfg.dataset],
                    num_classes=len(classes))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if len(train_raw) // cfg.batch_size < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} is more than the {len(train_raw)} training images: "
                         f"use a smaller batch")
    mean, std = NORMS[cfg.dataset]
    aug = dict(crop=cfg.crop, flip=cfg.flip, lighting=cfg.lighting)
    train_set = Seeded(train_raw, build_transforms(cfg.image_size, spec.in_channels, mean, std, train=True,
                                                   **aug), cfg.seed)
    val_set = Seeded(val_raw, build_transforms(cfg.image_size, spec.in_channels, mean, std, train=False,
                                               ten_crop=cfg.ten_crop, **aug), cfg.seed)
    model, parts = build_model(cfg, spec, rank, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=cfg.lr_factor,
                                                            patience=cfg.lr_patience)
                 if cfg.schedule == "plateau" else None)
    out = [cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.layout}-{cfg.dataset}")]
    if world > 1:                                  # rank 0's clock names the run for every rank
        dist.broadcast_object_list(out, src=0)
    out = out[0]
    if os.path.exists(os.path.join(out, "metrics.jsonl")):   # checked by every rank: all stop together
        raise UsageError(f"--out {out} already holds metrics.jsonl: give another --out (runs are "
                         f"never overwritten)")
    return Job(cfg, spec, model, parts, optimizer, scheduler, train_set, val_set, list(classes), device,
               rank, world, out)


# ---- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(job):
    """Validation loss, top-1 and top-5 (None with 5 classes or fewer) over the whole validation set."""
    model, cfg = job.model, job.cfg
    model.eval()
    loader = DataLoader(job.val_set, batch_size=cfg.batch_size, num_workers=cfg.workers)
    n, loss_sum, top1, top5 = 0, 0.0, 0, 0
    k = min(5, job.spec.num_classes)
    for x, y in loader:
        if x.dim() == 5:                           # ten crops: (B, 10, C, H, W), softmax averaged
            b = x.shape[0]
            logits = model(x.flatten(0, 1).to(job.device))
            logp = logits.float().softmax(1).view(b, 10, -1).mean(1).clamp_min(1e-12).log()
        else:
            logp = model(x.to(job.device)).float().log_softmax(1)
        y = y.to(logp.device)
        loss_sum += F.nll_loss(logp, y, reduction="sum").item()
        best = logp.topk(k, 1).indices
        top1 += (best[:, 0] == y).sum().item()
        top5 += (best == y[:, None]).any(1).sum().item()
        n += len(y)
    model.train()
    return loss_sum / n, top1 / n, (top5 / n if job.spec.num_classes > 5 else None)


# ---- checkpoints ----------------------------------------------------------------------------------

def save_checkpoint(job, state):
    path = os.path.join(job.out, "checkpoints", f"step{state['step']:07d}")
    ckpt.save_files(path, {name: ckpt.stream_state(m, job.optimizer) for name, m in job.parts.items()})
    if job.world > 1:
        dist.barrier()                             # every shard written before meta marks it complete
    if job.rank == 0:
        ckpt.save_meta(path, dict(
            layout=job.cfg.layout, streams=job.spec.streams, spec=ckpt.spec_dict(job.spec),
            step=state["step"], epoch=state["epoch"], batch=state["batch"],
            lr=job.optimizer.param_groups[0]["lr"],
            scheduler=job.scheduler.state_dict() if job.scheduler else None,
            torch_rng=torch.get_rng_state(), config=asdict(job.cfg)))
    if job.world > 1:
        dist.barrier()
    return path


def resume(job, path):
    """Load a checkpoint into the job: on every rank all files are checked before any is loaded."""
    error, meta = None, None
    try:
        path = ckpt.find_checkpoint(path)
        meta = ckpt.read_meta(path)
        ckpt.check_matches(meta, job.spec, job.cfg.layout, path)
        expected = {name: {k: v.shape for k, v in m.state_dict().items()} for name, m in job.parts.items()}
        states = ckpt.load_files(path, meta, list(job.parts), expected)
    except UsageError as e:
        error = str(e)
    if job.world > 1:                              # one rank's bad shard stops every rank
        errors = [None] * job.world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UsageError(error)
    for name, m in job.parts.items():
        ckpt.load_stream_state(m, job.optimizer, states[name])
    for group in job.optimizer.param_groups:
        group["lr"] = meta["lr"]
    if job.scheduler and meta["scheduler"]:
        job.scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(meta["torch_rng"])
    return path, {"step": meta["step"], "epoch": meta["epoch"], "batch": meta["batch"]}


# ---- the run --------------------------------------------------------------------------------------

class Metrics:
    def __init__(self, path, enabled):
        self.path, self.enabled, self.rows = path, enabled, []

    def write(self, row):
        self.rows.append(row)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def run(job):
    """Train for cfg.epochs (or cfg.max_steps); evaluate each epoch (or each cfg.eval_every steps)."""
    cfg, main = job.cfg, job.rank == 0
    steps_per_epoch = len(job.train_set) // cfg.batch_size        # drop_last: every batch full
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    state = {"step": 0, "epoch": 0, "batch": 0}
    resumed_from = None
    if cfg.resume:
        resumed_from, state = resume(job, cfg.resume)
    if main:
        os.makedirs(job.out, exist_ok=True)
        with open(os.path.join(job.out, "config.json"), "w") as f:
            json.dump(dict(asdict(cfg), out=job.out, spec=ckpt.spec_dict(job.spec),
                           torch=torch.__version__), f, indent=1)
    metrics = Metrics(os.path.join(job.out, "metrics.jsonl"), main)
    quiet = cfg.quiet or not main

    def say(line):                                 # rank 0, not --quiet; above the bar if there is one
        if not quiet:
            bar.write(line) if not bar.disable else log(line)

    from tqdm import tqdm
    tty = sys.stderr.isatty()
    sized = tty and os.get_terminal_size(sys.stderr.fileno()).columns > 0   # a pty may report 0 columns
    bar = tqdm(total=total, initial=state["step"], disable=quiet or not tty, desc="train",
               dynamic_ncols=sized, ncols=None if sized else 100)
    say(f"train: {cfg.layout} layout, {job.spec.streams} streams"
        f"{f' ({job.world} processes)' if cfg.layout == 'split' else ''} on {job.device}; {cfg.dataset} "
        f"({len(job.train_set)} train / {len(job.val_set)} val images, {len(job.classes)} classes) at "
        f"{cfg.image_size} px, {job.spec.in_channels} channel(s)")
    say(f"recipe {cfg.recipe}: init {cfg.init}, SGD lr {cfg.lr:g} momentum {cfg.momentum:g} weight decay "
        f"{cfg.weight_decay:g}, batch {cfg.batch_size}, {cfg.epochs} epochs of {steps_per_epoch} steps"
        f"{f' (stop at step {cfg.max_steps})' if cfg.max_steps else ''}, schedule {cfg.schedule}, "
        f"crop {cfg.crop}, flip {cfg.flip}, lighting {cfg.lighting:g}, ten-crop {cfg.ten_crop}, "
        f"seed {cfg.seed}; out {job.out}")
    if resumed_from:
        say(f"resumed from {resumed_from} at step {state['step']}")
    job.model.train()
    last_val = None
    t_start = time.perf_counter()
    n_images = 0

    def do_eval(scheduled=True):
        nonlocal last_val
        loss, top1, top5 = evaluate(job)
        last_val = dict(split="val", step=state["step"], epoch=state["epoch"], loss=loss, top1=top1, top5=top5)
        metrics.write(last_val)
        if job.scheduler and scheduled:            # not the extra evaluation where a run stops: a
            job.scheduler.step(loss)               # resumed run must see the same schedule
        say(f"val  step {state['step']} epoch {state['epoch']}: loss {loss:.4f} top1 {top1:.4f} "
            f"top5 {_fmt(top5)}")

    while state["step"] < total:
        sampler = EpochSampler(len(job.train_set), cfg.seed, state["epoch"], state["batch"] * cfg.batch_size)
        loader = DataLoader(job.train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg.workers, pin_memory=job.device.type == "cuda")
        t_prev = time.perf_counter()
        for x, y in loader:
            logits = job.model(x.to(job.device, non_blocking=True))          # (B, classes)
            loss = F.cross_entropy(logits, y.to(logits.device))
            job.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            job.optimizer.step()
            loss_v = loss.item()
            state["step"] += 1
            state["batch"] += 1
            now = time.perf_counter()
            n_images += len(y)
            metrics.write(dict(split="train", step=state["step"], epoch=state["epoch"], loss=loss_v,
                               lr=job.optimizer.param_groups[0]["lr"], images_per_s=len(y) / (now - t_prev)))
            t_prev = now
            if not math.isfinite(loss_v):
                raise UsageError(f"the training loss became {loss_v} at step {state['step']}: lower --lr "
                                 f"(now {job.optimizer.param_groups[0]['lr']:g}) or use --init d2l")
            bar.update(1)
            bar.set_postfix(epoch=state["epoch"], loss=f"{loss_v:.3f}", refresh=False)
            if bar.disable and not quiet and state["step"] % cfg.log_every == 0:
                say(f"step {state['step']}/{total} epoch {state['epoch']}: loss {loss_v:.4f} "
                    f"lr {job.optimizer.param_groups[0]['lr']:g} {n_images / (now - t_start):.1f} img/s")
            end_of_epoch = state["batch"] == steps_per_epoch
            scheduled = bool(cfg.eval_every and state["step"] % cfg.eval_every == 0
                             or not cfg.eval_every and end_of_epoch)
            if scheduled or state["step"] == total:
                do_eval(scheduled)
            if end_of_epoch:
                state["epoch"] += 1
                state["batch"] = 0
            if cfg.save_every and (state["step"] % cfg.save_every == 0 or state["step"] == total):
                save_checkpoint(job, state)
            if state["step"] >= total or end_of_epoch:
                break
    bar.close()
    seconds = time.perf_counter() - t_start
    if main and cfg.plot:
        plot(metrics.rows, os.path.join(job.out, "curves.png"))
    summary = dict(steps=state["step"], seconds=seconds, images_per_s=n_images / max(seconds, 1e-9),
                   val=last_val, out=job.out)
    if last_val:
        say(f"done: {state['step']} steps in {seconds:.0f} s ({summary['images_per_s']:.1f} img/s); "
            f"val loss {last_val['loss']:.4f} top1 {last_val['top1']:.4f} top5 {_fmt(last_val['top5'])}; "
            f"out {job.out}")
    return summary


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.6, label="train")
    a.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val")
    a.set_xlabel("step"), a.set_ylabel("loss"), a.legend()
    b.plot([r["step"] for r in val], [r["top1"] for r in val], "o-", label="val top-1")
    if val and val[0]["top5"] is not None:
        b.plot([r["step"] for r in val], [r["top5"] for r in val], "o-", label="val top-5")
    b.set_xlabel("step"), b.set_ylabel("accuracy"), b.set_ylim(0, 1), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
