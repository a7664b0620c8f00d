"""Train the 2012 two-stream AlexNet.

  torchrun --nproc_per_node=2 launch/train.py          # split: one process per stream, shapes data set
  torchrun --nproc_per_node=4 launch/train.py --streams 2   # 2 replicas of the 2-stream net (docs/scaling.md)
  python launch/train.py --layout single               # the whole net in one process (grouped convs)
  python launch/train.py --layout streams              # every stream in this process
  torchrun --nproc_per_node=2 launch/train.py --layout hybrid   # conv data parallel, fc model parallel (2014)
  torchrun --nproc_per_node=2 launch/train.py --dataset mnist --data-dir DIR
  torchrun --nproc_per_node=2 launch/train.py --micro-batches 1   # the plain split (default: 2, overlapped)
  python launch/train.py --layout single --device cuda --precision bf16 --channels-last --compile
  torchrun --nproc_per_node=2 launch/train.py --config run.toml --out runs/a --save-every 500
      # run again, the same command continues runs/a from its newest checkpoint (a restart, a requeue)
SIGTERM or SIGUSR1: every rank stops at the next step with a checkpoint, exit status 75 (EX_TEMPFAIL).
See docs/training.md and --help.
"""
from split_alexnet.cli import run_main
from split_alexnet.train import main

if __name__ == "__main__":
    run_main(main)
