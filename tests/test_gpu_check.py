"""scripts/gpu_check.sh's dry run: every step of the GPU script, tiny, on CPU over gloo, end to end.

A GPU is at hand only now and then: the script must be ready for the next one, so its steps run here
with the device and backend swapped (cpu, gloo) and the sizes cut, and each step's output is checked.
"""
import csv
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["nvidia-smi", "versions", "pytest-gpu", "comm-world1", "check-nccl-1proc", "check-fp32", "check-bf16",
         "check-fp64", "sync-debug", "graph-count", "bench-fp32", "bench-bf16", "bench-profile",
         "train-single-fp32", "train-streams-fp32", "train-single-bf16", "train-streams-bf16", "link",
         "bench-split-gloo-1gpu", "data-path"]


def test_unknown_argument_is_refused_in_one_line():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: unknown argument --fast: use --dry-run or nothing"


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_its_output(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(out), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:]
    with open(out / "timings.csv") as f:
        timings = {r["step"]: r["exit"] for r in csv.DictReader(f)}
    assert list(timings) == STEPS
    for name, rc in timings.items():                  # every step ran (the script skips --sync-debug only
        assert rc == "0", (name, rc, (out / "logs" / f"{name}.log").read_text()[-2000:])   # on older trees)
        assert (out / "logs" / f"{name}.log").read_text().strip(), name
    log = (out / "gpu_check.log").read_text()
    assert "DRY RUN" in log and "gpu_check done in" in log
    assert json.loads((out / "comm-world1.json").read_text())["passed"] is True
    graphs = json.loads((out / "graph-count.json").read_text())["modes"]["train"]
    assert graphs["graphs"] == 1 and graphs["breaks"] == 0, graphs   # the single layout is one graph in train mode
    assert "PASS" in (out / "logs" / "check-nccl-1proc.log").read_text()
    for prec in ("fp32", "bf16"):
        bench = json.loads((out / f"bench-{prec}" / "bench.json").read_text())
        assert bench["precision"] == prec and bench["sweep"] == [4, 8], prec
        assert bench["clocks"]["step"] == "host" and bench["bound"]["fractions"], prec
        assert [r["layout"] for r in bench["runs"]] == ["single", "torchvision"] * 2
    prof = json.loads((out / "bench-prof" / "bench.json").read_text())
    assert prof["clocks"]["lrn_share"] == "profiler_cpu" and prof["runs"][0]["lrn_share"] is not None
    assert (out / "link" / "link.json").exists()
    assert "(exit 0" in (out / "logs" / "data-path.log").read_text()
    assert json.loads((out / "data" / "data-bench" / "bench.json").read_text())["data"]
    split = json.loads((out / "bench-split-gloo" / "bench.json").read_text())
    assert [r["layout"] for r in split["runs"]] == ["split", "split-overlap"]
    for name in ("single-fp32", "streams-fp32", "single-bf16", "streams-bf16"):
        assert any((out / f"train-{name}").iterdir()), name
