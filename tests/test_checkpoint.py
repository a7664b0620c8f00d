"""Checkpoints: atomic files, refusal of truncated / mismatched ones before anything is loaded, and
shard <-> single conversion that round-trips bit for bit and gives the same logits."""
import importlib.util
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from split_alexnet import checkpoint as ckpt
from split_alexnet.check import ATOL, RTOL
from split_alexnet.cli import UsageError
from split_alexnet.model import AlexNet, StreamsAlexNet
from split_alexnet.spec import Spec

ROOT = os.path.join(os.path.dirname(__file__), "..")
SPEC = Spec(streams=2, image_size=67, in_channels=3, num_classes=10)


def _load_launcher(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "launch", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _trained_single():
    """A single-layout AlexNet after two SGD steps (momentum buffers filled, dropout generator used)."""
    torch.manual_seed(0)
    model = AlexNet(spec=SPEC, dropout_seed=3, init="d2l")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        loss = F.cross_entropy(model(torch.randn(4, 3, 67, 67)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _save_single(path, model, opt, step=2):
    ckpt.save_files(path, {"single.pt": ckpt.stream_state(model, opt)})
    ckpt.save_meta(path, dict(layout="single", streams=2, spec=ckpt.spec_dict(SPEC), step=step, epoch=0,
                              batch=step, lr=0.01, scheduler=None, torch_rng=torch.get_rng_state(), config={}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, its single-layout checkpoint directory), built once for the module."""
    model, opt = _trained_single()
    path = str(tmp_path_factory.mktemp("ckpt") / "single")
    _save_single(path, model, opt)
    return model, path


def _copy(trained, tmp_path):
    dst = str(tmp_path / "c")
    shutil.copytree(trained[1], dst)
    return dst


@pytest.mark.slow
def test_cut_join_round_trip_bit_exact_and_same_logits(trained, tmp_path):
    model, single = trained
    shards, back = (str(tmp_path / n) for n in ("shards", "back"))
    convert = _load_launcher("convert")
    assert convert.main([single, shards, "--to", "shards"]) == 0
    assert convert.main([shards, back, "--to", "single"]) == 0
    a, b = ({"model": x["model"], "momentum": ckpt.momentum(x), "dropout": x["dropout"]}
            for x in (torch.load(os.path.join(d, "single.pt"), weights_only=False) for d in (single, back)))
    for part in ("model", "momentum"):
        assert a[part].keys() == b[part].keys() and len(a[part]) == 16
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["dropout"] == b["dropout"] and set(a["dropout"]) == {"seed", "draws"}   # counter-based masks' state
    # the shards, loaded into the streams layout, compute the single model's logits (and dropout masks)
    net = StreamsAlexNet(SPEC, dropout_seed=0)
    meta = ckpt.read_meta(shards)
    assert meta["layout"] == "split" and list(meta["files"]) == ["stream0.pt", "stream1.pt"]
    for s, stream in enumerate(net.streams):
        ckpt.load_stream_state(stream, None, torch.load(os.path.join(shards, f"stream{s}.pt"), weights_only=False))
    x = torch.randn(5, 3, 67, 67)
    for train in (False, True):
        model.train(train), net.train(train)
        ref, out = model(x), net(x)
        assert (out - ref).abs().max() <= RTOL * ref.abs().max() + ATOL


def test_refuses_existing_destination(trained):
    with pytest.raises(UsageError, match="already holds a checkpoint"):
        _load_launcher("convert").main([trained[1], trained[1], "--to", "shards"])


def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = str(tmp_path / "x.pt")
    with pytest.raises(Exception):  # noqa: B017 - whichever error pickling raises, no file may remain
        ckpt.atomic_save({"f": lambda: 0}, path)    # cannot be pickled: fails mid-save
    assert not os.path.exists(path)
    ckpt.atomic_save({"a": torch.ones(2)}, path)
    assert os.listdir(tmp_path) == ["x.pt"]


def test_truncated_or_incomplete_checkpoint_refused(trained, tmp_path):
    path = _copy(trained, tmp_path)
    f = os.path.join(path, "single.pt")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(UsageError, match="truncated"):
        ckpt.read_meta(path)
    os.remove(os.path.join(path, "meta.pt"))
    with pytest.raises(UsageError, match="no meta.pt"):
        ckpt.read_meta(path)


def test_mismatched_checkpoint_refused_before_loading(trained):
    path = trained[1]
    meta = ckpt.read_meta(path)
    with pytest.raises(UsageError, match="another net: image_size 67 \\(this run: 99\\)"):
        ckpt.check_matches(meta, Spec(image_size=99, num_classes=10), "single", path)
    with pytest.raises(UsageError, match="another net: streams 2 \\(this run: 4\\)"):
        ckpt.check_matches(meta, Spec(streams=4, image_size=67, num_classes=10), "single", path)
    with pytest.raises(UsageError, match="convert it first"):
        ckpt.check_matches(meta, SPEC, "split", path)
    # a file whose tensors do not fit is refused and nothing is loaded
    other = AlexNet(spec=Spec(image_size=99, num_classes=10))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    expected = {"single.pt": {k: v.shape for k, v in other.state_dict().items()}}
    with pytest.raises(UsageError, match="does not match"):
        ckpt.load_files(path, meta, ["single.pt"], expected)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
