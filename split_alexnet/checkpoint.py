"""Checkpoints: one file per stream (or one for the single layout) plus meta.pt, written atomically.

  CKPT/meta.pt            layout, streams, spec, step, epoch, batch, lr, scheduler, torch RNG, files
  CKPT/stream0.pt ...     split / streams layouts: {"model": one stream's state_dict,
                          "momentum": {param name: SGD momentum buffer}, "dropout": mask generator state}
  CKPT/single.pt          single layout: the same for the whole net

Every file is written to a temporary name, fsynced, and renamed (os.replace), and the directory is
fsynced; meta.pt, which lists the other files with their sizes and sha256 checksums, is written last, so a directory without it (or with a shorter file than it
lists, or one whose checksum differs) is an interrupted save or a damaged file and is refused; the
temporary files of an interrupted save are removed at the next save. Every file is loaded with
torch.load(weights_only=True): a checkpoint holds data (tensors, dicts, lists, str, int, float), never
code, and one that holds anything else is refused before it can run. Nothing is loaded into a model until every file has been
read and checked against it. Weights and momentum buffers are cut along dim 0 exactly as
model.shard_state_dict cuts them, so `cut`/`join` convert between layouts bit for bit.
"""
import hashlib
import os
import re

import torch

from .cli import UsageError, log
from .model import join_state_dicts, shard_state_dict
from .spec import Spec

FORMAT = 1
SPEC_FIELDS = ("streams", "image_size", "in_channels", "num_classes", "net")


def spec_dict(spec):
    return {k: getattr(spec, k) for k in SPEC_FIELDS}


def shard_names(meta):
    return ["single.pt"] if meta["layout"] == "single" else [f"stream{s}.pt" for s in range(meta["streams"])]


def atomic_save(obj, path):
    """Write to PATH.tmpPID, fsync it, rename it to PATH, fsync the directory: PATH is either the old
    file or the whole new one, also after a power cut."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


_TMP = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)$")


def remove_stale_temps(folders, names):
    """Remove NAME.tmpPID files (NAME in `names`: the files this process writes) left by an interrupted
    save in each folder, its checkpoints/ and their step* folders; a file whose writer is alive in
    another process is kept. Returns the paths removed."""
    removed = []
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        dirs = [folder]
        for sub in (folder, os.path.join(folder, "checkpoints")):
            if os.path.isdir(sub):
                dirs += [os.path.join(sub, d) for d in os.listdir(sub) if os.path.isdir(os.path.join(sub, d))]
        for d in dict.fromkeys(dirs):
            for fname in os.listdir(d):
                m = _TMP.match(fname)
                if not m or m["name"] not in names:
                    continue
                pid = int(m["pid"])
                if pid != os.getpid() and _alive(pid):
                    continue
                try:
                    os.remove(os.path.join(d, fname))
                    removed.append(os.path.join(d, fname))
                except OSError:                    # gone already, or a folder this process cannot write
                    pass
    return removed


def run_dir_of(path):
    """The run directory of RUN/checkpoints/stepN (else PATH itself): where an interrupted save of the
    run a resume starts from may have left its temporary files."""
    parent = os.path.dirname(os.path.abspath(path)) if path else ""
    if path and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent)
    return path


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# ---- what a stream's file holds ---------------------------------------------------------------

def stream_state(module, optimizer):
    """module: a Stream (split/streams) or the AlexNet (single)."""
    momentum = {}
    for name, p in module.named_parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            momentum[name] = buf.detach().cpu().clone()
    return {"model": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
            "momentum": momentum, "dropout": module.dropout.state()}


def load_stream_state(module, optimizer, state):
    module.load_state_dict(state["model"])
    params = dict(module.named_parameters())
    for name, buf in state["momentum"].items():
        p = params[name]
        if optimizer is not None:
            optimizer.state[p]["momentum_buffer"] = buf.to(p.device).clone()
    module.dropout.load_state(state["dropout"], device=_device_of(module))


def _device_of(module):
    return next(module.parameters()).device


# ---- writing ------------------------------------------------------------------------------------

def save_files(ckpt_dir, files):
    """files: {name: state} written by this process (one per stream it holds)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    for name, state in files.items():
        atomic_save(state, os.path.join(ckpt_dir, name))


def save_meta(ckpt_dir, meta):
    """Last: lists every file with its size, which marks the checkpoint complete. Returns the meta written."""
    meta = dict(meta, format=FORMAT)
    meta["files"] = {n: os.path.getsize(os.path.join(ckpt_dir, n)) for n in shard_names(meta)}
    meta["sha256"] = {n: sha256(os.path.join(ckpt_dir, n)) for n in shard_names(meta)}
    atomic_save(meta, os.path.join(ckpt_dir, "meta.pt"))
    fsync_dir(os.path.dirname(os.path.abspath(ckpt_dir)))   # the step folder's own entry
    return meta


def newest_complete(run_dir):
    """RUN/checkpoints/step* with a meta.pt, the newest (not verified: find_checkpoint does that), or None."""
    sub = os.path.join(run_dir, "checkpoints")
    done = sorted(d for d in os.listdir(sub) if os.path.isfile(os.path.join(sub, d, "meta.pt"))) \
        if os.path.isdir(sub) else []
    return os.path.join(sub, done[-1]) if done else None


# ---- reading ------------------------------------------------------------------------------------

