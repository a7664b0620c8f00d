"""The teaching helpers: Spec.with_reads and the crossover, the timeline (figure 3) from a real trace,
the honest bench plot, the teaching switches' wiring."""
import importlib.util
from pathlib import Path

import pytest
import torch

from split_alexnet import comm
from split_alexnet.exercises import keep_own_slice, load_rule, options
from split_alexnet.model import AlexNet, Stream
from split_alexnet.spec import Spec, parse_reads
from split_alexnet.timeline import draw_timeline, load, timeline

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO / "tests" / "fixtures" / "timeline"


def test_crossover_is_the_documented_997_and_moves_with_dtype_not_streams():
    p = Spec()
    assert p.bytes_per_image_step() == 123_344 + 121_344
    assert p.ddp_bytes_per_step() == 4 * p.params_total  # 2 (W-1)/W = 1 at W = 2
    assert round(p.crossover_batch()) == 997
    assert Spec(dtype_bytes=2).crossover_batch() == pytest.approx(2 * p.crossover_batch())
    assert Spec(dtype_bytes=2).crossover_batch(grad_bytes=2) == pytest.approx(p.crossover_batch())
    assert abs(Spec(streams=4).crossover_batch() / p.crossover_batch() - 1) < 0.02
    assert Spec(streams=1).crossover_batch() == float("inf")


def test_with_reads_adds_an_exchange_and_the_models_follow():
    spec = Spec(image_size=67, num_classes=10).with_reads(**parse_reads("conv4=all"))
    assert [e.name for e in spec.exchanges] == ["conv3", "conv4", "fc6", "fc7", "fc8", "logits"]
    net = AlexNet(spec=spec)
    assert net.conv4.groups == 1 and net.conv5.groups == 2
    assert sum(p.numel() for p in net.parameters()) == spec.params_total
    assert Stream(spec, 0).conv4.weight.shape == (192, 384, 3, 3)
    with pytest.raises(ValueError, match="only conv2..conv5"):
        Spec().with_reads(fc6="own")
    with pytest.raises(ValueError, match="own or all"):
        Spec().with_reads(conv4="some")
    with pytest.raises(ValueError, match="LAYER=own"):
        parse_reads("conv4")


