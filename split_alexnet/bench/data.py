"""python launch/bench.py --data DIR: the data path timed stage by stage and whole, on an ImageNet-format
folder (DIR/train/<class>/*, or launch/prepare.py's output), side by side in one run.

Stages, each in this process with one thread (cores 1), over the same images (the median of 3 passes
after a warm-up pass):
  read            the file's bytes (torchvision.io.read_file)
  decode-pil      PIL open and convert to RGB, then to a tensor (ImageFolder's loader, and the trainer's before)
  decode-tv       decode.decode_file: PIL's header, torchvision.io.decode_jpeg (the trainer's loader)
  item-float      today's training item: PIL decode, resize, centre square, float, mean image, crop, flip, lighting
  item-uint8      the uint8 path's item (augment.Uint8Train) on decode_file: decode, resize, square, crop; the draws
  collate-float   default_collate of a batch of float items (per image)
  collate-uint8   the same of uint8 crops
  device-augment  augment.DeviceAugment on the batch (float, mean, flip, lighting) on --device
  decode-gpu      (CUDA only) decode_batch on the GPU: batched decode_jpeg, resize, square
Whole paths, DataLoader at --workers, batches onto --device, interleaved round by round:
  today           the float path as train.py ran it before (PIL's decoder; every stream decodes the whole batch)
  delivered       the uint8 path (loader.TrainLoader): uint8 workers, the float work on the device
  delivered-gpu-decode  (CUDA only) the same with --decode gpu
  torchvision-reference  ImageFolder, RandomResizedCrop(224), flip, ToTensor, Normalize: the peer

Rows: stage, images_per_s, cores (the processes the stage keeps busy: the workers and the main process,
at most the machine's), images_per_s_per_core; the whole paths also images_per_s_per_core_per_replica
with --streams S streams a replica: today every stream decodes every image (S x the cores for the same
images), delivered each decodes 1/S (share-decode), so per replica the delivered rate counts S times.
"""
import json
import os
import statistics
import time

import torch
from torch.utils.data import DataLoader, Subset, default_collate


def _rate(fn, n, repeats=1):
    """(median images/s over `repeats` timed passes of fn, after one untimed warm-up pass; the last
    pass's result). fn makes n images a pass."""
    out = fn()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates), out


def _paths(root, images):
    from split_alexnet.data import build_datasets
    train, _, _ = build_datasets("imagefolder", root, seed=0, download=False)
    return train, min(images, len(train))


def stage_rates(train, n, size, device, batch, repeats=3):
    """{stage: images/s} of the single-thread stages over the first n images (median of `repeats`
    passes after a warm-up pass), and how many of them decode-tv gives PIL's pixels for ("k/n")."""
    from PIL import Image
    from torchvision.io import read_file
    from torchvision.transforms.v2.functional import pil_to_tensor

    from split_alexnet.augment import build_uint8_path
    from split_alexnet.data import Seeded, build_paper_transforms, paper_side
    from split_alexnet.decode import decode_batch, decode_file
    side = paper_side(size)
    mean = torch.full((3, side, side), 120.0)                  # the same arithmetic as the real one
    aug = dict(crop=True, flip=True, lighting=0.1)
    old = Seeded(_pil(train), build_paper_transforms(size, 3, mean, train=True, **aug), 0)
    worker, augment = build_uint8_path(size, 3, "paper", mean_image=mean, **aug)
    new = Seeded(train, worker, 0)
    import torchvision
    files = [p for p, _ in train.samples[:n]] if isinstance(train, torchvision.datasets.ImageFolder) else None
    rates, same = {}, None

    def pil():
        out = []
        for f in files:
            with Image.open(f) as img:
                out.append(pil_to_tensor(img.convert("RGB")))
        return out
    if files:
        rates["read"], blobs = _rate(lambda: [read_file(f) for f in files], n, repeats)
        rates["decode-pil"], pils = _rate(pil, n, repeats)
        rates["decode-tv"], tvs = _rate(lambda: [decode_file(f) for f in files], n, repeats)
        same = f"{sum(torch.equal(a, b) for a, b in zip(pils, tvs))}/{n}"
        if torch.device(device).type == "cuda":
            def gpu():
                for k in range(0, n, batch):
                    decode_batch(blobs[k:k + batch], side, device)
                torch.cuda.synchronize()
            rates["decode-gpu"], _ = _rate(gpu, n, repeats)    # the warm-up pass warms nvjpeg
    rates["item-float"], floats = _rate(lambda: [old[(0, i)] for i in range(n)], n, repeats)
    rates["item-uint8"], uint8s = _rate(lambda: [new[(0, i)] for i in range(n)], n, repeats)
    k = min(batch, n)
    rates["collate-float"], _ = _rate(lambda: default_collate(floats[:k]), k, repeats)
    rates["collate-uint8"], _ = _rate(lambda: default_collate(uint8s[:k]), k, repeats)
    (crops, draws), _ = default_collate(uint8s[:k])
    crops, draws = crops.to(device), draws.to(device)

    def dev():
        for _ in range(5):
            augment(crops, draws)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    rates["device-augment"], _ = _rate(dev, 5 * k, repeats)
    return rates, same


