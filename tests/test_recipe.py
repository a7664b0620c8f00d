"""The paper's recipe as it ran (issue 10): the input on the 0-255 scale minus the training set's mean
image (computed, cached, reused, refused when it does not fit), biases at 2x the lr and no weight decay in
every layout, ten-crop evaluation, the schedule on top-1 error with its cap, the one-GPU `--net half`, and
dropout mask states that move between layouts and devices (the masks themselves: tests/test_dropout.py)."""
import importlib.util
import os
import shutil
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from split_alexnet import checkpoint as ckpt
from split_alexnet import data as data_mod
from split_alexnet.augment import items_batch
from split_alexnet.cli import UsageError, run_main
from split_alexnet.config import parse_config
from split_alexnet.data import (
    PCA_MXNET_255,
    build_paper_transforms,
    cached_mean_image,
    mean_image,
    paper_side,
)
from split_alexnet.model import AlexNet, DropoutMasks, SplitAlexNet, StreamsAlexNet, split_from_single
from split_alexnet.optim import PlateauOnError
from split_alexnet.spec import Spec
from split_alexnet.train import build, build_optimizer, evaluate, run

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MNIST_DIR = os.path.join(ROOT, "tests", "fixtures", "mnist")


def _launcher(name):
    spec = importlib.util.spec_from_file_location(f"{name}_launcher", os.path.join(ROOT, "launch", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture
def mnist_dir(tmp_path):
    """A copy of the MNIST fixture: the mean image is cached beside the data, not in the repository."""
    d = tmp_path / "mnist"
    shutil.copytree(MNIST_DIR, d)
    return str(d)


def _mnist_argv(data_dir, *extra):
    return ["--recipe", "paper", "--dataset", "mnist", "--data-dir", data_dir, "--split-test", "500",
            "--image-size", "67", "--batch-size", "16", "--no-flip", "--quiet", "--layout", "single", *extra]


# ---- the input: 0-255 minus the mean image -----------------------------------------------------------

def test_paper_recipe_defaults():
    cfg = parse_config(["--recipe", "paper"])
    assert (cfg.preprocess, cfg.ten_crop, cfg.bias_lr_mult, cfg.bias_decay) == ("paper", True, 2.0, False)
    assert (cfg.schedule, cfg.lr_patience, cfg.lr_drops, cfg.lighting, cfg.init) == ("plateau", 5, 3, 0.1, "paper")
    he = parse_config(["--recipe", "paper-he"])   # the paper's recipe with one change
    assert {k: v for k, v in vars(he).items() if k not in ("init", "recipe")} == \
        {k: v for k, v in vars(cfg).items() if k not in ("init", "recipe")} and he.init == "kaiming"
    default = parse_config(["--dataset", "random"])  # the default: the paper's with Caffe's init
    paper = parse_config(["--dataset", "random", "--recipe", "paper"])
    assert (default.recipe, default.init) == ("paper-caffe", "caffe")
    assert {k: v for k, v in vars(default).items() if k not in ("init", "recipe")} == \
        {k: v for k, v in vars(paper).items() if k not in ("init", "recipe")}
    demo = parse_config([])                       # shapes, the CPU demo: He's init on standardised input
    assert (demo.recipe, demo.init, demo.preprocess, demo.ten_crop) == ("paper-he-std", "kaiming", "channel", False)
    assert {k: v for k, v in vars(demo).items() if k not in ("init", "recipe", "preprocess", "ten_crop")} == \
        {k: v for k, v in vars(cfg).items() if k not in ("init", "recipe", "preprocess", "ten_crop")}
    d2l = parse_config(["--recipe", "d2l"])
    assert (d2l.preprocess, d2l.ten_crop, d2l.bias_lr_mult, d2l.bias_decay) == ("channel", False, 1.0, True)
    assert paper_side(227) == 256 and paper_side(67) == 76


def test_input_scale_is_0_255_minus_mean(mnist_dir):
    """The paper recipe's tensors: raw pixels minus the mean image, no std division: mean ~0, std ~tens."""
    job = build(parse_config(_mnist_argv(mnist_dir)))
    x = items_batch(job.train_set, job.augment, [(0, i) for i in range(64)])   # uint8 items, device float work
    assert x.shape == (64, 1, 67, 67)
    assert abs(x.mean().item()) < 10 and 40 < x.std().item() < 150, (x.mean(), x.std())
    assert x.max().item() > 100                                   # 0-255 scale, not [0, 1]
    channel = build(parse_config(_mnist_argv(mnist_dir, "--preprocess", "channel", "--out",
                                              os.path.join(mnist_dir, "o2"))))
    xc = items_batch(channel.train_set, channel.augment, [(0, i) for i in range(64)])
    assert 0.5 < xc.std().item() < 2                              # the per-channel standardisation: ~1


def test_lighting_eigenvalues_on_the_pixel_scale():
    """The PCA shift is the same fraction of the range on 0-255 as on [0, 1]: eigenvalues x 255."""
    assert torch.allclose(PCA_MXNET_255, torch.tensor([55.46, 4.794, 1.148]), atol=2e-3)
    mean = torch.zeros(3, 76, 76)
    img = torch.full((3, 80, 80), 128, dtype=torch.uint8)
    tf = build_paper_transforms(67, 3, mean, train=True, crop=False, flip=False, lighting=0.1)
    shifts = []
    for seed in range(200):
        torch.manual_seed(seed)
        out = tf(img)
        shifts.append((out - 128)[:, 0, 0])
    shifts = torch.stack(shifts)
    assert torch.allclose(shifts, shifts[:, :, None, None].expand(-1, -1, 1, 1)[:, :, 0, 0])
    # the first principal component dominates: |shift| ~ 0.1 * 55.46 * 0.58 per channel
    assert 1.5 < shifts.std(0).mean().item() < 6, shifts.std(0)


def test_shorter_side_then_central_square():
    """Shorter side to 76 (67 px crops), the central 76x76: a 2:1 image keeps its aspect ratio."""
    img = torch.zeros(3, 40, 80, dtype=torch.uint8)
    img[:, :, :20] = 255                                          # a band at the left edge: cut off
    tf = build_paper_transforms(67, 3, torch.zeros(3, 76, 76), train=False, crop=True, flip=False,
                                lighting=0, ten_crop=False)
    out = tf(img)
    assert out.shape == (3, 67, 67) and out.max().item() == 0     # the centre of a 152x76 resize


# ---- the mean image: computed from the training set, cached, reused, refused ------------------------

def _mean_path(mnist_dir):
    """The cache of _mnist_argv's mean image: named by its side, --split-test part and key (the file
    list, the count and --bad-images: data_mod.mean_image_key)."""
    train, _, _ = data_mod.build_datasets("mnist", mnist_dir, seed=0, download=False, split_test=500)
    return data_mod.mean_image_path("mnist", mnist_dir, 76, 500, len(train), data_mod.mean_image_key(train, "stop"))


def test_mean_image_computed_cached_reused_refused(mnist_dir, monkeypatch):
    argv = _mnist_argv(mnist_dir)
    job = build(parse_config(argv))
    path = _mean_path(mnist_dir)
    cached = torch.load(path, weights_only=True)                  # a plain tensor
    assert isinstance(cached, torch.Tensor) and cached.shape == (1, 76, 76)
    train_raw, val_raw = job.train_set.dataset, job.val_set.dataset
    assert torch.allclose(cached, mean_image(train_raw, 76), atol=1e-4)   # the TRAINING set's mean
    assert (cached - mean_image(val_raw, 76)).abs().max() > 1             # not the validation set's
    # reused: the second start reads the file and computes nothing
    monkeypatch.setattr(data_mod, "mean_image", lambda *a: pytest.fail("recomputed a cached mean image"))
    build(parse_config(argv + ["--out", os.path.join(mnist_dir, "again")]))
    # another shape (another --image-size or data set under the same name): one line
    torch.save(torch.zeros(3, 76, 76), path)
    with pytest.raises(UsageError, match=r"has shape \(3, 76, 76\), this run needs \(1, 76, 76\).*delete it"):
        cached_mean_image(path, train_raw, 76, 1)
    # stale: the data changed after the mean was computed
    torch.save(cached, path)
    future = time.time() + 60
    os.utime(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz"), (future, future))
    with pytest.raises(UsageError, match="is older than .*t10k-images-idx3-ubyte.gz.*delete it") as e:
        cached_mean_image(path, train_raw, 76, 1)
    assert "\n" not in str(e.value)


def test_stale_mean_image_one_line_from_the_launcher(mnist_dir, capsys):
    path = _mean_path(mnist_dir)
    torch.save(torch.zeros(1, 80, 80), path)
    main = _launcher("train")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(_mnist_argv(mnist_dir, "--out", os.path.join(mnist_dir, "o"))))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: mean image") and err.count("\n") == 1, err


# ---- biases: 2x the lr, no weight decay, in every layout -------------------------------------------

def _check_groups(model, cfg, streams_held=1):
    opt = build_optimizer(model, cfg)
    weights, biases = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".weight") for p in weights["params"])
    assert all(names[id(p)].endswith(".bias") for p in biases["params"]) and len(biases["params"]) == 8 * streams_held
    assert len(weights["params"]) + len(biases["params"]) == len(names)
    return weights, biases


