"""Training configuration: the recipes, the flags and their checks.

The flags have one source of defaults, argparse's, set in two passes: the first learns --recipe and
--dataset, the second parses with the recipe's values and then the data set's as the defaults (a flag
overrides both). So --help shows the defaults the run would use, e.g. `--dataset mnist --help`.
`--config FILE` (TOML or JSON, a run's own config.json too) sets defaults over the recipe's and the data
set's, and the flags still win: recipe < data set < file < flags.
"""
import argparse
import math
from dataclasses import dataclass

import torch

from . import flags, layouts
from .cli import DefaultsHelp, Parser, env
from .config_file import load_config_file
from .data import DATASETS
from .errors import UsageError
from .loader import default_workers
from .optim import UPDATES, parse_dexp
from .spec import default_streams

# Every value here can be overridden by its flag (--lr, --momentum, ...), and the data set's defaults
# (data.DATASETS[name].defaults) apply over the recipe's. The paper's recipe (§2, §4, §5), each row
# with its source in docs/reproduction.md:
# - input: shorter side to 256, the central 256x256, minus the training set's mean image, raw 0-255
#   pixels (no std division, §2): --preprocess paper; the mean at the crop's own position (Caffe's way);
# - random crops and mirrors (§4.1), PCA lighting sigma 0.1 (§4.1) with the MXNet constants;
# - the paper's update (§5, PaperSGD: the lr inside the velocity), momentum 0.9, weight decay 5e-4 on
#   the weights; biases at 2x the lr and no weight decay (Caffe's bvlc_alexnet: lr_mult 2, decay_mult 0;
#   the paper says nothing of biases);
# - lr 0.01 / 10 when the validation error (top-1) stops improving, three times in all (§5, --lr-drops 3);
# - N(0, 0.01) weights, biases 1 in conv2/4/5, fc6, fc7 (§5); 90 epochs (§5) of 128 (§5);
# - ten-crop evaluation (4 corners + centre and their mirrors, softmax averaged, §4.1).
_PAPER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, init="paper", batch_size=128, epochs=90,
              schedule="plateau", lr_patience=5, lr_drops=3, crop=True, flip=True, lighting=0.1,
              preprocess="paper", bias_lr_mult=2.0, bias_decay=False, ten_crop=True, update="paper",
              subtract_mean="caffe", lighting_pca="mxnet", dexp_weights="250,4", dexp_biases="25,2")
RECIPES = {
    "paper": _PAPER,
    # the default: the paper's recipe with one change, Caffe's bvlc_alexnet init (N(0, 0.01), fc6/fc7
    # N(0, 0.005), biases 0.1). At the paper's input scale (0-255 minus the mean image) it was the one of
    # the three inits that left the flat start; see docs/training.md, "The init question".
    "paper-caffe": {**_PAPER, "init": "caffe"},
    # the paper's recipe with one change, He initialisation (same input pipeline, biases, schedule and
    # ten-crop). At the paper's input scale it diverges at lr 0.01 within 5 steps (docs/training.md).
    "paper-he": {**_PAPER, "init": "kaiming"},
    # the shapes demo's default, sized for a CPU in minutes: the paper's recipe with He's init on
    # standardised input (per-channel mean and std, where He's init learns within tens of steps) and a
    # centre-crop evaluation; paper-caffe sits at chance for ~420 of the demo's 600 steps (docs/training.md).
    "paper-he-std": {**_PAPER, "init": "kaiming", "preprocess": "channel", "ten_crop": False},
    # cuda-convnet2's two-GPU files as closely as the flags allow (layers/layer-params-imagenet-2gpu-model.cfg:
    # epsW=dexp[base=0.02;tgtFactor=250;numSteps=4], epsB=dexp[base=0.04;tgtFactor=25;numSteps=2], momW/momB
    # 0.9, wc 0.0005 on weights only; convdata.py: the central crop of the mean image after crop and flip,
    # PCA noise with make-data/input_meta's standard deviations and the 1/(1 + sigma) rescale; its crop
    # size and sigma are command-line values, the paper's 224 and 0.1 here). Run it with --image-size 224;
    # docs/reproduction.md says what still differs.
    "paper-c2": {**_PAPER, "lr": 0.02, "bias_lr_mult": 2.0, "schedule": "dexp", "subtract_mean": "cuda-convnet2",
                 "lighting_pca": "cuda-convnet2"},
    # the seed (d2l's AlexNet chapter): Xavier, plain SGD lr 0.01, images resized and standardised per
    # channel, 3 epochs, one parameter group, centre evaluation.
    "d2l": dict(lr=0.01, momentum=0.0, weight_decay=0.0, init="d2l", batch_size=128, epochs=3,
                schedule="none", lr_patience=0, lr_drops=0, crop=False, flip=False, lighting=0.0,
                preprocess="channel", bias_lr_mult=1.0, bias_decay=True, ten_crop=False, update="torch",
                subtract_mean="caffe", lighting_pca="mxnet", dexp_weights="250,4", dexp_biases="25,2"),
}
INITS = ("paper", "caffe", "kaiming", "d2l", "torch")
# the split layout's --micro-batches default: split vs split-overlap at M = 2 and 4, batch 64, 227 px
# (docs/benchmarks.md, "Micro-batches in training")
DEFAULT_MICRO_BATCHES = 2


