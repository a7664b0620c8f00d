"""Runs that survive a cluster (issue 18): resume in place after SIGTERM or a torchrun restart, the
SLURM script run twice, --config replay, the run folder's record, metrics rows, TensorBoard,
--keep-last, optimizer and GradScaler state, convert --to state_dict, a full disk, launcher flags.

Runs: shapes at 67 px, batch 8, 4 steps an epoch (tests/test_train.py's TINY); split runs are 2 gloo
ranks under torchrun. Losses are compared exactly: a resumed run repeats the uninterrupted one bit for
bit (same layout, same process count, same summation order; tests/test_train.py).
"""
import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch

from split_alexnet import checkpoint as ckpt
from split_alexnet.cli import UsageError, run_main
from split_alexnet.config import parse_config
from split_alexnet.spec import Spec
from split_alexnet.train import EXIT_PREEMPTED, build, resume, run

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TRAIN = os.path.join(ROOT, "launch", "train.py")
TINY = ["--dataset", "shapes", "--train-size", "32", "--val-size", "8", "--image-size", "67",
        "--batch-size", "8", "--epochs", "3", "--lr", "0.001", "--lr-patience", "0", "--no-plot"]
STEPS = 8          # 2 epochs of 4 steps: an epoch boundary, evaluations, a plateau-schedule step
SPLIT = TINY + ["--max-steps", str(STEPS), "--micro-batches", "1"]


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)


def _torchrun(args, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra, TRAIN,
            *args]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(out, split="train"):
    return [(r["step"], r["loss"]) for r in _metrics(out) if r["split"] == split]


def _train_steps(out):
    try:
        return max((r["step"] for r in _metrics(out) if r["split"] == "train"), default=0)
    except (OSError, ValueError):
        return 0


