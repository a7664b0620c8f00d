"""A checkpoint is untrusted input (issue 21): crafted checkpoints, each refused by convert.py and by
--eval-only within 10 s with one line and exit status 2, having opened nothing outside the checkpoint's
folder (an audit hook on "open" records every file opened, links resolved).

Each case is a copy of one real checkpoint (a 1-step shapes run at 67 px), with one thing changed; a
folder next to it, outside/, holds what a crafted name points at: a copy of the real single.pt (so a
link to it has the listed size and checksum) and a FIFO (which hangs whoever opens it)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from split_alexnet import checkpoint as ckpt
from split_alexnet.cli import UsageError, run_main
from split_alexnet.config import parse_config
from split_alexnet.train import build, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# momentum 0: no momentum buffers, half the bytes (fc7 alone is 64 MiB); the momentum checks have their own cases
TINY = ["--layout", "single", "--dataset", "shapes", "--train-size", "16", "--val-size", "8", "--image-size",
        "67", "--batch-size", "8", "--lr", "0.001", "--momentum", "0", "--workers", "0", "--no-plot"]
LIMIT_S = 10


def _launcher(name):
    spec = importlib.util.spec_from_file_location(f"{name}_untrusted", os.path.join(ROOT, "launch", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- what was opened: an audit hook, installed once, that records only while a case runs -----------

_opened = None


def _hook(event, args):
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_hook)     # stays for the session (audit hooks cannot be removed); idle but while recording


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


# ---- the checkpoint and the crafted copies ------------------------------------------------------------

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real single-layout checkpoint: 1 step of a tiny shapes run."""
    out = str(tmp_path_factory.mktemp("untrusted") / "run")
    run(build(parse_config(TINY + ["--quiet", "--max-steps", "1", "--save-every", "1", "--out", out])))
    return os.path.join(out, "checkpoints", "step0000001")


def _copy(real, folder):
    """A copy of the checkpoint: meta.pt copied, single.pt hard-linked (every edit below replaces a file,
    never writes into it, so the original stays as it is)."""
    os.makedirs(folder)
    shutil.copy(os.path.join(real, "meta.pt"), os.path.join(folder, "meta.pt"))
    os.link(os.path.join(real, "single.pt"), os.path.join(folder, "single.pt"))


def _load(path):
    return torch.load(path, weights_only=True)


def _edit_meta(folder, edit):
    meta = _load(os.path.join(folder, "meta.pt"))
    edit(meta)
    torch.save(meta, os.path.join(folder, "meta.pt"))


def _edit_shard(folder, edit):
    """Change single.pt's content and list its new size and checksum: only the content is wrong."""
    path = os.path.join(folder, "single.pt")
    state = _load(path)
    edit(state)
    os.remove(path)                                # a hard link: replaced, not written into
    torch.save(state, path)

    def relist(meta):
        meta["files"]["single.pt"] = os.path.getsize(path)
        meta["sha256"]["single.pt"] = ckpt.sha256(path)
    _edit_meta(folder, relist)


def _sparse(path, size):
    if os.path.exists(path):
        os.remove(path)                            # a hard link: replaced, not written into
    with open(path, "wb") as f:
        f.truncate(size)


def _replace(folder, make):
    path = os.path.join(folder, "single.pt")
    os.remove(path)
    make(path)


