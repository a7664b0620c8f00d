"""Training: the split layout (2 gloo ranks under torchrun) learns real MNIST; split and single log the
same per-step losses from the same seed; a resumed run repeats an uninterrupted one exactly; the
metrics schema; bad inputs end with one line and exit status 2."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from split_alexnet.cli import run_main
from split_alexnet.config import parse_config
from split_alexnet.train import build, run

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MNIST_DIR = os.path.join(ROOT, "tests", "fixtures", "mnist")
# MNIST at 67 px (upsampled from 28): the fixture's first 2,500 images train (3 epochs of 39 steps), the
# last 500 are held out. No flips (digits are not mirror-symmetric); random crops from 77 px stay on. These
# tests are about the layouts, not the recipe: they pin the recipe they were measured with, which learns
# in 117 steps: He init on per-channel standardised input, one rule for weights and biases, centre-crop
# evaluation (at the paper's 0-255 input the paper's and Caffe's inits need hundreds of steps and He's
# diverges: docs/training.md). With the biases at 2x the lr the split and single losses still agree, but
# the early steps are rougher and fp32 order differences grow faster: 1.4e-5 relative at step 5, measured.
MNIST_ARGS = ["--dataset", "mnist", "--data-dir", MNIST_DIR, "--split-test", "500", "--image-size", "67",
              "--epochs", "3", "--batch-size", "64", "--no-flip", "--seed", "0", "--dropout-seed", "1",
              "--recipe", "paper-he", "--preprocess", "channel", "--no-ten-crop", "--bias-lr-mult", "1",
              "--bias-decay", "--micro-batches", "1"]
# --micro-batches 1: the plain split, whose loss curve LOSS_RTOL below is about. The default (2, the
# overlapped forward) sums in another order still; measured here it agreed with single to 2e-6 for 5
# steps, then parted by 2e-4 at step 6: an fp32 ReLU/max-pool kink taken differently, which SGD carries
# on (split_alexnet/check.py on derivatives in fp32). tests/test_precision.py compares M = 2, 4 with
# the plain split over the first 3 steps.
# fp32: split and single differ only in summation order (grouped conv vs per-stream convs, all-gathered
# fc inputs, reduce-scattered gradients): each sum ~sqrt(K) * 2^-24 relative, compounded by the SGD
# steps. Measured on the 2-core CPU: at most 1.7e-7 relative over these 5 steps. 1e-5 leaves room for
# other thread counts and BLAS orders and is far below any real fault (a wrong mask or slice changes the
# loss by 1e-2 or more). See split_alexnet/check.py for the per-tensor argument.
# The model holds while no decision flips: a max-pool argmax between two near-equal inputs or a ReLU at
# its kink can be taken differently by the two summation orders, and the SGD step after it parts the
# weights by far more than round-off (the derivative is discontinuous there: split_alexnet/check.py).
# Measured with these arguments: the CI machine passed 6 steps; on the development machine of
# 2026-12-02 steps 1-5 agreed to 1.5e-7 and step 6 parted by 1.7e-5 (a 100x jump in one step: such a
# flip; which op flipped was not located), the same on every run, both layouts deterministic. So the
# curve is compared over 5 steps, each within the round-off model; the check rules on the derivatives.
LOSS_RTOL = 1e-5
EQUAL_STEPS = 5


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_in_process(argv):
    cfg = parse_config(argv)
    return run(build(cfg))


def _torchrun(args, timeout=400):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "launch", "train.py")] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def mnist_split(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mnist_split") / "run")
    proc = _torchrun(MNIST_ARGS + ["--out", out, "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_split_learns_mnist(mnist_split):
    rows = _metrics(mnist_split)
    val = [r for r in rows if r["split"] == "val"]
    # measured: 0.83 at step 117 (single layout, --dropout-seed 1, 2-core CPU); chance is 0.10. He's init at
    # this lr starts on a flat stretch whose length depends on the masks: with the counter-based masks,
    # --dropout-seed 0 stayed there two epochs (0.286 at step 117), seed 1 left it in the first
    # (python launch/train.py --layout single with MNIST_ARGS, 2 Dec 2026)
    assert val[-1]["step"] == 117 and val[-1]["top1"] >= 0.75, val
    cfg = json.load(open(os.path.join(mnist_split, "config.json")))
    assert cfg["layout"] == "split" and cfg["spec"] == dict(streams=2, image_size=67, in_channels=1,
                                                            num_classes=10, net="paper")


@pytest.mark.slow
def test_metrics_schema(mnist_split):
    rows = _metrics(mnist_split)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert len(train) + len(val) == len(rows)
    assert [r["step"] for r in train] == list(range(1, 118))  # 3 epochs of 2,500 images in 64s: 39 steps
    for r in train:
        assert set(r) == {"split", "step", "epoch", "loss", "lr", "lr_weights", "lr_biases", "images_per_s",
                          "data_s", "step_s", "time"}
        assert 0 <= r["data_s"] <= r["step_s"]
        assert r["epoch"] == (r["step"] - 1) // 39 and r["images_per_s"] > 0 and r["loss"] > 0
        assert r["lr"] == 0.01 if r["epoch"] == 0 else r["lr"] <= 0.01
    for r in val:
        assert set(r) == {"split", "step", "epoch", "loss", "top1", "top5", "time"}
        assert 0 <= r["top1"] <= r["top5"] <= 1


@pytest.mark.slow
def test_split_and_single_log_the_same_losses(mnist_split, tmp_path):
    """Same seed, same dropout seed, dropout on: the single layout repeats the split run's losses."""
    _train_in_process(MNIST_ARGS + ["--layout", "single", "--max-steps", str(EQUAL_STEPS), "--quiet",
                                    "--out", str(tmp_path / "single")])
    split = [r["loss"] for r in _metrics(mnist_split) if r["split"] == "train"][:EQUAL_STEPS]
    single = [r["loss"] for r in _metrics(str(tmp_path / "single")) if r["split"] == "train"]
    assert len(single) == EQUAL_STEPS
    for k, (a, b) in enumerate(zip(split, single), 1):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {k}: split {a} single {b}"
    assert len(set(single)) == EQUAL_STEPS                  # the losses move: not a frozen model


