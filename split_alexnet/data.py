"""Data for training: the built-in `shapes` set, MNIST / Fashion-MNIST, CIFAR-10, an image folder, random.

Every data set yields (uint8 image tensor C x H x W or PIL image, label); the transforms (torchvision v2)
bring it to the model's input. Random augmentation is seeded per (seed, epoch, index), so a batch is the
same on every rank, with any number of loader workers, and after a resume.
"""
import gzip
import hashlib
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from .cli import UsageError
from .spec import LAYERS, pad_end

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


# ---- MNIST and Fashion-MNIST: the IDX files ----------------------------------------------------

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
TV_CLASS = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}


def _find(data_dir, name, tv_class):
    for folder in (data_dir, os.path.join(data_dir, tv_class.__name__, "raw")):
        for fname in (name, name + ".gz"):
            path = os.path.join(folder, fname)
            if os.path.isfile(path):
                return path
    return None


def read_idx(path):
    """An IDX file (plain or .gz) as a uint8 tensor. torchvision's reader (datasets.mnist.read_image_file)
    takes only uncompressed files under <root>/<Class>/raw; this reads the .gz files where they lie."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if data[2] != 0x08 or len(data) != 4 + 4 * ndim + math.prod(shape):
        raise UsageError(f"{path} is not a complete uint8 IDX file ({len(data)} bytes for shape {shape}): "
                         f"replace it with the original file")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * ndim).view(*shape)


def _new_folders(*paths):
    """The folders among paths and their parents that do not exist yet (what a download would create)."""
    new = []
    for path in paths:
        path = os.path.abspath(path)
        while path and not os.path.exists(path) and path not in new:
            new.append(path)
            path = os.path.dirname(path)
    return new


def _remove_empty(folders):
    """Remove those of `folders` that are empty, deepest first: a failed download leaves nothing behind."""
    for path in sorted(folders, key=len, reverse=True):
        try:
            os.rmdir(path)                     # only if empty: a file the attempt did fetch stays
        except OSError:
            pass


def _network_cause(e):
    """The network error behind a failed torchvision download, as a short phrase, else None. torchvision
    catches the URLError per mirror and raises a RuntimeError quoting it ('<urlopen error ...>')."""
    import re
    import socket
    from urllib.error import URLError
    seen = e
    while seen is not None:
        if isinstance(seen, URLError):
            return str(seen.reason)
        if isinstance(seen, (socket.gaierror, socket.timeout, ConnectionError)):
            return str(seen) or type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"<urlopen error (.*?)>", str(e))
    return found.group(1) if found else None


def _download(tv_class, data_dir, train):
    """torchvision's download of the data set (train or test part); returns why it failed, or None.
    Folders it created are removed again when it fails (empty ones: nothing fetched stays lost)."""
    created = _new_folders(os.path.join(data_dir, tv_class.__name__, "raw"))
    try:
        tv_class(data_dir, train=train, download=True)
        return None
    except Exception as e:
        _remove_empty(created)
        cause = _network_cause(e)
        if cause is not None:
            return f"the download failed for lack of network ({cause})"
        return f"the download failed ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"


def load_idx(dataset, data_dir, parts, download):
    """{part: (images (N, 28, 28) uint8, labels (N,) int64)} of the 'train' and/or 'test' files. Every file
    the parts need is looked for before any is read, so a missing set is named whole in one message."""
    tv_class = TV_CLASS[dataset]
    names = [n for part in parts for n in IDX_FILES[part]]
    paths = [_find(data_dir, n, tv_class) for n in names]
    why = "downloads are off (--no-download)"
    if None in paths and download:
        why = _download(tv_class, data_dir, train="train" in parts)
        paths = [_find(data_dir, n, tv_class) for n in names]
    if None in paths:
        missing = ", ".join(f"{n}.gz" for n, p in zip(names, paths) if p is None)
        raise UsageError(f"{dataset}: {missing} not found in {os.path.abspath(data_dir)} (nor in its "
                         f"{tv_class.__name__}/raw) and {why}: place those files there"
                         + (", or use --split-test N if only the t10k files are at hand" if "train" in parts else ""))
    out = {}
    for part in parts:
        image_path, label_path = (p for n, p in zip(names, paths) if n in IDX_FILES[part])
        images, labels = read_idx(image_path), read_idx(label_path)
        if len(images) != len(labels):
            raise UsageError(f"{dataset}: {image_path} holds {len(images)} images but {label_path} {len(labels)} "
                             f"labels: replace them with the original files")
        out[part] = images, labels.long()
    return out


def load_idx_split(dataset, data_dir, part, download):
    """(images (N, 28, 28) uint8, labels (N,) int64) of the 'train' or 'test' files."""
    return load_idx(dataset, data_dir, [part], download)[part]


class TensorImages(Dataset):
    """Grey images held in memory (N, H, W) uint8, yielded as (1, H, W) tensors."""

    def __init__(self, images, labels, classes, transform=None):
        self.images, self.labels, self.classes, self.transform = images, labels, classes, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i][None]
        return (self.transform(img) if self.transform else img), int(self.labels[i])


# ---- transforms ------------------------------------------------------------------------------------

# PCA of ImageNet RGB pixels in [0, 1] as fb.resnet.torch prints it (datasets/imagenet.lua, "pca"): the
# eigenvalues of the pixels' covariance and its eigenvectors. The shift eigvec @ (alpha * eigval) is added
# to [0, 1] pixels (the paper's formula, §4.1, with these eigenvalues).
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                           [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])  # columns are the eigenvectors
# --lighting-pca mxnet on 0-255 pixels: MXNet's image.CreateAugmenter pca_noise ("for an image with range
# [0, 255]") multiplies those eigenvalues by 255 (55.46, 4.794, 1.148): the same shift relative to the
# pixel range. They are not the eigenvalues of 0-255 pixels (255^2 times), nor standard deviations.
PCA_MXNET_255 = PCA_EIGVAL * 255
# --lighting-pca cuda-convnet2: make-data/input_meta's 'color_pca' (standard deviations along its
# eigenvectors, 0-255 pixels; the eigenvectors are the columns), read by convdata.py's ImageNetDP
# (color_stdevs, color_eig). ColorNoiseMakerThread draws randn(3) * stdevs @ eigvecs.T, times the
# --color-noise coefficient (a command-line value, convnet.py; the paper's sigma is 0.1), and
# add_color_noise then rescales the data by 1 / (1 + coefficient).
PCA_C2_STDEV = torch.tensor([19.72083305, 37.09388853, 121.78006099])
PCA_C2_EIGVEC = torch.tensor([[0.41795513, -0.71257945, -0.56351045],
                              [-0.81698062, -0.02354167, -0.5761844],
                              [0.39731118, 0.70119634, -0.59200296]])


class Lighting(v2.Transform):
    """The paper's PCA colour augmentation (§4.1), the one transform torchvision lacks: add
    eigvec @ (alpha * eigval) to every pixel of a float RGB image, alpha ~ N(0, sigma) per image.
    rescale (cuda-convnet2's add_color_noise): then multiply the image by 1 / (1 + sigma)."""

    def __init__(self, sigma=0.1, eigval=PCA_EIGVAL, eigvec=PCA_EIGVEC, rescale=False):
        super().__init__()
        self.sigma, self.eigval, self.eigvec, self.rescale = sigma, eigval, eigvec, rescale

    def make_params(self, flat_inputs):
        return dict(alpha=torch.randn(3) * self.sigma)

    def shift(self, params):
        """The RGB shift (3,) of one image's draw: added to every pixel."""
        return self.eigvec @ (params["alpha"] * self.eigval)

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor) or not inpt.is_floating_point() or inpt.shape[-3] != 3:
            return inpt
        out = inpt + self.shift(params)[:, None, None].to(inpt.dtype)
        return out * (1.0 / (1.0 + self.sigma)) if self.rescale else out


