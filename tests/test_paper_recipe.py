"""The paper's recipe as it ran: its update rule (PaperSGD), cuda-convnet2's dexp schedules, mean
subtraction and PCA lighting beside Caffe's and MXNet's, the 224 px net, ten-crop's mirrored centre, and
the 2014 hybrid's schedule."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import run_python, run_torchrun, spawn
from torchvision.transforms import v2

import split_alexnet
from split_alexnet import checkpoint as ckpt
from split_alexnet.check import run_check
from split_alexnet.cli import UsageError
from split_alexnet.config import RECIPES, parse_config
from split_alexnet.data import (
    PCA_C2_EIGVEC,
    PCA_C2_STDEV,
    PCA_EIGVEC,
    PCA_MXNET_255,
    Lighting,
    build_paper_transforms,
    paper_side,
)
from split_alexnet.model import AlexNet, StreamsAlexNet
from split_alexnet.optim import DexpSchedule, PaperSGD, check_resume_update, dexp_rates, dexp_value
from split_alexnet.spec import Spec
from split_alexnet.train import build, run

# ---- PaperSGD: the paper's equation (§5) -----------------------------------------------------------

def _problem(seed=0):
    """Two float64 parameters in two groups (their own lr and weight decay) and a loss with curvature."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    x, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    return w, b, lambda w, b: ((torch.tanh(x @ w.T + b) - y) ** 2).mean()


def _lrs(step):                                  # an lr drop at step 6 (and per-group multipliers below)
    return 0.1 if step < 6 else 0.01


def test_paper_sgd_is_the_papers_equation_across_an_lr_drop():
    """v <- 0.9 v - 0.0005 eps w - eps dL/dw; w <- w + v, by hand in float64, against PaperSGD."""
    w0, b0, loss_fn = _problem()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = split_alexnet.PaperSGD([dict(params=[w]), dict(params=[b], lr=0.2, weight_decay=0.0)],
                                 lr=0.1, momentum=0.9, weight_decay=5e-4)
    hw, hb = w0.clone(), b0.clone()                          # the hand-written loop
    vw, vb = torch.zeros_like(hw), torch.zeros_like(hb)
    for step in range(15):
        eps = _lrs(step)
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = eps, 2 * eps
        opt.zero_grad()
        loss_fn(w, b).backward()
        opt.step()
        hw_, hb_ = hw.clone().requires_grad_(), hb.clone().requires_grad_()
        gw, gb = torch.autograd.grad(loss_fn(hw_, hb_), (hw_, hb_))
        vw = 0.9 * vw - 0.0005 * eps * hw - eps * gw
        vb = 0.9 * vb - 0.0 * (2 * eps) * hb - (2 * eps) * gb
        hw, hb = hw + vw, hb + vb
        # float64, the same operations in another order: a few ulps of the weights' scale
        assert torch.allclose(w.detach(), hw, rtol=0, atol=1e-14), step
        assert torch.allclose(b.detach(), hb, rtol=0, atol=1e-14), step


def _run(opt_cls, steps, **kw):
    w0, b0, loss_fn = _problem()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = opt_cls([dict(params=[w]), dict(params=[b], lr=0.2, weight_decay=0.0)], lr=0.1, momentum=0.9,
                  weight_decay=5e-4)
    out = []
    for step in range(steps):
        for group, mult in zip(opt.param_groups, (1, 2)):
            group["lr"] = mult * _lrs(step)
        opt.zero_grad()
        loss_fn(w, b).backward()
        opt.step()
        out.append(w.detach().clone())
    return out


def test_paper_sgd_equals_torch_sgd_while_the_lr_is_constant_and_parts_after_a_drop():
    paper, torch_sgd = _run(PaperSGD, 14), _run(torch.optim.SGD, 14)
    for step in range(6):                                    # lr constant: the same weights (v = -lr buf)
        assert torch.allclose(paper[step], torch_sgd[step], rtol=0, atol=1e-14), step
    # after the drop torch rescales the velocity at once, the paper's keeps it: the weights part
    apart = (paper[-1] - torch_sgd[-1]).abs().max().item()
    assert apart > 1e-4, apart