# Tiny shapes runs: 32 images an epoch at batch 8 (4 steps), 67 px; 6 steps cross an epoch boundary,
# an evaluation and a plateau-schedule step (patience 0: the lr may drop at once).
TINY = ["--dataset", "shapes", "--train-size", "32", "--val-size", "8", "--image-size", "67",
        "--batch-size", "8", "--epochs", "2", "--lr", "0.001", "--lr-patience", "0", "--quiet"]


@pytest.mark.parametrize("layout", ["single", "streams"])
@pytest.mark.slow
def test_resume_repeats_uninterrupted_run(tmp_path, layout):
    full, part, resumed = (str(tmp_path / n) for n in ("full", "part", "resumed"))
    _train_in_process(TINY + ["--layout", layout, "--max-steps", "6", "--out", full, "--plot"])
    assert os.path.getsize(os.path.join(full, "curves.png")) > 0
    _train_in_process(TINY + ["--layout", layout, "--max-steps", "3", "--save-every", "3", "--out", part])
    _train_in_process(TINY + ["--layout", layout, "--max-steps", "6", "--out", resumed,
                              "--resume", part])             # a run directory: its newest checkpoint
    ref = [r for r in _metrics(full) if r["split"] == "train"]
    got = [r for r in _metrics(resumed) if r["split"] == "train"]
    assert [r["step"] for r in got] == [4, 5, 6] and [r["epoch"] for r in got] == [0, 1, 1]
    assert [(r["loss"], r["lr"]) for r in got] == [(r["loss"], r["lr"]) for r in ref[3:]]   # bit for bit
    val_ref = [(r["step"], r["loss"]) for r in _metrics(full) if r["split"] == "val"]
    val_got = [(r["step"], r["loss"]) for r in _metrics(resumed) if r["split"] == "val"]
    assert val_got == [v for v in val_ref if v[0] > 3] and len(val_got) == 2


# ---- bad inputs: one line on stderr, exit status 2, nothing started -------------------------------

def _main():
    spec = importlib.util.spec_from_file_location("train_launcher", os.path.join(ROOT, "launch", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _bad(argv, capsys):
    main = _main()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _help_entries(text):
    """--help's options as {first flag: its whole entry on one line}."""
    entries = {}
    for line in text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = " ".join(line.split())
        elif line.startswith("   ") and entries:
            entries[flag] += " " + " ".join(line.split())
    return entries


@pytest.mark.parametrize("argv, shown", [
    ([], dict(lr="0.005", momentum="0.9", batch_size="64", epochs="3", image_size="67", init="kaiming")),  # shapes: paper-he-std
    (["--recipe", "paper"], dict(lr="0.005", init="paper", schedule="plateau", crop="True")),
    (["--dataset", "mnist", "--recipe", "d2l"],
     dict(lr="0.01", momentum="0.0", batch_size="128", image_size="227", schedule="none", crop="False")),
])
def test_help_shows_the_defaults_a_run_uses(argv, shown, capsys):
    """--help shows the defaults of the chosen recipe and data set, the ones parse_config returns."""
    with pytest.raises(SystemExit) as e:
        _main()(argv + ["--help"])
    assert e.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    cfg = parse_config(argv)
    for name, value in shown.items():
        flag = "--" + name.replace("_", "-")
        assert str(getattr(cfg, name)) == value
        assert f"(default: {value})" in entries[flag], entries[flag]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "run")
    _train_in_process(TINY + ["--layout", "single", "--max-steps", "1", "--save-every", "1", "--out", out])
    return os.path.join(out, "checkpoints", "step0000001")


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size 0: use 1 or more"),
    (["--lr", "-1"], "--lr -1.0: use a positive number"),
    (["--epochs", "0"], "--epochs 0: use 1 or more"),
    (["--timeout", "0"], "--timeout 0.0: use a positive number of seconds"),
    (["--image-size", "40"], "image size 40 is too small for AlexNet: use --image-size 67 or more"),
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--layout", "split"], "launch it with torchrun --nproc_per_node=2"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist", "--no-download"],
     "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
     "t10k-labels-idx1-ubyte.gz not found in /nonexistent/mnist (nor in its MNIST/raw) and downloads are off"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent/imgs"], "/nonexistent/imgs/train is not a directory"),
    (["--dataset", "shapes", "--train-size", "4", "--batch-size", "8"], "more than the 4 training images"),
    (["--resume", "/nonexistent/ckpt"], "--resume /nonexistent/ckpt: no such file or directory"),
])
def test_bad_input_one_line(argv, message, capsys):
    assert message in _bad(argv + ["--quiet", "--out", "/tmp/never-written"], capsys)
    assert not os.path.exists("/tmp/never-written/metrics.jsonl")


