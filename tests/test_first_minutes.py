"""A new user's first ten minutes: what a run leaves and says, the bench's progress, convert's message,
a failed data lookup. In-process, tiny shapes runs at 67 px (a few seconds each)."""
import importlib.util
import io
import os
import shlex
import socket
import urllib.error
import urllib.request

import pytest

from split_alexnet.bench.progress import BenchProgress
from split_alexnet.cli import UsageError
from split_alexnet.config import parse_config
from split_alexnet.data import build_datasets
from split_alexnet.train import build, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_launcher(name):
    spec = importlib.util.spec_from_file_location(f"{name}_launcher", os.path.join(ROOT, "launch", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

# 32 images an epoch at batch 8: 4 steps; --log-every 50 is more than the run
TINY = ["--layout", "single", "--dataset", "shapes", "--train-size", "32", "--val-size", "8",
        "--image-size", "67", "--batch-size", "8", "--lr", "0.001", "--log-every", "50"]


def _train(argv, capsys):
    summary = run(build(parse_config(argv)))
    return summary, capsys.readouterr().out


@pytest.mark.slow
def test_a_short_run_plots_logs_and_says_how_to_go_on(tmp_path, capsys):
    out = str(tmp_path / "run")
    summary, said = _train(TINY + ["--max-steps", "3", "--save-every", "3", "--out", out], capsys)
    # the plot by default; at least one training line although --log-every 50 > 3 steps
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    assert "step 1/3 epoch 0: loss" in said and "step 3/3 epoch 0: loss" in said
    lines = said.splitlines()
    done = next(i for i, line in enumerate(lines) if line.startswith("done: 3 steps"))
    assert lines[done + 1].startswith("communication: none in one process")     # the result, then the folder
    assert lines[done + 2] == f"{out} holds config.json, run.json, metrics.jsonl, curves.png, checkpoints/step0000003 (newest)"
    evaluate, resume = lines[done + 3], lines[done + 4]
    cmd = "python launch/train.py --layout single"
    assert evaluate == f"  evaluate: {cmd} --resume {out} --eval-only"
    assert resume.startswith(f"  resume:   {cmd} --resume {out} --epochs 4 --max-steps 0")
    # the evaluate command, as printed, repeats the run's last validation and writes nothing
    argv = shlex.split(evaluate.split("evaluate:")[1])[2:]
    assert _load_launcher("train").main(argv) == 0
    said = capsys.readouterr().out
    val = summary["val"]
    assert (f"eval: {out}/checkpoints/step0000003 (step 3, epoch 0) on 8 shapes val images: loss "
            f"{val['loss']:.4f} top1 {val['top1']:.4f}") in said
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "curves.png", "metrics.jsonl", "run.json"]


def test_without_checkpoint_or_plot_the_last_line_says_so(tmp_path, capsys):
    out = str(tmp_path / "run")
    _, said = _train(TINY + ["--max-steps", "1", "--no-plot", "--out", out], capsys)
    assert not os.path.exists(os.path.join(out, "curves.png"))
    assert said.splitlines()[-1] == (f"{out} holds config.json, run.json, metrics.jsonl; no checkpoint (add --save-every N "
                                     f"to keep one, for --resume and --eval-only)")


def test_eval_only_needs_a_checkpoint():
    with pytest.raises(UsageError, match="--eval-only evaluates a checkpoint: give it with --resume DIR"):
        parse_config(TINY + ["--eval-only"])


@pytest.mark.slow
def test_convert_names_what_it_wrote(tmp_path, capsys):
    out = str(tmp_path / "run")
    _train(TINY + ["--max-steps", "1", "--save-every", "1", "--no-plot", "--quiet", "--out", out], capsys)
    src, dst = os.path.join(out, "checkpoints", "step0000001"), str(tmp_path / "shards")
    assert _load_launcher("convert").main([src, dst, "--to", "shards"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {dst}/stream0.pt (") and f"{dst}/stream1.pt (" in said
    assert f"MiB), {dst}/meta.pt: the split layout (2 streams, step 1), from {src} (single layout: single.pt)" in said
    assert said.rstrip().endswith(f"go on with: torchrun --nproc_per_node=2 launch/train.py --resume {dst}")


def _offline(monkeypatch):
    """No network: every URL fails as a failed name lookup does (torchvision catches it per mirror)."""
    def urlopen(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


FOUR = ("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz")


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_failed_download_leaves_no_folder_and_says_why(name, folder, tmp_path, monkeypatch):
    _offline(monkeypatch)
    data_dir = tmp_path / "new" / "data"
    with pytest.raises(UsageError) as e:
        build_datasets(name, str(data_dir), seed=0, download=True)
    message = str(e.value)
    assert message.startswith(f"{name}: {FOUR} not found in {data_dir} (nor in its {folder}/raw)"), message
    assert "the download failed for lack of network (" in message and "Name or service not known" in message
    assert os.listdir(tmp_path) == []                       # the folders the attempt made are gone
    # a folder that was there before stays; the one the attempt made inside it does not
    with pytest.raises(UsageError, match="lack of network"):
        build_datasets(name, str(tmp_path), seed=0, download=True, split_test=10)
    assert os.path.isdir(tmp_path) and os.listdir(tmp_path) == []


def test_bench_progress_lines_without_a_terminal():
    stream = io.StringIO()                                  # not a terminal: plain lines, one per round
    p = BenchProgress(total=2 * 3, rank=0, stream=stream)
    for i in range(3):
        for label in ("split", "split-overlap"):
            p.step(64, i, 1, 2, label, 2)
    p.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("bench: batch 64, split-overlap step 1/3 (warm-up) done; "
                                                   "2/6 layout-steps in ")
    assert all(" left" in line for line in lines) and lines[-1].endswith("about 0 s left")
    quiet = io.StringIO()
    other = BenchProgress(total=6, rank=1, stream=quiet)     # rank 1 says nothing
    other.step(64, 0, 1, 2, "split", 2)
    assert quiet.getvalue() == ""


def test_bench_progress_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    stream = Terminal()
    p = BenchProgress(total=4, rank=0, stream=stream)
    for i in range(2):
        for label in ("split", "ddp"):
            p.step(32, i, 0, 2, label, 2)
    p.close()
    text = stream.getvalue()
    assert "bench batch 32 step 2/2 ddp" in text and "4/4" in text and "layout-steps" not in text
