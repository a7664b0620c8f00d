"""Data for training: the built-in `shapes` set, MNIST / Fashion-MNIST, CIFAR-10, an image folder, random.

Every data set yields (uint8 image tensor C x H x W or PIL image, label); the transforms (torchvision v2)
bring it to the model's input. Random augmentation is seeded per (seed, epoch, index), so a batch is the
same on every rank, with any number of loader workers, and after a resume.
"""
import hashlib
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from .errors import UsageError
from .idx import (  # noqa: F401  (data.py's names: where they live)
    IDX_FILES,
    TV_CLASS,
    TensorImages,
    _download,
    _find,
    _network_cause,
    _new_folders,
    _remove_empty,
    load_idx,
    load_idx_split,
    read_idx,
)
from .shapes import (  # noqa: F401  (data.py's names: where they live)
    SHAPES_CLASSES,
    Shapes,
    _u,
    render_shape,
    seed32,
)
from .spec import LAYERS, pad_end
from .transforms import (  # noqa: F401  (data.py's names: where they live)
    LIGHTING_PCA,
    PCA_C2_EIGVEC,
    PCA_C2_STDEV,
    PCA_EIGVAL,
    PCA_EIGVEC,
    PCA_MXNET_255,
    Lighting,
    TenCrop,
    _Stack,
    build_transforms,
)

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
    from .decode import decode_file
    from .prepare import Shards, is_shards  # launch/prepare.py --shards: read at the offsets
    try:
        train, val = (Shards(p) if is_shards(p) else torchvision.datasets.ImageFolder(p, loader=decode_file)
                      for p in parts)      # decode_file: PIL's pixels, faster (decode.py)
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
