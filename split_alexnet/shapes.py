"""The built-in `shapes` data set: procedural, offline, drawn from (seed, index) alone."""
import hashlib
import math

import torch
from torch.utils.data import Dataset

# ---- shapes: a procedural, offline data set -------------------------------------------------------

SHAPES_CLASSES = ("disk", "ring", "square", "triangle", "plus", "star", "half-disk", "stripes",
                  "checker", "frame")


class Shapes(Dataset):
    """10 classes of shapes and textures at random position, scale, rotation and colour on noisy
    backgrounds, drawn on the fly. Image i of a split depends only on (seed, split, i)."""

    classes = SHAPES_CLASSES

    def __init__(self, size=20000, seed=0, split="train", native=112, transform=None):
        self.size, self.seed, self.native, self.transform = size, seed, native, transform
        self.split = split                         # train and val: disjoint streams of images

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(seed32("shapes", self.seed, self.split, i))
        label = int(torch.randint(len(self.classes), (), generator=g))
        img = render_shape(label, self.native, g)
        return (self.transform(img) if self.transform else img), label


def seed32(*key):
    """A seed from a key, the same in every process (torch's CPU generator keeps 32 bits of a seed)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=4).digest(), "little")


def _u(g, lo=0.0, hi=1.0, n=()):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def render_shape(label, n, g):
    """One n x n RGB uint8 image of class `label`, drawn with generator g."""
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    y, x = torch.meshgrid(t, t, indexing="ij")                          # (n, n) in [0, 1]
    radius = float(_u(g, 0.2, 0.42))                                    # of the image side
    cx, cy = (float(_u(g, radius, 1 - radius)) for _ in range(2))
    angle = float(_u(g, 0, 2 * math.pi))
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u = dx * math.cos(angle) + dy * math.sin(angle)                     # shape's own frame, unit radius
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    r, th = torch.sqrt(u * u + v * v), torch.atan2(v, u)
    box = torch.maximum(u.abs(), v.abs())
    name = SHAPES_CLASSES[label]
    if name == "disk":
        mask = r < 1
    elif name == "ring":
        mask = (r < 1) & (r > 0.6)
    elif name == "square":
        mask = box < 0.75
    elif name == "triangle":
        mask = torch.ones_like(u, dtype=torch.bool)
        for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):
            mask &= u * math.cos(a) + v * math.sin(a) < 0.5
    elif name == "plus":
        mask = ((u.abs() < 0.28) & (v.abs() < 0.95)) | ((v.abs() < 0.28) & (u.abs() < 0.95))
    elif name == "star":
        mask = r < 0.6 + 0.38 * torch.cos(5 * th)
    elif name == "half-disk":
        mask = (r < 1) & (v > 0)
    elif name == "stripes":
        mask = (box < 0.85) & (torch.sin(u * 3 * math.pi) > 0)
    elif name == "checker":
        mask = (box < 0.85) & (torch.sin(u * 2.5 * math.pi) * torch.sin(v * 2.5 * math.pi) > 0)
    else:  # frame
        mask = (box < 0.85) & (box > 0.5)
    bg = _u(g, n=3)
    fg = (bg + _u(g, 0.3, 0.7, 3)) % 1.0                                # differs from bg in every channel
    ramp_dir = float(_u(g, 0, 2 * math.pi))
    ramp = (x * math.cos(ramp_dir) + y * math.sin(ramp_dir)) * float(_u(g, -0.3, 0.3))
    img = torch.where(mask, fg[:, None, None], bg[:, None, None] + ramp)  # (3, n, n)
    img = img + 0.08 * torch.randn(3, n, n, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)