def find_checkpoint(path, what="--resume"):
    """PATH is a checkpoint directory, or a run directory whose newest checkpoints/step* that verifies
    (sizes and checksums) is taken; the newer ones skipped are logged with the reason."""
    if not os.path.exists(path):
        raise UsageError(f"{what} {path}: no such file or directory: give a checkpoint directory "
                         f"(runs/<run>/checkpoints/step*) or a run directory")
    sub = os.path.join(path, "checkpoints")
    if not os.path.isfile(os.path.join(path, "meta.pt")) and os.path.isdir(sub):
        done = sorted(d for d in os.listdir(sub) if os.path.isfile(os.path.join(sub, d, "meta.pt")))
        if not done:
            raise UsageError(f"{what} {path}: {sub} holds no complete checkpoint (none has meta.pt)")
        skipped = []
        for d in reversed(done):
            try:
                read_meta(os.path.join(sub, d))
            except UsageError as e:
                skipped.append(f"{d} ({e})")
                continue
            for s in skipped:
                log(f"{what}: skipped {s}")
            return os.path.join(sub, d)
        raise UsageError(f"{what} {path}: no checkpoint in {sub} verifies: " + "; ".join(skipped))
    return path


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except __import__("pickle").UnpicklingError as e:   # weights_only refused a global: code, not data
        what = str(e).split("Unsupported global: GLOBAL ", 1)[-1].split()[0] if "Unsupported global" in str(e) \
            else "a non-data object"
        raise UsageError(f"checkpoint file {path} holds code, not only data ({what}): refused unrun; "
                         f"it is not a split_alexnet checkpoint or was tampered with: use another") from None
    except Exception as e:  # truncated or not a torch file
        raise UsageError(f"checkpoint file {path} cannot be read ({type(e).__name__}): it is damaged or "
                         f"truncated; resume from another checkpoint") from None


def read_meta(ckpt_dir):
    meta_path = os.path.join(ckpt_dir, "meta.pt")
    if not os.path.isfile(meta_path):
        raise UsageError(f"{ckpt_dir} has no meta.pt: not a checkpoint, or its save was interrupted; "
                         f"resume from another checkpoint")
    meta = _torch_load(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"{meta_path} is not a split_alexnet checkpoint of format {FORMAT}")
    for name, size in meta["files"].items():
        path = os.path.join(ckpt_dir, name)
        have = os.path.getsize(path) if os.path.isfile(path) else None
        if have != size:
            raise UsageError(f"checkpoint file {path} is {'missing' if have is None else f'{have} bytes'}, "
                             f"meta.pt says {size} bytes: the checkpoint is truncated; resume from another one")
    for name, digest in meta.get("sha256", {}).items():     # checkpoints written before checksums: none
        if sha256(os.path.join(ckpt_dir, name)) != digest:
            raise UsageError(f"checkpoint file {os.path.join(ckpt_dir, name)} fails its sha256 checksum: it "
                             f"is damaged; resume from another checkpoint (a run directory takes the newest "
                             f"that verifies)")
    return meta


def check_matches(meta, spec, layout, ckpt_dir):
    """Refuse a checkpoint of another net or of the other kind of layout, before anything is loaded."""
    want, have = spec_dict(spec), {"net": "paper", **meta["spec"]}   # older checkpoints: the paper's net
    if have != want:
        diff = ", ".join(f"{k} {have.get(k)} (this run: {want[k]})" for k in want if have.get(k) != want[k])
        raise UsageError(f"checkpoint {ckpt_dir} is of another net: {diff}; train with the same "
                         f"--image-size / data set / process count, or start afresh")
    if (meta["layout"] == "single") != (layout == "single"):
        to = "single" if layout == "single" else "shards"
        raise UsageError(f"checkpoint {ckpt_dir} holds the {meta['layout']} layout and this run is {layout}: "
                         f"convert it first (python launch/convert.py {ckpt_dir} OUT --to {to})")


def load_files(ckpt_dir, meta, names, expected):
    """Read files `names` and check each tensor against expected[name] ({key: shape}) before use."""
    states = {}
    for name in names:
        state = _torch_load(os.path.join(ckpt_dir, name))
        model, want = state.get("model", {}), expected[name]
        if set(model) != set(want) or any(tuple(model[k].shape) != tuple(want[k]) for k in want):
            raise UsageError(f"checkpoint file {os.path.join(ckpt_dir, name)} does not match this model's "
                             f"parameters: it is damaged or from another version; start afresh")
        states[name] = state
    return states


# ---- conversion between layouts ----------------------------------------------------------------

def join(src, dst):
    """Shards (split or streams layout) -> a single-layout checkpoint. Returns the meta written to dst."""
    meta = read_meta(src)
    if meta["layout"] == "single":
        raise UsageError(f"{src} already holds the single layout: nothing to join (use --to shards to cut it)")
    spec = Spec(**meta["spec"])
    shards = [_torch_load(os.path.join(src, n)) for n in shard_names(meta)]
    state = {"model": join_state_dicts([s["model"] for s in shards], spec),
             "momentum": (join_state_dicts([s["momentum"] for s in shards], spec)
                          if all(s["momentum"] for s in shards) else {}),
             "dropout": shards[0]["dropout"]}  # every stream draws the same masks: same state
    out = dict(meta, layout="single")
    save_files(dst, {"single.pt": state})
    return save_meta(dst, out)


def cut(src, dst):
    """A single-layout checkpoint -> one shard per stream (loads into split or streams). Returns the meta
    written to dst."""
    meta = read_meta(src)
    if meta["layout"] != "single":
        raise UsageError(f"{src} already holds shards ({meta['layout']} layout): nothing to cut "
                         f"(use --to single to join them)")
    spec = Spec(**meta["spec"])
    state = _torch_load(os.path.join(src, "single.pt"))
    models = shard_state_dict(state["model"], spec)
    moms = shard_state_dict(state["momentum"], spec) if state["momentum"] else [{}] * spec.streams
    files = {f"stream{s}.pt": {"model": models[s], "momentum": moms[s], "dropout": state["dropout"]}
             for s in range(spec.streams)}
    out = dict(meta, layout="split")
    save_files(dst, files)
    return save_meta(dst, out)
