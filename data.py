"""Datasets by name and the paper's multi-crop augmentation (Section III).

Pre-training uses the unlabelled images of a dataset; the probes use its labelled train/test splits.

    name         pre-training split           probe splits (train / test)   native size
    cifar10      train (50k)                  train / test                  32
    cifar100     train (50k)                  train / test                  32
    stl10        train+unlabeled (105k)       train / test                  96
    food101      train (75.75k)               train / test                  224 (resized)
    imagenet     ROOT/train (ImageFolder)     ROOT/train / ROOT/val         224 (resized)
    imagenet100  ROOT/train, 100 classes      ROOT/train / ROOT/val         224 (resized)
    folder       ROOT/train (ImageFolder)     ROOT/train / ROOT/test (or ROOT/val)   from the files

torchvision downloads CIFAR, STL-10 and Food-101 when the network is there; ImageNet must be put in place
by hand. When a dataset is missing, `DatasetError` says which files are expected and where.
"""

import os
import random

import numpy as np
import torch
import torchvision
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

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
    """A dataset that cannot be found or read; the message says what to do."""


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
        raise DatasetError(f"cannot read image {path} ({str(error).splitlines()[0]}); delete or replace the "
                           f"file (train.py --skip-bad-images leaves such files out)") from None


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


class MultiCrop:
    """One PIL image -> list of `global_crops + local_crops` normalised tensors, globals first.

    DINO's recipe (Caron et al. 2021, main_dino.py DataAugmentationDINO), which the paper adopts:
      every crop:  RandomResizedCrop (bicubic), horizontal flip p=0.5, colour jitter (brightness 0.4,
                   contrast 0.4, saturation 0.2, hue 0.1) p=0.8, grayscale p=0.2
      global 1:    Gaussian blur p=1.0
      global 2:    Gaussian blur p=0.1, solarisation p=0.2
      local:       Gaussian blur p=0.5
    With more than two global crops the extra ones alternate between the two global recipes.
    The blur radius is DINO's, in pixels, whatever the crop size; `blur=False` drops blur entirely, as
    the CIFAR recipes of solo-learn and Lightly do (a 2 px blur erases much of a 32 px image).
    """

    def __init__(self, global_size, local_size, global_crops=2, local_crops=6,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), blur=True):
        photometric = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        to_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

        def crop(size, scale):
            return T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)

        def recipe(size, scale, blur_p, solarize_p=0.0):
            steps = [crop(size, scale), photometric]
            if blur:
                steps.append(RandomGaussianBlur(blur_p))
            if solarize_p:
                steps.append(RandomSolarize(solarize_p))
            return T.Compose(steps + [to_tensor])

        global_1 = recipe(global_size, global_scale, blur_p=1.0)
        global_2 = recipe(global_size, global_scale, blur_p=0.1, solarize_p=0.2)
        local = recipe(local_size, local_scale, blur_p=0.5)
        self.transforms = [global_1 if i % 2 == 0 else global_2 for i in range(global_crops)]
        self.transforms += [local] * local_crops

    def __call__(self, img):
        return [t(img) for t in self.transforms]


def eval_transform(image_size):
    """Deterministic transform for the probes: resize, centre crop, normalise (no augmentation).

    ImageNet-sized data follow the usual 256 -> 224 protocol (resize the short side to size * 8/7, crop
    the centre); small images (CIFAR, STL-10) are resized to the crop size, a no-op at native size.
    """
    resize = round(image_size * 8 / 7) if image_size >= 128 else image_size
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
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
    """The side of the dataset's images: fixed for the named datasets, read from a file for `folder`."""
    if name in NATIVE_SIZE:
        return NATIVE_SIZE[name]
    dataset = _image_folder(os.path.join(root, "train"), name)
    with Image.open(dataset.samples[0][0]) as img:
        return min(img.size)


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
    if name in ("imagenet", "imagenet100"):
        folder = os.path.join(root, "train" if split == "train" else "val")
        classes = IMAGENET100_CLASSES if name == "imagenet100" else None
        return _image_folder(folder, name, transform, classes)
    if name == "folder":
        folder = os.path.join(root, "train")
        if split == "test":
            folder = next((os.path.join(root, s) for s in ("test", "val") if os.path.isdir(os.path.join(root, s))),
                          os.path.join(root, "test"))
        return _image_folder(folder, name, transform)
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def num_classes(dataset):
    return len(dataset.classes)


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


