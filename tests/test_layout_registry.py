"""The layout registry (split_alexnet/layouts.py): a layout registered in one line runs through the check,
the bench and the trainer's own paths; every layout trains; nothing outside the registry tests a
layout's name, and no library module patches another.

Tolerances. A toy layout that is the streams layout under another name computes bit for bit what the
streams layout computes (the same modules, the same order), so its losses are compared with ==. The
hybrid and the micro-batched 2 x 2 compute the single layout's function in another summation order
(conv gradients summed over ranks, weight gradients over micro-batches): fp32 losses then differ by
round-off, which test_train.py bounds at LOSS_RTOL = 1e-5 of the loss (fp32's 6e-8 unit round-off,
amplified through the steps).
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from split_alexnet import layouts
from split_alexnet.bench import BenchConfig, check_config
from split_alexnet.bench.runner import run_bench
from split_alexnet.check import run_check
from split_alexnet.config import parse_config
from split_alexnet.distributed import setup
from split_alexnet.model import StreamsAlexNet
from split_alexnet.spec import Spec
from split_alexnet.train import build, run

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-5
TINY = ["--dataset", "shapes", "--train-size", "32", "--val-size", "8", "--image-size", "67",
        "--batch-size", "8", "--epochs", "2", "--lr", "0.001", "--lr-patience", "0", "--quiet", "--no-plot",
        "--eval-every", "0", "--seed", "0"]


def _toy_bench(cfg, spec, ctx, make):
    net = StreamsAlexNet(spec, [ctx.device] * spec.streams, dropout_seed=cfg.seed) if ctx.rank == 0 else None
    return [make("toy", "toy (1 dev)", 1, (0,), net, lambda n, x: n(x))]


@pytest.fixture
def toy():
    """The streams layout registered as "toy", with its own bench hook: the one line a new layout adds."""
    entry = layouts.register(dataclasses.replace(layouts.get("streams"), name="toy", bench=_toy_bench))
    yield entry
    layouts.unregister("toy")


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.slow
def test_a_registered_toy_layout_checks_benches_and_trains(toy, tmp_path):
    spec = Spec(image_size=67, num_classes=10)
    rows = run_check("toy", spec, batch_size=4, steps=1, modes=("train",))
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    cfg = BenchConfig(batch_sizes=[4], image_size=67, layouts=("toy",), steps=1, warmup=0)
    check_config(cfg, 1, "cpu")
    result = run_bench(cfg, setup())
    (row,) = result["runs"]
    assert row["layout"] == "toy" and row["steps"] == 1 and row["images_per_s"] > 0
    assert row["spec_bytes_sent_per_step"] == 0                 # one process: no line, nothing sent
    for name in ("toy", "streams"):
        run(build(parse_config(TINY + ["--layout", name, "--max-steps", "3", "--out", str(tmp_path / name)])))
    toy_losses, streams_losses = _losses(tmp_path / "toy"), _losses(tmp_path / "streams")
    assert sorted(toy_losses) == [1, 2, 3] and toy_losses == streams_losses


def _broken_build(full, place, allreduce=True, options=None):
    """The streams layout with one stream's conv1 weights moved by 1e-3: a bug the check must see."""
    built = layouts.get("streams").build(full, place, allreduce, options)
    with torch.no_grad():
        built.net.streams[1].conv1.weight.add_(1e-3)
    return built


@pytest.mark.slow
def test_the_check_fails_a_registered_layout_that_computes_another_function():
    layouts.register(dataclasses.replace(layouts.get("streams"), name="broken", build=_broken_build))
    try:
        rows = run_check("broken", Spec(image_size=67, num_classes=10), batch_size=4, steps=1, modes=("eval",))
    finally:
        layouts.unregister("broken")
    bad = {r.tensor for r in rows if not r.ok}
    assert "logits" in bad and "conv1.weight (after 1 SGD steps)" in bad, bad


def test_every_registered_layout_says_what_it_is():
    for name, e in layouts.LAYOUTS.items():
        assert e.name == name and e.about and e.processes in ("one", "per-stream", "world")
        assert e.trains or e.bench, name                         # a layout that nothing runs is no layout
        assert e.files in ("single", "shards")
    assert layouts.names(trains=True) == ["single", "streams", "split", "hybrid"]
    assert layouts.names(checked=True) == ["streams", "split", "hybrid"]
    with pytest.raises(Exception, match=r"^--layout pipeline: no such layout; use one of single, streams"):
        layouts.get("pipeline")


def test_the_bytes_lines_come_from_the_spec():
    spec, w = Spec(), 2
    assert layouts.get("split").line(spec, w, 2) == (0.0, float(spec.bytes_per_image_step()))
    assert layouts.get("ddp").line(spec, w, 2) == (float(spec.ddp_bytes_per_step()), 0.0)
    assert layouts.get("single").line is None and layouts.get("streams").line is None


# what the registry replaced: a layout's name tested outside it, a module patched from outside
NAME_TEST = re.compile(r"""\blayout\s*(==|!=)\s*["']|(?<!for )\blayout\s+(not\s+)?in\s+\(\s*["']""")
PATCH = re.compile(r"""\bsetattr\(|\bmock\b|=\s*staticmethod\(""")
IMPORTED = re.compile(r"""^\s*(?:import\s+[\w.]+\s+as\s+(\w+)|import\s+(\w+)|from\s+[\w.]+\s+import\s+(.+))$""")


