"""The uint8 data path (augment.py, loader.py, meanimage.py, prepare.py) on a folder of JPEG photos.

The photos are drawn here: smooth random colour fields (bicubic from 12 x 16 random colours) with
fine noise, 500 x 375 or 375 x 500 (ImageNet's typical sizes), saved as JPEG at quality 90.

Error model: the uint8 path makes the float path's draws and runs the float path's elementwise
operations in its order on the same values (augment.py), so its batches are equal bit for bit; the mean
image's sums are of integers (exact in int64 in any order), so the parallel mean is equal bit for bit;
splitting the decode among the streams moves the same uint8 bytes, so the training is equal bit for bit.
Only --decode gpu compares two decoders (torchvision's libjpeg-turbo against PIL's), with a stated bound.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from split_alexnet.augment import DeviceAugment, build_uint8_path, gather_rows, stream_rows
from split_alexnet.cli import UsageError
from split_alexnet.data import (
    Seeded,
    build_datasets,
    build_paper_transforms,
    build_transforms,
    mean_image,
    paper_side,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo(seed, h=375, w=500):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=g), (h, w), mode="bicubic")[0]
    x = (x + 0.08 * torch.randn(3, h, w, generator=g)).clamp(0, 1)
    from PIL import Image
    return Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())


def jpeg_folder(root, train=8, val=2, classes=("a", "b")):
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg, drawn by photo()."""
    k = 0
    for part, n in (("train", train), ("val", val)):
        for c in classes:
            os.makedirs(os.path.join(root, part, c), exist_ok=True)
            for i in range(n):
                h, w = (375, 500) if k % 3 else (500, 375)
                photo(k, h, w).save(os.path.join(root, part, c, f"{i}.jpg"), quality=90)
                k += 1
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return jpeg_folder(str(tmp_path_factory.mktemp("photos")))


def _batch(ds, epoch, n):
    return [ds[(epoch, i)][0] for i in range(n)]


@pytest.mark.parametrize("preprocess", ["paper", "channel"])
@pytest.mark.parametrize("crop,flip,lighting", [(True, True, 0.1), (False, False, 0.0), (True, False, 0.1)])
def test_uint8_path_equals_the_float_path(folder, preprocess, crop, flip, lighting):
    train, _, _ = build_datasets("imagefolder", folder, seed=0)
    mean = torch.rand(3, paper_side(67), paper_side(67)) * 255
    aug = dict(crop=crop, flip=flip, lighting=lighting)
    std = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    old = (build_paper_transforms(67, 3, mean, train=True, **aug) if preprocess == "paper" else
           build_transforms(67, 3, std["mean"], std["std"], train=True, **aug))
    worker, device = build_uint8_path(67, 3, preprocess, mean_image=mean, **std, **aug)
    items = _batch(Seeded(train, worker, seed=3), 2, len(train))
    crops, draws = torch.stack([c for c, _ in items]), torch.stack([d for _, d in items])
    assert crops.dtype == torch.uint8 and crops.shape == (len(train), 3, 67, 67)
    want = torch.stack(_batch(Seeded(train, old, seed=3), 2, len(train)))
    assert torch.equal(device(crops, draws), want)            # bit for bit
    if flip:
        assert 0 < draws[:, 2].sum() < len(train)             # some mirrored, some not: the draws matter


def test_mean_at_centre_is_cuda_convnet2s(folder):
    """mean_at="centre": the mean image's central crop, subtracted after crop and mirror."""
    mean = torch.rand(3, 76, 76) * 255
    crops = torch.randint(0, 256, (2, 3, 67, 67), dtype=torch.uint8)
    draws = torch.tensor([[0, 9, 1, 0, 0, 0], [5, 2, 0, 0, 0, 0]], dtype=torch.float32)
    got = DeviceAugment("paper", mean_image=mean, mean_at="centre", lighting=False)(crops, draws)
    centre = mean[:, 4:71, 4:71]
    assert torch.equal(got[0], crops[0].float().flip(-1) - centre)
    assert torch.equal(got[1], crops[1].float() - centre)
    source = DeviceAugment("paper", mean_image=mean, lighting=False)(crops, draws)
    assert torch.equal(source[1], crops[1].float() - mean[:, 5:72, 2:69])


