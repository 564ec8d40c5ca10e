"""Datasets by name and the paper's multi-crop augmentation (Section III).

Pre-training uses the unlabelled images of a dataset; the probes use its labelled train/test splits.

    name         pre-training split           probe splits (train / test)   native size
    cifar10      train (50k)                  train / test                  32
    cifar100     train (50k)                  train / test                  32
    stl10        train+unlabeled (105k)       train / test                  96
    food101      train (75.75k)               train / test                  mixed (crops 224)
    imagenet     ROOT/train (ImageFolder)     ROOT/train / ROOT/val         mixed (crops 224)
    imagenet100  ROOT/train, 100 classes      ROOT/train / ROOT/val         mixed (crops 224)
    folder       ROOT/train (ImageFolder)     ROOT/train / ROOT/test (or ROOT/val)   from the files

torchvision downloads CIFAR, STL-10 and Food-101 when the network is there; ImageNet must be put in place
by hand. When a dataset is missing, `DatasetError` says which files are expected and where.

The multi-crop comes in two forms with one recipe (`dino_recipes`): `MultiCrop`, per PIL image, the
readable recipe that the tests hold the batched form against, and `BatchedMultiCrop`, per uint8 batch on
the training device, which train.py uses. Its uint8 batches come either from memory (`uint8_dataset` +
`load_into_memory` + `InMemoryBatches`: CIFAR, STL-10, folders of one image size) or from DataLoader
workers (`WorkerBatches`). Images of mixed sizes (ImageNet, Food-101, such folders) come from workers
only: each worker cuts an image's crops from the whole of it (`FullImageCrops`), and BatchedMultiCrop
adds the photometric steps on the device. Either way the batches follow an `EpochOrder`, which makes the
data order a function of the seed and the epoch:

    crops, generator = BatchedMultiCrop(dino_recipes(32, 16)), torch.Generator().manual_seed(0)
    dataset = uint8_dataset("cifar10", root, crops.recipes)
    images, labels = load_into_memory(dataset, device)               # (N, 3, 32, 32) uint8, once
    order = EpochOrder(len(images), batch_size=128, seed=0)
    for batch, _ in InMemoryBatches(images, labels, order):          # (B, 3, 32, 32) uint8 on the device
        views = crops(batch, generator)                              # V tensors (B, 3, h, w), as MultiCrop's

The end of the file holds the small helpers every script shares: normalising and saving pictures, and
appending results as JSON lines and Markdown rows.
"""

import argparse
import json
import math
import os
import random
import signal
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from tqdm import tqdm

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# PIL image -> float tensor (3, H, W) normalised with ImageNet's statistics: the last step of every view
# and of the evaluation transform (the batched crops use `normalize`, its tensor form).
TO_NORMALISED_TENSOR = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

# The standard 100-class subset of ImageNet (Tian, Krishnan & Isola, "Contrastive Multiview Coding", 2019).
IMAGENET100_CLASSES = """
n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797
n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531
n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051
n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868
n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322
n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622
""".split()

DATASETS = ("cifar10", "cifar100", "stl10", "food101", "imagenet", "imagenet100", "folder")
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "food101": 224, "imagenet": 224, "imagenet100": 224}


class DatasetError(RuntimeError):
    """A dataset (or a results file) that cannot be found or read; the message says what to do."""


def error_message(error):
    """The one-line message of an error, also when a DataLoader worker raised it.

    A worker's exception is re-raised in the main process with the worker's traceback prepended to its
    message; the original message is the text after the last "ErrorName: " of that traceback.
    """
    last_line = str(error).strip().splitlines()[-1]
    return last_line.split("Error: ", 1)[1] if "Traceback" in str(error) and "Error: " in last_line else last_line


def read_rgb(path):
    """Open an image file as RGB. Grayscale, palette and CMYK images are converted; RGBA loses its alpha
    channel (the colour values are kept as they are, not composited on a background).

    convert() decodes the whole file, so a truncated or corrupt image fails here, with its name, rather
    than as a traceback from inside a DataLoader worker.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot read image {path} ({str(error).splitlines()[0]}); delete or replace the file "
                           f"(train.py --skip-bad-images leaves such files out of training and of its monitor)") from None


# ----------------------------------------------------------------------------------------------------
# Multi-crop (Section III): DINO's recipe, 2 global crops of 40-100% and 6 local crops of 5-40% of the image

class RandomGaussianBlur:
    """PIL Gaussian blur with a radius drawn from U(0.1, 2.0), applied with probability p (DINO)."""

    def __init__(self, p, radius=(0.1, 2.0)):
        self.p, self.radius = p, radius

    def __call__(self, img):
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.radius)))


class RandomSolarize:
    """PIL solarisation (invert pixels above 128) with probability p (DINO, second global crop)."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


# DINO's settings, shared by MultiCrop (per image, PIL) and BatchedMultiCrop (per batch, tensors)
GLOBAL_SCALE, LOCAL_SCALE = (0.4, 1.0), (0.05, 0.4)          # crop area, as fractions of the image's
FLIP_P, JITTER_P, GRAYSCALE_P = 0.5, 0.8, 0.2
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1   # factors U(1 -+ 0.4), U(1 -+ 0.2); hue U(-+0.1) turns
BLUR_SIGMA = (0.1, 2.0)                                      # pixels of the crop, whatever its size
# The supervised baseline of the paper's setup (SSL-Whitening's train_supervised.py): torchvision's
# RandomResizedCrop at its default scale and a horizontal flip, nothing else
SUPERVISED_SCALE = (0.08, 1.0)


class ViewRecipe(NamedTuple):
    """One view: crop side in pixels, crop area fraction (min, max), and the probabilities of its colour
    jitter, grayscale, blur and solarisation. The flip (p = 0.5) is every view's."""
    size: int
    scale: tuple
    blur_p: float
    solarize_p: float
    jitter_p: float = JITTER_P
    grayscale_p: float = GRAYSCALE_P


def dino_recipes(global_size, local_size, global_crops=2, local_crops=6,
                 global_scale=GLOBAL_SCALE, local_scale=LOCAL_SCALE, blur=True):
    """The V = global_crops + local_crops views, globals first; extra globals alternate recipes 1 and 2."""
    global_1 = ViewRecipe(global_size, tuple(global_scale), blur_p=1.0 if blur else 0.0, solarize_p=0.0)
    global_2 = ViewRecipe(global_size, tuple(global_scale), blur_p=0.1 if blur else 0.0, solarize_p=0.2)
    local = ViewRecipe(local_size, tuple(local_scale), blur_p=0.5 if blur else 0.0, solarize_p=0.0)
    return [global_1 if i % 2 == 0 else global_2 for i in range(global_crops)] + [local] * local_crops


def supervised_recipes(size):
    """The supervised baseline's one view per image: a crop of 8-100% of the image and a flip, no colour."""
    return [ViewRecipe(size, SUPERVISED_SCALE, blur_p=0.0, solarize_p=0.0, jitter_p=0.0, grayscale_p=0.0)]


