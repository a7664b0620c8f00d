"""launch/check.py's flags checked before any process group: the layout (layouts.py) and what it takes,
the modes, the precision, the exercises' switches and rules. Each refusal is one line (UsageError)."""
from . import layouts
from .errors import UsageError
from .exercises import load_rule, options
from .precision import DTYPES
from .spec import default_streams


def check_args(args, proc):
    """(layout entry, modes, dtype, the exercises' options, the learner's rules) for these flags, or one line
    saying why not. Sets args.streams to its default (spec.default_streams)."""
    entry = layouts.get(args.layout or ("split" if proc.torchrun else "streams"))
    layout = entry.name
    args.streams = default_streams(args.streams, args.net)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - {"eval", "train"}:
        raise UsageError(f"--modes {args.modes!r}: use eval, train or eval,train")
    if args.batch_size < 1 or args.steps < 1:
        raise UsageError("--batch-size and --steps must be at least 1")
    if args.net == "half" and entry.torchrun:
        raise UsageError(f"--net half is the paper's one-GPU net (one stream): it has no {layout} layout; "
                         f"run python launch/check.py --net half (streams layout, one stream)")
    if args.precision not in DTYPES:
        raise UsageError(f"--precision {args.precision}: use fp32, bf16, fp16 or fp64")
    dtype = DTYPES[args.precision]
    if not entry.torchrun and proc.torchrun and proc.world > 1:
        raise UsageError(f"--layout {layout} runs in one process: use python launch/check.py, not torchrun")
    if args.hybrid_schedule not in entry.schedules:
        raise UsageError(f"--hybrid-schedule {args.hybrid_schedule} is the hybrid layout's: add --layout hybrid "
                         f"(under torchrun)")
    if entry.torchrun and not proc.torchrun:
        raise UsageError(f"--layout {layout} runs one process per {'stream' if entry.processes == 'per-stream' else 'rank'}: "
                         f"launch it with torchrun --nproc_per_node={2 if entry.processes == 'per-stream' else 4} "
                         f"launch/check.py --layout {layout}")
    opts = options(args.exercise) if args.exercise else {}
    if opts.get("split") and not entry.exercises:
        raise UsageError(f"--exercise {args.exercise} breaks the split layout's written-down rule: run it "
                         f"under torchrun --nproc_per_node=2 (in one process autograd sums by itself)")
    rules = {}
    try:
        for flag, key in (("--gather-backward", "gather_rule"), ("--logits-backward", "logits_rule")):
            path = getattr(args, flag[2:].replace("-", "_"))
            if path is not None:
                rules[key] = load_rule(path, flag)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if rules and (not entry.exercises or proc.world != 2 or args.streams != 2):
        raise UsageError("--gather-backward / --logits-backward replace the split layout's backward rules: "
                         "run them under torchrun --nproc_per_node=2 (in one process autograd has the rules)")
    if rules and opts.get("split"):
        raise UsageError("--exercise keep-own-slice already replaces the gather's backward: "
                         "leave out --exercise or --gather-backward")
    if rules:
        opts = {**opts, "split": rules}
    return entry, modes, dtype, opts, rules