class _PilShards(torch.utils.data.Dataset):
    """prepare.py's shards with their JPEG bytes decoded by PIL (then `transform`), as ImageFolder's
    own loader would decode the files."""

    def __init__(self, shards, transform=None):
        self.raw, self.transform = shards.encoded(), transform

    def __len__(self):
        return len(self.raw)

    def __getitem__(self, i):
        import io

        from PIL import Image
        data, label = self.raw[i]
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), label


def _pil(train, transform=None):
    """The same images read by PIL (ImageFolder's own loader), then `transform`: what the trainer read
    before, and what torchvision's reference reads."""
    import torchvision
    if isinstance(train, torchvision.datasets.ImageFolder):
        return torchvision.datasets.ImageFolder(train.root, transform=transform)
    return _PilShards(train, transform)


def _reference(train):
    """torchvision's reference ImageNet training loader on the same files."""
    from torchvision import transforms as T
    return _pil(train, T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                                  T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]))


def path_loaders(train, n, size, device, batch, workers, prefetch):
    """{stage: a function of the round that makes an iterator of batches on the device} of the whole
    paths, over the first n images (each round an epoch of them)."""
    from split_alexnet.augment import EncodedItem, build_uint8_path
    from split_alexnet.data import PCA_MXNET_255, Lighting, Seeded, build_paper_transforms, encoded, paper_side
    from split_alexnet.loader import TrainLoader
    side = paper_side(size)
    mean = torch.full((3, side, side), 120.0)
    aug = dict(crop=True, flip=True, lighting=0.1)
    device = torch.device(device)
    kw = dict(persistent_workers=True, prefetch_factor=prefetch) if workers else {}
    first = list(range(n))
    old = DataLoader(Seeded(Subset(_pil(train), first), build_paper_transforms(size, 3, mean, train=True, **aug), 0), batch_size=batch,
                     shuffle=True, drop_last=True, num_workers=workers, pin_memory=device.type == "cuda", **kw)
    worker, augment = build_uint8_path(size, 3, "paper", mean_image=mean, **aug)
    new = TrainLoader(Seeded(Subset(train, first), worker, 0), batch_size=batch, seed=0, device=device, augment=augment,
                      workers=workers, prefetch_factor=prefetch)
    ref = DataLoader(Subset(_reference(train), first), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                     pin_memory=device.type == "cuda", **kw)

    def moved(loader):
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    paths = {"today": lambda e: moved(old), "delivered": lambda e: new.epoch(e, 0),
             "torchvision-reference": lambda e: moved(ref)}
    if device.type == "cuda":
        enc = TrainLoader(Seeded(Subset(encoded(train), first), EncodedItem(side, size, crop=True, flip=True,
                                                             lighting=Lighting(0.1, eigval=PCA_MXNET_255)), 0),
                          batch_size=batch, seed=0, device=device, augment=augment, workers=workers,
                          prefetch_factor=prefetch, decode="gpu", side=side, size=size)
        paths["delivered-gpu-decode"] = lambda e: enc.epoch(e, 0)
    return paths


