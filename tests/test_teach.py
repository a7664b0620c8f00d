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
