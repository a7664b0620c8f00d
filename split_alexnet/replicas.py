"""Streams x replicas: N processes hold N / S replicas of the S-stream split net (distributed.setup builds
the (replica, stream) DeviceMesh).

- Each replica takes its slice of the global batch: replica r the rows [r*b, (r+1)*b), b = B / replicas;
  every stream of one replica sees that same slice (ReplicaSampler loads only it).
- The exchanges run in the stream group (SplitAlexNet gets the group and its rank in it).
- Gradients are averaged over the replica group by DDP (bucketed, overlapped with backward). Each
  replica's loss is the mean over its b rows, so the mean over replicas of their gradients is the
  gradient of the mean over all B rows: the single layout's on the global batch.
- Dropout: every rank computes its rows of the GLOBAL batch's mask (B rows, the layer's full width) and its
  stream's columns (counter-based masks, model.keep_mask; the net is built with replica=r): the same
  neurons drop as in the single layout.
"""
import torch.nn as nn
from torch.utils.data import Sampler

from .data import EpochSampler
from .errors import UsageError
from .model import split_from_single


def replica_batch(batch_size, replicas):
    """b = B / replicas, or one line saying why not."""
    if batch_size % replicas:
        raise UsageError(f"--batch-size {batch_size} does not split over {replicas} replicas: use a multiple "
                         f"of {replicas}")
    return batch_size // replicas


def wrap_replicas(net, ctx, allreduce=True):
    """net (a SplitAlexNet on ctx's stream group, built with replica=ctx.replica) as one replica: DDP over
    the replica group so its gradients are averaged (allreduce=False leaves that out: the check's
    negative). The dropout counters advance alike on every replica: DDP broadcasts no buffers."""
    if net.replica != ctx.replica:
        raise ValueError(f"the net was built as replica {net.replica}, this rank is replica {ctx.replica}: "
                         f"build it with replica=ctx.replica (its rows of the dropout masks)")
    if ctx.replicas == 1 or not allreduce:
        return net
    kwargs = dict(device_ids=[ctx.device]) if ctx.device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(net, process_group=ctx.replica_group, broadcast_buffers=False,
                                               **kwargs)


def split_replica_from_single(model, ctx, device=None, allreduce=True):
    """This rank's stream of a single-layout AlexNet, as one replica of the mesh."""
    net = split_from_single(model, ctx.stream_rank, ctx.stream_group, device or ctx.device, replica=ctx.replica)
    return wrap_replicas(net, ctx, allreduce)


def unwrap(net):
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


class ReplicaSampler(Sampler):
    """The rows of replica `replica` in every global batch of EpochSampler's order: replicas never load
    the same image, and together they load exactly the global batches (`start` counts global items)."""

    def __init__(self, n, seed, epoch, batch_size, replicas, replica, start=0):
        self.base = EpochSampler(n, seed, epoch, start)
        self.batch, self.replicas, self.replica = batch_size, replicas, replica

    def __iter__(self):
        items = list(self.base)
        b = self.batch // self.replicas
        for k in range(len(items) // self.batch):        # whole global batches only (drop_last)
            yield from items[k * self.batch + self.replica * b:k * self.batch + (self.replica + 1) * b]

    def __len__(self):
        return len(self.base) // self.batch * (self.batch // self.replicas)
