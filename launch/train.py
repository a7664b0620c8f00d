"""Train the 2012 two-stream AlexNet.

  torchrun --nproc_per_node=2 launch/train.py          # split: one process per stream, shapes data set
  python launch/train.py --layout single               # the whole net in one process (grouped convs)
  python launch/train.py --layout streams              # every stream in this process
  torchrun --nproc_per_node=2 launch/train.py --dataset mnist --data-dir DIR
  torchrun --nproc_per_node=2 launch/train.py --micro-batches 1   # the plain split (default: 2, overlapped)
  python launch/train.py --layout single --device cuda --precision bf16 --channels-last --compile
See docs/training.md and --help.
"""
from split_alexnet.allocator import apply_keep_freed_memory
from split_alexnet.cli import log, run_main
from split_alexnet.config import parse_config
from split_alexnet.distributed import setup, teardown
from split_alexnet.train import build, run


def main(argv=None):
    cfg = parse_config(argv)
    _, allocator = apply_keep_freed_memory(cfg.keep_freed_memory)   # every rank, before any tensor
    if not cfg.quiet:
        log(f"{allocator}; precision {cfg.precision}, micro-batches {cfg.micro_batches}, "
            f"channels-last {cfg.channels_last}, compile {cfg.compile}")
    ctx = setup(cfg.backend or None, cfg.device or None, cfg.timeout) if cfg.layout == "split" else None
    try:
        job = build(cfg, ctx)
        run(job)
        return 0
    finally:
        teardown()


if __name__ == "__main__":
    run_main(main)
