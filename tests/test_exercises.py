"""The tutorial's exercises (docs/tutorial.md, "Exercises") and their answers (docs/solutions.md): every
command runs and shows the outcome the answer gives. The commands are quoted here verbatim and must
appear verbatim in the tutorial; the answers' numbers must appear in the solutions, and the coding
exercises' answers are extracted from the solutions and graded by the check."""
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
SOLUTIONS = (REPO / "docs" / "solutions.md").read_text()


def answer(number):
    """The text of solution `number` (its section of docs/solutions.md)."""
    m = re.search(rf"^## {number}\. .*?(?=^## |\Z)", SOLUTIONS, re.M | re.S)
    assert m, f"docs/solutions.md has no answer {number}"
    return m.group(0)


def solution_code(number):
    return re.search(r"```python\n(.*?)```", answer(number), re.S).group(1)


def run(command, tmp_path, timeout=600, replace=None):
    """Run a documented command: `python`/`torchrun` as this interpreter, /tmp/ex-* inside tmp_path
    (and `replace`: {documented path: the test's})."""
    assert command in TUTORIAL, f"not in docs/tutorial.md: {command}"
    command = command.replace("/tmp/ex-", f"{tmp_path}/ex-")
    for old, new in (replace or {}).items():
        command = command.replace(old, str(new))
    args = shlex.split(command)
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


def test_1_collectives_by_hand(tmp_path):
    rc, out = run("torchrun --nproc_per_node=2 launch/collectives.py", tmp_path)
    assert rc == 0, out[-3000:]
    assert "rank 0: before [1, 2, 3, 4]  after [6, 8]  sent 8 B" in out
    assert "rank 1: before [5, 6, 7, 8]  after [10, 12]  sent 8 B" in out
    assert "rank 1: before [5, 6, 7, 8]  after [6, 8, 10, 12]  sent 16 B" in out
    for words in ("`[6, 8]`", "`[10, 12]`", "8 B", "16 B", "`[1, 2]` on rank 0, `[3, 4]` on rank 1"):
        assert words in answer(1)


def test_2_keep_own_slice_breaks_every_gradient_below_fc8(tmp_path):
    rc, out = run("torchrun --nproc_per_node=2 launch/check.py --image-size 67 --num-classes 10 "
                  "--exercise keep-own-slice", tmp_path)
    assert rc != 0 and "FAIL: 8/68 tensors agree" in out, out[-3000:]
    ok = rows(out)
    agree = {k for k, v in ok.items() if v}
    assert agree == {(m, t) for m in ("eval", "train")
                     for t in ("logits", "loss", "fc8.weight.grad", "fc8.bias.grad")}


    assert "FAIL: 8/68 tensors agree" in answer(2)


GATHER = "torchrun --nproc_per_node=2 launch/check.py --image-size 67 --num-classes 10 --gather-backward /tmp/gather_backward.py"
LOGITS = "torchrun --nproc_per_node=2 launch/check.py --image-size 67 --num-classes 10 --logits-backward /tmp/logits_backward.py"


def test_3_the_gather_backward_template_fails_at_once(tmp_path):
    assert "cp exercises/gather_backward.py /tmp/gather_backward.py" in TUTORIAL
    rc, out = run(GATHER, tmp_path, replace={"/tmp/gather_backward.py": REPO / "exercises" / "gather_backward.py"})
    assert rc != 0, out[-3000:]   # torchrun exits 1 when a rank exits 2
    line = "error: /tmp/gather_backward.py: backward raised NotImplementedError: the body of backward is still to be written"
    assert line.replace("/tmp/gather_backward.py", str(REPO / "exercises" / "gather_backward.py")) in out
    assert line in answer(3)


def test_3_the_gather_backward_solution_passes(tmp_path):
    (tmp_path / "mine.py").write_text(solution_code(3))
    rc, out = run(GATHER, tmp_path, replace={"/tmp/gather_backward.py": tmp_path / "mine.py"})
    assert rc == 0 and "PASS: 68/68 tensors agree" in out, out[-3000:]
    assert "PASS: 68/68 tensors agree" in answer(3)


