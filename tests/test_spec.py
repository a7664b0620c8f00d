import pytest

from split_alexnet.spec import MIN_IMAGE_SIZE, PAPER_NEURONS, Spec, allowed_streams
from split_alexnet.summary import summary_table


def test_paper_figures():
    spec = Spec()
    assert spec.params_total == 60_965_224
    assert [spec.params_per_stream(s) for s in range(2)] == [30_482_612, 30_482_612]
    assert [r.neurons for r in spec.shapes][1:] == list(PAPER_NEURONS[1:])
    assert spec.shapes[0].neurons == 55 * 55 * 96  # the paper's first figure is 253,440
    assert [r.post_hw for r in spec.shapes[:5]] == [27, 13, 13, 13, 6]
    assert [r.params_total for r in spec.shapes][5:] == [37_752_832, 16_781_312, 4_097_000]


def test_exchange_bytes_match_the_reference_sheet():
    ex = {e.name: e for e in Spec().exchanges}
    assert [e.name for e in Spec().exchanges] == ["conv3", "fc6", "fc7", "fc8", "logits"]
    assert {n: e.bytes for n, e in ex.items()} == {
        "conv3": 86_528, "fc6": 18_432, "fc7": 8_192, "fc8": 8_192, "logits": 2_000}
    assert Spec().bytes_per_image() == 123_344
    assert ex["logits"].backward == "split" and ex["conv3"].backward == "reduce-scatter"
    assert Spec(streams=1).bytes_per_image() == 0


@pytest.mark.parametrize("streams", [1, 2, 4, 8])
def test_streams_together_hold_every_parameter(streams):
    # conv2/4/5 read only their own stream, so the total shrinks as the streams multiply
    spec = Spec(streams=streams)
    assert sum(spec.params_per_stream(s) for s in range(streams)) == spec.params_total
    assert spec.params_total == {1: 62_378_344, 2: 60_965_224, 4: 60_258_664, 8: 59_905_384}[streams]


def test_derived_sizes_follow_the_input():
    spec = Spec(image_size=195, in_channels=1, num_classes=10)
    assert spec.shapes[0].out_hw == 47 and spec.shapes[5].in_channels == 256 * 5 * 5
    # 224 acts as 227 (cuda-convnet2's output size, 3 zero pixels right and bottom): the paper's net
    spec = Spec(image_size=224, in_channels=1, num_classes=10)
    assert spec.shapes[0].out_hw == 55 and spec.shapes[5].in_channels == 256 * 6 * 6
    assert Spec(image_size=MIN_IMAGE_SIZE).shapes[4].post_hw == 1
    assert Spec(streams=4, num_classes=10).out_sizes(Spec().layers[-1]) == [3, 3, 2, 2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=66), "use --image-size 67 or more"),
    (dict(streams=3), "use 1, 2, 4, 8 streams"),
    (dict(streams=16), "use 1, 2, 4, 8 streams"),
    (dict(streams=4, num_classes=3), "use at least 4 classes"),
])
def test_bad_specs_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Spec(**kwargs)


def test_allowed_streams_divide_every_width():
    assert allowed_streams() == (1, 2, 4, 8)


def test_summary_shows_the_figures():
    text = summary_table(Spec())
    for figure in ["60,965,224", "30,482,612", "186,624", "64,896", "43,264", "253,440", "86,528",
                   "(1, 48, 27, 27)", "(1, 128, 6, 6)", "123,344"]:
        assert figure in text


def test_multiply_adds_equal_torchs_flop_counter():
    # forward: the 2012 net at 227 px, 1000 classes, per layer and in total
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from split_alexnet import AlexNet
    spec = Spec()
    net = AlexNet(spec=spec).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, 227, 227))
    per_layer = {m.rsplit(".", 1)[1]: sum(c.values()) // 2 for m, c in counter.get_flop_counts().items()
                 if m.count(".") == 1}
    assert per_layer == {r.layer.name: r.macs for r in spec.shapes}
    assert counter.get_total_flops() // 2 == spec.macs_per_image() == 724_406_816
    # a training step, forward and backward (one stream: torch counts a grouped convolution's input
    # gradient as if ungrouped, so the two-stream net's backward is compared through its formula only)
    one = Spec(streams=1)
    net = AlexNet(spec=one).train()
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 227, 227)).sum().backward()
    assert counter.get_total_flops() == one.flops_per_image_step()
    assert round(spec.flops_per_image_step() / 1e9, 2) == 4.14


def test_summary_prints_torchs_multiply_adds_per_layer_and_in_total():
    # what `python launch/summary.py` prints, parsed back, against torch.utils.flop_counter
    import re

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from split_alexnet import AlexNet
    text = summary_table(Spec())
    printed = {m.group(1): int(m.group(2).replace(",", ""))
               for m in re.finditer(r"^(conv\d|fc\d|total)\s+([\d,]+)\s+[\d.]+ %", text, re.M)}
    total = re.search(r"^total\s+([\d,]+)$", text, re.M)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        AlexNet(spec=Spec()).eval()(torch.zeros(1, 3, 227, 227))
    torchs = {m.rsplit(".", 1)[1]: sum(c.values()) // 2 for m, c in counter.get_flop_counts().items()
              if m.count(".") == 1}
    assert printed == torchs and len(printed) == 8
    assert int(total.group(1).replace(",", "")) == counter.get_total_flops() // 2 == 724_406_816
    assert "conv layers: 91.9 % of the compute (665,784,864), 3.8 % of the parameters (2,334,080)" in text
    assert "fc layers: 8.1 % of the compute (58,621,952), 96.2 % of the parameters (58,631,144)" in text


def test_the_alternatives_are_costed_from_the_spec():
    from split_alexnet.hybrid import bytes_per_step
    from split_alexnet.summary import alternatives, segment_macs
    p = Spec()
    rows = {what.split(" (")[0]: (per_image, per_step, theirs) for what, per_image, per_step, _, theirs
            in alternatives(p, 128)}
    assert rows["row-parallel conv3"][:1] == (2 * 129_792,)            # 384 x 13 x 13 / 2 x 4 B, fwd + bwd
    assert rows["row-parallel conv3"][2] == 2 * 86_528
    assert rows["Megatron fc6/fc7"][0] == 2 * 16_384 == rows["Megatron fc6/fc7"][2]   # all-reduce vs 2 gathers
    assert rows["data parallelism over 2 ranks"][1] == p.ddp_bytes_per_step() == 243_860_896
    assert rows["the 2014 hybrid over 2 ranks"][1] == sum(bytes_per_step(p, 128, 2).values())
    assert segment_macs(p)["conv3"] == sum(r.macs for r in p.shapes[2:5]) // 2
    text = summary_table(p)
    assert "a buffer of 60,965,224 fp32 gradients, 243,860,896 B, of which a ring sends 2(W-1)/W" in text
    assert "bytes per step instead" not in text   # the old label: a buffer's size, called bytes per step


def test_the_4_stream_summary_labels_the_buffer_not_the_step():
    text = summary_table(Spec(streams=4))
    assert "a buffer of 60,258,664 fp32 gradients, 241,034,656 B" in text
    assert "fp32 gradients: 361,551,984 B per step" in text
