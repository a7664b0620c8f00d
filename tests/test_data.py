"""Data sets and transforms: determinism per (seed, index), the IDX reader on the real MNIST files,
the PCA lighting transform, the sampler's resume offset, and the message for missing files."""
import gzip
import hashlib
import os

import pytest
import torch

from split_alexnet.cli import UsageError
from split_alexnet.data import (
    PCA_EIGVAL,
    PCA_EIGVEC,
    EpochSampler,
    Lighting,
    Seeded,
    Shapes,
    build_datasets,
    build_transforms,
    read_idx,
)

MNIST_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "mnist")


def test_shapes_deterministic_per_seed_and_index():
    a, b, other = Shapes(50, seed=3), Shapes(50, seed=3), Shapes(50, seed=4)
    img, label = a[7]
    assert img.dtype == torch.uint8 and img.shape == (3, 112, 112) and 0 <= label < 10
    assert torch.equal(img, b[7][0]) and label == b[7][1]
    assert not torch.equal(img, other[7][0])
    assert not torch.equal(Shapes(5, 3, "val")[0][0], a[0][0])   # val is not a copy of train
    labels = [a[i][1] for i in range(50)]
    assert len(set(labels)) >= 8                                  # all classes drawn, roughly evenly


def test_seeded_transform_depends_only_on_epoch_and_index():
    t = build_transforms(67, 3, (0.5,) * 3, (0.3,) * 3, train=True, crop=True, flip=True, lighting=0.1)
    ds1, ds2 = Seeded(Shapes(10), t, seed=1), Seeded(Shapes(10), t, seed=1)
    torch.manual_seed(123)                                        # the global RNG plays no part
    x1 = ds1[(2, 5)][0]
    torch.manual_seed(456)
    assert torch.equal(x1, ds2[(2, 5)][0]) and x1.shape == (3, 67, 67)
    assert not torch.equal(x1, ds1[(3, 5)][0])                    # another epoch: another crop/flip/colour


def test_epoch_sampler_same_order_everywhere_and_resumes_at_offset():
    full = list(EpochSampler(100, seed=5, epoch=2))
    assert full == list(EpochSampler(100, seed=5, epoch=2))
    assert sorted(i for _, i in full) == list(range(100)) and {e for e, _ in full} == {2}
    assert list(EpochSampler(100, seed=5, epoch=2, start=40)) == full[40:]
    assert full != list(EpochSampler(100, seed=5, epoch=3))


def test_lighting_adds_the_pca_colour_shift():
    light = Lighting(0.1)
    x = torch.rand(3, 8, 8)
    alpha = torch.tensor([1.0, -2.0, 0.5])
    y = light.transform(x, dict(alpha=alpha))
    shift = PCA_EIGVEC @ (alpha * PCA_EIGVAL)
    assert torch.allclose(y - x, shift[:, None, None].expand(3, 8, 8), atol=1e-6)
    grey = torch.rand(1, 8, 8)
    assert light.transform(grey, dict(alpha=alpha)) is grey       # no PCA for one channel


def test_ten_crop_eval_transform_shape():
    t = build_transforms(67, 1, (0.5,), (0.3,), train=False, crop=True, flip=False, lighting=0, ten_crop=True)
    out = t(torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8))
    assert out.shape == (10, 1, 67, 67)
    assert torch.equal(out[9], out[4].flip(-1))                   # the mirrored centre crop


def test_read_idx_real_mnist_and_split_test():
    images = read_idx(os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
    assert images.shape == (3000, 28, 28) and labels.shape == (3000,)
    assert set(labels.tolist()) == set(range(10))
    train, val, classes = build_datasets("mnist", MNIST_DIR, seed=0, download=False, split_test=500)
    assert (len(train), len(val), len(classes)) == (2500, 500, 10)
    assert torch.equal(val[0][0][0], images[2500])                # held-out = the last 500


def test_mnist_fixture_checksums():
    # the fixture's README gives these: the first 3,000 MNIST test images, unchanged but for the count
    want = {"t10k-images-idx3-ubyte.gz": "908206339684571d14afca1430d6a119f42cce40526268813662a305157e1033",
            "t10k-labels-idx1-ubyte.gz": "adfa5cd6ab5c6e6ad8d535fe2b320df30afb10ceab6fd452cd3f03e4d8362e49"}
    for name, sha in want.items():
        with open(os.path.join(MNIST_DIR, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha, name


def test_truncated_idx_file_is_refused(tmp_path):
    src = os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte.gz")
    with gzip.open(src) as f:
        data = f.read()
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(data[:2000])
    with pytest.raises(UsageError, match="not a complete uint8 IDX file"):
        read_idx(str(bad))


def test_missing_mnist_files_name_directory_and_files(tmp_path):
    with pytest.raises(UsageError) as e:
        build_datasets("fashion-mnist", str(tmp_path), seed=0, download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte.gz" in msg and "\n" not in msg
