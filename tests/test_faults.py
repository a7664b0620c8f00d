"""Faults, mistakes and untrusted files (issue 9, docs/troubleshooting.md): each fault asserts the exit
status, the message and a time bound, and that the last good checkpoint still resumes to the same losses.

Runs: 2 gloo ranks (torchrun or by hand) on shapes at 67 px, batch 8, OMP_NUM_THREADS=1. The time bounds
leave room for a loaded machine: on the 2-core CPU shared with other jobs, Python + torch import alone
took 13 s wall, so each bound is the mechanism's own time plus 25 s or more.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from split_alexnet import checkpoint as ckpt
from split_alexnet.cli import UsageError, run_main
from split_alexnet.config import parse_config
from split_alexnet.train import build, run, strict_json

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TRAIN = os.path.join(ROOT, "launch", "train.py")
TINY = ["--dataset", "shapes", "--train-size", "32", "--val-size", "8", "--image-size", "67",
        "--batch-size", "8", "--epochs", "2", "--lr", "0.001", "--lr-patience", "0", "--quiet"]
# split (torchrun) vs streams (one process) from the same checkpoint: the same function in another
# summation order (tests/test_train.py: at most 1.7e-7 relative measured over 6 steps)
LOSS_RTOL = 1e-5


def _launcher(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_launcher", os.path.join(ROOT, "launch", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)


def _torchrun_popen(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) for line in f]


def _losses(out):
    return {r["step"]: r["loss"] for r in _metrics(out) if r["split"] == "train"}


def _children(pid):
    kids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(p))
            except (OSError, IndexError):
                pass
    return kids


def _rank_pid(agent, rank):
    for pid in _children(agent):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return pid
        except OSError:
            pass
    return None


def _wait_for(cond, timeout, poll=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(poll)
    return False


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _resume_in_process(run_dir, out, steps=6, extra=()):
    """Resume the split run's newest good checkpoint in the streams layout (one process) to `steps`."""
    with pytest.raises(SystemExit) as e:
        run_main(lambda: _launcher('train').main(TINY + ["--layout", "streams", "--max-steps", str(steps), "--out", out,
                                            "--resume", run_dir, *extra]))
    assert e.value.code == 0
    return _losses(out)


def _same_losses(got, ref):
    assert got and all(abs(got[s] - ref[s]) <= LOSS_RTOL * abs(ref[s]) for s in got), (got, ref)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A clean split run: 6 steps, checkpoints at steps 3 and 6, and its losses (the reference)."""
    out = str(tmp_path_factory.mktemp("good") / "run")
    proc = _torchrun_popen(TINY + ["--max-steps", "6", "--save-every", "3", "--out", out])
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return out, _losses(out)


def _copy_run(good_run, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(good_run[0], dst)
    return dst


# ---- a rank, or its agent, dies or freezes ---------------------------------------------------------

LONG = TINY + ["--epochs", "100", "--save-every", "2"]


def _start_and_wait_for_checkpoint(out, extra=()):
    proc = _torchrun_popen(LONG + ["--out", out, *extra])
    first = os.path.join(out, "checkpoints", "step0000002", "meta.pt")
    if not _wait_for(lambda: os.path.exists(first) or proc.poll() is not None, 240):
        proc.kill()
        pytest.fail("no checkpoint within 240 s")
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    return proc


@pytest.mark.slow
def test_stopped_rank_ends_the_job_naming_it(good_run, tmp_path):
    """SIGSTOP of rank 1: rank 0's watchdog names it and the phase, ends it (torchrun's SIGTERM cannot),
    and the job exits non-zero. Bound: --peer-timeout 10 + 1 s beat + teardown, plus 24 s for load;
    without ending the stopped rank, torchrun alone would wait 30 s more (> the bound)."""
    out = str(tmp_path / "run")
    proc = _start_and_wait_for_checkpoint(out, ["--peer-timeout", "10"])
    pid = _rank_pid(proc.pid, 1)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=35)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
    took = time.monotonic() - t0
    print(f"SIGSTOP of rank 1 -> job ended in {took:.1f} s")
    assert proc.returncode != 0 and took < 35, (took, err[-2000:])
    assert "error: rank 1 stopped answering: no heartbeat for 1" in err, err[-2000:]
    # stopped just after the step-2 checkpoint: rank 0 waits in its last barrier or in the next step
    line = next(l for l in err.splitlines() if l.startswith("error: rank 1 stopped answering"))
    print(line)
    assert "was stopped (SIGSTOP): ended it; rank 0 waited in " in line, line
    assert re.search(r"waited in (checkpoint write at step 2|training step \d+ \(last exchange: \w+/\w+\)|"
                     r"evaluation at step \d+)", line), line
    assert not _alive(pid)
    _same_losses(_resume_in_process(out, str(tmp_path / "resumed")), good_run[1])


@pytest.mark.slow
def test_killed_agent_leaves_no_orphans(tmp_path):
    """SIGKILL of torchrun's agent: both ranks end (parent-death signal) within 10 s (measured: at once)."""
    proc = _start_and_wait_for_checkpoint(str(tmp_path / "run"))
    ranks = [_rank_pid(proc.pid, r) for r in (0, 1)]
    assert all(ranks), ranks
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    gone = _wait_for(lambda: not any(_alive(p) for p in ranks), 10)
    print(f"SIGKILL of the agent -> ranks gone in {time.monotonic() - t0:.2f} s")
    for p in ranks:
        if _alive(p):
            os.kill(p, signal.SIGKILL)
    assert gone, "ranks outlived their agent"


