"""What model parallelism costs: the layouts timed side by side in one job (launch/bench.py).

Layouts (docs/benchmarks.md):
- single         the whole net on one device. Under torchrun rank 0 runs it while the others wait at a
                 barrier (a blocking wait: its CPU use is measured and reported). On CPU twice: with one
                 rank's threads ("one device") and with every core ("the whole machine").
- split          SplitAlexNet, one stream per rank, synchronous exchanges (comm.py).
- split-overlap  the same, micro-batched, exchanges started async and waited on only when needed
                 (overlap.py, comm_async.py); the communication time it reports is the time blocked in
                 wait().
- streams        (on request) StreamsAlexNet: every stream in rank 0's process on its device, one
                 after the other: the in-process two-stream layout, e.g. on one GPU.
- mesh           (on request) W / --streams replicas of the --streams-stream split on a (replica, stream)
                 mesh, DDP over the replica group (replicas.py); each replica its slice of the batch.
- hybrid         (on request) the 2014 hybrid: conv data parallel, fc model parallel (hybrid.py).
                 scaling.py: every multi-process layout's bytes per step as a line in the batch, and
                 the batch range where each sends the fewest (printed; docs/scaling.md).
- ddp            torch DDP of the single net over the same ranks: each rank takes batch/world images of
                 the same global batch, so every layout processes the same images per step.
- torchvision    the peer: torchvision.models.alexnet (224 px, scaled like the others for smaller
                 --image-size), same batch and optimizer, on rank 0 with one rank's threads;
                 torchvision-all: the same with every core. The ratios block divides every layout's
                 images/s by theirs.

--precision bf16|fp16 runs forward + loss under torch.autocast; --profile adds LRN's share of each step.
link.py: the link model (launch/bench.py --link): a two-GPU step predicted from compute and bytes.

One module per job:
- config.py    BenchConfig, and the checks that refuse bad input before any work
- layouts.py   each layout's bench hook (layouts.py's registry): its `Run`s, built and ready to step
- measure.py   one step (times, communication, memory) and the interleaved schedule
- profile.py   torch.profiler: trace, operator table, per-step breakdown
- stats.py     medians over steps: the rows of bench.json
- report.py    the printed table, bench.json; plot.py: bench.png
- runner.py    run_bench: all of the above, on one rank
"""
from .config import EXTRA_LAYOUTS, LAYOUTS, BenchConfig, check_config
from .report import format_ratios, format_table, write_outputs
from .runner import run_bench
from .stats import spec_bytes_per_step

__all__ = ["EXTRA_LAYOUTS", "LAYOUTS", "BenchConfig", "check_config", "format_ratios", "format_table",
           "write_outputs", "run_bench", "spec_bytes_per_step"]