@dataclass
class Config:
    """One run's settings, one field per flag (the defaults are the parser's: see build_parser)."""
    layout: str
    dataset: str
    data_dir: str
    download: bool
    split_test: int
    train_size: int
    val_size: int
    recipe: str
    lr: float
    momentum: float
    weight_decay: float
    init: str
    batch_size: int
    epochs: int
    max_steps: int
    schedule: str
    lr_factor: float
    lr_patience: int
    lr_drops: int
    bias_lr_mult: float
    bias_decay: bool
    preprocess: str
    net: str
    crop: bool
    flip: bool
    lighting: float
    ten_crop: bool
    image_size: int
    streams: int
    seed: int
    dropout_seed: int
    workers: int
    prefetch_factor: int
    decode: str
    share_decode: bool
    mean_images: int
    device: str
    devices: str
    backend: str
    timeout: float
    peer_timeout: float
    bad_images: str
    out: str
    save_every: int
    resume: str
    plot: bool
    quiet: bool
    log_every: int
    eval_every: int
    keep_last: int = 3
    tensorboard: bool = False
    wandb: bool = False
    precision: str = "fp32"
    micro_batches: int = 1
    channels_last: bool = False
    compile: bool = False
    keep_freed_memory: bool = True
    cudnn_benchmark: object = None   # None: on with CUDA (precision.set_cudnn_benchmark)
    fused_sgd: object = None         # None: on with CUDA (precision.fused_sgd)
    sync_debug: bool = False
    eval_only: bool = False
    update: str = "torch"          # the recipes set these (older configs lack them: their defaults)
    subtract_mean: str = "caffe"
    lighting_pca: str = "mxnet"
    dexp_weights: str = "250,4"
    dexp_biases: str = "25,2"
    reads: str = ""   # --reads: another connectivity, e.g. conv4=all (Spec.with_reads; the tutorial's trade-off)


_Parser, _Help = Parser, DefaultsHelp    # the launchers' own (cli.py)


