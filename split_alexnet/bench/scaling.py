"""Bytes per step of every multi-process layout, from the spec, as a line in the global batch B:

    bytes(B) = fixed + per_image * B          (what ONE rank sends per step, forward + backward)

W processes; the split net has S streams (split: S = W; mesh: R = W / S replicas of it):

    split    fixed 0;                          per_image = the exchanges' bytes (spec.exchanges, fwd + bwd)
    ddp      fixed 2 (W-1)/W * 4 P;            per_image 0          (P: all parameters, fp32 gradients)
    mesh     fixed 2 (R-1)/R * 4 P_S;          per_image = the S-stream exchanges / R    (P_S: one stream's)
    hybrid   fixed 2 (W-1)/W * 4 P_conv;       per_image = fc6's batch exchange (2 (W-1)/W * 9216 * d)
                                                           + fc7, fc8, logits over W shares (hybrid.py)

Each layout sends the fewest bytes where its line is the lowest: cheapest_ranges finds those ranges.
"""
from ..layouts import LAYOUTS
from ..layouts import get as get_layout

MULTI = tuple(n for n, e in LAYOUTS.items() if e.line and e.scaled)   # split, hybrid, ddp, mesh


def line(layout, spec, world, streams=2):
    """(fixed bytes, bytes per image of the global batch) one rank sends per step (the layout's line,
    layouts.py; none for one process); spec: the net's spec at any stream count (its image size and dtype
    are used)."""
    entry = get_layout(layout, "--layouts")
    return entry.line(spec, world, streams) if entry.line else (0.0, 0.0)


def bytes_at(layout, spec, world, batch, streams=2):
    fixed, per = line(layout, spec, world, streams)
    return fixed + per * batch


def cheapest_ranges(spec, world, streams=2, layouts=MULTI, max_batch=1 << 16):
    """{layout: (first B, last B)} where it sends the fewest bytes of `layouts` (B from 1 to max_batch;
    last None: every larger B too; a layout never cheapest is left out)."""
    lines = {l: line(l, spec, world, streams) for l in layouts}
    best, out = None, {}
    for b in range(1, max_batch + 1):
        cheapest = min(lines, key=lambda l: (lines[l][0] + lines[l][1] * b, layouts.index(l)))
        if cheapest != best:
            out[cheapest] = [b, None]
            if best is not None:
                out[best][1] = b - 1
            best = cheapest
    return {k: tuple(v) for k, v in out.items()}


def format_bytes_table(spec, world, streams=2, batch=None, layouts=MULTI):
    """The lines, the bytes at `batch`, and where each layout is cheapest: printed by the bench."""
    replicas = world // streams
    names = {"split": f"split ({world} streams)", "mesh": f"mesh ({replicas} x {streams})",
             "hybrid": f"hybrid (W={world})", "ddp": f"ddp (W={world})"}
    lines = [f"bytes per step per rank, from the spec ({spec.image_size} px, {spec.dtype_bytes}-byte activations, "
             f"fp32 gradients; B = global batch)"]
    for l in layouts:
        fixed, per = line(l, spec, world, streams)
        at = f"{bytes_at(l, spec, world, batch, streams) / 2**20:>10,.2f} MB at B={batch}" if batch else ""
        lines.append(f"  {names[l]:<22}{fixed / 2**20:>10,.2f} MB + {per / 2**10:>9,.2f} KB x B  {at}")
    for l, (lo, hi) in cheapest_ranges(spec, world, streams, tuple(layouts)).items():
        lines.append(f"  fewest bytes: {names[l]:<22} for {lo} <= B" + (f" <= {hi}" if hi else ""))
    return "\n".join(lines)