LIGHTING_PCA = {   # --lighting-pca on 0-255 pixels: (eigenvalue-like scale, eigenvectors, rescale)
    "mxnet": (PCA_MXNET_255, PCA_EIGVEC, False),
    "cuda-convnet2": (PCA_C2_STDEV, PCA_C2_EIGVEC, True),
}


class TenCrop(v2.Transform):
    """The ten test patches of §4.1: the four corner patches and the centre patch, and the horizontal
    reflection of each. torchvision's TenCrop crops its five from the mirrored image instead, which
    puts the mirrored centre patch 1 px off when the margin is odd (256 -> 227: columns 15..241, not
    the mirror of 14..240); here each patch is mirrored itself."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, img):
        five = v2.functional.five_crop(img, [self.size, self.size])
        return tuple(five) + tuple(v2.functional.horizontal_flip(c) for c in five)


def build_transforms(image_size, in_channels, mean, std, *, train, crop, flip, lighting, ten_crop=False):
    """crop: resize to image_size * 256/224 and take a random (train) or centre crop, as the paper
    does from 256 to 224; otherwise resize to image_size. ten_crop: evaluation on the 4 corners,
    the centre and their mirrors (stacked: (10, C, H, W))."""
    # the larger square only where a crop is cut from it: training with crop, evaluation with crop or
    # ten-crop (training without crop resizes to image_size, whatever the evaluation does)
    big = round(image_size * 256 / 224) if crop or (ten_crop and not train) else image_size
    t = [v2.ToImage(), v2.Resize((big, big), antialias=True)]
    if train:
        if crop:
            t.append(v2.RandomCrop(image_size))
        if flip:
            t.append(v2.RandomHorizontalFlip())
    elif crop and not ten_crop:
        t.append(v2.CenterCrop(image_size))
    t.append(v2.ToDtype(torch.float32, scale=True))
    if train and lighting > 0 and in_channels == 3:
        t.append(Lighting(lighting))
    t.append(v2.Normalize(mean, std))
    if ten_crop and not train:
        return _Stack(v2.Compose(t + [TenCrop(image_size)]))
    return v2.Compose(t)


# ---- the paper's input (§2): shorter side to 256, the central 256x256, minus the mean image, 0-255 ----

def paper_side(image_size):
    """The square the paper's crops are cut from: 256 for 227-px crops (Caffe's crop_size 227 from its
    256x256 images) and for 224-px crops (the paper's, §4.1: 224 acts as 227 here, see
    spec.pad_end), scaled with the input the net sees: 67 px -> 76."""
    first = LAYERS[0]
    seen = image_size + pad_end(image_size, first.kernel, first.stride, first.pad)
    return round(seen * 256 / 227)


def _paper_base(side):
    """Shorter side to `side` (aspect ratio kept), the central side x side, float on the 0-255 scale."""
    return [v2.ToImage(), v2.Resize(side, antialias=True), v2.CenterCrop(side), v2.ToDtype(torch.float32)]


class SubtractMean(v2.Transform):
    """Subtract a mean image of the input's shape. --subtract-mean caffe: the whole (C, side, side) mean
    before any crop or flip, i.e. each pixel's own position's mean (Caffe, data_transformer.cpp: it
    subtracts mean[h_off + h, w_off + w] at the crop's source position, then mirrors). cuda-convnet2:
    its central (C, size, size) crop after the crop and flip, for every crop and flip (convdata.py:
    data_mean_crop, the mean's central inner_size patch, subtracted in get_next_batch)."""

    def __init__(self, mean):
        super().__init__()
        self.mean = mean

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor) or not inpt.is_floating_point():
            return inpt
        return inpt - self.mean.to(inpt.dtype)


def build_paper_transforms(image_size, in_channels, mean_image, *, train, crop, flip, lighting, ten_crop=False,
                           subtract_mean="caffe", lighting_pca="mxnet"):
    """--preprocess paper: raw pixels (0-255) minus the training set's mean image, no std division.
    Training: a random (crop) or the centre image_size crop of the paper_side square, mirrored at random
    (flip), PCA lighting (LIGHTING_PCA[lighting_pca]). Evaluation: the centre crop, or the ten crops
    stacked: (10, C, H, W). subtract_mean: "caffe" (the mean at each pixel's own position, before crop
    and flip) or "cuda-convnet2" (the mean image's central crop, after them): see SubtractMean."""
    if subtract_mean not in ("caffe", "cuda-convnet2"):
        raise ValueError(f"subtract_mean {subtract_mean!r}: use caffe or cuda-convnet2")
    side = paper_side(image_size)
    t = _paper_base(side)
    if subtract_mean == "caffe":
        t.append(SubtractMean(mean_image))
    after = [SubtractMean(v2.functional.center_crop(mean_image, [image_size, image_size]))] \
        if subtract_mean == "cuda-convnet2" else []
    if train:
        t.append(v2.RandomCrop(image_size) if crop else v2.CenterCrop(image_size))
        if flip:
            t.append(v2.RandomHorizontalFlip())
        t += after
        if lighting > 0 and in_channels == 3:
            eigval, eigvec, rescale = LIGHTING_PCA[lighting_pca]
            t.append(Lighting(lighting, eigval=eigval, eigvec=eigvec, rescale=rescale))
        return v2.Compose(t)
    if ten_crop:
        return _Stack(v2.Compose(t + [TenCrop(image_size)]), minus=after[0].mean if after else None)
    return v2.Compose(t + [v2.CenterCrop(image_size)] + after)


@torch.no_grad()
def mean_image(train_set, side):
    """The mean over the training set of its images after _paper_base: (C, side, side), float32, 0-255."""
    base = v2.Compose(_paper_base(side))
    total, n = None, 0
    for i in range(len(train_set)):
        img = base(train_set[i][0]).double()
        total = img if total is None else total + img
        n += 1
    return (total / n).float()


def fingerprint(ds):
    """A short digest of what a raw data set holds, in order: its files (relative paths and labels) for an
    image folder, its labels and image shape for images in memory, else its kind, size and seed. Saved in
    checkpoints (a resume into other data is refused) and in the mean image's cache name."""
    h = hashlib.sha256(f"{type(ds).__name__} {len(ds)}".encode())
    samples = getattr(ds, "samples", None)
    if samples is not None:                        # ImageFolder: the file list, relative to its root
        root = getattr(ds, "root", "")
        for path, label in samples:
            h.update(f"{os.path.relpath(path, root)}\0{label}\n".encode())
    elif isinstance(ds, TensorImages):
        h.update(str(tuple(ds.images.shape)).encode())
        h.update(torch.as_tensor(ds.labels).to(torch.int64).numpy().tobytes())
    else:
        h.update(f" seed {getattr(ds, 'seed', getattr(ds, 'random_offset', None))}".encode())
    return h.hexdigest()[:16]


def mean_image_path(name, data_dir, side, split_test=0, train_len=0, key=""):
    """Where the mean image of data set `name` at `side` px is cached: beside the data set's files. `key`
    (mean_image_key): the file list, the count and the options that change the mean, so that other data
    or other options never read a stale cache."""
    part = f"-first{train_len}" if split_test else ""   # --split-test: the training part of the test files
    return os.path.join(data_dir, f"{name}-mean-{side}{part}{f'-{key}' if key else ''}.pt")


def mean_image_key(train_raw, bad_images):
    """The cache key of a mean image: the training set's fingerprint (files and count) and --bad-images
    (skip replaces an undecodable image by the next one)."""
    return hashlib.sha256(f"{fingerprint(train_raw)} {len(train_raw)} {bad_images}".encode()).hexdigest()[:12]


def _sources(data_dir):
    """What the cache must be newer than: the entries directly in data_dir but the caches themselves."""
    return [os.path.join(data_dir, e) for e in os.listdir(data_dir) if "-mean-" not in e]


def cached_mean_image(path, train_set, side, channels):
    """The mean image from `path` if it is there (refused with one line when it has another shape or is
    older than the data), else computed from train_set and saved there as a plain tensor (in memory only
    when the folder cannot be written). Returns (mean, what happened)."""
    want = (channels, side, side)
    if os.path.isfile(path):
        try:
            mean = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"mean image {path} cannot be read ({type(e).__name__}): delete it and it is "
                             f"computed again") from None
        if not isinstance(mean, torch.Tensor) or tuple(mean.shape) != want:
            shape = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
            raise UsageError(f"mean image {path} has shape {shape}, this run needs {want}: it belongs to "
                             f"other data or another --image-size; delete it and it is computed again")
        newer = [s for s in _sources(os.path.dirname(path) or ".") if os.path.getmtime(s) > os.path.getmtime(path)]
        if newer:
            raise UsageError(f"mean image {path} is older than {newer[0]}: the data changed after it was "
                             f"computed; delete it and it is computed again")
        return mean, f"read {path}"
    mean = mean_image(train_set, side)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(mean.clone(), tmp)
        os.replace(tmp, path)
        return mean, f"computed from {len(train_set)} training images, saved to {path}"
    except OSError:
        return mean, f"computed from {len(train_set)} training images (in memory: {os.path.dirname(path)} " \
                     f"cannot be written)"


