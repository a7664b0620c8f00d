"""uint8 through the loader, the float work on the device, batched.

The loader's workers decode, resize and crop on uint8 (Uint8Train) and hand over (crop, draws): the crop
as uint8 (C, h, w), and the draws as six float32 numbers [top, left, flip, r, g, b] — where the crop was
cut from the square (the mean image is cut at the same place), whether to mirror it, and the PCA lighting
shift. DeviceAugment then does the float work on the whole batch on the device: conversion, mean
subtraction or normalisation, the flip and the lighting shift.

The draws are the ones the float path (data.build_paper_transforms / build_transforms) makes, in its
order, from the same seeded generator (data.Seeded: seed, epoch, index): RandomCrop's top and left, the
flip's torch.rand(1) < p, Lighting's alpha. The shift eigvec @ (alpha * eigval) is computed in the worker
by the same Lighting.shift, and every device operation is one IEEE-rounded elementwise operation in the
float path's order (x - mean, then + shift; or x * 1/255, + shift, (x - m) / s) with the mirror a
permutation, so the batches are the float path's bit for bit, on CPU and on a GPU alike
(tests/test_data_path.py).

Mean subtraction (`mean_at`): "source" subtracts the mean image at the crop's source position before the
mirror (Caffe's data_transformer, and what the float path does: SubtractMean before RandomCrop); "centre"
subtracts the mean image's central crop after crop and mirror (cuda-convnet2): --subtract-mean caffe and
cuda-convnet2. The PCA constants and the rescale by 1 / (1 + sigma) are --lighting-pca's
(data.LIGHTING_PCA), the same Lighting in the worker (its shift) and the same rescale on the device.
"""
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

DRAWS = 6  # top, left, flip, r, g, b


class Uint8Train:
    """Worker side: base (decode, resize, [centre square]) on uint8, then the crop, flip and lighting
    draws of the float path, in its order. Returns (crop uint8 (C, size, size), draws float32 (6,))."""

    def __init__(self, base, size, *, crop, flip, lighting=None, train=True):
        self.base, self.size, self.flip, self.lighting, self.train = base, size, flip, lighting, train
        self.random_crop = v2.RandomCrop(size) if crop and train else None

    def __call__(self, img):
        img = self.base(img)
        h, w = img.shape[-2:]
        if self.random_crop is not None:
            p = self.random_crop.make_params([img])          # the same two torch.randint draws
            top, left = p["top"], p["left"]
        else:                                                # CenterCrop's anchor
            top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        out = img[..., top:top + self.size, left:left + self.size]
        flip = bool(self.train and self.flip and torch.rand(1) < 0.5)   # RandomHorizontalFlip(p=0.5)
        shift = torch.zeros(3)
        if self.train and self.lighting is not None:
            shift = self.lighting.shift(self.lighting.make_params([]))
        return out.contiguous(), torch.tensor([top, left, float(flip), *shift.tolist()], dtype=torch.float32)


class DeviceAugment:
    """Device side: the float work on a batch of uint8 crops (B, C, h, w) and their draws (B, 6).

    paper: x - mean image (at the crop's position, or its centre: mean_at), 0-255 scale;
    channel: x / 255, then (x - mean) / std per channel. Then the mirror and the lighting shift, and with
    rescale (a factor, cuda-convnet2's 1 / (1 + sigma): Lighting(rescale=True)) the product by it."""

    def __init__(self, mode, *, mean_image=None, mean=None, std=None, mean_at="source", lighting=True,
                 rescale=None):
        if mode not in ("paper", "channel"):
            raise ValueError(f"mode {mode!r}: paper or channel")
        if mean_at not in ("source", "centre"):
            raise ValueError(f"mean_at {mean_at!r}: source or centre")
        self.mode, self.mean_image, self.mean_at, self.lighting = mode, mean_image, mean_at, lighting
        self.mean, self.std, self.rescale = mean, std, rescale
        self._on = {}

    def _mean_on(self, device):
        if device not in self._on:
            self._on[device] = self.mean_image.to(device)
        return self._on[device]

    def __call__(self, crops, draws):
        b, c, h, w = crops.shape
        flip = draws[:, 2].bool()[:, None, None, None]
        if self.mode == "paper":
            x = crops.to(torch.float32)
            mean = self._mean_on(crops.device)
            if self.mean_at == "source":                     # the mean's window at each crop's source
                windows = mean.unfold(1, h, 1).unfold(2, w, 1)           # (C, H-h+1, W-w+1, h, w): a view
                tops, lefts = draws[:, 0].long().to(crops.device), draws[:, 1].long().to(crops.device)
                x = x - windows[:, tops, lefts].transpose(0, 1)           # (B, C, h, w)
                x = torch.where(flip, x.flip(-1), x)
            else:                                            # cuda-convnet2: the centre, after the mirror
                top, left = (mean.shape[1] - h) // 2, (mean.shape[2] - w) // 2
                x = torch.where(flip, x.flip(-1), x) - mean[:, top:top + h, left:left + w]
        else:
            x = TF.to_dtype(crops, torch.float32, scale=True)
            x = torch.where(flip, x.flip(-1), x)
        if self.lighting and c == 3:
            x = x + draws[:, 3:6, None, None].to(x.device, x.dtype)
            if self.rescale is not None:                 # Lighting.transform's out * (1.0 / (1.0 + sigma))
                x = x * self.rescale
        if self.mode == "channel":
            x = TF.normalize(x, list(self.mean), list(self.std))
        return x