def test_3_a_wrong_gather_backward_fails_with_the_tensors_named(tmp_path):
    (tmp_path / "own.py").write_text("import torch.distributed as dist\n\n\ndef backward(grad, sizes, group, dim):\n"
                                     "    r = dist.get_rank(group)\n    return grad.narrow(dim, sum(sizes[:r]), sizes[r])\n")
    rc, out = run(GATHER, tmp_path, replace={"/tmp/gather_backward.py": tmp_path / "own.py"})
    assert rc == 1 and "FAIL: 8/68 tensors agree" in out, out[-3000:]
    named = re.search(r"^these differ: (.*)$", out, re.M).group(1).split(", ")
    assert "conv1.weight.grad" in named and "fc7.bias.grad" in named and "fc8.bias.grad" not in named
    assert len(named) == 30 and "names the 30 tensors" in answer(3)


def test_3_a_gather_backward_of_the_wrong_shape_is_named_in_one_line(tmp_path):
    (tmp_path / "ar.py").write_text("import torch.distributed as dist\n\n\ndef backward(grad, sizes, group, dim):\n"
                                    "    grad = grad.clone()\n    dist.all_reduce(grad, group=group)\n    return grad\n")
    rc, out = run(GATHER, tmp_path, replace={"/tmp/gather_backward.py": tmp_path / "ar.py"})
    assert rc != 0, out[-3000:]   # torchrun exits 1 when a rank exits 2
    assert "returned (8, 4096) on rank 0: it must return this rank's gradient, shape (8, 2048)" in out
    assert "returned (8, 4096) on rank 0: it must return this rank's gradient,\nshape (8, 2048)" in answer(3)


def test_4_the_logits_backward_solution_passes(tmp_path):
    assert "cp exercises/logits_backward.py /tmp/logits_backward.py" in TUTORIAL
    (tmp_path / "mine.py").write_text(solution_code(4))
    rc, out = run(LOGITS, tmp_path, replace={"/tmp/logits_backward.py": tmp_path / "mine.py"})
    assert rc == 0 and "PASS: 68/68 tensors agree" in out, out[-3000:]


def test_4_a_reduce_scatter_at_the_logits_doubles_every_gradient(tmp_path):
    (tmp_path / "rs.py").write_text(solution_code(3))       # the gather's rule, at the logits
    rc, out = run(LOGITS, tmp_path, replace={"/tmp/logits_backward.py": tmp_path / "rs.py"})
    assert rc == 1 and "FAIL: 4/68 tensors agree" in out, out[-3000:]
    assert re.search(r"^eval\s+fc8.bias.grad\s+float64\s+\S+\s+1.000e\+00\s+\S+\s+NO$", out, re.M), out
    assert "FAIL: 4/68 tensors agree" in answer(4) and "`1.000e+00`" in answer(4)


def test_5_conv4_reads_all(tmp_path):
    rc, out = run("python launch/summary.py --reads conv4=all", tmp_path)
    assert rc == 0
    paper, changed = Spec(), Spec().with_reads(conv4="all")
    assert changed.params_total - paper.params_total == 663_552
    assert "against the paper's connectivity: +663,552 parameters, +129,792 B per image sent forward by " \
           "each stream, +1 exchange(s)" in out
    assert re.search(r"^conv4\s+reduce-scatter", out, re.M)
    rc, out = run("python launch/check.py --image-size 67 --num-classes 10 --reads conv4=all", tmp_path)
    assert rc == 0 and "PASS: 68/68 tensors agree" in out, out[-3000:]
    assert "+663,552 parameters, +129,792 B per\nimage sent forward by each stream, +1 exchange(s)" in answer(5)
    assert 192 * 13 * 13 * 4 == 129_792 and 384 * 192 * 9 == 663_552


def test_6_the_tradeoff_runs_and_its_bytes_are_the_specs(tmp_path):
    # the loop's training command, one of its six runs cut to 2 steps; the accuracies are the learner's
    loop = re.search(r"^\s*for seed in 1 2 3; do for reads in conv3=all conv4=all; do (python launch/train.py .*?); "
                     r"done; done$", TUTORIAL, re.M).group(1)
    command = loop.replace("$reads", "conv4=all").replace("$seed", "1")
    args = shlex.split(command.replace("/tmp/ex-", f"{tmp_path}/ex-")) + ["--max-steps", "2", "--val-size", "64"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable] + args[1:], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "done: 2 steps" in out.stdout + out.stderr, out.stderr[-3000:]
    rc, out = run("python launch/summary.py --image-size 67 --num-classes 10 --reads conv4=all", tmp_path)
    assert "+663,552 parameters, +6,912 B per image sent forward by each stream, +1 exchange(s)" in out
    assert "+663,552 parameters, +6,912 B per image sent forward by each stream, +1\nexchange(s)" in answer(6)


