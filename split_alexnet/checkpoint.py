"""Checkpoints: one file per stream (or one for the single layout) plus meta.pt, written atomically.

  CKPT/meta.pt            layout, streams, spec, step, epoch, batch, lr, scheduler, GradScaler
                          (fp16: its state_dict()), torch RNG, files
  CKPT/stream0.pt ...     split / streams layouts: {"model": one stream's state_dict, "optimizer": the
                          optimizer's state_dict() for its parameters, keyed by parameter name,
                          "dropout": the masks' {seed, draws}} (before: "momentum": {name: SGD buffer},
                          which still loads)
  CKPT/single.pt          single layout: the same for the whole net

Every file is written to a temporary name, fsynced, and renamed (os.replace), and the directory is
fsynced; meta.pt, which lists the other files with their sizes and sha256 checksums, is written last, so a directory without it (or with a shorter file than it
lists, or one whose checksum differs) is an interrupted save or a damaged file and is refused; the
temporary files of an interrupted save are removed at the next save. Every file is loaded with
torch.load(weights_only=True): a checkpoint holds data (tensors, dicts, lists, str, int, float), never
code, and one that holds anything else is refused before it can run. Nothing is loaded into a model until every file has been
read and checked against it. Reading treats a checkpoint as untrusted input: names, files, fields and
tensors are checked before use (the reading section below; docs/troubleshooting.md, "Checkpoints").
Weights and momentum buffers are cut along dim 0 exactly as model.shard_state_dict cuts them, so
`cut`/`join` convert between layouts bit for bit.
"""
import errno
import hashlib
import math
import os
import re
import shutil
import stat
import zipfile
from dataclasses import fields
from functools import lru_cache

import torch

from . import layouts
from .cli import UsageError, log
from .model import check_dropout_state, join_state_dicts, shard_state_dict
from .outlock import pid_alive
from .spec import Spec

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


# ---- reading: a checkpoint is untrusted input -----------------------------------------------------
#
# A checkpoint may come from anywhere, so everything meta.pt says is checked before it is used: its
# file names are the layout's own (shard_names), never paths; each file is a regular file in the
# checkpoint's folder (not a link, FIFO, device or folder: checked with lstat before it is opened,
# and again on the open descriptor), of a size this net's tensors bound; meta.pt itself is at most
# MAX_META_BYTES; every field has its type and range checked; every tensor of a shard has the name,
# shape and dtype the net's parameters have, and nothing else is in it. Each refusal is one line
# (UsageError) naming the file or the field.

MAX_META_BYTES = 16 << 20     # meta.pt: some numbers, the torch RNG state (5 KiB), the config, the schedule's state
_SLACK_BYTES = 1 << 20        # a shard beyond its tensors' bytes: the pickle, the dropout state, zip headers
_PER_TENSOR_BYTES = 4096      # each tensor's zip record: its header and 64-byte alignment
SHARD_KEYS = ("model", "optimizer", "dropout")  # what stream_state writes
OLD_SHARD_KEYS = ("model", "momentum", "dropout")  # before the optimizer's state_dict(): SGD's buffers alone
SPEC_DEFAULTS = {"net": "paper"}                 # spec fields older checkpoints lack, and their values
_MAX_PARAMS = 1 << 36         # a spec describing more parameters than this is not a net anyone saved
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _bad_field(ckpt_dir, field, problem):
    return UsageError(f"checkpoint {ckpt_dir}: meta.pt field {field} {problem}: the checkpoint is damaged, "
                      f"edited or not a split_alexnet one; use another checkpoint")


def _show(value):
    """A value for a one-line message: its repr, shortened, and its type."""
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({type(value).__name__})"


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def spec_of(meta):
    """The Spec a (checked) meta.pt describes."""
    return Spec(**{**SPEC_DEFAULTS, **meta["spec"]})


@lru_cache(maxsize=8)
def expected_tensors(spec, layout):
    """{file name: {tensor name: shape}}: what each file of a checkpoint of this spec and layout holds
    under "model", from the net itself (built on the meta device: no memory, no random numbers)."""
    from .model import AlexNet, Stream
    single = single_files(layout)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        nets = {"single.pt": AlexNet(spec=spec)} if single else \
            {f"stream{s}.pt": Stream(spec, s) for s in range(spec.streams)}
    return {name: {k: tuple(v.shape) for k, v in net.state_dict().items()} for name, net in nets.items()}