def test_stream_rows_gather_back_in_order():
    batch = torch.arange(12 * 5).view(12, 5)
    for streams in (2, 3, 4):
        parts = [stream_rows(batch, streams, s) for s in range(streams)]
        assert torch.equal(gather_rows(parts, streams), batch)


def test_worker_message_is_the_usage_errors_line():
    from split_alexnet.loader import worker_message
    wrapped = UsageError("Caught UsageError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                         "call last):\n  File \"x.py\", line 1, in f\nsplit_alexnet.cli.UsageError: cannot "
                         "decode a.jpg (broken): replace or remove it, or pass --bad-images skip\n")
    assert worker_message(wrapped) == "cannot decode a.jpg (broken): replace or remove it, or pass --bad-images skip"
    assert worker_message(UsageError("plain")) == "plain"


@pytest.mark.slow
def test_bad_image_under_workers_is_one_line(tmp_path):
    """--workers 1: the same one line as with 0 workers (before: 'Caught UsageError in DataLoader worker
    process 0.' and the worker's stack)."""
    data = jpeg_folder(str(tmp_path / "data"), train=4, val=1)
    bad = os.path.join(data, "train", "a", "0.jpg")
    blob = open(bad, "rb").read()
    open(bad, "wb").write(blob[: len(blob) // 3])
    from split_alexnet.config import parse_config
    from split_alexnet.train import build, run
    argv = ["--dataset", "imagefolder", "--data-dir", data, "--image-size", "67", "--batch-size", "4",
            "--layout", "single", "--quiet", "--epochs", "1", "--workers", "1", "--out", str(tmp_path / "o"),
            "--no-plot"]
    with pytest.raises(UsageError) as e:
        run(build(parse_config(argv)))
    assert str(e.value).startswith(f"cannot decode {bad}") and "\n" not in str(e.value)


def test_data_bound_is_said_once_with_the_knobs():
    from types import SimpleNamespace

    from split_alexnet.loader import DataBound
    bound = DataBound(SimpleNamespace(workers=2, decode="cpu"), after=5)
    lines = [bound.update(0.08, 0.1) for _ in range(30)]
    said = [line for line in lines if line]
    assert len(said) == 1 and said[0].startswith("data-bound: 80% of the step time") and "--workers 4" in said[0]
    calm = DataBound(SimpleNamespace(workers=2, decode="cpu"), after=5)
    assert not any(calm.update(0.001, 0.1) for _ in range(30))


def test_default_workers_follow_the_cores_per_local_rank(monkeypatch):
    from split_alexnet.loader import cores, default_workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert default_workers(cuda=False) == 0
    assert default_workers(cuda=True) == max(1, cores() // 2 - 1)


# ---- the mean image ---------------------------------------------------------------------------------

class Counting(torch.utils.data.Dataset):
    """A data set that counts its reads and can stop (KeyboardInterrupt) at read `stop`: an interrupted
    mean-image pass."""

    def __init__(self, base, stop=None):
        self.base, self.stop, self.reads = base, stop, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        if self.stop is not None and self.reads > self.stop:
            raise KeyboardInterrupt
        return self.base[i]


def test_parallel_mean_equals_the_serial_one(folder, tmp_path):
    from split_alexnet.meanimage import parallel_mean
    train, _, _ = build_datasets("imagefolder", folder, seed=0)
    want = mean_image(Seeded(train, lambda img: img, 0), 76)
    cache = str(tmp_path / "m.pt")
    mean, how = parallel_mean(Seeded(train, lambda img: img, 0), 76, 3, cache=cache, every_s=0.0)
    assert torch.equal(mean, want) and torch.equal(torch.load(cache, weights_only=True), want)
    assert "computed from 16 training images" in how and not os.path.exists(cache + ".part0of1.pt")


def test_interrupted_mean_continues_where_it_stopped(folder, tmp_path, monkeypatch):
    from split_alexnet import meanimage
    train, _, _ = build_datasets("imagefolder", folder, seed=0)
    want = mean_image(Seeded(train, lambda img: img, 0), 76)
    cache = str(tmp_path / "m.pt")
    first = Counting(train, stop=12)                         # batches of 4: 3 saved, the 4th interrupted
    with pytest.raises(KeyboardInterrupt):
        meanimage.parallel_mean(Seeded(first, lambda img: img, 0), 76, 3, cache=cache, every_s=0.0, batch=4)
    assert torch.load(cache + ".part0of1.pt", weights_only=True)["done"] == 12
    again = Counting(train)
    mean, _ = meanimage.parallel_mean(Seeded(again, lambda img: img, 0), 76, 3, cache=cache, every_s=0.0,
                                      batch=4)
    assert again.reads == 4 and torch.equal(mean, want)      # only the 4 images not yet summed


def test_mean_from_a_subset_records_the_count(folder, tmp_path):
    from split_alexnet.meanimage import counted_path, parallel_mean, subset
    train, _, _ = build_datasets("imagefolder", folder, seed=0)
    assert subset(16, 4) == [0, 4, 8, 12] and subset(16, 0) == list(range(16))
    assert counted_path("d/x-mean-76.pt", 4, 16) == "d/x-mean-76-n4.pt"
    mean, how = parallel_mean(Seeded(train, lambda img: img, 0), 76, 3, count=4)
    want = mean_image(Seeded(torch.utils.data.Subset(train, [0, 4, 8, 12]), lambda img: img, 0), 76)
    assert torch.equal(mean, want) and "computed from 4 training images (of 16)" in how


def _slow_rank(rank, world, folder, store, out):
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from split_alexnet.meanimage import parallel_mean
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=2))     # the run's --timeout: 2 s

    class Slow(torch.utils.data.Dataset):                 # rank 1's share takes 6 s, past the timeout
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            if rank == 1:
                time.sleep(0.75)
            return self.base[i]
    train, _, _ = build_datasets("imagefolder", folder, seed=0)
    mean, how = parallel_mean(Seeded(Slow(train), lambda img: img, 0), 76, 3, rank=rank, world=world)
    dist.barrier()                                        # the run's own group still works afterwards
    torch.save(mean, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_mean_outlives_the_collective_timeout(folder, tmp_path):
    import torch.multiprocessing as mp
    out = str(tmp_path / "mean")
    mp.spawn(_slow_rank, args=(2, folder, str(tmp_path / "store"), out), nprocs=2)
    train, _, _ = build_datasets("imagefolder", folder, seed=0)
    want = mean_image(Seeded(train, lambda img: img, 0), 76)
    for rank in (0, 1):
        assert torch.equal(torch.load(f"{out}.{rank}", weights_only=True), want)


# ---- each image decoded once per replica: the same training ------------------------------------------

RUN = ["--dataset", "imagefolder", "--image-size", "67", "--batch-size", "8", "--max-steps", "4",
       "--eval-every", "0", "--quiet", "--no-plot", "--seed", "0", "--micro-batches", "1", "--lighting", "0.1"]


def _torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "launch", "train.py")] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_split_decoding_once_per_replica_trains_the_same(folder, tmp_path):
    """--share-decode (each stream decodes half the batch, the streams all-gather it) against every
    stream decoding the whole batch (the old path): the same losses, bit for bit; the single and
    streams layouts' within the split's fp32 summation-order tolerance (tests/test_train.py LOSS_RTOL)."""
    from split_alexnet.config import parse_config
    from split_alexnet.train import build, run
    shared, whole, single = (str(tmp_path / n) for n in ("shared", "whole", "single"))
    _torchrun(RUN + ["--data-dir", folder, "--out", shared])
    _torchrun(RUN + ["--data-dir", folder, "--out", whole, "--no-share-decode"])
    run(build(parse_config(RUN + ["--data-dir", folder, "--out", single, "--layout", "single"])))
    streams = str(tmp_path / "streams")
    run(build(parse_config(RUN + ["--data-dir", folder, "--out", streams, "--layout", "streams"])))
    assert _losses(shared) == _losses(whole) and len(set(_losses(shared))) == 4
    for other in (shared, streams):
        for a, b in zip(_losses(other), _losses(single)):
            assert abs(a - b) <= 1e-5 * abs(b)


