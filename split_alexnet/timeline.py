"""Figure 3: one training step per rank, read from the bench's profiler traces (`launch/bench.py
--profile DIR` writes DIR/trace_rank<r>.json); `python launch/figures.py --timeline DIR` draws it.

Three lanes per rank, for each layout profiled (split and split-overlap one above the other):

- **compute**: the rank's main thread, forward (up to the logits' exchange), backward, optimizer (SGD's
  step) and zero_grad (what follows the step: the bench's step ends with `opt.zero_grad()`); the
  gaps are the time the thread was **blocked in an exchange** (inside `exchange:<name>` or its
  `/start`, `/wait` ranges in the forward, inside the backward of a comm Function);
- **transfer**: the collective's own work on gloo's threads (`gloo:all_gather`, `gloo:all_reduce` for
  the reduce-scatter), from the moment both ranks had issued it;
- **waiting for the peer**: from this rank issuing a collective (`c10d::allgather_`,
  `c10d::reduce_scatter_` on its main thread) to the other rank issuing the same one. Collectives are
  issued in the same order on every rank, so the j-th of one rank's step is the j-th of the other's;
  both traces carry timestamps of the same clock (one machine).

On GPU (NCCL) the transfer runs as kernels on the device; the CPU-side ranges read here then show only
the launches, so the transfer lane stays empty and the trace viewer (Perfetto) is the place to look.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from .labels import BACKWARD

ISSUE = ("c10d::allgather_", "c10d::reduce_scatter_", "c10d::allgather_into_tensor_coalesced",
         "c10d::reduce_scatter_tensor_coalesced")
WORK = ("gloo:all_gather", "gloo:all_reduce", "gloo:reduce_scatter")
KIND = {"allgather": "all-gather", "reduce_scatter": "reduce-scatter"}


@dataclass
class Lanes:
    """One rank's step, in ms from the step's start (the earliest rank's)."""
    rank: int
    layout: str
    start: float = 0.0
    end: float = 0.0
    compute: list = field(default_factory=list)   # (t0, t1, "forward" | "backward" | "optimizer" | "zero_grad")
    blocked: list = field(default_factory=list)   # (t0, t1, range name)
    transfer: list = field(default_factory=list)  # (t0, t1, "all-gather" | "reduce-scatter")
    wait: list = field(default_factory=list)      # (t0, t1, "all-gather" | "reduce-scatter")

    def total(self, lane):
        return sum(t1 - t0 for t0, t1, _ in getattr(self, lane))


def load(trace_dir):
    """{rank: [complete events]} from trace_rank<r>.json in trace_dir."""
    out = {}
    for path in sorted(Path(trace_dir).glob("trace_rank*.json")):
        rank = int(path.stem[len("trace_rank"):])
        out[rank] = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
    if not out:
        raise FileNotFoundError(f"no trace_rank*.json in {trace_dir}: write them with "
                                f"torchrun --nproc_per_node=2 launch/bench.py --profile {trace_dir} ...")
    return out


def _merged(intervals):
    """The union of (t0, t1) intervals as sorted, disjoint ones."""
    out = []
    for t0, t1 in sorted(intervals):
        if out and t0 <= out[-1][1]:
            out[-1][1] = max(out[-1][1], t1)
        else:
            out.append([t0, t1])
    return [tuple(i) for i in out]


def _minus(span, holes):
    """The parts of span (t0, t1) outside the (sorted, disjoint) holes."""
    out, t = [], span[0]
    for h0, h1 in holes:
        if h0 > t:
            out.append((t, min(h0, span[1])))
        t = max(t, h1)
    if t < span[1]:
        out.append((t, span[1]))
    return [(a, b) for a, b in out if b > a]


def _blocked(name):
    return name.startswith("exchange:") or (name.startswith(BACKWARD) and "Gather" in name)


def _one_rank(events, step):
    """(blocked intervals, compute intervals with phase, issues [(t, kind)], works [(t0, t1)]) in us."""
    t0, t1, tid = step["ts"], step["ts"] + step["dur"], step["tid"]
    inside = [e for e in events if t0 <= e["ts"] <= t1]
    main = [e for e in inside if e["tid"] == tid]
    blocked = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in main if _blocked(e["name"])]
    holes = _merged((a, b) for a, b, _ in blocked)
    fwd_end = max((e["ts"] + e["dur"] for e in main if e["name"].startswith("exchange:logits")), default=t0)
    opt = [(e["ts"], e["ts"] + e["dur"]) for e in main if e["name"].startswith("Optimizer.step")]
    opt_end = max((b for _, b in opt), default=float("inf"))   # after SGD's step: zero_grad, not backward
    compute = []
    for a, b in _minus((t0, t1), holes):
        for c0, c1, phase in ((a, min(b, fwd_end), "forward"), (max(a, fwd_end), b, "backward")):
            if c1 <= c0:
                continue
            cuts = sorted(set([c0, c1] + [x for o in opt for x in o if c0 < x < c1]))
            for x0, x1 in zip(cuts, cuts[1:]):
                in_opt = any(o0 <= x0 and x1 <= o1 for o0, o1 in opt)
                compute.append((x0, x1, "optimizer" if in_opt else "zero_grad" if x0 >= opt_end else phase))
    issues = sorted((e["ts"], e["name"]) for e in main if e["name"] in ISSUE)
    issues = [(t, next(v for k, v in KIND.items() if k in n)) for t, n in issues]
    works = sorted((e["ts"], e["ts"] + e["dur"]) for e in inside if e["tid"] != tid and e["name"] in WORK)
    return blocked, compute, issues, works


