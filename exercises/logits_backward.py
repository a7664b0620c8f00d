"""Exercise: write the backward of the logits' gather (docs/tutorial.md).

Copy this file, write the body, and let the check grade it:

    cp exercises/logits_backward.py /tmp/logits_backward.py
    torchrun --nproc_per_node=2 launch/check.py --image-size 67 --num-classes 10 --logits-backward /tmp/logits_backward.py

The forward, on every rank r: z = all-gather of every rank's part of fc8's output (its classes) along
dim 1, and every rank computes the SAME loss from the whole z. So the `grad` that reaches this function
on rank r is dL/dz, as every rank computed it.

Return dL/dx for THIS rank's part of the logits: shape grad.shape with dim 1 cut to sizes[rank] (the parts
may differ when the classes do not divide by the streams). `torch.distributed` is initialised;
`dist.get_rank(group)` is this rank; pass `group=group` to any collective you call. The answer is in
docs/solutions.md: try first.
"""
import torch  # noqa: F401  (you may need them)
import torch.distributed as dist  # noqa: F401


def backward(grad, sizes, group, dim):
    """grad: (B, sum(sizes)); return this rank's gradient, (B, sizes[rank])."""
    raise NotImplementedError("the body of backward is still to be written: see the docstring above")