class _Stack:
    """Ten crops as one (10, C, H, W) tensor (minus `minus`, a (C, H, W) mean crop, if given)."""

    def __init__(self, transform, minus=None):
        self.transform, self.minus = transform, minus

    def __call__(self, img):
        out = torch.stack([torch.as_tensor(c) for c in self.transform(img)])
        return out if self.minus is None else out - self.minus.to(out.dtype)


# ---- the same batches on every rank ----------------------------------------------------------------

class Seeded(Dataset):
    """Wraps a data set so that item (epoch, i) is transformed under its own seed: random crops,
    flips and lighting depend only on (seed, epoch, i), not on which process or worker draws them."""

    bad_images = "stop"   # an image that fails to decode: "stop" (UsageError naming it) or "skip"

    def __init__(self, dataset, transform, seed):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self):
        return len(self.dataset)

    def _read(self, i):
        """Item i; an undecodable file stops the run naming it, or (skip) is replaced by the next item
        that decodes, the same on every rank."""
        for j in range(i, i + len(self.dataset)):
            k = j % len(self.dataset)
            try:
                return self.dataset[k]
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:   # PIL: truncated,
                samples = getattr(self.dataset, "samples", None)                        # unidentified, broken,
                name = samples[k][0] if samples else f"item {k}"                        # or too many pixels
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                if isinstance(e, Image.DecompressionBombError):
                    why = (f"more than PIL's limit of {2 * Image.MAX_IMAGE_PIXELS} pixels, its guard against "
                           f"decompression bombs: {why}")
                if self.bad_images == "stop":
                    raise UsageError(f"cannot decode {name} ({why}): replace or remove it, or pass "
                                     f"--bad-images skip") from None
                _warn_once(f"warning: skipped {name}, which cannot be decoded ({why})")
        raise UsageError("no image of the data set can be decoded")

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        img, label = self._read(i)
        gen = torch.default_generator              # the transforms draw from it: seed it, then restore
        saved = gen.get_state()                    # (torch.random.fork_rng costs ~2 ms a call)
        try:
            gen.manual_seed(seed32("augment", self.seed, epoch, i))
            return self.transform(img), label
        finally:
            gen.set_state(saved)