@pytest.mark.slow
def test_rank_killed_during_checkpoint_write(good_run, tmp_path):
    """SIGKILL of rank 1 while it writes its shard: the job ends non-zero within 30 s (torchrun sees the
    death at once), the half-written step is never taken, the last complete one resumes to the same
    losses, and a run resumed into another folder leaves the interrupted save's temporary files alone
(only a save in the same folder removes them)."""
    out = str(tmp_path / "run")
    proc = _start_and_wait_for_checkpoint(out)
    ckpts = os.path.join(out, "checkpoints")
    tmp = lambda: [os.path.join(d, f) for d in map(lambda s: os.path.join(ckpts, s), os.listdir(ckpts))  # noqa
                   for f in os.listdir(d) if f.startswith("stream1.pt.tmp")]
    pid = _rank_pid(proc.pid, 1)
    assert _wait_for(lambda: tmp() or proc.poll() is not None, 120, poll=0.002) and proc.poll() is None
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    print(f"SIGKILL of rank 1 mid-write -> job ended in {time.monotonic() - t0:.1f} s")
    assert proc.returncode != 0 and time.monotonic() - t0 < 30
    stale = tmp()
    assert stale, "the kill came after the write: no temporary file to clean"
    newest = os.path.dirname(stale[0])
    assert not os.path.exists(os.path.join(newest, "meta.pt"))
    # resume (streams layout) from the run directory: the newest complete checkpoint, to 2 steps past it
    done = sorted(d for d in os.listdir(ckpts) if os.path.exists(os.path.join(ckpts, d, "meta.pt")))
    step = int(done[-1][4:])
    resumed = str(tmp_path / "resumed")
    got = _resume_in_process(out, resumed, steps=step + 2, extra=["--save-every", "100"])
    assert sorted(got) == [step + 1, step + 2]
    assert all(os.path.exists(p) for p in stale)              # the resume source is never touched (#22)
    if step + 2 <= 6:
        _same_losses(got, good_run[1])


# ---- damaged and untrusted checkpoints (no training needed: fast but for the resume) ----------------

def _flip(path, offset_from_end=None, n=4096):
    size = os.path.getsize(path)
    at = size // 2 if offset_from_end is None else size - offset_from_end
    with open(path, "r+b") as f:
        f.seek(at)
        data = bytearray(f.read(n))
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.slow
def test_flipped_bytes_fall_back_to_the_previous_checkpoint(good_run, tmp_path, capsys):
    """4 KB flipped inside the newest checkpoint's shard: its checksum fails, a resume from the run
    directory says it skipped it and why, and the previous checkpoint resumes to the same losses."""
    run_dir = _copy_run(good_run, tmp_path)
    shard = os.path.join(run_dir, "checkpoints", "step0000006", "stream1.pt")
    _flip(shard)
    with pytest.raises(UsageError, match=f"checkpoint file {shard} fails its sha256 checksum"):
        ckpt.read_meta(os.path.dirname(shard))
    got = _resume_in_process(run_dir, str(tmp_path / "resumed"))
    assert "--resume: skipped step0000006 (checkpoint file" in capsys.readouterr().out
    assert sorted(got) == [4, 5, 6]
    _same_losses(got, good_run[1])


