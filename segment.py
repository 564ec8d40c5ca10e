"""PASCAL VOC segmentation by a linear probe on frozen hypercolumns (Table II), and PCA pictures (Figure 4).

    python segment.py runs/imagenet-resnet50-kappa1/ckpt.pt --data-dir /path/to/VOCdevkit --table table2.md

Section V-B of the paper: a linear probe on the hypercolumns ("the concatenation of the outputs of each
layer") of a frozen ImageNet-1k ResNet-50, trained 20 epochs with AdamW at batch 32 and a learning rate
printed "1^{-3}", which we read as 1e-3 (Section IV's rate); pixel accuracy and mIoU. The usual VOC
details are ours: the stage outputs upsampled to a common resolution before they are concatenated, a
classifier over the 21 VOC classes on each pixel, cross-entropy ignoring the void label 255, and pixel
accuracy and mIoU on the val list from an accumulated 21 x 21 confusion matrix.

Choices the paper leaves open, and ours. The paper gives neither the training resolution, nor crops or
augmentation, nor whether val is scored on whole images at the masks' own resolution.
  - Training. Images are resized (bicubic; masks nearest) so the shorter side is --image-size (default
    320) and centre-cropped to a square, so that they batch (a 4:3 image loses a quarter of its pixels,
    which only costs the probe some training pixels); no augmentation.
  - Validation, scored as VOC's own benchmark does: every non-void pixel of every val mask, at the
    mask's full resolution. The whole image is resized to the training scale (shorter side
    --image-size, so objects look as large as the probe saw them) with each side rounded to a multiple
    of the backbone's stride (`input_stride`), so every stage's grid covers the image exactly: a ViT's
    patch convolution would otherwise drop the right and bottom remainder, and a ResNet's odd-sized
    grids would sit up to half a cell off. A ViT's positional table is resized to the image's grid
    (models.VisionTransformer.positional_embedding). The probe's logits are upsampled bilinearly
    straight to the mask's size before the argmax. Val images run one at a time, since their sizes
    differ: 1,449 passes at batch 1 cost little beside 20 epochs over the 1,464 training images.
  - Scale of the stages. Each stage's channels are standardised by an affine-free BatchNorm inside the
    probe (the stages differ in scale by orders of magnitude); at evaluation it is a fixed affine map,
    so the head stays linear.
  - Memory. A 1x1 convolution over concatenated, upsampled hypercolumns equals the sum over stages of a
    1x1 convolution applied at each stage's own resolution and then upsampled, because bilinear
    upsampling and per-pixel linear maps commute. The head computes it that way and never builds the
    3,840-channel ResNet-50 hypercolumn at full resolution.
  - ViT-Tiny: the patch tokens after blocks 3, 6, 9 and 12 play the role of the four stages.

The PCA picture (Figure 4): per image, the hypercolumns (each stage standardised per channel, upsampled
to the finest stage's grid) are projected on their first three principal components, each scaled to
[0, 1] and shown as RGB, upsampled to the input's size, beside the input.
"""

import argparse
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from tqdm import tqdm

from backbones import add_backbone_arguments, backbone_argument_rules, load_backbone_from_args
from checkpoints import CheckpointError, keep_results
from data import TO_NORMALISED_TENSOR, DatasetError, read_rgb, save_png, unnormalize
from loading import refuse_non_finite
from models import VisionTransformer
from settings import (HelpFormatter, ctrl_c_in_one_line, default_device, device_argument, error_message,
                      features_precision, first_problem, numbers_are_finite, refuse, replaces_a_file, unwritable,
                      unwritable_file)

NUM_CLASSES = 21             # background and VOC's 20 object classes, the mask values 0-20
VOID = 255
TABLE_COLUMNS = ("method", "arch", "pixel_accuracy", "miou")
PCA_PNG = "pca_hypercolumns.png"            # Figure 4, in --out


# ----------------------------------------------------------------------------------------------------
# Data: VOC 2012 in its official layout