# ---- prepare: the folder form and the shards, resumable --------------------------------------------

def test_prepare_folder_and_shards_read_alike_and_resume(tmp_path):
    from split_alexnet.prepare import prepare
    src = jpeg_folder(str(tmp_path / "src"), train=3, val=1)
    flat, sharded = str(tmp_path / "flat"), str(tmp_path / "shards")
    assert prepare(src, flat, workers=2, bar=False) == dict(train=6, val=2)
    assert prepare(src, sharded, shards=4, workers=2, bar=False) == dict(train=6, val=2)
    a, b = (build_datasets("imagefolder", d, seed=0) for d in (flat, sharded))
    assert a[2] == b[2] == ["a", "b"] and len(a[0]) == len(b[0]) == 6
    for i in range(6):
        (x, la), (y, lb) = a[0][i], b[0][i]
        assert la == lb and min(x.shape[1:]) == 256 and torch.equal(x, y)
    # resume: what is whole stays; a lost file, a shard without its sidecar, a temp file are redone
    kept = os.path.join(flat, "train", "a", "1.jpg")
    stamp = os.path.getmtime(kept)
    os.remove(os.path.join(flat, "train", "b", "0.jpg"))
    open(os.path.join(flat, "train", "a", "2.jpg.tmp99"), "wb").write(b"half")
    os.remove(os.path.join(sharded, "train", "shard-000001.json"))
    shard0 = os.path.getmtime(os.path.join(sharded, "train", "shard-000000.tar"))
    prepare(src, flat, workers=1, bar=False)
    prepare(src, sharded, shards=4, workers=1, bar=False)
    assert os.path.getmtime(kept) == stamp and os.path.isfile(os.path.join(flat, "train", "b", "0.jpg"))
    assert not os.path.exists(os.path.join(flat, "train", "a", "2.jpg.tmp99"))
    assert os.path.getmtime(os.path.join(sharded, "train", "shard-000000.tar")) == shard0
    assert len(build_datasets("imagefolder", sharded, seed=0)[0]) == 6


