"""Images to the network: the training step's uint8 images, in memory on the device or decoded by loading
workers, in an order fixed by (seed, epoch); the labelled splits the monitor evaluates; and the frozen
features of whole splits that the probes take, cached on disk.

Machinery: a reader of the method may skip this file; train.py reads `for images, sizes, labels in batches`,
and the probes `features = backbone(images)` over a split in eval mode, under torch.no_grad.

CIFAR-10/100 (50k x 3 KB) and STL-10 (105k x 27 KB, 2.9 GB) fit in a GPU's memory as uint8: decode
them once, keep them there, and an epoch is a permutation and index operations, with no workers at
all. ImageNet, Food-101 and folders of mixed sizes neither fit nor share one size: DataLoader workers
decode each image onto a canvas of one fixed size (`CanvasImages`), the image at its top-left, and say
where it ends. Either way a batch is (images uint8 (B, 3, H, W) on the device, sizes (B, 2) on the CPU,
each image's true (height, width), labels), and data.make_views makes every view on the device, its
boxes drawn inside each image's true size: one crop path for every dataset. Cutting a fixed-size centre
square instead would lose the ends of the long side (a quarter of a 500 x 375 image) and make a 5% local
crop a 57 px patch of a 256 px square, upscaled to 96. The images travel as uint8 (4x fewer bytes than
floats to pin and copy).

Either way the batches follow an `EpochOrder`, which makes the data order a function of the seed and
the epoch, and every augmentation is seeded by (seed, step, rank) (train.augmentation_generator): a run
resumed at any step sees the images and views an uninterrupted one would.

evaluate.py, analyze.py and train.py's monitor call `extract_features`; evaluate.py and analyze.py go
through `cached_features`, whose key follows the checkpoint's bytes, the split's files and the precision,
so that a second probe extracts nothing and a changed checkpoint or split is extracted anew.
"""

import hashlib
import json
import os
import signal

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps
from tqdm import tqdm

from checkpoints import CheckpointError, write_atomically
from data import (DatasetError, dataset_split, eval_transform, folder_image_sizes, normalize, pretrain_dataset,
                  read_rgb)
from settings import features_precision, precision_for

# --data-source auto keeps the decoded training images on the device when they fit in this many bytes:
# CIFAR's 150 MB and STL-10's 2.9 GB do; ImageNet (250 GB at 256 px) and Food-101 (15 GB) do not.
IN_MEMORY_BYTES = 4 * 2**30


def training_data(args, recipes, control):
    """(batches, order, classes): `batches` yields (images uint8 (B, 3, H, W) on the training device, sizes
    int64 (B, 2) on the CPU, labels (B,) on the device), in the order of `order` (an EpochOrder). Images of
    one size come whole, from memory or from loading workers (--data-source), sizes the same row B times;
    images of mixed sizes come from the workers, each on a canvas (CanvasImages), sizes their own."""
    if args.data_source == "memory" and not one_image_size(args.dataset, args.data_dir):
        raise SystemExit(f"error: --data-source memory holds images of one size, and {args.dataset}'s differ: the "
                         f"loading workers put each on a canvas of its own; use --data-source workers or auto")
    with control.first_process_first():           # process 0 downloads and extracts the dataset alone
        # The labelled images only for the supervised baseline (STL-10: its 5k train, not the 100k unlabelled).
        dataset = uint8_dataset(args.dataset, args.data_dir, recipes, labelled=args.method == "supervised")
        # The monitor's test split must exist, and hold two classes or more, before hours of training
        test = dataset_split(args.dataset, args.data_dir, "test", None) if args.eval_every else None
    if test is not None and len(test.classes) < 2:
        raise SystemExit(f"error: the online evaluation (--eval-every) scores {args.dataset}'s classes, and its test "
                         f"split has {len(test.classes)}; a probe needs at least 2 (or pass --eval-every 0)")
    if args.skip_bad_images:
        for split, images in (("train", dataset), ("test", test)):     # every split, before the first step
            dropped = drop_unreadable_images(images, args.workers) if images is not None else []
            if dropped and not len(images):
                raise SystemExit(f"error: none of the {len(dropped)} images of the {split} split decodes, for "
                                 f"example {dropped[0]}; repair the files")
            if dropped and control.main_process:
                print(f"warning: skipping {len(dropped)} unreadable image(s) of {len(images) + len(dropped)} in the "
                      f"{split} split, for example {dropped[0]}")
    order = EpochOrder(len(dataset), args.batch_size, args.seed, control.rank, control.world_size)
    if order.batches_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} images is less than one batch of {args.batch_size}; "
                         f"lower --batch-size")
    if isinstance(dataset, CanvasImages):         # mixed sizes: the workers put each on a canvas
        return WorkerBatches(dataset, order, control.device, args.workers), order, dataset.classes
    fits = len(dataset) * dataset[0][0].numel() <= IN_MEMORY_BYTES
    if args.data_source == "memory" or (args.data_source == "auto" and fits):
        images, labels = load_into_memory(dataset, control.device, args.workers)   # (N, 3, H, W) uint8, once
        return InMemoryBatches(images, labels, order), order, dataset.classes
    return WorkerBatches(dataset, order, control.device, args.workers), order, dataset.classes


