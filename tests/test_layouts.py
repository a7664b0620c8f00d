"""The three layouts compute the same function; weights move between them exactly."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import spawn

from split_alexnet import AlexNet, Spec, join_state_dicts, shard_state_dict, split_from_single, streams_from_single
from split_alexnet.check import TOLERANCES
from split_alexnet.precision import ieee_fp32

SMALL = dict(image_size=67, num_classes=10)


def _close(a, b):
    # the check's tolerance (split_alexnet/check.py): only the order of sums differs
    rtol, atol = TOLERANCES[b.dtype]
    assert (a - b).abs().max().item() <= rtol * b.abs().max().item() + atol


def test_single_is_the_papers_net_with_caffes_names():
    net = AlexNet(num_classes=1000, in_channels=3)
    assert sum(p.numel() for p in net.parameters()) == 60_965_224
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items() if k.endswith("weight")}
    assert list(shapes) == [f"{n}.weight" for n in ("conv1", "conv2", "conv3", "conv4", "conv5",
                                                      "fc6", "fc7", "fc8")]
    # bvlc_alexnet's blobs (group: 2 in conv2, conv4, conv5)
    assert shapes == {"conv1.weight": (96, 3, 11, 11), "conv2.weight": (256, 48, 5, 5),
                      "conv3.weight": (384, 256, 3, 3), "conv4.weight": (384, 192, 3, 3),
                      "conv5.weight": (256, 192, 3, 3), "fc6.weight": (4096, 9216),
                      "fc7.weight": (4096, 4096), "fc8.weight": (1000, 4096)}
    assert [net.conv2.groups, net.conv3.groups, net.conv4.groups, net.conv5.groups] == [2, 1, 2, 2]
    assert net(torch.randn(2, 3, 227, 227)).shape == (2, 1000)


def test_paper_init():
    net = AlexNet(**SMALL)
    assert net.conv2.bias.eq(1).all() and net.fc7.bias.eq(1).all() and net.conv3.bias.eq(0).all()
    assert abs(net.fc6.weight.std().item() - 0.01) < 1e-3


def test_lrn_stays_within_each_stream():
    # the single layout normalises each half on its own (cuda-convnet), not across all 96 maps (Caffe)
    net = AlexNet(**SMALL).eval()
    x = torch.randn(2, 3, 67, 67)
    a = F.relu(net.conv1(x))
    lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
    per_stream = torch.cat([lrn(a[:, :48]), lrn(a[:, 48:])], dim=1)
    layer = net.spec.layers[0]
    ours = net.layer_fn(layer, x)
    # split_alexnet.lrn rounds differently from torch's LRN: equal to fp32 round-off (tests/test_lrn.py)
    torch.testing.assert_close(ours, F.max_pool2d(per_stream, 3, 2), rtol=4e-6, atol=0)
    across = F.max_pool2d(lrn(a * 100), 3, 2)  # scaled so that the window's reach is visible
    assert not torch.allclose(net.layer_fn(layer, x * 100), across)


@pytest.mark.parametrize("streams", [1, 2, 4, 8])
def test_streams_layout_equals_single(streams):
    single = AlexNet(streams=streams, **SMALL, init="d2l", dropout_seed=3)
    other = streams_from_single(single)
    x = torch.randn(4, 3, 67, 67)
    for train in (False, True):
        single.train(train), other.train(train)
        _close(other(x), single(x))


def test_dropout_masks_agree_between_layouts_and_follow_the_seed():
    single = AlexNet(**SMALL, init="d2l", dropout_seed=7).train()
    other = streams_from_single(single).train()
    x = torch.randn(4, 3, 67, 67)
    first = single(x)
    _close(other(x), first)
    assert not torch.allclose(single(x), first)  # a new mask every step
    reseeded = AlexNet(**SMALL, init="d2l", dropout_seed=8).train()
    reseeded.load_state_dict(single.state_dict())
    assert not torch.allclose(reseeded(x), first)
    single.eval()
    assert torch.equal(single(x), single(x))  # no dropout in eval


def test_shards_round_trip_bit_exactly():
    for streams, classes in [(2, 1000), (4, 10), (8, 12)]:
        spec = Spec(streams=streams, num_classes=classes, image_size=67)
        state = AlexNet(spec=spec).state_dict()
        shards = shard_state_dict(state, spec)
        assert shards[0]["conv2.weight"].shape == (256 // streams, 96 // streams, 5, 5)
        joined = join_state_dicts(shards, spec)
        assert list(joined) == list(state)
        assert all(torch.equal(joined[k], state[k]) for k in state)
    assert [s["fc8.bias"].numel() for s in shard_state_dict(
        AlexNet(spec=Spec(streams=4, num_classes=10, image_size=67)).state_dict(),
        Spec(streams=4, num_classes=10, image_size=67))] == [3, 3, 2, 2]


def test_bad_input_shape_names_the_fix():
    net = AlexNet(**SMALL)
    with pytest.raises(ValueError, match=r"expects \(B, 3, 67, 67\).*in_channels=1"):
        net(torch.randn(2, 1, 67, 67))
    with pytest.raises(ValueError, match="image_size=99"):
        streams_from_single(net)(torch.randn(2, 3, 99, 99))


def _split_equals_single(rank, world, classes):
    # float64: at this seed a conv3 pre-activation lies 4e-8 from ReLU's kink, within fp32 round-off,
    # so in fp32 the two layouts may disagree on that neuron's gradient (see split_alexnet/check.py)
    torch.manual_seed(0)
    spec = Spec(streams=world, image_size=67, num_classes=classes)
    single = AlexNet(spec=spec, init="d2l", dropout_seed=5)
    split = split_from_single(single, rank).double()
    single.double()
    x = torch.randn(3, 3, 67, 67, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    for train in (False, True):
        single.train(train), split.train(train)
        for m in (single, split):
            m.zero_grad()
        out_single, out_split = single(x), split(x)
        _close(out_split, out_single)
        F.cross_entropy(out_single, y).backward()
        F.cross_entropy(out_split, y).backward()
        grads = shard_state_dict({n: p.grad for n, p in single.named_parameters()}, spec)[rank]
        for name, p in split.stream.named_parameters():
            _close(p.grad, grads[name])


@pytest.mark.slow
def test_split_layout_equals_single_two_and_four_ranks():
    spawn(_split_equals_single, 2, 10)
    spawn(_split_equals_single, 4, 10)  # fc8 split unevenly: 3, 3, 2, 2 classes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA): CPU runs of the same "
                    "layouts are covered above")
def test_single_and_streams_on_one_gpu():
    single = AlexNet(init="d2l", dropout_seed=1).cuda()
    other = streams_from_single(single, ["cuda:0", "cuda:0"])
    x = torch.randn(8, 3, 227, 227, device="cuda")
    with ieee_fp32():  # the fp32 tolerance; by default cuDNN convolves fp32 in TF32 (measured on an H100:
        _single_and_streams_agree(single, other, x)  # logits 1.3e-4 apart, above the fp32 tolerance)


def _single_and_streams_agree(single, other, x):
    for train in (False, True):
        single.train(train), other.train(train)
        _close(other(x), single(x))