def build_parser(add_help=True):
    """The flags. Those the recipe or the data set decide have no default here: parse_config sets them."""
    p = _Parser(description="Train the 2012 two-stream AlexNet.", add_help=add_help,
                formatter_class=_Help,
                epilog="torchrun --nproc_per_node=2 launch/train.py   # split layout, shapes, defaults")
    B = argparse.BooleanOptionalAction
    p.add_argument("--layout", choices=layouts.names(trains=True), default=layouts.default(env().torchrun),
                   help="split under torchrun, single otherwise (here: %(default)s)")
    p.add_argument("--dataset", choices=list(DATASETS), default="shapes", help="see docs/training.md")
    p.add_argument("--data-dir", default="data", help="where the data set's files are (or are downloaded)")
    p.add_argument("--download", action=B, default=True, help="let torchvision download missing files")
    p.add_argument("--split-test", type=int, default=0, metavar="N", help="mnist/fashion-mnist: train on "
                   "the test files but their last N images, validate on those N (when only t10k-* exist)")
    p.add_argument("--train-size", type=int, default=0, help="shapes/random: images per epoch")
    p.add_argument("--val-size", type=int, default=0, help="shapes/random: validation images")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="default: the data set's (paper-caffe; shapes: paper-he-std). paper-caffe: the paper's "
                   "with Caffe's init; paper: as published; paper-he: the paper's with He init; paper-he-std: "
                   "with He init on standardised input, centre-crop eval (a CPU demo); paper-c2: cuda-convnet2's "
                   "two-GPU files (use --image-size 224); d2l: the d2l chapter's")
    p.add_argument("--update", choices=UPDATES, help="paper: the paper's SGD (§5; cuda-convnet2's, Caffe's), "
                   "v = m v - wd lr w - lr g, w += v (split_alexnet.PaperSGD); torch: torch.optim.SGD (the lr "
                   "outside the velocity); the same while the lr is constant, apart after an lr change")
    p.add_argument("--lr", type=float, help="SGD learning rate")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, help="SGD weight decay")
    p.add_argument("--init", choices=INITS, help="paper: N(0,0.01), biases 1; caffe: bvlc_alexnet's "
                   "(N(0,0.01), fc6/fc7 N(0,0.005), biases 0.1); kaiming: He normal, biases 0; d2l: Xavier; "
                   "torch: PyTorch's default")
    p.add_argument("--batch-size", type=int, help="images per SGD step, all replicas together (each replica "
                   "takes its slice; the streams of a replica see the same slice)")
    p.add_argument("--epochs", type=int, help="passes over the training set")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many SGD steps (0: no limit)")
    flags.add_net(p, "paper: the two-GPU net; half: the paper's one-GPU comparison net (§3.2: conv1-4 halved, "
                  "conv5 and fc kept; one stream)")
    p.add_argument("--reads", default="", metavar="LAYER=own|all,...",
                   help="change what conv2..conv5 read, e.g. conv4=all (an exchange before conv4; "
                        "docs/tutorial.md, the paper's trade-off); empty: the paper's, conv3=all")
    p.add_argument("--schedule", choices=["none", "plateau", "dexp"], help="plateau (the paper's, §5): lr "
                   "* --lr-factor when the validation top-1 error has not improved for more than --lr-patience "
                   "evaluations, at most --lr-drops times; dexp (cuda-convnet2's): fixed exponential steps by "
                   "training progress, from --lr (weights) and --lr x --bias-lr-mult (biases)")
    p.add_argument("--dexp-weights", metavar="FACTOR,STEPS", help="dexp: the weights' rate falls from --lr "
                   "to --lr / FACTOR in STEPS equal parts of the run (cuda-convnet2: tgtFactor=250;numSteps=4)")
    p.add_argument("--dexp-biases", metavar="FACTOR,STEPS", help="dexp: the same for the biases, from --lr x "
                   "--bias-lr-mult (cuda-convnet2: tgtFactor=25;numSteps=2)")
    p.add_argument("--lr-factor", type=float, default=0.1, help="plateau: lr multiplier")
    p.add_argument("--lr-patience", type=int,
                   help="plateau: evaluations without a new best top-1 error that are tolerated; one more drops the lr")
    p.add_argument("--lr-drops", type=int, help="plateau: at most this many drops (the paper: 3)")
    p.add_argument("--bias-lr-mult", type=float, help="biases' lr over the weights' (Caffe: 2, constant; "
                   "cuda-convnet2: 2 at the start, its dexp schedules then part)")
    p.add_argument("--bias-decay", action=B, help="weight decay on the biases too (cuda-convnet2, Caffe: no)")
    p.add_argument("--preprocess", choices=["paper", "channel"], help="paper: shorter side to size*256/227, "
                   "central square, 0-255 minus the training set's mean image; channel: resize to a square, "
                   "[0,1] standardised per channel by the data set's mean and std")
    p.add_argument("--crop", action=B, help="random crops (eval: the centre crop) from a square of side "
                   "256/227 of the input's (--preprocess paper; 224 px: 256) or 256/224 of it (--preprocess "
                   "channel)")
    p.add_argument("--subtract-mean", choices=["caffe", "cuda-convnet2"], help="--preprocess paper: caffe: "
                   "the mean image at the crop's own position, before the flip (data_transformer.cpp); "
                   "cuda-convnet2: the central crop of the mean image, after crop and flip (convdata.py)")
    p.add_argument("--flip", action=B, help="random horizontal flips")
    p.add_argument("--lighting", type=float, help="PCA colour lighting sigma (0: off; RGB only)")
    p.add_argument("--lighting-pca", choices=["mxnet", "cuda-convnet2"], help="mxnet: fb.resnet.torch's "
                   "eigenvectors and eigenvalues x 255 (MXNet's pca_noise); cuda-convnet2 (--preprocess paper): "
                   "its make-data/input_meta eigenvectors and standard deviations, then the data x 1/(1 + sigma)")
    p.add_argument("--ten-crop", action=B, help="evaluate on 10 crops (4 corners + centre, mirrored), "
                   "softmax averaged")
    flags.add_image_size(p, "the model's input (>= 67)", default=None)
    flags.add_streams(p, "streams of the net; split: processes per replica (torchrun --nproc_per_node=N runs "
                      "N / S replicas, docs/scaling.md)", default=2)
    p.add_argument("--seed", type=int, default=0, help="weights, data order and augmentation")
    p.add_argument("--dropout-seed", type=int, default=0, help="dropout masks")
    p.add_argument("--workers", type=int, help="data loader processes per rank (GPUs: the cores per local rank "
                   "but one; CPU: 0, the compute takes the cores)", default=default_workers(torch.cuda.is_available()))
    p.add_argument("--prefetch-factor", type=int, default=4, help="batches each worker loads ahead")
    p.add_argument("--decode", choices=["cpu", "gpu"], default="cpu", help="gpu: the workers read the files, "
                   "torchvision.io.decode_jpeg decodes each batch on the device (--preprocess paper)")
    p.add_argument("--share-decode", action=B, default=True, help="split: stream s of a replica decodes rows "
                   "s::S of its batch and the streams all-gather the uint8 crops (each image decoded once)")
    p.add_argument("--mean-images", type=int, default=0, help="--preprocess paper: the mean image from this "
                   "many training images (an even spread; 0: all)")
    p.add_argument("--device", default="", help="default: cuda:LOCAL_RANK with NCCL, cuda if any, else cpu")
    p.add_argument("--devices", default="", help="streams layout: comma-separated, one per stream")
    p.add_argument("--backend", choices=["nccl", "gloo"], default="", help="split: default nccl with GPUs, "
                   "else gloo")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a collective waits while every rank is alive (long data preparation, slow "
                   "checkpoint writes); a rank that stops answering is found by --peer-timeout")
    p.add_argument("--peer-timeout", type=float, default=60.0,
                   help="split: seconds without a peer's heartbeat before the job ends naming it (0: off)")
    p.add_argument("--bad-images", choices=["stop", "skip"], default="stop",
                   help="an image file that fails to decode: stop naming it, or skip it (named once)")
    p.add_argument("--config", default="", metavar="FILE", help="TOML or JSON of settings (flag names, e.g. "
                   "lr = 0.01, batch_size = 64; a run's own config.json too): the defaults; the flags win")
    p.add_argument("--out", default="", help="default: a new folder under runs/. One that holds a checkpoint "
                   "that verifies: the run continues there from its newest (a restart, a requeue)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps and at the end")
    p.add_argument("--keep-last", type=int, default=3, metavar="K", help="keep the K newest checkpoints "
                   "(0: all); the newest that verifies is never deleted")
    p.add_argument("--resume", default="", help="a checkpoint (or run) directory to continue from; auto: "
                   "--out's newest checkpoint that verifies, if it has one, else a new run there")
    p.add_argument("--eval-only", action="store_true", help="with --resume: evaluate the checkpoint on the "
                   "validation set, print one line, train nothing and write nothing")
    p.add_argument("--plot", action=B, default=True, help="write curves.png (loss and accuracy) at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no log lines but errors")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines without a bar (the "
                   "first and the last step are always logged)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: each epoch)")
    p.add_argument("--tensorboard", action="store_true", help="also write the metrics rows as TensorBoard "
                   "event files in OUT/tensorboard (pip install tensorboard)")
    p.add_argument("--wandb", action="store_true", help="also log the metrics rows to Weights & Biases "
                   "(pip install wandb; never required)")
    g = p.add_argument_group("speed (docs/training.md)")
    flags.add_precision(p, "bf16/fp16: forward and loss under torch.autocast, fp32 weights; fp16 with a GradScaler",
                        group=g)
    g.add_argument("--micro-batches", type=int, default=None, metavar="M",
                   help=f"split: micro-batches of the overlapped forward (overlap.py); 1: plain split "
                   f"(default {DEFAULT_MICRO_BATCHES} for split, measured: docs/benchmarks.md)")
    g.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs (for "
                   "GPUs: slower on CPU, measured in benchmarks/README.md)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model: single, streams: the "
                   "whole forward as one graph; split: each layer of the stream, the exchanges between graphs")
    g.add_argument("--cudnn-benchmark", action=B, default=None,
                   help="cuDNN's algorithm search per convolution shape (default: on with CUDA, off elsewhere)")
    g.add_argument("--fused-sgd", action=B, default=None,
                   help="torch's fused SGD kernel (default: on with CUDA, off elsewhere)")
    g.add_argument("--sync-debug", action="store_true",
                   help="CUDA: every step from the third under torch.cuda.set_sync_debug_mode('error'): a host "
                   "synchronisation inside forward, backward or the SGD step stops the run, naming it "
                   "(default: off; on the CPU there is nothing to check)")
    g.add_argument("--keep-freed-memory", action=B, default=True,
                   help="glibc: keep freed buffers for reuse, no page faults per step (allocator.py)")
    return p


