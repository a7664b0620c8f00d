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

from split_alexnet.bench import Config, check_config, spec_bytes_per_step
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
    from split_alexnet.bench import labelled_forward
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
        nets = [SplitAlexNet(spec, rank, dropout_seed=5, init="d2l") for _ in range(3)]
        for net in nets[1:]:
            net.load_state_dict(nets[0].state_dict())
        outs = []
        for name, net, fwd in (("plain", nets[0], lambda n: n(x)),
                               ("labelled", nets[1], lambda n: labelled_forward(n, x)),
                               ("overlap", nets[2], lambda n: overlapped_forward(n, x, micro))):
            net.train(mode == "train")
            with comm.metered() as meter:
                out = fwd(net)
                F.cross_entropy(out, y).backward()
            counted[f"{mode}/{name}"] = dict(meter.bytes)
            outs.append(out)
        ref = nets[0]
        for name, out, net in (("labelled", outs[1], nets[1]), ("overlap", outs[2], nets[2])):
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


def test_overlap_equals_plain_split_and_bytes_match_spec(tmp_path):
    """split-overlap (4 micro-batches, async exchanges) computes the plain split's logits and gradients,
    in eval and in train mode (dropout on), to the check's tolerance: max|a-b| <= 1e-4 max|b| + 1e-7.

    Why a tolerance at all: the micro-batched weight gradient is a sum of 4 partial GEMMs instead of one,
    and a kernel may block differently for a smaller batch: fp32 summation order only (see
    split_alexnet/check.py for the bound). A wrong slice, a missed reduce-scatter or a mask drawn for the
    wrong rows is off by O(1). The labelled forward the bench times must be SplitAlexNet.forward exactly.
    """
    script = tmp_path / "overlap_check.py"
    script.write_text(OVERLAP_SCRIPT)
    proc = _torchrun([str(script)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 17  # modes x (labelled, overlap) x (logits + 16 parameter grads)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, f"differ beyond tolerance: {bad}"
    assert all(r["diff"] == 0.0 for r in rows if r["forward"] == "labelled"), "labelled forward must be exact"
    # every exchange sent exactly what the spec says, forward and backward, in both modes
    spec, batch = Spec(image_size=67, num_classes=10), result["batch"]
    want = {}
    for e in spec.exchanges:
        want[f"{e.name}/fwd"] = batch * e.bytes
        if e.backward == "reduce-scatter":
            want[f"{e.name}/bwd"] = batch * e.bytes
    for key, got in result["counted"].items():
        assert got == want, f"{key}: counted {got}, spec {want}"


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
    cfg = Config(**{**dict(batch_sizes=[64]), **change})
    with pytest.raises(UsageError) as e:
        check_config(cfg, world, device)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_precision_without_autocast_support_is_refused(monkeypatch):
    from split_alexnet import precision  # the one place train, check and bench ask
    monkeypatch.setattr(precision, "autocast_works", lambda device_type, dtype: False)
    with pytest.raises(UsageError) as e:
        check_config(Config(batch_sizes=[4], precision="fp16"), 2, "cpu")
    assert "use --precision bf16 or fp32 on cpu" in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_bad_input_with_one_line_and_exit_2():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for args in (["--precision", "fp8"], ["--layouts", "single", "--sweep-batch", "16,x"],
                 ["--link", "--link-from", "/nonexistent.json"], ["--link", "--compute-ms", "fast"]):
        proc = subprocess.run([sys.executable, "launch/bench.py", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