@pytest.mark.parametrize("recipe", ["paper", "paper-he"])
def test_bias_groups_single_streams_split(recipe):
    cfg = parse_config(["--recipe", recipe, "--lr", "0.01"])
    spec = Spec(streams=2, image_size=67, num_classes=10)
    single = AlexNet(spec=spec)
    for model, held in ((single, 1), (StreamsAlexNet(spec), 2), (split_from_single(single, 1), 1)):
        weights, biases = _check_groups(model, cfg, held)
        assert (weights["lr"], weights["weight_decay"]) == (0.01, 5e-4)
        assert (biases["lr"], biases["weight_decay"]) == (0.02, 0.0)
        assert weights["momentum"] == biases["momentum"] == 0.9
    half = AlexNet(spec=Spec(streams=1, image_size=67, num_classes=10, net="half"))
    assert _check_groups(half, cfg)[1]["lr"] == 0.02
    d2l = parse_config(["--recipe", "d2l"])                     # the seed's: one rule for all
    weights, biases = _check_groups(single, d2l)
    assert weights["lr"] == biases["lr"] and weights["weight_decay"] == biases["weight_decay"]


TINY = ["--dataset", "shapes", "--train-size", "32", "--val-size", "8", "--image-size", "67",
        "--batch-size", "8", "--quiet", "--layout", "single", "--no-ten-crop"]


