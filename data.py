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

The multi-crop is written once, here, and it is what training runs: the recipe (`ViewRecipe`,
`dino_recipes`), every random choice of a step's views drawn on the CPU (`draw_views`), and the views
made from a whole uint8 batch on the training device in batched tensor operations (`make_views`), to be
read beside DINO's DataAugmentationDINO (main_dino.py):

    recipes = dino_recipes(global_size=32, local_size=16)      # 2 global + 6 local views
    parameters = draw_views(recipes, sizes, generator)         # (8, B, 12) on the CPU, then on the device
    views = make_views(images, recipes, parameters)            # uint8 (B, 3, H, W) -> 8 tensors (B, 3, s, s)

train.py calls the two apart, so that make_views is compiled with the network (--compile);
`multi_crop` is both in one call, for the analysis and the benchmark.
"""

import itertools
import math
import os
import statistics
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms as T
from tqdm import tqdm

import settings
from checkpoints import write_atomically
from image_files import DatasetError, broken_links, files_in_class_folders, image_size, read_rgb  # 8-bit RGB


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# PIL image -> float tensor (3, H, W) normalised with ImageNet's statistics: the last step of the
# evaluation transform (the probes and segment.py). make_views normalises its views with the same numbers.
TO_NORMALISED_TENSOR = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ----------------------------------------------------------------------------------------------------
# Multi-crop (Section III). The recipe is DINO's (Caron et al. 2021, main_dino.py DataAugmentationDINO),
# which the paper adopts: 2 global crops of 40-100% of the image and 6 local crops of 5-40%, each then
# flipped, colour-jittered, greyed, blurred and solarised with DINO's probabilities (ViewRecipe,
# dino_recipes). How the views are made is ours: DINO runs torchvision's PIL transforms on one image at a
# time in loading workers; here every random choice of a step is drawn first, on the CPU (draw_views),
# and each step is then one tensor operation over the whole batch on the training device (make_views).

GLOBAL_SCALE, LOCAL_SCALE = (0.4, 1.0), (0.05, 0.4)          # crop area, as fractions of the image's
# The supervised baseline of the evaluation code the paper cites (SSL-Whitening's train_supervised.py):
# RandomResizedCrop at its default scale and a horizontal flip, nothing else
SUPERVISED_SCALE = (0.08, 1.0)


class ViewRecipe(NamedTuple):
    """How one view of an image is made, its steps in order, as DINO's DataAugmentationDINO makes them
    (the defaults are DINO's for every view; blur_p and solarize_p differ between views, dino_recipes):

        RandomResizedCrop to size x size, area fraction ~ U(scale), aspect ratio in [3/4, 4/3]
        horizontal flip                     with probability flip_p
        ColorJitter(*jitter)                with probability jitter_p: brightness and contrast factors
                                            U(1 -+ 0.4), saturation U(1 -+ 0.2), hue shift U(-+0.1) turns
        grayscale                           with probability grayscale_p
        Gaussian blur, sigma ~ U(blur_sigma) pixels of the crop, whatever its size, with probability blur_p
        solarisation (pixels >= 128 inverted), with probability solarize_p
        ToTensor, Normalize with ImageNet's mean and std
    """
    size: int
    scale: tuple
    blur_p: float
    solarize_p: float
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)        # brightness, contrast, saturation, hue
    grayscale_p: float = 0.2
    blur_sigma: tuple = (0.1, 2.0)


def dino_recipes(global_size, local_size, global_crops=2, local_crops=6,
                 global_scale=GLOBAL_SCALE, local_scale=LOCAL_SCALE, blur=True):
    """The V = global_crops + local_crops views of each image, globals first (2 + 6: the paper's numbers;
    DINO's code defaults to 8 local crops):

        global 1:    Gaussian blur p = 1.0
        global 2:    Gaussian blur p = 0.1, solarisation p = 0.2
        local:       Gaussian blur p = 0.5
    With more than two global crops the extra ones alternate between the two global recipes.
    blur=False drops the blur entirely, as the CIFAR recipes of solo-learn and Lightly do (a 2 px blur
    erases much of a 32 px image)."""
    global_1 = ViewRecipe(global_size, tuple(global_scale), blur_p=1.0 if blur else 0.0, solarize_p=0.0)
    global_2 = ViewRecipe(global_size, tuple(global_scale), blur_p=0.1 if blur else 0.0, solarize_p=0.2)
    local = ViewRecipe(local_size, tuple(local_scale), blur_p=0.5 if blur else 0.0, solarize_p=0.0)
    return [global_1 if i % 2 == 0 else global_2 for i in range(global_crops)] + [local] * local_crops


def supervised_recipes(size):
    """The supervised baseline's one view per image: a crop of 8-100% of the image and a flip, no colour."""
    return [ViewRecipe(size, SUPERVISED_SCALE, blur_p=0.0, solarize_p=0.0, jitter_p=0.0, grayscale_p=0.0)]


def draw_views(recipes, sizes, generator):
    """Every random choice of one step's views, on the CPU, from `generator` alone in a fixed order, so that
    a seed gives the same draws on any device: recipes (V ViewRecipes), sizes CPU int64 (B, 2), each
    image's (height, width) -> float32 (V, B, P = 12) on the CPU, for each crop:

        0-3   x0, y0, x1, y1              its box in pixels, inside the image's true size
        4     flip                        1 to mirror it, else 0
        5-8   brightness, contrast,       the jitter's factors, 1 where the crop is not jittered;
              saturation, hue             the hue's turn, 0 there
        9     grey                        1 for greyscale, else 0
        10    sigma                       the blur's standard deviation in pixels, 0 for no blur
        11    solarise                    1 to solarise, else 0

    The boxes are torchvision's RandomResizedCrop.get_params, for every crop at once: 10 attempts of an
    area fraction ~ U(scale) and an aspect ratio log-uniform in [3/4, 4/3], rounded to whole pixels; the
    first that fits is placed uniformly; if none fits, the whole image cut to the nearest allowed ratio,
    centred. (The first fitting one of 10 attempts drawn at once is distributed as the loop's.)"""
    fields = torch.tensor([[*r.scale, r.flip_p, r.jitter_p, *r.jitter, r.grayscale_p, r.blur_p, *r.blur_sigma,
                            r.solarize_p] for r in recipes]).T[..., None]       # (13, V, 1): each field per view
    low, high, flip_p, jitter_p, brightness, contrast, saturation, hue, grey_p, blur_p, *sigma, solarize_p = fields
    u = torch.rand(32, len(recipes), len(sizes), generator=generator)    # (32, V, B): every uniform of every crop
    u_area, u_ratio = u[:10], u[10:20]                                   # (10, V, B) each: 10 attempts per crop
    (u_x, u_y, u_flip, u_jitter, u_brightness, u_contrast, u_saturation, u_hue, u_grey, u_blur, u_sigma,
     u_solarise) = u[20:]                                                # (V, B) each, in the columns' order
    height, width = sizes.T.float()                                      # each (B,)
    area = height * width * (low + (high - low) * u_area)                # (10, V, B)
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u_ratio)      # log-uniform in [3/4, 4/3]
    w, h = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()  # whole pixels (half to even, as round())
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)              # (10, V, B)
    first, found = fits.int().argmax(0, keepdim=True), fits.any(0)       # (1, V, B) the first that fits; (V, B)
    w = torch.where(found, w.gather(0, first)[0], torch.minimum(width, (height * 4 / 3).round()))    # (V, B)
    h = torch.where(found, h.gather(0, first)[0], torch.minimum(height, (width * 4 / 3).round()))
    x0 = torch.where(found, (u_x * (width - w + 1)).floor(), ((width - w) / 2).floor())   # U{0 ... width - w}
    y0 = torch.where(found, (u_y * (height - h + 1)).floor(), ((height - h) / 2).floor())  # or centred
    jittered = u_jitter < jitter_p                                       # (V, B)
    shift = lambda spread, v: torch.where(jittered, spread * (2 * v - 1), 0.0)       # U(-+ spread), or 0
    return torch.stack([x0, y0, x0 + w, y0 + h, (u_flip < flip_p).float(),
                        1 + shift(brightness, u_brightness), 1 + shift(contrast, u_contrast),
                        1 + shift(saturation, u_saturation), shift(hue, u_hue), (u_grey < grey_p).float(),
                        torch.where(u_blur < blur_p, sigma[0] + (sigma[1] - sigma[0]) * u_sigma, 0.0),
                        (u_solarise < solarize_p).float()], dim=-1)      # (V, B, 12)