_warned = set()


def _warn_once(line):
    if line not in _warned:
        _warned.add(line)
        import sys
        print(line, file=sys.stderr, flush=True)


class EpochSampler(Sampler):
    """A permutation drawn from (seed, epoch) alone, starting at item `start`: every rank that uses
    the same seed walks the same order, and a resumed run picks up where the saved one stopped."""

    def __init__(self, n, seed, epoch, start=0, shuffle=True):
        self.n, self.seed, self.epoch, self.start, self.shuffle = n, seed, epoch, start, shuffle

    def order(self):
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(seed32("order", self.seed,
                                                                                     self.epoch)))

    def __iter__(self):
        for i in self.order()[self.start:].tolist():
            yield (self.epoch, i)

    def __len__(self):
        return self.n - self.start


# ---- the data sets: one record each --------------------------------------------------------------

def _shapes(data_dir, *, seed, download, split_test, train_size, val_size):
    return Shapes(train_size or 12800, seed, "train"), Shapes(val_size or 1000, seed, "val"), SHAPES_CLASSES


def _idx(name, data_dir, *, seed, download, split_test, train_size, val_size):
    classes = TV_CLASS[name].classes
    if split_test:
        images, labels = load_idx_split(name, data_dir, "test", download)
        if not 0 < split_test < len(labels):
            raise UsageError(f"--split-test {split_test}: the test files hold {len(labels)} images; "
                             f"hold out between 1 and {len(labels) - 1}")
        cut = len(labels) - split_test
        return (TensorImages(images[:cut], labels[:cut], classes),
                TensorImages(images[cut:], labels[cut:], classes), classes)
    found = load_idx(name, data_dir, ["train", "test"], download)   # all four files, named together
    return TensorImages(*found["train"], classes), TensorImages(*found["test"], classes), classes