@pytest.mark.slow
def test_paper_sgd_resumes_exactly_through_state_dict_and_the_checkpoint_files():
    w0, b0, loss_fn = _problem()

    def steps(opt, w, b, n):
        for _ in range(n):
            opt.zero_grad()
            loss_fn(w, b).backward()
            opt.step()

    def fresh():
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        return w, b, PaperSGD([w, b], lr=0.05)
    w, b, opt = fresh()
    steps(opt, w, b, 8)                                      # uninterrupted
    w1, b1, opt1 = fresh()
    steps(opt1, w1, b1, 3)
    saved = opt1.state_dict()
    w2, b2, opt2 = w1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_(), None
    opt2 = PaperSGD([w2, b2], lr=0.05)
    opt2.load_state_dict(saved)
    steps(opt2, w2, b2, 5)
    assert torch.equal(w2, w) and torch.equal(b2, b)
    # the checkpoint files keep each parameter's velocity as "momentum_buffer" (checkpoint.stream_state)
    net = AlexNet(spec=Spec(image_size=67, num_classes=10))
    opt = PaperSGD(net.parameters(), lr=0.01)
    F.cross_entropy(net(torch.randn(2, 3, 67, 67)), torch.tensor([1, 2])).backward()
    opt.step()
    state = ckpt.stream_state(net, opt)
    other = AlexNet(spec=net.spec)
    opt_other = PaperSGD(other.parameters(), lr=0.01)
    ckpt.load_stream_state(other, opt_other, state)
    for p, q in zip(net.parameters(), other.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt_other.state[q]["momentum_buffer"])


def test_paper_sgd_refuses_bad_arguments():
    w = torch.zeros(2, requires_grad=True)
    for kw in (dict(lr=0.0), dict(lr=0.1, momentum=1.0), dict(lr=0.1, weight_decay=-1.0)):
        with pytest.raises(ValueError):
            PaperSGD([w], **kw)


@pytest.mark.slow
def test_the_paper_recipes_use_the_papers_update_and_a_run_records_it(tmp_path):
    for name in RECIPES:
        assert parse_config(["--recipe", name]).update == ("torch" if name == "d2l" else "paper"), name
    assert parse_config(["--recipe", "paper", "--update", "torch"]).update == "torch"
    out = str(tmp_path / "run")
    argv = ["--recipe", "paper", "--dataset", "random", "--train-size", "8", "--val-size", "4",
            "--image-size", "67", "--batch-size", "4", "--max-steps", "2", "--quiet", "--no-plot",
            "--no-ten-crop", "--save-every", "2", "--out", out]
    job = build(parse_config(argv))
    assert isinstance(job.optimizer, PaperSGD)
    assert [g["weight_decay"] for g in job.optimizer.param_groups] == [5e-4, 0.0]
    run(job)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["update"] == "paper"
    # a resume with the other rule is refused in one line (its velocities are in other units)
    job = build(parse_config(argv[:-1] + [str(tmp_path / "again"), "--resume", out, "--update", "torch"]))
    with pytest.raises(UsageError, match="--update paper"):
        run(job)
    check_resume_update({}, "torch", "old")                  # older checkpoints: torch.optim.SGD's


# ---- cuda-convnet2's dexp schedules (cudaconvnet/src/lr.cu) ------------------------------------------

def test_dexp_rates_are_cuda_convnet2s():
    w = dexp_rates(0.02, 250, 4)                 # epsW=dexp[base=0.02;tgtFactor=250;numSteps=4]
    assert w == pytest.approx([0.02, 0.02 * 250 ** (-1 / 3), 0.02 * 250 ** (-2 / 3), 0.02 / 250])
    assert dexp_rates(0.04, 25, 2) == pytest.approx([0.04, 0.04 / 25])   # epsB
    assert [dexp_value(w, p) for p in (0.0, 0.25, 0.2501, 0.5, 0.75, 0.76, 1.0)] == \
        pytest.approx([w[0], w[0], w[1], w[1], w[2], w[3], w[3]])


def test_dexp_schedule_sets_both_groups_by_progress():
    cfg = parse_config(["--recipe", "paper-c2", "--dataset", "random", "--lr", "0.02"])
    assert (cfg.schedule, cfg.bias_lr_mult, cfg.subtract_mean, cfg.lighting_pca) == \
        ("dexp", 2.0, "cuda-convnet2", "cuda-convnet2")
    from split_alexnet.train import build_optimizer, build_scheduler
    opt = build_optimizer(AlexNet(spec=Spec(image_size=67, num_classes=10)), cfg)
    sched = build_scheduler(opt, cfg)
    assert isinstance(sched, DexpSchedule)
    seen = []
    for step in range(0, 100, 10):
        sched.before_step(step, 100)
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
    assert seen[0] == pytest.approx((0.02, 0.04))
    assert seen[3] == pytest.approx((0.02 * 250 ** (-1 / 3), 0.04))        # progress 0.3
    assert seen[6] == pytest.approx((0.02 * 250 ** (-2 / 3), 0.04 / 25))   # progress 0.6: biases' 2nd
    assert seen[9] == pytest.approx((0.02 / 250, 0.04 / 25))
    for bad in ("250", "x,4", "0.5,4", "250,0"):
        with pytest.raises(UsageError, match="--dexp-weights"):
            parse_config(["--schedule", "dexp", "--dexp-weights", bad])