# DINO's DataAugmentationDINO, step by step, and where each is made here (make_views, per view):
#   1 RandomResizedCrop(size, scale, bicubic)   draw_views' box; resize_matrix's rows and columns, two products
#     RandomHorizontalFlip(0.5)                 draw_views' flip: resize_matrix reads the columns from the right
#   2 ColorJitter(0.4, 0.4, 0.2, 0.1), p 0.8    the brightness factor, then contrast and colour_matrix
#   3 RandomGrayscale(0.2)                      colour_matrix's grey (saturation, hue, grey: one 3 x 3 matrix)
#   4 GaussianBlur(p, sigma 0.1-2)              gaussian_kernels, two grouped convolutions
#   5 Solarization(0.2), second global view     the solarise threshold
#   6 ToTensor, Normalize(ImageNet)             the normalisation at the end of each view
def make_views(images, recipes, parameters):
    """The views: images uint8 (B, 3, H, W) on any device, recipes (V), parameters draw_views' (V, B, P) on
    the same device -> list of V float32 tensors (B, 3, s, s), globals first, normalised with ImageNet's
    mean and std. One view after another, as DataAugmentationDINO makes them, each step a few tensor
    operations over the whole batch, each crop with its own parameters; the few numbers per crop that the
    steps need (resize matrices, colour matrix, blur kernel) are made first, for all views at once.

    Every step runs on every crop, with an identity parameter where the crop's draw skips it (factor 1,
    hue 0, grey 0, sigma 0, solarise 0): no value is read by the host and no shape depends on a draw, so
    torch.compile(fullgraph=True) traces it with the network, CUDA graphs record it, and it runs on the
    meta device. A step that a view's recipe never takes (the supervised baseline's colours, blur=False) is
    left out: a choice made from the recipe alone.

    Values are float32 on PIL's scale, 0 ... 255, until the normalisation. The crop is linear in the image
    and separable: each channel X of it is R X C^T, with R (s, H) and C (s, W) the crop's rows and columns
    (resize_matrix), mirrored through C at no cost.

    Where the arithmetic is ours rather than PIL's (test_hydes.py bounds how far each step lands from PIL's):
    - resizing: as roi_align (aligned=True), bilinear samples averaged over ceil(h / s) x ceil(w / s)
      points per output pixel of an h x w box (antialiased when shrinking), not PIL's bicubic filter: a
      little softer when enlarging; samples may reach half a pixel past the box, never past the image (a
      canvas of mixed sizes repeats each image's last row and column: loading.CanvasImages);
    - the jitter's order: always brightness, contrast, saturation, hue, where torchvision draws one of 24
      (the first three are blends with black, the mean grey and the pixel's grey: they commute until a
      value clips);
    - the hue: a turn of each colour about the grey axis r = g = b, where torchvision shifts the HSV hue
      (the same turn on average, a pixel's hue within ~0.025 turns of it);
    - clipping: contrast, saturation, hue and greyscale, each linear in a pixel's colour, are one 3 x 3
      matrix per crop, clipped to [0, 255] once, where PIL clips after each;
    - the blur: a sampled Gaussian of 13 taps, where PIL runs three box filters;
    - rounding: values stay float32, where PIL rounds to uint8 after each step; but on a CPU with native
      bf16 (crop_dtype, several times faster) the crop's two products and the blur round to 8 significant
      bits, no coarser than uint8 from 128 up, and a blur can overshoot 255 by one."""
    batch, _, height, width = images.shape
    dtype = crop_dtype(images.device)                                     # bf16 on a CPU with native bf16
    source = images.to(dtype).reshape(batch, 3 * height, width)          # (B, 3 H, W): 0 ... 255, exact in bf16
    # draw_views' columns by name (its docstring's table), each (V, B): crop b of view v
    x0, y0, x1, y1, flip, brightness, contrast, saturation, hue, grey, sigma, solarise = parameters.unbind(-1)
    rows, columns = [], []                       # each crop's resize matrices, for all views of one size at once
    for size, run in itertools.groupby(range(len(recipes)), key=lambda v: recipes[v].size):
        run = list(run)
        same = slice(run[0], run[-1] + 1)                                 # n consecutive views of size s
        rows += resize_matrix(y0[same], y1[same], size, height).to(dtype).unbind(0)       # n of (B, s, H)
        columns += resize_matrix(x0[same], x1[same], size, width, flip[same]).to(dtype).unbind(0)   # (B, s, W)
    if any(r.jitter_p or r.grayscale_p for r in recipes):                 # saturation, hue, grey: (V, B, 3, 3)
        colours = colour_matrix(saturation, hue, grey)
    if any(r.blur_p for r in recipes):                                    # 3 sigma: 13 taps for DINO's 2 px
        radius = math.ceil(3 * max(r.blur_sigma[1] for r in recipes if r.blur_p))
        kernels = gaussian_kernels(sigma, radius).to(dtype)                           # (V, B, k)
        kernels = kernels.repeat_interleave(3, dim=1)[:, :, None]                     # (V, 3 B, 1, k): per channel
    # One view at a time: the views of one size could be one batch (DINO's 6 local views: 6 B crops), fewer
    # kernels for a GPU, but on a CPU tensors that large (28 MB for STL-10's globals) were slower: they
    # outgrow the caches, and glibc hands freed blocks that large back to the system, whose fresh pages
    # then cost more than the arithmetic on them.
    views = []
    for v, recipe in enumerate(recipes):
        size = recipe.size
        each = lambda column: column[v].view(-1, 1, 1, 1)                # (V, B) -> this view's (B, 1, 1, 1)
        # 1 crop and flip: X C^T, then R (X C^T)
        x = torch.bmm(source, columns[v].transpose(1, 2))                 # (B, 3 H, W) @ (B, W, s) -> (B, 3 H, s)
        x = rows[v][:, None] @ x.view(batch, 3, height, size)            # (B, 1, s, H) @ (B, 3, H, s) -> (B, 3, s, s)
        x = (x.float() * each(brightness)).clamp_(max=255)                # 2 ColorJitter's brightness b x, float32
        if recipe.jitter_p or recipe.grayscale_p:                         # 2-3 contrast c x + (1 - c) m, then M,
            c = each(contrast)                                            # the saturation, hue and greyscale
            m = luma(x.mean((2, 3), keepdim=True))                        # (B, 1, 1, 1): m, the crop's mean grey
            # M (c x + (1 - c) m) = c M x + (1 - c) m, as M keeps greys: one product for the four steps
            x = torch.baddbmm(((1 - c) * m).view(-1, 1, 1), c.view(-1, 1, 1) * colours[v],
                              x.flatten(2)).view_as(x).clamp_(0, 255)
        if recipe.blur_p:                            # 4 a grouped convolution: each crop's channels, its kernel
            y = F.pad(x.view(1, 3 * batch, size, size).to(dtype), (radius,) * 4, mode="replicate")   # as PIL
            y = F.conv2d(y, kernels[v][..., None], groups=3 * batch)     # down the columns: (1, 3 B, s, s + 2 r)
            y = F.conv2d(y, kernels[v][:, :, None], groups=3 * batch)    # along the rows: (1, 3 B, s, s)
            x.copy_(y.view_as(x))                                         # back into x (sigma 0: x, in dtype)
        if recipe.solarize_p:                                             # 5 PIL's solarize: 255 - v where v >= 128
            threshold = torch.where(each(solarise) > 0, 128.0, math.inf)        # (B, 1, 1, 1): never, if not chosen
            x.add_(x >= threshold, alpha=-255).abs_()                     # |v - 255| = 255 - v there, |v - 0| = v
        for c, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):   # 6 ToTensor, Normalize: (v / 255
            x[:, c].sub_(255 * mean).div_(255 * std)                      # - mean) / std, with Python numbers
        views.append(x)                                                   # (no constant to copy to the device)
    return views


