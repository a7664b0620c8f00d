"""Docs that cannot rot: every relative link resolves, the spec's numbers quoted in the docs are the
spec's, and every fenced shell command runs (the quick ones, at small sizes; the long ones are listed
as skipped, each with its reason)."""
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from split_alexnet.spec import Spec

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _rel(p):
    return str(p.relative_to(REPO))


# ---- links and paths (fast) ----

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"`((?:split_alexnet|launch|docs|tests|benchmarks|scripts)/[\w./-]+\.(?:py|md|png|cfg|sh))`")


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_relative_link_and_image_resolves(doc):
    text = doc.read_text()
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            bad.append(target)
    for path in PATH.findall(text):
        if not (REPO / path).exists():
            bad.append(path)
    assert not bad, f"{_rel(doc)}: these do not resolve: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_the_docs_stand_on_their_own(doc):
    text = doc.read_text()
    assert "../shared" not in text, "a path outside the repository"
    for words in ("the issue", "issue's", "seed chapter", "work order", "this session"):
        assert words not in text.lower(), f"{_rel(doc)}: {words!r} (words of how the project was made)"


def test_the_docs_link_the_concepts_first():
    assert "docs/concepts.md" in (REPO / "README.md").read_text()
    assert "docs/glossary.md" in (REPO / "README.md").read_text()
    head = (REPO / "docs" / "tutorial.md").read_text()[:1200]
    assert "(concepts.md)" in head and "(glossary.md)" in head
    assert "not a CUDA stream" in (REPO / "docs" / "glossary.md").read_text()


# ---- numbers from the spec (fast) ----

def _numbers():
    p, s4, s8, bf = Spec(), Spec(streams=4), Spec(streams=8), Spec(dtype_bytes=2)
    small = Spec(image_size=67, num_classes=10)
    ex = {e.name: e.bytes for e in p.exchanges}

    def reads(name):
        return p.with_reads(**{name: "all"})

    def added(name):
        return reads(name).params_total - p.params_total

    def before(name):
        return {e.name: e.bytes for e in reads(name).exchanges}[name]

    n = "{:,}".format
    c = "{:,.1f}".format
    return [  # (docs that quote it, the text quoted, the spec's value formatted)
        (["README.md", "docs/tutorial.md", "docs/concepts.md", "docs/reproduction.md"], "60,965,224", n(p.params_total)),
        (["docs/tutorial.md", "docs/reproduction.md"], "30,482,612", n(p.params_per_stream(0))),
        (["docs/reproduction.md"], "62,378,344", n(Spec(streams=1).params_total)),
        (["docs/tutorial.md", "docs/concepts.md", "docs/benchmarks.md"], "86,528", n(ex["conv3"])),
        (["docs/concepts.md", "docs/benchmarks.md"], "18,432", n(ex["fc6"])),
        (["docs/concepts.md", "docs/benchmarks.md"], "8,192", n(ex["fc7"])),
        (["docs/concepts.md", "docs/benchmarks.md"], "2,000", n(ex["logits"])),
        (["docs/tutorial.md", "docs/concepts.md", "docs/benchmarks.md"], "123,344", n(p.bytes_per_image())),
        (["docs/concepts.md", "docs/benchmarks.md"], "121,344", n(p.bytes_per_image_step() - p.bytes_per_image())),
        (["docs/concepts.md", "docs/benchmarks.md"], "244,688", n(p.bytes_per_image_step())),
        (["docs/concepts.md", "docs/benchmarks.md"], "243,860,896", n(p.ddp_bytes_per_step())),
        (["docs/tutorial.md", "docs/concepts.md", "docs/benchmarks.md", "docs/glossary.md"], "997",
         str(round(p.crossover_batch()))),
        (["docs/benchmarks.md"], "1,993", n(round(bf.crossover_batch()))),
        (["docs/concepts.md", "docs/solutions.md"], "996.6", c(p.crossover_batch())),
        (["docs/concepts.md", "docs/solutions.md"], "985.1", c(s4.crossover_batch())),
        (["docs/concepts.md"], "979.3", c(s8.crossover_batch())),
        (["docs/concepts.md", "docs/solutions.md"], "1,993.2", c(bf.crossover_batch())),
        (["docs/concepts.md"], "367,032", n(s4.bytes_per_image_step())),
        (["docs/concepts.md"], "361,551,984", n(s4.ddp_bytes_per_step())),
        (["docs/concepts.md"], "428,204", n(s8.bytes_per_image_step())),
        (["docs/concepts.md"], "419,337,688", n(s8.ddp_bytes_per_step())),
        (["docs/concepts.md"], "122,344", n(bf.bytes_per_image_step())),
        (["docs/concepts.md"], "121,930,448", n(p.ddp_bytes_per_step(grad_bytes=2))),
        (["docs/concepts.md"], "43,028", n(small.bytes_per_image_step())),
        (["docs/concepts.md"], "80,836,136", n(small.ddp_bytes_per_step())),
        (["docs/concepts.md"], "1,878.7", c(small.crossover_batch())),
        (["docs/concepts.md"], "139,968", n(before("conv2"))),
        (["docs/concepts.md"], "307,200", n(added("conv2"))),
        (["docs/concepts.md", "docs/solutions.md"], "129,792", n(before("conv4"))),
        (["docs/concepts.md", "docs/solutions.md"], "663,552", n(added("conv4"))),
        (["docs/concepts.md"], "442,368", n(added("conv5"))),
        (["docs/solutions.md"], "185,016", n(s4.bytes_per_image())),
        (["docs/solutions.md"], "15,064,666", n(s4.params_per_stream(0))),
        (["docs/solutions.md"], "20,209,034", n(small.params_total)),
        (["docs/solutions.md"], "24,200", n(2 * p.shapes[0].out_hw ** 2 * 4)),
        (["docs/solutions.md"], "5,832", n(2 * p.shapes[1].out_hw ** 2 * 4)),
        (["docs/concepts.md"], "128×13×13", "×".join(map(str, (p.shapes[1].out_per_stream, 13, 13)))),
        (["docs/concepts.md"], "48×27×27", "×".join(map(str, (p.shapes[0].out_per_stream, p.shapes[0].post_hw,
                                                               p.shapes[0].post_hw)))),
    ]