def test_bad_checkpoints_one_line(tiny_checkpoint, tmp_path, capsys):
    args = TINY + ["--out", str(tmp_path / "o")]
    err = _bad(args + ["--image-size", "99", "--resume", tiny_checkpoint], capsys)
    assert "--image-size 99 on resume: the checkpoint's run used 67" in err   # (check_matches: test_checkpoint)
    err = _bad(args + ["--layout", "streams", "--resume", tiny_checkpoint], capsys)
    assert "holds the single layout and this run is streams: convert it first" in err
    f = os.path.join(tiny_checkpoint, "single.pt")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    err = _bad(args + ["--resume", tiny_checkpoint], capsys)
    assert "truncated" in err


def test_existing_run_is_not_overwritten(tiny_checkpoint, capsys):
    """--out holding a run: it continues only from a checkpoint that verifies (test_cluster_runs.py);
    this one's was truncated above, so the run is refused, naming why."""
    run_dir = os.path.dirname(os.path.dirname(tiny_checkpoint))
    err = _bad(TINY + ["--out", run_dir], capsys)
    assert f"--out {run_dir}: no checkpoint in {run_dir}/checkpoints verifies" in err and "truncated" in err
    os.remove(os.path.join(tiny_checkpoint, "meta.pt"))        # no checkpoint at all: metrics alone
    err = _bad(TINY + ["--out", run_dir], capsys)
    assert "already holds metrics.jsonl and no checkpoint to continue from: give another --out" in err


@pytest.mark.slow
def test_cli_bad_input_exit_status():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--momentum", "1.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "error: --momentum 1.5: use 0 <= momentum < 1\n"
    assert proc.stdout == ""


@pytest.mark.slow
def test_split_resume_and_bad_shard(tmp_path):
    """Under torchrun: the split layout's per-rank shards resume exactly; a truncated shard of one rank
    stops both ranks at once with one message (no rank left waiting in a collective)."""
    full, part, resumed, bad = (str(tmp_path / n) for n in ("full", "part", "resumed", "bad"))
    for args in (["--max-steps", "6", "--out", full],
                 ["--max-steps", "3", "--save-every", "3", "--out", part],
                 ["--max-steps", "6", "--out", resumed, "--resume", part]):
        proc = _torchrun(TINY + args, timeout=200)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ref = [(r["step"], r["loss"]) for r in _metrics(full) if r["split"] == "train"]
    got = [(r["step"], r["loss"]) for r in _metrics(resumed) if r["split"] == "train"]
    assert got == ref[3:]
    shard = os.path.join(part, "checkpoints", "step0000003", "stream1.pt")
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) // 2)
    proc = _torchrun(TINY + ["--max-steps", "6", "--out", bad, "--resume", part, "--timeout", "60"], timeout=120)
    assert proc.returncode != 0
    # a run directory: no checkpoint verifies, and the message names the file and why
    assert f"error: --resume {part}: no checkpoint in" in proc.stderr
    assert f"checkpoint file {shard} is" in proc.stderr and "truncated" in proc.stderr


@pytest.mark.slow
def test_the_trainer_runs_as_a_module_and_as_a_console_script():
    """python -m split_alexnet.train is the trainer (as launch/train.py), and pip install gives the command."""
    from importlib.metadata import entry_points
    proc = subprocess.run([sys.executable, "-m", "split_alexnet.train", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "--layout {single,streams,split,hybrid}" in proc.stdout, proc.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "split_alexnet.train", "--batch-size", "0"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("error: "), bad.stderr[-2000:]
    (script,) = entry_points(group="console_scripts", name="split-alexnet-train")
    assert script.value == "split_alexnet.train:cli"