@torch.compiler.assume_constant_result
def crop_dtype(device):
    """The dtype of the crop's two matrix products and the blur's two convolutions on `device`: bf16 on a
    CPU that computes it natively (settings.cpu_has_native_bf16: AVX-512 BF16 or AMX), where they run
    several times faster than in float32 (SPEED.md); float32 elsewhere
    (emulated bf16 is slow, and on a GPU they are a sliver of a step). bf16 holds the pixel values
    0 ... 255 exactly; it rounds the weights, the blur's input and each product's or pass's output."""
    return torch.bfloat16 if device.type == "cpu" and settings.cpu_has_native_bf16() else torch.float32


def resize_matrix(start, end, size, length, mirrored=None):
    """roi_align's resize (aligned=True) of each crop's span [start, end) of an axis of `length` pixels to
    `size` pixels, as a matrix: start, end (...) in pixels -> (..., size, length), row i the weights output
    pixel i gives each source pixel (pixel j centred on j), summing to one. mirrored (...): 1 to read the
    outputs from the last (the flip).

    Output pixel i averages k = ceil((end - start) / size) bilinear samples spread evenly over its bin,

        y_a = start - 1/2 + (i + (a + 1/2) / k) (end - start) / size,    a = 0 ... k - 1,

    each clamped into [0, length - 1] (the border extended) and split between the pixels floor(y_a) and
    floor(y_a) + 1. No crop is longer than the image, so a bin takes at most K = ceil(length / size)
    samples, a number known from the shapes alone; a crop that takes fewer gives the others weight 0."""
    device, dtype = start.device, start.dtype
    step = ((end - start) / size)[..., None, None]                        # (..., 1, 1) source px per output px
    k = step.ceil()                                                       # (..., 1, 1) samples per output pixel
    i = torch.arange(size, device=device, dtype=dtype).view(-1, 1)       # (s, 1)
    if mirrored is not None:
        i = torch.where(mirrored[..., None, None] > 0, size - 1 - i, i)   # (..., s, 1)
    a = torch.arange(math.ceil(length / size), device=device, dtype=dtype)                  # (K,)
    y = (start[..., None, None] - 0.5 + (i + (a + 0.5) / k) * step).clamp_(0, length - 1)   # (..., s, K)
    low = y.floor()
    weight = (a < k) / k                                                  # (..., 1, K): 1 / k each, 0 past k
    high = (y - low) * weight                                             # pixel floor(y) + 1's share
    matrix = torch.zeros(*y.shape[:-1], length, device=device, dtype=dtype)               # (..., s, length)
    matrix.scatter_add_(-1, low.long(), weight - high)
    return matrix.scatter_add_(-1, (low + 1).clamp_(max=length - 1).long(), high)      # past the end: weight 0


