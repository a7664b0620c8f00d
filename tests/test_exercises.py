"""The tutorial's exercises (docs/tutorial.md, "Exercises") and their answers (docs/solutions.md): every
command runs and shows the outcome the answer gives. The commands are quoted here verbatim and must
appear verbatim in the tutorial; the answers' numbers must appear in the solutions, and the coding
exercises' answers are extracted from the solutions and graded by the check."""
import json
import math
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


def flat(number):
    """answer(number) with every run of whitespace one space (the page's line breaks are not its words)."""
    return " ".join(answer(number).split())


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
    # four ranks (docs/concepts.md quotes two, and tests/test_docs.py checks that quote)
    rc, out = run("torchrun --nproc_per_node=4 launch/collectives.py", tmp_path)
    assert rc == 0, out[-3000:]
    assert "rank 0: before [1, 2, 3, 4, 5, 6, 7, 8]  after [52, 56]  sent 24 B" in out
    assert "rank 2: before [17, 18, 19, 20, 21, 22, 23, 24]  after [68, 72]  sent 24 B" in out
    assert "rank 3: before [25, 26, 27, 28, 29, 30, 31, 32]  after [76, 80]  sent 24 B" in out
    assert "rank 1: before [9, 10, 11, 12, 13, 14, 15, 16]  after [52, 56, 60, 64, 68, 72, 76, 80]  sent 48 B" in out
    assert "rank 2: x [3]  W_r [9, 10, 11, 12]  grad arriving [9, 10, 11, 12]  reduce-scatter (comm.py): dL/dx_r [36]" in out
    assert "rank 2: x [3]  W_r [9, 10, 11, 12]  grad arriving [9, 10, 11, 12]  keep own slice (wrong): dL/dx_r [11]" in out
    assert "rank 2: x [3]  grad arriving [1, 2, 3, 4]  keep own slice (comm.py): dL/dx_r [3]" in out
    assert "rank 2: x [3]  grad arriving [1, 2, 3, 4]  reduce-scatter (wrong): dL/dx_r [12]" in out
    for words in ("`[52, 56]`", "`[60, 64]`", "`[68, 72]`", "`[76, 80]`", "24 B", "48 B", "`W_2 = [9, 10, 11, 12]`",
                  "`[36]`", "`[11]`", "`dL/dz = c = [1, 2, 3, 4]`", "`[3]`", "`[12]`"):
        assert words in flat(1)


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


def test_3_the_shapes_the_gather_backward_receives_and_returns(tmp_path):
    # the answer's solution, writing down on every call what it received and returned (a file per rank)
    (tmp_path / "shapes.py").write_text(solution_code(3) + f"""

_solution = backward


def backward(grad, sizes, group, dim):
    out = _solution(grad, sizes, group, dim)
    with open(f"{tmp_path}/calls_rank{{dist.get_rank(group)}}.txt", "a") as f:
        f.write(f"{{tuple(grad.shape)}} {{tuple(out.shape)}}\\n")
    return out
""")
    rc, out = run(GATHER, tmp_path, replace={"/tmp/gather_backward.py": tmp_path / "shapes.py"})
    assert rc == 0 and "PASS: 68/68 tensors agree" in out, out[-3000:]
    calls = [tuple(re.findall(r"\(.*?\)", line)) for line in (tmp_path / "calls_rank0.txt").read_text().splitlines()]
    assert calls[0] == ("(8, 4096)", "(8, 2048)"), calls[:5]          # the first call: the exchange before fc8
    assert ("(8, 256, 3, 3)", "(8, 128, 3, 3)") in calls                 # conv3's
    for words in ("exchange before fc8", "`(8, 4096)`", "`(8, 2048)`", "`(8, 256, 3, 3)`", "`(8, 128, 3, 3)`"):
        assert words in flat(3)


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


def test_4_the_logits_backward_template_fails_at_once(tmp_path):
    template = REPO / "exercises" / "logits_backward.py"
    rc, out = run(LOGITS, tmp_path, replace={"/tmp/logits_backward.py": template})
    assert rc != 0, out[-3000:]   # torchrun exits 1 when a rank exits 2
    line = "error: /tmp/logits_backward.py: backward raised NotImplementedError: the body of backward is still to be written"
    assert line.replace("/tmp/logits_backward.py", str(template)) in out
    assert "PASS" not in out
    assert line in answer(4)