def test_checkpoint_and_resume_keep_the_groups(tmp_path):
    """Both groups' lrs survive a checkpoint and an lr drop (biases stay at 2x after the drop)."""
    part, resumed = str(tmp_path / "part"), str(tmp_path / "resumed")
    argv = TINY + ["--recipe", "paper-he", "--lr", "0.001", "--eval-every", "1", "--lr-patience", "0"]
    run(build(parse_config(argv + ["--max-steps", "3", "--save-every", "3", "--out", part])))
    meta = torch.load(os.path.join(part, "checkpoints", "step0000003", "meta.pt"), weights_only=False)
    assert len(meta["lrs"]) == 2 and meta["lrs"][1] == pytest.approx(2 * meta["lrs"][0])
    job = build(parse_config(argv + ["--max-steps", "4", "--out", resumed, "--resume", part]))
    from split_alexnet.train import resume
    resume(job, part)
    assert [g["lr"] for g in job.optimizer.param_groups] == meta["lrs"]
    assert [g["weight_decay"] for g in job.optimizer.param_groups] == [5e-4, 0.0]
    assert job.scheduler.state_dict() == meta["scheduler"]


# ---- ten-crop evaluation ----------------------------------------------------------------------------

def test_ten_crop_transform_corners_centre_mirrors():
    img = torch.arange(3 * 76 * 76, dtype=torch.float32).reshape(3, 76, 76) % 251
    mean = torch.full((3, 76, 76), 7.0)
    tf = build_paper_transforms(67, 3, mean, train=False, crop=True, flip=True, lighting=0.1, ten_crop=True)
    crops = tf(img.to(torch.uint8))
    base = img.to(torch.uint8).float() - 7
    assert crops.shape == (10, 3, 67, 67)
    assert torch.equal(crops[0], base[:, :67, :67]) and torch.equal(crops[3], base[:, 9:, 9:])
    assert torch.equal(crops[4], base[:, 4:71, 4:71])            # the centre
    # and their mirrors, each patch's own (§4.1: "the five ... patches as well as their horizontal reflections")
    for i in range(5):
        assert torch.equal(crops[5 + i], crops[i].flip(-1))


class _PerCrop(nn.Module):
    """Logits that differ per crop, so averaging softmax and averaging logits give different losses."""

    def forward(self, x):
        return x.flatten(1)[:, :4] * torch.tensor([3.0, -1.0, 0.5, 2.0])


def test_ten_crop_evaluation_averages_softmax():
    torch.manual_seed(0)
    xs = [torch.randn(10, 1, 2, 2) for _ in range(3)]
    ys = [0, 3, 1]
    job = SimpleNamespace(model=_PerCrop(), cfg=SimpleNamespace(batch_size=2, workers=0, precision="fp32"),
                          val_set=list(zip(xs, ys)), spec=SimpleNamespace(num_classes=4),
                          device=torch.device("cpu"), replicas=1, replica_group=None, built=None)
    loss, top1, top5 = evaluate(job)
    prob = torch.stack([_PerCrop()(x).softmax(1).mean(0) for x in xs])   # (3, 4): per image
    want = F.nll_loss(prob.log(), torch.tensor(ys)).item()
    assert loss == pytest.approx(want, rel=1e-6)
    logit_avg = F.cross_entropy(torch.stack([_PerCrop()(x).mean(0) for x in xs]), torch.tensor(ys)).item()
    assert abs(loss - logit_avg) > 1e-3                           # it is the softmax that is averaged
    assert top1 == pytest.approx((prob.argmax(1) == torch.tensor(ys)).float().mean().item())
    assert top5 is None                                           # 4 classes