def max_file_bytes(spec, layout):
    """{file name: the most bytes it can hold}: its tensors twice (weights and momentum) at 8 bytes an
    element (float64, the widest dtype a model is saved in), and the slack of the file format."""
    out = {}
    for name, shapes in expected_tensors(spec, layout).items():
        numel = sum(math.prod(s) for s in shapes.values())
        out[name] = _SLACK_BYTES + 2 * (8 * numel + _PER_TENSOR_BYTES * len(shapes))
    return out


_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _check_stat(st, path, limit):
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise UsageError(f"checkpoint file {path} is {kind}, not a regular file: refused unread (a checkpoint "
                             f"is regular files in one folder; copy the real file in, or use another checkpoint)")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"checkpoint file {path} is not a regular file: refused unread; use another checkpoint")
    if st.st_size > limit:
        raise UsageError(f"checkpoint file {path} is {st.st_size} bytes, more than the {limit} bytes such a file "
                         f"can hold (for this net): refused unread; it is not a checkpoint's file, use another one")


def _open_in(ckpt_dir, name, limit):
    """A binary file object for CKPT_DIR/NAME (NAME: one of the layout's own file names, or meta.pt):
    a regular file in the folder of at most `limit` bytes (lstat before the open, fstat on the open
    descriptor: the file read is the file checked). None if there is no such file."""
    path = os.path.join(ckpt_dir, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"checkpoint file {path} cannot be read ({e.strerror}); use another checkpoint") from None
    _check_stat(st, path, limit)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise UsageError(f"checkpoint file {path} cannot be opened ({e.strerror}); use another checkpoint") from None
    f = os.fdopen(fd, "rb")
    try:
        now = os.fstat(fd)
        _check_stat(now, path, limit)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise UsageError(f"checkpoint file {path} was replaced while it was opened: use a checkpoint "
                             f"nothing is writing to")
    except BaseException:
        f.close()
        raise
    return f


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


def _torch_load(f, path, limit):
    """Load the torch file open as `f` (data only: weights_only). A torch file is a zip of stored
    records: one that is not, or whose records hold more than `limit` bytes, is refused unloaded."""
    try:
        records = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise UsageError(f"checkpoint file {path} cannot be read (not a torch file): it is damaged or "
                         f"truncated; resume from another checkpoint") from None
    if any(r.compress_type != zipfile.ZIP_STORED for r in records) or sum(r.file_size for r in records) > limit:
        raise UsageError(f"checkpoint file {path} holds compressed records, or more than its {limit} bytes: "
                         f"torch.save writes neither; refused unloaded, use another checkpoint")
    f.seek(0)
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except __import__("pickle").UnpicklingError as e:   # weights_only refused a global: code, not data
        what = str(e).split("Unsupported global: GLOBAL ", 1)[-1].split()[0] if "Unsupported global" in str(e) \
            else "a non-data object"
        raise UsageError(f"checkpoint file {path} holds code, not only data ({what}): refused unrun; "
                         f"it is not a split_alexnet checkpoint or was tampered with: use another") from None
    except Exception as e:  # truncated or not a torch file
        raise UsageError(f"checkpoint file {path} cannot be read ({type(e).__name__}): it is damaged or "
                         f"truncated; resume from another checkpoint") from None


def _hash(f, size):
    h, left = hashlib.sha256(), size
    while left > 0:
        block = f.read(min(left, 1 << 22))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest()


def read_meta(ckpt_dir):
    """meta.pt of CKPT_DIR, every field checked (check_meta), and every file it lists verified: a
    regular file in the folder, of the size and sha256 checksum meta.pt gives."""
    meta_path = os.path.join(ckpt_dir, "meta.pt")
    f = _open_in(ckpt_dir, "meta.pt", MAX_META_BYTES)
    if f is None:
        raise UsageError(f"{ckpt_dir} has no meta.pt: not a checkpoint, or its save was interrupted; "
                         f"resume from another checkpoint")
    with f:
        meta = _torch_load(f, meta_path, MAX_META_BYTES)
    if not isinstance(meta, dict) or not _is_int(meta.get("format")) or meta["format"] != FORMAT:
        raise UsageError(f"{meta_path} is not a split_alexnet checkpoint of format {FORMAT}")
    check_meta(meta, ckpt_dir)
    limits = max_file_bytes(spec_of(meta), meta["layout"])
    for name in shard_names(meta):
        path, size = os.path.join(ckpt_dir, name), meta["files"][name]
        f = _open_in(ckpt_dir, name, limits[name])
        have = None if f is None else os.fstat(f.fileno()).st_size
        if have != size:
            if f is not None:
                f.close()
            raise UsageError(f"checkpoint file {path} is {'missing' if have is None else f'{have} bytes'}, "
                             f"meta.pt says {size} bytes: the checkpoint is truncated; resume from another one")
        with f:
            if "sha256" in meta and _hash(f, size) != meta["sha256"][name]:   # written before checksums: none
                raise UsageError(f"checkpoint file {path} fails its sha256 checksum: it is damaged; resume from "
                                 f"another checkpoint (a run directory takes the newest that verifies)")
    return meta


