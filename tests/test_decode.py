"""decode.py: the image folders' loader gives PIL's pixels as a uint8 (3, H, W) tensor, whichever decoder
it takes, and a bad file gets PIL's error.

Error model: none. torchvision's decode_jpeg and PIL are both libjpeg-turbo with the default integer
IDCT and chroma upsampling, so equal files decode to equal bytes; the PIL route is PIL itself. Where two
installed libjpeg-turbo builds ever differ, these tests fail, and `launch/bench.py --data` counts the
images of the user's own folder whose pixels differ (same_pixels).
"""
import io
import os
import sys

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from split_alexnet.decode import decode_bytes, decode_file

sys.path.insert(0, os.path.dirname(__file__))
from test_data_path import jpeg_folder, photo  # noqa: E402


def _pil(path):
    with Image.open(path) as img:                    # torchvision's ImageFolder loader
        return pil_to_tensor(img.convert("RGB"))


@pytest.mark.parametrize("mode,fmt,kw", [("RGB", "JPEG", dict(quality=90)),
                                         ("RGB", "JPEG", dict(quality=75, subsampling=0)),
                                         ("RGB", "JPEG", dict(quality=95, progressive=True)),
                                         ("L", "JPEG", dict(quality=90)),
                                         ("CMYK", "JPEG", dict(quality=90)),
                                         ("RGB", "PNG", {}), ("RGBA", "PNG", {}), ("P", "PNG", {})])
def test_decoded_pixels_are_pils(tmp_path, mode, fmt, kw):
    path = str(tmp_path / f"x.{fmt.lower()}")
    photo(3, 375, 500).convert(mode).save(path, fmt, **kw)
    got, want = decode_file(path), _pil(path)
    assert got.dtype == torch.uint8 and got.shape == (3, 375, 500)
    assert torch.equal(got, want), (got.int() - want.int()).abs().max()


def test_bytes_and_file_decode_alike(tmp_path):
    path = str(tmp_path / "x.jpg")
    photo(4).save(path, quality=90)
    assert torch.equal(decode_bytes(open(path, "rb").read()), decode_file(path))


def test_truncated_jpeg_gets_pils_error(tmp_path):
    path = str(tmp_path / "x.jpg")
    photo(5).save(path, quality=90)
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 3])
    with pytest.raises(OSError, match="image file is truncated"):
        decode_file(path)


def test_a_file_that_is_no_image_gets_pils_error(tmp_path):
    path = str(tmp_path / "x.jpg")
    open(path, "wb").write(b"not an image at all")
    with pytest.raises(OSError, match="cannot identify image file"):
        decode_file(path)


def test_decompression_bomb_guard_applies_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "JPEG")
    blob = bytearray(buf.getvalue())
    sof = blob.index(b"\xff\xc0")                    # the frame header: height and width at +5 and +7
    blob[sof + 5:sof + 9] = (30000).to_bytes(2, "big") * 2
    with pytest.raises(Image.DecompressionBombError):
        decode_bytes(bytes(blob))


def test_the_trainers_folder_items_are_pils(tmp_path):
    """What training reads (build_datasets' image folder) against torchvision's ImageFolder with its PIL
    loader, image by image: equal pixels and labels, so the augmented batches and the loss curves are
    the ones PIL's decoder gave (the draws do not depend on the decoder)."""
    import torchvision

    from split_alexnet.data import build_datasets
    root = jpeg_folder(str(tmp_path / "photos"), train=3, val=1)
    train, val, _ = build_datasets("imagefolder", root, seed=0)
    for ours in (train, val):
        pil = torchvision.datasets.ImageFolder(ours.root)
        assert len(ours) == len(pil) > 0
        for i in range(len(ours)):
            (x, a), (y, b) = ours[i], pil[i]
            assert a == b and torch.equal(x, pil_to_tensor(y))
