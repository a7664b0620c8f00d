"""torch.profiler over the measured steps: a trace, an operator table and a per-step breakdown per rank.

Each step is a `step:<label>` range; the forward has a range per layer (`conv1` ... `fc8`) and per
exchange (`exchange:conv3`; in the overlap mode `exchange:conv3/start` and `/wait`); backward shows as
autograd's operator ranges. The breakdown aggregates each step's ranges with the profiler's own
`key_averages()`.

LRN's share of a step (`lrn_shares`): the forward is the time inside the step's "lrn" ranges (labelled
by the model itself, model.py's layer function, in every layout); the backward is every autograd node whose sequence
number is one of the ops run inside those ranges (the profiler gives a backward node the sequence number
of the forward op that made it: AvgPool3DBackward0, PowBackward0, DivBackward0, ... for
F.local_response_norm). Which clock is an argument (`device_time`, the bench's choice by device type):
- on CPU (device_time=False), the ranges' CPU (wall) times as the profiler measures them, over the
  step range's time;
- on CUDA (device_time=True), the profiler's device time: the kernels those ranges and nodes launched
  (FunctionEvent.device_time_total, their children's kernels included), over the device time of every
  kernel the step launched (its range's, and the backward nodes' on autograd's device thread). A CPU
  range on GPU holds only the launches, and whatever the host waited for meanwhile (on the H100 the
  host-timed share of 21 % included waiting for the convolutions): so the host clock is not used there.
The share is of the device's busy time in the step (idle gaps between kernels are not in it).
"""
import os

from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile

from ..labels import BACKWARD, LRN_LABEL
from ..spec import Spec

NO_LRN = -1.0  # the share of a step without any "lrn" range (reported as null, printed "n/a")


def start(device):
    """A started torch.profiler (CPU, and CUDA on GPU); pass it to stop()."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts)
    prof.__enter__()
    return prof


def clock_name(device_time):
    """What bench.json calls the clock of the LRN share: "profiler_device" or "profiler_cpu"."""
    return "profiler_device" if device_time else "profiler_cpu"


def stop(prof, out_dir, rank, device_time=False):
    """Stop and write trace_rank<r>.json, ops_rank<r>.txt (operator table), steps_rank<r>.txt.

    device_time: shares and tables from the kernels' device time (CUDA), else from CPU time.
    Returns {step label: [LRN's share of each profiled step of that label]} (lrn_shares)."""
    prof.__exit__(None, None, None)
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, f"trace_rank{rank}.json"))
    with open(os.path.join(out_dir, f"ops_rank{rank}.txt"), "w") as f:
        sort = "self_device_time_total" if device_time else "self_cpu_time_total"
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40))
    events = prof.events()
    shares = lrn_shares(events, device_time)
    with open(os.path.join(out_dir, f"steps_rank{rank}.txt"), "w") as f:
        f.write(steps_table(events, shares, device_time=device_time))
    return shares


def _total(event, device_time):
    """An event's time in microseconds: its kernels' device time (children's included), or CPU time."""
    return event.device_time_total if device_time else event.cpu_time_total


def _lrn_forward(step_event, device_time=False):
    """(seconds in the outermost "lrn" ranges under step_event, {(thread, sequence_nr)} of their ops)."""
    seconds, seqs, todo = 0.0, set(), list(step_event.cpu_children)
    while todo:
        e = todo.pop()
        if e.name == LRN_LABEL:
            seconds += _total(e, device_time) / 1e6
            inner = list(e.cpu_children)
            while inner:
                op = inner.pop()
                if op.sequence_nr >= 0:
                    seqs.add((op.thread, op.sequence_nr))
                inner.extend(op.cpu_children)
        else:
            todo.extend(e.cpu_children)
    return seconds, seqs


def lrn_shares(events, device_time=False):
    """{step label: [LRN forward + backward seconds / step seconds, per profiled step]}, NO_LRN for a
    step without any "lrn" range (torchvision's AlexNet; a model LRN the wrapper cannot see).

    Backward nodes are matched by (forward thread, sequence number) to the ops inside the step's "lrn"
    ranges, among the autograd nodes that ran while the step ran (on any thread: on GPU autograd runs
    backward on a device thread). device_time: seconds are the kernels' device time, and the step's is
    its range's kernels plus those of the backward nodes that ran on another thread (module docstring)."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    backward = [e for e in cpu if e.name.startswith(BACKWARD) and e.sequence_nr >= 0]
    out = {}
    for st in (e for e in cpu if e.name.startswith("step:")):
        fwd_s, seqs = _lrn_forward(st, device_time)
        if not seqs and fwd_s == 0.0:  # no "lrn" range in this step: no LRN, or one the bench cannot see
            out.setdefault(st.name[len("step:"):], []).append(NO_LRN)
            continue
        t0, t1 = st.time_range.start, st.time_range.end
        during = [e for e in backward if t0 <= e.time_range.start <= t1]
        bwd_s = sum(_total(e, device_time) for e in during if (e.fwd_thread, e.sequence_nr) in seqs) / 1e6
        step_s = _total(st, device_time) / 1e6
        if device_time:  # backward on autograd's device thread: not under the step's range
            step_s += sum(e.device_time_total for e in during if e.thread != st.thread) / 1e6
        out.setdefault(st.name[len("step:"):], []).append((fwd_s + bwd_s) / step_s if step_s else 0.0)
    return out


def _within(event):
    """The ranges nested inside `event` on its thread, as an EventList that key_averages() accepts."""
    out, todo = EventList(), list(event.cpu_children)
    while todo:
        e = todo.pop()
        out.append(e)
        todo.extend(e.cpu_children)
    out._tree_built = True  # a subtree of the profiler's built tree (EventList has no public setter)
    return out


def steps_table(events, shares=None, top=20, device_time=False):
    """Per profiled step: seconds in each forward layer, exchange, and backward operator (by name), on
    this thread (device_time: the kernels' device time, else CPU time)."""
    layers = {l.name for l in Spec().layers}
    attr = "device_time_total" if device_time else "cpu_time_total"
    lines, seen = [f"(seconds: {'the kernels device time' if device_time else 'CPU time'}, profiler)"], {}
    for st in (e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("step:")):
        totals = [a for a in _within(st).key_averages()
                  if a.key in layers or a.key.startswith(("exchange:", BACKWARD))]
        label = st.name[len("step:"):]
        i = seen[label] = seen.get(label, -1) + 1
        lrn = (shares or {}).get(label, [])
        lrn = (f"  (LRN {100 * lrn[i]:.1f} % of it, forward + backward)" if i < len(lrn) and lrn[i] >= 0
               else "  (no lrn range)" if i < len(lrn) else "")
        lines.append(f"{st.name}  {getattr(st, attr) / 1e6:.3f} s{lrn}")
        for a in sorted(totals, key=lambda a: -getattr(a, attr))[:top]:
            name = a.key.replace(BACKWARD, "backward: ")
            lines.append(f"  {name:<56}{getattr(a, attr) / 1e6:>8.3f}")
    return "\n".join(lines) + "\n"