def test_4_the_logits_backward_solution_passes(tmp_path):
    assert "cp exercises/logits_backward.py /tmp/logits_backward.py" in TUTORIAL
    (tmp_path / "mine.py").write_text(solution_code(4))
    rc, out = run(LOGITS, tmp_path, replace={"/tmp/logits_backward.py": tmp_path / "mine.py"})
    assert rc == 0 and "PASS: 68/68 tensors agree" in out, out[-3000:]


def test_4_a_reduce_scatter_at_the_logits_doubles_every_gradient(tmp_path):
    (tmp_path / "rs.py").write_text(solution_code(3))       # the gather's rule (exercise 3's), at the logits
    rc, out = run(LOGITS.replace("/tmp/logits_backward.py", "/tmp/gather_backward.py"), tmp_path,
                  replace={"/tmp/gather_backward.py": tmp_path / "rs.py"})
    assert rc == 1 and "FAIL: 4/68 tensors agree" in out, out[-3000:]
    assert re.search(r"^eval\s+fc8.bias.grad\s+float64\s+\S+\s+1.000e\+00\s+\S+\s+NO$", out, re.M), out
    assert "FAIL: 4/68 tensors agree" in answer(4) and "`1.000e+00`" in answer(4)


def test_5_conv4_reads_all(tmp_path):
    rc, out = run("python launch/summary.py --streams 8 --reads conv4=all", tmp_path)
    assert rc == 0
    paper, changed = Spec(streams=8), Spec(streams=8).with_reads(conv4="all")
    assert changed.params_total - paper.params_total == 1_161_216
    assert "against the paper's connectivity: +1,161,216 parameters, +227,136 B per image sent forward by " \
           "each stream, +1 exchange(s)" in out
    assert re.search(r"^conv4\s+reduce-scatter", out, re.M)
    rc, out = run("python launch/check.py --streams 8 --image-size 67 --num-classes 10 --reads conv4=all", tmp_path)
    assert rc == 0 and "PASS: 68/68 tensors agree" in out, out[-3000:]
    assert "`against the paper's connectivity: +1,161,216 parameters, +227,136 B per image sent forward by each stream, " \
           "+1 exchange(s)`" in flat(5) and "`PASS: 68/68 tensors agree`" in flat(5)
    assert 7 * 48 * 13 * 13 * 4 == 227_136 and 384 * (384 - 48) * 9 == 1_161_216
    # the 2-stream costs the answer compares with (docs/concepts.md's table)
    assert Spec().with_reads(conv4="all").params_total - Spec().params_total == 663_552
    assert "129,792 B and 663,552 parameters" in flat(5)


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
    rc, out = run("torchrun --nproc_per_node=2 launch/bench.py --layouts split --image-size 67 --batch-size 16 "
                  "--steps 1 --warmup 0 --out /tmp/ex-2streams", tmp_path)
    assert rc == 0, out[-3000:]
    run2 = json.loads((tmp_path / "ex-2streams" / "bench.json").read_text())["runs"][0]
    m4, m2 = run4["memory"], run2["memory"]
    assert m2["param_bytes"] == 4 * Spec(image_size=67).params_per_stream(0)
    # about half, not a quarter: the weights a little under half, the saved activations shrink less
    assert 0.45 < m4["tracked_bytes"] / m2["tracked_bytes"] < 0.55
    assert m4["param_bytes"] / m2["param_bytes"] < 0.5 < m4["activation_bytes"] / m2["activation_bytes"]
    for m in (m4, m2):
        assert m["grad_bytes"] == m["optimizer_bytes"] == m["param_bytes"]
    answer8 = flat(8)
    for words in (f"{m4['param_bytes']:,} B against {m2['param_bytes']:,} B",
                  f"{m4['activation_bytes']:,} B against {m2['activation_bytes']:,} B",
                  f"{m4['param_bytes'] / m2['param_bytes']:.2f}:",
                  f"{m4['activation_bytes'] / m2['activation_bytes']:.2f}:"):
        assert words in answer8, words
    if not m4.get("cuda_peak_bytes"):   # on a CPU the peak is the count, so the figures quoted are exact
        assert f"{m4['tracked_bytes'] / 2**20:.1f} MiB on 4 processes against {m2['tracked_bytes'] / 2**20:.1f} MiB on 2" \
            in answer8


