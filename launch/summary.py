"""Print the per-stream layer table: shapes, parameters, neurons and exchange bytes, from the spec.

  python launch/summary.py                                   # the paper: 2 streams, 227 px, 1000 classes
  python launch/summary.py --in-channels 1 --num-classes 10 --image-size 224   # the seed's Fashion-MNIST
"""
import argparse

from split_alexnet.cli import UsageError, run_main
from split_alexnet.spec import Spec
from split_alexnet.summary import summary_table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--image-size", type=int, default=227)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128, help="for the bytes-per-batch column")
    args = p.parse_args(argv)
    try:
        spec = Spec(streams=args.streams, image_size=args.image_size, in_channels=args.in_channels,
                    num_classes=args.num_classes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(summary_table(spec, args.batch_size))
    return 0


if __name__ == "__main__":
    run_main(main)
