"""What a checkpoint's files hold (a stream's or the whole net's state, the optimizer's by parameter name)
and how they are written: atomically, fsynced, meta.pt last (checkpoint.py describes the format)."""
import errno
import hashlib
import os
import re
import shutil

import torch

from . import layouts
from .errors import UsageError
from .outlock import pid_alive

FORMAT = 1
SPEC_FIELDS = ("streams", "image_size", "in_channels", "num_classes", "net")


def spec_dict(spec):
    return {k: getattr(spec, k) for k in SPEC_FIELDS}


def single_files(layout):
    """Whether `layout`'s checkpoints hold the single layout's file (layouts.py: files "single")."""
    return layouts.get(layout, "checkpoint layout").files == "single"


def shard_names(meta):
    return ["single.pt"] if single_files(meta["layout"]) else [f"stream{s}.pt" for s in range(meta["streams"])]


def atomic_save(obj, path, write=torch.save):
    """Write to PATH.tmpPID, fsync it, rename it to PATH, fsync the directory: PATH is either the old
    file or the whole new one, also after a power cut. write(obj, file): how the bytes are written."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(obj, f)
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
                if pid != os.getpid() and pid_alive(pid):
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


# ---- what a stream's file holds ---------------------------------------------------------------

def stream_state(module, optimizer):
    """module: a Stream (split/streams) or the AlexNet (single)."""
    return {"model": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
            "optimizer": optimizer_state(module, optimizer), "dropout": module.dropout.state()}


def _positions(optimizer, packed):
    """id(parameter) -> its number in optimizer.state_dict() (`packed`)."""
    return {id(p): i for group, pg in zip(optimizer.param_groups, packed["param_groups"])
            for p, i in zip(group["params"], pg["params"])}


def optimizer_state(module, optimizer):
    """optimizer.state_dict() for `module`'s parameters, its state keyed by parameter name (state_dict()
    numbers the parameters of the whole optimizer; a name is the same in every layout, so cut/join move
    the state along with the weights), its groups' settings without their parameter numbers."""
    packed = optimizer.state_dict()
    at = _positions(optimizer, packed)
    state = {}
    for name, p in module.named_parameters():
        if at.get(id(p)) in packed["state"]:
            state[name] = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                           for k, v in packed["state"][at[id(p)]].items()}
    return {"state": state, "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                             for g in packed["param_groups"]]}


def _optimizer_of(state):
    """A file's optimizer state by parameter name; files written before it hold SGD's momentum alone."""
    if "optimizer" in state:
        return state["optimizer"]
    return {"state": {n: {"momentum_buffer": b} for n, b in state.get("momentum", {}).items()}, "param_groups": []}


def momentum(state):
    """{parameter name: SGD momentum buffer} of a stream's file (either format)."""
    return {n: st["momentum_buffer"] for n, st in _optimizer_of(state)["state"].items()
            if torch.is_tensor(st.get("momentum_buffer"))}


def load_stream_state(module, optimizer, state):
    """The weights and dropout state into `module`; its optimizer state into `optimizer` (or None)."""
    module.load_state_dict(state["model"])
    if optimizer is not None:
        load_optimizer_states(optimizer, [(module, state)])
    module.dropout.load_state(state["dropout"], device=_device_of(module))


def load_optimizer_states(optimizer, pairs):
    """[(module, its file's state)] into the optimizer through optimizer.load_state_dict: the saved
    state of each named parameter, this optimizer's own groups (their lr is set by the caller)."""
    packed = optimizer.state_dict()
    at = _positions(optimizer, packed)
    for module, state in pairs:
        params = dict(module.named_parameters())
        for name, st in _optimizer_of(state)["state"].items():
            packed["state"][at[id(params[name])]] = st
    optimizer.load_state_dict(packed)


def _device_of(module):
    return next(module.parameters()).device


# ---- writing ------------------------------------------------------------------------------------

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UsageError):
    """A checkpoint write ran out of space: one line, the folder and the space it needed."""


def state_bytes(obj):
    """The bytes of the tensors in obj (nested dicts, lists): about the size torch.save writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def _disk_full(error, folder, need):
    """Did this write fail for want of space? ENOSPC/EDQUOT, or (torch.save's writer reports a failed
    write as a RuntimeError without its errno) less free space in the folder than the write needs."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return True
    try:
        return isinstance(error, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < need
    except OSError:
        return False


def save_files(ckpt_dir, files, write=torch.save):
    """files: {name: state} written by this process (one per stream it holds). A full disk raises
    DiskFull naming the folder and the space the files need; the partial file is removed."""
    os.makedirs(ckpt_dir, exist_ok=True)
    for name, state in files.items():
        try:
            atomic_save(state, os.path.join(ckpt_dir, name), write)
        except (OSError, RuntimeError) as e:
            need = sum(state_bytes(s) for s in files.values())
            if not _disk_full(e, ckpt_dir, need):
                raise
            free = shutil.disk_usage(ckpt_dir).free
            raise DiskFull(f"no space left for checkpoint {ckpt_dir}: {', '.join(files)} need about "
                           f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free in "
                           f"{os.path.dirname(os.path.abspath(ckpt_dir))} ({os.strerror(errno.ENOSPC)})") from None


def save_meta(ckpt_dir, meta, write=torch.save):
    """Last: lists every file with its size, which marks the checkpoint complete. Returns the meta written."""
    meta = dict(meta, format=FORMAT)
    meta["files"] = {n: os.path.getsize(os.path.join(ckpt_dir, n)) for n in shard_names(meta)}
    meta["sha256"] = {n: sha256(os.path.join(ckpt_dir, n)) for n in shard_names(meta)}
    save_files(ckpt_dir, {"meta.pt": meta}, write)
    fsync_dir(os.path.dirname(os.path.abspath(ckpt_dir)))   # the step folder's own entry
    return meta


def prune(run_dir, keep):
    """--keep-last K: remove all but the K newest complete checkpoints of RUN/checkpoints, and never the
    newest that verifies nor any newer one. Returns the folders removed."""
    sub = os.path.join(run_dir, "checkpoints")
    done = sorted(d for d in os.listdir(sub) if os.path.isfile(os.path.join(sub, d, "meta.pt"))) \
        if os.path.isdir(sub) else []
    if keep <= 0 or len(done) <= keep:
        return []
    try:
        from .untrusted import find_checkpoint  # reading verifies: the newest that does
        newest_ok = os.path.basename(find_checkpoint(run_dir, "--keep-last"))
    except UsageError:                             # none verifies: remove nothing
        return []
    removed = []
    for d in done[:-keep]:
        if d < newest_ok:
            shutil.rmtree(os.path.join(sub, d))
            removed.append(os.path.join(sub, d))
    return removed


def newest_complete(run_dir):
    """RUN/checkpoints/step* with a meta.pt, the newest (not verified: find_checkpoint does that), or None."""
    sub = os.path.join(run_dir, "checkpoints")
    done = sorted(d for d in os.listdir(sub) if os.path.isfile(os.path.join(sub, d, "meta.pt"))) \
        if os.path.isdir(sub) else []
    return os.path.join(sub, done[-1]) if done else None