class _Marker:
    """Unpickling it would create a file: the proof that loading ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow
def test_checkpoint_holding_code_is_refused_unrun(good_run, tmp_path, capsys):
    """A shard holding a pickled callable, with meta.pt's sizes and checksums made to match: refused
    with one line by --resume and by convert.py, and the callable never runs."""
    run_dir = _copy_run(good_run, tmp_path)
    step = os.path.join(run_dir, "checkpoints", "step0000006")
    marker = str(tmp_path / "ran")
    state = torch.load(os.path.join(step, "stream1.pt"), weights_only=True)
    state["hook"] = _Marker(marker)
    torch.save(state, os.path.join(step, "stream1.pt"))
    meta = torch.load(os.path.join(step, "meta.pt"), weights_only=True)
    meta.pop("files"), meta.pop("sha256")
    ckpt.save_meta(step, meta)                     # consistent sizes and checksums: only the content is bad
    err = _bad(TINY + ["--layout", "streams", "--out", str(tmp_path / "o"), "--resume", step], capsys)
    assert f"checkpoint file {step}/stream1.pt holds code, not only data" in err, err
    with pytest.raises(SystemExit) as e:
        run_main(lambda: _launcher('convert').main([step, str(tmp_path / "single"), "--to", "single"]))
    assert e.value.code == 2 and "holds code" in capsys.readouterr().err
    assert not os.path.exists(marker)


@pytest.mark.slow
def test_checkpoints_load_with_weights_only(good_run):
    step = os.path.join(good_run[0], "checkpoints", "step0000006")
    for name in ("meta.pt", "stream0.pt", "stream1.pt"):
        assert isinstance(torch.load(os.path.join(step, name), weights_only=True), dict)


def test_stale_temporary_files_removed_at_next_save(tmp_path):
    folder = tmp_path / "checkpoints" / "step0000002"
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in (f"stream1.pt.tmp{dead}", f"stream0.pt.tmp{dead}", f"stream1.pt.tmp{os.getppid()}"):
        (folder / name).write_bytes(b"x" * 100)
    removed = ckpt.remove_stale_temps([str(tmp_path)], {"stream1.pt"})
    assert removed == [str(folder / f"stream1.pt.tmp{dead}")]            # not another rank's, not a live one
    assert sorted(os.listdir(folder)) == sorted([f"stream0.pt.tmp{dead}", f"stream1.pt.tmp{os.getppid()}"])


# ---- mismatched arguments ------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_hand(port, args_per_rank, timeout=120):
    """Start rank r with args_per_rank[r] by hand (RANK, WORLD_SIZE, MASTER_*: no torchrun)."""
    procs = [subprocess.Popen([sys.executable, TRAIN, "--layout", "split", *args], cwd=ROOT,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, args in enumerate(args_per_rank)]
    t0 = time.monotonic()
    results = []
    for p in procs:
        try:
            results.append(p.communicate(timeout=max(1, timeout - (time.monotonic() - t0))))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung")
    return [p.returncode for p in procs], [r[1] for r in results], time.monotonic() - t0


@pytest.mark.slow
def test_ranks_with_different_arguments_stop_naming_the_field(tmp_path):
    """--seed 0 on rank 0, --seed 1 on rank 1: both exit 2 before any data work, rank 0 naming the field
    and each rank's value. Bound 90 s: two imports (13 s each measured, loaded machine) and a collective."""
    out = str(tmp_path / "run")
    codes, errs, took = _by_hand(_free_port(), [TINY + ["--out", out, "--seed", "0"],
                                                TINY + ["--out", out, "--seed", "1"]], timeout=90)
    assert codes == [2, 2], errs
    assert errs[0] == ("error: the ranks disagree on the arguments: seed (rank 0: 0, rank 1: 1): start every "
                       "rank with the same arguments, data set and torch version\n"), errs[0]
    assert not os.path.exists(out)


