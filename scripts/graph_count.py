"""How many graphs torch.compile makes of the single layout's forward: torch._dynamo.explain.

  python scripts/graph_count.py --device cuda --out graph_count.json
  python scripts/graph_count.py --device cpu --image-size 67 --batch-size 2   # the dry run

In train mode (dropout on) and in eval mode; prints the graph and break counts and each break's
reason (the fewer graphs, the more Inductor can fuse: one graph and no break is the goal).
Reports only: the count is what it is, the exit status is 0 unless explain itself fails.
"""
import argparse
import json
import os

import torch

from split_alexnet.cli import UsageError, log, run_main
from split_alexnet.model import AlexNet
from split_alexnet.spec import Spec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="where the net and its input live (default: cpu)")
    p.add_argument("--image-size", type=int, default=227)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--modes", default="train,eval", help="train (dropout on), eval, or both (the default)")
    p.add_argument("--out", default=None, metavar="JSON", help="write the counts here (default: none)")
    return p.parse_args(argv)


def explain(net, x):
    """(graphs, breaks, [break reasons]) of torch._dynamo.explain on net(x)."""
    import torch._dynamo
    torch._dynamo.reset()
    e = torch._dynamo.explain(net)(x)
    reasons = [str(getattr(b, "reason", b)).splitlines()[0] for b in e.break_reasons]
    return e.graph_count, e.graph_break_count, reasons


def main(argv=None):
    args = parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"train", "eval"}:
        raise UsageError(f"--modes {args.modes!r}: use train, eval or train,eval")
    try:
        spec = Spec(image_size=args.image_size)
        device = torch.device(args.device)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    torch.manual_seed(0)
    net = AlexNet(spec=spec).to(device)
    x = torch.randn(args.batch_size, 3, spec.image_size, spec.image_size, device=device)
    result = dict(device=str(device), torch=torch.__version__, image_size=spec.image_size, modes={})
    for mode in modes:
        net.train(mode == "train")
        graphs, breaks, reasons = explain(net, x)
        result["modes"][mode] = dict(graphs=graphs, breaks=breaks, reasons=reasons)
        log(f"single layout, {mode} mode: {graphs} graph(s), {breaks} break(s)")
        for r in sorted(set(reasons)):
            log(f"  {reasons.count(r)}x {r}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    run_main(main)
