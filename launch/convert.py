"""Convert a checkpoint between layouts: join per-stream shards into a single-layout checkpoint, or cut
a single-layout checkpoint into shards (which the split and streams layouts load).

  python launch/convert.py runs/RUN/checkpoints/step0000400 /tmp/single --to single
  python launch/convert.py /tmp/single /tmp/shards --to shards
Weights and SGD momentum buffers are cut along their output dimension, bit for bit; the step, RNG and
schedule state come along, so the converted checkpoint can be resumed (--resume) in the other layout.
"""
import argparse
import os

from split_alexnet import checkpoint as ckpt
from split_alexnet.cli import UsageError, run_main


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def main(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory (with meta.pt), or a run directory (its newest)")
    p.add_argument("dst", help="new checkpoint directory")
    p.add_argument("--to", choices=["single", "shards"], required=True)
    args = p.parse_args(argv)
    src = ckpt.find_checkpoint(args.src, "convert")
    if os.path.exists(os.path.join(args.dst, "meta.pt")):
        raise UsageError(f"{args.dst} already holds a checkpoint: give a new directory (nothing is overwritten)")
    before = ckpt.read_meta(src)
    meta = (ckpt.join if args.to == "single" else ckpt.cut)(src, args.dst)
    print(converted_message(src, before, args.dst, meta))
    return 0


def converted_message(src, before, dst, meta):
    """What was written (paths and sizes), from what, and how to go on with it."""
    wrote = [f"{os.path.join(dst, n)} ({size / 2**20:.1f} MiB)" for n, size in meta["files"].items()]
    wrote.append(os.path.join(dst, "meta.pt"))
    go_on = ("python launch/train.py --layout single" if meta["layout"] == "single"
             else f"torchrun --nproc_per_node={meta['streams']} launch/train.py")
    return (f"wrote {', '.join(wrote)}: the {meta['layout']} layout ({meta['streams']} streams, step "
            f"{meta['step']}), from {src} ({before['layout']} layout: {', '.join(before['files'])}); "
            f"go on with: {go_on} --resume {dst}")


if __name__ == "__main__":
    run_main(main)