def _cifar10(data_dir, *, seed, download, split_test, train_size, val_size):
    created = _new_folders(data_dir) if download else []
    try:
        train = torchvision.datasets.CIFAR10(data_dir, train=True, download=download)
        val = torchvision.datasets.CIFAR10(data_dir, train=False, download=False)
    except Exception as e:
        _remove_empty(created)
        cause = _network_cause(e)
        why = (f"the download failed for lack of network ({cause})" if cause else
               "could not be downloaded" if download else "downloads are off (--no-download)")
        raise UsageError(f"cifar10: cifar-10-batches-py/ not found in {os.path.abspath(data_dir)} and "
                         f"{why}: place cifar-10-python.tar.gz (extracted) there") from None
    return train, val, train.classes


def _imagefolder(data_dir, *, seed, download, split_test, train_size, val_size):
    parts = [os.path.join(data_dir, p) for p in ("train", "val")]
    for p in parts:
        if not os.path.isdir(p):
            raise UsageError(f"imagefolder: {os.path.abspath(p)} is not a directory: lay the images out "
                             f"as {os.path.abspath(data_dir)}/train/<class>/* and .../val/<class>/*")
    from .prepare import Shards, is_shards  # launch/prepare.py --shards: read at the offsets
    try:
        train, val = (Shards(p) if is_shards(p) else torchvision.datasets.ImageFolder(p) for p in parts)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"imagefolder: {str(e).splitlines()[0]}") from None
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UsageError(f"imagefolder: train/ and val/ have different classes: only in train/: "
                         f"{', '.join(only_train) or '-'}; only in val/: {', '.join(only_val) or '-'}: "
                         f"give both the same class folders")
    return train, val, train.classes


