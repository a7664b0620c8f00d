"""An ImageNet-format folder of real-photo crops at ImageNet's sizes, for the data bench where no ImageNet
is at hand: DST/train/<class>/*.jpg and DST/val/<class>/*.jpg.

    python benchmarks/photo_crops.py SRC [SRC ...] DST [--train 160] [--val 2] [--quality 90]

Each image is a 500 x 375 or 375 x 500 window (ImageNet's most common sizes) of one of the SRC photos
(files or folders of them, any size PIL reads), taken in turn: at native resolution from a random place,
or from the photo scaled down by up to 2x where it is larger than that, and mirrored at random; saved as
JPEG at --quality (ImageNet's files are mostly 75-96). Sources too small for both windows are skipped.
Seeded: the same arguments give the same files. docs/training.md records the sources it was run on.
"""
import argparse
import os
import random

from PIL import Image

SIZES = ((500, 375), (375, 500))     # (width, height)
CLASSES = ("a", "b")


def sources(paths):
    out = []
    for p in paths:
        names = sorted(os.path.join(p, n) for n in os.listdir(p)) if os.path.isdir(p) else [p]
        for n in names:
            with Image.open(n) as img:
                img = img.convert("RGB")
                if any(img.width >= w and img.height >= h for w, h in SIZES):
                    out.append((os.path.basename(n), img.copy()))
    return out


def crop(img, rng, k):
    fits = [s for s in SIZES if img.width >= s[0] and img.height >= s[1]]
    w, h = fits[k % len(fits)]
    most = min(2.0, img.width / w, img.height / h)
    scale = rng.uniform(1.0, most)
    if scale > 1.0:
        img = img.resize((round(img.width / scale), round(img.height / scale)), Image.BICUBIC)
    x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
    out = img.crop((x, y, x + w, y + h))
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="source photos or folders of them, then DST")
    p.add_argument("--train", type=int, default=160, help="images per class in train/")
    p.add_argument("--val", type=int, default=2, help="images per class in val/")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if len(a.paths) < 2:
        p.error("give at least one source and DST")
    *src, dst = a.paths
    photos = sources(src)
    if not photos:
        p.error("no source photo is at least 500 x 375 or 375 x 500")
    rng, k = random.Random(a.seed), 0
    for part, n in (("train", a.train), ("val", a.val)):
        for c in CLASSES:
            os.makedirs(os.path.join(dst, part, c), exist_ok=True)
            for i in range(n):
                _, img = photos[k % len(photos)]
                crop(img, rng, k // len(photos)).save(os.path.join(dst, part, c, f"{i}.jpg"), quality=a.quality)
                k += 1
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    print(f"{k} images from {len(photos)} photos ({', '.join(n for n, _ in photos)}) in {dst}: "
          f"mean {total / k / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
