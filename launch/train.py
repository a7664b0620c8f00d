"""Train the 2012 two-stream AlexNet.

  torchrun --nproc_per_node=2 launch/train.py          # split: one process per stream, shapes data set
  torchrun --nproc_per_node=4 launch/train.py --streams 2   # 2 replicas of the 2-stream net (docs/scaling.md)
  python launch/train.py --layout single               # the whole net in one process (grouped convs)
  python launch/train.py --layout streams              # every stream in this process
  torchrun --nproc_per_node=2 launch/train.py --dataset mnist --data-dir DIR
See docs/training.md and --help.
"""
from split_alexnet.cli import run_main
from split_alexnet.config import parse_config
from split_alexnet.distributed import setup, teardown
from split_alexnet.train import build, run


def main(argv=None):
    cfg = parse_config(argv)
    ctx = setup(cfg.backend or None, cfg.device or None, cfg.timeout, cfg.streams) if cfg.layout == "split" else None
    try:
        job = build(cfg, ctx)
        run(job)
        return 0
    finally:
        teardown()


if __name__ == "__main__":
    run_main(main)