def check_meta(meta, ckpt_dir):
    """Every field of meta.pt, for type and range, before any is used (and before any file it names is
    looked at). Optional, with the value older checkpoints imply: lrs (every group at lr), sha256
    (none: written before checksums), config (none), spec's net (the paper's), train_images and
    data_fingerprint (none: the data is not compared). Other fields are never used."""
    def bad(field, problem):
        raise _bad_field(ckpt_dir, field, problem)

    def need(field):
        if field not in meta:
            bad(field, "is missing")
        return meta[field]

    layout = need("layout")
    trained = layouts.names(trains=True)
    if layout not in trained:
        bad("layout", f"is {_show(layout)}, not {', '.join(trained[:-1])} or {trained[-1]}")
    spec = need("spec")
    if not isinstance(spec, dict):
        bad("spec", f"is {_show(spec)}, not a dict of {', '.join(SPEC_FIELDS)}")
    types = {f.name: f.type for f in fields(Spec)}
    for k in spec:
        if k not in SPEC_FIELDS:
            bad("spec", f"has the key {_show(k)}, not one of {', '.join(SPEC_FIELDS)}")
    for k in SPEC_FIELDS:
        v = spec.get(k, SPEC_DEFAULTS.get(k))
        if v is None:
            bad(f"spec.{k}", "is missing")
        if not (_is_int(v) if types[k] is int else isinstance(v, types[k])):
            bad(f"spec.{k}", f"is {_show(v)}, not {types[k].__name__}")
    try:
        net = spec_of(meta)
    except ValueError as e:
        bad("spec", f"is not a net: {e}")
    if net.params_total > _MAX_PARAMS:
        bad("spec", f"describes a net of {net.params_total} parameters, more than any checkpoint holds")
    streams = need("streams")
    if not _is_int(streams) or streams != net.streams:
        bad("streams", f"is {_show(streams)}, not the spec's {net.streams} streams")
    for field in ("step", "epoch", "batch"):
        v = need(field)
        if not _is_int(v) or v < 0:
            bad(field, f"is {_show(v)}, not an integer >= 0")
    lr = need("lr")
    if not _is_number(lr) or not (math.isfinite(lr) and lr > 0):
        bad("lr", f"is {_show(lr)}, not a positive number")
    lrs = meta.get("lrs")
    if lrs is not None and (not isinstance(lrs, (list, tuple)) or not 1 <= len(lrs) <= 64
                            or not all(_is_number(x) and math.isfinite(x) and x > 0 for x in lrs)):
        bad("lrs", f"is {_show(lrs)}, not a list of positive numbers (one per parameter group)")
    _check_scheduler(need("scheduler"), bad)
    _check_scaler(meta.get("scaler"), bad)
    rng = need("torch_rng")
    want = torch.get_rng_state()
    if not (isinstance(rng, torch.Tensor) and rng.dtype == want.dtype and rng.shape == want.shape):
        bad("torch_rng", f"is {_show(rng)}, not the torch RNG state (a {want.dtype} tensor of {want.numel()})")
    names, limits = shard_names(meta), max_file_bytes(net, layout)
    files = need("files")
    if not isinstance(files, dict) or set(files) != set(names):
        bad("files", f"names {_show(list(files) if isinstance(files, dict) else files)}: a {layout} checkpoint's "
                     f"files are {', '.join(names)} (file names in its folder, never paths)")
    for name in names:
        if not _is_int(files[name]) or not 0 <= files[name] <= limits[name]:
            bad("files", f"gives {name} {_show(files[name])} bytes, not a size from 0 to the {limits[name]} "
                         f"bytes this net's file can hold")
    if "sha256" in meta:
        digests = meta["sha256"]
        if not isinstance(digests, dict) or set(digests) != set(names):
            bad("sha256", f"names {_show(list(digests) if isinstance(digests, dict) else digests)}: a {layout} "
                          f"checkpoint's files are {', '.join(names)} (file names in its folder, never paths)")
        for name in names:
            if not (isinstance(digests[name], str) and _HEX64.match(digests[name])):
                bad("sha256", f"gives {name} {_show(digests[name])}, not a sha256 digest (64 hex digits)")
    images = meta.get("train_images")              # the data's size and digest (train.check_data), newer
    if images is not None and (not _is_int(images) or images < 0):   # checkpoints only: None, unchecked
        bad("train_images", f"is {_show(images)}, not an integer >= 0")
    digest = meta.get("data_fingerprint")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{1,64}", digest)):
        bad("data_fingerprint", f"is {_show(digest)}, not a hex digest")
    check_saved_config(meta.get("config", {}), bad)


