"""The faults a 13-fault probe found (issue 22): nothing mixed, nothing spinning, nothing orphaned.

Each test fails on the code before the fix. Tiny runs: shapes at 67 px (tests/test_faults.py's TINY) or
an image folder of 32 x 32 images in tmp_path, in one process (the single layout) unless the fault is
about ranks. Time bounds leave room for the loaded 2-core machine (an import of torch took 13 s there).
"""
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict

import pytest
import torch
from test_faults import TINY, TRAIN, _alive, _bad, _env, _free_port, _launcher, _metrics, _rank_pid, _wait_for

from split_alexnet import checkpoint as ckpt
from split_alexnet import guard, outlock
from split_alexnet import resume as resume_policy
from split_alexnet.cli import UsageError, run_main
from split_alexnet.config import parse_config
from split_alexnet.data import Seeded, build_datasets

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SINGLE = TINY + ["--layout", "single", "--no-plot"]


def _train(argv):
    with pytest.raises(SystemExit) as e:
        run_main(lambda: _launcher("train").main(argv))
    assert e.value.code == 0
    return _metrics(argv[argv.index("--out") + 1])


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- the lock on --out -----------------------------------------------------------------------------

@pytest.mark.slow
def test_two_jobs_started_together_into_one_out(tmp_path):
    """Two jobs at the same instant into one --out (seeds 0 and 1): exactly one runs; the other exits 2
    with one line naming the first's host and pid; the folder holds one run (its config, its rows)."""
    out = str(tmp_path / "run")
    args = SINGLE + ["--epochs", "6", "--save-every", "4", "--out", out]
    procs = [subprocess.Popen([sys.executable, TRAIN, *args, "--seed", str(seed)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    results = [p.communicate(timeout=240) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, [r[1][-2000:] for r in results])
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    err = results[loser][1]
    assert err == (f"error: --out {out} is in use by another run: host {socket.gethostname()}, pid "
                   f"{procs[winner].pid}: wait for it to end, or give another --out\n"), err
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["seed"] == winner
    steps = [r["step"] for r in _metrics(out) if r["split"] == "train"]
    assert steps == list(range(1, 25)), steps                  # one run's rows, none twice
    meta = torch.load(os.path.join(out, "checkpoints", "step0000024", "meta.pt"), weights_only=True)
    assert meta["config"]["seed"] == winner
    assert not os.path.exists(os.path.join(out, outlock.LOCK))  # released at the end


def _write_lock(out, job, holders):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, outlock.LOCK), "w") as f:
        json.dump(dict(job=job, holders=holders, created=False), f)


def test_lock_held_by_a_live_job_is_refused_naming_it(tmp_path):
    out = str(tmp_path / "run")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(out, "process elsewhere 1", [[socket.gethostname(), other.pid, outlock._start_time(other.pid)]])
        with pytest.raises(UsageError, match=f"in use by another run: host {socket.gethostname()}, pid {other.pid}"):
            outlock.acquire(out)
    finally:
        other.kill()
        other.wait()


def test_stale_lock_of_a_dead_or_reused_pid_is_taken_over(tmp_path):
    out = str(tmp_path / "run")
    dead = _dead_pid()
    _write_lock(out, "process x 1", [[socket.gethostname(), dead, 12345]])
    try:
        took = outlock.acquire(out)
        assert took and f"pid {dead}" in took and "gone" in took
        with open(os.path.join(out, outlock.LOCK)) as f:
            assert json.load(f)["holders"] == [outlock.me()]
    finally:
        outlock.release()
    assert not os.path.exists(os.path.join(out, outlock.LOCK))
    # a live pid whose start time is not the holder's: the pid was reused by a later process
    _write_lock(out, "process x 1", [[socket.gethostname(), os.getppid(), -5]])
    try:
        assert outlock.acquire(out)
    finally:
        outlock.release()


def test_ranks_of_one_torchrun_job_share_the_lock(tmp_path, monkeypatch):
    """A rank of the same job (torchrun run id and rendezvous) joins the lock; restarted workers of that
    job may reuse it while the old holders are still listed; another job is refused."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    out = str(tmp_path / "run")
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(out, outlock.job_id(), [[socket.gethostname(), peer.pid, outlock._start_time(peer.pid)]])
        assert outlock.acquire(out) is None
        with open(os.path.join(out, outlock.LOCK)) as f:
            assert len(json.load(f)["holders"]) == 2
        outlock.release()                          # the peer still holds it
        assert os.path.exists(os.path.join(out, outlock.LOCK))
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another")
        with pytest.raises(UsageError, match=f"pid {peer.pid}"):
            outlock.acquire(out)
    finally:
        peer.kill()
        peer.wait()


def test_released_lock_removes_the_folder_it_created(tmp_path):
    out = str(tmp_path / "new")
    outlock.acquire(out)
    outlock.release()
    assert not os.path.exists(out)


# ---- resume positions against the data ---------------------------------------------------------------

def _image_folder(root, per_class=16, val=2):
    from PIL import Image
    for part, n in (("train", per_class), ("val", val)):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, part, c), exist_ok=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (8 * i, 100, 200 if c == "a" else 0)).save(
                    os.path.join(root, part, c, f"{i}.png"))


IMAGES = ["--dataset", "imagefolder", "--image-size", "67", "--batch-size", "8", "--layout", "single", "--quiet",
          "--no-crop", "--no-flip", "--lighting", "0", "--preprocess", "channel", "--no-plot", "--lr", "0.001"]


@pytest.mark.slow
def test_resume_into_a_shrunk_data_set_ends_in_one_line(tmp_path, capsys):
    """32 images, a checkpoint at batch 3 of 4; the folder cut to 16: the resume ends within 30 s with one
    line naming the change (before: 100 % CPU, no output, for ever). A crafted batch 999 likewise."""
    data = str(tmp_path / "data")
    _image_folder(data)
    run = str(tmp_path / "run")
    _train(IMAGES + ["--data-dir", data, "--epochs", "1", "--max-steps", "3", "--save-every", "3", "--out", run])
    step3 = os.path.join(run, "checkpoints", "step0000003")
    for c in ("a", "b"):
        for i in range(8, 16):
            os.remove(os.path.join(data, "train", c, f"{i}.png"))
    t0 = time.monotonic()
    err = _bad(IMAGES + ["--data-dir", data, "--resume", run, "--epochs", "3", "--max-steps", "0",
                       "--out", str(tmp_path / "r")], capsys)
    took = time.monotonic() - t0
    assert took < 30, took
    assert f"--resume {step3}: the training set changed since the checkpoint (32 images then, 16 now;" in err, err
    # the same count, other files: the fingerprint
    os.rename(os.path.join(data, "train", "a", "0.png"), os.path.join(data, "train", "a", "z.png"))
    for c in ("a", "b"):
        for i in range(8, 16):
            os.link(os.path.join(data, "train", c, "1.png"), os.path.join(data, "train", c, f"{i}.png"))
    err = _bad(IMAGES + ["--data-dir", data, "--resume", run, "--out", str(tmp_path / "r2")], capsys)
    assert "the same 32 images in number, other files" in err, err
    # a position past the epoch: batch 999
    os.rename(os.path.join(data, "train", "a", "z.png"), os.path.join(data, "train", "a", "0.png"))
    meta = torch.load(os.path.join(step3, "meta.pt"), weights_only=True)
    meta.pop("files"), meta.pop("sha256")
    ckpt.save_meta(step3, dict(meta, batch=999))
    t0 = time.monotonic()
    err = _bad(IMAGES + ["--data-dir", data, "--resume", step3, "--out", str(tmp_path / "r3")], capsys)
    assert time.monotonic() - t0 < 30
    assert "its position (epoch 0, batch 999) is past the 4 batches of 8 that 32 training images make" in err, err


# ---- ranks and threads -------------------------------------------------------------------------------

@pytest.mark.slow
def test_agent_killed_at_launch_leaves_no_orphans(tmp_path):
    """SIGKILL of torchrun's agent as soon as its ranks exist (they are still importing torch): both end
    within 40 s, without waiting for --timeout (before: alive with PPID 1 until --timeout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
           *TINY, "--out", str(tmp_path / "run"), "--timeout", "600"]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    ranks = []
    try:
        assert _wait_for(lambda: all(_rank_pid(agent.pid, r) for r in (0, 1)), 120, poll=0.01)
        ranks = [_rank_pid(agent.pid, r) for r in (0, 1)]
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        t0 = time.monotonic()
        gone = _wait_for(lambda: not any(_alive(p) for p in ranks), 40)
        print(f"agent killed at launch -> ranks gone in {time.monotonic() - t0:.1f} s")
        assert gone, "ranks outlived their agent"
    finally:
        for p in ranks:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_watchdog_thread_is_joined_at_stop(monkeypatch):
    port = _free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, 1, True)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dog = guard.Watchdog(0, 2, timeout=60, beat=0.01)
    dog.start()
    assert _wait_for(lambda: store.add("split_alexnet/hb/0", 0) > 2, 10)
    dog.stop()
    assert not dog.is_alive()                      # before: still running when stop() returned


