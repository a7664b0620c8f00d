"""Prepare an ImageNet-format folder for training: every image's shorter side to 256 (the paper's, the
first step the trainer takes: its resize is then the identity), as a folder of the same layout or as
WebDataset-style tar shards; on all cores with a progress bar; interrupted, it resumes (the files and
shards already written are kept: each is written under a temporary name and renamed when whole).

  DST/train/<class>/<name>.jpg ...                    (the folder form: --dataset imagefolder reads it)
  DST/train/shard-000000.tar, shard-000000.json, ...   (--shards N: N images a shard, <key>.jpg + <key>.cls)
  DST/train/index.json                                 (shards: the classes and every image's offset)

The resize is torchvision's (bilinear, antialiased, on uint8: the trainer's own), the JPEG quality 95.
"""
import io
import json
import os
import sys
import tarfile
from multiprocessing import Pool

import torch
import torchvision
from torchvision.transforms.v2 import functional as TF

from .decode import decode_bytes, decode_file
from .errors import UsageError
from .loader import cores

PARTS = ("train", "val")


def resized_jpeg(path, side, quality):
    """The image at `path`, RGB, shorter side to `side`, as JPEG bytes."""
    x = TF.resize(decode_file(path), side, antialias=True)
    return torchvision.io.encode_jpeg(x, quality=quality).numpy().tobytes()


def _write(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _folder_task(task):
    """Resize one chunk of (source, destination) pairs; returns (images done, failures)."""
    pairs, side, quality = task
    bad = []
    for src, dst in pairs:
        try:
            _write(dst, resized_jpeg(src, side, quality))
        except (OSError, ValueError, SyntaxError) as e:    # PIL: truncated, unidentified
            bad.append(f"{src} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return len(pairs), bad


def _shard_task(task):
    """Write one shard (tar of <key>.jpg and <key>.cls) and its sidecar of offsets."""
    path, samples, side, quality = task
    rows, bad, tmp = [], [], f"{path}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, src, label in samples:
            try:
                data = resized_jpeg(src, side, quality)
            except (OSError, ValueError, SyntaxError) as e:
                bad.append(f"{src} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
                continue
            for name, blob in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    with tarfile.open(tmp) as tar:                     # where each image's bytes lie
        members = {m.name: m for m in tar.getmembers()}
    for key, _, label in samples:
        m = members.get(f"{key}.jpg")
        if m is not None:
            rows.append([key, m.offset_data, m.size, label])
    os.replace(tmp, path)
    _write(path[:-4] + ".json", json.dumps(rows).encode())   # the shard counts as done once this exists
    return len(samples), bad


def _remove_temps(folder):
    for here, _, files in os.walk(folder):
        for f in files:
            if ".tmp" in f:
                os.remove(os.path.join(here, f))


def prepare(src, dst, *, side=256, shards=0, workers=0, quality=95, bar=True):
    """Prepare src/{train,val} into dst (see the module's doc). Returns {part: images}. Resumable."""
    from tqdm import tqdm
    workers = workers or cores()
    done = {}
    for part in PARTS:
        root = os.path.join(src, part)
        if not os.path.isdir(root):
            raise UsageError(f"prepare: {os.path.abspath(root)} is not a directory: lay the images out as "
                             f"{os.path.abspath(src)}/train/<class>/* and .../val/<class>/*")
        try:
            found = torchvision.datasets.ImageFolder(root)
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f"prepare: {str(e).splitlines()[0]}") from None
        out = os.path.join(dst, part)
        os.makedirs(out, exist_ok=True)
        _remove_temps(out)                             # an interrupted run's half-written files
        if shards:
            tasks = []
            for k in range(0, len(found.samples), shards):
                path = os.path.join(out, f"shard-{k // shards:06d}.tar")
                chunk = [(f"{i:09d}", p, label) for i, (p, label) in enumerate(found.samples[k:k + shards], k)]
                if not os.path.isfile(path[:-4] + ".json"):
                    tasks.append((path, chunk, side, quality))
            fn, left = _shard_task, sum(len(t[1]) for t in tasks)
        else:
            pairs = []
            for p, _ in found.samples:
                rel = os.path.relpath(p, root)
                target = os.path.join(out, os.path.splitext(rel)[0] + ".jpg")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                if not os.path.isfile(target):
                    pairs.append((p, target))
            tasks = [(pairs[k:k + 64], side, quality) for k in range(0, len(pairs), 64)]
            fn, left = _folder_task, len(pairs)
        total = len(found.samples)
        bad = []
        with tqdm(total=total, initial=total - left, desc=f"prepare {part}", disable=not bar, file=sys.stderr,
                  mininterval=1.0 if sys.stderr.isatty() else 30.0) as progress:
            if workers > 1 and len(tasks) > 1:
                with Pool(workers) as pool:
                    for n, b in pool.imap_unordered(fn, tasks):
                        progress.update(n)
                        bad += b
            else:
                for task in tasks:
                    n, b = fn(task)
                    progress.update(n)
                    bad += b
        for line in bad:
            print(f"warning: skipped {line}, which cannot be decoded", file=sys.stderr, flush=True)
        if shards:
            index = dict(classes=found.classes, side=side, shards=[])
            for k in range(0, len(found.samples), shards):
                name = f"shard-{k // shards:06d}"
                with open(os.path.join(out, name + ".json")) as f:
                    index["shards"].append(dict(file=name + ".tar", samples=json.load(f)))
            _write(os.path.join(out, "index.json"), json.dumps(index).encode())
        done[part] = total
    return done


class Shards(torch.utils.data.Dataset):
    """The shards of one part written by prepare (index.json): (uint8 image, label) like the folders, read
    at each image's offset (no tar walk). encoded(): the same with the JPEG bytes (--decode gpu)."""

    def __init__(self, root, raw=False):
        with open(os.path.join(root, "index.json")) as f:
            index = json.load(f)
        self.root, self.raw, self.classes = root, raw, index["classes"]
        self.items = [(s["file"], off, size, label) for s in index["shards"] for _, off, size, label in s["samples"]]
        self.samples = [(f"{os.path.join(root, f)}@{off}", label) for f, off, _, label in self.items]
        self.targets = [label for *_, label in self.items]
        self._files = {}

    def __len__(self):
        return len(self.items)

    def encoded(self):
        return Shards(self.root, raw=True)

    def _bytes(self, i):
        name, off, size, _ = self.items[i]
        key = (os.getpid(), name)                     # one handle per worker process
        if key not in self._files:
            self._files[key] = open(os.path.join(self.root, name), "rb")
        f = self._files[key]
        f.seek(off)
        return f.read(size)

    def __getitem__(self, i):
        data, label = self._bytes(i), self.items[i][3]
        if self.raw:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label
        return decode_bytes(data), label

    def __getstate__(self):                           # open files do not travel to the workers
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


def is_shards(root):
    return os.path.isfile(os.path.join(root, "index.json"))