# ---- the schedule: lr / 10 when top-1 error stops improving, at most --lr-drops times ------------------

def test_plateau_on_top1_error_capped():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([dict(params=[p], lr=0.01), dict(params=[], lr=0.02)], lr=0.01)
    sched = PlateauOnError(opt, factor=0.1, patience=2, max_drops=2)
    errors = [0.9, 0.8, 0.8, 0.85, 0.81, 0.7, 0.75, 0.7, 0.72, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    drops = [i for i, e in enumerate(errors) if sched.step(e)]
    # evaluations 2, 3, 4 without a new best: the third drops; 6, 7, 8 likewise; then capped at 2
    assert drops == [4, 8] and sched.drops == 2
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 2e-4])   # both groups, ratio kept
    state = sched.state_dict()
    other = PlateauOnError(opt, 0.1, 2, 2)
    other.load_state_dict(state)
    # torch's count of bad evaluations starts again at each attempt past the cap: 3 + 3 since the best
    assert other.state_dict() == state == dict(best=0.6, bad=0, drops=2)
    assert [sched.step(0.6) for _ in range(6)] == [False] * 6 and sched.drops == 2   # the cap holds


def test_schedule_follows_top1_not_loss(tmp_path):
    """A run with the val loss falling but top-1 flat still drops the lr (the paper's rule)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = PlateauOnError(opt, 0.1, patience=0, max_drops=3)
    assert not sched.step(1 - 0.5)                                # first: a new best
    assert sched.step(1 - 0.5)                                    # equal top-1: no improvement, patience 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)


# ---- --net half: the paper's one-GPU comparison net (§3.2) ------------------------------------------

def test_half_net_spec():
    spec = Spec(streams=1, net="half")
    widths = [spec.width(l) for l in spec.layers]
    assert widths == [48, 128, 192, 192, 256, 4096, 4096, 1000]   # conv1-4 halved; conv5, fc kept
    assert spec.params_total == 59_798_312                        # about the two-GPU net's 60,965,224
    with pytest.raises(ValueError, match="one-GPU net"):
        Spec(streams=2, net="half")
    net = AlexNet(spec=Spec(streams=1, image_size=67, num_classes=10, net="half"))
    assert net(torch.randn(2, 3, 67, 67)).shape == (2, 10)
    assert net.conv5.weight.shape == (256, 192, 3, 3) and net.conv2.groups == 1


def test_half_net_in_every_launcher(capsys, tmp_path):
    assert _launcher("summary")(["--net", "half"]) == 0
    out = capsys.readouterr().out
    assert "one-GPU comparison net" in out and "total parameters: 59,798,312" in out
    assert "conv5  own    3x3 s1 p1   (1, 256, 6, 6)" in out
    cfg = parse_config(["--net", "half"])
    assert (cfg.net, cfg.streams, cfg.layout) == ("half", 1, "single")
    for argv, message in ((["--net", "half", "--layout", "split"], "no split"),
                          (["--net", "half", "--streams", "2"], "has one stream")):
        with pytest.raises(UsageError, match=message):
            parse_config(argv)
    main = _launcher("check")
    assert main(["--net", "half", "--image-size", "67", "--num-classes", "10", "--batch-size", "2",
                 "--steps", "1", "--modes", "eval"]) == 0
    main = _launcher("bench")
    assert main(["--net", "half", "--image-size", "67", "--layouts", "single", "--steps", "1", "--warmup", "0",
                 "--batch-size", "2", "--out", str(tmp_path / "bench")]) == 0


def test_half_net_trains_one_step(tmp_path):
    summary = run(build(parse_config(TINY + ["--net", "half", "--max-steps", "1", "--out", str(tmp_path / "h")])))
    assert summary["steps"] == 1
    job = build(parse_config(TINY + ["--net", "half", "--out", str(tmp_path / "h2")]))
    assert job.spec.net == "half" and job.model.conv1.weight.shape[0] == 48


# ---- dropout mask states between layouts and devices -------------------------------------------------

def _masks(dropout, n=3, dtype=torch.float32):
    """The next n (4, 4096) masks of a DropoutMasks (0 or 1 / keep), as the layers draw them."""
    return [dropout(torch.ones(4, 4096, dtype=dtype), 0.5, 4096, 0).float() for _ in range(n)]


@pytest.mark.slow
def test_single_checkpoint_converted_keeps_every_streams_masks(tmp_path):
    """A single-layout run's checkpoint, cut into shards and loaded by the split layout's ranks (and the
    streams layout): every stream draws the masks the uninterrupted single run draws next."""
    spec = Spec(streams=2, image_size=67, num_classes=10)
    torch.manual_seed(0)
    single = AlexNet(spec=spec, dropout_seed=5)
    opt = torch.optim.SGD(single.parameters(), lr=0.01, momentum=0.9)
    single.train()
    for _ in range(2):                                            # the counter has moved on
        F.cross_entropy(single(torch.randn(2, 3, 67, 67)), torch.tensor([0, 1])).backward()
        opt.step()
    assert single.dropout.state() == {"seed": 5, "draws": 4}      # fc6 and fc7, two steps
    src, dst = str(tmp_path / "single"), str(tmp_path / "shards")
    ckpt.save_files(src, {"single.pt": ckpt.stream_state(single, opt)})
    ckpt.save_meta(src, dict(layout="single", streams=2, spec=ckpt.spec_dict(spec), step=2, epoch=0, batch=2,
                             lr=0.01, scheduler=None, torch_rng=torch.get_rng_state(), config={}))
    ckpt.cut(src, dst)
    expected = _masks(single.dropout)                             # the uninterrupted run's next masks
    for rank in range(2):                                         # each split rank loads its own shard
        net = SplitAlexNet(spec, rank)                            # seed 0 here: the checkpoint's 5 wins
        state = torch.load(os.path.join(dst, f"stream{rank}.pt"), weights_only=False)
        ckpt.load_stream_state(net.stream, None, state)
        assert all(torch.equal(a, b) for a, b in zip(_masks(net.stream.dropout), expected))
    streams = StreamsAlexNet(spec)
    for s, stream in enumerate(streams.streams):
        ckpt.load_stream_state(stream, None, torch.load(os.path.join(dst, f"stream{s}.pt"), weights_only=False))
        assert all(torch.equal(a, b) for a, b in zip(_masks(stream.dropout), expected))


def test_mask_state_continues_in_any_dtype_and_device():
    """The state is (seed, draws): no device in it. A state saved from one module continues in another
    of another dtype with the same masks (on CUDA too: tests/test_dropout.py::test_cuda_masks_equal_cpu)."""
    ref = DropoutMasks(3)
    _masks(ref, 2)
    saved = ref.state()
    assert saved == {"seed": 3, "draws": 2}
    expected = _masks(ref, 3)
    moved = DropoutMasks(0).to(torch.float64)
    moved.load_state(saved, device="meta")                        # the device is not needed
    assert all(torch.equal(a, b) for a, b in zip(_masks(moved, 3, torch.float64), expected))


@pytest.mark.parametrize("legacy", [("cuda:0", torch.zeros(16, dtype=torch.uint8)),
                                    ("cpu", torch.zeros(5056, dtype=torch.uint8)),
                                    {"device": "cpu", "state": torch.zeros(5056, dtype=torch.uint8)}])
def test_generator_dropout_state_of_an_old_checkpoint_is_one_line(legacy):
    with pytest.raises(UsageError, match="come from a torch.Generator .* written before the masks became "
                                         "counter-based") as e:
        DropoutMasks(0).load_state(legacy)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [{"seed": 0, "draws": -1}, {"seed": "0", "draws": 1}, {"seed": 0}, 7])
def test_damaged_dropout_state_is_one_line(bad):
    with pytest.raises(UsageError, match="damaged checkpoint") as e:
        DropoutMasks(0).load_state(bad)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_resume_of_an_old_generator_checkpoint_is_one_line(tmp_path, capsys):
    part = str(tmp_path / "part")
    run(build(parse_config(TINY + ["--max-steps", "1", "--save-every", "1", "--out", part])))
    path = os.path.join(part, "checkpoints", "step0000001")
    state = torch.load(os.path.join(path, "single.pt"), weights_only=False)
    state["dropout"] = ("cuda:0", torch.zeros(16, dtype=torch.uint8))   # as an earlier version wrote it
    ckpt.save_files(path, {"single.pt": state})
    meta = torch.load(os.path.join(path, "meta.pt"), weights_only=False)
    ckpt.save_meta(path, {k: v for k, v in meta.items() if k not in ("files", "format")})
    main = _launcher("train")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(TINY + ["--max-steps", "2", "--out", str(tmp_path / "r"), "--resume", part]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "torch.Generator" in err, err
