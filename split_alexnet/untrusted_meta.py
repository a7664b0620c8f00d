"""meta.pt as untrusted input: every field's type and range, the spec it names, the settings it holds,
checked before any is used (untrusted.py reads it)."""
import math
import re
from dataclasses import fields
from functools import lru_cache

import torch

from . import layouts
from .checkpoint_files import SPEC_FIELDS, shard_names, single_files, spec_dict
from .errors import UsageError
from .spec import Spec

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
    this version does not have are not used (resume.resolve_resume). Ranges: check_resumed_config."""
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
