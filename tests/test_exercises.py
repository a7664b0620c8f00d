"""The tutorial's exercises (docs/tutorial.md, "Exercises"): every command runs and shows the outcome
the text promises. The commands are quoted here verbatim and must appear verbatim in the tutorial."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from split_alexnet.spec import Spec

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = (REPO / "docs" / "tutorial.md").read_text()


def run(command, tmp_path, timeout=600):
    """Run a documented command: `python`/`torchrun` as this interpreter, /tmp/ex-* inside tmp_path."""
    assert command in TUTORIAL, f"not in docs/tutorial.md: {command}"
    args = shlex.split(command.replace("/tmp/ex-", f"{tmp_path}/ex-"))
    if args[0] == "python":
        args = [sys.executable] + args[1:]
    elif args[0] == "torchrun":
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone"] + args[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout + out.stderr


def rows(text):
    """{(mode, tensor): ok} from the check's table."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(eval|train)\s+(.+?)\s+(float32|float64)\s+\S+\s+\S+\s+\S+\s+(yes|NO)$", line.strip())
        if m:
            out[(m.group(1), m.group(2))] = m.group(4) == "yes"
    return out


pytestmark = pytest.mark.slow


def test_1_keep_own_slice_breaks_every_gradient_below_fc8(tmp_path):
    rc, out = run("torchrun --nproc_per_node=2 launch/check.py --image-size 67 --num-classes 10 "
                  "--exercise keep-own-slice", tmp_path)
    assert rc != 0 and "FAIL: 8/68 tensors agree" in out, out[-3000:]
    ok = rows(out)
    agree = {k for k, v in ok.items() if v}
    assert agree == {(m, t) for m in ("eval", "train")
                     for t in ("logits", "loss", "fc8.weight.grad", "fc8.bias.grad")}


def test_2_conv4_reads_all(tmp_path):
    rc, out = run("python launch/summary.py --reads conv4=all", tmp_path)
    assert rc == 0
    paper, changed = Spec(), Spec().with_reads(conv4="all")
    assert changed.params_total - paper.params_total == 663_552
    assert "against the paper's connectivity: +663,552 parameters, +129,792 B per image sent forward by " \
           "each stream, +1 exchange(s)" in out
    assert re.search(r"^conv4\s+reduce-scatter", out, re.M)
    rc, out = run("python launch/check.py --image-size 67 --num-classes 10 --reads conv4=all", tmp_path)
    assert rc == 0 and "PASS: 68/68 tensors agree" in out, out[-3000:]


def test_3_lrn_across_streams_changes_the_function_a_little(tmp_path):
    rc, out = run("python launch/check.py --image-size 67 --num-classes 10 --exercise lrn-across-streams", tmp_path)
    assert rc != 0 and "FAIL" in out
    ok = rows(out)
    for mode in ("eval", "train"):
        assert ok[(mode, "logits")] and ok[(mode, "loss")]
        assert not ok[(mode, "conv1.weight.grad")] and not ok[(mode, "fc6.weight.grad")]
    conv1 = Spec().shapes[0]
    assert 2 * conv1.out_hw ** 2 * 4 == 24_200 and 2 * Spec().shapes[1].out_hw ** 2 * 4 == 5_832


def test_4_four_streams_bytes_and_memory(tmp_path):
    rc, out = run("python launch/summary.py --streams 4", tmp_path)
    assert rc == 0 and "185,016" in out and "15,064,666" in out
    rc, out = run("torchrun --nproc_per_node=4 launch/bench.py --layouts split --image-size 67 --batch-size 16 "
                  "--steps 1 --warmup 0 --out /tmp/ex-4streams", tmp_path)
    assert rc == 0, out[-3000:]
    run4 = json.loads((tmp_path / "ex-4streams" / "bench.json").read_text())["runs"][0]
    spec4 = Spec(streams=4, image_size=67)
    assert run4["memory"]["param_bytes"] == 4 * spec4.params_per_stream(0)  # a quarter of the net


def test_5_crossover(tmp_path):
    rc, out = run("python launch/summary.py --streams 4", tmp_path)
    assert "below a batch of 985.1 images" in out
    rc, out = run("python launch/summary.py --precision bf16", tmp_path)
    assert "fp32 gradients: 243,860,896 B per step; the split sends less below a batch of 1,993.2 images" in out
    assert "16-bit gradients: 121,930,448 B per step; the split sends less below a batch of 996.6 images" in out


def test_6_overlap_timeline(tmp_path):
    rc, out = run("torchrun --nproc_per_node=2 launch/bench.py --layouts split,split-overlap --image-size 67 "
                  "--batch-size 32 --steps 2 --warmup 1 --profile /tmp/ex-prof --out /tmp/ex-prof", tmp_path)
    assert rc == 0, out[-3000:]
    rc, out = run("python launch/figures.py --timeline /tmp/ex-prof --out /tmp/ex-prof", tmp_path)
    assert rc == 0, out
    for layout in ("split", "split-overlap"):
        for rank in (0, 1):
            assert re.search(rf"^{layout}\s+rank {rank}: step .* ms, compute .*, transfer .*, waiting for the peer",
                             out, re.M), out
    assert (tmp_path / "ex-prof" / "timeline.png").stat().st_size > 10_000


def test_7_more_epochs(tmp_path):
    rc, out = run("python launch/train.py --layout single --train-size 640 --val-size 200 --batch-size 32 "
                  "--epochs 2 --out /tmp/ex-epochs-2", tmp_path)
    assert rc == 0, out[-3000:]
    assert len(re.findall(r"^val\s+step \d+ epoch [01]:", out, re.M)) == 2 and "done:" in out


def test_8_simpler_model(tmp_path):
    rc, out = run("python launch/summary.py --image-size 67 --num-classes 10", tmp_path)
    assert "total parameters: 20,209,034" in out
    assert Spec(image_size=67, num_classes=10).params_total == 20_209_034


def test_9_batch_against_memory(tmp_path):
    rc, out = run("python launch/bench.py --layouts single --image-size 67 --batch-size 8 --sweep-batch 32 "
                  "--steps 1 --warmup 0 --out /tmp/ex-batch", tmp_path)
    assert rc == 0, out[-3000:]
    runs = json.loads((tmp_path / "ex-batch" / "bench.json").read_text())["runs"]
    peak = {r["batch_size"]: r["peak_mem_bytes"] for r in runs}
    assert peak[32] > peak[8]