def test_7_lrn_across_streams_changes_the_function_a_little(tmp_path):
    rc, out = run("python launch/check.py --image-size 67 --num-classes 10 --exercise lrn-across-streams", tmp_path)
    assert rc != 0 and "FAIL" in out
    ok = rows(out)
    for mode in ("eval", "train"):
        assert ok[(mode, "logits")] and ok[(mode, "loss")]
        assert not ok[(mode, "conv1.weight.grad")] and not ok[(mode, "fc6.weight.grad")]
    assert "24,200" in answer(7) and "5,832" in answer(7)
    conv1 = Spec().shapes[0]
    assert 2 * conv1.out_hw ** 2 * 4 == 24_200 and 2 * Spec().shapes[1].out_hw ** 2 * 4 == 5_832


def test_8_four_streams_bytes_and_memory(tmp_path):
    rc, out = run("python launch/summary.py --streams 4", tmp_path)
    assert rc == 0 and "185,016" in out and "15,064,666" in out
    assert "185,016" in answer(8) and "15,064,666" in answer(8)
    rc, out = run("torchrun --nproc_per_node=4 launch/bench.py --layouts split --image-size 67 --batch-size 16 "
                  "--steps 1 --warmup 0 --out /tmp/ex-4streams", tmp_path)
    assert rc == 0, out[-3000:]
    run4 = json.loads((tmp_path / "ex-4streams" / "bench.json").read_text())["runs"][0]
    spec4 = Spec(streams=4, image_size=67)
    assert run4["memory"]["param_bytes"] == 4 * spec4.params_per_stream(0)  # a quarter of the net


def test_9_crossover(tmp_path):
    rc, out = run("python launch/summary.py --streams 4", tmp_path)
    assert "below a batch of 985.1 images" in out
    rc, out = run("python launch/summary.py --precision bf16", tmp_path)
    assert "fp32 gradients: 243,860,896 B per step; the split sends less below a batch of 1,993.2 images" in out
    assert "16-bit gradients: 121,930,448 B per step; the split sends less below a batch of 996.6 images" in out
    for number in ("985.1", "1,993.2", "996.6", "367,032", "361,551,984", "122,344", "121,930,448"):
        assert number in answer(9)


def test_10_compute_beside_bytes(tmp_path):
    rc, out = run("python launch/summary.py", tmp_path)
    p = Spec()
    assert f"a training step is {p.flops_per_image_step():,} FLOPs per image" in out
    assert "conv layers: 91.9 % of the compute" in out and "3.8 % of the parameters" in out
    assert p.flops_per_image_step() == 6 * p.macs_per_image() - 2 * p.shapes[0].macs
    for words in ("91.9 %", "3.8 %", "8.1 %", "96.2 %", f"{p.flops_per_image_step():,}",
                  f"6 × {p.macs_per_image():,} − 2 × {p.shapes[0].macs:,}"):
        assert words in answer(10)


def test_11_overlap_timeline(tmp_path):
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


def test_12_more_epochs(tmp_path):
    rc, out = run("python launch/train.py --layout single --train-size 640 --val-size 200 --batch-size 32 "
                  "--epochs 2 --out /tmp/ex-epochs-2", tmp_path)
    assert rc == 0, out[-3000:]
    assert len(re.findall(r"^val\s+step \d+ epoch [01]:", out, re.M)) == 2 and "done:" in out


def test_13_simpler_model(tmp_path):
    rc, out = run("python launch/summary.py --image-size 67 --num-classes 10", tmp_path)
    assert "total parameters: 20,209,034" in out and "`total parameters: 20,209,034`" in answer(13)
    assert Spec(image_size=67, num_classes=10).params_total == 20_209_034


def test_14_batch_against_memory(tmp_path):
    rc, out = run("python launch/bench.py --layouts single --image-size 67 --batch-size 8 --sweep-batch 32 "
                  "--steps 1 --warmup 0 --out /tmp/ex-batch", tmp_path)
    assert rc == 0, out[-3000:]
    runs = json.loads((tmp_path / "ex-batch" / "bench.json").read_text())["runs"]
    peak = {r["batch_size"]: r["peak_mem_bytes"] for r in runs}
    assert peak[32] > peak[8]
