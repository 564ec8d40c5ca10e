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

The multi-crop recipe is written once, here (`ViewRecipe`, `dino_recipes`). `MultiCrop` makes the views
of one PIL image from it: the readable form, and the specification. Training makes the same views from a
whole uint8 batch on the device (batched_crops.BatchedMultiCrop, tested against MultiCrop), from the same
recipes:

    recipes = dino_recipes(global_size=32, local_size=16)      # 2 global + 6 local views
    views = MultiCrop(recipes)(pil_image)                      # 8 normalised tensors (3, h, w)
"""

import os
import random
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from tqdm import tqdm

from image_files import DatasetError, files_in_class_folders, image_size, read_rgb   # 8-bit RGB, every mode


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


# ----------------------------------------------------------------------------------------------------
# Multi-crop (Section III): DINO's recipe (Caron et al. 2021, main_dino.py DataAugmentationDINO), which
# the paper adopts: 2 global crops of 40-100% of the image and 6 local crops of 5-40%

GLOBAL_SCALE, LOCAL_SCALE = (0.4, 1.0), (0.05, 0.4)          # crop area, as fractions of the image's
# The supervised baseline of the paper's setup (SSL-Whitening's train_supervised.py): torchvision's
# RandomResizedCrop at its default scale and a horizontal flip, nothing else
SUPERVISED_SCALE = (0.08, 1.0)


class ViewRecipe(NamedTuple):
    """How one view of an image is made, its steps in order; the defaults are DINO's for every view:

        RandomResizedCrop to size x size (bicubic), area fraction ~ U(scale), aspect ratio in [3/4, 4/3]
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
    """The V = global_crops + local_crops views of each image, globals first:

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


class MultiCrop:
    """One PIL image -> list of V normalised tensors (3, size, size), one per recipe (dino_recipes' or
    supervised_recipes'), in torchvision's PIL transforms: each view made as its ViewRecipe says."""

    def __init__(self, recipes):
        self.transforms = [view_transform(recipe) for recipe in recipes]

    def __call__(self, img):
        return [transform(img) for transform in self.transforms]


def view_transform(recipe):
    """A ViewRecipe as torchvision transforms: PIL image -> normalised tensor (3, size, size)."""
    steps = [T.RandomResizedCrop(recipe.size, scale=recipe.scale, interpolation=T.InterpolationMode.BICUBIC),
             T.RandomHorizontalFlip(p=recipe.flip_p),
             T.RandomApply([T.ColorJitter(*recipe.jitter)], p=recipe.jitter_p),
             T.RandomGrayscale(p=recipe.grayscale_p)]
    if recipe.blur_p:
        steps.append(RandomGaussianBlur(recipe.blur_p, recipe.blur_sigma))
    if recipe.solarize_p:
        steps.append(RandomSolarize(recipe.solarize_p))
    return T.Compose(steps + [TO_NORMALISED_TENSOR])


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
    """Write a (3, H, W) picture with values in [0, 1] as an 8-bit RGB PNG."""
    pixels = (picture.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)


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
        return files_in_class_folders(directory, class_to_idx, extensions)