def note_mixed_sizes(args, native):
    """Say what a folder of images of mixed sizes trains at: its crops follow the median shorter side."""
    sizes = folder_image_sizes(args.data_dir) if args.dataset == "folder" else {}
    if len(sizes) > 1:
        sides = [min(size) for size in sizes]
        print(f"note: {args.data_dir}/train holds images of {len(sizes)} sizes (shorter sides {min(sides)} to "
              f"{max(sides)} px); crops follow the median shorter side, {native} px: "
              f"{args.global_size} and {args.local_size} px (--global-size and --local-size set them)")


def one_image_size(name, root):
    """Whether all the training images of a dataset have one size: CIFAR's and STL-10's do, ImageNet's
    and Food-101's do not, a `folder`'s are asked (their headers, read once per process)."""
    if name in ("cifar10", "cifar100", "stl10"):
        return True
    return name == "folder" and len(folder_image_sizes(root)) == 1


def uint8_dataset(name, root, recipes, labelled=False):
    """The training images (`pretrain_dataset`, or with `labelled` the labelled train split that the
    supervised baseline needs) in uint8, for data.make_views with these `recipes` (dino_recipes):

    - images of one size (`one_image_size`): item i is (image (3, H, W), label) at native size.
    - images of mixed sizes: a CanvasImages, whose item i is (canvas (3, C, C), (height, width), label),
      C twice the global crop size (canvas_side).
    """
    whole = one_image_size(name, root)
    transform = T.PILToTensor() if whole else None               # None: PIL images, for CanvasImages
    dataset = dataset_split(name, root, "train", transform) if labelled else pretrain_dataset(name, root, transform)
    return dataset if whole else CanvasImages(dataset, canvas_side(recipes))


def canvas_side(recipes):
    """The side C of the canvas of images of mixed sizes: twice the global crop size (448 px for 224 px
    crops). The smallest local crop, 5% of the area, spans 0.22 of the image's side: 100 px of a 448 px
    image, about the 96 px it is resized to, so the local crops keep their detail; a larger canvas would
    only add bytes to decode, pin and copy (a typical 500 x 375 ImageNet photo becomes 448 x 336, about
    as many bytes as the canvas). Smaller images stay at their size; the crops read none of the padding."""
    return 2 * max(recipe.size for recipe in recipes)