@pytest.mark.slow
def test_dead_peer_is_one_line_on_the_surviving_rank(tmp_path):
    """SIGKILL of rank 1 (launched by hand) mid-run: rank 0's collective fails at once; it ends with one
    `error:` line and exit status 3, no traceback (before: ~25 lines of gloo traceback)."""
    port = _free_port()
    out = str(tmp_path / "run")
    args = ["--layout", "split", *TINY, "--epochs", "100", "--save-every", "2", "--out", out,
            ]
    procs = [subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for r in (0, 1)]
    try:
        first = os.path.join(out, "checkpoints", "step0000002", "meta.pt")
        assert _wait_for(lambda: os.path.exists(first) or procs[0].poll() is not None, 240)
        procs[1].kill()
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        print(f"rank 1 killed -> rank 0 ended in {time.monotonic() - t0:.1f} s: {err.splitlines()[-1:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    assert procs[0].returncode == 3, err[-3000:]
    assert "Traceback" not in err and len([x for x in lines if x.startswith("error:")]) == 1, err[-3000:]
    assert lines[-1].startswith("error: rank 0: a peer process ended or its connection broke ("), lines[-1]


# ---- bad input -----------------------------------------------------------------------------------

def _png_header(path, width, height):
    """A PNG whose header says width x height (no pixel data): PIL refuses it at open, unread."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_bad_image(tmp_path, capsys):
    from PIL import Image
    data = str(tmp_path / "data")
    _image_folder(data, per_class=2)
    bomb = os.path.join(data, "train", "a", "0.png")
    _png_header(bomb, 14000, 14000)
    train, _, _ = build_datasets("imagefolder", data, seed=0)
    ds = Seeded(train, lambda img: img, 0)
    limit = 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(UsageError) as e:
        ds[0]
    assert str(e.value).startswith(f"cannot decode {bomb} (more than PIL's limit of {limit} pixels, its guard "
                                   f"against decompression bombs: ") and "--bad-images skip" in str(e.value)
    assert "\n" not in str(e.value)
    ds.bad_images = "skip"
    img, label = ds[0]                             # the next image that decodes
    assert tuple(img.shape) == (3, 32, 32)       # decode.decode_file: a uint8 tensor, PIL's pixels
    err = capsys.readouterr().err
    assert err.startswith(f"warning: skipped {bomb}, which cannot be decoded (more than PIL's limit of {limit}")
    assert err.count("\n") == 1


def test_divergence_is_judged_on_loss_growth_and_weights():
    d = guard.Divergence(10)
    assert d.loss(2.5) is None and d.loss(200.0) is None   # the first value: 2.5
    assert d.loss(4e19) == "the training loss grew to 4e+19, over 100 x its first value in this run (2.5)"
    assert d.loss(float("nan")) == "the training loss became nan"
    high = guard.Divergence(10)                    # a start at the wrong input scale: thousands, then down
    assert high.loss(2948.0) is None and high.loss(40000.0) is None and high.loss(3e5) is not None
    low = guard.Divergence(10)                     # a start below chance: measured from the chance level
    assert low.loss(0.01) is None and low.loss(200.0) is None
    assert "over 100 x the chance level ln(10) (2.3)" in low.loss(300.0)
    w = [torch.ones(10), torch.ones(3)]
    assert d.weights(w) is None                    # the start
    assert d.weights([t * 50 for t in w]) is None
    assert "the weights' norm grew from 3.606 to 3.606e+27" in d.weights([t * 1e27 for t in w])
    assert "became inf" in d.weights([torch.full((2,), float("inf"))])


@pytest.mark.slow
def test_diverged_run_saves_nothing_and_names_the_checkpoint(tmp_path, capsys):
    """A checkpoint whose fc8 bias momentum is 1e10 on one class: the first resumed step throws that bias
    to -1e7, finite (before: saved at every step, each new checkpoint the one --resume picks, the loss
    finite). The weights' norm is judged before the save: the run stops with one line naming the
    checkpoint to resume from, and writes none."""
    a = str(tmp_path / "a")
    _train(SINGLE + ["--max-steps", "1", "--save-every", "1", "--out", a])
    step = os.path.join(a, "checkpoints", "step0000001")
    state = torch.load(os.path.join(step, "single.pt"), weights_only=True)
    momentum = {k: v["momentum_buffer"] for k, v in state["optimizer"]["state"].items()}   # by parameter name
    bias = next(k for k in momentum if k.endswith("bias") and momentum[k].numel() == 10)
    momentum[bias][0] = 1e10
    torch.save(state, os.path.join(step, "single.pt"))
    meta = torch.load(os.path.join(step, "meta.pt"), weights_only=True)
    meta.pop("files"), meta.pop("sha256")
    ckpt.save_meta(step, meta)
    b = str(tmp_path / "b")
    err = _bad(SINGLE + ["--resume", a, "--max-steps", "4", "--save-every", "1", "--out", b], capsys)
    assert re.search(r"the weights' norm grew from [\d.]+ to [\d.e+]+, over 100 x its start at step 2: the "
                     r"training diverged; resume from " + re.escape(step) + r" with a lower --lr \(now 0.001\), or "
                     r"use --init d2l \(this step's weights were not saved\)", err), err
    assert not os.path.exists(os.path.join(b, "checkpoints", "step0000002"))


def test_mean_image_cache_is_keyed_by_the_files_and_options(tmp_path):
    from split_alexnet.train import _mean_image_rank0_first
    data = str(tmp_path / "data")
    _image_folder(data, per_class=2)
    cfg = parse_config(IMAGES + ["--data-dir", data, "--preprocess", "paper", "--out", str(tmp_path / "o")])

    def mean():
        train, _, _ = build_datasets("imagefolder", data, seed=0)
        return _mean_image_rank0_first(cfg, train, 3, 0, 1)
    m1, how = mean()
    assert how.startswith("computed from 4 training images, saved to")
    assert mean()[1].startswith("read ")
    from PIL import Image
    time.sleep(0.01)
    Image.new("RGB", (32, 32), (255, 255, 255)).save(os.path.join(data, "train", "a", "new.png"))
    m2, how = mean()                               # before: read the stale cache (train/'s entries unchanged)
    assert how.startswith("computed from 5 training images"), how
    assert not torch.equal(m1, m2)
    cfg = parse_config(IMAGES + ["--data-dir", data, "--preprocess", "paper", "--bad-images", "skip"])
    assert mean()[1].startswith("computed from 5")  # another option, another key


def test_resume_flags_outside_the_safe_list_are_refused():
    base = SINGLE + ["--out", "x"]
    saved = asdict(parse_config(base))
    for flag, value, why in (("--preprocess", "paper", "the trained net's first layer learned"),
                             ("--recipe", "d2l", "a recipe also sets the init and the input")):
        argv = base + [flag, value, "--resume", "r"]
        with pytest.raises(UsageError, match=f"{flag} {value} on resume: the checkpoint's run used .*{why}"):
            resume_policy.resolve_resume(parse_config(argv), argv, saved, 0)
    argv = base + ["--momentum", "0.5", "--resume", "r"]
    _, lines = resume_policy.resolve_resume(parse_config(argv), argv, saved, 0)
    assert lines == [f"resume: --momentum 0.5 (the checkpoint's run: {saved['momentum']})"]


@pytest.mark.slow
def test_epochs_after_a_batch_size_change_and_cleanup_in_the_own_folder(tmp_path, capsys):
    """1 epoch of 4 steps at batch 8, resumed at batch 4 to --epochs 2: 8 more steps, to step 12 (before:
    to step 16, the total ignoring the steps taken at batch 8). The resume source's stale temporary file
    stays: cleanup touches only the new run's folder."""
    a = str(tmp_path / "a")
    _train(SINGLE + ["--epochs", "1", "--save-every", "4", "--out", a])
    stale = os.path.join(a, "checkpoints", "step0000004", f"single.pt.tmp{_dead_pid()}")
    with open(stale, "wb") as f:
        f.write(b"x" * 100)
    b = str(tmp_path / "b")
    rows = _train(SINGLE + ["--resume", a, "--batch-size", "4", "--epochs", "2", "--save-every", "4", "--out", b])
    assert "resume: --batch-size 4 (the checkpoint's run: 8)" in capsys.readouterr().out
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(5, 13))
    assert os.path.exists(stale)


def test_biases_lr_validated_after_its_multiplier():
    with pytest.raises(UsageError, match=r"--lr 1e\+38 x --bias-lr-mult 10 = 1e\+39, the biases' lr, is not a "
                                         r"finite float32"):
        parse_config(SINGLE + ["--lr", "1e38", "--bias-lr-mult", "10"])


def test_checkpoints_path_that_cannot_be_written_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    err = _bad(SINGLE + ["--save-every", "2", "--out", str(out)], capsys)
    assert f"{out}/checkpoints is not a directory, and checkpoints are written there" in err
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_full_disk_is_found_by_check_out(tmp_path):
    """A file system that takes no more bytes (here: RLIMIT_FSIZE 1 KB, where an empty file is still
    created, as on a full disk): refused by check_out, which writes a probe of bytes."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)); from split_alexnet import guard; "
            "guard.check_out(sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "UsageError: --out" in r.stderr and "cannot write in" in r.stderr, r.stderr[-2000:]
    assert "(File too large)" in r.stderr