def parse_config(argv=None):
    from .resume import explicit_flags  # resume.py reads this module's parser
    first, _ = build_parser(add_help=False).parse_known_args(argv)   # which file, recipe, data set
    p = build_parser()
    given = explicit_flags(argv)
    file = load_config_file(first.config, p) if first.config else {}
    pick = lambda k: getattr(first, k) if k in given else file.get(k, getattr(first, k))   # noqa: E731
    dataset, net = pick("dataset"), pick("net")
    recipe = pick("recipe") or DATASETS[dataset].recipe
    p.set_defaults(recipe=recipe, **{**RECIPES[recipe], **DATASETS[dataset].defaults})
    p.set_defaults(streams=default_streams(None, net))   # 1 for the one-GPU net (--net half)
    p.set_defaults(**file)                         # the file over the recipe's; the flags over both
    settings = vars(p.parse_args(argv))
    settings.pop("config")
    cfg = Config(**settings)
    given_m = cfg.micro_batches is not None
    if not given_m:  # the overlapped forward: on where the layout has it
        cfg.micro_batches = DEFAULT_MICRO_BATCHES if layouts.get(cfg.layout).micro_batches else 1
    validate(cfg)
    validate_speed(cfg, given_m)
    return cfg


_F32_MAX = float(torch.finfo(torch.float32).max)


