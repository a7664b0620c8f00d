"""Regenerate the teaching figures from the spec (matplotlib, no GPU, a few seconds).

  python launch/figures.py                    # into docs/figures/
  python launch/figures.py --out /tmp/figs
  python launch/figures.py --timeline /tmp/prof   # figure 3 from the traces of launch/bench.py --profile /tmp/prof
"""
from pathlib import Path

from split_alexnet.cli import DefaultsHelp, Parser, UsageError, run_main
from split_alexnet.figures import write_all

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "figures"


def timeline_title(trace_dir):
    """What ran, from the bench.json beside the traces (the bench's --out): device, ranks, threads, size,
    steps, date and the load average the bench saw; else the traces' folder."""
    import json

    from split_alexnet.bench.plot import describe, wrap_title
    path = Path(trace_dir) / "bench.json"
    if not path.is_file():
        return f"One training step per rank, from {trace_dir}/trace_rank*.json"
    result = json.loads(path.read_text())
    load = result.get("load_average_before")          # os.getloadavg(): 1, 5 and 15 minutes
    load = f"; load average {', '.join(f'{x:.1f}' for x in load)} before" if load else ""
    text = f"One training step per rank; {describe(result)}{load}"
    return wrap_title(text, 13, fontsize=10.5)


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=DefaultsHelp)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write the PNGs into")
    p.add_argument("--timeline", type=Path, metavar="DIR", default=None,
                   help="draw only figure 3, one training step per rank, from DIR/trace_rank*.json "
                        "(torchrun --nproc_per_node=2 launch/bench.py --layouts split,split-overlap --profile DIR)")
    p.add_argument("--title", default=None, help="with --timeline: the figure's title (default: what ran and "
                   "the load average, from the bench.json beside the traces)")
    args = p.parse_args(argv)
    if args.timeline is not None:
        from split_alexnet.figures import save
        from split_alexnet.timeline import draw_timeline, load, timeline
        try:
            lanes = timeline(load(args.timeline))
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
        for layout, ranks in lanes.items():
            for l in ranks:
                print(f"{layout:<14} rank {l.rank}: step {l.end - l.start:7.1f} ms, compute "
                      f"{l.total('compute'):7.1f}, transfer {l.total('transfer'):6.1f}, waiting for the peer "
                      f"{l.total('wait'):6.1f}")
        title = args.title or timeline_title(args.timeline)
        path = args.out / "timeline.png"
        args.out.mkdir(parents=True, exist_ok=True)
        save(draw_timeline(lanes, title), path)
        print(f"wrote {path}")
        return 0
    for path in write_all(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