def find_voc_root(data_dir):
    """The VOC2012 folder (the one holding JPEGImages/) under data_dir. Nothing is downloaded: VOC's 2 GB
    archive comes from a mirror that is often down."""
    for candidate in (data_dir, os.path.join(data_dir, "VOC2012"), os.path.join(data_dir, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(candidate, "JPEGImages")):
            return candidate
    raise DatasetError(f"no PASCAL VOC 2012 under {data_dir!r}; extract VOCtrainval_11-May-2012.tar there so that "
                   f"VOCdevkit/VOC2012/JPEGImages, SegmentationClass and ImageSets/Segmentation exist")


class VOCSegmentation(torch.utils.data.Dataset):
    """(normalised image, int64 mask with 0-20 and 255) for the ids of one list file. whole_image_stride
    None: the centre S x S square of both, S = image_size (training); an int: the whole image, its sides
    multiples of the stride, and the mask at the file's resolution (validation; see the module docstring).
    """

    def __init__(self, root, split, image_size, whole_image_stride=None):
        list_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.exists(list_file):
            raise DatasetError(f"missing {list_file}: the VOC layout needs ImageSets/Segmentation/{split}.txt")
        with open(list_file) as f:
            self.ids = [line.strip() for line in f if line.strip()]
        if not self.ids:
            raise DatasetError(f"{list_file} lists no images")
        self.root, self.image_size, self.whole_image_stride = root, image_size, whole_image_stride
        self.list_file = list_file

    def __len__(self):
        return len(self.ids)

    def read_pair(self, index):
        """The image and its mask as stored (PIL), checked: both readable, the mask a palette or greyscale
        PNG of the image's size holding classes 0-20 and 255 only."""
        image_path = os.path.join(self.root, "JPEGImages", self.ids[index] + ".jpg")
        mask_path = os.path.join(self.root, "SegmentationClass", self.ids[index] + ".png")
        image = read_rgb(image_path, orient=False,         # masks align with the stored pixels, unturned
                         remedy="(or drop its id from the split's ImageSets/Segmentation list)")
        try:
            mask = Image.open(mask_path)        # palette PNG: the pixel values are the class indices
            values = np.unique(np.asarray(mask))
        except OSError as error:            # a missing file (FileNotFoundError) too
            raise DatasetError(f"cannot read {error.filename or mask_path}: {error}") from None
        if mask.mode not in ("P", "L"):
            raise DatasetError(f"{mask_path} is a {mask.mode} image; VOC masks are palette (P) PNGs of class indices")
        if mask.size != image.size:       # resized apart, the two would no longer line up pixel for pixel
            raise DatasetError(f"{mask_path} is {mask.size[0]}x{mask.size[1]} px but its image is {image.size[0]}x"
                           f"{image.size[1]}; a mask must match its image (re-export it at the image's size)")
        bad = np.setdiff1d(values, np.r_[np.arange(NUM_CLASSES), VOID])
        if bad.size:
            raise DatasetError(f"{mask_path} has values {bad.tolist()}; VOC masks hold classes 0-20 and 255 (void)")
        return image, mask

    def __getitem__(self, index):
        image, mask = self.read_pair(index)
        if self.whole_image_stride is None:     # the shorter side resized to S, then the centre square
            image = TF.center_crop(TF.resize(image, self.image_size, TF.InterpolationMode.BICUBIC), self.image_size)
            mask = TF.center_crop(TF.resize(mask, self.image_size, TF.InterpolationMode.NEAREST), self.image_size)
        else:
            image = image.resize(whole_image_size(image.size, self.image_size, self.whole_image_stride), Image.BICUBIC)
        mask = torch.from_numpy(np.array(mask, dtype=np.int64))
        return TO_NORMALISED_TENSOR(image), mask     # (3, S, S), (S, S) or (3, h, w), (H, W)

    def check_every_file(self):
        """Read every pair of the list once, so that a bad file is named before the probe trains, not after
        (a single decoding pass, beside the probe's 20 epochs)."""
        labelled = 0             # masks with a pixel that is not void: with none, there is nothing to learn or score
        for index in tqdm(range(len(self)), desc=f"checking {len(self)} images and masks", leave=False):
            labelled += bool((np.asarray(self.read_pair(index)[1]) != VOID).any())
        if not labelled:
            raise DatasetError(f"every pixel of the {len(self)} masks in {self.list_file} is void (255): there is nothing "
                           f"to train or score; list images whose masks label classes 0-20")


def whole_image_size(original_size, size, stride):
    """(w, h) to resize a whole (w, h) image to: shorter side about `size`, aspect kept, each side rounded
    to the nearest multiple of `stride` (at least one stride). 500 x 375 at 320, stride 32 -> 416 x 320."""
    scale = size / min(original_size)
    return tuple(max(stride, round(side * scale / stride) * stride) for side in original_size)


# ----------------------------------------------------------------------------------------------------
# Hypercolumns and the linear head

class HypercolumnProbe(nn.Module):
    """A linear (1x1 convolution) classifier over concatenated, upsampled stage outputs, computed as
    sum_k upsample(W_k BN_k(f_k)) = W [upsample(BN(f_1)), ..., upsample(BN(f_K))] (see the module
    docstring). Returns logits (B, 21, H, W) at `output_size`."""

    def __init__(self, stage_channels):
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm2d(c, affine=False) for c in stage_channels)
        self.heads = nn.ModuleList(nn.Conv2d(c, NUM_CLASSES, 1, bias=False) for c in stage_channels)
        self.bias = nn.Parameter(torch.zeros(NUM_CLASSES, 1, 1))

    def forward(self, stages, output_size):
        logits = self.bias
        for f, norm, head in zip(stages, self.norms, self.heads):
            # (B, C_k, h_k, w_k) -> (B, 21, h_k, w_k) -> (B, 21, H, W)
            logits = logits + F.interpolate(head(norm(f.float())), size=output_size, mode="bilinear",
                                            align_corners=False)
        return logits