class CanvasImages(torch.utils.data.Dataset):
    """Images of mixed sizes on canvases of one size, so that they stack into a batch: item i -> (canvas
    uint8 (3, C, C), the image at its top-left and zeros elsewhere; the image's (height, width) on it,
    int64 (2,); label), from `images`, a dataset of (PIL image, label). An image with a side over C is
    first shrunk to fit, its aspect ratio kept, antialiased (PIL's bicubic filter widens as it shrinks).

    The image's last row and column are copied once into the padding: the crop (data.resize_matrix,
    roi_align's sampling) samples bilinearly up to half a pixel past a box's last pixel centre, and at a
    tensor's edge it repeats the edge, so with the copies a box that ends at the image's edge sees what it
    would see on the image alone, not black."""

    def __init__(self, images, side):
        self.images, self.side, self.classes = images, side, images.classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image, label = self.images[index]                              # PIL image, RGB, of any size
        if max(image.size) > self.side:
            image = ImageOps.contain(image, (self.side, self.side), Image.BICUBIC)
        pixels = T.functional.pil_to_tensor(image)                     # (3, h, w) uint8
        height, width = pixels.shape[1:]
        rows = torch.arange(min(height + 1, self.side)).clamp(max=height - 1)    # 0 ... h - 1, then h - 1 again
        columns = torch.arange(min(width + 1, self.side)).clamp(max=width - 1)
        canvas = torch.zeros(3, self.side, self.side, dtype=torch.uint8)
        canvas[:, :len(rows), :len(columns)] = pixels[:, rows][:, :, columns]
        return canvas, torch.tensor([height, width]), label


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


class InMemoryBatches:
    """For each batch of `order`, (images (B, 3, H, W) uint8, sizes (B, 2), labels (B,)) gathered by index
    from images already in the training device's memory: what a DataLoader would give, with no workers and
    no copies. sizes, on the CPU, is the images' one (H, W), B times."""

    def __init__(self, images, labels, order):
        self.images, self.labels, self.order = images, labels, order

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        for batch in self.order:
            index = torch.tensor(batch)                                              # (B,)
            if self.images.device.type == "cuda":
                index = index.pin_memory()          # from page-locked memory: copied while the host goes on
            index = index.to(self.images.device, non_blocking=True)
            yield self.images[index], same_sizes(self.images, len(batch)), self.labels[index]


def same_sizes(images, count=None):
    """The sizes of `count` images (all of `images` by default) of one size, (..., 3, H, W): (H, W) on
    the CPU, `count` times -> int64 (count, 2)."""
    return torch.tensor(images.shape[-2:]).expand(len(images) if count is None else count, 2)


class WorkerBatches:
    """For each batch of `order`, (images uint8 (B, 3, H, W), sizes (B, 2), labels (B,)), decoded by
    `workers` DataLoader processes: for datasets too large to hold in memory. Images and labels on `device`,
    sizes on the CPU: a CanvasImages' own, else the images' one size B times."""

    def __init__(self, dataset, order, device, workers):
        self.order, self.device = order, device
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=order,
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=ignore_interrupts)

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        for batch in self.loader:                 # (images, labels), or a CanvasImages' (images, sizes, labels)
            images, labels = batch[0], batch[-1]
            sizes = batch[1] if len(batch) == 3 else same_sizes(images)
            yield images.to(self.device, non_blocking=True), sizes, labels.to(self.device, non_blocking=True)


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
    one decoding pass. Returns the dropped paths.
    Datasets stored as arrays (CIFAR, STL-10) have no files to check; a CanvasImages's folder is checked.
    """
    if isinstance(dataset, CanvasImages):
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


def labelled_splits(dataset, data_dir, image_size, workers=2, skip_bad_images=False):
    """The labelled train and test splits as uint8 images of the evaluation transform (eval_transform), for
    train.py's monitor. skip_bad_images: leave out the files that fail to decode, as training does."""
    splits = [dataset_split(dataset, data_dir, split, eval_transform(image_size, normalised=False))
              for split in ("train", "test")]
    if skip_bad_images:
        dropped = [path for split in splits for path in drop_unreadable_images(split, workers)]
        if dropped:
            print(f"warning: the monitor leaves out {len(dropped)} unreadable image(s), for example {dropped[0]}")
    return splits


# ----------------------------------------------------------------------------------------------------
# Frozen features of a whole split, for the probes, extracted in their precision and cached on disk

# What to do with a checkpoint whose features are not finite
BROKEN_WEIGHTS = "its weights are broken (a run that diverged?); probe another checkpoint"