def timeline(traces, layouts=("split", "split-overlap"), which=-1):
    """{layout: [Lanes per rank]} for one profiled step of each layout (`which`: the last by default)."""
    out = {}
    for layout in layouts:
        steps = {r: [e for e in ev if e["name"] == f"step:{layout}"] for r, ev in traces.items()}
        if not all(steps.values()):
            continue
        chosen = {r: s[which] for r, s in steps.items()}
        origin = min(s["ts"] for s in chosen.values())
        parts = {r: _one_rank(traces[r], chosen[r]) for r in traces}
        n = min(len(p[2]) for p in parts.values())
        arrive = [max(parts[r][2][j][0] for r in parts) for j in range(n)]  # the last rank to issue

        def ms(t):
            return (t - origin) / 1000

        lanes = []
        for r in sorted(parts):
            blocked, compute, issues, works = parts[r]
            lane = Lanes(r, layout, ms(chosen[r]["ts"]), ms(chosen[r]["ts"] + chosen[r]["dur"]))
            lane.blocked = [(ms(a), ms(b), name) for a, b, name in blocked]
            lane.compute = [(ms(a), ms(b), phase) for a, b, phase in compute]
            for j, (t, kind) in enumerate(issues[:n]):
                if arrive[j] > t:
                    lane.wait.append((ms(t), ms(arrive[j]), kind))
                # the gloo work this issue started (one or more ranges, on gloo's threads): those that
                # begin after it and before this rank's next issue; transfer from when both had issued
                nxt = issues[j + 1][0] if j + 1 < len(issues) else float("inf")
                mine = [(max(a, arrive[j]), b) for a, b in works if t <= a < nxt and b > arrive[j]]
                lane.transfer += [(ms(a), ms(b), kind) for a, b in _merged(mine)]
            lanes.append(lane)
        out[layout] = lanes
    if not out:
        raise ValueError(f"the traces hold no step of {', '.join(layouts)}: profile them with "
                         f"launch/bench.py --layouts {','.join(layouts)} --profile DIR")
    return out


COLOURS = {"forward": "#1f77b4", "backward": "#2ca02c", "optimizer": "#9467bd", "zero_grad": "#e377c2",
           "blocked": "#dddddd",
           "all-gather": "#ff7f0e", "reduce-scatter": "#8c564b", "wait": "#d62728"}


def draw_timeline(lanes_by_layout, title=""):
    """Figure 3: the layouts one above the other, three lanes per rank, one time axis (ms)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layouts = list(lanes_by_layout)
    fig, axes = plt.subplots(len(layouts), 1, figsize=(13, 2.1 + 2.3 * len(layouts)), sharex=True,
                             squeeze=False)
    right = max(l.end for lanes in lanes_by_layout.values() for l in lanes)
    for ax, layout in zip(axes[:, 0], layouts):
        ticks, names = [], []
        for i, lane in enumerate(lanes_by_layout[layout]):
            base = i * 3.6
            rows = ((base, f"rank {lane.rank} compute"), (base + 1, f"rank {lane.rank} transfer"),
                    (base + 2, f"rank {lane.rank} waits for peer"))  # top to bottom (inverted axis)
            for y, name in rows:
                ticks.append(y)
                names.append(name)
            y_c, y_t, y_w = (r[0] for r in rows)
            ax.broken_barh([(a, b - a) for a, b, _ in lane.blocked], (y_c - 0.4, 0.8),
                           facecolors=COLOURS["blocked"], hatch="////", edgecolor="#aaaaaa", linewidth=0)
            for phase in ("forward", "backward", "optimizer", "zero_grad"):
                ax.broken_barh([(a, b - a) for a, b, p in lane.compute if p == phase], (y_c - 0.4, 0.8),
                               facecolors=COLOURS[phase])
            for kind in ("all-gather", "reduce-scatter"):
                ax.broken_barh([(a, b - a) for a, b, k in lane.transfer if k == kind], (y_t - 0.4, 0.8),
                               facecolors=COLOURS[kind])
            ax.broken_barh([(a, b - a) for a, b, _ in lane.wait], (y_w - 0.4, 0.8), facecolors=COLOURS["wait"])
        ax.set_yticks(ticks, names, fontsize=9)
        ax.invert_yaxis()  # rank 0 on top
        ax.set_xlim(0, right * 1.01)
        ax.grid(axis="x", color="#eeeeee")
        ax.set_axisbelow(True)
        stats = "\n".join(f"rank {l.rank}: step {l.end - l.start:.0f} ms; compute {l.total('compute'):.0f}, "
                           f"blocked in exchanges {_covered(l.blocked):.0f}, transfer {l.total('transfer'):.0f}, "
                           f"waiting for the peer {l.total('wait'):.0f}" for l in lanes_by_layout[layout])
        ax.set_title(layout, fontsize=12, loc="left", weight="bold")
        ax.set_title(stats, fontsize=8.5, loc="right")
    axes[-1, 0].set_xlabel("ms from the start of the step (the earlier rank's)")
    handles = [Patch(facecolor=COLOURS[k], label=k) for k in ("forward", "backward", "optimizer", "zero_grad")]
    handles += [Patch(facecolor=COLOURS["blocked"], hatch="////", edgecolor="#aaaaaa",
                      label="main thread blocked in an exchange")]
    handles += [Patch(facecolor=COLOURS[k], label=f"transfer: {k}") for k in ("all-gather", "reduce-scatter")]
    handles += [Patch(facecolor=COLOURS["wait"], label="waiting for the peer to issue")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0))
    fig.suptitle(title or "One training step per rank", fontsize=10.5, y=0.995, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.1 / len(layouts), 1, 1 - 0.07 / len(layouts)))
    return fig


def _covered(intervals):
    """The total length of the union of (t0, t1, kind) intervals (overlaps counted once)."""
    return sum(b - a for a, b in _merged((a, b) for a, b, _ in intervals))