@pytest.mark.slow
def test_prepare_command_computes_the_mean_the_trainer_reads(tmp_path):
    src = jpeg_folder(str(tmp_path / "src"), train=2, val=1)
    dst = str(tmp_path / "dst")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prepare.py"), src, dst, "--shards", "3",
                           "--mean", "--image-size", "67", "--workers", "1"], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prepared 4 training and 2 validation images" in proc.stdout and "computed from 4" in proc.stdout
    from split_alexnet.config import parse_config
    from split_alexnet.train import build
    job = build(parse_config(["--dataset", "imagefolder", "--data-dir", dst, "--image-size", "67",
                              "--batch-size", "2", "--out", str(tmp_path / "o")]))
    assert job.augment.mean_image.shape == (3, 76, 76)
    assert os.path.isfile(os.path.join(dst, "imagefolder-mean-76.pt"))


def test_decode_on_the_device_matches_the_cpu_decoder(folder):
    """--decode gpu's code path, run on the CPU (decode_jpeg device="cpu"): torchvision's decoder against
    PIL's on the same files, then the same resize and centre square. Both are libjpeg-turbo here, and
    measured on this folder the squares are identical (at 76 and 256 px); two decoders may round the
    IDCT and the chroma upsampling differently by a level, which is the bound asserted (max 1, mean
    0.01). On CUDA (nvjpeg, and the float resize of a CUDA uint8 image) expect a few levels: not
    measured this session (no GPU)."""
    import torchvision
    from torchvision.io import read_file
    from torchvision.transforms import v2

    from split_alexnet.data import _paper_base
    from split_alexnet.decode import decode_batch
    train, _, _ = build_datasets("imagefolder", folder, seed=0)
    pil = torchvision.datasets.ImageFolder(train.root)      # PIL's decoder, not the trainer's decode_file
    blobs = [read_file(p) for p, _ in train.samples[:6]]
    got = decode_batch(blobs, 76, "cpu")
    base = v2.Compose(_paper_base(76)[:-1])
    want = torch.stack([base(pil[i][0]) for i in range(6)])
    diff = (got.int() - want.int()).abs()
    assert got.shape == want.shape and diff.max() <= 1 and diff.float().mean() <= 0.01, (diff.max(), diff.float().mean())