def paper_lighting(sigma, in_channels, lighting_pca="mxnet"):
    """The Lighting of --preprocess paper (data.LIGHTING_PCA[lighting_pca], 0-255 pixels), or None."""
    from .data import LIGHTING_PCA, Lighting
    if not (sigma > 0 and in_channels == 3):
        return None
    eigval, eigvec, rescale = LIGHTING_PCA[lighting_pca]
    return Lighting(sigma, eigval=eigval, eigvec=eigvec, rescale=rescale)


def build_uint8_path(image_size, in_channels, preprocess, *, crop, flip, lighting, ten_crop=False, mean_image=None,
                     mean=None, std=None, subtract_mean="caffe", lighting_pca="mxnet"):
    """(worker transform, DeviceAugment) of a training run: together the float path's training
    transforms (data.build_paper_transforms with its subtract_mean and lighting_pca, data.build_transforms),
    with the same draws."""
    from .data import Lighting, _paper_base, paper_side
    if preprocess == "paper":
        if subtract_mean not in ("caffe", "cuda-convnet2"):
            raise ValueError(f"subtract_mean {subtract_mean!r}: use caffe or cuda-convnet2")
        light = paper_lighting(lighting, in_channels, lighting_pca)
        side = paper_side(image_size)
        worker = Uint8Train(v2.Compose(_paper_base(side)[:-1]), image_size, crop=crop, flip=flip, lighting=light)
        rescale = 1.0 / (1.0 + light.sigma) if light is not None and light.rescale else None
        return worker, DeviceAugment("paper", mean_image=mean_image, lighting=light is not None, rescale=rescale,
                                     mean_at="source" if subtract_mean == "caffe" else "centre")
    light = Lighting(lighting) if lighting > 0 and in_channels == 3 else None   # as build_transforms
    big = round(image_size * 256 / 224) if crop else image_size   # as build_transforms' training side
    worker = Uint8Train(v2.Compose([v2.ToImage(), v2.Resize((big, big), antialias=True)]),
                        image_size if crop else big,
                        crop=crop, flip=flip, lighting=light)
    return worker, DeviceAugment("channel", mean=mean, std=std, lighting=light is not None)


def items_batch(dataset, augment, keys):
    """The float batch of dataset[keys] (a data.Seeded of Uint8Train items) after `augment`, on the CPU:
    what the training sees, for inspection."""
    items = [dataset[k][0] for k in keys]
    return augment(torch.stack([c for c, _ in items]), torch.stack([d for _, d in items]))


def to_device(batch, device, non_blocking=True):
    """(crops, draws) of a loader batch on the device (pinned memory: the copy overlaps)."""
    crops, draws = batch
    return crops.to(device, non_blocking=non_blocking), draws.to(device, non_blocking=non_blocking)


# ---- each image decoded once per replica --------------------------------------------------------

def stream_rows(items, streams, stream):
    """The rows of one replica batch that stream `stream` decodes: items[stream::streams]."""
    return items[stream::streams]


def gather_rows(parts, streams):
    """Inverse of stream_rows over the streams: parts[s] holds rows s::S; returns the batch in order."""
    return torch.stack(parts, dim=1).flatten(0, 1)


def all_gather_rows(tensor, group, streams):
    """This stream's rows of the batch -> the whole batch, from every stream of the replica (group)."""
    import torch.distributed as dist
    parts = [torch.empty_like(tensor) for _ in range(streams)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return gather_rows(parts, streams)


# ---- GPU JPEG decoding (the decoding itself: decode.decode_batch) ---------------------------------

class EncodedItem:
    """Worker side for --decode gpu: the file's bytes (1-D uint8, as torchvision.io.read_file reads
    them) with the crop/flip/lighting draws made as Uint8Train makes them: the paper's square is
    (side, side) whatever the file, so no decode is needed for them. Batch them with collate_encoded."""

    def __init__(self, side, size, *, crop, flip, lighting=None):
        self.side = side
        self.draw = Uint8Train(lambda img: img, size, crop=crop, flip=flip, lighting=lighting)

    def __call__(self, data):
        square = torch.empty(0, self.side, self.side, dtype=torch.uint8)   # the shape the draws need
        _, draws = self.draw(square)
        return data, draws


def collate_encoded(batch):
    """[((bytes, draws), label), ...] -> (the files' bytes end to end, their lengths (B,), draws (B, 6),
    labels (B,)): files differ in length, and one tensor crosses from a worker in one piece (a list of
    hundreds of tensors would need as many shared file descriptors, which torch's default sharing
    strategy runs out of); split_encoded undoes it."""
    return (torch.cat([item[0][0] for item in batch]), torch.tensor([len(item[0][0]) for item in batch]),
            torch.stack([item[0][1] for item in batch]), torch.tensor([item[1] for item in batch]))


def split_encoded(flat, lengths):
    """collate_encoded's bytes back into one 1-D uint8 tensor per file (views of `flat`)."""
    return list(flat.split(lengths.tolist()))