def input_stride(backbone):
    """Input pixels per cell of the backbone's coarsest output grid: a ViT's patch side; a ResNet's 32
    (stride-2 stem convolution, max-pool, three stride-2 stages), or 8 with the CIFAR stem (neither)."""
    if isinstance(backbone, VisionTransformer):
        return backbone.patch_size
    return 8 if isinstance(backbone.maxpool, nn.Identity) else 32


@torch.no_grad()
def frozen_stages(backbone, images, device):
    """The frozen backbone's stage outputs for a batch, float32, computed in settings.features_precision
    (bf16 or fp16 where the device runs them natively), as the probes' features are."""
    autocast, _, memory_format = features_precision(device, backbone)
    images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)   # (B, 3, H, W)
    with autocast:
        return [f.float() for f in backbone.stages(images)]


# ----------------------------------------------------------------------------------------------------
# Metrics

def update_confusion(confusion, prediction, target):
    """Add a batch to the (21, 21) confusion matrix, rows = truth, columns = prediction; void is skipped."""
    valid = target != VOID
    index = target[valid] * NUM_CLASSES + prediction[valid]
    confusion += torch.bincount(index, minlength=NUM_CLASSES ** 2).view(NUM_CLASSES, NUM_CLASSES).to(confusion)


def segmentation_metrics(confusion):
    """(pixel accuracy %, mIoU %) from a (C, C) confusion matrix (rows truth, columns prediction).
    IoU_c = TP / (TP + FP + FN); a class absent from both truth and prediction (0/0) is left out of the
    mean, as the VOC benchmark does."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    pixel_accuracy = 100.0 * true_positive.sum() / confusion.sum()
    miou = 100.0 * (true_positive[present] / union[present]).mean()
    return pixel_accuracy.item(), miou.item()


# ----------------------------------------------------------------------------------------------------
# Training and evaluation

def train_probe(backbone, train_set, device, epochs=20, batch_size=32, lr=1e-3, workers=2):
    """Fit the hypercolumn probe on the training list, the backbone frozen. It runs again every epoch
    rather than caching its stages: ResNet-50's for VOC's 1,464 training images at 320 px would take about
    18 GB in float32, while a forward pass is cheap."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    probe = HypercolumnProbe([f.shape[1] for f in frozen_stages(backbone, train_set[0][0][None], device)]).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
    for epoch in range(epochs):
        bar = tqdm(loader, desc=f"probe epoch {epoch + 1}/{epochs}", leave=False)
        for images, masks in bar:
            masks = masks.to(device)
            logits = probe(frozen_stages(backbone, images, device), masks.shape[-2:])   # (B, 21, S, S)
            loss = F.cross_entropy(logits, masks, ignore_index=VOID)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return probe.eval()