# name: (how the copy is crafted (folder, outside), what the one line says)
CASES = {
    "absolute name": (lambda c, o: _edit_meta(c, lambda m: m.update(
        files={os.path.join(o, "secret"): os.path.getsize(os.path.join(o, "secret"))},
        sha256={os.path.join(o, "secret"): ckpt.sha256(os.path.join(o, "secret"))})),
        "meta.pt field files names ['/"),
    "../ name": (lambda c, o: _edit_meta(c, lambda m: m["sha256"].update({"../outside/fifo": "0" * 64})),
                 "meta.pt field sha256 names ['single.pt', '../outside/fifo']"),
    "FIFO": (lambda c, o: _replace(c, os.mkfifo), "single.pt is a FIFO, not a regular file: refused unread"),
    "symlink out of the folder": (lambda c, o: _replace(c, lambda p: os.symlink(os.path.join(o, "secret"), p)),
                                  "single.pt is a symbolic link, not a regular file: refused unread"),
    "oversized file": (lambda c, o: _sparse(os.path.join(c, "single.pt"), 64 << 30),
                       "single.pt is 68719476736 bytes, more than the "),
    "oversized size listed": (lambda c, o: (_sparse(os.path.join(c, "single.pt"), 64 << 30), _edit_meta(
        c, lambda m: m["files"].update({"single.pt": 64 << 30}))),
        "meta.pt field files gives single.pt 68719476736 (int) bytes, not a size from 0 to the "),
    "oversized meta.pt": (lambda c, o: _sparse(os.path.join(c, "meta.pt"), 1 << 30),
                          f"meta.pt is 1073741824 bytes, more than the {16 << 20} bytes"),
    "wrong-typed step": (lambda c, o: _edit_meta(c, lambda m: m.update(step="seven")),
                         "meta.pt field step is 'seven' (str), not an integer >= 0"),
    "missing spec": (lambda c, o: _edit_meta(c, lambda m: m.pop("spec")), "meta.pt field spec is missing"),
    "extra tensor": (lambda c, o: _edit_shard(c, lambda s: s["model"].update({"fc9.weight": torch.zeros(3)})),
                     "single.pt does not match this model's parameters: it has a tensor model['fc9.weight'] "
                     "this net does not have"),
    "wrong-shaped tensor": (lambda c, o: _edit_shard(c, lambda s: s["model"].update(
        {"conv1.weight": torch.zeros(95, 3, 11, 11)})),
        "single.pt does not match this model's parameters: model['conv1.weight'] has the shape (95, 3, 11, "
        "11), this net's (96, 3, 11, 11)"),
}


def _craft(real, root, case):
    """root/ckpt: the crafted copy; root/outside: what its names may point at. Returns (ckpt, outside)."""
    folder, outside = str(root / "ckpt"), str(root / "outside")
    _copy(real, folder)
    os.makedirs(outside)
    os.link(os.path.join(real, "single.pt"), os.path.join(outside, "secret"))
    os.mkfifo(os.path.join(outside, "fifo"))
    CASES[case][0](folder, outside)
    return folder, outside


def _unblock_fifos(*folders):
    """Open every FIFO for writing (not blocking), so that a reader stuck in open() returns."""
    for folder in folders:
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass


def _run_recorded(fn, fifo_folders):
    """fn() in a thread, every open recorded; (exit status, seconds, paths opened). Fails after LIMIT_S."""
    global _opened
    result = {}

    def target():
        try:
            run_main(fn)
        except SystemExit as e:
            result["code"] = e.code
    _opened = []
    t0 = time.monotonic()
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(LIMIT_S)
    seconds, opened = time.monotonic() - t0, list(_opened)
    _opened = None
    if worker.is_alive():
        _unblock_fifos(*fifo_folders)
        worker.join(5)
        pytest.fail(f"still running after {LIMIT_S} s (it hangs); opened {opened}")
    return result.get("code"), seconds, opened


ENTRIES = {
    "convert": lambda folder, tmp: _launcher("convert").main([folder, str(tmp / "converted"), "--to", "shards"]),
    "eval-only": lambda folder, tmp: _launcher("train").main(TINY + ["--resume", folder, "--eval-only",
                                                                     "--out", str(tmp / "out")]),
}


SLOW_CASES = ("extra tensor", "wrong-shaped tensor")   # a 77 MiB shard rewritten: 2 s or more each


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_crafted_checkpoint_refused_in_one_line_opening_nothing_outside(real, tmp_path, capsys, case, entry):
    root = tmp_path / "case"
    folder, outside = _craft(real, root, case)
    capsys.readouterr()
    code, seconds, opened = _run_recorded(lambda: ENTRIES[entry](folder, tmp_path), [folder, outside])
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert CASES[case][1] in err, err
    assert seconds < LIMIT_S
    assert not [p for p in opened if _inside(p, outside)], opened
    assert not [p for p in opened if _inside(p, root) and not _inside(p, folder)], opened
    if case in ("absolute name", "../ name", "missing spec", "wrong-typed step", "oversized size listed"):
        # a field is refused before any file it names is looked at: only meta.pt was opened
        assert [p for p in opened if _inside(p, root)] == [os.path.join(folder, "meta.pt")], opened


