"""Prepare an ImageNet-format folder for training: shorter side to 256, as a folder or tar shards.

  python launch/prepare.py /data/imagenet /data/imagenet-256                  # same layout, resized
  python launch/prepare.py /data/imagenet /data/imagenet-shards --shards 1000  # WebDataset-style shards
  python launch/prepare.py /data/imagenet /data/imagenet-256 --mean            # + the mean image (227 px)
  python launch/train.py --dataset imagefolder --data-dir /data/imagenet-256  # reads either form

SRC holds train/<class>/* and val/<class>/*. Runs on every core with a progress bar; interrupted
(Ctrl-C, a killed job), run it again: what was written is kept. See docs/training.md, "Training on ImageNet".
"""
import argparse
import os

from split_alexnet.cli import UsageError, run_main


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def main(argv=None):
    p = _Parser(description=__doc__, formatter_class=type("F", (argparse.RawDescriptionHelpFormatter,
                                                                argparse.ArgumentDefaultsHelpFormatter), {}))
    p.add_argument("src", help="an ImageNet-format folder: train/<class>/*, val/<class>/*")
    p.add_argument("dst", help="where the prepared data goes (made if missing; kept on a rerun)")
    p.add_argument("--side", type=int, default=256, help="the shorter side (the paper's 256)")
    p.add_argument("--shards", type=int, default=0, help="images per tar shard (0: a folder of JPEGs)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the resized images")
    p.add_argument("--workers", type=int, default=0, help="processes (0: every core)")
    p.add_argument("--mean", action="store_true", help="also compute the training set's mean image for "
                   "--preprocess paper, where the trainer looks for it")
    p.add_argument("--image-size", type=int, default=227, help="--mean: the run's --image-size")
    args = p.parse_args(argv)
    if args.side < 1 or args.shards < 0 or not 1 <= args.quality <= 100 or args.workers < 0:
        raise UsageError("--side must be >= 1, --shards and --workers >= 0, --quality 1 to 100")
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise UsageError("prepare: give a destination other than the source (the originals are kept)")
    from split_alexnet.prepare import prepare
    done = prepare(args.src, args.dst, side=args.side, shards=args.shards, workers=args.workers,
                   quality=args.quality)
    print(f"prepared {done['train']} training and {done['val']} validation images in {args.dst}"
          f" ({'shards of ' + str(args.shards) if args.shards else 'JPEG folders'}, shorter side {args.side})")
    if args.mean:
        from split_alexnet.data import Seeded, build_datasets, mean_image_path, paper_side
        from split_alexnet.loader import cores
        from split_alexnet.meanimage import run_mean_image
        train, _, _ = build_datasets("imagefolder", args.dst, seed=0)
        side = paper_side(args.image_size)
        path = mean_image_path("imagefolder", args.dst, side, 0, len(train))
        _, how = run_mean_image(path, Seeded(train, lambda img: img, 0), side, 3,
                                workers=args.workers or cores(), bar=True)
        print(f"mean image ({side} px): {how}")
    return 0


if __name__ == "__main__":
    run_main(main)