@torch.no_grad()
def evaluate_probe(backbone, probe, val_set, device, workers=2):
    """The (21, 21) confusion matrix over the val list, one whole image at a time (see the module docstring)."""
    loader = torch.utils.data.DataLoader(val_set, batch_size=1, num_workers=workers)
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)
    for image, mask in tqdm(loader, desc="val", leave=False):                # (1, 3, h, w), (1, H, W)
        mask = mask.to(device)
        prediction = probe(frozen_stages(backbone, image, device), mask.shape[-2:]).argmax(1)   # (1, H, W)
        update_confusion(confusion, prediction, mask)
    return confusion.cpu()


@torch.no_grad()
def pca_picture(stages, output_size):
    """Figure 4's (3, H, W) in [0, 1] for one image's stages, a list of (C_k, h_k, w_k) maps: see the
    module docstring. A stage of one pixel (a narrow input's last stage) has no spatial variance to
    standardise and nothing to show: it is left out."""
    stages = [f for f in stages if f.shape[-2] * f.shape[-1] > 1]
    if not stages:
        raise ValueError("every stage of the backbone is 1 x 1 px at this --image-size, so there is no map to "
                         "draw; raise --image-size for Figure 4's picture")
    grid = max((f.shape[-2:] for f in stages), key=lambda s: s[0] * s[1])
    columns = []
    for f in stages:
        f = (f - f.mean((1, 2), keepdim=True)) / (f.std((1, 2), keepdim=True) + 1e-6)
        columns.append(F.interpolate(f[None].float(), size=tuple(grid), mode="bilinear", align_corners=False)[0])
    hyper = torch.cat(columns).flatten(1).T                       # (sum C_k, h, w) -> (h*w, sum C_k)
    hyper = hyper - hyper.mean(0)
    _, _, v = torch.linalg.svd(hyper, full_matrices=False)       # rows of v: principal directions
    components = hyper @ v[:3].T                                  # (h*w, C) x (C, 3) -> (h*w, 3)
    rgb = components.T.reshape(1, 3, *grid)                       # (1, 3, h, w)
    rgb = F.interpolate(rgb, size=tuple(output_size), mode="bilinear", align_corners=False)[0]   # (3, H, W)
    low, high = rgb.amin((1, 2), keepdim=True), rgb.amax((1, 2), keepdim=True)
    return (rgb - low) / (high - low).clamp_min(1e-12)           # each component over the full [0, 1]


def save_pca_grid(backbone, dataset, count, path, device):
    """A PNG with one row per image: the input, then its hypercolumn PCA (Figure 4)."""
    rows = []
    for index in range(min(count, len(dataset))):
        image = dataset[index][0]
        pca = pca_picture([f[0] for f in frozen_stages(backbone, image[None], device)], image.shape[-2:]).cpu()
        rows.append(torch.cat([unnormalize(image), pca], dim=2))     # side by side: (3, S, 2S)
    save_png(torch.cat(rows, dim=1), path)                           # stacked: (3, n*S, 2S)


