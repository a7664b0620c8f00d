"""The trace (`launch/summary.py --trace`): every measured shape is the one the spec derives."""
import ast
import importlib.util
import re
from pathlib import Path

import pytest

from split_alexnet.spec import Spec
from split_alexnet.summary import LAYOUTS, trace, trace_table

REPO = Path(__file__).resolve().parents[1]


def _launcher():
    spec = importlib.util.spec_from_file_location("summary_launcher", REPO / "launch" / "summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _expected(spec, layout):
    """(layer, op) -> the shape in every column, from Spec.shapes alone."""
    cols = 1 if layout == "single" else spec.streams
    rows, prev = [], None
    for r in spec.shapes:
        layer = r.layer
        per = [spec.width(layer)] if layout == "single" else spec.out_sizes(layer)
        if layer.reads == "all":
            whole = prev.layer.width if prev.layer.kind == "fc" else spec.width(prev.layer)
            gathered = (1, whole) if prev.layer.kind == "fc" else (1, whole, prev.post_hw, prev.post_hw)
            rows.append((layer.name, "exchange", [gathered] * cols))
        if layer.kind == "conv":
            rows.append((layer.name, "conv", [(1, n, r.out_hw, r.out_hw) for n in per]))
            after = [(1, n, r.out_hw, r.out_hw) for n in per]
            rows += [(layer.name, op, after) for op, on in (("relu", layer.relu), ("lrn", layer.lrn)) if on]
            if layer.pool:
                rows.append((layer.name, "maxpool", [(1, n, r.post_hw, r.post_hw) for n in per]))
        else:
            if prev.layer.kind == "conv":
                rows.append((layer.name, "flatten", [(1, r.in_channels)] * cols))
            rows.append((layer.name, "linear", [(1, n) for n in per]))
            if layer.relu:
                rows.append((layer.name, "relu", [(1, n) for n in per]))
        prev = r
    logits = [(1, spec.num_classes)] * cols
    if layout == "streams":  # the streams layout gathers the logits on devices[0] only
        logits = logits[:1] + [None] * (cols - 1)
    rows.append(("logits", "exchange", logits))
    return rows


CASES = [(227, 2, layout) for layout in LAYOUTS] + [(227, 4, "split")] + [
    (67, streams, layout) for streams in (2, 4) for layout in LAYOUTS]


@pytest.mark.parametrize("image_size, streams, layout", CASES)
def test_trace_measures_the_spec_shapes(image_size, streams, layout):
    spec = Spec(streams=streams, image_size=image_size, num_classes=10 if streams == 4 else 1000)
    got = [(s.layer, s.op, s.shapes) for s in trace(spec, layout)]
    assert got == _expected(spec, layout)


def test_trace_names_what_each_exchange_is():
    steps = {(s.layer, s.op): s for s in trace(Spec(image_size=67), "split")}
    assert steps["conv3", "exchange"].note == "all-gather, bwd reduce-scatter"
    assert steps["logits", "exchange"].note == "all-gather, bwd keep own slice"
    single = {(s.layer, s.op): s for s in trace(Spec(image_size=67), "single")}
    assert single["conv1", "lrn"].note == "LRN ran on (2, 48, 15, 15): one group per stream"


def test_the_printout_is_the_trace(capsys):
    assert _launcher().main(["--trace", "--streams", "4", "--image-size", "67", "--num-classes", "10"]) == 0
    text = capsys.readouterr().out
    assert text.strip() == trace_table(Spec(streams=4, image_size=67, num_classes=10), "streams")
    lines = text.splitlines()
    assert lines[2].split()[:6] == ["layer", "step", "stream", "0", "stream", "1"]
    printed = {}
    for line in lines[3:]:
        layer, op = line.split()[:2]
        printed[layer, op] = [None if c == "-" else ast.literal_eval(c)
                              for c in re.findall(r"\([\d, ]+\)|(?<=\s)-(?=\s|$)", line)]
    expected = _expected(Spec(streams=4, image_size=67, num_classes=10), "streams")
    assert printed == {(layer, op): shapes for layer, op, shapes in expected}


def test_the_default_stays_the_table(capsys):
    assert _launcher().main(["--image-size", "67"]) == 0
    assert "exchanges (what one stream sends" in capsys.readouterr().out


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="use one of single, streams, split"):
        trace(Spec(image_size=67), "pipeline")