@pytest.mark.slow
def test_the_real_checkpoint_passes_and_the_hook_sees_what_is_read(real, tmp_path, capsys):
    """The same checks let the real checkpoint through, and the recorder sees the files read (so an
    empty record above means nothing was opened, not that the hook was blind)."""
    folder = str(tmp_path / "ckpt")
    _copy(real, folder)
    code, _, opened = _run_recorded(lambda: ENTRIES["convert"](folder, tmp_path), [])
    assert code == 0, capsys.readouterr().err
    assert {os.path.join(folder, "meta.pt"), os.path.join(folder, "single.pt")} <= set(opened)
    code, _, _ = _run_recorded(lambda: ENTRIES["eval-only"](folder, tmp_path), [])
    assert code == 0 and "eval: " in capsys.readouterr().out


# ---- the checks one by one (in-process, fast) ---------------------------------------------------------

def _meta_with(real, tmp_path, **fields):
    folder = str(tmp_path / "ckpt")
    _copy(real, folder)
    def edit(meta):
        for k, v in fields.items():
            if v is ...:
                meta.pop(k)
            else:
                meta[k] = v
    _edit_meta(folder, edit)
    return folder


@pytest.mark.parametrize("field, value, message", [
    ("format", 2, "is not a split_alexnet checkpoint of format 1"),
    ("layout", "mesh", "meta.pt field layout is 'mesh' (str), not single, streams, split or hybrid"),
    ("streams", 4, "meta.pt field streams is 4 (int), not the spec's 2 streams"),
    ("spec", {"streams": 2, "image_size": "67", "in_channels": 3, "num_classes": 10},
     "meta.pt field spec.image_size is '67' (str), not int"),
    ("spec", {"streams": 2, "image_size": 40, "in_channels": 3, "num_classes": 10},
     "meta.pt field spec is not a net: image size 40 is too small"),
    ("spec", {"streams": 2, "image_size": 67, "in_channels": 3, "num_classes": 10, "x": 1},
     "meta.pt field spec has the key 'x' (str)"),
    ("spec", {"streams": 2, "image_size": 10**9, "in_channels": 3, "num_classes": 10},
     "meta.pt field spec describes a net of"),
    ("epoch", -1, "meta.pt field epoch is -1 (int), not an integer >= 0"),
    ("batch", True, "meta.pt field batch is True (bool), not an integer >= 0"),
    ("batch", ..., "meta.pt field batch is missing"),
    ("lr", float("nan"), "meta.pt field lr is nan (float), not a positive number"),
    ("lrs", [0.01, "x"], "meta.pt field lrs is [0.01, 'x'] (list), not a list of positive numbers"),
    ("scheduler", [1], "meta.pt field scheduler is [1] (list), not None or a schedule's state"),
    ("scheduler", {"best": 0.5, "bad": -1, "drops": 0}, "meta.pt field scheduler.bad is -1 (int)"),
    ("torch_rng", torch.zeros(3), "meta.pt field torch_rng is tensor"),
    ("files", ["single.pt"], "meta.pt field files names ['single.pt'] (list)"),
    ("files", {"single.pt": "1"}, "meta.pt field files gives single.pt '1' (str) bytes"),
    ("sha256", {"single.pt": "z" * 64}, "meta.pt field sha256 gives single.pt 'zzzz"),
    ("config", {"batch_size": "8"}, "meta.pt field config.batch_size is '8' (str), not int"),
    ("config", {"dataset": "imagenet"}, "meta.pt field config.dataset is 'imagenet' (str), not one of"),
    ("config", "x", "meta.pt field config is 'x' (str), not a dict"),
    ("train_images", -3, "meta.pt field train_images is -3 (int), not an integer >= 0"),
    ("data_fingerprint", "../x", "meta.pt field data_fingerprint is '../x' (str), not a hex digest"),
    ("scaler", {"scale": "big"}, "meta.pt field scaler is {'scale': 'big'}"),
    ("scaler", {"scale": float("inf")}, "meta.pt field scaler.scale is inf"),
])
def test_each_meta_field_is_checked(real, tmp_path, field, value, message):
    folder = _meta_with(real, tmp_path, **{field: value})
    with pytest.raises(UsageError) as e:
        ckpt.read_meta(folder)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_older_checkpoints_without_optional_fields_still_load(real, tmp_path, capsys):
    """Written before lrs, sha256, config and spec.net existed: their defaults (every group at lr, no
    checksums, no settings, the paper's net) apply, and --eval-only evaluates it."""
    folder = str(tmp_path / "ckpt")
    _copy(real, folder)

    def older(m):
        m.pop("lrs"), m.pop("sha256"), m.pop("config"), m["spec"].pop("net")
    _edit_meta(folder, older)
    meta = ckpt.read_meta(folder)
    assert "sha256" not in meta and ckpt.spec_of(meta).net == "paper"
    code, _, _ = _run_recorded(lambda: ENTRIES["eval-only"](folder, tmp_path), [])
    assert code == 0 and "(step 1, epoch 0)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_settings_value_no_flag_accepts_is_refused_on_resume(real, tmp_path, capsys):
    """The checkpoint's config is the resumed run's settings: a batch size of 0 is refused as the flag
    would be, naming the field, unless the flag is given."""
    folder = _meta_with(real, tmp_path, config={**_load(os.path.join(real, "meta.pt"))["config"], "epochs": 0})
    argv = [a for a in TINY] + ["--resume", folder, "--eval-only", "--out", str(tmp_path / "out")]
    code, _, _ = _run_recorded(lambda: _launcher("train").main(argv), [])
    err = capsys.readouterr().err
    assert code == 2 and "meta.pt field config: --epochs 0: use 1 or more" in err, err
    code, _, _ = _run_recorded(lambda: _launcher("train").main(argv + ["--epochs", "3"]), [])
    assert code == 0, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(hook=1), "it holds ['dropout', 'hook', 'model', 'optimizer']"),
    (lambda s: s["model"].pop("fc8.bias"), "its model lacks fc8.bias"),
    (lambda s: s["optimizer"].update(state={"conv1.weight": {"momentum_buffer": s["model"]["conv1.weight"].clone()}}),
     "its optimizer[momentum_buffer] lacks conv1.bias (optimizer[momentum_buffer] is saved for none or every"),
    (lambda s: s["optimizer"].update(state={k: {"momentum_buffer": v[:1]} for k, v in s["model"].items()}),
     "optimizer[momentum_buffer]['conv1.weight'] has the shape (1, 3, 11, 11), this net's (96, 3, 11, 11)"),
    (lambda s: s["optimizer"].update(state={"conv1.weight": {"momentum_buffer": "x"}}),
     "its optimizer's state 'conv1.weight'['momentum_buffer'] is 'x'"),
    (lambda s: s.update(optimizer=[1]), "its optimizer is [1] (list), not an optimizer's state"),
    # a file from before the optimizer's state_dict(): SGD's momentum buffers alone, checked alike
    (lambda s: (s.pop("optimizer"), s.update(momentum={"conv1.weight": s["model"]["conv1.weight"].clone()})),
     "its momentum lacks conv1.bias (momentum is saved for none or every parameter)"),
    (lambda s: (s.pop("optimizer"), s.update(momentum={k: v[:1] for k, v in s["model"].items()})),
     "momentum['conv1.weight'] has the shape (1, 3, 11, 11), this net's (96, 3, 11, 11)"),
    (lambda s: s["model"].update({"fc8.bias": s["model"]["fc8.bias"].double()}), "model['fc8.bias'] is "
     "torch.float64, not torch.float32"),
    (lambda s: s["model"].update({"fc8.bias": s["model"]["fc8.bias"].long()}), "model['fc8.bias'] is torch.int64"),
    (lambda s: s["model"].update({"fc8.bias": [0.0] * 10}), "model['fc8.bias'] is [0.0,"),
    (lambda s: s.update(dropout=("cpu", torch.zeros(7, dtype=torch.uint8))),
     "its dropout masks come from a torch.Generator (a checkpoint written before"),
    (lambda s: s.update(dropout={"seed": 0, "draws": -1}), "both must be integers, draws 0 or more"),
    (lambda s: s.update(dropout="x"), "not a dropout state (str): a damaged checkpoint"),
])
def test_shard_contents_are_checked_before_use(real, tmp_path, edit, message):
    folder = str(tmp_path / "ckpt")
    _copy(real, folder)
    _edit_shard(folder, edit)
    meta = ckpt.read_meta(folder)                 # sizes and checksums fit: only the content is wrong
    with pytest.raises(UsageError) as e:
        ckpt.load_files(folder, meta, ["single.pt"])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_torch_file_with_compressed_records_is_refused_unloaded(real, tmp_path):
    """torch.save stores its records; a deflated one (a zip bomb's way to be larger than its file) is
    refused before torch.load reads it."""
    import zipfile
    folder = str(tmp_path / "ckpt")
    _copy(real, folder)
    path = os.path.join(folder, "meta.pt")
    with zipfile.ZipFile(os.path.join(real, "meta.pt")) as src, \
            zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(UsageError, match="holds compressed records, or more than its"):
        ckpt.read_meta(folder)