class MultiCrop:
    """One PIL image -> list of `global_crops + local_crops` normalised tensors, globals first.

    DINO's recipe (Caron et al. 2021, main_dino.py DataAugmentationDINO), which the paper adopts:
      every crop:  RandomResizedCrop (bicubic), horizontal flip p=0.5, colour jitter (brightness 0.4,
                   contrast 0.4, saturation 0.2, hue 0.1) p=0.8, grayscale p=0.2
      global 1:    Gaussian blur p=1.0
      global 2:    Gaussian blur p=0.1, solarisation p=0.2
      local:       Gaussian blur p=0.5
    With more than two global crops the extra ones alternate between the two global recipes.
    options: those of `dino_recipes` (global_crops, local_crops, global_scale, local_scale, blur).
    The blur radius is DINO's, in pixels, whatever the crop size; `blur=False` drops blur entirely, as
    the CIFAR recipes of solo-learn and Lightly do (a 2 px blur erases much of a 32 px image).
    """

    def __init__(self, global_size, local_size, **options):
        def transform(recipe):
            steps = [T.RandomResizedCrop(recipe.size, scale=recipe.scale, interpolation=T.InterpolationMode.BICUBIC),
                     T.RandomHorizontalFlip(p=FLIP_P),
                     T.RandomApply([T.ColorJitter(BRIGHTNESS, CONTRAST, SATURATION, HUE)], p=recipe.jitter_p),
                     T.RandomGrayscale(p=recipe.grayscale_p)]
            if recipe.blur_p:
                steps.append(RandomGaussianBlur(recipe.blur_p, BLUR_SIGMA))
            if recipe.solarize_p:
                steps.append(RandomSolarize(recipe.solarize_p))
            return T.Compose(steps + [TO_NORMALISED_TENSOR])

        self.transforms = [transform(recipe) for recipe in dino_recipes(global_size, local_size, **options)]

    def __call__(self, img):
        return [t(img) for t in self.transforms]


# ----------------------------------------------------------------------------------------------------
# Batched multi-crop on the training device: MultiCrop's recipe for a whole uint8 batch at once
#
# Eight PIL views per image on CPU workers starve a GPU; here every step is one tensor operation over
# the batch with per-image random parameters, on whatever device holds the images. At CIFAR size a GPU
# runs each such operation in microseconds, so a step's cost is the number of operations the host
# launches, not their arithmetic. Four choices keep that number small, and independent of the image
# size and the batch (benchmark.py counts them: 196 per step for DINO's 8 views, where a call per view
# took 1,528, 105 of them copies of parameters to the device):
#   - the views that share a size and a crop scale are one batch: the 6 local views of B images are one
#     (6B, ...) tensor, each image with its own parameters;
#   - the random parameters (a few numbers per image) are drawn on the CPU from a torch.Generator, so a
#     seed gives the same views on any device, and they reach the device in ONE copy;
#   - a step with probability p runs on every image, with an identity parameter for the images it skips
#     (factor 1, hue shift 0, grey weight 0), but for the blur and the solarisation, whose work is worth
#     gathering the chosen images (`on_chosen_`);
#   - brightness, contrast and saturation are blends, and contrast and saturation fold into one.
# Images are floats in [0, 1] from the crop on. PIL rounds to uint8 after every step, which moves values
# by up to ~1/255 per step.

LUMA = (0.299, 0.587, 0.114)        # ITU-R 601 weights, PIL's convert("L") and torchvision's grayscale


def view_groups(recipes):
    """The views made as one batch, those of one crop size and scale: lists of view indices, in order of
    first appearance (DINO's: [0, 1], the globals, and [2, ..., 7], the locals)."""
    groups = {}
    for i, recipe in enumerate(recipes):
        groups.setdefault((recipe.size, recipe.scale), []).append(i)
    return list(groups.values())