def luma(x):
    """The grey level of PIL's convert("L") (ITU-R 601 luma): (N, 3, ...) -> (N, 1, ...)."""
    return (x[:, 0:1] * 0.299).add_(x[:, 1:2], alpha=0.587).add_(x[:, 2:3], alpha=0.114)


def colour_matrix(saturation, turns, grey):
    """ColorJitter's saturation and hue and the greyscale, each a linear map of a pixel's colour x (r, g, b),
    as one 3 x 3 matrix per crop: (...) each -> (..., 3, 3), built on the device from torch.eye (no constant
    copied from the host), with l the luma's weights (0.299, 0.587, 0.114) and 1 = (1, 1, 1):

        saturation  S = s I + (1 - s) 1 l^T                  a blend with the pixel's own grey l^T x
        hue         H = cos(t) I + (1 - cos(t)) 1 1^T / 3 + sin(t) K / sqrt(3),   t = 2 pi turns
        greyscale   G = g 1 l^T + (1 - g) I                  g 1: the luma in all three channels

    -> G H S. The hue turns each colour about the grey axis by Rodrigues' formula (K x = (b - g, r - b,
    g - r)): greys stay, a third of a turn takes red to green and green to blue. Each of the three keeps
    greys (S 1 = H 1 = G 1 = 1), and each is the identity at its identity parameter (1, 0, 0)."""
    eye = torch.eye(3, device=turns.device, dtype=turns.dtype)           # (3, 3)
    to_grey = luma(eye).T.expand(3, 3)                                    # 1 l^T: every row the luma's weights
    cross = eye.roll(1, 0) - eye.roll(-1, 0)                              # K: the cross product with (1, 1, 1)
    s, t, g = (v[..., None, None] for v in (saturation, 2 * math.pi * turns, grey))   # each (..., 1, 1)
    hue = t.cos() * eye + (1 - t.cos()) / 3 + t.sin() / math.sqrt(3) * cross
    return (g * to_grey + (1 - g) * eye) @ hue @ (s * eye + (1 - s) * to_grey)


