"""Print the per-stream layer table (shapes, parameters, neurons and exchange bytes, from the spec), the
crossover batch against data parallelism, the compute (forward multiply-adds per layer and in total,
the conv/fc split of compute and parameters, multiply-adds per byte at each exchange) and the
alternatives costed (row-parallel conv3, Megatron's fc6/fc7, data parallelism, the 2014 hybrid); or
with --trace the shape after every step of a real forward pass, per stream.

  python launch/summary.py                                   # the paper: 2 streams, 227 px, 1000 classes
  python launch/summary.py --in-channels 1 --num-classes 10 --image-size 224   # Fashion-MNIST, d2l's size
  python launch/summary.py --trace                           # a dummy image through the model, step by step
  python launch/summary.py --trace --layout single --image-size 67
  python launch/summary.py --reads conv4=all                 # another connectivity: bytes and parameters
  python launch/summary.py --streams 4 --precision bf16      # where the bytes go, and the crossover batch
  python launch/summary.py --net half                        # the paper's one-GPU comparison net (§3.2)
"""

from split_alexnet import flags
from split_alexnet.cli import DefaultsHelp, Parser, run_main
from split_alexnet.precision import dtype_bytes
from split_alexnet.spec import default_streams, spec_or_usage_error
from split_alexnet.summary import LAYOUTS, summary_table, trace_table


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=DefaultsHelp)
    flags.add_net(p, "paper: the two-GPU net; half: the paper's one-GPU comparison net (§3.2), one stream")
    flags.add_streams(p, "default: 2 (--net half: 1)")
    flags.add_image_size(p)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128, help="for the bytes-per-batch column")
    p.add_argument("--trace", action="store_true",
                   help="run a dummy (1, C, H, W) image through the model and print every step's output "
                        "shape, per stream (builds the model: a few seconds at 227 px)")
    p.add_argument("--layout", choices=LAYOUTS, default="streams",
                   help="with --trace: single (one module), streams (one module per stream) or split "
                        "(the per-rank view, shown in one process)")
    p.add_argument("--reads", default="", metavar="LAYER=own|all,...",
                   help="change what conv2..conv5 read, e.g. conv4=all (an exchange before conv4); "
                        "the paper's: conv3=all, the others own")
    flags.add_precision(p, "the activations' dtype, which sizes every exchange (gradients stay fp32)")
    args = p.parse_args(argv)
    fields = dict(streams=default_streams(args.streams, args.net), image_size=args.image_size,
                  in_channels=args.in_channels, num_classes=args.num_classes,
                  dtype_bytes=dtype_bytes(args.precision), net=args.net)
    paper, spec = spec_or_usage_error(**fields), spec_or_usage_error(args.reads, **fields)
    print(trace_table(spec, args.layout) if args.trace else summary_table(spec, args.batch_size))
    if spec != paper and not args.trace:
        print(f"\nagainst the paper's connectivity: {spec.params_total - paper.params_total:+,} parameters, "
              f"{spec.bytes_per_image() - paper.bytes_per_image():+,} B per image sent forward by each stream, "
              f"{len(spec.exchanges) - len(paper.exchanges):+d} exchange(s)")
    return 0


if __name__ == "__main__":
    run_main(main)
