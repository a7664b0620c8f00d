"""Checkpoints of a run: save every rank's files (and rank 0's meta.pt), judged first; resume, every file
checked before any is loaded; and the resume policy (resolve_resume): a resumed run takes the
checkpoint's settings, and the flags given on the command line win where they are in RESUME_SAFE and
are refused, with the fix, everywhere else."""
import os
import shutil
from dataclasses import asdict

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import guard
from .cli import stop_all_on_error
from .data import (
    fingerprint,
)
from .errors import UsageError
from .model import check_dropout_state
from .optim import check_resume_update

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


# ---- resume: the checkpoint's settings, the command line's flags -----------------------------------

# may change on resume: the explicit flag wins and is printed as changed. Every other flag given with a
# value other than the checkpoint's is refused (RESUME_REFUSED says why, where it is known).
# batch_size: at an epoch's end only (refused mid-epoch); the steps left are counted from the position.
RESUME_SAFE = ("lr", "momentum", "weight_decay", "epochs", "max_steps", "schedule", "lr_factor", "lr_patience",
               "lr_drops", "bias_lr_mult", "bias_decay", "batch_size", "dexp_weights", "dexp_biases",
               "crop", "flip", "lighting", "lighting_pca", "ten_crop", "val_size", "eval_every", "save_every",
               "timeout", "peer_timeout", "bad_images")
# never taken from the checkpoint: where this run writes, reads and runs
RESUME_LOCAL = ("keep_last", "tensorboard", "wandb", "out", "resume", "data_dir", "download", "workers", "device", "devices", "backend", "quiet",
                "plot", "log_every", "layout", "streams", "eval_only",
                "micro_batches", "precision", "channels_last", "compile", "keep_freed_memory",  # how, not what
                "cudnn_benchmark", "fused_sgd", "sync_debug",
                "prefetch_factor", "decode", "share_decode")   # the data path: how, not what (loader.py)
# cannot be honoured after the run started: field -> why, the fix
RESUME_REFUSED = {
    "seed": "the data order and augmentation come from the seed",
    "dropout_seed": "the dropout masks continue from the checkpoint's seed and draw counter",
    "init": "the weights come from the checkpoint",
    "dataset": "the checkpoint was trained on another data set",
    "train_size": "the epoch's order depends on the training set's size",
    "split_test": "the epoch's order depends on the training set's size",
    "image_size": "the checkpoint's net takes another input size",
    "preprocess": "the trained net's first layer learned the checkpoint's input",
    "net": "the checkpoint holds another net",
    "subtract_mean": "the trained net's first layer learned the checkpoint's input",
    "mean_images": "the mean image subtracted from the input is taken over another subset",
    "reads": "the checkpoint's net has another connectivity (its layers read other streams)",
    "update": "the checkpoint's velocity is in the units of its own update rule",
    "recipe": "a recipe also sets the init and the input, which a trained net cannot change; give the "
              "flags to change (--lr, --momentum, ...) instead",
}


def explicit_flags(argv):
    """The Config fields given on the command line."""
    import argparse

    from .config import build_parser
    p = build_parser(add_help=False)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    ns, _ = p.parse_known_args(argv)
    return set(vars(ns))


def resolve_resume(cfg, argv, saved, ckpt_batch):
    """cfg with the checkpoint's settings (`saved`, its config) but the explicit flags. Returns
    (cfg, lines to print). Raises UsageError for a flag that cannot be honoured on resume."""
    from dataclasses import fields, replace
    explicit = explicit_flags(argv)
    changes, lines = {}, []
    for f in fields(cfg):
        k = f.name
        if k in RESUME_LOCAL or k not in saved:
            continue
        mine, theirs = getattr(cfg, k), saved[k]
        if k not in explicit:
            changes[k] = theirs                    # the run continues with its own settings
            continue
        if mine == theirs:
            continue
        flag = "--" + k.replace("_", "-")
        if k == "batch_size" and ckpt_batch:
            raise UsageError(f"{flag} {mine} on resume: the checkpoint stopped mid-epoch (batch {ckpt_batch}) "
                             f"with batch size {theirs}: drop {flag}, or resume from a checkpoint at an "
                             f"epoch's end")
        if k in RESUME_REFUSED or k not in RESUME_SAFE:
            why = RESUME_REFUSED.get(k, "a resume may change only " + ", ".join(
                "--" + f.replace("_", "-") for f in RESUME_SAFE))
            raise UsageError(f"{flag} {mine} on resume: the checkpoint's run used {theirs}, and "
                             f"{why}: drop {flag} (or start a new run)")
        lines.append(f"resume: {flag} {mine} (the checkpoint's run: {theirs})")
    return replace(cfg, **changes), lines
