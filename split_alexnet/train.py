"""Training: the run, its step and its loop, for every layout of the registry (layouts.py). The config
(flags, recipes, checks) is in config.py; the job is built in job.py, evaluated in evaluate.py,
saved and resumed in resume.py, and reported in report.py.

The split layout runs one process per stream (torchrun). Every rank builds the same full AlexNet from
the same seed and keeps its shard, and every rank reads the same batches: the sampler's order and each
image's augmentation are drawn from (seed, epoch, index) alone (data.EpochSampler, data.Seeded), so no
rank has to broadcast data. SplitAlexNet returns the full logits on every rank, so loss and evaluation
are the same number on every rank without any extra collective.
"""
import json
import os
import signal
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import guard, layouts, precision
from .allocator import apply_keep_freed_memory
from .cli import log, stop_all_on_error
from .config import parse_config
from .data import paper_side
from .distributed import setup, teardown
from .errors import UsageError

# the job's parts, where they live (train.build, train.resume, ... are what launch/train.py and the tests call)
from .evaluate import evaluate, evaluate_and_log, evaluate_checkpoint  # noqa: F401
from .job import (  # noqa: F401
    Job,
    _mean_image_rank0_first,
    build,
    build_optimizer,
    build_scheduler,
    in_place,
    resume_source,
    run_folder,
)
from .loader import DataBound, TrainLoader
from .optim import DexpSchedule
from .report import (  # noqa: F401
    CommShare,
    Progress,
    announce,
    cut_metrics,
    finish,
    metric_sinks,
    run_info,
    strict_json,
    write_run_json,
)
from .resume import resolve_resume, resume, save_checkpoint  # noqa: F401

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


# ---- the trainer: config, build, run, teardown (launch/train.py, python -m split_alexnet.train) ------------

def resume_settings(cfg, argv):
    """A resume continues the checkpoint's run: its settings, but the flags given here (see guard)."""
    found = ckpt.find_checkpoint(cfg.resume)      # the newest that verifies, from a run directory
    meta = ckpt.read_meta(found)
    cfg, lines = resolve_resume(cfg, argv, meta.get("config") or {}, meta.get("batch", 0))
    ckpt.check_resumed_config(cfg, found)        # the checkpoint's settings pass the flags' checks
    for line in lines:
        log(line)
    return replace(cfg, resume=found)


def main(argv=None):
    guard.die_with_parent()                        # first: a rank ends with its torchrun agent
    cfg = parse_config(argv)
    _, allocator = apply_keep_freed_memory(cfg.keep_freed_memory)   # every rank, before any tensor
    if not cfg.quiet:
        log(f"{allocator}; precision {cfg.precision}, micro-batches {cfg.micro_batches}, "
            f"channels-last {cfg.channels_last}, compile {cfg.compile}")
    guard.check_out(cfg.out, cfg.save_every > 0 and not cfg.eval_only)   # before any work
    cfg = resume_source(cfg)                       # --out's newest checkpoint, in place (or --resume)
    if cfg.resume:
        cfg = resume_settings(cfg, argv)
    entry = layouts.get(cfg.layout)
    ctx = setup(cfg.backend or None, cfg.device or None, cfg.timeout, layouts.setup_streams(entry, cfg.streams)) \
        if entry.torchrun else None
    try:
        guard.start(ctx, cfg.peer_timeout)         # heartbeat watchdog, parent-death signal
        world = ctx.world if ctx else 1
        guard.agree(world, guard.config_fields(cfg), "the arguments")
        if not cfg.eval_only:                      # the folder is this job's alone (outlock.py)
            cfg = replace(cfg, out=run_folder(cfg, world))
            guard.lock_out(cfg.out, world)
        job = build(cfg, ctx)
        guard.agree(world, guard.data_fields(job), "the data")
        return EXIT_PREEMPTED if run(job).get("stopped") else 0   # --eval-only: never stopped
    finally:
        guard.stop()                               # the watchdog joined before the group goes
        teardown()
        guard.unlock_out()


def cli():
    """The console script split-alexnet-train (setup.cfg), and python -m split_alexnet.train."""
    from .cli import run_main
    run_main(main)


if __name__ == "__main__":
    cli()

