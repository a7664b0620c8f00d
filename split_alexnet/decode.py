"""Decoding images: one file on the CPU (what the image folders and shards return), or a batch on the
device (--decode gpu).

decode_file / decode_bytes: a JPEG in RGB or greyscale goes straight to a uint8 (3, H, W) tensor through
torchvision.io.decode_jpeg; everything else (PNG, CMYK, ...) through PIL, converted to RGB as
torchvision's ImageFolder loader does. Both decoders are libjpeg-turbo with its default integer IDCT and
chroma upsampling, so the pixels are PIL's (asserted on the test photos, and counted on the user's own
images by `launch/bench.py --data`: its `same_pixels` fact); torchvision's skips PIL's decode into its
own buffer and the copy from there into a tensor (`bench --data`'s decode-pil and decode-tv rows). PIL
reads the header first in both cases, so its guard against decompression bombs applies and a file that
is no image gets PIL's error; a JPEG that libjpeg cannot decode is decoded again by PIL, which raises
its own error, so a bad file's message is the one ImageFolder's loader gave.
"""
import io

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

DIRECT = ("RGB", "L")    # the JPEG modes torchvision decodes to PIL's RGB pixels


def decode_bytes(data):
    """uint8 (3, H, W) of one encoded image (bytes)."""
    with Image.open(io.BytesIO(data)) as img:          # only the header: format, mode, size
        if img.format == "JPEG" and img.mode in DIRECT:
            try:
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except RuntimeError:                       # PIL decodes it below and raises its own error
                pass
        return TF.pil_to_tensor(img.convert("RGB"))


def decode_file(path):
    """uint8 (3, H, W) of the image file at `path`: the loader of the image folders."""
    with open(path, "rb") as f:
        return decode_bytes(f.read())


def is_jpeg(blob):
    return len(blob) > 2 and blob[0] == 0xFF and blob[1] == 0xD8


def decode_batch(blobs, side, device):
    """Decode a list of encoded images (1-D uint8 tensors) on `device` (torchvision.io.decode_jpeg,
    batched on CUDA), then the paper's base on the device: shorter side to `side`, the central square.
    Non-JPEG files are decoded on the CPU (decode_image). Returns uint8 (B, 3, side, side)."""
    jpeg = [i for i, b in enumerate(blobs) if is_jpeg(b)]
    images = [None] * len(blobs)
    if jpeg:
        dev = device if torch.device(device).type == "cuda" else "cpu"
        for i, img in zip(jpeg, decode_jpeg([blobs[i] for i in jpeg], mode=ImageReadMode.RGB, device=dev)):
            images[i] = img
    for i, b in enumerate(blobs):
        if images[i] is None:
            images[i] = decode_image(b, mode=ImageReadMode.RGB)
    out = []
    for img in images:
        img = TF.resize(img.to(device), side, antialias=True)
        out.append(TF.center_crop(img, side))
    return torch.stack(out)