# ----------------------------------------------------------------------------------------------------
# The script: one row of Table II, and Figure 4

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_backbone_arguments(p)
    p.add_argument("--data-dir", default="data", help="VOCdevkit, or the VOC2012 folder itself")
    p.add_argument("--image-size", type=int, default=320, help="shorter side in px that images are resized to: "
                   "training crops the centre square, val keeps the whole image and scores its full-size mask")
    p.add_argument("--epochs", type=int, default=20, help="probe epochs (paper: 20)")
    p.add_argument("--batch-size", type=int, default=32, help="images per probe step (paper: 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (paper: printed 1^-3, read as 1e-3)")
    p.add_argument("--pca-images", type=int, default=8, help="val images in the PCA picture (0: none)")
    p.add_argument("--method", help="name for the table's method column (default: from the checkpoint)")
    p.add_argument("--out", help="folder for segment.jsonl and the PCA PNG (default: beside the checkpoint)")
    p.add_argument("--force", action="store_true", help="replace a PCA PNG that --out holds already")
    p.add_argument("--table", help="Markdown file to append a Table II row to")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--device", type=device_argument, default=default_device(), help="cpu, cuda, cuda:N or mps")
    args = p.parse_args(argv)
    args.out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    return args


def check_args(args):
    """Every argument, before any work: the first problem as a one-line message, or None."""
    return first_problem([
        numbers_are_finite(args, ("lr",)),
        *backbone_argument_rules(args),
        (args.image_size >= 32, f"--image-size must be >= 32 (got {args.image_size}): ResNets halve it five times"),
        (args.image_size <= 1024, f"--image-size must be at most 1024 px (got {args.image_size}); VOC's images are "
                                  f"about 500"),
        (args.epochs >= 1 and args.batch_size >= 1 and args.lr > 0,
         "--epochs and --batch-size must be >= 1 and --lr > 0 (the paper: 20 epochs, batch 32, lr 1e-3)"),
        (args.pca_images >= 0 and args.workers >= 0, "--pca-images and --workers must be >= 0"),
    ]) or unwritable(args.out, "--out") or unwritable_file(args.table, "--table") or (
        replaces_a_file(os.path.join(args.out, PCA_PNG), "--out", args.force) if args.pca_images else None)


def main(argv=None):
    args = parse_args(argv)
    refuse(check_args(args))
    with ctrl_c_in_one_line("the probe was not finished and no row was written"):
        return segment_and_save(args)


def segment_and_save(args):
    """Train the probe, score it, then save its row, JSON line and picture, each on its own."""
    device = torch.device(args.device)
    try:
        backbone, info = load_backbone_from_args(args, device)
        root = find_voc_root(args.data_dir)
        train_set = VOCSegmentation(root, "train", args.image_size)
        val_set = VOCSegmentation(root, "val", args.image_size, whole_image_stride=input_stride(backbone))
        for dataset in (train_set, val_set):       # a bad file is named now, not after the probe's training
            dataset.check_every_file()
        # Broken weights (NaN) are named now too: scored, their features would give a believable mIoU
        refuse_non_finite(torch.cat([f.flatten(1) for f in frozen_stages(backbone, train_set[0][0][None], device)], 1),
                          args.checkpoint)
        os.makedirs(args.out, exist_ok=True)
        probe = train_probe(backbone, train_set, device, args.epochs, args.batch_size, args.lr, args.workers)
        confusion = evaluate_probe(backbone, probe, val_set, device, args.workers)
        pixel_accuracy, miou = segmentation_metrics(confusion)
        result = {"method": args.method or info["method"], "arch": info["arch"], "pixel_accuracy": pixel_accuracy,
                  "miou": miou, "checkpoint": os.path.abspath(args.checkpoint), "image_size": args.image_size,
                  "train_images": len(train_set), "val_images": len(val_set),
                  "val_pixels_scored": int(confusion.sum()), "epochs": args.epochs}
        pictures = []
        if args.pca_images:      # Figure 4 as a grid of equal tiles: the val images' centre squares
            result["pca_png"] = os.path.join(args.out, PCA_PNG)
            pca_set = VOCSegmentation(root, "val", args.image_size)
            pictures.append((result["pca_png"], lambda: save_pca_grid(backbone, pca_set, args.pca_images,
                                                                      result["pca_png"], device)))
    except (CheckpointError, DatasetError) as error:
        raise SystemExit(f"error: {error_message(error)}")
    # The row and segment.jsonl first, the picture after: a failure to write one never costs the others
    keep_results(result, os.path.join(args.out, "segment.jsonl"), [(result, TABLE_COLUMNS, args.table)], pictures)
    return result


if __name__ == "__main__":
    main()
