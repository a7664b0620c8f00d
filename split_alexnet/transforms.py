"""The transforms (torchvision v2) from a data set's image to the model's input: crops, flips, the PCA
lighting noise, ten crops."""

import torch
from torchvision.transforms import v2

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


class _Stack:
    """Ten crops as one (10, C, H, W) tensor (minus `minus`, a (C, H, W) mean crop, if given)."""

    def __init__(self, transform, minus=None):
        self.transform, self.minus = transform, minus

    def __call__(self, img):
        out = torch.stack([torch.as_tensor(c) for c in self.transform(img)])
        return out if self.minus is None else out - self.minus.to(out.dtype)