@pytest.mark.slow
def test_data_bench_writes_a_row_per_stage(folder, tmp_path):
    """The schema only (timings on this shared machine mean nothing): bench.json's `data` rows."""
    out = str(tmp_path / "bench")
    os.makedirs(out)
    json.dump(dict(runs=["kept"]), open(os.path.join(out, "bench.json"), "w"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--data", folder,
                           "--image-size", "67", "--batch-size", "4", "--steps", "1", "--data-rounds", "1",
                           "--workers", "1", "--out", out], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(os.path.join(out, "bench.json")))
    assert result["runs"] == ["kept"]                          # the model bench's keys stay
    rows = {r["stage"]: r for r in result["data"]["rows"]}
    assert {"read", "decode-pil", "decode-tv", "item-float", "item-uint8", "collate-float", "collate-uint8",
            "device-augment", "today", "delivered", "torchvision-reference"} <= set(rows)
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["cores"] >= 1
        assert abs(r["images_per_s_per_core"] - r["images_per_s"] / r["cores"]) < 1e-9
    assert rows["delivered"]["cores"] == 2 and "delivered / today per core per replica" in proc.stdout
    n = min(64, result["data"]["images"])                       # the stages' images
    assert result["data"]["same_pixels"] == f"{n}/{n}"           # decode.py's pixels are PIL's, counted
    assert f"decode-tv's pixels equal PIL's on {n}/{n} images" in proc.stdout


@pytest.mark.slow
def test_data_bench_reads_prepared_shards(folder, tmp_path):
    """launch/prepare.py's shards through every path, torchvision's reference included (it decodes
    the shards' bytes with PIL, as its ImageFolder would)."""
    from split_alexnet.prepare import prepare
    shards, out = str(tmp_path / "shards"), str(tmp_path / "bench")
    prepare(folder, shards, shards=4, workers=1, bar=False)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--data", shards,
                           "--image-size", "67", "--batch-size", "4", "--steps", "1", "--data-rounds", "1",
                           "--workers", "0", "--out", out], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["stage"]: r for r in json.load(open(os.path.join(out, "bench.json")))["data"]["rows"]}
    assert {"today", "delivered", "torchvision-reference"} <= set(rows)
    assert all(rows[s]["images_per_s"] > 0 for s in ("today", "delivered", "torchvision-reference"))


@pytest.mark.parametrize("subtract_mean,lighting_pca", [("cuda-convnet2", "cuda-convnet2"), ("caffe", "cuda-convnet2"),
                                                       ("cuda-convnet2", "mxnet")])