@pytest.mark.slow
def test_busy_master_port_one_line_per_rank(tmp_path):
    """A hand launch whose MASTER_PORT another program holds (it accepts and never answers): rank 0 cannot
    listen, rank 1 would wait forever on the foreign listener; each exits 2 with one line. Bound: rank 1's
    10 s for an answer + imports + 40 s for load."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    try:
        codes, errs, took = _by_hand(port, [TINY + ["--out", str(tmp_path / "o")]] * 2, timeout=90)
    finally:
        srv.close()
    assert codes == [2, 2], errs
    assert errs[0] == f"error: MASTER_PORT {port} is in use by another program: set MASTER_PORT to a free " \
                      f"port on every rank, or launch with torchrun --standalone, which picks one\n", errs[0]
    assert errs[1].startswith(f"error: rank 1: 127.0.0.1:{port} accepted the connection but did not answer") \
        and errs[1].count("\n") == 1, errs[1]


def _bad(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(lambda: _launcher('train').main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.slow
def test_resume_flags_win_where_safe_and_are_refused_where_not(good_run, tmp_path, capsys):
    run_dir = good_run[0]
    err = _bad(TINY + ["--layout", "streams", "--out", str(tmp_path / "a"), "--resume", run_dir,
                       "--seed", "1"], capsys)
    assert "--seed 1 on resume: the checkpoint's run used 0" in err and "drop --seed" in err
    step3 = os.path.join(run_dir, "checkpoints", "step0000003")   # mid-epoch: batch 3 of 4
    err = _bad(TINY + ["--layout", "streams", "--out", str(tmp_path / "b"), "--resume", step3,
                       "--batch-size", "4"], capsys)
    assert "--batch-size 4 on resume: the checkpoint stopped mid-epoch (batch 3)" in err
    out = str(tmp_path / "c")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: _launcher('train').main([a for a in TINY if a not in ("--lr", "0.001")] + [
            "--layout", "streams", "--out", out, "--resume", step3, "--max-steps", "4", "--lr", "0.0001"]))
    assert e.value.code == 0
    assert "resume: --lr 0.0001 (the checkpoint's run: 0.001)" in capsys.readouterr().out
    assert [r["lr"] for r in _metrics(out) if r["split"] == "train"] == [0.0001]


# ---- bad inputs: one line, status 2, before the work ------------------------------------------------

def test_out_is_an_existing_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert f"--out {f} is an existing file" in _bad(TINY + ["--out", str(f)], capsys)


def test_out_in_a_read_only_directory(tmp_path, capsys):
    if os.geteuid() == 0:                          # root writes through permissions: a read-only mount
        ro = "/sys/fs"
        assert not os.access(ro, os.W_OK) or True
    else:
        ro = str(tmp_path / "ro")
        os.mkdir(ro, 0o555)
    err = _bad(TINY + ["--out", os.path.join(ro, "run")], capsys)
    assert f"cannot write in {ro}" in err and "give an --out in a writable directory" in err


def _image_folder(root, bad=None, val_classes=("a", "b")):
    from PIL import Image
    for part, classes, n in (("train", ("a", "b"), 8), ("val", val_classes, 2)):
        for c in classes:
            os.makedirs(os.path.join(root, part, c))
            for i in range(n):
                Image.new("RGB", (32, 32), (40 * i, 100, 200 if c == "a" else 0)).save(
                    os.path.join(root, part, c, f"{i}.jpg"))
    if bad:
        path = os.path.join(root, "train", "a", "0.jpg")
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])   # a truncated JPEG
        return path


IMAGES = ["--dataset", "imagefolder", "--image-size", "67", "--batch-size", "8", "--layout", "single",
          "--quiet", "--epochs", "1", "--no-crop", "--no-flip", "--lighting", "0"]


@pytest.mark.slow
def test_undecodable_image_stops_naming_it_or_is_skipped(tmp_path, capsys):
    data = str(tmp_path / "data")
    bad = _image_folder(data, bad=True)
    err = _bad(IMAGES + ["--data-dir", data, "--out", str(tmp_path / "a")], capsys)
    assert f"cannot decode {bad}" in err and "--bad-images skip" in err
    out = str(tmp_path / "b")
    summary = run(build(parse_config(IMAGES + ["--data-dir", data, "--out", out, "--bad-images", "skip"])))
    assert summary["steps"] == 2 and f"warning: skipped {bad}" in capsys.readouterr().err


def test_class_mismatch_lists_the_classes(tmp_path, capsys):
    data = str(tmp_path / "data")
    _image_folder(data, val_classes=("a", "c"))
    err = _bad(IMAGES + ["--data-dir", data, "--out", str(tmp_path / "o")], capsys)
    assert "only in train/: b; only in val/: c" in err


# ---- metrics are strict JSON ------------------------------------------------------------------------

def test_nonfinite_metrics_are_strict_json():
    row = strict_json(dict(split="train", step=3, loss=float("nan"), lr=float("inf"), images_per_s=2.0))
    assert row == dict(split="train", step=3, loss=None, loss_nonfinite=True, lr=None, lr_nonfinite=True,
                       images_per_s=2.0)
    json.dumps(row, allow_nan=False)


@pytest.mark.slow
def test_nan_run_writes_strict_metrics(tmp_path, capsys):
    out = str(tmp_path / "nan")
    err = _bad([a for a in TINY if a not in ("--lr", "0.001")] + ["--layout", "single", "--lr", "1e6",
                                                                    "--out", out], capsys)
    assert "the training loss became nan" in err
    last = _metrics(out)[-1]                       # parsed strictly: no bare NaN
    assert last["loss"] is None and last["loss_nonfinite"] is True


def test_help_shows_the_timeouts(capsys):
    with pytest.raises(SystemExit):
        _launcher('train').main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1800.0)" in text and "(default: 60.0)" in text and "(default: stop)" in text