def _image_folder(folder, name, transform=None, classes=None):
    """An ImageFolder (folder/<class>/<image>), optionally restricted to a list of class folders."""
    if not os.path.isdir(folder):
        raise DatasetError(
            f"{name}: folder {folder!r} does not exist; --data-dir must hold train/<class>/*.jpg and "
            f"test/<class>/*.jpg (or val/)"
        )
    if classes is not None:
        missing = sorted(set(classes) - set(os.listdir(folder)))
        if missing:
            raise DatasetError(f"{name}: {len(missing)} of its classes are missing from {folder!r}, "
                               f"for example {missing[0]}; it needs ImageNet's train/ and val/ in wnid folders")
    try:
        if classes is None:
            return torchvision.datasets.ImageFolder(folder, transform=transform, loader=read_rgb)
        return ClassSubsetFolder(folder, classes, transform=transform)
    except FileNotFoundError as error:
        raise DatasetError(f"{name}: {error}") from None


class ClassSubsetFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder over some of its class folders only (ImageNet-100 inside an ImageNet tree).
    ImageFolder's documented hook for this is find_classes; labels are 0..len(classes)-1 in sorted order."""

    def __init__(self, folder, classes, transform=None):
        self.subset = sorted(classes)
        super().__init__(folder, transform=transform, loader=read_rgb)

    def find_classes(self, directory):
        return self.subset, {c: i for i, c in enumerate(self.subset)}


# ----------------------------------------------------------------------------------------------------
# Reproducible data order: exact resume at any step, whatever the number of loading processes

class EpochOrder(torch.utils.data.Sampler):
    """Batches of (index, seed) pairs for one epoch: the shuffled image order and one augmentation seed
    per image, both drawn from a generator seeded by (seed, epoch) alone.

    The usual DataLoader shuffling draws its order from a generator whose state moves with every epoch,
    and each worker's augmentations depend on which batches that worker happened to load. Here the
    views of the b-th batch of epoch e are a pure function of (seed, e, b), so a run resumed at any step
    (`start_batch`) sees exactly the batches an uninterrupted run would, with 0 or 16 workers alike.
    The last incomplete batch is dropped, as the loss wants equal batches.
    """

    def __init__(self, num_images, batch_size, seed):
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
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
        seeds = torch.randint(2**62, (self.num_images,), generator=generator)          # (num_images,)
        for b in range(self.start_batch, self.batches_per_epoch):
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield list(zip(order[rows].tolist(), seeds[rows].tolist()))


class SeededSamples(torch.utils.data.Dataset):
    """Wraps a dataset so that item (index, seed) is its image `index` augmented with the random numbers
    of `seed`. torchvision's transforms draw from torch's global CPU generator and the blur from Python's
    `random`; both are seeded for the one image and restored afterwards, so the caller's streams are
    left as they were (this matters with workers=0, where loading runs in the training process)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index_and_seed):
        index, seed = index_and_seed
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        torch.default_generator.manual_seed(seed)       # the CPU generator only; CUDA's is left alone
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)


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
    Datasets stored as arrays (CIFAR, STL-10) have no files to check.
    """
    if not hasattr(dataset, "samples"):
        return []
    paths = [path for path, _ in dataset.samples]
    loader = torch.utils.data.DataLoader(_ReadCheck(paths), batch_size=256, num_workers=workers,
                                         collate_fn=list)
    problems = [message for batch in loader for message in batch]
    keep = [sample for sample, message in zip(dataset.samples, problems) if not message]
    dropped = [path for path, message in zip(paths, problems) if message]
    dataset.samples = dataset.imgs = keep
    dataset.targets = [label for _, label in keep]
    return dropped
