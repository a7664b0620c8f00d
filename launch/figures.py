"""Regenerate the teaching figures from the spec (matplotlib, no GPU, a few seconds).

  python launch/figures.py                    # into docs/figures/
  python launch/figures.py --out /tmp/figs
  python launch/figures.py --timeline /tmp/prof   # figure 3 from the traces of launch/bench.py --profile /tmp/prof
"""
from pathlib import Path

from split_alexnet.cli import DefaultsHelp, Parser, UsageError, run_main
from split_alexnet.figures import write_all

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "figures"


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=DefaultsHelp)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write the PNGs into")
    p.add_argument("--timeline", type=Path, metavar="DIR", default=None,
                   help="draw only figure 3, one training step per rank, from DIR/trace_rank*.json "
                        "(torchrun --nproc_per_node=2 launch/bench.py --layouts split,split-overlap --profile DIR)")
    p.add_argument("--title", default=None, help="with --timeline: the figure's title (say what ran)")
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
        title = args.title or f"One training step per rank, from {args.timeline}/trace_rank*.json"
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
