"""Converting a checkpoint between layouts (join shards into the single layout's file, cut it into shards)
and exporting its weights alone; bit for bit, as model.shard_state_dict cuts them."""
import os

import torch

from .checkpoint_files import _optimizer_of, atomic_save, save_files, save_meta, shard_names, single_files, spec_dict
from .errors import UsageError
from .model import join_state_dicts, shard_state_dict
from .spec import Spec
from .untrusted import _open_in, _torch_load, load_files, read_meta, spec_of

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