def time_paths(paths, batches, rounds, device):
    """{stage: [images/s per round]}: each round runs every path for `batches` batches after one warm-up
    batch, the paths in turn (interleaved: the machine's load falls on all alike)."""
    out = {name: [] for name in paths}
    for r in range(rounds):
        for name, make in paths.items():
            it = make(r)
            x, _ = next(it)                                    # warm-up: workers start, queues fill
            n, t = 0, time.perf_counter()
            for _ in range(batches):
                x, _ = next(it)
                n += len(x)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            out[name].append(n / (time.perf_counter() - t))
    return out


def run_data_bench(root, *, size=227, batch=64, workers=1, rounds=3, batches=4, images=256, streams=2,
                   device="cpu", prefetch=4):
    """The rows (see the module's doc) and the run's facts."""
    from split_alexnet.loader import cores
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    train, n = _paths(root, images)
    per = batch * (batches + 1)                                # a warm-up batch and the timed ones
    if n < per:
        from split_alexnet.cli import UsageError
        raise UsageError(f"--data {root}: {n} images for batches of {batch}: the whole paths need "
                         f"{batch * (batches + 1)} (a warm-up batch and {batches}); use a smaller --batch-size "
                         f"or more --data-images")
    machine = cores()
    rows = []
    stages, same = stage_rates(train, min(n, 64), size, device, batch)
    for stage, rate in stages.items():
        rows.append(dict(stage=stage, images_per_s=rate, cores=1, images_per_s_per_core=rate))
    paths = path_loaders(train, per, size, device, batch, workers, prefetch)
    timed = time_paths(paths, batches, rounds, device)
    used = min(machine, workers + 1) if workers else 1
    for stage, rates in timed.items():
        rate = statistics.median(rates)
        share = streams if stage.startswith("delivered") else 1
        rows.append(dict(stage=stage, images_per_s=rate, cores=used, images_per_s_per_core=rate / used,
                         images_per_s_per_core_per_replica=rate * share / (used * streams),
                         rounds=rates))
    by = {r["stage"]: r for r in rows}
    ratios = dict(
        delivered_over_today_per_core_per_replica=by["delivered"]["images_per_s_per_core_per_replica"] /
        by["today"]["images_per_s_per_core_per_replica"],
        delivered_over_reference_per_core=by["delivered"]["images_per_s_per_core"] /
        by["torchvision-reference"]["images_per_s_per_core"])
    return dict(root=os.path.abspath(root), images=n, image_size=size, batch_size=batch, workers=workers,
                streams=streams, device=str(device), machine_cores=machine, same_pixels=same, rounds=rounds, batches=batches,
                load_average_before=load_before, load_average_after=os.getloadavg(), rows=rows, ratios=ratios)


def format_rows(result):
    lines = [f"data path: {result['images']} images of {result['root']}, {result['image_size']} px, batch "
             f"{result['batch_size']}, --workers {result['workers']}, {result['streams']} streams a replica, "
             f"{result['device']}, {result['machine_cores']} cores",
             f"{'stage':<24}{'images/s':>10}{'cores':>7}{'/core':>9}{'/core/replica':>15}"]
    for r in result["rows"]:
        extra = f"{r['images_per_s_per_core_per_replica']:>15.1f}" if "images_per_s_per_core_per_replica" in r else ""
        lines.append(f"{r['stage']:<24}{r['images_per_s']:>10.1f}{r['cores']:>7}{r['images_per_s_per_core']:>9.1f}"
                     + extra)
    if result.get("same_pixels"):
        lines.append(f"decode-tv's pixels equal PIL's on {result['same_pixels']} images")
    q = result["ratios"]
    lines.append(f"delivered / today per core per replica: {q['delivered_over_today_per_core_per_replica']:.2f}x; "
                 f"delivered / torchvision's reference per core: {q['delivered_over_reference_per_core']:.2f}x")
    return "\n".join(lines)


def write_data(result, out_dir):
    """bench.json in out_dir with the result under the `data` key (the other keys kept)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench.json")
    whole = {}
    if os.path.isfile(path):
        with open(path) as f:
            whole = json.load(f)
    whole["data"] = result
    with open(path, "w") as f:
        json.dump(whole, f, indent=2)
    return path