def _module_aliases(text):
    """The names a file binds to imported modules or names (import x, import x as y, from m import a, b)."""
    names = set()
    for line in text.splitlines():
        m = IMPORTED.match(line)
        if m:
            names.update(n.split(" as ")[-1].strip(" ()") for n in filter(None, m.groups()) for n in n.split(","))
    return {n for n in names if n.isidentifier()}


def test_no_layout_name_is_tested_outside_the_registry_and_nothing_is_patched():
    found = []
    for folder in ("split_alexnet", "launch"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            assigns = re.compile(r"^\s*(%s)\.[\w.]+\s*=[^=]" % "|".join(map(re.escape, _module_aliases(text)) or ["$^"]))
            for k, line in enumerate(text.splitlines(), 1):
                code = line.split("#")[0]
                if NAME_TEST.search(code) and not (path.name == "layouts.py" and folder == "split_alexnet"):
                    found.append(f"{path.relative_to(ROOT)}:{k}: {line.strip()}")
                settings = code.strip().startswith("torch.backends.")   # torch's documented switches
                if folder == "split_alexnet" and (PATCH.search(code) or assigns.search(code) and not settings):
                    found.append(f"{path.relative_to(ROOT)}:{k}: {line.strip()}")
    assert not found, "\n".join(found)
    # the greps bite: a name test, a patched module
    assert NAME_TEST.search('if cfg.layout == "split":') and not NAME_TEST.search('for layout in ("a", "b"):')
    assert re.match(r"^\s*(%s)\.[\w.]+\s*=[^=]" % "|".join(_module_aliases("import x.y as M\nfrom . import model")),
                    "    model.local_response_norm = fast")


def _torchrun(n, args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(ROOT / "launch" / "train.py")] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _close(got, want):
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step, loss in got.items():
        assert abs(loss - want[step]) <= LOSS_RTOL * abs(want[step]), (step, loss, want[step])


@pytest.mark.slow
def test_the_hybrid_trains_saves_resumes_and_converts_on_the_single_layouts_curve(tmp_path):
    hybrid, resumed, single, split = (str(tmp_path / n) for n in ("hybrid", "resumed", "single", "split"))
    run(build(parse_config(TINY + ["--layout", "single", "--max-steps", "6", "--out", single])))
    _torchrun(2, TINY + ["--layout", "hybrid", "--max-steps", "6", "--save-every", "2", "--out", hybrid])
    _close(_losses(hybrid), _losses(single))                    # the same function: the same curve
    step2 = os.path.join(hybrid, "checkpoints", "step0000002")
    assert sorted(os.listdir(step2)) == ["meta.pt", "single.pt"]   # the single layout's file
    _torchrun(2, TINY + ["--layout", "hybrid", "--max-steps", "6", "--resume", step2, "--out", resumed])
    assert _losses(resumed) == {s: v for s, v in _losses(hybrid).items() if s > 2}   # bit for bit
    shards = str(tmp_path / "shards")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), step2, shards, "--to", "shards"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "(hybrid layout: single.pt)" in proc.stdout, proc.stdout + proc.stderr
    _torchrun(2, TINY + ["--max-steps", "6", "--micro-batches", "1", "--resume", shards, "--out", split])
    _close(_losses(split), {s: v for s, v in _losses(single).items() if s > 2})


@pytest.mark.slow
def test_micro_batches_with_replicas_give_the_curve_without_them(tmp_path):
    curves = {}
    for m in (1, 2):
        out = str(tmp_path / f"m{m}")
        proc = _torchrun(4, TINY + ["--streams", "2", "--max-steps", "4", "--micro-batches", str(m), "--out", out])
        assert proc.returncode == 0
        curves[m] = _losses(out)
    with open(os.path.join(tmp_path / "m2", "run.json")) as f:
        assert json.load(f)["replicas"] == 2
    _close(curves[2], curves[1])


def test_compile_per_layer_reaches_every_part_of_the_split_and_the_hybrid():
    """--compile for a layout with compile_layers: each of this rank's parts compiles its own layers (the
    exchanges stay eager between them); nothing is run here, only what for_speed hands torch.compile."""
    from split_alexnet.hybrid import hybrid_from_single
    from split_alexnet.job import for_speed
    from split_alexnet.model import AlexNet, split_from_single
    full = AlexNet(spec=Spec(image_size=67, num_classes=10))
    cfg = dataclasses.replace(parse_config(TINY + ["--layout", "single"]), compile=True, layout="hybrid")
    built = layouts.get("hybrid").build(full, layouts.Place())
    for_speed(cfg, built.net, built.parts)
    assert set(built.parts["conv"]._compiled) == {f"conv{i}" for i in range(1, 6)}
    assert set(built.parts["fc"]._compiled) == {"fc6", "fc7", "fc8"}
    split = split_from_single(full, 0)
    for_speed(dataclasses.replace(cfg, layout="split"), split, {"stream0.pt": split.stream})
    assert len(split.stream._compiled) == 8
    assert hybrid_from_single(full, 0, 1).conv._compiled == {}        # built eager: only --compile compiles
