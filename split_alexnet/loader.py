"""The training loader: uint8 batches from persistent workers, onto the device, the float work there
(augment.py); each image decoded once per replica; the time spent waiting for data; bad images named
in one line whatever --workers.

Stream s of a replica (split layout) loads rows s::S of the replica's batch and the streams all-gather
the uint8 crops and their draws: the batch every stream then holds is the one each would have loaded
alone, row for row, so the training is the same bit for bit (tests/test_data_path.py).
"""
import os
import time

import torch
from torch.utils.data import DataLoader, Sampler

from .augment import all_gather_rows, collate_encoded, split_encoded, stream_rows, to_device
from .cli import env
from .data import EpochSampler
from .decode import decode_batch
from .errors import RankError, UsageError


def cores():
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                         # not Linux
        return os.cpu_count() or 1


def default_workers(cuda):
    """--workers' default: on GPUs the cores per local rank but the one the rank's main process uses;
    on CPU 0 (the compute threads take the cores: workers would only compete with them)."""
    if not cuda:
        return 0
    return max(1, cores() // max(1, env().local_world) - 1)


def worker_message(e):
    """The one line of a UsageError raised in a DataLoader worker: torch re-raises it in the main
    process as UsageError('Caught UsageError in DataLoader worker process N.\\nOriginal Traceback ...'),
    whose last line is 'split_alexnet.cli.UsageError: <the line>'."""
    text = str(e)
    if not text.startswith("Caught ") or "DataLoader worker" not in text.splitlines()[0]:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split("Error: ", 1)[1] if "Error: " in last else last


def one_line_errors(batches, alone=False):
    """Iterate `batches`, a worker's UsageError re-raised as its own one line (RankError when `alone`:
    this rank's rows are its own, no peer sees the same file)."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except UsageError as e:
            raise (RankError if alone else UsageError)(worker_message(e)) from None
        yield batch


class TrainSampler(Sampler):
    """The epoch's order from batch `start` on (EpochSampler; replicas: ReplicaSampler's rows), and with
    `streams` > 1 only this stream's rows s::S of each replica batch. set(epoch, start) before each epoch:
    the persistent workers stay, the main process walks the new order."""

    def __init__(self, n, seed, batch_size, replicas=1, replica=0, streams=1, stream=0):
        self.n, self.seed, self.batch, self.replicas, self.replica = n, seed, batch_size, replicas, replica
        self.streams, self.stream, self.epoch, self.start = streams, stream, 0, 0

    def set(self, epoch, start):
        self.epoch, self.start = epoch, start

    def _replica_order(self):
        if self.replicas > 1:
            from .replicas import ReplicaSampler
            return list(ReplicaSampler(self.n, self.seed, self.epoch, self.batch, self.replicas, self.replica,
                                       self.start))
        return list(EpochSampler(self.n, self.seed, self.epoch, self.start))

    def __iter__(self):
        items, b = self._replica_order(), self.batch // self.replicas
        for k in range(len(items) // b):
            yield from stream_rows(items[k * b:(k + 1) * b], self.streams, self.stream)

    def __len__(self):
        return (self.n - self.start) // self.batch * (self.batch // self.replicas // self.streams)


class TrainLoader:
    """Batches (x float on the device, y) of the training set, from one DataLoader whose workers persist
    across epochs. augment: augment.DeviceAugment. decode: "cpu" (the workers decode) or "gpu" (the
    workers read the files, decode_batch decodes them on the device). share: (stream group, S, s) to
    decode rows s::S and all-gather them, or None."""

    def __init__(self, dataset, *, batch_size, seed, device, augment, workers, prefetch_factor=4, replicas=1,
                 replica=0, share=None, decode="cpu", side=None, size=None):
        group, streams, stream = share or (None, 1, 0)
        self.group, self.streams, self.device, self.augment = group, streams, device, augment
        self.decode, self.side, self.size = decode, side, size   # --decode gpu: the square, the crop
        self.sampler = TrainSampler(len(dataset), seed, batch_size, replicas, replica, streams, stream)
        kwargs = dict(persistent_workers=True, prefetch_factor=prefetch_factor) if workers > 0 else {}
        self.loader = DataLoader(dataset, batch_size=batch_size // replicas // streams, sampler=self.sampler,
                                 drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                                 collate_fn=collate_encoded if decode == "gpu" else None, **kwargs)
        self.data_s = 0.0                          # the last batch's wait for data and its device work

    def epoch(self, epoch, start):
        """The batches of `epoch` from item `start` on."""
        self.sampler.set(epoch, start)
        batches = one_line_errors(self.loader, alone=self.streams > 1)
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            x, y = self.on_device(batch)
            self.data_s = time.perf_counter() - t
            yield x, y

    def on_device(self, batch):
        if self.decode == "gpu":
            flat, lengths, draws, y = batch
            crops = decode_batch(split_encoded(flat, lengths), self.side, self.device)
            h = w = self.size
            crops = torch.stack([c[:, int(t):int(t) + h, int(l):int(l) + w]
                                 for c, t, l in zip(crops, draws[:, 0].tolist(), draws[:, 1].tolist())])
            draws = draws.to(self.device)
        else:
            (crops, draws), y = batch
            crops, draws = to_device((crops, draws), self.device)
        y = y.to(self.device, non_blocking=True)
        if self.streams > 1:                       # every stream's rows: the whole replica batch
            crops = all_gather_rows(crops, self.group, self.streams)
            packed = all_gather_rows(torch.cat([draws.double(), y.double()[:, None]], 1), self.group,
                                     self.streams)
            draws, y = packed[:, :-1].float(), packed[:, -1].long()
        return self.augment(crops, draws), y


def share_plan(cfg, ctx, replicas):
    """--share-decode, a layout of one process per stream (train.py asks only then): (stream group, S, s)
    when the replica batch divides among the streams."""
    if not cfg.share_decode or ctx is None or ctx.streams < 2 or ctx.mesh is None:
        return None
    if (cfg.batch_size // replicas) % ctx.streams:
        return None                                # every stream decodes the whole batch, as before
    return ctx.stream_group, ctx.streams, ctx.stream_rank


def encoded_view(cfg, train_raw, channels, aug):
    """--decode gpu: the training set as file bytes, with the draws made in the workers."""
    from .augment import EncodedItem, paper_lighting
    from .data import encoded, paper_side
    if cfg.preprocess != "paper":
        raise UsageError("--decode gpu does the paper's input (shorter side, central square) on the device: "
                         "use it with --preprocess paper, or --decode cpu")
    light = paper_lighting(cfg.lighting, channels, cfg.lighting_pca)   # --lighting-pca's, as the CPU path
    return encoded(train_raw), EncodedItem(paper_side(cfg.image_size), cfg.image_size, crop=cfg.crop,
                                           flip=cfg.flip, lighting=light)


class DataBound:
    """Says once, after `after` steps, when waiting for data took more than `share` of the step time,
    and which knob helps."""

    def __init__(self, cfg, after=20, share=0.3):
        self.cfg, self.after, self.share = cfg, after, share
        self.data, self.step, self.n, self.said = 0.0, 0.0, 0, False

    def update(self, data_s, step_s):
        """One step's times; returns the line to say, once, or None."""
        self.n += 1
        if self.n <= 2:                            # the first steps start the workers and warm up
            return None
        self.data, self.step = self.data + data_s, self.step + step_s
        if self.said or self.n < self.after or self.data <= self.share * self.step:
            return None
        self.said = True
        cfg, per = self.cfg, self.step / (self.n - 2)
        knobs = [f"--workers {max(cfg.workers * 2, 2)} (now {cfg.workers}; {cores()} cores here, "
                 f"{env().local_world} rank(s) on this machine)"]
        if cfg.decode == "cpu" and torch.cuda.is_available():
            knobs.append("--decode gpu")
        knobs.append("pre-resized shards (python launch/prepare.py, docs/training.md)")
        return (f"data-bound: {100 * self.data / self.step:.0f}% of the step time ({1e3 * per:.0f} ms a step) "
                f"waits for data; try " + ", ".join(knobs))
