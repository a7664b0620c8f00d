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
from dataclasses import replace

from split_alexnet import checkpoint as ckpt
from split_alexnet import guard, layouts
from split_alexnet.allocator import apply_keep_freed_memory
from split_alexnet.cli import log, run_main
from split_alexnet.config import parse_config
from split_alexnet.distributed import setup, teardown
from split_alexnet.train import EXIT_PREEMPTED, build, resume_source, run, run_folder


def resume_settings(cfg, argv):
    """A resume continues the checkpoint's run: its settings, but the flags given here (see guard)."""
    found = ckpt.find_checkpoint(cfg.resume)      # the newest that verifies, from a run directory
    meta = ckpt.read_meta(found)
    cfg, lines = guard.resolve_resume(cfg, argv, meta.get("config") or {}, meta.get("batch", 0))
    ckpt.check_resumed_config(cfg, found)        # the checkpoint's settings pass the flags' checks
    for line in lines:
        log(line)
    return replace(cfg, resume=found)


def main(argv=None):
    guard.die_with_parent()                        # first: a rank ends with its torchrun agent
    cfg = parse_config(argv)
    _, allocator = apply_keep_freed_memory(cfg.keep_freed_memory)   # every rank, before any tensor
    if not cfg.quiet:
        log(f"{allocator}; precision {cfg.precision}, micro-batches {cfg.micro_batches}, "
            f"channels-last {cfg.channels_last}, compile {cfg.compile}")
    guard.check_out(cfg.out, cfg.save_every > 0 and not cfg.eval_only)   # before any work
    cfg = resume_source(cfg)                       # --out's newest checkpoint, in place (or --resume)
    if cfg.resume:
        cfg = resume_settings(cfg, argv)
    entry = layouts.get(cfg.layout)
    ctx = setup(cfg.backend or None, cfg.device or None, cfg.timeout, layouts.setup_streams(entry, cfg.streams)) \
        if entry.torchrun else None
    try:
        guard.start(ctx, cfg.peer_timeout)         # heartbeat watchdog, parent-death signal
        world = ctx.world if ctx else 1
        guard.agree(world, guard.config_fields(cfg), "the arguments")
        if not cfg.eval_only:                      # the folder is this job's alone (outlock.py)
            cfg = replace(cfg, out=run_folder(cfg, world))
            guard.lock_out(cfg.out, world)
        job = build(cfg, ctx)
        guard.agree(world, guard.data_fields(job), "the data")
        return EXIT_PREEMPTED if run(job).get("stopped") else 0   # --eval-only: never stopped
    finally:
        guard.stop()                               # the watchdog joined before the group goes
        teardown()
        guard.unlock_out()


if __name__ == "__main__":
    run_main(main)
