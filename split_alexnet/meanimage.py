"""The mean image of --preprocess paper, computed safely: in parallel, resumable, outside any timeout.

Every rank takes a share of the images (rows rank::world of the list) and sums it with its loader
workers; the pixels of the paper's base (shorter side, central square) are integers 0-255, so the sums
are exact in int64 in any order and the mean is data.mean_image's to the bit. The share's sum is saved
beside the cache every `every_s` seconds (PATH.partRofW.pt), so an interrupted pass continues where it
stopped. The ranks then exchange their sums over a gloo group of their own whose timeout is `wait_s`
(default a week): no collective of the run (--timeout) is pending while they compute, and the ranks that
finish first wait without a deadline that could kill the job. Optionally from `count` images, an even
spread over the set (--mean-images; the count goes into the file name).
"""
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

from .data import Seeded, _paper_base, cached_mean_image
from .errors import UsageError


def subset(n, count):
    """The indices the mean is taken over: all n, or `count` evenly spread."""
    if not count or count >= n:
        return list(range(n))
    return [k * n // count for k in range(count)]


def counted_path(path, count, n):
    """The cache's path for a mean of `count` of the n images (the count recorded in the name)."""
    return path if not count or count >= n else f"{path[:-3]}-n{count}.pt"


def share_sum(dataset, side, indices, *, workers=0, part=None, every_s=60.0, bar=False, batch=32):
    """(sum int64 (C, side, side), images summed) over dataset[indices] after the paper's base.
    part: a file to continue from and save to as it goes (None: in memory only)."""
    done, total = 0, None
    if part and os.path.isfile(part):
        saved = torch.load(part, map_location="cpu", weights_only=True)
        if saved.get("indices") == len(indices) and saved.get("side") == side:
            done, total = int(saved["done"]), saved["sum"]
    base = Seeded(dataset.dataset, v2.Compose(_paper_base(side)[:-1]), dataset.seed)   # uint8, --bad-images
    base.bad_images = dataset.bad_images
    loader = DataLoader(Subset(base, indices[done:]), batch_size=batch, num_workers=workers)
    from tqdm import tqdm
    progress = tqdm(total=len(indices), initial=done, desc="mean image", disable=not bar, file=sys.stderr,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)
    from .loader import one_line_errors
    saved_at = time.monotonic()
    for x, _ in one_line_errors(loader):
        s = x.sum(0, dtype=torch.int64)
        total = s if total is None else total + s
        done += len(x)
        progress.update(len(x))
        if part and time.monotonic() - saved_at >= every_s:
            _save(part, dict(sum=total, done=done, indices=len(indices), side=side))
            saved_at = time.monotonic()
    progress.close()
    return total, done


def _save(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError:                                # a read-only data folder: no resume, still correct
        pass


def parallel_mean(dataset, side, channels, *, rank=0, world=1, workers=0, count=0, cache=None,
                  every_s=60.0, wait_s=7 * 24 * 3600.0, bar=False, batch=32):
    """The mean image over `dataset` (a data.Seeded of the raw images), every rank computing its share.
    cache: the final file (rank 0 writes it; partial sums go beside it), or None (generated data).
    Returns (mean (C, side, side) float32, what happened). Every rank must call it (world > 1)."""
    indices = subset(len(dataset), count)
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s)) if world > 1 else None
    part = f"{cache}.part{rank}of{world}.pt" if cache else None
    error, total, n = None, torch.zeros(channels, side, side, dtype=torch.int64), 0
    try:
        s, n = share_sum(dataset, side, indices[rank::world], workers=workers, part=part, every_s=every_s,
                         bar=bar, batch=batch)
        if s is not None:
            total = s
    except UsageError as e:
        error = str(e)
    if world > 1:                                  # the lowest failing rank's message stops every rank
        errors = [None] * world
        dist.all_gather_object(errors, error, group=group)
        error = next((e for e in errors if e), None)
        if error is None:
            counts = torch.tensor([n], dtype=torch.int64)
            dist.all_reduce(total, group=group)
            dist.all_reduce(counts, group=group)
            n = int(counts)
        dist.destroy_process_group(group)
    if error:
        raise UsageError(error)
    mean = (total.double() / n).float()            # data.mean_image's (sum / n).float(), the sum exact
    how = f"computed from {n} training images" + (f" (of {len(dataset)})" if n < len(dataset) else "") + \
        (f" by {world} ranks" if world > 1 else "")
    if cache and rank == 0:
        _save(cache, mean.clone())
        how += f", saved to {cache}" if os.path.isfile(cache) else " (in memory: the folder cannot be written)"
    if part and os.path.isfile(part):
        os.remove(part)
    return mean, how


def run_mean_image(cache, dataset, side, channels, *, rank=0, world=1, **kwargs):
    """The cache if rank 0 finds it (read and checked by data.cached_mean_image on every rank), else
    parallel_mean on every rank."""
    exists = [bool(cache) and os.path.isfile(cache)]
    if world > 1:
        dist.broadcast_object_list(exists, src=0)
    if exists[0]:
        return cached_mean_image(cache, dataset, side, channels)
    return parallel_mean(dataset, side, channels, rank=rank, world=world, cache=cache, **kwargs)