def test_uint8_path_equals_the_float_path_of_each_recipe_option(folder, subtract_mean, lighting_pca):
    """--subtract-mean and --lighting-pca (main's #19) through the uint8 path: the mean at the crop's
    source or its centre, cuda-convnet2's PCA and its 1 / (1 + sigma) rescale, bit for bit."""
    train, _, _ = build_datasets("imagefolder", folder, seed=0)
    mean = torch.rand(3, paper_side(67), paper_side(67)) * 255
    aug = dict(crop=True, flip=True, lighting=0.1, subtract_mean=subtract_mean, lighting_pca=lighting_pca)
    old = build_paper_transforms(67, 3, mean, train=True, **aug)
    worker, device = build_uint8_path(67, 3, "paper", mean_image=mean, **aug)
    items = _batch(Seeded(train, worker, seed=3), 2, len(train))
    crops, draws = torch.stack([c for c, _ in items]), torch.stack([d for _, d in items])
    want = torch.stack(_batch(Seeded(train, old, seed=3), 2, len(train)))
    assert torch.equal(device(crops, draws), want)


def test_decode_gpu_loader_delivers_the_cpu_loaders_batches(folder):
    """loader.TrainLoader with decode="gpu" (run here on the CPU device) against decode="cpu": the same
    draws, the same crops within the decoders' 1 level (test above), so x within 1.0 on the 0-255 scale."""
    from split_alexnet.augment import EncodedItem
    from split_alexnet.data import PCA_MXNET_255, Lighting, encoded
    from split_alexnet.loader import TrainLoader
    train, _, _ = build_datasets("imagefolder", folder, seed=0)
    mean = torch.rand(3, 76, 76) * 255
    worker, augment = build_uint8_path(67, 3, "paper", mean_image=mean, crop=True, flip=True, lighting=0.1)
    kw = dict(batch_size=8, seed=0, device=torch.device("cpu"), augment=augment, workers=0)
    cpu = TrainLoader(Seeded(train, worker, 0), **kw)
    item = EncodedItem(76, 67, crop=True, flip=True, lighting=Lighting(0.1, eigval=PCA_MXNET_255))
    gpu = TrainLoader(Seeded(encoded(train), item, 0), decode="gpu", side=76, size=67, **kw)
    pairs = list(zip(cpu.epoch(1, 0), gpu.epoch(1, 0)))
    assert len(pairs) == 2
    for (xa, ya), (xb, yb) in pairs:
        assert torch.equal(ya, yb) and xa.shape == xb.shape == (8, 3, 67, 67)
        assert (xa - xb).abs().max() <= 1.0


@pytest.mark.slow
def test_decode_gpu_with_workers_trains(folder, tmp_path):
    """--decode gpu under --workers 1 (its code path on the CPU device): the workers' file bytes cross to
    the trainer as one tensor per batch. A batch of torchvision.io.read_file tensors did not: the worker's
    feeder failed (EBADF sharing their storage) and the trainer waited for the batch for ever."""
    import shutil
    data = str(tmp_path / "photos")
    shutil.copytree(folder, data, ignore=shutil.ignore_patterns("*.pt"))
    proc = subprocess.run([sys.executable, "launch/train.py", "--layout", "single", "--dataset", "imagefolder",
                           "--data-dir", data, "--device", "cpu", "--image-size", "67", "--batch-size", "4",
                           "--max-steps", "2", "--workers", "1", "--decode", "gpu", "--no-plot",
                           "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: 2 steps" in proc.stdout


@pytest.mark.slow
def test_persistent_workers_train_as_no_workers(tmp_path):
    """--workers 2 (persistent across the epoch boundary, prefetching) gives the losses of --workers 0,
    bit for bit: the draws follow (seed, epoch, index), not the process."""
    from split_alexnet.config import parse_config
    from split_alexnet.train import build, run
    tiny = ["--dataset", "shapes", "--train-size", "32", "--val-size", "8", "--image-size", "67", "--batch-size",
            "8", "--epochs", "2", "--max-steps", "6", "--layout", "single", "--quiet", "--no-plot", "--lr", "0.001"]
    run(build(parse_config(tiny + ["--workers", "0", "--out", str(tmp_path / "w0")])))
    run(build(parse_config(tiny + ["--workers", "2", "--prefetch-factor", "2", "--out", str(tmp_path / "w2")])))
    assert _losses(str(tmp_path / "w0")) == _losses(str(tmp_path / "w2")) and len(_losses(str(tmp_path / "w0"))) == 6