def _wait_for(cond, timeout, poll=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(poll)
    return False


def _in_process(argv):
    return run(build(parse_config(argv)))


def _launcher(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_launcher", os.path.join(ROOT, "launch", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted split run of STEPS steps: its folder (the losses every resumed run must repeat)."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    proc = subprocess.run(_torchrun(SPLIT + ["--out", out, "--quiet"]), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ---- resume in place --------------------------------------------------------------------------------

def _start_and_signal(cmd, out, sig=signal.SIGTERM, after_step=2, env=None, target=None):
    """Start cmd (its own session); once metrics.jsonl has `after_step` train rows, send `sig` to the
    process (or to target(proc)); returns (returncode, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        if not _wait_for(lambda: _train_steps(out) >= after_step or proc.poll() is not None, 240):
            pytest.fail("no training step within 240 s")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.kill(target(proc) if target else proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stdout, stderr


@pytest.mark.slow
def test_sigterm_then_the_same_command_repeats_the_uninterrupted_losses(reference, tmp_path):
    """SIGTERM to torchrun's agent mid-way (no --save-every: the signal alone makes the checkpoint): the
    agent passes it to both ranks, which agree on a step, save, and exit 75; the identical command then
    continues in place and metrics.jsonl holds the uninterrupted run's losses, step for step."""
    out = str(tmp_path / "run")
    cmd = _torchrun(SPLIT + ["--out", out])
    code, stdout, stderr = _start_and_signal(cmd, out)
    assert code != 0, "the agent exits non-zero on SIGTERM"
    line = next((l for l in stdout.splitlines() if l.startswith("stopped on SIGTERM at step")), None)
    assert line and f"(exit status {EXIT_PREEMPTED})" in line, (stdout[-2000:], stderr[-2000:])
    step = int(line.split("at step ")[1].split(":")[0])
    assert 2 <= step < STEPS and os.path.isfile(os.path.join(out, "checkpoints", f"step{step:07d}", "meta.pt"))
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed in place from {out}/checkpoints/step{step:07d} at step {step}: appending to" in proc.stdout
    assert _losses(out) == _losses(reference) and _losses(out, "val") == _losses(reference, "val")


@pytest.mark.slow
def test_torchrun_restart_after_a_killed_rank_continues_in_place(reference, tmp_path):
    """torchrun --max-restarts 1: SIGKILL of rank 1 after the step-2 checkpoint; torchrun restarts both
    ranks with the same command, which resume in place from the newest checkpoint that verifies (rows
    past it dropped) and end with the uninterrupted run's losses."""
    out = str(tmp_path / "run")
    cmd = _torchrun(SPLIT + ["--out", out, "--save-every", "2"], extra=["--max-restarts", "1"])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        first = os.path.join(out, "checkpoints", "step0000002", "meta.pt")
        assert _wait_for(lambda: os.path.exists(first) or proc.poll() is not None, 240) and proc.poll() is None
        rank1 = _rank_pid(proc.pid, 1)
        assert rank1, "rank 1 not found"
        os.kill(rank1, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed in place from" in stdout, stdout[-2000:]
    run_json = json.load(open(os.path.join(out, "run.json")))
    assert run_json["torchelastic_restart_count"] == 1 and run_json["earlier"][0]["torchelastic_restart_count"] == 0
    assert _losses(out) == _losses(reference)


def _rank_pid(agent, rank):
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != agent:
                    continue
            with open(f"/proc/{p}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return int(p)
        except (OSError, IndexError):
            pass
    return None


def _stub(folder, name, body):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + body)
    os.chmod(path, 0o755)


@pytest.mark.slow
def test_sbatch_script_twice_resumes_the_run(reference, tmp_path):
    """scripts/slurm/train.sbatch on this machine, SLURM stubbed (srun runs its command, scontrol names
    this host and records a requeue): SIGTERM to the batch script (SLURM's --signal=B:TERM) reaches the
    ranks through srun and torchrun; the script requeues the job; the same script run again resumes the
    run in place to the uninterrupted run's losses."""
    stubs, log = str(tmp_path / "bin"), str(tmp_path / "scontrol.log")
    os.makedirs(stubs)
    _stub(stubs, "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _stub(stubs, "scontrol", f'if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; else echo "$@" >> {log}; fi\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "run")
    env = _env(PATH=stubs + os.pathsep + os.environ["PATH"], SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=ROOT, NPROC="2", PORT=str(port), OUT=out,
               TORCHRUN=f"{sys.executable} -m torch.distributed.run")
    cmd = ["bash", os.path.join(ROOT, "scripts", "slurm", "train.sbatch"), *SPLIT]
    code, stdout, stderr = _start_and_signal(cmd, out, env=env)
    assert "stopped on SIGTERM at step" in stdout and "requeueing job 4242" in stdout, (stdout[-2000:], stderr[-2000:])
    assert open(log).read() == "requeue 4242\n"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed in place from" in proc.stdout and open(log).read() == "requeue 4242\n"
    assert _losses(out) == _losses(reference)


@pytest.mark.slow
def test_folder_with_metrics_but_no_checkpoint_is_refused_with_the_fix(tmp_path, capsys):
    out = str(tmp_path / "run")
    _in_process(TINY + ["--layout", "single", "--max-steps", "1", "--out", out, "--quiet"])
    with pytest.raises(SystemExit) as e:
        run_main(lambda: _launcher("train").main(TINY + ["--layout", "single", "--max-steps", "2", "--out", out,
                                                         "--resume", "auto", "--quiet"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert f"--out {out} already holds metrics.jsonl and no checkpoint to continue from: give another --out" in err
    with pytest.raises(SystemExit) as e:
        run_main(lambda: _launcher("train").main(TINY + ["--resume", "auto", "--quiet"]))
    assert e.value.code == 2 and "--resume auto continues the run in --out: give --out DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_in_place_resume_drops_rows_past_the_checkpoint(tmp_path, capsys):
    """A run killed after its step-2 checkpoint left rows for steps 3, 4 and half a line: the same
    command cuts them, says so in one line, and appends the repeated steps."""
    full, out = str(tmp_path / "full"), str(tmp_path / "run")
    args = TINY + ["--layout", "single", "--max-steps", "4"]
    _in_process(args + ["--out", full, "--quiet"])
    _in_process(args + ["--out", out, "--save-every", "2", "--quiet"])
    shutil.rmtree(os.path.join(out, "checkpoints", "step0000004"))          # killed before this save
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"split": "train", "step": 5, "lo')                         # and mid-line
    with pytest.raises(SystemExit) as e:
        run_main(lambda: _launcher("train").main(args + ["--out", out]))
    assert e.value.code == 0
    said = [l for l in capsys.readouterr().out.splitlines() if l.startswith("resumed in place")]
    # rows past step 2: train 3, train 4, val 4, the half line
    assert said == [f"resumed in place from {out}/checkpoints/step0000002 at step 2: appending to "
                    f"{out}/metrics.jsonl (4 row(s) past step 2 dropped)"], said
    assert _losses(out) == _losses(full) and _losses(out, "val") == _losses(full, "val")


# ---- preemption -------------------------------------------------------------------------------------

PREEMPTION = """
import os, signal, time
from split_alexnet.train import Preemption
with Preemption(1, again_s=0.5) as p:
    os.kill(os.getpid(), signal.{sig})
    os.kill(os.getpid(), signal.{sig})      # the same request delivered twice (within again_s)
    print("agreed", p.agreed(), flush=True)
    time.sleep(0.8)
    os.kill(os.getpid(), signal.{sig})      # a second request: at once
    time.sleep(5)
print("not stopped", flush=True)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
@pytest.mark.slow
def test_a_signal_sets_the_flag_and_a_second_stops_at_once(sig):
    proc = subprocess.run([sys.executable, "-c", PREEMPTION.format(sig=sig)], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout == f"agreed {int(getattr(signal, sig))}\n", proc.stderr
    assert proc.returncode == -getattr(signal, sig)


@pytest.mark.slow
def test_sigusr1_stops_a_single_run_with_a_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, TRAIN, *TINY, "--layout", "single", "--max-steps", "40", "--out", out]
    code, stdout, stderr = _start_and_signal(cmd, out, sig=signal.SIGUSR1, after_step=1)
    assert code == EXIT_PREEMPTED, stderr[-3000:]
    step = _train_steps(out)
    assert f"stopped on SIGUSR1 at step {step}: saved {out}/checkpoints/step{step:07d}" in stdout
    assert ckpt.find_checkpoint(out) == os.path.join(out, "checkpoints", f"step{step:07d}")


# ---- --config ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_config_replays_a_runs_config_json_exactly(tmp_path):
    """A run with non-default flags; --config of its config.json alone (and a new --out) repeats its
    losses exactly and records the same settings."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _in_process(TINY + ["--layout", "single", "--max-steps", "5", "--seed", "3", "--lr", "0.002",
                        "--momentum", "0.8", "--bias-lr-mult", "1", "--no-crop", "--out", a, "--quiet"])
    _in_process(["--config", os.path.join(a, "config.json"), "--out", b])
    assert _losses(b) == _losses(a) and len(_losses(a)) == 5 and _losses(b, "val") == _losses(a, "val")
    ca, cb = (json.load(open(os.path.join(d, "config.json"))) for d in (a, b))
    assert {**ca, "out": b} == cb


def _file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_sets_defaults_and_flags_win(tmp_path):
    toml = _file(tmp_path, "run.toml", 'dataset = "mnist"\nlr = 0.02\nbatch-size = 16\nrecipe = "d2l"\n'
                                       'keep_last = 5\n')
    cfg = parse_config(["--config", toml, "--lr", "0.03"])
    assert (cfg.lr, cfg.batch_size, cfg.dataset, cfg.recipe, cfg.keep_last) == (0.03, 16, "mnist", "d2l", 5)
    assert cfg.momentum == 0.0 and cfg.image_size == 227        # the file's recipe and data set decide the rest
    js = _file(tmp_path, "run.json", '{"lr": 1, "epochs": 2}')
    assert (parse_config(["--config", js]).lr, parse_config(["--config", js]).epochs) == (1.0, 2)


@pytest.mark.parametrize("name, text, message", [
    ("a.toml", "lrr = 0.1\n", "unknown setting 'lrr': use the flags' names"),
    ("a.toml", 'lr = "fast"\n', "lr = 'fast' is not a float"),
    ("a.toml", "epochs = 2.5\n", "epochs = 2.5 is not an int"),
    ("a.toml", 'layout = "mesh"\n', "layout = 'mesh': choose from single, streams, split, hybrid"),
    ("a.toml", "lr = \n", "not valid TOML"),
    ("a.json", "{lr: 1}", "not valid JSON"),
    ("a.json", "[1, 2]", "not a table of settings"),
])
def test_bad_config_file_is_one_line(tmp_path, name, text, message):
    path = _file(tmp_path, name, text)
    with pytest.raises(UsageError) as e:
        parse_config(["--config", path])
    assert message in str(e.value) and f"--config {path}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no such file"):
        parse_config(["--config", str(tmp_path / "missing.toml")])


# ---- what the run folder records ---------------------------------------------------------------------

@pytest.mark.slow
def test_run_folder_records_how_it_ran(reference):
    info = json.load(open(os.path.join(reference, "run.json")))
    import platform

    import torchvision
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert info["git_commit"] == commit and len(commit) == 40 and isinstance(info["git_dirty"], bool)
    assert (info["python"], info["torch"], info["torchvision"]) == (platform.python_version(), torch.__version__,
                                                                    torchvision.__version__)
    assert info["cuda"] == torch.version.cuda and "cudnn" in info and "nccl" in info
    assert (info["world_size"], info["replicas"], info["streams"], info["backend"]) == (2, 1, 2, "gloo")
    assert info["hosts"] == [socket.gethostname()] * 2 and info["host"] == socket.gethostname()
    assert time.strptime(info["started"], "%Y-%m-%dT%H:%M:%SZ")
    assert "launch/train.py" in info["command"] and "--max-steps 8" in info["command"]
    assert info["mean_image"] == "the shapes data set's per-channel mean and std (data.py)"
    assert info["torchelastic_run_id"] and info["torchelastic_restart_count"] == 0 and info["earlier"] == []


@pytest.mark.slow
def test_metrics_rows_carry_time_and_every_groups_lr(reference):
    rows = _metrics(reference)
    train = [r for r in rows if r["split"] == "train"]
    for r in train:
        assert {"time", "data_s", "step_s", "lr", "lr_weights", "lr_biases", "images_per_s"} <= set(r)
        assert r["lr_weights"] == r["lr"] and r["lr_biases"] == 2 * r["lr"]       # paper-he-std: biases x2
        assert r["data_s"] >= 0 and r["step_s"] > 0
    times = [r["time"] for r in rows]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 3600
    assert all("time" in r for r in rows if r["split"] == "val")


@pytest.mark.slow
def test_tensorboard_writes_the_metrics_rows(tmp_path, capsys):
    out = str(tmp_path / "run")
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:                            # the extra is not installed: the flag says so in one line
        with pytest.raises(UsageError, match="--tensorboard: the tensorboard package is not installed"):
            _in_process(TINY + ["--layout", "single", "--max-steps", "1", "--out", out, "--tensorboard", "--quiet"])
        pytest.skip("tensorboard is not installed (pip install -e '.[test]' installs it): checked the refusal")
    _in_process(TINY + ["--layout", "single", "--max-steps", "5", "--out", out, "--tensorboard", "--quiet"])
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    f32 = lambda x: struct.unpack("f", struct.pack("f", x))[0]     # noqa: E731 (event files hold float32)
    for split, key in (("train", "loss"), ("train", "lr_biases"), ("train", "step_s"), ("val", "top1")):
        want = [(r["step"], f32(r[key])) for r in _metrics(out) if r["split"] == split]
        got = [(e.step, e.value) for e in acc.Scalars(f"{split}/{key}")]
        assert got == want and want, (split, key)


@pytest.mark.slow
def test_wandb_is_off_by_default_and_refused_in_one_line_when_missing(tmp_path):
    assert parse_config(TINY).wandb is False and parse_config(TINY).tensorboard is False
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed: not run here (it would log to W&B)")
    except ImportError:
        pass
    with pytest.raises(UsageError, match="--wandb: the wandb package is not installed: pip install wandb"):
        _in_process(TINY + ["--layout", "single", "--max-steps", "1", "--out", str(tmp_path / "r"), "--wandb",
                            "--quiet"])


# ---- checkpoints --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_keep_last_two_leaves_two(tmp_path):
    out = str(tmp_path / "run")
    _in_process(TINY + ["--layout", "single", "--max-steps", "4", "--save-every", "1", "--keep-last", "2",
                        "--out", out, "--quiet"])
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step0000003", "step0000004"]


def _tiny_checkpoint(path, step):
    """A checkpoint folder with one small file (prune and find_checkpoint read only meta.pt's list)."""
    ckpt.save_files(path, {"single.pt": {"model": {"w": torch.full((4,), float(step))}}})
    ckpt.save_meta(path, dict(layout="single", streams=2, spec=ckpt.spec_dict(Spec(image_size=67, num_classes=10)),
                              step=step, epoch=0, batch=step, lr=0.01, scheduler=None, torch_rng=torch.get_rng_state()))


def test_keep_last_never_deletes_the_newest_that_verifies(tmp_path):
    run_dir = str(tmp_path)
    for step in (1, 2, 3, 4):
        _tiny_checkpoint(os.path.join(run_dir, "checkpoints", f"step{step:07d}"), step)
    for step in (3, 4):                            # the two newest are damaged
        with open(os.path.join(run_dir, "checkpoints", f"step{step:07d}", "single.pt"), "r+b") as f:
            f.seek(0)
            f.write(b"XXXX")
    removed = ckpt.prune(run_dir, 1)
    assert [os.path.basename(r) for r in removed] == ["step0000001"]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step0000002", "step0000003", "step0000004"]
    assert ckpt.find_checkpoint(run_dir) == os.path.join(run_dir, "checkpoints", "step0000002")


@pytest.mark.slow
def test_optimizer_state_goes_through_state_dict_and_old_checkpoints_load(tmp_path):
    """The file's optimizer entry is optimizer.state_dict() keyed by name; a checkpoint in the old
    format (hand-packed momentum) resumes to the same losses as the new one."""
    part, new, old = (str(tmp_path / n) for n in ("part", "new", "old"))
    args = TINY + ["--layout", "single", "--quiet"]
    _in_process(args + ["--max-steps", "2", "--save-every", "2", "--out", part])
    step = os.path.join(part, "checkpoints", "step0000002")
    state = torch.load(os.path.join(step, "single.pt"), weights_only=True)
    assert set(state) == {"model", "optimizer", "dropout"}
    assert set(state["optimizer"]["state"]) == set(state["model"])
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["weights", "biases"]
    legacy = str(tmp_path / "legacy")                # the format before: {"model", "momentum", "dropout"}
    os.makedirs(legacy)
    torch.save({"model": state["model"], "momentum": ckpt.momentum(state), "dropout": state["dropout"]},
               os.path.join(legacy, "single.pt"))
    meta = torch.load(os.path.join(step, "meta.pt"), weights_only=True)
    ckpt.save_meta(legacy, {k: v for k, v in meta.items() if k not in ("files", "sha256", "format")})
    _in_process(args + ["--max-steps", "4", "--out", new, "--resume", step])
    _in_process(args + ["--max-steps", "4", "--out", old, "--resume", legacy])
    assert _losses(new) == _losses(old) and [s for s, _ in _losses(new)] == [3, 4]


@pytest.mark.slow
def test_fp16_resume_keeps_the_loss_scale(tmp_path):
    """fp16: the GradScaler's state (scale, growth count) is saved in meta.pt and restored on resume
    (before: a new scaler at the next step, at 2^16 with its growth count at 0)."""
    part = str(tmp_path / "part")
    args = TINY + ["--layout", "single", "--precision", "fp16", "--quiet"]
    _in_process(args + ["--max-steps", "2", "--save-every", "2", "--out", part])
    meta = ckpt.read_meta(os.path.join(part, "checkpoints", "step0000002"))
    # the first steps overflowed and lowered the scale from its 2^16 start (measured: 16384 at step 2)
    assert 0 < meta["scaler"]["scale"] < 2.0 ** 16, meta["scaler"]
    resumed = build(parse_config(args + ["--max-steps", "3", "--out", str(tmp_path / "r"), "--resume", part]))
    resume(resumed, part)
    assert isinstance(resumed.scaler, torch.amp.GradScaler) and resumed.scaler.state_dict() == meta["scaler"]


@pytest.mark.slow
def test_convert_to_state_dict_loads_with_weights_only_alone(tmp_path, capsys):
    out = str(tmp_path / "run")
    _in_process(TINY + ["--layout", "streams", "--max-steps", "1", "--save-every", "1", "--out", out, "--quiet"])
    dst = str(tmp_path / "alexnet.pt")
    assert _launcher("convert").main([out, dst, "--to", "state_dict"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {dst} (") and "weights_only=True" in said
    d = torch.load(dst, weights_only=True)
    assert set(d) == {"format", "spec", "state_dict", "step"} and d["step"] == 1
    assert d["spec"] == dict(streams=2, image_size=67, in_channels=3, num_classes=10, net="paper")
    net = ckpt.load_exported(dst)                    # the single layout, the streams' weights joined
    shards = [torch.load(os.path.join(out, "checkpoints", "step0000001", f"stream{s}.pt"), weights_only=True)
              for s in (0, 1)]
    w = net.state_dict()["conv1.weight"]
    assert torch.equal(w, torch.cat([shards[0]["model"]["conv1.weight"], shards[1]["model"]["conv1.weight"]]))
    assert net(torch.randn(2, 3, 67, 67)).shape == (2, 10)
    with pytest.raises(UsageError, match="already exists"):
        _launcher("convert").main([out, dst, "--to", "state_dict"])


class _FullDisk:
    """A writer (checkpoint.save_files' write=) that fails with ENOSPC on its n-th call, half-way
    through the file, as a disk that fills up would."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, obj, f):
        self.calls += 1
        if self.calls == self.n:
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        torch.save(obj, f)


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path):
    """Checkpoints at steps 1 and 2 (streams: stream0.pt, stream1.pt, meta.pt each); the disk fills while
    step 2's stream1.pt is written: one line naming the folder and the space, step 2's partial files
    removed, step 1 still the newest that verifies and resumable."""
    out = str(tmp_path / "run")
    job = build(parse_config(TINY + ["--layout", "streams", "--max-steps", "3", "--save-every", "1", "--out", out,
                                     "--quiet"]))
    with pytest.raises(UsageError) as e:
        run(job, write=_FullDisk(5))
    message = str(e.value)
    step2 = os.path.join(out, "checkpoints", "step0000002")
    assert "\n" not in message and message.startswith(f"no space left for checkpoint {step2}: stream0.pt, "
                                                      f"stream1.pt need about ")
    assert " MiB free in " + os.path.join(out, "checkpoints") in message
    assert f"removed the partial {step2}; {out}/checkpoints/step0000001 stays the newest checkpoint" in message
    assert not os.path.exists(step2) and os.listdir(os.path.join(out, "checkpoints")) == ["step0000001"]
    assert ckpt.find_checkpoint(out) == os.path.join(out, "checkpoints", "step0000001")
    assert not [f for f in os.listdir(os.path.join(out, "checkpoints", "step0000001")) if ".tmp" in f]


# ---- the launchers' flags ---------------------------------------------------------------------------

@pytest.mark.parametrize("launcher, shown", [
    ("check", ["--image-size IMAGE_SIZE (default: 227)", "--batch-size BATCH_SIZE (default: 8)"]),
    ("bench", ["--image-size IMAGE_SIZE (default: 227)", "--steps STEPS measured steps per layout (per batch size); "
                                                         "default 30 on CUDA, 5 on CPU"]),
    ("summary", ["--num-classes NUM_CLASSES (default: 1000)"]),
    ("convert", ["--to {single,shards,state_dict}"]),
])
def test_launchers_show_defaults_and_answer_a_bad_flag_in_one_line(launcher, shown, capsys):
    main = _launcher(launcher).main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and all(s in text for s in shown), text
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(["--no-such-flag"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_a_restarted_attempt_reads_none_of_the_attempt_befores_keys(monkeypatch):
    """torchrun's agent keeps one store for the whole job: the process group's keys go under the attempt
    (TORCHELASTIC_RESTART_COUNT), so attempt 1 waiting for a peer's address does not find attempt 0's."""
    from datetime import timedelta

    from split_alexnet.distributed import attempt_store
    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    attempt_store(10).set("default_pg/0//cpu/rank_1", "the dead peer's address")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    later = attempt_store(10)
    later.set_timeout(timedelta(seconds=0.5))
    with pytest.raises(torch.distributed.DistStoreError):   # not there: attempt 1 waits for its own peer's key
        later.get("default_pg/0//cpu/rank_1")
    assert server.get("split_alexnet/attempt0/default_pg/0//cpu/rank_1") == b"the dead peer's address"