def test_the_summary_launcher_compares_with_the_paper(capsys):
    mod_spec = importlib.util.spec_from_file_location("summary_launcher", REPO / "launch" / "summary.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    assert mod.main(["--reads", "conv2=all", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "+307,200 parameters" in out and "+69,984 B per image" in out  # 48x27x27 x 2 B
    assert "16-bit activations" in out


def test_the_exercises_are_arguments_not_patches():
    backward = comm._GatherForDistinctKernels.__dict__["backward"]
    assert options("keep-own-slice") == {"split": {"gather_rule": keep_own_slice}}
    assert comm._GatherForDistinctKernels.__dict__["backward"] is backward  # nothing was patched
    x = torch.randn(2, 3, 67, 67)
    spec = Spec(image_size=67, num_classes=10)
    torch.manual_seed(0)
    net = AlexNet(spec=spec).eval()
    torch.manual_seed(0)
    crossed_net = AlexNet(spec=spec, **options("lrn-across-streams")["single"]).eval()
    ref, crossed = net(x), crossed_net(x)
    assert not torch.equal(ref, crossed) and torch.allclose(ref, crossed, rtol=1e-3)
    assert not AlexNet(spec=spec).lrn_across_streams  # another instance keeps the paper's rule
    with pytest.raises(ValueError):
        options("no-such-exercise")


def test_a_learners_rule_is_loaded_and_checked(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_rule(tmp_path / "missing.py", "--gather-backward")
    (tmp_path / "none.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no function backward"):
        load_rule(tmp_path / "none.py", "--gather-backward")
    rule = load_rule(REPO / "exercises" / "gather_backward.py", "--gather-backward")
    with pytest.raises(comm.RuleError, match="NotImplementedError: the body of backward is still to be written"):
        rule(torch.zeros(1, 4), [2, 2], None, 1)


def test_the_timeline_reads_both_ranks_and_draws(tmp_path):
    lanes = timeline(load(TRACES))
    assert list(lanes) == ["split", "split-overlap"]
    for ranks in lanes.values():
        assert [l.rank for l in ranks] == [0, 1]
        for l in ranks:
            step = l.end - l.start
            assert 0 < l.total("compute") < step
            assert l.transfer and all(k in ("all-gather", "reduce-scatter") for *_, k in l.transfer)
            assert {k for *_, k in l.transfer} == {"all-gather", "reduce-scatter"}
            assert all(l.start - 1e-6 <= a <= b <= l.end + 1e-6 for a, b, _ in l.compute)
        # a collective completes only when both ranks have issued it: one of them waited
        assert sum(l.total("wait") for l in ranks) > 0
    fig = draw_timeline(lanes, "test")
    from split_alexnet.figures import save
    save(fig, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="--profile"):
        load(tmp_path)


def test_the_committed_timeline_is_listed():
    assert (REPO / "docs" / "figures" / "timeline.png").is_file()
    assert "(timeline.png)" in (REPO / "docs" / "figures" / "README.md").read_text()


def _result():
    runs = []
    for b in (8, 16):
        for i, label in enumerate(("split", "ddp")):
            runs.append(dict(label=label, layout=label, batch_size=b, step_s=1.0 + i, images_per_s=b / (1.0 + i),
                             images_per_s_min=b / (1.2 + i), images_per_s_max=b / (0.9 + i), comm_s=0.1,
                             peak_mem_bytes=2**20 * b,
                             breakdown=dict(fwd_compute_s=0.3, bwd_compute_s=0.5, optimizer_s=0.1)))
    return dict(runs=runs, batch_size=8, image_size=67, dtype="fp32", precision="fp32", device="x86_64 CPU, 2 cores",
                world=2, backend="gloo", threads_per_rank=1, warmup=1, steps=3, date="2026-11-28")


def test_the_bench_plot_is_honest(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from split_alexnet.bench import plot as bench_plot
    saved = {}
    real_savefig = plt.Figure.savefig

    def grab(fig, path, **kw):
        saved["fig"] = fig
        return real_savefig(fig, path, **kw)

    plt.Figure.savefig = grab
    try:
        bench_plot.plot(_result(), tmp_path / "b.png")
    finally:
        plt.Figure.savefig = real_savefig
    fig = saved["fig"]
    title = fig._suptitle.get_text()
    for words in ("2 cores", "1 thread(s) per rank", "allocator", "67 px", "fp32"):
        assert words in title
    axes = fig.axes
    assert all(ax.get_ylim()[0] == 0 for ax in axes)
    assert "batch 8" in axes[0].get_title()
    colours = bench_plot.layout_colours(_result())
    for ax in axes[1:]:
        for line in ax.get_lines():
            if line.get_label() in colours:
                assert matplotlib.colors.to_hex(line.get_color()) == colours[line.get_label()]
    assert bench_plot.step_range(_result()["runs"][0]) == pytest.approx((0.9, 1.2))


def test_the_bench_plots_title_fits_its_figure(tmp_path):
    # one layout, no sweep: the narrowest figure (6.2 in), where the one-line title was clipped
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from split_alexnet.bench import plot as bench_plot
    result = _result()
    result["runs"] = [r for r in result["runs"] if r["batch_size"] == 8]
    result["device"] = "NVIDIA H100 80GB HBM3 x 2, 52 cores (Intel(R) Xeon(R) Platinum 8480+)"
    result["allocator"] = "keep freed memory: glibc: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB - 1"
    saved = {}
    real_savefig = plt.Figure.savefig

    def grab(fig, path, **kw):
        saved["fig"] = fig
        return real_savefig(fig, path, **kw)

    plt.Figure.savefig = grab
    try:
        bench_plot.plot(result, tmp_path / "b.png")
    finally:
        plt.Figure.savefig = real_savefig
    fig = saved["fig"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)            # the figure was closed after saving: draw it again
    canvas.draw()
    box = fig._suptitle.get_window_extent(canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, (box, fig.bbox)
    assert fig._suptitle.get_text().replace("\n", "; ") == bench_plot.describe(result)


@pytest.mark.slow
def test_the_main_jobs_last_lines_report_the_measured_communication_share(tmp_path):
    import os
    import re
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
           "--train-size", "48", "--val-size", "8", "--image-size", "67", "--batch-size", "8", "--epochs", "1",
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    m = re.search(r"communication: the exchanges took ([\d.]+) % of the step time on rank 0 \(([\d.]+) of ([\d.]+) "
                  r"s per step, over 5 step\(s\) from step 2, waiting for the peer included; ([\d,]+) B sent", out)
    assert m, out[-3000:]
    assert 0 < float(m.group(1)) < 100 and float(m.group(2)) < float(m.group(3))
    # what the meter counted is what the spec says one stream sends per step (shapes: 10 classes)
    assert int(m.group(4).replace(",", "")) == 8 * Spec(image_size=67, num_classes=10).bytes_per_image_step()
    assert "launch/bench.py" in out.split("communication:", 1)[1]


def test_training_takes_another_connectivity(tmp_path):
    # the tutorial's trade-off exercise trains with --reads conv4=all: one step, single layout
    from split_alexnet.config import parse_config
    from split_alexnet.train import build, run
    job = build(parse_config(["--layout", "single", "--reads", "conv4=all", "--train-size", "8", "--val-size", "4",
                              "--image-size", "67", "--batch-size", "4", "--max-steps", "1", "--quiet", "--no-plot",
                              "--out", str(tmp_path / "run")]))
    assert job.model.conv4.groups == 1 and job.model.conv5.groups == 2
    assert [e.name for e in job.spec.exchanges] == ["conv3", "conv4", "fc6", "fc7", "fc8", "logits"]
    assert run(job)["steps"] == 1


def test_the_timeline_labels_what_follows_the_optimizer_zero_grad():
    for ranks in timeline(load(TRACES)).values():
        for lane in ranks:
            opt_end = max(b for a, b, p in lane.compute if p == "optimizer")
            after = [(a, b, p) for a, b, p in lane.compute if a >= opt_end]
            assert after and {p for *_, p in after} == {"zero_grad"}   # it was drawn as backward
            assert all(b <= opt_end for a, b, p in lane.compute if p == "backward")


@pytest.mark.slow
def test_the_readmes_first_measurement_runs_and_prints_what_it_explains(tmp_path):
    import os
    import re
    import shlex
    import subprocess
    import sys
    readme = (REPO / "README.md").read_text()
    command = re.search(r"^(torchrun --nproc_per_node=2 launch/bench.py --layouts split,ddp .*)$", readme, re.M).group(1)
    args = shlex.split(command.replace("/tmp/first", str(tmp_path / "first")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone"] + args[1:], cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("layout"))
    for column in ("comm", "(min)", "comm%", "step s", "MB sent/step", "spec MB"):
        assert column in header and f"`{column}`" in readme
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith(("split ", "ddp "))}
    assert set(rows) == {"split", "ddp"}
    for row in rows.values():   # MB sent/step (counted) equals spec MB, as the README says: the 3rd and 2nd last
        assert row[-3] == row[-2]


# ---- the exercises ask first: their answers are computed here, in docs/solutions.md, and nowhere before ----

DOCS = REPO / "docs"
SOLUTIONS = (DOCS / "solutions.md").read_text()
TUTORIAL = (DOCS / "tutorial.md").read_text()
# what a learner reads before (and while) answering: the README, concepts.md and glossary.md, which the
# tutorial sends them to first, and the tutorial itself, its exercises' own text included
FIRST_READ = {name: (REPO / name).read_text() for name in
              ("README.md", "docs/concepts.md", "docs/glossary.md", "docs/tutorial.md")}


def _answer(number):
    """Solution `number` of docs/solutions.md, its line breaks as spaces."""
    import re
    m = re.search(rf"^## {number}\. .*?(?=^## |\Z)", SOLUTIONS, re.M | re.S)
    assert m, f"docs/solutions.md has no answer {number}"
    return " ".join(m.group(0).split())


def _exercises():
    """{number: text} of the tutorial's numbered exercises."""
    import re
    section = TUTORIAL.split("\n## Exercises\n", 1)[1]
    items = re.split(r"^(\d+)\. ", section, flags=re.M)
    return {int(n): text for n, text in zip(items[1::2], items[2::2])}


def _summary(argv):
    import contextlib
    import io
    spec = importlib.util.spec_from_file_location("summary_launcher", REPO / "launch" / "summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert module.main(argv) == 0
    return out.getvalue()


def _launcher(name):
    spec = importlib.util.spec_from_file_location(f"{name}_launcher", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _answers_1():
    # torchrun --nproc_per_node=4 launch/collectives.py: rank r holds 8r+1 .. 8r+8; W_r = [4r+1 .. 4r+4]; c = [1 .. 4]
    collectives = _launcher("collectives")
    w = 4
    full = [torch.arange(1.0 + 2 * w * r, 1.0 + 2 * w * (r + 1)) for r in range(w)]
    total = sum(full)
    parts = [collectives.show(p) for p in total.split(2)]
    part_bytes = 2 * 4
    sent_rs = (w - 1) * part_bytes
    assert collectives.ring_allreduce_bytes(full[0].numel() * 4, w) == 2 * sent_rs
    rows = [torch.arange(1.0 + w * r, 1.0 + w * (r + 1)) for r in range(w)]
    c = torch.arange(1.0, 1.0 + w)
    r = 2
    return [*parts, f"{sent_rs} B", f"{2 * sent_rs} B", collectives.show(rows[r]),
            collectives.show(sum(rows)[r:r + 1]),                  # the reduce-scatter: entry r, summed over ranks
            collectives.show(rows[r][r:r + 1]),                    # keep own slice, there: one term
            collectives.show(c[r:r + 1]),                          # keep own slice of the same loss: right
            collectives.show(w * c[r:r + 1])]                      # reduce-scatter of it: w times


def _answers_3():
    # the shapes the gather's backward receives and returns on rank 0, under the exercise's check
    from split_alexnet.model import AlexNet, Stream
    batch = _launcher("check").parse_args([]).batch_size
    spec = Spec(image_size=67, num_classes=10)
    assert [e.name for e in spec.exchanges][-2:] == ["fc8", "logits"]   # backward: fc8's is the gather's first call
    net, stream = AlexNet(spec=spec).eval(), Stream(spec, 0)
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0].shape)
        return hook

    for name in ("conv3", "fc8"):
        getattr(net, name).register_forward_pre_hook(record(name))
    with torch.no_grad():
        net(torch.zeros(batch, 3, 67, 67))
    conv3 = tuple(seen["conv3"])
    assert conv3[1] == stream.conv3.in_channels and tuple(seen["fc8"]) == (batch, stream.fc8.in_features)
    return [str(tuple(seen["fc8"])), str((batch, stream.fc7.out_features)),
            str(conv3), str((batch, stream.conv2.out_channels, *conv3[2:]))]


def _answers_4():
    # a reduce-scatter at the logits: every gradient times the streams; only the logits and the loss agree
    from split_alexnet.model import AlexNet
    spec = Spec(image_size=67, num_classes=10)
    params = len(list(AlexNet(spec=spec).named_parameters()))
    per_mode = 2 + 2 * params                          # logits, loss, every gradient, every parameter after the steps
    return [f"{2 * 2}/{2 * per_mode} tensors agree", f"{spec.streams - 1:.3e}"]


def _answers_5():
    paper, changed = Spec(streams=8), Spec(streams=8).with_reads(conv4="all")
    sent = {e.name: e.bytes for e in changed.exchanges}["conv4"]
    added = changed.params_total - paper.params_total
    line = f"+{added:,} parameters, +{sent:,} B per image sent forward by each stream, +1 exchange(s)"
    assert line in _summary(["--streams", "8", "--reads", "conv4=all"])
    return [f"{sent:,}", f"{added:,}", line]


def _answers_9():
    out = []
    for s in (4, 8):
        crossover = f"{Spec(streams=s, dtype_bytes=2).crossover_batch():,.1f}"
        assert f"the split sends less below a batch of {crossover} images" in _summary(
            ["--streams", str(s), "--precision", "bf16"])
        out.append(crossover)
    return out


def _answers_10():
    p = Spec(image_size=67)
    conv_macs = sum(r.macs for r in p.shapes if r.layer.kind == "conv")
    conv_params = sum(r.params_total for r in p.shapes if r.layer.kind == "conv")
    shares = [f"{100 * conv_macs / p.macs_per_image():.1f} %", f"{100 * conv_params / p.params_total:.1f} %"]
    printed = _summary(["--image-size", "67"])
    assert f"conv layers: {shares[0]} of the compute" in printed and f"{shares[1]} of the parameters" in printed
    assert f"a training step is {p.flops_per_image_step():,} FLOPs per image" in printed
    return [*shares, f"{p.flops_per_image_step():,}"]


def _answers_11():
    from split_alexnet.bench.stats import spec_bytes_per_step
    spec = Spec(image_size=67)                          # the bench's net: 67 px, 1000 classes
    sent = spec_bytes_per_step(spec, "split-overlap", 32, 2)
    assert sent == spec_bytes_per_step(spec, "split", 32, 2) == 32 * spec.bytes_per_image_step()
    return [f"{sent:,}"]


def _answers_6():
    # the trade-off's bytes and weights (the six top-1 values are one measured run, quoted as such)
    paper = Spec(image_size=67, num_classes=10)
    changed = paper.with_reads(conv4="all")
    conv4 = [next(r for r in s.shapes if r.layer.name == "conv4").params_total // 2 for s in (changed, paper)]
    steps = [changed.bytes_per_image_step(), paper.bytes_per_image_step()]
    more = f"+{round(100 * (steps[0] - steps[1]) / steps[1])} %"
    assert f"one stream sends {steps[0]:,} B per image" in _summary(
        ["--image-size", "67", "--num-classes", "10", "--reads", "conv4=all"])
    return [f"{steps[0]:,} B against the paper's {steps[1]:,} ({more}", f"({conv4[0]:,} against {conv4[1]:,})"]


ASKED_FIRST = {1: _answers_1, 3: _answers_3, 4: _answers_4, 5: _answers_5, 6: _answers_6, 9: _answers_9,
               10: _answers_10, 11: _answers_11}


@pytest.mark.parametrize("number", sorted(ASKED_FIRST))
def test_the_exercise_asks_what_the_reading_does_not_show(number):
    import re
    answers = ASKED_FIRST[number]()
    assert answers
    exercise = _exercises()[number]
    assert re.search(r"\*(Predict|Compute by hand|Choose|Explain)\*", exercise), "the exercise asks first"
    for words in answers:
        assert words in _answer(number), f"solution {number} does not give {words!r}, which the code computes"
        pattern = r"(?<![\d.,])" + re.escape(words) + r"(?![\d])"
        for doc, text in FIRST_READ.items():
            assert not re.search(pattern, text), f"{doc} shows {words!r}, exercise {number}'s answer, before it is asked"


def test_every_exercise_has_its_solution():
    import re
    titles = re.findall(r"^## (\d+)\. ", SOLUTIONS, re.M)
    assert [int(n) for n in titles] == sorted(_exercises()) == list(range(1, len(_exercises()) + 1))


# a mention of "exercise N" and the exercise it means: (file, pattern, words of the tutorial's exercise N)
EXERCISE_MENTIONS = [
    ("split_alexnet/exercises.py", r"which exercise (\d+) puts at the wrong place", "--exercise keep-own-slice"),
    ("docs/concepts.md", r"the bug of the tutorial's exercise (\d+)", "--exercise keep-own-slice"),
    ("docs/solutions.md", r"is exercise (\d+)'s bug", "--exercise keep-own-slice"),
    ("docs/solutions.md", r"but not like exercise (\d+)", "--exercise keep-own-slice"),
    ("docs/glossary.md", r"the tutorial's exercise (\d+)", "--exercise lrn-across-streams"),
    ("docs/tutorial.md", r"your\s+reduce-scatter of exercise (\d+)", "--gather-backward"),
    ("docs/solutions.md", r"Graded with exercise (\d+)'s", "--gather-backward"),
]


def test_every_mention_of_an_exercise_names_the_right_one():
    import re
    exercises = _exercises()
    files = [REPO / "README.md", *DOCS.rglob("*.md"), *(REPO / "split_alexnet").rglob("*.py"),
             *(REPO / "launch").glob("*.py"), *(REPO / "exercises").glob("*.py")]
    listed = {(f, p) for f, p, _ in EXERCISE_MENTIONS}
    for path in files:
        text = path.read_text()
        rel = str(path.relative_to(REPO))
        for m in re.finditer(r"exercises?\s+(\d+)", text, re.I):
            assert any(f == rel and re.search(p, text[max(0, m.start() - 60):m.end() + 40]) for f, p in listed), \
                f"{rel}: {m.group(0)!r} is not in EXERCISE_MENTIONS: add it, with the exercise it means"
        for m in re.finditer(r"\b(first|second|third|fourth|fifth|last) exercise", text, re.I):
            assert "d2l's" in text[max(0, m.start() - 6):m.start()], f"{rel}: {m.group(0)!r}: say its number"
    for rel, pattern, words in EXERCISE_MENTIONS:
        m = re.search(pattern, (REPO / rel).read_text())
        assert m, f"{rel} no longer says {pattern!r}: update EXERCISE_MENTIONS"
        assert words in exercises[int(m.group(1))], f"{rel}: {m.group(0)!r}, but that exercise is not {words!r}'s"


def test_the_logits_template_fails_until_written(tmp_path):
    rule = load_rule(REPO / "exercises" / "logits_backward.py", "--logits-backward")
    with pytest.raises(comm.RuleError, match="NotImplementedError: the body of backward is still to be written"):
        rule(torch.zeros(1, 10), [5, 5], None, 1)


def test_the_timeline_shows_what_the_overlap_answer_says():
    # solution 11: in split no transfer runs while the rank computes; in split-overlap part of them do
    def overlap(a, b):
        return sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1, *_ in a for b0, b1, *_ in b)

    lanes = timeline(load(TRACES))
    for layout, ranks in lanes.items():
        for lane in ranks:
            busy = [c for c in lane.compute if c[2] in ("forward", "backward")]
            hidden = overlap(lane.transfer, busy)
            if layout == "split":
                assert hidden == 0, (lane.rank, hidden)
            else:
                assert hidden > 0.1 * lane.total("transfer"), (lane.rank, hidden)
    answer = _answer(11)
    assert "no transfer runs while it computes" in answer
    assert "part of the transfers run while the compute lane is busy with another micro-batch" in answer