# ---- mean subtraction and PCA lighting, each named for its source -------------------------------------

def test_mean_subtraction_as_caffe_and_as_cuda_convnet2():
    """A flat image: what remains is minus the mean, at the crop's position (Caffe) or the centre's (c2)."""
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(3, 76, 76, generator=g) * 255
    img = torch.full((3, 76, 76), 100, dtype=torch.uint8)
    centre = v2.functional.center_crop(mean, [67, 67])
    c2 = build_paper_transforms(67, 3, mean, train=True, crop=True, flip=True, lighting=0,
                                subtract_mean="cuda-convnet2")
    caffe = build_paper_transforms(67, 3, mean, train=True, crop=True, flip=True, lighting=0)
    crops = [mean[:, i:i + 67, j:j + 67] for i in range(10) for j in range(10)]
    crops += [c.flip(-1) for c in crops]
    off_centre = 0
    for seed in range(6):
        torch.manual_seed(seed)
        assert torch.allclose(c2(img), 100 - centre, atol=1e-4)          # every crop and flip: the centre's
        torch.manual_seed(seed)
        out = caffe(img)
        match = [k for k, c in enumerate(crops) if torch.allclose(out, 100 - c, atol=1e-4)]
        assert match, seed                                               # the crop's own mean, mirrored with it
        off_centre += not torch.allclose(out, 100 - centre, atol=1e-4)
    assert off_centre                                                    # so the two differ


def test_lighting_cuda_convnet2_and_mxnet():
    x = torch.randn(3, 8, 8) * 50
    for name, (eigval, eigvec, rescale) in {"cuda-convnet2": (PCA_C2_STDEV, PCA_C2_EIGVEC, True),
                                             "mxnet": (PCA_MXNET_255, PCA_EIGVEC, False)}.items():
        light = Lighting(0.1, eigval=eigval, eigvec=eigvec, rescale=rescale)
        alpha = torch.tensor([0.3, -0.2, 0.1])
        y = light.transform(x, dict(alpha=alpha))
        want = x + (eigvec @ (alpha * eigval))[:, None, None]
        assert torch.allclose(y, want / 1.1 if rescale else want, atol=1e-4), name
    # cuda-convnet2's std devs (along its eigenvectors, ascending) against MXNet's 255 x eigenvalues
    # (along the same axes, descending): the noise is stronger along every axis
    assert torch.allclose(PCA_C2_EIGVEC[:, [2, 1, 0]].abs(), PCA_EIGVEC.abs(), atol=0.03)
    ratio = PCA_C2_STDEV.flip(0) / PCA_MXNET_255
    assert (ratio > 2).all(), ratio
    # through the transform: train only, after the mean; refused off the 0-255 scale
    tf = build_paper_transforms(67, 3, torch.zeros(3, 76, 76), train=True, crop=False, flip=False, lighting=0.1,
                                lighting_pca="cuda-convnet2")
    assert any(isinstance(t, Lighting) and t.rescale for t in tf.transforms)
    with pytest.raises(UsageError, match="--preprocess paper"):
        parse_config(["--lighting-pca", "cuda-convnet2", "--preprocess", "channel", "--lighting", "0.1"])


def test_ten_crop_mirrored_centre_is_the_centre_mirrored_at_227_from_256():
    """256 -> 227 leaves an odd margin (29): torchvision's TenCrop put the mirrored centre 1 px off."""
    img = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8)
    tf = build_paper_transforms(227, 3, torch.zeros(3, 256, 256), train=False, crop=True, flip=True, lighting=0,
                                ten_crop=True)
    crops = tf(img)
    for i in range(5):
        assert torch.equal(crops[5 + i], crops[i].flip(-1)), i
    old = v2.TenCrop(227)(img.float())                       # what the old transform did
    assert not torch.equal(old[9], old[4].flip(-1))


# ---- 224 px: the paper's net (cuda-convnet2's output size) ---------------------------------------------

def test_224_px_is_the_papers_net():
    spec = Spec(image_size=224)
    assert spec.shapes[0].out_hw == 55 and spec.shapes[0].pad_end == 3
    assert spec.params_total == 60_965_224 == Spec(image_size=227).params_total
    assert paper_side(224) == 256 and paper_side(227) == 256       # 224 crops from 256: 32 px margin
    assert Spec(image_size=227).shapes[0].pad_end == 0 and Spec(image_size=67).shapes[0].pad_end == 0


@pytest.mark.slow
def test_summary_at_224_px_shows_conv1_55_and_the_papers_parameters():
    proc = run_python("summary.py", "--image-size", "224")
    assert proc.returncode == 0, proc.stderr
    conv1 = next(line for line in proc.stdout.splitlines() if line.startswith("conv1 "))
    assert "55x55 before pool" in conv1
    assert "total parameters: 60,965,224" in proc.stdout


