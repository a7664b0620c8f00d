"""torch.profiler over the measured steps: a trace, an operator table and a per-step breakdown per rank.

Each step is a `step:<label>` range; the forward has a range per layer (`conv1` ... `fc8`) and per
exchange (`exchange:conv3`; in the overlap mode `exchange:conv3/start` and `/wait`); backward shows as
autograd's operator ranges. The breakdown aggregates each step's ranges with the profiler's own
`key_averages()`.
"""
import os

from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile

from ..spec import Spec

BACKWARD = "autograd::engine::evaluate_function: "


def start(device):
    """A started torch.profiler (CPU, and CUDA on GPU); pass it to stop()."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts)
    prof.__enter__()
    return prof


def stop(prof, out_dir, rank):
    """Stop and write trace_rank<r>.json, ops_rank<r>.txt (operator table), steps_rank<r>.txt."""
    prof.__exit__(None, None, None)
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, f"trace_rank{rank}.json"))
    with open(os.path.join(out_dir, f"ops_rank{rank}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    with open(os.path.join(out_dir, f"steps_rank{rank}.txt"), "w") as f:
        f.write(steps_table(prof.events()))


def _within(event):
    """The ranges nested inside `event` on its thread, as an EventList that key_averages() accepts."""
    out, todo = EventList(), list(event.cpu_children)
    while todo:
        e = todo.pop()
        out.append(e)
        todo.extend(e.cpu_children)
    out._tree_built = True  # a subtree of the profiler's built tree (EventList has no public setter)
    return out


def steps_table(events, top=20):
    """Per profiled step: seconds in each forward layer, exchange, and backward operator (by name)."""
    layers = {l.name for l in Spec().layers}
    lines = []
    for st in (e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("step:")):
        totals = [a for a in _within(st).key_averages()
                  if a.key in layers or a.key.startswith(("exchange:", BACKWARD))]
        lines.append(f"{st.name}  {st.cpu_time_total / 1e6:.3f} s")
        for a in sorted(totals, key=lambda a: -a.cpu_time_total)[:top]:
            name = a.key.replace(BACKWARD, "backward: ")
            lines.append(f"  {name:<56}{a.cpu_time_total / 1e6:>8.3f}")
    return "\n".join(lines) + "\n"