def sample_crop_boxes(batch, height, width, scale, generator, ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision's RandomResizedCrop.get_params for `batch` images at once -> (B, 4) int64 boxes
    (x0, y0, w, h) in pixels.

    Per image, as torchvision: up to 10 attempts of an area fraction ~ U(scale) and an aspect ratio
    log-uniform in `ratio`, rounded to whole pixels; the first attempt that fits is kept and placed
    uniformly; if none fits, the largest centred crop whose aspect ratio lies in `ratio`. All attempts
    are drawn at once and the first fitting one picked: the same distribution as the loop.
    """
    area = torch.empty(batch, attempts).uniform_(*scale, generator=generator) * (height * width)  # (B, 10)
    log_ratio = torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * aspect)).long()                       # (B, 10); round half to even,
    h = torch.round(torch.sqrt(area / aspect)).long()                       # as Python's round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)                 # (B, 10)
    first = fits.long().argmax(dim=1, keepdim=True)                         # (B, 1), first fitting attempt
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]               # (B,)
    # Fallback, the same for every image of the size: the whole image, cut to the nearest allowed ratio.
    if width / height < ratio[0]:
        fallback_w, fallback_h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        fallback_w, fallback_h = int(round(height * ratio[1])), height
    else:
        fallback_w, fallback_h = width, height
    found = fits.any(dim=1)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    # x0 ~ U{0, ..., width - w}, like torch.randint(0, width - w + 1); centred for the fallback.
    u = torch.rand(batch, 2, generator=generator)
    x0 = torch.where(found, (u[:, 0] * (width - w + 1)).long(), (width - w) // 2)
    y0 = torch.where(found, (u[:, 1] * (height - h + 1)).long(), (height - h) // 2)
    return torch.stack([x0, y0, w, h], dim=1)


def crop_geometry(boxes, flip, size):
    """Where the output pixels of each crop lie in its image, on the CPU: boxes (N, 4) (x0, y0, w, h),
    flip (N,) bool -> dict of (2, N) float tensors, [0] along the rows (y), [1] along the columns (x):

        first, step   output pixel i is centred on source position first + i step, where source pixel j
                      is centred on j: as PIL's Resample.c, on start + (i + 1/2) length / size - 1/2
        widening      max(1, length / size): when shrinking, PIL widens the kernel by this factor, so that
                      it also filters out the detail too fine for the output (antialiasing)
        middle, half  source pixel j lies in the crop when |j - middle| < half

    A mirrored crop reads its columns from the right (output i at output size-1-i's centre, a negative
    step), so the flip costs nothing on the device.
    """
    x0, y0, w, h = boxes.float().unbind(1)
    start, length = torch.stack([y0, x0]), torch.stack([h, w])                  # (2, N), rows then columns
    scale = length / size                                                       # source pixels per output pixel
    mirrored = torch.stack([torch.zeros_like(flip), flip])                      # (2, N); rows never mirror
    first = start - 0.5 + torch.where(mirrored, size - 0.5, 0.5) * scale
    return {"first": first, "step": torch.where(mirrored, -scale, scale), "widening": scale.clamp_min(1.0),
            "middle": start + (length - 1) / 2, "half": length / 2}


def cubic_kernel(t, a=-0.5):
    """PIL's bicubic filter (Keys' cubic convolution, a = -0.5): weight of a pixel t pixels away, 0 from |t| = 2."""
    t = t.abs().clamp_max(2)                                      # far(2) = 0, so the clamp zeroes |t| > 2
    near = ((a + 2) * t - (a + 3)) * t * t + 1                    # |t| < 1
    far = (((t - 5) * t + 8) * t - 4) * a                         # 1 <= |t| <= 2
    return torch.where(t < 1, near, far)


def resize_matrices(geometry, size, source_size):
    """The weights of PIL's bicubic resize of each crop, along the rows and the columns at once:
    geometry (crop_geometry's, on the device) -> (2, N, size, source_size), row i of matrix [a, n] the
    weights output pixel i of crop n gives each source pixel along axis a; each row sums to one.

    Source pixels outside the crop get no weight, as PIL resizes the cut crop. Only the pixels under the
    kernel (taps) are evaluated, then added into the full rows. The kernel reaches less than 2 widening
    pixels, and no crop is wider than the image, so 2 ceil(2 source_size / size) taps around the centre
    cover it: a bound known without reading the boxes on the host.
    """
    reach = math.ceil(2 * source_size / size)
    device = geometry["first"].device
    positions = constant(tuple(range(size)), device, torch.float32).view(-1, 1)              # (size, 1)
    taps = constant(tuple(range(1 - reach, reach + 1)), device, torch.float32)                # (T,)
    first, step, widening, middle, half = (geometry[k][..., None, None] for k in
                                           ("first", "step", "widening", "middle", "half"))  # each (2, N, 1, 1)
    centre = torch.addcmul(first, step, positions)                                           # (2, N, size, 1)
    source = torch.floor(centre) + taps                                                      # (2, N, size, T)
    weights = cubic_kernel((source - centre) / widening) * ((source - middle).abs() < half)
    weights = weights / weights.sum(dim=3, keepdim=True)
    matrices = torch.zeros(*centre.shape[:3], source_size, device=device)
    # taps outside the image have weight 0 (outside the crop), so clamping their index changes nothing
    return matrices.scatter_add_(3, source.clamp(0, source_size - 1).long(), weights)


@lru_cache(maxsize=None)
def products_dtype(device):
    """The dtype of the crops' matrix products (the resize and the blur) on `device`: bf16 on a CPU that
    multiplies it natively (AVX-512 BF16 or AMX), where they run 3-4x faster than in float32 (this
    project's 2-core Zen 4, 96 px crops); float32 elsewhere: on CPUs without it bf16 is emulated, and on a
    GPU the products are a sliver of a step bound by launches, which the casts would add to."""
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def resized_crops(source, geometry, size):
    """Cut each crop from its image, resize it to size x size, mirror it where crop_geometry says:
    source (B, H, 3, W) pixel values 0 ... 255 in the products' dtype (products_dtype), the image's
    channels side by side in each row; n crops per image (geometry (2, n B), crop b of view v at v B + b)
    -> (n B, 3, size, size) float32 in [0, 1].

    PIL's crop-then-bicubic-resize is separable: R X C^T, one matrix per axis and crop. Along the rows
    all n crops and 3 channels of an image at once, (B, n size, H) @ (B, H, 3 W); then, channels first,
    along the columns one product per crop, (n B, 3 size, W) @ (n B, W, size). PIL clips the cubic's
    overshoot to [0, 255] after each of its two passes; here once, at the end (a difference only next to
    sharp edges).

    In bf16 (products_dtype) the source is exact, as bf16 holds the integers 0 ... 255 exactly; what it
    rounds is each weight, by up to 2^-8 of itself (so a pixel's weights sum to one within about 0.4%),
    and each pass's output, to bf16's grid: whole grey levels from 128 to 256, as PIL rounds, finer below,
    steps of 2 levels above 256 (the cubic's overshoot, clipped at the end). Where the weights' sum is
    near one the rounded output mostly lands back on the source's level: on 200 CIFAR-10 images, 0.29
    grey levels from PIL on average in float32, 0.32 in bf16; at most 2 levels off on a smooth image,
    1.1 in float32. (Dividing by the rounded weights' sums halved the worst case, a flat region's, but
    moved the average to 0.35: such outputs no longer land on whole levels.)
    """
    batch, height, _, width = source.shape
    rows, columns = resize_matrices(geometry, size, max(height, width)).to(source.dtype)   # each (n B, size, max(H, W))
    views = len(rows) // batch
    rows = rows[..., :height].reshape(views, batch, size, height).transpose(0, 1).reshape(batch, -1, height)
    crops = torch.bmm(rows, source.view(batch, height, 3 * width))             # (B, n size, 3 W)
    crops = crops.view(batch, views, size, 3, width).permute(1, 0, 3, 2, 4).reshape(-1, 3 * size, width)
    crops = torch.bmm(crops, columns[..., :width].transpose(1, 2))             # (n B, 3 size, size)
    crops = crops.view(-1, 3, size, size)
    return crops.float().div_(255).clamp_(0, 1)                                # (n B, 3, size, size) in [0, 1]


# The photometric steps change their input in place (the trailing _ of PyTorch's in-place methods): the
# batch of a view group is large (6 x 256 local crops of 48 px: 42 MB), and on a CPU a fresh tensor of
# that size is fresh memory from the system at every operation (glibc serves allocations above 32 MB
# that way), which made each operation several times slower than its arithmetic. Temporaries are kept
# to one channel.

def per_image(values):
    """(N,) per-image values -> (N, 1, 1, 1), to broadcast over (N, 3, h, w)."""
    return values.view(-1, 1, 1, 1)


def luminance(x):
    """The luma: (N, 3, h, w) -> (N, 1, h, w)."""
    r, g, b = x.split(1, dim=1)
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2])


def color_jitter_(x, brightness, contrast, saturation, hue):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) in place, with each image's own factors (N,) (identity: 1, 1, 1,
    0), in the fixed order brightness, contrast, saturation, hue: (N, 3, h, w) in [0, 1] -> x.

    Deviation: torchvision draws a new order of the four operations at every call; here it is always
    the same. Why that changes little: the first three are blends of the image with black, with its mean
    grey level m and with its own grey version, and each keeps the grey levels the others blend with (in
    proportion), so they commute exactly until a value is clipped at 0 or 1 (test_hydes.py checks this).
    The same fact folds contrast f and saturation g into one blend, as lum(f x + (1 - f) m) = f lum(x) +
    (1 - f) m:   g (f x + (1 - f) m) + (1 - g) lum(f x + (1 - f) m) = g f x + (1 - g) f lum(x) + (1 - f) m,
    clipped once where PIL clips after each. On 2,000 CIFAR images with random factors it moves the mean
    difference from PIL's recipe from 1.36/255 to 1.38/255 (PIL's uint8 rounding is the rest); folding
    the brightness in too would make it 1.77/255, as its clipping changes the mean m, so it stays apart.
    """
    f, g = per_image(contrast), per_image(saturation)
    x.mul_(per_image(brightness)).clamp_max_(1)                    # the blend with black (x >= 0)
    grey = luminance(x)                                            # (N, 1, h, w)
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)                  # (N, 1, 1, 1), m
    x.mul_(g * f).add_(torch.addcmul((1 - f) * mean, (1 - g) * f, grey)).clamp_(0, 1)
    return adjust_hue_(x, hue)


def adjust_hue_(x, shift):
    """Rotate the hue by shift (N,) turns through HSV in place, as torchvision does; saturation and value
    kept: (N, 3, h, w) -> x.

    RGB -> HSV with the hue in sixths of a turn, as torchvision: by the largest channel R, G or B (on ties
    the first), hue = (g - b) / chroma, 2 + (b - r) / chroma or 4 + (r - g) / chroma. Back with the
    closed form for each channel n = 5, 3, 1 (R, G, B): value - chroma clamp(min(k, 4 - k), 0, 1),
    k = (n + hue) mod 6, which is value - chroma (2 - clamp(d, 1, 2)) with d the distance from k to the
    nearest of 2 + 6 Z. Here k = n + hue + 6 shift lies in (-1, 11) for |shift| < 1/6 turn (at most 0.1),
    where d = ||k - 5| - 3|, the distance to the nearer of 2 and 8 (the others are 3 or more away, and
    any d above 2 counts as 2): no modulo, no branch. Grey pixels (chroma 0) are unchanged whatever their hue.
    """
    r, g, b = x.split(1, dim=1)                                                  # each (N, 1, h, w)
    value = x.amax(dim=1, keepdim=True)
    chroma = value - x.amin(dim=1, keepdim=True)
    hue = torch.where(value == r, g - b, torch.where(value == g, (b - r).add_(chroma, alpha=2),
                                                     (r - g).add_(chroma, alpha=4)))
    hue = hue / chroma.clamp_min(1e-12)                                          # (N, 1, h, w), in [-1, 5)
    n = constant((5.0, 3.0, 1.0), x.device, x.dtype).view(3, 1, 1)               # R, G, B
    k = x.copy_(hue).add_(6 * per_image(shift) + n)                              # (N, 3, h, w), x's memory
    return k.sub_(5).abs_().sub_(3).abs_().clamp_(1, 2).mul_(chroma).add_(value - 2 * chroma)


def grayscale_(x, weight):
    """In place, the luma in all three channels (PIL convert("L") then back to RGB) where weight (N,) is
    1, the image where it is 0: (N, 3, h, w) -> x."""
    return x.lerp_(luminance(x), per_image(weight))                            # exact at weights 0 and 1


def blur_kernels(sigma):
    """(N,) sigmas in pixels -> (N, 13) sampled Gaussians of radius 3 sigma_max = 6 px (the cut tails hold
    0.3% of the weight at sigma = 2), normalised. Drawn on the CPU with the other parameters."""
    radius = math.ceil(3 * BLUR_SIGMA[1])
    kernels = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma.view(-1, 1) ** 2))   # (N, 13)
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_blur(x, kernels):
    """Blur each square image with its own kernel (blur_kernels'): (N, 3, s, s) -> (N, 3, s, s).

    PIL's GaussianBlur(radius) takes the standard deviation in pixels of the image it is given, so the
    same sigma ~ U(0.1, 2.0) applies to 96 and 16 px crops alike, as here. The blur is separable: M X M^T
    with one (s, s) matrix per image, (M x)_i = sum_k g_k x_clamp(i+k), the image border extended outwards
    as PIL's box filters do; two batched matrix products, faster on a CPU than a grouped convolution, in
    bf16 where the device has it natively (products_dtype): x, each pass's output and each weight
    rounded by up to 2^-8 of their values, and each output pixel divided by the sums of its rounded
    weights (r_i r_j), which makes them sum to one again. Unlike the resize's source, x is not on bf16's
    grid, so the division helps here: 0.23 grey levels from float32 on average against 0.27 without it.
    Deviation: PIL approximates the Gaussian by three extended box filters; this is the sampled Gaussian
    (inside the image they agree to ~1/255 at sigma = 2; below sigma ~1 PIL's blurs noticeably more).
    """
    count, size, radius = len(x), x.shape[-1], kernels.shape[1] // 2
    pixels = constant(tuple(range(size)), x.device, torch.long).view(-1, 1)
    source = (pixels + constant(tuple(range(-radius, radius + 1)), x.device, torch.long)).clamp(0, size - 1)   # (s, 13)
    matrices = torch.zeros(count, size, size, device=x.device).scatter_add_(
        2, source.expand(count, -1, -1), kernels[:, None, :].expand(-1, size, -1))   # (N, s, s)
    matrices = matrices.to(products_dtype(x.device))        # bf16 or float32, as resized_crops' products
    blurred = torch.bmm(x.reshape(count, 3 * size, size).to(matrices.dtype), matrices.transpose(1, 2))  # along w: (N, 3 s, s)
    blurred = matrices[:, None] @ blurred.view(count, 3, size, size)           # along h: (N, 1, s, s) @ (N, 3, s, s)
    if matrices.dtype == torch.float32:
        return blurred
    sums = matrices.float().sum(2)                                             # (N, s): r_i
    # .float() then in place: torch.div(bf16, float32) takes a slow path on a CPU (several times slower)
    return blurred.float().div_((sums[:, :, None] * sums[:, None, :])[:, None])   # / (N, 1, s, s) r_i r_j


def solarize(x):
    """Invert the pixels at or above 128/255 (PIL ImageOps.solarize: 255 - v where v >= 128)."""
    return torch.where(x >= 128 / 255, 1 - x, x)


def on_chosen_(x, chosen, operation, *per_image_args):
    """x[chosen] = operation(x[chosen], *per_image_args), in place: for the steps whose work is worth
    gathering the chosen images (the blur, p = 0.1 to 1; the solarisation, 0.2 in one view), where the
    others run on every image with an identity parameter. chosen: (b,) indices as floats, on x's device
    (draw_parameters'); per_image_args: tensors (b, ...) of the chosen images. -> x"""
    if len(chosen):                                    # a shape, known on the host: no device read
        rows = chosen.long()
        x[rows] = operation(x[rows], *per_image_args)
    return x


def normalize_(x):
    """In place, x / std - mean / std per channel with ImageNet's statistics, as T.Normalize after
    T.ToTensor: (N, 3, h, w) in [0, 1] -> x, normalised."""
    scale = constant(tuple(1 / s for s in IMAGENET_STD), x.device, x.dtype).view(3, 1, 1)
    shift = constant(tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)), x.device, x.dtype).view(3, 1, 1)
    return x.mul_(scale).add_(shift)