@pytest.mark.slow
def test_implicit_padding_is_zeros_on_the_right_and_bottom_in_every_layout():
    """68 px acts as 71 (3 px): each layout equals the unpadded net on the zero-padded image."""
    spec, wide = Spec(image_size=68, num_classes=10), Spec(image_size=71, num_classes=10)
    assert spec.shapes[0].pad_end == 3 and spec.shapes[0].out_hw == wide.shapes[0].out_hw
    torch.manual_seed(0)
    net = AlexNet(spec=spec).double().eval()
    ref = AlexNet(spec=wide).double().eval()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 68, 68, dtype=torch.float64)
    want = ref(F.pad(x, (0, 3, 0, 3)))
    assert torch.allclose(net(x), want, rtol=0, atol=1e-12)
    streams = StreamsAlexNet(spec).double().eval()
    for s, shard in zip(streams.streams, split_alexnet.shard_state_dict(net.state_dict(), spec)):
        s.load_state_dict(shard)
    assert torch.allclose(streams(x), want, rtol=0, atol=1e-12)


# ---- every layout's check with the paper's update ------------------------------------------------------

@pytest.mark.slow
def test_check_streams_with_the_papers_update():
    rows = run_check("streams", Spec(image_size=68, num_classes=10), batch_size=2, steps=2,
                     modes=("eval", "train"), update="paper")
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]


def _checks_with_the_papers_update(rank, world):
    from split_alexnet.distributed import Context, build_mesh
    for streams in (2, 1):                       # split: 1 replica x 2 streams; mesh: 2 replicas x 1 stream
        ctx = Context(rank, world, rank, torch.device("cpu"), "gloo", streams,
                      build_mesh("cpu", world // streams, streams))
        rows = run_check("split", Spec(streams=streams, image_size=67, num_classes=10), batch_size=4, steps=2,
                         modes=("eval",), rank=ctx.stream_rank, ctx=ctx, update="paper", dtype=torch.float64)
        assert rows and all(r.ok for r in rows), (streams, [r for r in rows if not r.ok])
    rows = run_check("hybrid", Spec(image_size=67, num_classes=10), batch_size=4, steps=2, modes=("eval",),
                     rank=rank, update="paper", dtype=torch.float64)     # one pass: values and derivatives
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]


@pytest.mark.slow
def test_check_split_mesh_and_hybrid_with_the_papers_update():
    spawn(_checks_with_the_papers_update, 2)


# ---- the 2014 hybrid's schedule --------------------------------------------------------------------------

@pytest.mark.slow
def test_hybrid_2014_schedule_passes_its_own_check_and_fails_without_the_conv_sum():
    args = ("--layout", "hybrid", "--hybrid-schedule", "2014", "--image-size", 67, "--num-classes", 10,
            "--batch-size", 4)
    proc = run_torchrun(2, "check.py", *args, "--steps", 2, "--modes", "train", "--update", "paper")
    out = proc.stderr + proc.stdout     # train mode: each pass draws its own dropout masks
    assert proc.returncode == 0 and "PASS" in out and "loss (2014 passes)" in out, out[-2000:]
    proc = run_torchrun(2, "check.py", *args, "--steps", 1, "--no-allreduce", "--modes", "eval")
    assert proc.returncode == 1 and "FAIL" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_the_2014_schedule_is_not_the_single_layouts_step():
    """One worker: the 2014 reference is one SGD step with the conv at 4x; two workers part from it."""
    from split_alexnet.hybrid import CONV_LR_MULT_2014, reference_step_2014
    spec = Spec(image_size=67, num_classes=10)
    torch.manual_seed(0)
    base = AlexNet(spec=spec, init="d2l").double().eval()
    x, y = torch.randn(4, 3, 67, 67, dtype=torch.float64), torch.tensor([1, 2, 3, 4])

    def after(world):
        net = AlexNet(spec=spec).double().eval()
        net.load_state_dict(base.state_dict())
        fc = [p for n, p in net.named_parameters() if n.startswith("fc")]
        conv = [p for n, p in net.named_parameters() if n.startswith("conv")]
        reference_step_2014(net, x, y, world, torch.optim.SGD(fc, lr=0.01), torch.optim.SGD(conv, lr=0.04))
        return net
    one = after(1)
    plain = AlexNet(spec=spec).double().eval()
    plain.load_state_dict(base.state_dict())
    F.cross_entropy(plain(x), y).backward()
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p -= (0.01 * CONV_LR_MULT_2014 if n.startswith("conv") else 0.01) * p.grad
    for (n, p), q in zip(one.named_parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-13), n
    two = after(2)
    assert not math.isclose((two.fc6.weight - one.fc6.weight).abs().max().item(), 0.0, abs_tol=1e-9)