def validate(cfg):
    checks = [
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: use 1 or more"),
        (cfg.epochs >= 1, f"--epochs {cfg.epochs}: use 1 or more"),
        (cfg.max_steps >= 0, f"--max-steps {cfg.max_steps}: use 0 (no limit) or more"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr {cfg.lr}: use a positive number such as 0.01"),
        (0 <= cfg.momentum < 1, f"--momentum {cfg.momentum}: use 0 <= momentum < 1"),
        (cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay}: use 0 or more"),
        (0 < cfg.lr_factor < 1, f"--lr-factor {cfg.lr_factor}: use 0 < factor < 1"),
        (cfg.lighting >= 0, f"--lighting {cfg.lighting}: use 0 (off) or a sigma such as 0.1"),
        (cfg.workers >= 0, f"--workers {cfg.workers}: use 0 or more"),
        (cfg.prefetch_factor >= 1, f"--prefetch-factor {cfg.prefetch_factor}: use 1 or more"),
        (cfg.mean_images >= 0, f"--mean-images {cfg.mean_images}: use 0 (all) or more"),
        (cfg.timeout > 0, f"--timeout {cfg.timeout}: use a positive number of seconds"),
        (cfg.peer_timeout >= 0, f"--peer-timeout {cfg.peer_timeout}: use 0 (off) or a number of seconds"),
        (cfg.save_every >= 0, f"--save-every {cfg.save_every}: use 0 (only at the end: off) or more"),
        (cfg.keep_last >= 0, f"--keep-last {cfg.keep_last}: use 0 (keep every checkpoint) or more"),
        (cfg.log_every >= 1 and cfg.eval_every >= 0, "--log-every must be >= 1 and --eval-every >= 0"),
        (cfg.split_test >= 0 and cfg.train_size >= 0 and cfg.val_size >= 0,
         "--split-test, --train-size and --val-size must be 0 or more"),
        (cfg.lr_patience >= 0 and cfg.lr_drops >= 0, "--lr-patience and --lr-drops must be 0 or more"),
        (cfg.bias_lr_mult > 0, f"--bias-lr-mult {cfg.bias_lr_mult}: use a positive number such as 2"),
        # every learning rate after its multipliers, as the optimizer holds it (float32 parameters)
        (cfg.lr * cfg.bias_lr_mult <= _F32_MAX, f"--lr {cfg.lr:g} x --bias-lr-mult {cfg.bias_lr_mult:g} = "
         f"{cfg.lr * cfg.bias_lr_mult:g}, the biases' lr, is not a finite float32: use smaller values"),
        (cfg.lr <= _F32_MAX, f"--lr {cfg.lr:g} is not a finite float32: use a positive number such as 0.01"),
        (cfg.net != "half" or not layouts.get(cfg.layout).torchrun,
         f"--net half is the paper's one-GPU net: it has one stream and no {cfg.layout} layout; run it with "
         f"python launch/train.py --net half (single layout)"),
        (cfg.net != "half" or cfg.streams == 1, f"--net half has one stream, not --streams {cfg.streams}: "
         f"leave --streams out"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    parse_dexp(cfg.dexp_weights, "--dexp-weights")
    parse_dexp(cfg.dexp_biases, "--dexp-biases")
    if cfg.lighting_pca == "cuda-convnet2" and cfg.lighting > 0 and cfg.preprocess != "paper":
        raise UsageError("--lighting-pca cuda-convnet2 adds its noise to 0-255 pixels minus the mean image and "
                         "rescales them by 1/(1 + sigma): use it with --preprocess paper, or --lighting-pca mxnet")
    if cfg.eval_only and not cfg.resume:
        raise UsageError("--eval-only evaluates a checkpoint: give it with --resume DIR (a run directory "
                         "saved with --save-every, or one of its checkpoints/step*)")
    proc = env()
    entry = layouts.get(cfg.layout)
    if not entry.torchrun and proc.world > 1:
        raise UsageError(f"--layout {cfg.layout} runs in one process: use python launch/train.py, not "
                         f"torchrun with {proc.world} processes")
    if entry.torchrun and not proc.torchrun:
        raise UsageError(f"--layout {cfg.layout} runs one process per "
                         f"{'stream' if entry.processes == 'per-stream' else 'share'}: launch it with "
                         f"torchrun --nproc_per_node=2 launch/train.py"
                         f"{layouts.flag(cfg.layout)}")


def validate_speed(cfg, given_m=True):
    """--micro-batches, --compile: where they apply and whether torch.compile is here (one line each, exit
    status 2)."""
    m = cfg.micro_batches
    if m < 1:
        raise UsageError(f"--micro-batches {m}: use 1 (no micro-batches) or more")
    if m > 1 and not layouts.get(cfg.layout).micro_batches:
        raise UsageError(f"--micro-batches {m} overlaps the split layout's exchanges: --layout {cfg.layout} "
                         f"has none (drop the flag, or use torchrun with --layout split)")
    if m > 1 and cfg.batch_size % m:
        raise UsageError(f"--batch-size {cfg.batch_size} does not divide into {m} micro-batches: use a "
                         f"multiple of {m}{'' if given_m else f' (the split default --micro-batches {m})'} "
                         f"or --micro-batches 1")
    if cfg.compile:
        from .precision import compile_available
        ok, why = compile_available()
        if not ok:
            raise UsageError(f"--compile: {why}: drop --compile")