def encoded(train_set):
    """The same data set with the files' bytes as images (1-D uint8, torchvision.io.read_file): for
    decoding on the device (--decode gpu)."""
    if isinstance(train_set, torchvision.datasets.ImageFolder):
        return torchvision.datasets.ImageFolder(train_set.root, loader=torchvision.io.read_file)
    if hasattr(train_set, "encoded"):
        return train_set.encoded()
    raise UsageError("--decode gpu reads image files: use it with --dataset imagefolder")


def _random(data_dir, *, seed, download, split_test, train_size, val_size):
    size = 227
    train = torchvision.datasets.FakeData(train_size or 2560, (3, size, size), 10, random_offset=seed)
    val = torchvision.datasets.FakeData(val_size or 256, (3, size, size), 10, random_offset=seed + 10**6)
    return train, val, [str(i) for i in range(10)]


@dataclass(frozen=True)
class DataSet:
    """Everything the training needs to know about one data set."""
    name: str
    channels: int
    mean: tuple          # per channel, of pixels in [0, 1]
    std: tuple
    defaults: dict       # training flags' defaults for this set, over the recipe's (a flag overrides both)
    load: Callable       # (data_dir, *, seed, download, split_test, train_size, val_size) -> (train, val, classes)
    files: bool = True   # read from --data-dir: its mean image is cached there; generated sets (shapes,
    #                      random) compute theirs in memory at every start
    recipe: str = "paper-caffe"  # --recipe's default for this set


# The shapes demo is sized for a 2-core CPU (67 px, 600 steps of 64), with the paper's lr per image
# (0.01 per 128 -> 0.005 per 64; at 0.01 its loss fell and then jumped back to chance, twice in 200
# steps); the other sets are resized to the model's input.
_RESIZED = dict(image_size=227)
DATASETS = {d.name: d for d in (
    DataSet("shapes", 3, (0.5, 0.5, 0.5), (0.3, 0.3, 0.3),
            dict(image_size=67, epochs=3, batch_size=64, lr=0.005), _shapes, files=False, recipe="paper-he-std"),
    DataSet("mnist", 1, (0.1307,), (0.3081,), _RESIZED, partial(_idx, "mnist")),
    DataSet("fashion-mnist", 1, (0.2860,), (0.3530,), _RESIZED, partial(_idx, "fashion-mnist")),
    DataSet("cifar10", 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), _RESIZED, _cifar10),
    DataSet("imagefolder", 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), _RESIZED, _imagefolder),
    DataSet("random", 3, (0.5, 0.5, 0.5), (0.29, 0.29, 0.29), _RESIZED, _random, files=False),
)}


def dataset(name):
    """The record of data set `name`."""
    if name not in DATASETS:
        raise UsageError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}")
    return DATASETS[name]


def build_datasets(name, data_dir, *, seed, download=True, split_test=0, train_size=None, val_size=None):
    """(train, val, classes) raw data sets: items are (image, label) before any transform."""
    return dataset(name).load(data_dir, seed=seed, download=download, split_test=split_test,
                              train_size=train_size, val_size=val_size)