def gaussian_kernels(sigma, radius):
    """Each crop's Gaussian of its own sigma (...) in pixels, 2 radius + 1 taps -> (..., 2 radius + 1),
    each summing to one: the 1-D kernel of both passes of make_views' separable blur. sigma 0 gives a delta
    (exp(-1 / 2e-6) = 0 off the centre)."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)     # (k,)
    kernels = torch.exp(-taps ** 2 / (2 * sigma.clamp_min(1e-3)[..., None] ** 2))       # (..., k)
    return kernels / kernels.sum(-1, keepdim=True)


def multi_crop(images, sizes, recipes, generator):
    """make_views(images, recipes, draw_views(recipes, sizes, generator)), the parameters moved to the
    images' device in ONE copy: from page-locked memory on a GPU, which copies while the host goes on."""
    parameters = draw_views(recipes, sizes, generator)
    if images.device.type == "cuda":
        parameters = parameters.pin_memory()
    return make_views(images, recipes, parameters.to(images.device, non_blocking=True))


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
    """(global, local) crop sizes that follow the data's resolution, our choice (the paper gives only the
    area fractions, 40-100% and 5-40%): 32 px data -> 32/16, STL-10's 96 px -> 96/48, ImageNet and
    Food-101 -> 224/96."""
    if image_size >= 128:
        return 224, 96
    return image_size, image_size // 2