def _check_scheduler(state, bad):
    """None (no schedule) or the schedule's state_dict: a flat dict of numbers, strings, None and lists
    of numbers; the plateau schedule's (best, bad, drops) with their types and ranges."""
    if state is None:
        return
    if not isinstance(state, dict) or len(state) > 64:
        bad("scheduler", f"is {_show(state)}, not None or a schedule's state (a dict)")
    for k, v in state.items():
        plain = v is None or isinstance(v, (bool, int, float, str))
        numbers = isinstance(v, (list, tuple)) and len(v) <= 1024 and all(v_ is None or _is_number(v_) for v_ in v)
        if not isinstance(k, str) or not (plain or numbers):
            bad("scheduler", f"holds {_show(k)}: {_show(v)}, not a number, string or list of numbers")
    if {"best", "bad", "drops"} <= set(state):         # PlateauOnError's
        if not _is_number(state["best"]) or math.isnan(state["best"]):
            bad("scheduler.best", f"is {_show(state['best'])}, not a number")
        for k in ("bad", "drops"):
            if not _is_int(state[k]) or state[k] < 0:
                bad(f"scheduler.{k}", f"is {_show(state[k])}, not an integer >= 0")


def _check_scaler(state, bad):
    """None (no fp16) or GradScaler.state_dict(): a few named numbers, the scale finite and positive."""
    if state is None:
        return
    if not isinstance(state, dict) or len(state) > 16 or not all(isinstance(k, str) and _is_number(v)
                                                                 for k, v in state.items()):
        bad("scaler", f"is {_show(state)}, not None or a GradScaler's state (named numbers)")
    scale = state.get("scale")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        bad("scaler.scale", f"is {_show(scale)}, not a finite number > 0")


def check_saved_config(saved, bad):
    """The checkpoint's config (the run's settings, which a resume takes): a dict whose every setting
    this version has holds a value of its type, one of its flag's choices where it has some. Settings
    this version does not have are not used (guard.resolve_resume). Ranges: check_resumed_config."""
    from .config import Config, build_parser
    if not isinstance(saved, dict):
        bad("config", f"is {_show(saved)}, not a dict of the run's settings")
    types = {f.name: f.type for f in fields(Config)}
    choices = {a.dest: [*a.choices, a.default] for a in build_parser(add_help=False)._actions if a.choices}
    for k, v in saved.items():
        if not isinstance(k, str):
            bad("config", f"has the key {_show(k)}, not a setting's name")
        t = types.get(k)
        if t is None:
            continue
        ok = {bool: isinstance(v, bool), int: _is_int(v), float: _is_number(v),
              str: v is None or isinstance(v, str)}.get(t, True)
        if not ok:
            bad(f"config.{k}", f"is {_show(v)}, not {t.__name__}")
        if k in choices and v is not None and v not in choices[k]:
            bad(f"config.{k}", f"is {_show(v)}, not one of {', '.join(map(repr, choices[k]))}")


def check_resumed_config(cfg, ckpt_dir):
    """The flags' own checks (config.validate) on a resume's settings, which come from the checkpoint
    where no flag was given: a value no flag would accept is refused, naming the field."""
    from .config import validate
    try:
        validate(cfg)
    except UsageError as e:
        raise UsageError(f"checkpoint {ckpt_dir}: meta.pt field config: {e} (the checkpoint's run setting; "
                         f"give the flag to override it, or use another checkpoint)") from None