def test_the_size_bound_holds_the_papers_net():
    """The bound is not below what a real file of the paper's net at 227 px is (its tensors' bytes,
    weights and momentum in float32), per layout."""
    from split_alexnet.spec import Spec
    spec = Spec()
    for layout in ("single", "split"):
        limits, expected = ckpt.max_file_bytes(spec, layout), ckpt.expected_tensors(spec, layout)
        for name, shapes in expected.items():
            tensor_bytes = 2 * 4 * sum(torch.Size(s).numel() for s in shapes.values())
            assert tensor_bytes < limits[name] < 3 * tensor_bytes, (name, tensor_bytes, limits[name])


# ---- end to end: a process of its own ------------------------------------------------------------------

_RECORDER = """
import json, os, runpy, sys, time
opened = []
sys.addaudithook(lambda event, args: opened.append(os.fsdecode(args[0])) if event == "open"
                 and isinstance(args[0], (str, bytes)) else None)
import split_alexnet.train  # noqa: F401  the imports first (torch's alone can take seconds on a loaded machine)
t0 = time.monotonic()
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("RECORD " + json.dumps(dict(seconds=time.monotonic() - t0, opened=opened)), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("case, script, args", [
    ("../ name", "train.py", TINY + ["--eval-only"]),
    ("symlink out of the folder", "convert.py", ["--to", "shards"]),
])
def test_end_to_end_process_exits_2_in_one_line(real, tmp_path, case, script, args):
    """The launcher as a process: status 2, one line on stderr, within 10 s of the launcher's start
    (timed after the imports, which the check does not control), nothing outside the checkpoint's folder
    opened. (The "../ name" points at a FIFO: the code before this change hung there.)"""
    root = tmp_path / "case"
    folder, outside = _craft(real, root, case)
    where = ["--resume", folder, "--out", str(tmp_path / "out")] if script == "train.py" \
        else [folder, str(tmp_path / "converted")]
    cmd = [sys.executable, "-c", _RECORDER, os.path.join(ROOT, "launch", script), *where, *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        _unblock_fifos(folder, outside)
    record = json.loads(proc.stdout.split("RECORD ", 1)[1])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and CASES[case][1] in proc.stderr, proc.stderr
    assert record["seconds"] < LIMIT_S, record["seconds"]
    assert not [p for p in record["opened"] if _inside(p, outside)], record["opened"]
    assert not [p for p in record["opened"] if _inside(p, root) and not _inside(p, folder)], record["opened"]


@pytest.mark.slow
def test_a_scheduler_state_of_another_schedule_is_one_line(real, tmp_path, capsys):
    """A plain-data scheduler state that is not the plateau schedule's: refused in one line on resume."""
    folder = _meta_with(real, tmp_path, scheduler={"last_epoch": 3})
    argv = TINY + ["--resume", folder, "--eval-only", "--out", str(tmp_path / "out")]
    code, _, _ = _run_recorded(lambda: _launcher("train").main(argv), [])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "meta.pt field scheduler {'last_epoch': 3} is not the state of this run's --schedule plateau" in err, err
