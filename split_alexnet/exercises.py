"""Teaching switches: deliberate mistakes for the exercises of docs/tutorial.md. Never used in training.

Each is a context manager that changes one rule while its block runs, so that `launch/check.py
--exercise NAME` can show what the check reports when that rule is broken:

- `keep-own-slice`:     the backward of `comm.gather_for_distinct_kernels` keeps this rank's slice of
                        the gradient instead of summing it over ranks (reduce-scatter). The forward is
                        unchanged. Only the split layout has this rule written down (the streams layout
                        gets it from autograd), so the switch applies to the split layout.
- `lrn-across-streams`: the single layout's local response normalisation spans all channels, as Caffe's
                        bvlc_alexnet does, instead of each stream's own (as cuda-convnet2 ran it). The
                        other layout keeps it per stream, so the two compute different functions.
"""
from contextlib import contextmanager

from . import comm
from .model import AlexNet

EXERCISES = ("keep-own-slice", "lrn-across-streams")


@contextmanager
def keep_own_slice():
    """While the block runs, gather_for_distinct_kernels's backward keeps its own slice (a bug)."""
    fn = comm._GatherForDistinctKernels
    original = fn.__dict__["backward"]

    def backward(ctx, grad):  # the rule of gather_for_same_computation, at the wrong place
        return comm._own_slice(grad, ctx.sizes, ctx.group, ctx.dim), None, None, None

    fn.backward = staticmethod(backward)
    try:
        yield
    finally:
        fn.backward = original


@contextmanager
def lrn_across_streams():
    """While the block runs, the single layout's LRN window may cross from one stream into the next."""
    AlexNet.lrn_across_streams = True
    try:
        yield
    finally:
        AlexNet.lrn_across_streams = False


def switch(name):
    """The context manager of exercise `name` (one of EXERCISES)."""
    if name not in EXERCISES:
        raise ValueError(f"--exercise {name}: use one of {', '.join(EXERCISES)}")
    return {"keep-own-slice": keep_own_slice, "lrn-across-streams": lrn_across_streams}[name]()