@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size=256, workers=2, desc="features", exact=False,
                     checkpoint=None, remedy=BROKEN_WEIGHTS):
    """Frozen features of a whole dataset: (N, F) float32 on the CPU, and labels (N,) int64, from normalised
    images (eval_transform) or uint8 ones. Features that are not finite (broken weights) raise a
    CheckpointError naming `checkpoint` and what to do (`remedy`; refuse_non_finite).

    exact=False: in features_precision, fast and enough for the probes. exact=True: in float32, for
    analyze.py, whose ranks count singular values: bf16's 8-bit mantissa fills the null space, so a
    rank-16 matrix whose entries are of order 1 comes out as rank 100 or more above 0.1."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    autocast, _, memory_format = precision_for(device, None, "fp32") if exact else features_precision(device, backbone)
    for images, targets in tqdm(loader, desc=desc, leave=False):
        images = images.to(device, non_blocking=True)
        if images.dtype == torch.uint8:           # eval_transform(size, normalised=False): normalise here
            images = normalize(images.float() / 255)
        images = images.contiguous(memory_format=memory_format)     # (B, 3, H, W), NHWC in memory for ResNets
        with autocast:
            features.append(backbone(images).float().cpu())
        labels.append(targets.cpu())
    backbone.train(was_training)
    features = torch.cat(features)                                 # (N, F)
    refuse_non_finite(features, checkpoint, remedy)
    return features, torch.cat(labels)


def refuse_non_finite(features, checkpoint, remedy=BROKEN_WEIGHTS):
    """Raise a CheckpointError naming `checkpoint` if any image's features (N, ...) are not finite: no
    probe should score them (a k-NN over NaN gives 50% on two classes, a believable number)."""
    broken = (~torch.isfinite(features.flatten(1)).all(dim=1)).sum().item()
    if broken:
        raise CheckpointError(f"{checkpoint or 'the network'} gives features that are not finite (NaN or inf) for "
                              f"{broken} of {len(features)} images: {remedy}")


def cached_features(backbone, checkpoint, checkpoint_digest, dataset, data_dir, split, image_size, device, cache_dir,
                    workers=2, exact=False):
    """extract_features of `checkpoint` for one split, read from cache_dir when the same key was extracted before.
    Returns (features (N, F), labels (N,), whether they came from the cache).

    The key: the checkpoint's bytes, the dataset, its folder, the split, the resolution, the split's files
    and the precision of the forward pass (exact: see extract_features), so that features extracted under
    bf16 never stand in for float32 ones. A cache file that cannot be read is extracted anew."""
    data = dataset_split(dataset, data_dir, split, eval_transform(image_size))
    # The split's class names and, for image folders, every file's path, size and time, so that adding,
    # removing or replacing an image changes the key (CIFAR's and STL-10's arrays are fixed files)
    files = hashlib.sha256(json.dumps([list(data.classes), len(data)]).encode())
    for path, label in getattr(data, "samples", []):
        stat = os.stat(path)
        files.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    key = {"checkpoint": checkpoint_digest, "dataset": dataset, "data_dir": os.path.abspath(data_dir),
           "split": split, "image_size": image_size, "files": files.hexdigest(),
           "precision": str(torch.float32 if exact else getattr(features_precision(device, backbone).autocast,
                                                                "fast_dtype", torch.float32))}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{dataset}-{split}-{name}.pt")
    if os.path.exists(path):
        try:
            cached = torch.load(path, weights_only=True)
            if cached["key"] == key:
                return cached["features"], cached["labels"], True
        except Exception as error:   # any unreadable file (zip, pickle, EOF errors): extract anew, say so
            print(f"warning: the feature cache {path} is unreadable ({type(error).__name__}); extracting anew")
    features, labels = extract_features(backbone, data, device, workers=workers, desc=f"{split} features",
                                        exact=exact, checkpoint=checkpoint)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        write_atomically(path, lambda f: torch.save({"key": key, "features": features, "labels": labels}, f))
    except OSError as error:        # a full disk: the features are in memory, so the probes go on without a cache
        print(f"warning: could not cache the {split} features in {cache_dir} ({error.strerror or error}); "
              f"they will be extracted again next time")
    return features, labels, False
