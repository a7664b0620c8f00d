"""The figures (`python launch/figures.py`): they are written, and what they say comes from the spec."""
import importlib.util
import struct
from pathlib import Path

import pytest

from split_alexnet import comm
from split_alexnet.figures import FIGURES, draw_collectives, draw_towers, figure_texts, save, tower_labels
from split_alexnet.spec import Spec

REPO = Path(__file__).resolve().parents[1]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


def test_the_command_writes_every_figure(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("figures_launcher", REPO / "launch" / "figures.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert launcher.main(["--out", str(tmp_path / "figs")]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(FIGURES)
    out = capsys.readouterr().out
    for name in FIGURES:
        assert f"wrote {tmp_path / 'figs' / name}" in out
        width, height = _png_size(tmp_path / "figs" / name)
        assert 1000 <= width <= 1800 and 700 <= height <= 1600, (name, width, height)  # a laptop's page


@pytest.mark.parametrize("spec", [Spec(), Spec(streams=4), Spec(streams=4, image_size=67, num_classes=10)],
                         ids=["paper", "4-streams", "4-streams-67px-10-classes"])
def test_the_towers_say_what_the_spec_says(spec):
    texts = figure_texts(draw_towers(spec))
    for e in spec.exchanges:  # each exchange once, with its bytes and its function
        assert texts.count(f"{e.bytes:,} B per image sent by each stream") == sum(
            x.bytes == e.bytes for x in spec.exchanges)
        fn = "gather_for_same_computation" if e.backward == "split" else "gather_for_distinct_kernels"
        where = "the logits" if e.name == "logits" else f"before {e.name}"
        assert f"{where}: {fn}" in texts
    assert sum("B per image sent by each stream" in t for t in texts) == len(spec.exchanges)
    for r in spec.shapes:  # every stream's box carries its own output shape
        for n in spec.out_sizes(r.layer):
            title = (f"{r.layer.name}  {n}×{r.out_hw}×{r.out_hw}" if r.layer.kind == "conv"
                     else f"{r.layer.name}  {n}")
            assert title in texts
        if r.layer.pool:
            assert any(f"pool → {r.out_per_stream}×{r.post_hw}×{r.post_hw}" in t for t in texts)
    assert texts.count(f"logits  {spec.num_classes}") == spec.streams
    assert f"stream {spec.streams - 1}  ·  device {spec.streams - 1}" in texts
    assert any(f"{spec.bytes_per_image():,} B" in t for t in texts)


def test_the_paper_towers_carry_the_paper_numbers():
    image, rows, exchanges = tower_labels(Spec())
    assert image.title == "image  3×227×227"
    boxes = dict(rows)
    assert [b.title for b in boxes["conv1"]] == ["conv1  48×55×55"] * 2
    assert boxes["conv1"][0].detail == "11×11/4 · ReLU · LRN · pool → 48×27×27"
    assert boxes["fc6"][1].title == "fc6  2048"
    assert [b.detail for b in boxes["fc8"]] == ["classes 0–499", "classes 500–999"]
    assert exchanges["conv3"].lines[2:] == ("86,528 B per image sent by each stream",
                                           "= 1 peer × 128×13×13 × 4 B")
    assert exchanges["logits"].lines[1] == "forward: all-gather  ·  backward: keep own slice"


def test_uneven_classes_are_drawn_per_stream():
    _, rows, exchanges = tower_labels(Spec(streams=4, image_size=67, num_classes=10))
    fc8 = dict(rows)["fc8"]
    assert [b.title for b in fc8] == ["fc8  3", "fc8  3", "fc8  2", "fc8  2"]
    assert [b.detail for b in fc8] == ["classes 0–2", "classes 3–5", "classes 6–7", "classes 8–9"]
    assert exchanges["logits"].lines[3] == "= 3 peers × 3 × 4 B"  # padded to the largest part


def test_the_collectives_name_comm_functions(tmp_path):
    fig = draw_collectives()
    texts = figure_texts(fig)
    for fn in ("gather_for_distinct_kernels", "gather_for_same_computation"):
        assert hasattr(comm, fn)
        assert any(fn in t for t in texts)
    for block in ("A0", "A1", "G0a", "G0b", "G1a", "G1b", "G0a+G1a", "G0b+G1b", "Ga", "Gb"):
        assert block in texts
    assert any(t.startswith("Rule 1") and "sum" in t for t in texts)
    assert any(t.startswith("Rule 2") and "keep own slice" in t for t in texts)
    save(fig, tmp_path / "c.png")  # the maths text renders
    _png_size(tmp_path / "c.png")


def test_the_docs_hold_every_figure_and_list_it():
    readme = (REPO / "docs" / "figures" / "README.md").read_text()
    assert "python launch/figures.py" in readme
    for name in FIGURES:
        assert (REPO / "docs" / "figures" / name).is_file(), f"run python launch/figures.py ({name})"
        assert f"({name})" in readme
