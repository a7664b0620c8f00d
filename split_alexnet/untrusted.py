"""Reading a checkpoint as untrusted input: every name, file, field and tensor checked before use (see
checkpoint.py for the format; docs/troubleshooting.md, "Checkpoints")."""
import hashlib
import os
import stat
import zipfile

import torch

from .checkpoint_files import FORMAT, shard_names
from .cli import log
from .errors import UsageError
from .model import check_dropout_state
from .untrusted_meta import (
    MAX_META_BYTES,
    OLD_SHARD_KEYS,
    SHARD_KEYS,
    _is_int,
    _show,
    check_meta,
    expected_tensors,
    max_file_bytes,
    spec_of,
)

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