def draw_parameters(recipes, batch, image_size, generator):
    """Every random choice of one view group (view_groups), drawn on the CPU: `recipes` the group's n
    views, `image_size` (H, W) to cut the crops from, or None for views already cut (FullImageCrops)
    -> dict of float tensors, crop b of view v at v B + b:

        first ... half                 crop_geometry's (2, n B), when cutting crops
        brightness, contrast,          (n B,) jitter factors, the identity (1, 1, 1, 0) where no jitter
        saturation, hue
        grey                           (n B,) 1 for grayscale, else 0
        blurred, kernels               (b,) indices of the crops to blur, (b, 13) their kernels
        solarised                      indices of the crops to solarise

    Every crop draws all its parameters whether or not a step applies, in an order set by the generator
    alone: the boxes (MultiCrop's RandomResizedCrop), the flips, then one (n B, 9) uniform draw. The
    chosen crops' indices are found here, on the CPU, so a GPU never waits for a nonzero().
    """
    count = batch * len(recipes)
    parameters = {}
    if image_size is not None:
        boxes = sample_crop_boxes(count, *image_size, recipes[0].scale, generator)
        flip = torch.rand(count, generator=generator) < FLIP_P
        parameters.update(crop_geometry(boxes, flip, recipes[0].size))

    def chance(name):                                  # (n B,) the probability of the step in each crop's view
        return torch.tensor([getattr(recipe, name) for recipe in recipes]).repeat_interleave(batch)

    def between(u, low, high):
        return low + (high - low) * u

    u = torch.rand(count, 9, generator=generator).unbind(1)  # jitter, its 4 factors, grey, blur, sigma, solarise
    jitter = u[0] < chance("jitter_p")
    for column, (name, spread) in enumerate((("brightness", BRIGHTNESS), ("contrast", CONTRAST),
                                             ("saturation", SATURATION), ("hue", HUE)), start=1):
        identity = 0.0 if name == "hue" else 1.0
        parameters[name] = torch.where(jitter, between(u[column], identity - spread, identity + spread), identity)
    parameters["grey"] = (u[5] < chance("grayscale_p")).float()
    blurred = u[6] < chance("blur_p")
    parameters["blurred"] = torch.nonzero(blurred)[:, 0].float()        # exact as floats below 2^24
    parameters["kernels"] = blur_kernels(between(u[7][blurred], *BLUR_SIGMA))
    parameters["solarised"] = torch.nonzero(u[8] < chance("solarize_p"))[:, 0].float()
    return parameters


