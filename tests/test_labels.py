"""Profiler labels come from the model itself (a record_function range per LRN), in every layout,
and no library module switches behaviour by patching another module or class."""
import pathlib
import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from split_alexnet.labels import LRN_LABEL
from split_alexnet.model import AlexNet, StreamsAlexNet
from split_alexnet.spec import Spec

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("layout", ["single", "streams"])
def test_every_lrn_call_is_a_profiler_range(layout):
    spec = Spec(streams=2, num_classes=10, image_size=67)
    torch.manual_seed(0)
    net = AlexNet(spec=spec) if layout == "single" else StreamsAlexNet(spec)
    x = torch.randn(2, 3, 67, 67)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        net(x).sum().backward()
    lrn_layers = sum(1 for layer in spec.layers if layer.lrn)
    calls_per_layer = 1 if layout == "single" else spec.streams  # grouped in one call, or one per stream
    ranges = [e for e in prof.events() if e.name == LRN_LABEL]
    assert lrn_layers == 2 and len(ranges) == lrn_layers * calls_per_layer


def test_no_library_module_patches_another():
    pattern = re.compile(r"setattr\((mod|module|model|F|nn)\b|\.backward = staticmethod|unittest import mock|mock\.patch"
                         r"|\bmodel_mod(ule)?\.\w+ = ")
    found = [f"{p.relative_to(ROOT)}:{n}" for d in ("split_alexnet", "benchmarks", "launch")
             for p in sorted((ROOT / d).rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


@pytest.mark.parametrize("layout", ["single", "streams"])
def test_forward_plan_labels_every_layer_and_exchange(layout):
    """The ranges a trace shows come from forward_plan: one per layer (conv1..fc8) and one per exchange
    (conv3, fc6, fc7, fc8, logits), in every layout that runs it; no wrapper puts them there."""
    spec = Spec(streams=2, num_classes=10, image_size=67)
    torch.manual_seed(0)
    net = AlexNet(spec=spec) if layout == "single" else StreamsAlexNet(spec)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        net(torch.randn(2, 3, 67, 67)).sum().backward()
    names = {e.name for e in prof.events()}
    layers = [layer.name for layer in spec.layers]
    assert set(layers) <= names, set(layers) - names
    exchanges = {f"exchange:{e.name}" for e in spec.exchanges}
    assert exchanges == {"exchange:conv3", "exchange:fc6", "exchange:fc7", "exchange:fc8", "exchange:logits"}
    assert exchanges <= names, exchanges - names