def check_matches(meta, spec, layout, ckpt_dir):
    """Refuse a checkpoint of another net or of the other kind of layout, before anything is loaded."""
    want, have = spec_dict(spec), {**SPEC_DEFAULTS, **meta["spec"]}   # older checkpoints: the paper's net
    if have != want:
        diff = ", ".join(f"{k} {have.get(k)} (this run: {want[k]})" for k in want if have.get(k) != want[k])
        raise UsageError(f"checkpoint {ckpt_dir} is of another net: {diff}; train with the same "
                         f"--image-size / data set / process count, or start afresh")
    if single_files(meta["layout"]) != single_files(layout):
        to = "single" if single_files(layout) else "shards"
        raise UsageError(f"checkpoint {ckpt_dir} holds the {meta['layout']} layout and this run is {layout}: "
                         f"convert it first (python launch/convert.py {ckpt_dir} OUT --to {to})")


def load_files(ckpt_dir, meta, names, expected=None, dtype=None):
    """Read files `names` of a checkpoint whose meta.pt read_meta checked, and check each against
    expected[name] ({tensor name: shape}; default: the net meta.pt describes) before use: the tensors
    of "model" are exactly those, with those shapes; the optimizer's per-parameter tensors (or an older file's "momentum") hold none or all of them, alike;
    every tensor has `dtype` (default: one floating dtype for every tensor of every file); the dropout
    state is the masks' {seed, draws}. Returns {name: state}."""
    expected = expected or expected_tensors(spec_of(meta), meta["layout"])
    limits = max_file_bytes(spec_of(meta), meta["layout"])
    states = {}
    for name in names:
        path = os.path.join(ckpt_dir, name)
        if name not in limits or name not in expected:
            raise UsageError(f"checkpoint {ckpt_dir} has no file {name} (a {meta['layout']} checkpoint has "
                             f"{', '.join(limits)}): convert it to this run's layout")
        f = _open_in(ckpt_dir, name, limits[name])
        if f is None:
            raise UsageError(f"checkpoint file {path} is missing: resume from another checkpoint")
        with f:
            state = _torch_load(f, path, limits[name])
        dtype = _check_shard(state, expected[name], dtype, path)
        states[name] = state
    return states


def _check_shard(state, want, dtype, path):
    """One file's content against {tensor name: shape}; returns the dtype its tensors have."""
    def bad(problem):
        raise UsageError(f"checkpoint file {path} does not match this model's parameters: {problem}; it is "
                         f"damaged, edited or from another version; start afresh or use another checkpoint")

    if not isinstance(state, dict) or set(state) not in (set(SHARD_KEYS), set(OLD_SHARD_KEYS)):
        bad(f"it holds {_show(sorted(map(str, state)) if isinstance(state, dict) else state)}, not "
            f"{', '.join(SHARD_KEYS)}")
    parts = {"model": state["model"]}
    if "optimizer" in state:
        parts.update(_optimizer_tensors(state["optimizer"], bad))
    else:
        parts["momentum"] = state["momentum"]
    for part, tensors in parts.items():
        if not isinstance(tensors, dict):
            bad(f"its {part} is {_show(tensors)}, not a dict of tensors")
        extra = [k for k in tensors if k not in want]
        if extra:
            bad(f"it has a tensor {part}[{extra[0]!r:.60}] this net does not have")
        if tensors and len(tensors) != len(want):
            missing = [k for k in want if k not in tensors]
            bad(f"its {part} lacks {missing[0]}" + (f" ({part} is saved for none or every parameter)"
                                                    if part != "model" else ""))
        for k, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                bad(f"{part}[{k!r}] is {_show(t)}, not a dense tensor")
            if tuple(t.shape) != tuple(want[k]):
                bad(f"{part}[{k!r}] has the shape {tuple(t.shape)}, this net's {tuple(want[k])}")
            dtype = t.dtype if dtype is None else dtype
            if t.dtype != dtype or not t.dtype.is_floating_point:
                bad(f"{part}[{k!r}] is {t.dtype}, not {dtype}" + ("" if dtype.is_floating_point
                                                                   else " (a floating dtype)"))
    _check_dropout(state["dropout"], path)
    return dtype