def to_device(parameters, device):
    """A list of dicts of small CPU float tensors -> the same on `device`, moved by ONE copy: on a GPU
    each copy is a transfer with a launch of its own."""
    tensors = [t for group in parameters for t in group.values()]
    packed = torch.cat([t.reshape(-1) for t in tensors])
    # From page-locked memory a GPU copies while the host goes on; from ordinary memory the copy may make
    # the host wait for the GPU to finish the previous step's work first
    packed = packed.pin_memory() if device.type == "cuda" else packed
    packed = packed.to(device, non_blocking=True)
    parts = iter(packed.split([t.numel() for t in tensors]))                    # views of the one copy
    return [{name: next(parts).view(t.shape) for name, t in group.items()} for group in parameters]


def photometric_views_(x, recipes, parameters):
    """MultiCrop's steps after the flip for one view group, in place: jitter, grayscale, blur, solarise,
    normalise. x (N, 3, h, w) float in [0, 1]; parameters: draw_parameters', on x's device -> (N, 3, h, w)
    normalised. A step that no view of the group takes is skipped (the supervised baseline takes none)."""
    p = parameters
    if any(recipe.jitter_p for recipe in recipes):
        x = color_jitter_(x, p["brightness"], p["contrast"], p["saturation"], p["hue"])
    if any(recipe.grayscale_p for recipe in recipes):
        x = grayscale_(x, p["grey"])
    x = on_chosen_(x, p["blurred"], gaussian_blur, p["kernels"])
    x = on_chosen_(x, p["solarised"], solarize)
    return normalize_(x)


CPU_CHUNK_VALUES = 4_000_000    # float32 values of the views a CPU makes at once (16 MB): 41 STL-10 images, 372 CIFAR


