"""The bench: byte accounting against the spec, overlap == plain split, the JSON schema, bad input.

No timing thresholds: timings belong to the bench's output, not to tests. Multi-rank tests launch
torchrun (2 gloo ranks on CPU) at 67 px, the smallest input AlexNet takes.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from split_alexnet.bench import BenchConfig, check_config, spec_bytes_per_step
from split_alexnet.cli import UsageError
from split_alexnet.spec import Spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240  # a dead peer ends the job long before this (the process-group timeout)


def _torchrun(args, cwd=ROOT):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_spec_bytes_match_the_paper_arithmetic():
    spec = Spec()  # 2 streams, 227 px, fp32
    conv3 = spec.exchanges[0]
    assert (conv3.name, conv3.bytes) == ("conv3", 86_528)  # 128 x 13 x 13 floats to the other stream
    # per step at batch 64: forward everything, backward again except the logits (own slice, no comm)
    assert spec_bytes_per_step(spec, "split", 64, 2) == 64 * (2 * 123_344 - 2_000)
    assert spec_bytes_per_step(spec, "ddp", 64, 2) == 4 * spec.params_total  # ring: 2(W-1)/W x grads


OVERLAP_SCRIPT = textwrap.dedent("""
    import json, torch, torch.distributed as dist, torch.nn.functional as F
    from split_alexnet import comm
    from split_alexnet.check import ATOL, RTOL
    from split_alexnet.model import SplitAlexNet
    from split_alexnet.overlap import overlapped_forward
    from split_alexnet.spec import Spec

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = Spec(image_size=67, num_classes=10)
    batch, micro = 8, 4
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 67, 67, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    rows, counted = [], {}
    for mode in ("eval", "train"):
        torch.manual_seed(0)
        nets = [SplitAlexNet(spec, rank, dropout_seed=5, init="d2l") for _ in range(2)]
        for net in nets[1:]:
            net.load_state_dict(nets[0].state_dict())
        outs = []
        for name, net, fwd in (("plain", nets[0], lambda n: n(x)),
                               ("overlap", nets[1], lambda n: overlapped_forward(n, x, micro))):
            net.train(mode == "train")
            with comm.metered() as meter:
                out = fwd(net)
                F.cross_entropy(out, y).backward()
            counted[f"{mode}/{name}"] = dict(meter.bytes)
            outs.append(out)
        ref = nets[0]
        for name, out, net in (("overlap", outs[1], nets[1]),):
            pairs = [("logits", out, outs[0])] + [(n, p.grad, q.grad) for (n, p), (_, q) in
                     zip(net.named_parameters(), ref.named_parameters())]
            for tensor, a, b in pairs:
                diff = (a - b).abs().max()
                ref_max = b.abs().max()
                for v in (diff, ref_max):
                    dist.all_reduce(v, op=dist.ReduceOp.MAX)
                rows.append(dict(mode=mode, forward=name, tensor=tensor, diff=diff.item(),
                                 ref_max=ref_max.item(), ok=bool(diff <= RTOL * ref_max + ATOL)))
    if rank == 0:
        print("RESULT " + json.dumps(dict(rows=rows, counted=counted, batch=batch)))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_overlap_equals_plain_split_and_bytes_match_spec(tmp_path):
    """split-overlap (4 micro-batches, async exchanges) computes the plain split's logits and gradients,
    in eval and in train mode (dropout on), to the check's tolerance: max|a-b| <= 1e-4 max|b| + 1e-7.

    Why a tolerance at all: the micro-batched weight gradient is a sum of 4 partial GEMMs instead of one,
    and a kernel may block differently for a smaller batch: fp32 summation order only (see
    split_alexnet/check.py for the bound). A wrong slice, a missed reduce-scatter or a mask drawn for the
    wrong rows is off by O(1).
    """
    script = tmp_path / "overlap_check.py"
    script.write_text(OVERLAP_SCRIPT)
    proc = _torchrun([str(script)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    rows = result["rows"]
    assert len(rows) == 2 * 17  # modes x overlap x (logits + 16 parameter grads)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, f"differ beyond tolerance: {bad}"
    # every exchange sent exactly what the spec says, forward and backward, in both modes
    spec, batch = Spec(image_size=67, num_classes=10), result["batch"]
    want = {}
    for e in spec.exchanges:
        want[f"{e.name}/fwd"] = batch * e.bytes
        if e.backward == "reduce-scatter":
            want[f"{e.name}/bwd"] = batch * e.bytes
    for key, got in result["counted"].items():
        assert got == want, f"{key}: counted {got}, spec {want}"


@pytest.mark.slow
def test_quick_bench_writes_documented_json_and_plot(tmp_path):
    out = tmp_path / "bench"
    prof = tmp_path / "prof"
    proc = _torchrun(["launch/bench.py", "--image-size", "67", "--batch-size", "4", "--steps", "2",
                      "--warmup", "1", "--out", str(out), "--profile", str(prof)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for words in ("single (1 thr)", "split-overlap", "exchange   B/image spec", "logits"):
        assert words in proc.stdout, words  # the table and the exchanges were printed
    assert "goal" not in proc.stdout  # targets live in docs/benchmarks.md, not in the output
    # progress without a terminal: one line per round on rank 0's stderr, the last with nothing left
    # (contained, not at the line's start: torchrun's own stderr lines may run into a line under load)
    progress = [l for l in proc.stderr.splitlines() if "bench: batch 4, " in l]
    assert len(progress) == 3 and "21/21 layout-steps in " in progress[-1], progress
    assert all("left" in l for l in progress), progress
    result = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0
    for rank in (0, 1):  # a trace per rank, with the per-layer and per-exchange labels
        trace = (prof / f"trace_rank{rank}.json").read_text()
        assert '"step:split"' in trace and '"conv3"' in trace and '"exchange:conv3"' in trace
        assert "exchange:conv3/wait" in trace
        assert "step:split-overlap" in (prof / f"steps_rank{rank}.txt").read_text()
    for key in ("device", "backend", "batch_size", "image_size", "streams", "runs", "exchanges"):
        assert key in result, key
    assert "targets" not in result
    # CPU, gloo: every figure on the host's clock, the LRN share on the profiler's CPU time
    assert result["clocks"] == dict(step="host", phases="host", exchanges="host", exposed_comm="host",
                                    ddp_in_flight="host", cpu_s="host_process_time", lrn_share="profiler_cpu",
                                    bound_probe="host")
    ddp = next(r for r in result["runs"] if r["layout"] == "ddp")
    assert ddp["breakdown"]["allreduce_in_flight_s"] > 0  # the buckets' (issued, done) marks of the clock
    assert (result["backend"], result["batch_size"], result["image_size"], result["streams"]) == \
        ("gloo", 4, 67, 2)
    layouts = [r["layout"] for r in result["runs"]]
    assert layouts == ["single", "single", "split", "split-overlap", "ddp", "torchvision", "torchvision-all"]
    # the peer: torchvision's AlexNet at 67 * 224 / 227 = 66 px, one device, nothing sent
    tv, tv_all = result["runs"][5], result["runs"][6]
    assert (tv["image_size"], tv["threads"], tv["devices"], tv["bytes_sent_per_step"]) == (66, 1, 1, 0)
    assert (tv_all["label"], tv_all["threads"]) == ("torchvision-all (2 thr)", 2)
    # the ratios: one per row, images/s over torchvision's (one rank's threads) and torchvision-all's
    ratios = {r["label"]: r for r in result["ratios"]}
    assert list(ratios) == [r["label"] for r in result["runs"]]
    for run in result["runs"]:
        r = ratios[run["label"]]
        assert r["vs_torchvision"] == pytest.approx(run["images_per_s"] / tv["images_per_s"])
        assert r["vs_torchvision_all"] == pytest.approx(run["images_per_s"] / tv_all["images_per_s"])
    assert ratios["torchvision (1 thr)"]["vs_torchvision"] == 1.0
    assert "/ torchvision-all" in proc.stdout and "LRN share of the step" in proc.stdout
    # LRN's share (profiled): in (0, 1) where the model has LRN, null for torchvision's (it has none)
    for run in result["runs"]:
        if run["layout"].startswith("torchvision"):
            assert run["lrn_share"] is None, run["label"]
        else:
            assert 0.0 < run["lrn_share"] < 1.0, (run["label"], run["lrn_share"])
    assert "LRN" in (prof / "steps_rank0.txt").read_text()
    run_keys = ("layout", "devices", "threads", "images_per_s", "images_per_s_min", "images_per_s_max",
                "step_s", "comm_s", "bytes_sent_per_step", "peak_mem_bytes", "breakdown")
    for run in result["runs"]:
        for key in run_keys:
            assert key in run, (run["layout"], key)
        assert run["images_per_s_min"] <= run["images_per_s"] <= run["images_per_s_max"]
        assert run["bytes_sent_per_step"] == run["spec_bytes_sent_per_step"], run["layout"]
        for key in ("fwd_compute_s", "bwd_compute_s", "comm_fwd_s", "comm_bwd_s", "optimizer_s"):
            assert key in run["breakdown"], key
    single, split = result["runs"][0], result["runs"][2]
    assert split["memory"]["param_bytes"] * 2 == single["memory"]["param_bytes"]  # 1000 classes: even
    names = [e["name"] for e in result["exchanges"]]
    assert names == ["conv3", "fc6", "fc7", "fc8", "logits"]
    for e in result["exchanges"]:
        for key in ("bytes_per_image", "counted_bytes_per_image", "fwd_s", "bwd_s"):
            assert key in e, (e["name"], key)
        assert e["counted_bytes_per_image"] == e["bytes_per_image"], e["name"]
        assert e["counted_bwd_bytes_per_image"] == e["bwd_bytes_per_image"], e["name"]


@pytest.mark.slow
def test_bf16_halves_the_exchanged_bytes(tmp_path):
    """--precision bf16 (autocast): every exchange carries 2-byte activations, forward and backward, so
    the split sends half of fp32's bytes for the same config (conv3's input too: the model's LRN returns its
    input's dtype); ddp still all-reduces fp32 gradients."""
    out = tmp_path / "bench"
    proc = _torchrun(["launch/bench.py", "--image-size", "67", "--batch-size", "4", "--steps", "1",
                      "--warmup", "0", "--layouts", "split,ddp", "--precision", "bf16", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["precision"] == "bf16"
    split, ddp = result["runs"]
    fp32 = spec_bytes_per_step(Spec(image_size=67), "split", 4, 2)
    assert split["bytes_sent_per_step"] == split["spec_bytes_sent_per_step"] == fp32 // 2
    bf16 = Spec(image_size=67, dtype_bytes=2)
    for e, spec_e in zip(result["exchanges"], bf16.exchanges):
        assert e["counted_bytes_per_image"] == spec_e.bytes, e["name"]
    assert ddp["bytes_sent_per_step"] == ddp["spec_bytes_sent_per_step"] == 4 * Spec(image_size=67).params_total


@pytest.mark.parametrize("change, world, device, words", [
    (dict(precision="fp8"), 2, "cpu", "use fp32, bf16 or fp16"),
    (dict(batch_sizes=[6], micro_batches=4), 2, "cpu", "micro-batches"),
    (dict(batch_sizes=[5], layouts=("ddp",)), 2, "cpu", "multiple of 2"),
    (dict(layouts=("split",)), 1, "cpu", "torchrun"),
    (dict(layouts=("pipeline",)), 2, "cpu", "choose from"),
    (dict(image_size=32), 2, "cpu", "--image-size 67"),
])
def test_bad_config_refused_with_the_fix(change, world, device, words):
    cfg = BenchConfig(**{**dict(batch_sizes=[64]), **change})
    with pytest.raises(UsageError) as e:
        check_config(cfg, world, device)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_precision_without_autocast_support_is_refused(monkeypatch):
    from split_alexnet import precision  # the one place train, check and bench ask
    monkeypatch.setattr(precision, "autocast_works", lambda device_type, dtype: False)
    with pytest.raises(UsageError) as e:
        check_config(BenchConfig(batch_sizes=[4], precision="fp16"), 2, "cpu")
    assert "use --precision bf16 or fp32 on cpu" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_cli_refuses_bad_input_with_one_line_and_exit_2():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for args in (["--precision", "fp8"], ["--layouts", "single", "--sweep-batch", "16,x"],
                 ["--link", "--link-from", "/nonexistent.json"], ["--link", "--compute-ms", "fast"],
                 ["--bound-table", "V100"]):
        proc = subprocess.run([sys.executable, "launch/bench.py", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


# ---- the clocks: CUDA events on GPU, the host's on CPU; the meter never synchronises ----

class FakeDevice:
    """A device whose clock the test moves (`now`, seconds): its events stamp `now` when recorded and
    count their synchronize() and elapsed_time() calls. `Event` is the class EventClock is given."""

    def __init__(self):
        self.now, self.syncs, self.reads = 0.0, 0, 0
        dev = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing, "an event must be made with enable_timing=True to be read"
                self.t = None

            def record(self, stream=None):
                self.t = dev.now

            def synchronize(self):
                dev.syncs += 1

            def elapsed_time(self, other):  # milliseconds, as torch.cuda.Event's
                dev.reads += 1
                return (other.t - self.t) * 1e3

        self.Event = Event


def test_event_clock_meter_reads_the_device_time_after_the_step_without_synchronising():
    """Under NCCL a collective returns to the host at once: the device's time must come from events,
    read after the step. The meter records them and reads nothing (no synchronize, no elapsed_time)
    until its seconds are asked for."""
    from split_alexnet import comm
    dev = FakeDevice()
    meter = comm.Meter(comm.EventClock(dev.Event))

    def collective():  # the device spends 2 ms in it; the host returns at once
        dev.now += 0.002
        return "out"

    assert meter.time("conv3/fwd", collective) == "out"
    dev.now += 1.0     # the rest of the step: not the collective's
    assert meter.time("conv3/fwd", collective) == "out"
    assert (dev.syncs, dev.reads) == (0, 0), "the meter synchronised or read inside the step"
    assert meter.seconds["conv3/fwd"] == pytest.approx(0.004)
    assert dev.reads == 2 and meter.seconds["conv3/fwd"] == pytest.approx(0.004)  # read once, kept
    assert comm.clock_for("cuda", dev.Event).name == "cuda_events" and comm.clock_for("cpu").name == "host"


def test_exposed_communication_is_the_compute_streams_wait():
    """split-overlap's exposed time: events recorded around wait() on the compute stream, so the figure
    is what the stream waited, where the host (NCCL's wait returns at once) would read 0."""
    from split_alexnet import comm, comm_async
    dev = FakeDevice()

    class Work:  # NCCL's: wait() makes the stream wait 3 ms and returns to the host at once
        def wait(self):
            dev.now += 0.003

    p = comm_async.Pending("fc6", None, [3, 3], keep_own_slice=False)
    p.work = Work()
    with comm.metered(comm.EventClock(dev.Event)) as meter:
        p.wait("fc6/fwd")
    assert dev.syncs == 0
    assert dict(meter.seconds) == {"fc6/fwd": pytest.approx(0.003)}


class Ticks:
    """A clock whose marks are 1, 2, 3, ...: seconds(a, b) = b - a, so a phase's time says how many marks
    it spans."""
    name = "ticks"

    def __init__(self):
        self.n = 0

    def mark(self):
        self.n += 1
        return self.n

    def seconds(self, a, b):
        return float(b - a)


def test_a_steps_phases_come_from_the_clock_it_is_given():
    import torch

    from split_alexnet.bench.layouts import Run
    from split_alexnet.bench.measure import step
    net = torch.nn.Linear(3, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    run = Run("single", "single", 1, 1, (0,), net, opt, lambda n, x: n(x))
    rec = step(run, torch.randn(2, 3), torch.tensor([0, 3]), Ticks())
    assert (rec.fwd_s, rec.bwd_s, rec.opt_s, rec.step_s) == (1.0, 1.0, 1.0, 3.0)


def test_lrn_share_on_cuda_is_the_kernels_device_time():
    """On GPU the share is the profiler's device time of the LRN's kernels (forward ranges, and the
    backward nodes that ran on autograd's device thread) over the step's; on CPU the CPU time."""
    from dataclasses import dataclass, field

    from torch.autograd import DeviceType

    from split_alexnet.bench.profile import BACKWARD, lrn_shares

    @dataclass
    class Range:
        start: int
        end: int

    @dataclass
    class Ev:  # the FunctionEvent fields lrn_shares reads
        name: str
        cpu_time_total: float = 0.0
        device_time_total: float = 0.0
        cpu_children: list = field(default_factory=list)
        thread: int = 1
        fwd_thread: int = 1
        sequence_nr: int = -1
        time_range: Range = field(default_factory=lambda: Range(10, 20))
        device_type: object = DeviceType.CPU

    pow_op = Ev("aten::pow", sequence_nr=5)
    lrn = Ev("lrn", cpu_time_total=50, device_time_total=10, cpu_children=[pow_op])
    conv = Ev("conv1", cpu_time_total=30, device_time_total=80)
    st = Ev("step:single", cpu_time_total=1000, device_time_total=100, cpu_children=[lrn, conv],
            time_range=Range(0, 100))
    lrn_bwd = Ev(BACKWARD + "PowBackward0", cpu_time_total=40, device_time_total=20, thread=2, sequence_nr=5)
    conv_bwd = Ev(BACKWARD + "ConvolutionBackward0", cpu_time_total=60, device_time_total=80, thread=2,
                  sequence_nr=9)
    late = Ev(BACKWARD + "PowBackward0", device_time_total=999, thread=2, sequence_nr=5,
              time_range=Range(200, 300))  # after the step: not its
    events = [st, lrn, pow_op, conv, lrn_bwd, conv_bwd, late]
    assert lrn_shares(events, device_time=True)["single"] == [pytest.approx((10 + 20) / (100 + 20 + 80))]
    assert lrn_shares(events)["single"] == [pytest.approx((50 + 40) / 1000)]


def test_the_sweep_stops_at_out_of_memory_with_a_line(capsys):
    import torch

    from split_alexnet.bench.runner import sweep
    seen = []

    def measure_one(batch):
        seen.append(batch)
        if batch >= 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert sweep([64, 128, 256, 512], measure_one, 1, "NVIDIA H200") == \
        ([64, 128], dict(batch_size=256, reason="out of memory"))
    assert seen == [64, 128, 256]  # nothing after the first that did not fit
    assert "batch 256: out of memory on NVIDIA H200; the sweep stops at batch 128" in capsys.readouterr().out
    with pytest.raises(UsageError) as e:  # the first batch: nothing to report
        sweep([256, 512], measure_one, 1, "NVIDIA H200")
    assert "use a smaller --batch-size" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(torch.OutOfMemoryError):  # several ranks: the others cannot be told, it stands
        sweep([64, 256], measure_one, 2, "NVIDIA H200")


def test_the_bound_from_the_spec_and_the_peaks():
    from split_alexnet.bench.bound import OPT_PASSES, Peak, bound, bound_section
    spec = Spec()
    assert spec.flops_per_image()["conv1"] == 2 * 96 * 55 * 55 * 3 * 11 * 11
    assert spec.flops_per_image()["conv2"] == 2 * 256 * 27 * 27 * 48 * 5 * 5  # groups: 48 maps per kernel
    assert sum(spec.train_flops_per_image().values()) == 4_135_610_496      # the 4.14 GFLOP
    compute_bound = bound(spec, 64, 2, Peak(1e12, 1e30, "test", "test"))
    assert compute_bound["images_per_s"] == pytest.approx(1e12 / 4_135_610_496)
    # memory: the weights' traffic (3 passes in forward/backward + the optimizer's) is per step, / batch
    b1, b2 = (bound(spec, b, 4, Peak(1e30, 1e12, "test", "test"))["bytes_per_image"] for b in (1, 2))
    assert b1 - b2 == pytest.approx((3 + OPT_PASSES) * 4 * spec.params_total / 2)
    assert bound(spec, 1, 4, Peak(1e30, 1e12, "t", "t"))["images_per_s"] == pytest.approx(1e12 / b1)
    rows = [dict(layout="single", label="single", batch_size=64, images_per_s=1000.0),
            dict(layout="torchvision", label="torchvision", batch_size=64, images_per_s=2000.0)]
    peak = Peak(1e12, 1e12, "test", "test")
    sec = bound_section(spec, [64], "bf16", 2, torch_device("cpu"), "cpu", rows, peak=peak)
    want = bound(spec, 64, 2, peak)["images_per_s"]
    assert sec["fractions"] == [dict(label="single", batch_size=64, images_per_s=1000.0,
                                     fraction=pytest.approx(1000.0 / want))]  # not torchvision's: another net


def torch_device(name):
    import torch
    return torch.device(name)


@pytest.mark.slow
def test_cpu_bench_sweeps_and_names_the_host_clock(tmp_path):
    """One process, the tiny flags: a sweep of two batches, bench.json names the host clock for every
    figure (CPU, gloo) and holds the bound with the fraction reached."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "launch/bench.py", "--layouts", "single", "--image-size", "67",
                           "--batch-size", "2", "--sweep-batch", "4", "--steps", "1", "--warmup", "0",
                           "--device", "cpu", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["sweep"] == [2, 4] and result["sweep_stopped"] is None
    clocks = result["clocks"]
    assert all(clocks[k] == "host" for k in ("step", "phases", "exchanges", "exposed_comm", "ddp_in_flight")), clocks
    assert clocks["lrn_share"] is None  # not profiled
    bound = result["bound"]
    assert bound["peak"]["clock"] == "host" and [b["batch_size"] for b in bound["batches"]] == [2, 4]
    assert [f["batch_size"] for f in bound["fractions"]] == [2, 4]
    assert "% of the bound" in proc.stdout and "clocks: step host" in proc.stdout