def normalize(x):
    """(x - mean) / std per channel with ImageNet's statistics, in T.Normalize's own arithmetic, so that
    uint8 images / 255 normalised here give exactly the tensors of ToTensor + Normalize (the probes'
    features): (..., 3, h, w) -> the same shape."""
    mean, std = imagenet_statistics(x.device, x.dtype)
    return (x - mean) / std


def unnormalize(x):
    """The inverse of `normalize`: a normalised image (3, H, W) or batch (B, 3, H, W) back to [0, 1] RGB
    (up to rounding, which save_png clips)."""
    mean, std = imagenet_statistics(x.device, x.dtype)
    return x * std + mean


def imagenet_statistics(device, dtype):
    """ImageNet's channel mean and std as (3, 1, 1) tensors on `device`."""
    return (torch.tensor(IMAGENET_MEAN, dtype=dtype, device=device).view(3, 1, 1),
            torch.tensor(IMAGENET_STD, dtype=dtype, device=device).view(3, 1, 1))


def save_png(picture, path):
    """Write a (3, H, W) picture with values in [0, 1] as an 8-bit RGB PNG, whole or not at all."""
    pixels = (picture.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    write_atomically(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------
# Datasets by name

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


def native_image_size(name, root):
    """The side of the dataset's images: fixed for the named datasets; for `folder`, the median shorter
    side over the headers of all of train/'s images (one file alone could be a thumbnail or a poster)."""
    if name in NATIVE_SIZE:
        return NATIVE_SIZE[name]
    sizes = folder_image_sizes(root)                    # {(width, height): count}
    return statistics.median_high(min(size) for size, count in sizes.items() for _ in range(count))


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
            size = image_size(path)                                  # as read_rgb turns it (EXIF)
            sizes[size] = sizes.get(size, 0) + 1
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
    broken = broken_links(folder)
    if broken:
        raise DatasetError(f"{name}: the class folder {broken[0]} is a symbolic link to {os.readlink(broken[0])}, "
                           f"which does not exist ({len(broken)} such link(s)); mount or fix it, or remove the link")
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
        return ClassFolder(folder, classes, transform=transform)
    except FileNotFoundError as error:
        raise DatasetError(f"{name}: {error}") from None


class ClassFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder read through read_rgb, its files listed once each however its symbolic links loop
    (image_files.files_in_class_folders). classes: None for its own sorted class folders, or a list that
    the labels index instead: ImageNet-100 inside an ImageNet tree, or a test split labelled by its train
    split's classes. Class folders not in the list are ignored; listed classes without a folder have no
    images. ImageFolder's documented hooks for this are find_classes and make_dataset. `.classes` is then
    the whole list, so that label i is always classes[i]."""

    def __init__(self, folder, classes=None, transform=None):
        self.named = None if classes is None else sorted(classes)
        super().__init__(folder, transform=transform, loader=read_rgb)

    def find_classes(self, directory):
        if self.named is None:
            return super().find_classes(directory)
        index = {c: i for i, c in enumerate(self.named)}
        return self.named, {c: index[c] for c in self.named if os.path.isdir(os.path.join(directory, c))}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return files_in_class_folders(directory, class_to_idx)       # every format PIL reads, not only ImageFolder's
