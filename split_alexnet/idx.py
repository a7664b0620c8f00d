"""MNIST and Fashion-MNIST: the IDX files, found beside the data or downloaded (torchvision), read as uint8
tensors."""
import gzip
import math
import os

import torch
import torchvision
from torch.utils.data import Dataset

from .errors import UsageError

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