def _optimizer_tensors(opt, bad):
    """An optimizer state by parameter name (optimizer_state) -> {"optimizer[KEY]": {name: tensor}} for
    every per-parameter tensor KEY (SGD's and PaperSGD's momentum_buffer), checked like the weights; its
    other values and the groups' settings must be plain numbers, strings or None."""
    if not isinstance(opt, dict) or set(opt) != {"state", "param_groups"} or not isinstance(opt["state"], dict) \
            or not isinstance(opt["param_groups"], list) or len(opt["param_groups"]) > 16:
        bad(f"its optimizer is {_show(opt)}, not an optimizer's state (state, param_groups)")
    for group in opt["param_groups"]:
        if not isinstance(group, dict) or len(group) > 64 or not all(
                isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in group.items()):
            bad(f"its optimizer's param_groups hold {_show(group)}, not a group's settings (numbers, strings)")
    out = {}
    for name, st in opt["state"].items():
        if not isinstance(st, dict) or len(st) > 16:
            bad(f"its optimizer's state of {_show(name)} is {_show(st)}, not a dict")
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                out.setdefault(f"optimizer[{k}]", {})[name] = v
            elif not (torch.is_tensor(v) and v.numel() == 1 or isinstance(v, (bool, int, float)) or v is None):
                bad(f"its optimizer's state {name!r:.60}[{k!r:.30}] is {_show(v)}, not a tensor or a number")
    return out


def _check_dropout(state, path):
    """None (no mask drawn yet) or DropoutMasks.state()'s {"seed", "draws"}: model.check_dropout_state's
    rule, which also names an earlier version's generator state."""
    check_dropout_state(state, where=f"checkpoint file {path}")


# ---- conversion between layouts ----------------------------------------------------------------

EXPORT_FORMAT = "split_alexnet.state_dict/1"
MAX_EXPORT_BYTES = 1 << 30   # the largest net's float32 weights (about 250 MB) with room to spare


def export_state_dict(src, dst):
    """A checkpoint (any layout) -> one file: the single layout's weights and the spec, nothing else
    (no optimizer, dropout or RNG state), loadable with torch.load(weights_only=True) alone. Returns
    what was written."""
    meta = read_meta(src)
    spec = spec_of(meta)
    states = load_files(src, meta, shard_names(meta))   # every tensor checked against the spec
    shards = [states[n] for n in shard_names(meta)]
    weights = shards[0]["model"] if single_files(meta["layout"]) else join_state_dicts([s["model"] for s in shards], spec)
    out = {"format": EXPORT_FORMAT, "spec": spec_dict(spec), "state_dict": weights, "step": meta["step"]}
    atomic_save(out, dst)
    return out


def load_exported(path):
    """The AlexNet of a `convert.py --to state_dict` file (weights_only load; evaluation mode)."""
    from .model import AlexNet
    fix = f"write one with python launch/convert.py CKPT {path} --to state_dict"
    f = _open_in(os.path.dirname(path) or ".", os.path.basename(path), MAX_EXPORT_BYTES)
    if f is None:
        raise UsageError(f"{path}: no such file: {fix}")
    with f:
        d = _torch_load(f, path, MAX_EXPORT_BYTES)
    if not isinstance(d, dict) or d.get("format") != EXPORT_FORMAT or not isinstance(d.get("spec"), dict):
        raise UsageError(f"{path} is not a split_alexnet state_dict export ({EXPORT_FORMAT}): {fix}")
    try:
        net = AlexNet(spec=Spec(**d["spec"]), init="torch")
        net.load_state_dict(d["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{path}: its spec or weights do not make a net ({str(e).splitlines()[0][:120]}): {fix}") from None
    return net.eval()


def join(src, dst):
    """Shards (split or streams layout) -> a single-layout checkpoint. Returns the meta written to dst."""
    meta = read_meta(src)
    if single_files(meta["layout"]):
        raise UsageError(f"{src} already holds the single layout's file ({meta['layout']} layout): nothing to "
                         f"join (use --to shards to cut it)")
    spec = spec_of(meta)
    states = load_files(src, meta, shard_names(meta))   # every tensor checked against the spec
    shards = [states[n] for n in shard_names(meta)]
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
    if not single_files(meta["layout"]):
        raise UsageError(f"{src} already holds shards ({meta['layout']} layout): nothing to cut "
                         f"(use --to single to join them)")
    spec = spec_of(meta)
    state = load_files(src, meta, ["single.pt"])["single.pt"]   # every tensor checked against the spec
    models = shard_state_dict(state["model"], spec)
    opts = _cut_optimizer(_optimizer_of(state), spec)
    files = {f"stream{s}.pt": {"model": models[s], "optimizer": opts[s], "dropout": state["dropout"]}
             for s in range(spec.streams)}
    out = dict(meta, layout="split")
    save_files(dst, files)
    return save_meta(dst, out)