def test_9_crossover(tmp_path):
    rc, out = run("python launch/summary.py --streams 4 --precision bf16", tmp_path)
    assert "fp32 gradients: 361,551,984 B per step; the split sends less below a batch of 1,970.1 images" in out
    assert "16-bit gradients: 180,775,992 B per step; the split sends less below a batch of 985.1 images" in out
    rc, out = run("python launch/summary.py --streams 8 --precision bf16", tmp_path)
    assert "fp32 gradients: 419,337,688 B per step; the split sends less below a batch of 1,958.6 images" in out
    assert "16-bit gradients: 209,668,844 B per step; the split sends less below a batch of 979.3 images" in out
    for s, crossover in ((4, "1,970.1"), (8, "1,958.6")):
        assert f"{Spec(streams=s, dtype_bytes=2).crossover_batch():,.1f}" == crossover
    for number in ("1,970.1", "1,958.6", "183,516", "214,102", "367,032", "428,204", "361,551,984", "419,337,688",
                   "985.1", "979.3", "180,775,992", "209,668,844"):
        assert number in answer(9)


def test_10_compute_beside_bytes(tmp_path):
    rc, out = run("python launch/summary.py --image-size 67", tmp_path)
    p = Spec(image_size=67)
    assert f"a training step is {p.flops_per_image_step():,} FLOPs per image" in out
    assert "conv layers: 65.1 % of the compute" in out and "9.6 % of the parameters" in out
    assert "fc layers: 34.9 % of the compute" in out and "90.4 % of the parameters" in out
    assert p.flops_per_image_step() == 6 * p.macs_per_image() - 2 * p.shapes[0].macs
    for words in ("65.1 %", "9.6 %", "34.9 %", "90.4 %", f"{p.flops_per_image_step():,}",
                  f"6 × {p.macs_per_image():,} − 2 × {p.shapes[0].macs:,}"):
        assert words in flat(10)
    big = Spec()   # the 227 px figures the answer compares with
    assert f"6 × {big.macs_per_image():,} − 2 × {big.shapes[0].macs:,} = {big.flops_per_image_step():,}" in flat(10)


def test_11_overlap_timeline(tmp_path):
    rc, out = run("torchrun --nproc_per_node=2 launch/bench.py --layouts split,split-overlap --micro-batches 4 "
                  "--image-size 67 --batch-size 32 --steps 2 --warmup 1 --profile /tmp/ex-prof --out /tmp/ex-prof",
                  tmp_path)
    assert rc == 0, out[-3000:]
    bench = json.loads((tmp_path / "ex-prof" / "bench.json").read_text())
    assert bench["micro_batches"] == 4
    sent = {r["label"]: r["bytes_sent_per_step"] for r in bench["runs"]}
    assert sent == {"split": 32 * Spec(image_size=67).bytes_per_image_step(),
                    "split-overlap": 32 * Spec(image_size=67).bytes_per_image_step()}
    assert f"{sent['split']:,} B per rank per step" in flat(11)
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
    # what the answer says the learner sees: the loss within 0.1 of ln 10, top-1 below 0.3
    val = [(float(loss), float(top1)) for loss, top1 in
           re.findall(r"^val\s+step \d+ epoch \d+: loss ([\d.]+) top1 ([\d.]+)", out, re.M)]
    assert all(abs(loss - math.log(10)) < 0.1 and top1 < 0.3 for loss, top1 in val), val
    assert "within 0.1 of ln 10 ≈ 2.30 and top-1 below 0.3" in flat(12)


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
    # the answer's why: the activations scale with the batch, the weights, gradients and momentum do not
    mem = {r["batch_size"]: r["memory"] for r in runs}
    weights = 4 * Spec(image_size=67).params_total
    for m in mem.values():
        assert m["param_bytes"] == m["grad_bytes"] == m["optimizer_bytes"] == weights
    assert 3.9 < mem[32]["activation_bytes"] / mem[8]["activation_bytes"] < 4.1
    answer14 = flat(14)
    assert f"{weights:,} B each at both batches" in answer14
    assert f"{mem[8]['activation_bytes']:,} B at 8 and {mem[32]['activation_bytes']:,} B at 32" in answer14
    if not any(m.get("cuda_peak_bytes") for m in mem.values()):   # on a CPU the peak is the count
        assert f"{peak[8] / 2**20:.1f} MiB at batch 8 and {peak[32] / 2**20:.1f} at 32" in answer14
