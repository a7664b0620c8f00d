"""What a run says and records: metrics.jsonl, run.json and config.json, the sinks (TensorBoard, W&B), the
progress bar and its lines, the communication share, and the closing lines with how to go on."""
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import layouts
from .cli import log
from .errors import UsageError
from .job import in_place
from .plots import plot_curves
from .resume import diverged


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
        layout=job.cfg.layout, world_size=job.world, replicas=job.replicas if job.replica_group is not None else 1, streams=job.spec.streams,
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
                     f"top5 {fmt(last_val['top5'])}; out {job.out}")
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


def fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"
