"""Evaluation: the validation set's loss, top-1 and top-5 (every layout), a checkpoint's (--eval-only), and
the logged, scheduled evaluation of a run."""
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import guard, precision
from .cli import log
from .loader import one_line_errors
from .report import fmt
from .resume import resume

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


def evaluate_checkpoint(job):
    """--eval-only: the checkpoint of --resume on the validation set, one line; nothing trained or written."""
    found, state = resume(job, job.cfg.resume)
    guard.phase(f"evaluation of {found}")
    loss, top1, top5 = evaluate(job)
    if not job.cfg.quiet:
        log(f"eval: {found} (step {state['step']}, epoch {state['epoch']}) on {len(job.val_set)} {job.cfg.dataset} "
            f"val images{' (ten crops)' if job.cfg.ten_crop else ''}: loss {loss:.4f} top1 {top1:.4f} "
            f"top5 {fmt(top5)}")
    val = dict(split="val", step=state["step"], epoch=state["epoch"], loss=loss, top1=top1, top5=top5)
    return dict(steps=state["step"], seconds=0.0, images_per_s=0.0, val=val, out=None, checkpoint=found)


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
                 f"top5 {fmt(top5)}")
    return row
