"""The one home of the profiler label names: the ranges the model opens and the bench and timeline read."""
LRN_LABEL = "lrn"  # the range around each LRN call
BACKWARD = "autograd::engine::evaluate_function: "  # the prefix autograd gives each backward node


def exchange_label(name):
    """The range name of the exchange `name` (read back by its "exchange:" prefix)."""
    return f"exchange:{name}"


def label(name):
    """A profiler range named `name`; costs nothing when no profiler is active."""
    from torch.profiler import record_function  # here, so the timeline reads names without torch
    return record_function(name)
