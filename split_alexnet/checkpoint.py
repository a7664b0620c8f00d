"""Checkpoints: one file per stream (or one for the single layout) plus meta.pt, written atomically.

  CKPT/meta.pt            layout, streams, spec, step, epoch, batch, lr, scheduler, GradScaler
                          (fp16: its state_dict()), torch RNG, files
  CKPT/stream0.pt ...     split / streams layouts: {"model": one stream's state_dict, "optimizer": the
                          optimizer's state_dict() for its parameters, keyed by parameter name,
                          "dropout": mask generator state} (before: "momentum": {name: SGD buffer},
                          which still loads)
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
import errno
import hashlib
import os
import re
import shutil

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
                if pid != os.getpid() and _alive(pid):
                    continue
                try:
                    os.remove(os.path.join(d, fname))
                    removed.append(os.path.join(d, fname))
                except FileNotFoundError:
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


def _per_key(opt_state):
    """{state key: {name: value}}, e.g. {"momentum_buffer": {"conv1.weight": tensor, ...}}."""
    keys = dict.fromkeys(k for st in opt_state["state"].values() for k in st)
    return {k: {n: st.get(k) for n, st in opt_state["state"].items()} for k in keys}


def _cuttable(values, spec):
    names = {f"{l.name}.{kind}" for l in spec.layers for kind in ("weight", "bias")}
    return set(values) == names and all(torch.is_tensor(v) and v.dim() > 0 for v in values.values())


def _join_optimizer(parts, spec):
    """Per-stream optimizer states -> the single layout's (every stream names its parameters as the whole
    net does): a tensor per parameter is joined along dim 0 as the weights are; anything else (a count)
    is the same on every stream: stream 0's."""
    joined = {}
    for k, values in _per_key(parts[0]).items():
        per_stream = [_per_key(p).get(k, {}) for p in parts]
        whole = join_state_dicts(per_stream, spec) if all(_cuttable(v, spec) for v in per_stream) else values
        for n, v in whole.items():
            joined.setdefault(n, {})[k] = v
    return {"state": joined, "param_groups": parts[0]["param_groups"]}


def _cut_optimizer(whole, spec):
    parts = [{"state": {}, "param_groups": whole["param_groups"]} for _ in range(spec.streams)]
    for k, values in _per_key(whole).items():
        cut = shard_state_dict(values, spec) if _cuttable(values, spec) else [values] * spec.streams
        for part, vs in zip(parts, cut):
            for n, v in vs.items():
                part["state"].setdefault(n, {})[k] = v
    return parts


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

EXPORT_FORMAT = "split_alexnet.state_dict/1"


def export_state_dict(src, dst):
    """A checkpoint (any layout) -> one file: the single layout's weights and the spec, nothing else
    (no optimizer, dropout or RNG state), loadable with torch.load(weights_only=True) alone. Returns
    what was written."""
    meta = read_meta(src)
    spec = Spec(**meta["spec"])
    shards = [_torch_load(os.path.join(src, n)) for n in shard_names(meta)]
    weights = shards[0]["model"] if meta["layout"] == "single" else join_state_dicts([s["model"] for s in shards], spec)
    out = {"format": EXPORT_FORMAT, "spec": spec_dict(spec), "state_dict": weights, "step": meta["step"]}
    atomic_save(out, dst)
    return out


def load_exported(path):
    """The AlexNet of a `convert.py --to state_dict` file (weights_only load; evaluation mode)."""
    from .model import AlexNet
    d = _torch_load(path)
    if not isinstance(d, dict) or d.get("format") != EXPORT_FORMAT:
        raise UsageError(f"{path} is not a split_alexnet state_dict export ({EXPORT_FORMAT}): write one with "
                         f"python launch/convert.py CKPT {path} --to state_dict")
    net = AlexNet(spec=Spec(**d["spec"]), init="torch")
    net.load_state_dict(d["state_dict"])
    return net.eval()


def join(src, dst):
    """Shards (split or streams layout) -> a single-layout checkpoint. Returns the meta written to dst."""
    meta = read_meta(src)
    if meta["layout"] == "single":
        raise UsageError(f"{src} already holds the single layout: nothing to join (use --to shards to cut it)")
    spec = Spec(**meta["spec"])
    shards = [_torch_load(os.path.join(src, n)) for n in shard_names(meta)]
    state = {"model": join_state_dicts([s["model"] for s in shards], spec),
             "optimizer": _join_optimizer([_optimizer_of(s) for s in shards], spec),
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
    opts = _cut_optimizer(_optimizer_of(state), spec)
    files = {f"stream{s}.pt": {"model": models[s], "optimizer": opts[s], "dropout": state["dropout"]}
             for s in range(spec.streams)}
    out = dict(meta, layout="split")
    save_files(dst, files)
    return save_meta(dst, out)