class BatchedMultiCrop:
    """A uint8 batch (B, 3, H, W), all images the same size, on any device -> list of V float tensors
    (B, 3, h, w), globals first, normalised: what MultiCrop gives after DataLoader collation, so the
    model code is the same. `recipes`: MultiCrop's (dino_recipes) or the supervised baseline's
    (supervised_recipes). Where it deviates from MultiCrop (fixed jitter order, one clip for contrast and
    saturation, sampled Gaussian blur, float arithmetic between steps, one clip after the crop's two
    passes) the functions above say so.

        crops = BatchedMultiCrop(dino_recipes(32, 16))   # or supervised_recipes(32): Table I's baseline
        views = crops(images.to(device), generator)     # generator: a CPU torch.Generator, seeded once

    Images of mixed sizes cannot share a batch: the loading workers cut their crops (FullImageCrops), and
    the call takes the list of V uint8 views (B, 3, s, s) instead, and adds the photometric steps.
    """

    def __init__(self, recipes):
        self.recipes = recipes
        self.groups = view_groups(recipes)
        self.group_recipes = [[recipes[i] for i in group] for group in self.groups]     # each group's n recipes

    def __call__(self, images, generator):
        cut = isinstance(images, (list, tuple))                    # views already cut by the loading workers
        if cut:
            sizes = [r.size for r in self.recipes]
            if [tuple(v.shape[1:]) for v in images] != [(3, s, s) for s in sizes] or images[0].dtype != torch.uint8:
                raise ValueError(f"BatchedMultiCrop expects {len(sizes)} uint8 views (B, 3, s, s) of sides {sizes}, "
                                 f"got {[(v.dtype, tuple(v.shape)) for v in images]}")
        elif images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchedMultiCrop expects a uint8 batch (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        batch, device = len(images[0]) if cut else len(images), images[0].device
        parameters = [draw_parameters(r, batch, None if cut else tuple(images.shape[2:]), generator)
                      for r in self.group_recipes]
        # On a GPU the whole batch at once (fewer launches). On a CPU a few images at a time: each step's
        # output then stays in the caches, and under glibc's 32 MB threshold for fresh memory from the
        # system (whose first touch of every page costs more than the arithmetic); the same views, as
        # every parameter was drawn for the whole batch.
        values = sum(3 * r.size ** 2 for r in self.recipes)                    # float32 values of one image's views
        chunk = max(1, CPU_CHUNK_VALUES // values) if device.type == "cpu" else batch
        if chunk >= batch:
            return self.views(images, to_device(parameters, device), cut)
        views = [torch.empty(batch, 3, r.size, r.size, device=device) for r in self.recipes]
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            part = [parameters_of_images(p, len(r), batch, start, stop)
                    for p, r in zip(parameters, self.group_recipes)]
            made = self.views([v[start:stop] for v in images] if cut else images[start:stop],
                              to_device(part, device), cut)
            for view, part_view in zip(views, made):
                view[start:stop] = part_view
        return views

    def views(self, images, parameters, cut):
        """The V views of images (a uint8 batch (b, 3, H, W), or V uint8 views (b, 3, s, s) when `cut`),
        with parameters drawn for them (draw_parameters', one dict per view group, on their device)."""
        batch, device = len(images[0]) if cut else len(images), images[0].device
        if not cut:       # (b, 3, H, W) uint8 -> (b, H, 3, W) 0 ... 255 in bf16 or float32 (resized_crops'), once
            source = images.permute(0, 2, 1, 3).to(products_dtype(device), memory_format=torch.contiguous_format)
        views = [None] * len(self.recipes)
        for group, group_recipes, p in zip(self.groups, self.group_recipes, parameters):
            if cut:       # n views (b, 3, s, s) uint8 -> (n b, 3, s, s) float, crop i of view v at v b + i
                x = torch.cat([images[i] for i in group]).float().div_(255)
            else:
                x = resized_crops(source, p, group_recipes[0].size)
            x = photometric_views_(x, group_recipes, p)                              # (n b, 3, s, s)
            for i, view in zip(group, x.split(batch)):                               # contiguous (b, 3, s, s)
                views[i] = view
        return views


def parameters_of_images(parameters, views, batch, start, stop):
    """draw_parameters' dict for the n = `views` crops of each of `batch` images -> the same for images
    start ... stop-1 alone, crop b of view v at v (stop - start) + b - start. Made on the CPU."""
    per_crop = {name: t.unflatten(-1, (views, batch))[..., start:stop].flatten(-2)
                for name, t in parameters.items() if name not in ("blurred", "kernels", "solarised")}
    for name, extra in (("blurred", "kernels"), ("solarised", None)):
        crop = parameters[name].long()                                              # (k,) crop indices v B + b
        view, image = crop // batch, crop % batch
        kept = (image >= start) & (image < stop)
        per_crop[name] = (view * (stop - start) + image - start)[kept].float()
        if extra:
            per_crop[extra] = parameters[extra][kept]
    return per_crop


# ----------------------------------------------------------------------------------------------------
# uint8 images for BatchedMultiCrop: decoded once into (device) memory, or by DataLoader workers
#
# CIFAR-10/100 (50k x 3 KB) and STL-10 (105k x 27 KB, 2.9 GB) fit in a GPU's memory as uint8: decode
# them once, keep them there, and an epoch is a permutation and index operations, with no workers at
# all; every view is cut on the device. ImageNet, Food-101 and folders of mixed sizes neither fit nor
# share one size, so their images cannot even be stacked into a batch. DataLoader workers decode each
# image and cut its V crops from the whole of it, as MultiCrop does (FullImageCrops); the photometric
# steps stay on the device, batched. Cropping a fixed-size centre square on the device instead would lose
# the ends of the long side (a quarter of a 500 x 375 image) and make a 5% local crop a 57 px patch of
# a 256 px square, upscaled to 96. The views travel as uint8 (4x fewer bytes than floats to pin and
# copy): 2 x 224^2 + 6 x 96^2 = 155,648 pixels an image, 2.4x the 65,536 of one 256 px square.

def one_image_size(name, root):
    """Whether all the training images of a dataset have one size: CIFAR's and STL-10's do, ImageNet's
    and Food-101's do not, a `folder`'s are asked (their headers, read once per process)."""
    if name in ("cifar10", "cifar100", "stl10"):
        return True
    return name == "folder" and len(folder_image_sizes(root)) == 1


def uint8_dataset(name, root, recipes, labelled=False):
    """The training images (`pretrain_dataset`, or with `labelled` the labelled train split that the
    supervised baseline needs) for BatchedMultiCrop with these `recipes` (dino_recipes), in uint8:

    - images of one size (`one_image_size`): item i is (image (3, H, W), label) at native size, as
      MultiCrop sees it; BatchedMultiCrop cuts the crops of a batch on the device.
    - images of mixed sizes: a FullImageCrops, whose item (i, seed) is (V views (3, s, s), label),
      each cut from the whole image by the loading worker.
    """
    whole = one_image_size(name, root)
    transform = T.PILToTensor() if whole else None               # None: PIL images, for FullImageCrops
    dataset = dataset_split(name, root, "train", transform) if labelled else pretrain_dataset(name, root, transform)
    return dataset if whole else FullImageCrops(dataset, recipes)


class FullImageCrops(torch.utils.data.Dataset):
    """The multi-crop's geometry in the loading workers, for images of mixed sizes: item (index, seed)
    -> (V views uint8 (3, s, s), globals first; label), from `images`, a dataset of (PIL image, label).

    Each view is MultiCrop's first two steps on the whole decoded image: a box drawn by sample_crop_boxes,
    the function the device uses, so torchvision's RandomResizedCrop.get_params; the box cut and resized
    by PIL's antialiased bicubic, exactly as T.RandomResizedCrop does; a mirror with probability 1/2.
    Every draw comes from a generator seeded by `seed`, so the views are a function of (index, seed)
    alone, never of which worker made them; `CropSeeds` gives each image of a step its seed.
    BatchedMultiCrop then adds the photometric steps on the device.
    """

    def __init__(self, images, recipes):
        self.images, self.recipes, self.classes = images, recipes, images.classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item
        image, label = self.images[index]                              # PIL image, RGB, of any size
        boxes, flips = self.geometry(*image.size, self.recipes, torch.Generator().manual_seed(seed))
        views = []
        for (x0, y0, w, h), flip, recipe in zip(boxes, flips, self.recipes):
            view = image.crop((x0, y0, x0 + w, y0 + h)).resize((recipe.size, recipe.size), Image.BICUBIC)
            views.append(T.functional.pil_to_tensor(view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view))
        return views, label

    @staticmethod
    def geometry(width, height, recipes, generator):
        """The views' boxes and flips on a width x height image: V boxes [x0, y0, w, h] and V bools.
        sample_crop_boxes runs once per crop scale (globals, locals) for all the views of that scale:
        each call costs some 25 small tensor operations, so one call per view would cost as much time
        as decoding the image."""
        boxes = torch.empty(len(recipes), 4, dtype=torch.long)                     # (V, 4)
        for scale in dict.fromkeys(recipe.scale for recipe in recipes):           # each scale once, in order
            chosen = [i for i, recipe in enumerate(recipes) if recipe.scale == scale]
            boxes[chosen] = sample_crop_boxes(len(chosen), height, width, scale, generator)
        flips = torch.rand(len(recipes), generator=generator) < FLIP_P            # (V,)
        return boxes.tolist(), flips.tolist()


def load_into_memory(dataset, device, workers=0, batch_size=256):
    """Decode every image of a uint8 dataset once -> images uint8 (N, 3, H, W), labels int64 (N,), on device.
    The images are written into one preallocated tensor, not concatenated from batches (which would
    hold them twice over); once the caller drops the dataset, this copy is the only one."""
    first, _ = dataset[0]
    images = torch.empty((len(dataset), *first.shape), dtype=torch.uint8)     # (N, 3, H, W)
    labels = torch.empty(len(dataset), dtype=torch.int64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    start = 0
    for batch_images, batch_labels in tqdm(loader, desc="decoding the training images into memory", leave=False):
        images[start:start + len(batch_images)] = batch_images
        labels[start:start + len(batch_images)] = batch_labels
        start += len(batch_images)
    return images.to(device), labels.to(device)


def eval_transform(image_size, normalised=True):
    """Deterministic transform for the probes: resize, centre crop, normalise (no augmentation).

    ImageNet-sized data follow the usual 256 -> 224 protocol (resize the short side to size * 8/7, crop
    the centre); small images (CIFAR, STL-10) are resized to the crop size, a no-op at native size.
    normalised=False stops before the tensor: uint8 (3, size, size), which `normalize(x / 255)` turns into
    exactly what the full transform gives (train.py's monitor keeps such images in memory).
    """
    resize = round(image_size * 8 / 7) if image_size >= 128 else image_size
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        TO_NORMALISED_TENSOR if normalised else T.PILToTensor(),
    ])


def default_crop_sizes(image_size):
    """(global, local) crop sizes that follow the data's resolution, as in the paper:
    32 px data -> 32/16, STL-10's 96 px -> 96/48, ImageNet and Food-101 -> 224/96."""
    if image_size >= 128:
        return 224, 96
    return image_size, image_size // 2


# ----------------------------------------------------------------------------------------------------
# Datasets by name

def native_image_size(name, root):
    """The side of the dataset's images: fixed for the named datasets; for `folder`, the median shorter
    side over the headers of all of train/'s images (one file alone could be a thumbnail or a poster)."""
    if name in NATIVE_SIZE:
        return NATIVE_SIZE[name]
    sizes = folder_image_sizes(root)
    shorter_sides = sorted((min(size), count) for size, count in sizes.items())
    middle, seen = sum(sizes.values()) // 2, 0
    for side, count in shorter_sides:           # the weighted median
        seen += count
        if seen > middle:
            return side


def folder_image_sizes(root):
    """{(width, height): count} over the headers of every image in ROOT/train of a `folder` dataset.
    Files whose header cannot be read are left out here (they are named when they are decoded)."""
    dataset = _image_folder(os.path.join(root, "train"), "folder")
    sizes = _header_sizes(tuple(path for path, _ in dataset.samples))
    if not sizes:
        raise DatasetError(f"folder: no readable image in {os.path.join(root, 'train')!r}; every file failed to "
                           f"open (replace them, or point --data-dir elsewhere)")
    return sizes


@lru_cache(maxsize=4)
def _header_sizes(paths):
    """The sizes of the images at `paths`, from their headers only (no pixels are decoded), read once per
    process for a given list of files: the resolution and the in-memory decoding both need them, and
    50,000 small JPEGs take seconds."""
    sizes = {}
    for path in tqdm(paths, desc="reading the images' sizes", leave=False, mininterval=1):
        try:
            with Image.open(path) as img:
                sizes[img.size] = sizes.get(img.size, 0) + 1
        except (OSError, ValueError, Image.DecompressionBombError):   # a bomb's header claims a huge size
            continue
    return sizes


def pretrain_dataset(name, root, transform):
    """The images HyDeS trains on (labels, where the dataset has them, are never used)."""
    if name == "stl10":
        return _torchvision_dataset(name, root, "train+unlabeled", transform)
    return dataset_split(name, root, "train", transform)


def dataset_split(name, root, split, transform):
    """A labelled split, `train` or `test`, with `transform` applied; `.classes` lists the class names."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    if name in ("cifar10", "cifar100", "stl10", "food101"):
        return _torchvision_dataset(name, root, split, transform)
    if name in ("imagenet", "imagenet100", "folder"):
        train_folder = os.path.join(root, "train")
        if split == "train":
            return _image_folder(train_folder, name, transform, IMAGENET100_CLASSES if name == "imagenet100" else None)
        test_folder = os.path.join(root, "val")
        if name == "folder":
            test_folder = next((os.path.join(root, s) for s in ("test", "val") if os.path.isdir(os.path.join(root, s))),
                               os.path.join(root, "test"))
        # Labels are indices into a class list: the test split's must be the train split's, matched by
        # name. Two ImageFolders would each number their own sorted folders, so a test split lacking one
        # class would shift every label after it, and the probes would score right answers as wrong.
        train_classes = (IMAGENET100_CLASSES if name == "imagenet100"
                         else _image_folder(train_folder, name, classes_only=True))
        return _image_folder(test_folder, name, transform, train_classes, subset=name == "imagenet100")
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


_EXPECTED_FILES = {
    "cifar10": "cifar-10-batches-py/ (extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)",
    "cifar100": "cifar-100-python/ (extract cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)",
    "stl10": "stl10_binary/ (extract stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/)",
    "food101": "food-101/ (extract food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/)",
}


def _torchvision_dataset(name, root, split, transform):
    """CIFAR-10/100, STL-10, Food-101 from torchvision: local files first, then a download attempt."""
    def build(download):
        if name in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            return cls(root, train=(split == "train"), transform=transform, download=download)
        if name == "stl10":
            return torchvision.datasets.STL10(root, split=split, transform=transform, download=download)
        return torchvision.datasets.Food101(root, split=split, transform=transform, download=download)

    try:
        return build(download=False)
    except (RuntimeError, FileNotFoundError):
        pass
    try:
        os.makedirs(root, exist_ok=True)
        return build(download=True)
    except Exception as error:  # network errors come in many types (URLError, socket errors, HTTP errors)
        raise DatasetError(
            f"{name} is not in {root!r} and could not be downloaded ({type(error).__name__}); "
            f"put {_EXPECTED_FILES[name]} in {root!r}, or pass --data-dir pointing to the folder that holds it"
        ) from None


def _image_folder(folder, name, transform=None, classes=None, subset=True, classes_only=False):
    """An ImageFolder (folder/<class>/<image>) whose labels index `classes` (sorted), or its own sorted
    class folders when None. subset: the folder may hold other classes, which are ignored (ImageNet-100
    inside an ImageNet tree), and all of `classes` must be there; otherwise every class folder must be in
    `classes`, which need not all be there (a test split labelled by its train split's classes).
    classes_only: just the class names (no file listed)."""
    if not os.path.isdir(folder):
        raise DatasetError(
            f"{name}: folder {folder!r} does not exist; --data-dir must hold train/<class>/*.jpg and "
            f"test/<class>/*.jpg (or val/)"
        )
    present = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if classes_only:
        return present
    if classes is not None:
        missing = sorted(set(classes) - set(present)) if subset else []
        if missing:
            raise DatasetError(f"{name}: {len(missing)} of its classes are missing from {folder!r}, "
                               f"for example {missing[0]}; it needs ImageNet's train/ and val/ in wnid folders")
        unknown = [] if subset else sorted(set(present) - set(classes))
        if unknown:
            raise DatasetError(f"{name}: {folder!r} has a class the training split lacks, {unknown[0]!r} "
                               f"({len(unknown)} in all); the splits must name their class folders alike")
    try:
        if classes is None:
            return torchvision.datasets.ImageFolder(folder, transform=transform, loader=read_rgb)
        return NamedClassFolder(folder, classes, transform=transform)
    except FileNotFoundError as error:
        raise DatasetError(f"{name}: {error}") from None


class NamedClassFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder whose labels index a given class list rather than its own folders: ImageNet-100
    inside an ImageNet tree, or a test split labelled by its train split's classes. Class folders not
    in the list are ignored; listed classes without a folder have no images. ImageFolder's documented
    hook for this is find_classes. `.classes` is the whole list, so that label i is always classes[i]."""

    def __init__(self, folder, classes, transform=None):
        self.named = sorted(classes)
        super().__init__(folder, transform=transform, loader=read_rgb)

    def find_classes(self, directory):
        index = {c: i for i, c in enumerate(self.named)}
        return self.named, {c: index[c] for c in self.named if os.path.isdir(os.path.join(directory, c))}


# ----------------------------------------------------------------------------------------------------
# Reproducible data order: exact resume at any step, whatever the number of loading processes

class EpochOrder(torch.utils.data.Sampler):
    """Batches of image indices for one epoch, in an order drawn from a generator seeded by (seed, epoch)
    alone.

    The usual DataLoader shuffling draws its order from a generator whose state moves with every epoch.
    Here the b-th batch of epoch e is a pure function of (seed, e, b), so a run resumed at any step
    (`start_batch`) sees exactly the images an uninterrupted run would, with 0 or 16 workers alike (train.py
    seeds each step's augmentation from the step, likewise). The last incomplete batch is dropped, as the
    loss wants equal batches.

    Under data parallelism every process draws the same order, and process `rank` takes its
    batch_size / world_size images of each global batch of `batch_size`: the global batch, and so
    H_global over it, is the same whatever the number of processes.
    """

    def __init__(self, num_images, batch_size, seed, rank=0, world_size=1):
        if batch_size % world_size:
            raise ValueError(f"a batch of {batch_size} does not split evenly over {world_size} processes")
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.rank, self.per_process = rank, batch_size // world_size
        self.batches_per_epoch = num_images // batch_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        mixed_seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(mixed_seed)
        order = torch.randperm(self.num_images, generator=generator)                   # (num_images,)
        for b in range(self.start_batch, self.batches_per_epoch):
            first = b * self.batch_size + self.rank * self.per_process
            yield order[first:first + self.per_process].tolist()


def augmentation_seed(seed, step, rank, position=None):
    """The 64-bit seed of step `step`'s augmentation on process `rank` (train.py's generator of the
    step), or, with `position`, of the crops of the image at that position of the step's batch
    (FullImageCrops). The image's seed is a child of the step's numpy SeedSequence (spawn key
    (position,)), an independent stream; [seed, step, rank, position] would not do, for SeedSequence
    pads short entropy with zeros, which makes [seed, step, rank, 0] the step's own seed."""
    spawn_key = () if position is None else (position,)
    return int(np.random.SeedSequence([seed, step, rank], spawn_key=spawn_key).generate_state(1, np.uint64)[0])


class CropSeeds(torch.utils.data.Sampler):
    """The batches of `order` (an EpochOrder) as [(index, seed)] for FullImageCrops: image p of the batch
    of step t on process r gets augmentation_seed(seed, t, r, p), so its crops are a function of (seed,
    step, rank, position) like the rest of the step's augmentation, with any number of workers, and a
    resumed run cuts the crops an uninterrupted one would. The step is the order's epoch times its
    batches per epoch plus the batch, as train.py counts them."""

    def __init__(self, order):
        self.order = order

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        order = self.order
        for b, batch in enumerate(order, start=order.start_batch):
            step = order.epoch * order.batches_per_epoch + b
            yield [(index, augmentation_seed(order.seed, step, order.rank, p)) for p, index in enumerate(batch)]


class InMemoryBatches:
    """For each batch of `order`, (images (B, 3, H, W) uint8, labels (B,)) gathered by index from images
    already in the training device's memory: what a DataLoader would give, with no workers and no copies."""

    def __init__(self, images, labels, order):
        self.images, self.labels, self.order = images, labels, order

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        for batch in self.order:
            index = torch.tensor(batch)                                              # (B,)
            if self.images.device.type == "cuda":
                index = index.pin_memory()          # copied while the host goes on (to_device says why)
            index = index.to(self.images.device, non_blocking=True)
            yield self.images[index], self.labels[index]


class WorkerBatches:
    """For each batch of `order`, (images, labels (B,)) on `device`, decoded by `workers` DataLoader
    processes: for datasets too large to hold in memory. The images are a uint8 batch (B, 3, H, W), or,
    from a FullImageCrops (images of mixed sizes), the V uint8 views (B, 3, s, s) its workers cut, each
    image's crops seeded by CropSeeds."""

    def __init__(self, dataset, order, device, workers):
        self.order, self.device = order, device
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=CropSeeds(order) if isinstance(dataset, FullImageCrops) else order,
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=ignore_interrupts)

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        for images, labels in self.loader:
            if isinstance(images, list):                      # V views (B, 3, s, s)
                images = [view.to(self.device, non_blocking=True) for view in images]
            else:                                             # (B, 3, H, W)
                images = images.to(self.device, non_blocking=True)
            yield images, labels.to(self.device, non_blocking=True)


def ignore_interrupts(worker_id):
    """Ctrl-C reaches every process of the terminal's group; loading workers ignore it so that the
    training process decides when to stop (after its step and checkpoint), not a dying worker. SIGTERM
    they must obey, for the DataLoader ends a stuck worker with it: when a cluster's pre-emption sends
    it to all of a job's processes, train.py sees its workers gone and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _ReadCheck(torch.utils.data.Dataset):
    """Item i is '' if file i of an image folder decodes, else the reason it does not."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            read_rgb(self.paths[i])
            return ""
        except DatasetError as error:
            return str(error)


def drop_unreadable_images(dataset, workers=0):
    """--skip-bad-images: decode every file of an image folder once and drop those that fail.

    Done before training rather than by swapping in another image on the fly: the count is exact, the
    data order stays a function of the seed, and nothing surprises the run hours later. The cost is
    one decoding pass (about 10 s for 60k small JPEGs on one core). Returns the dropped paths.
    Datasets stored as arrays (CIFAR, STL-10) have no files to check; a FullImageCrops's folder is checked.
    """
    if isinstance(dataset, FullImageCrops):
        dataset = dataset.images
    if not hasattr(dataset, "samples"):
        return []
    paths = [path for path, _ in dataset.samples]
    loader = torch.utils.data.DataLoader(_ReadCheck(paths), batch_size=256, num_workers=workers,
                                         collate_fn=list)
    problems = [message for batch in tqdm(loader, desc="checking that every image decodes", leave=False)
                for message in batch]
    keep = [sample for sample, message in zip(dataset.samples, problems) if not message]
    dropped = [path for path, message in zip(paths, problems) if message]
    dataset.samples = dataset.imgs = keep
    dataset.targets = [label for _, label in keep]
    return dropped


# ----------------------------------------------------------------------------------------------------
# Shared by every script: pictures, and results as JSON lines and Markdown rows

def cpu_has_native_bf16():
    """Whether this CPU computes bf16 dot products in hardware: the avx512_bf16 (Cooper Lake, Zen 4 and
    later) or amx_bf16 (Sapphire Rapids and later) flags of /proc/cpuinfo, on Linux; False elsewhere.
    torch.backends.cpu.get_cpu_capability() does not tell: it names the widest vector instruction set
    PyTorch's own kernels use ("AVX512", "AVX2"), and Skylake's AVX-512 has no bf16, which oneDNN then
    emulates through float32 with conversions (so it saves little there, if anything; not measured)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@lru_cache(maxsize=None)
def constant(values, device, dtype):
    """A small tensor of `values` (a tuple) on `device`, made once per device and dtype: a tensor built
    from a Python list on a GPU is a copy the host waits for, which a training step should not."""
    return torch.tensor(values, dtype=dtype).to(device)


def imagenet_statistics(device, dtype):
    """ImageNet's channel mean and std as (3, 1, 1) tensors on `device`."""
    return constant(IMAGENET_MEAN, device, dtype).view(3, 1, 1), constant(IMAGENET_STD, device, dtype).view(3, 1, 1)


def normalize(x):
    """(x - mean) / std per channel with ImageNet's statistics, in T.Normalize's own arithmetic, so that
    uint8 images / 255 normalised here give exactly the tensors of ToTensor + Normalize (the probes'
    features; the crops use the faster in-place normalize_): (..., 3, h, w) -> the same shape."""
    mean, std = imagenet_statistics(x.device, x.dtype)
    return (x - mean) / std


def unnormalize(x):
    """The inverse of `normalize`: a normalised image (3, H, W) or batch (B, 3, H, W) back to [0, 1] RGB
    (up to rounding, which save_png clips)."""
    mean, std = imagenet_statistics(x.device, x.dtype)
    return x * std + mean


def save_png(picture, path):
    """Write a (3, H, W) picture with values in [0, 1] as an 8-bit RGB PNG."""
    pixels = (picture.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)


def append_jsonl(path, record):
    """Append one result as a JSON line: the files every script appends to (log.jsonl, eval.jsonl, ...)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """The records of a JSON-lines file. A last line cut short (a kill while appending) is dropped, with a
    warning; a broken line anywhere else is an error naming it."""
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise DatasetError(f"{path}, line {number}, is not JSON; repair or delete that line") from None
            print(f"warning: {path} ends in a line cut short (a run killed while writing it); it is ignored")
    return records


def write_atomically(path, write):
    """Call write(f) on a new file beside `path`, flush and fsync it, then rename it over `path`: readers
    see the old file or the new one, never half of one, whenever the process dies. The temporary name
    is unique (a second process writing the same path never touches this one's bytes); after a failure
    the temporary file is removed and the error raised (`path` is left as it was)."""
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)       # atomic: same folder, same file system
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)            # so that the rename itself survives a power cut
    finally:
        os.close(folder)


def first_problem(rules):
    """The message of the first rule (ok, message) that fails, or None: every script checks all its
    arguments this way before any work, so that a mistake costs a second and reads as one line."""
    return next((message for ok, message in rules if not ok), None)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every script's --help: the module docstring as written, and each flag's default after its help
    (unless the help already says it, or there is none to show)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in help:
            help += " (default: %(default)s)"
        return help


def refuse(problem):
    """Stop the script with `problem` as its one-line error message; no problem (None), no stop."""
    if problem:
        raise SystemExit(f"error: {problem}")


def unwritable(folder, option):
    """Why `folder` could not take a script's outputs (a path through a file, a read-only file system, no
    permission), as a one-line message naming `option`; None if it could. Nothing is created: the nearest
    folder that exists is asked."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot write in {folder} ({existing} is a file); pass {option} with a writable folder"
    if not os.access(existing, os.W_OK):
        return f"cannot write in {folder} (read-only or no permission); pass {option} with a writable folder"
    return None


def markdown_header(columns):
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def markdown_row(result, columns):
    """One table row: '| cifar10 | HyDeS | resnet18 | 200 | 72.54 | ... |' (blank where not measured)."""
    def cell(value):
        return f"{value:.2f}" if isinstance(value, float) else ("" if value is None else str(value))
    return "| " + " | ".join(cell(result.get(c)) for c in columns) + " |"


def report_row(result, columns, table=None):
    """Print a result as a Markdown table of one row and, with `table`, append the row to that file, a
    table that several runs share (its header written when the file is new)."""
    print(markdown_header(columns))
    print(markdown_row(result, columns))
    if table:
        new = not os.path.exists(table) or os.path.getsize(table) == 0
        with open(table, "a") as f:
            f.write((markdown_header(columns) + "\n" if new else "") + markdown_row(result, columns) + "\n")
