"""Convert a checkpoint between layouts: join per-stream shards into a single-layout checkpoint, or cut
a single-layout checkpoint into shards (which the split and streams layouts load), or export the
weights alone.

  python launch/convert.py runs/RUN/checkpoints/step0000400 /tmp/single --to single
  python launch/convert.py /tmp/single /tmp/shards --to shards
  python launch/convert.py runs/RUN /tmp/alexnet.pt --to state_dict
Weights and the optimizer's state (SGD momentum) are cut along their output dimension, bit for bit; the
step, RNG and schedule state come along, so the converted checkpoint can be resumed (--resume) in the
other layout. --to state_dict writes one file, the single layout's weights and the spec (no optimizer,
dropout or RNG state), that loads with torch.load(weights_only=True) and nothing beside it:
  d = torch.load("/tmp/alexnet.pt", weights_only=True)
  net = AlexNet(spec=Spec(**d["spec"])); net.load_state_dict(d["state_dict"])
(split_alexnet.checkpoint.load_exported does both).
"""
import os

from split_alexnet import checkpoint as ckpt
from split_alexnet.cli import DefaultsHelp, Parser, UsageError, run_main


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=DefaultsHelp)
    p.add_argument("src", help="checkpoint directory (with meta.pt), or a run directory (its newest)")
    p.add_argument("dst", help="new checkpoint directory (--to state_dict: a new file, e.g. alexnet.pt)")
    p.add_argument("--to", choices=["single", "shards", "state_dict"], required=True)
    args = p.parse_args(argv)
    src = ckpt.find_checkpoint(args.src, "convert")
    if args.to == "state_dict":
        if os.path.exists(args.dst):
            raise UsageError(f"{args.dst} already exists: give a new file name (nothing is overwritten)")
        before = ckpt.read_meta(src)
        out = ckpt.export_state_dict(src, args.dst)
        print(f"wrote {args.dst} ({os.path.getsize(args.dst) / 2**20:.1f} MiB): the single layout's weights "
              f"({len(out['state_dict'])} tensors) and spec {out['spec']}, step {out['step']}, from {src} "
              f"({before['layout']} layout); load it with torch.load({args.dst!r}, weights_only=True) "
              f"(split_alexnet.checkpoint.load_exported)")
        return 0
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
    go_on = ("python launch/train.py --layout single" if ckpt.single_files(meta["layout"])
             else f"torchrun --nproc_per_node={meta['streams']} launch/train.py")
    return (f"wrote {', '.join(wrote)}: the {meta['layout']} layout ({meta['streams']} streams, step "
            f"{meta['step']}), from {src} ({before['layout']} layout: {', '.join(before['files'])}); "
            f"go on with: {go_on} --resume {dst}")


if __name__ == "__main__":
    run_main(main)
