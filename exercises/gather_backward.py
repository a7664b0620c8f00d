"""Exercise: write the backward of the gather before conv3, fc6, fc7 and fc8 (docs/tutorial.md).

Copy this file, write the body, and let the check grade it:

    cp exercises/gather_backward.py /tmp/gather_backward.py
    torchrun --nproc_per_node=2 launch/check.py --image-size 67 --num-classes 10 --gather-backward /tmp/gather_backward.py

The forward, on every rank r: y = all-gather of every rank's x along `dim` (stream order), and y feeds
rank r's OWN kernels (conv3: its 192 of the 384). So the `grad` that reaches this function on rank r is
dL/dy as rank r's kernels see it: rank r's term of the chain rule, for every rank's part of y.

Return dL/dx for THIS rank's x: shape grad.shape with `dim` cut to sizes[rank].
`torch.distributed` is initialised; `dist.get_rank(group)` is this rank; pass `group=group` to any
collective you call. The answer is in docs/solutions.md: try first.
"""
import torch  # noqa: F401  (you will need them)
import torch.distributed as dist  # noqa: F401


def backward(grad, sizes, group, dim):
    """grad: (B, sum(sizes), ...) for dim 1; return this rank's gradient, (B, sizes[rank], ...)."""
    raise NotImplementedError("the body of backward is still to be written: see the docstring above")