def _teaching_numbers():
    """The compute and the alternatives (docs/concepts.md, docs/solutions.md), from the spec and summary.py."""
    from split_alexnet.hybrid import bytes_per_step
    from split_alexnet.summary import alternatives, segment_macs
    p = Spec()
    shapes = {r.layer.name: r for r in p.shapes}
    conv_macs = sum(r.macs for r in p.shapes if r.layer.kind == "conv")
    conv_params = sum(r.params_total for r in p.shapes if r.layer.kind == "conv")
    alt = {what.split(" (")[0]: (per_image, per_step, theirs) for what, per_image, per_step, _, theirs
           in alternatives(p, 128)}
    c3 = shapes["conv3"]
    n = "{:,}".format
    pct = "{:.1f} %".format
    return [
        (["docs/concepts.md"], "724,406,816", n(p.macs_per_image())),
        (["docs/concepts.md"], "91.9 %", pct(100 * conv_macs / p.macs_per_image())),
        (["docs/concepts.md"], "3.8 %", pct(100 * conv_params / p.params_total)),
        (["docs/concepts.md"], "8.1 %", pct(100 - 100 * conv_macs / p.macs_per_image())),
        (["docs/concepts.md"], "96.2 %", pct(100 - 100 * conv_params / p.params_total)),
        (["docs/concepts.md"], "2,334,080", n(conv_params)),
        (["docs/concepts.md"], "1,944", n(round(segment_macs(p)["conv3"] / p.exchanges[0].bytes))),
        (["docs/concepts.md"], "250", str(round(shapes["fc8"].macs // 2 / p.exchanges[3].bytes))),
        (["docs/concepts.md"], "129,792", n(p._sent(c3.out_per_stream * c3.out_hw ** 2))),
        (["docs/concepts.md"], "16,384", n(alt["Megatron fc6/fc7"][0] // 2)),
        (["docs/concepts.md"], "32,768", n(alt["Megatron fc6/fc7"][0])),
        (["docs/concepts.md"], "31,320,064", n(128 * p.bytes_per_image_step())),
        (["docs/concepts.md"], "7.8×", f"{p.ddp_bytes_per_step() / (128 * p.bytes_per_image_step()):.1f}×"),
        (["docs/concepts.md"], "18,505,216", n(sum(bytes_per_step(p, 128, 2).values()))),
        (["docs/concepts.md"], "0.59×", f"{sum(bytes_per_step(p, 128, 2).values()) / (128 * p.bytes_per_image_step()):.2f}×"),
        (["docs/solutions.md"], "4,135,610,496", n(p.flops_per_image_step())),
        (["docs/concepts.md", "docs/glossary.md", "docs/solutions.md"], "724,406,816", n(p.macs_per_image())),
        (["docs/troubleshooting.md"], "243,860,896", n(2 * 4 * p.params_per_stream(0))),   # weights + momentum
    ]


@pytest.mark.parametrize("docs,quoted,value", _numbers() + _teaching_numbers(),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_the_numbers_the_docs_quote_are_the_specs(docs, quoted, value):
    assert quoted == value, f"the docs quote {quoted}, the spec gives {value}"
    for doc in docs:
        assert quoted in (REPO / doc).read_text(), f"{doc} no longer quotes {quoted}: update this test"


# ---- every fenced shell command (slow) ----

FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.M | re.S)
SMALL = {"--image-size": "67", "--num-classes": "10", "--batch-size": "4", "--steps": "1"}  # 4: divides over 4 replicas or ranks


def commands():
    """(doc, command) for every command line in a fenced shell block (bash/sh, or an untagged block
    whose lines are all commands); transcripts (`$ ...`) and output are not commands."""
    out = []
    for doc in DOCS:
        for lang, body in FENCE.findall(doc.read_text()):
            body = re.sub(r"\\\n\s*", " ", body)          # a continued line is one command
            lines = [re.split(r"\s#\s", l.strip() + " ", maxsplit=1)[0].strip() for l in body.splitlines()]
            lines = [l for l in lines if l and not l.startswith("#")]
            if lang in ("bash", "sh", "shell") or (lang == "" and lines and all(
                    l.startswith(("python ", "torchrun ")) for l in lines)):
                out += [(_rel(doc), l) for l in lines if not l.startswith("$")]
    first = {}
    for doc, command in out:  # each command once, under the first doc that shows it
        first.setdefault(command, doc)
    return [(doc, command) for command, doc in first.items()]


def plan(command):
    """(argv with small sizes, None) to run it, or (None, why it is skipped)."""
    if "pip install" in command or "pytest" in command:
        return None, "installs packages or runs the test suite itself"
    words = shlex.split(command)
    if not words or words[0] not in ("python", "torchrun"):
        return None, "not a python or torchrun command"
    if "--help" in words:
        pass
    elif "runs/RUN" in command or "/tmp/single" in command or "--resume" in words:
        return None, "needs a checkpoint from an earlier run (tests/test_checkpoint.py covers it)"
    elif any(w.endswith("train.py") for w in words):
        return None, "trains for minutes (tests/test_train.py and tests/test_exercises.py train small)"
    elif any(w.endswith("bench.py") for w in words) and "--link" not in words:
        return None, "measures for minutes (tests/test_bench.py and tests/test_exercises.py run small benches)"
    elif "--gather-backward" in words or "--logits-backward" in words:
        return None, "a coding exercise on the learner's copy (tests/test_exercises.py grades the template and the answer)"
    elif "--exercise" in words:
        return None, "a teaching switch that fails on purpose (tests/test_exercises.py checks how)"
    elif "--link-from" in words:
        return None, "reads the bench.json of an earlier bench run"
    elif "--timeline" in words:
        return None, "reads the traces of an earlier bench run (tests/test_exercises.py runs the pair)"
    elif "--device" in words or "cuda" in command:
        return None, "needs a GPU"
    elif "/tmp/ex-" in command:
        return None, "an exercise (tests/test_exercises.py runs it)"
    argv = list(words)
    if any(w.endswith("check.py") for w in words) and "--help" not in words:
        for flag, value in SMALL.items():
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        argv += ["--modes", "eval"]
    if any(w.endswith("figures.py") for w in words) and "--out" not in argv:
        argv += ["--out", "{tmp}"]
    return argv, None


COMMANDS = commands()


@pytest.mark.slow
@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}: {c}" for d, c in COMMANDS])
def test_every_documented_command_runs(doc, command, tmp_path):
    argv, why = plan(command)
    if argv is None:
        pytest.skip(f"{command!r} ({doc}): {why}")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "python":
        argv = [sys.executable] + argv[1:]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"] + argv[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    expected = 2 if "--nproc_per_node=3" in command else 0  # the documented refusal
    assert out.returncode == expected, f"{command} ({doc}) exited {out.returncode}:\n{(out.stdout + out.stderr)[-3000:]}"


def test_the_command_list_is_not_empty_and_names_its_skips():
    assert len(COMMANDS) > 20
    reasons = [plan(c)[1] for _, c in COMMANDS]
    assert any(r is None for r in reasons) and any(r for r in reasons)


# ---- quoted outputs and quoted code (fast, except the torchrun one) ----

PRINTED = re.compile(r"<!-- printed by: (.+?) -->\n```\w*\n(.*?)```", re.S)


def quoted_outputs():
    return [(_rel(doc), cmd, block) for doc in DOCS for cmd, block in PRINTED.findall(doc.read_text())]


@functools.lru_cache(maxsize=None)
def _run_quoted(command):
    argv = shlex.split(command)
    if argv[:2] == ["python", "launch/summary.py"]:   # in process: the same main, without torch's import again
        import contextlib
        import importlib.util
        import io
        spec = importlib.util.spec_from_file_location("summary_launcher", REPO / "launch" / "summary.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert module.main(argv[2:]) == 0
        return out.getvalue()
    argv = ([sys.executable] + argv[1:] if argv[0] == "python"
            else [sys.executable, "-m", "torch.distributed.run", "--standalone"] + argv[1:])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("doc,command,block", [
    pytest.param(*q, marks=[pytest.mark.slow] if q[1].startswith("torchrun") else [])
    for q in quoted_outputs()], ids=[f"{d}: {c}" for d, c, _ in quoted_outputs()])
def test_every_quoted_output_is_what_its_command_prints(doc, command, block):
    printed = _run_quoted(command).splitlines()
    quoted = block.splitlines()
    assert quoted, f"{doc}: an empty quote of {command}"
    rest = iter(printed)   # every quoted line, in the order printed (a quote may leave lines out)
    missing = [line for line in quoted if not any(line == p for p in rest)]
    assert not missing, f"{doc}: {command} no longer prints, in this order: {missing}"


def test_the_quoted_outputs_are_found():
    assert {c for _, c, _ in quoted_outputs()} >= {"python launch/summary.py",
                                                 "torchrun --nproc_per_node=2 launch/collectives.py"}


def test_the_quoted_autograd_functions_are_comm_pys():
    text = (REPO / "docs" / "concepts.md").read_text()
    section = text.split("## The two autograd Functions", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "class _GatherForDistinctKernels" in code and "class _GatherForSameComputation" in code
    assert code in (REPO / "split_alexnet" / "comm.py").read_text(), "concepts.md's quote is not comm.py's code"


def test_the_readmes_set_up_commands_are_cis_and_the_cpu_pin_is_setup_cfgs():
    # README's two set-up commands (train, test) are one form each, the one CI runs; the Install block's
    # CPU-wheel line (to run before `pip install -e` on a CPU-only machine) pins setup.cfg's versions
    readme = (REPO / "README.md").read_text()
    lines = [l for _, body in FENCE.findall(readme) for l in body.splitlines()]
    pin = next(l for l in lines if l.startswith("pip install torch==") and "--index-url" in l)
    assert pin.endswith("--index-url https://download.pytorch.org/whl/cpu")
    setup = (REPO / "setup.cfg").read_text()
    for package, version in re.findall(r"(torch|torchvision)==([\d.]+)", pin):
        assert re.search(rf"^\s*{package}>={re.escape(version)}$", setup, re.M), (package, version)
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    install = "pip install -e '.[test]' && "
    fresh = [l for l in lines if l.startswith(venv)]
    assert fresh == [venv + install + "torchrun --nproc_per_node=2 launch/train.py", venv + install + "pytest -q"], fresh
    # CI (.ci/run) runs the tests' line, a step a line, in order (pip quietly; ruff before pytest)
    ci = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()]
    steps = [s.replace("pip install -e", "pip install -q -e") for s in (venv + install + "pytest -q").split(" && ")]
    assert [l for l in ci if l in steps] == steps, (steps, ci)
    assert ci.index("ruff check .") < ci.index("pytest -q")
