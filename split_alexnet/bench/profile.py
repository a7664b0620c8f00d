"""torch.profiler over the measured steps: a trace, an operator table and a per-step breakdown per rank.

Each step is a `step:<label>` range; the forward has a range per layer (`conv1` ... `fc8`) and per
exchange (`exchange:conv3`; in the overlap mode `exchange:conv3/start` and `/wait`); backward shows as
autograd's operator ranges. The breakdown aggregates each step's ranges with the profiler's own
`key_averages()`.

LRN's share of a step (`lrn_shares`): the forward is the time inside the step's "lrn" ranges (labelled
by layouts.lrn_labelled, or by the model itself); the backward is every autograd node whose sequence
number is one of the ops run inside those ranges (the profiler gives a backward node the sequence number
of the forward op that made it: AvgPool3DBackward0, PowBackward0, DivBackward0, ... for
F.local_response_norm). Both are CPU (wall) times of the ranges, as the profiler measures them, over
the step range's time. On GPU that is the CPU side (launches) only: read the trace's kernels there.
"""
import os

from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile

from ..spec import Spec

BACKWARD = "autograd::engine::evaluate_function: "
LRN_LABEL = "lrn"
NO_LRN = -1.0  # the share of a step without any "lrn" range (reported as null, printed "n/a")


def start(device):
    """A started torch.profiler (CPU, and CUDA on GPU); pass it to stop()."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts)
    prof.__enter__()
    return prof


def stop(prof, out_dir, rank):
    """Stop and write trace_rank<r>.json, ops_rank<r>.txt (operator table), steps_rank<r>.txt.

    Returns {step label: [LRN's share of each profiled step of that label]} (lrn_shares)."""
    prof.__exit__(None, None, None)
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, f"trace_rank{rank}.json"))
    with open(os.path.join(out_dir, f"ops_rank{rank}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    events = prof.events()
    shares = lrn_shares(events)
    with open(os.path.join(out_dir, f"steps_rank{rank}.txt"), "w") as f:
        f.write(steps_table(events, shares))
    return shares


def _lrn_forward(step_event):
    """(seconds in the outermost "lrn" ranges under step_event, {(thread, sequence_nr)} of their ops)."""
    seconds, seqs, todo = 0.0, set(), list(step_event.cpu_children)
    while todo:
        e = todo.pop()
        if e.name == LRN_LABEL:
            seconds += e.cpu_time_total / 1e6
            inner = list(e.cpu_children)
            while inner:
                op = inner.pop()
                if op.sequence_nr >= 0:
                    seqs.add((op.thread, op.sequence_nr))
                inner.extend(op.cpu_children)
        else:
            todo.extend(e.cpu_children)
    return seconds, seqs


def lrn_shares(events):
    """{step label: [LRN forward + backward seconds / step seconds, per profiled step]}, NO_LRN for a
    step without any "lrn" range (torchvision's AlexNet; a model LRN the wrapper cannot see).

    Backward nodes are matched by (forward thread, sequence number) to the ops inside the step's "lrn"
    ranges, among the autograd nodes that ran while the step ran (on any thread: on GPU autograd runs
    backward on a device thread)."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    backward = [e for e in cpu if e.name.startswith(BACKWARD) and e.sequence_nr >= 0]
    out = {}
    for st in (e for e in cpu if e.name.startswith("step:")):
        fwd_s, seqs = _lrn_forward(st)
        if not seqs and fwd_s == 0.0:  # no "lrn" range in this step: no LRN, or one the bench cannot see
            out.setdefault(st.name[len("step:"):], []).append(NO_LRN)
            continue
        t0, t1 = st.time_range.start, st.time_range.end
        bwd_s = sum(e.cpu_time_total for e in backward if t0 <= e.time_range.start <= t1
                    and (e.fwd_thread, e.sequence_nr) in seqs) / 1e6
        step_s = st.cpu_time_total / 1e6
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


def steps_table(events, shares=None, top=20):
    """Per profiled step: seconds in each forward layer, exchange, and backward operator (by name)."""
    layers = {l.name for l in Spec().layers}
    lines, seen = [], {}
    for st in (e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("step:")):
        totals = [a for a in _within(st).key_averages()
                  if a.key in layers or a.key.startswith(("exchange:", BACKWARD))]
        label = st.name[len("step:"):]
        i = seen[label] = seen.get(label, -1) + 1
        lrn = (shares or {}).get(label, [])
        lrn = (f"  (LRN {100 * lrn[i]:.1f} % of it, forward + backward)" if i < len(lrn) and lrn[i] >= 0
               else "  (no lrn range)" if i < len(lrn) else "")
        lines.append(f"{st.name}  {st.cpu_time_total / 1e6:.3f} s{lrn}")
        for a in sorted(totals, key=lambda a: -a.cpu_time_total)[:top]:
            name = a.key.replace(BACKWARD, "backward: ")
            lines.append(f"  {name:<56}{a.cpu_time_total / 1e6:>8.3f}")
    return "\n".join(lines) + "\n"
