"""Throughput: the batched multi-crop against per-image pipelines (same views, one run), then whole
training steps with the batched crops.

    python benchmark.py                         # CIFAR-sized and STL-10-sized inputs on the CPU, 1 thread
    python benchmark.py --device cuda --batch-size 512

It first counts the device operations (kernel launches on a GPU) of one call of the batched crops, which
bound a GPU's step at CIFAR size more than their arithmetic (crop_device_operations, on the meta device).
For each input size it times, in one process and one after the other:
  batched     data.BatchedMultiCrop on uint8 batches already in the device's memory (CPU or GPU)
  MultiCrop   data.MultiCrop, DINO's per-image PIL recipe, one image at a time
  Lightly     lightly.transforms.DINOTransform with the same views, when lightly is installed
  steps       train.training_step on the full-size network of the setting (CIFAR: ResNet-18, STL-10:
              ViT-Tiny), on views made beforehand and with the batched crops in the step (--no-steps: skip)
The views are the paper's multi-crop: 2 x 32 + 6 x 16 px from 32 px images (CIFAR), 2 x 96 + 6 x 48 px
from 96 px images (STL-10), all with DINO's blur and solarisation. The images are seeded uniform noise:
these pipelines do the same work whatever the pixels. Images/s count source images, each giving 8 views.
The per-image pipelines are single-threaded PIL code; where other projects train with them they run in
DataLoader workers, one per core, so on a k-core machine multiply their rate by at most k.

Recorded on a 2-core x86 CPU (torch 2.14, batch 256, load average 1.8 from other work):

    python benchmark.py               (1 torch thread)
    | input | views                  | batched img/s | MultiCrop img/s | Lightly img/s | vs MultiCrop | vs Lightly |
    | cifar | 2x32 + 6x16 from 32 px |         3,030 |             420 |           339 |         7.2x |       8.9x |
    | stl10 | 2x96 + 6x48 from 96 px |           306 |             218 |           188 |         1.4x |       1.6x |

    python benchmark.py --threads 2   (both cores for the batched pipeline; the others are one process)
    | cifar | 2x32 + 6x16 from 32 px |         4,787 |             415 |           335 |        11.5x |      14.3x |
    | stl10 | 2x96 + 6x48 from 96 px |           481 |             214 |           189 |         2.2x |       2.5x |

Run as other projects train, one DataLoader worker per core, on these 2 cores the per-image pipelines give
at most twice their rate: 4,787 vs 2 x 335 is 7x at CIFAR size. The full-size training steps on this
CPU (ResNet-18 at 32 px: 9 images/s; ViT-Tiny at 96 px: 24 images/s, batch 128) are far slower than
either pipeline, so the crops' share of a step is within the timing noise here.

At 32 px PIL's cost is per call, which batching removes; at 96 px it is per pixel, where PIL's uint8 C
loops are about as fast as the some 30 float32 passes over each view here, so on a CPU the batched
form gains little. It is meant for a GPU, where those passes are kernels over the whole batch (not
measured here: this machine has none; `--device cuda` measures it). On this machine loaded by other
jobs, 2 threads ran 3-40x slower than 1 (threads waiting for a busy core), hence the default of 1;
with the cores free, 2 threads are 1.6x faster, as above.
"""

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import train
from data import BatchedMultiCrop, HelpFormatter, MultiCrop, dino_recipes, first_problem, refuse
from models import HyDeSModel, build_backbone, precision_for

# (input side, global crop, local crop, architecture), the paper's settings for CIFAR-10/100 and STL-10
INPUTS = {"cifar": (32, 32, 16, "resnet18"), "stl10": (96, 96, 48, "vit_tiny")}
# Device operations of one BatchedMultiCrop call with dino_recipes(32, 16) and a batch of 128, counted as
# crop_device_operations does, when each view was made on its own (a crop, jitter, grayscale, blur,
# solarisation and normalisation per view, the chosen images of each step gathered; 105 of them
# host-to-device copies of parameters). The same for any image size and batch.
CROP_OPERATIONS_BEFORE = 1528


class DeviceOperations(TorchDispatchMode):
    """Counts the ATen operations dispatched on one device type: those with a tensor there among their
    arguments or results. Views (view, expand, slice, permute, ...) are left out: they change a tensor's
    shape and strides and launch nothing. Copies from another device are also counted apart."""

    def __init__(self, device_type):
        super().__init__()
        self.device_type, self.count, self.transfers = device_type, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        devices = {t.device.type for t in tree_flatten((args, kwargs, result))[0] if isinstance(t, torch.Tensor)}
        # _unsafe_view is a view that the schema does not mark as one (matmul reshapes its result with it)
        if self.device_type in devices and not (func.is_view or func == torch.ops.aten._unsafe_view.default):
            self.count += 1
            self.transfers += len(devices) > 1 and func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
        return result


def crop_device_operations(recipes, batch, side):
    """The device operations of one BatchedMultiCrop call on a (batch, 3, side, side) uint8 batch ->
    (operations, of which host-to-device copies). Counted on the meta device, which stands for a GPU:
    its tensors have shapes but no values, the parameters are drawn on the CPU as for a GPU, and every
    operation on the images' device is one a GPU would launch. A call before the count fills the
    per-device caches of constants (data.constant), as the first training step does."""
    crops, images = BatchedMultiCrop(recipes), torch.empty(batch, 3, side, side, dtype=torch.uint8, device="meta")
    crops(images, torch.Generator().manual_seed(0))
    with DeviceOperations("meta") as counter:
        crops(images, torch.Generator().manual_seed(1))
    return counter.count, counter.transfers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS), help="input sizes to time")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per batched call; larger amortises Python overhead, up to memory")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="time each pipeline for at least this long (after one warm-up call); more is steadier")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the batched pipeline; on a CPU shared with other jobs "
                        "more threads than idle cores make it slower, not faster")
    p.add_argument("--device", default="cpu", help="where the batched pipeline runs: cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise images and of the crops")
    p.add_argument("--step-batch-size", type=int, default=128,
                   help="images per training step (the paper's 128); the step columns use the full-size network")
    p.add_argument("--no-steps", dest="steps", action="store_false", help="time the augmentations only")
    return p.parse_args(argv)


def noise_images(count, side, seed):
    """count seeded uniform-noise images: uint8 (N, 3, side, side) and the same as PIL images."""
    pixels = np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [Image.fromarray(p) for p in pixels]


def images_per_second(run_once, images_per_call, seconds, synchronize=lambda: None):
    """Calls run_once() (after one warm-up call) until `seconds` have passed -> images per second."""
    run_once()
    synchronize()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run_once()
        calls += 1
    synchronize()
    return calls * images_per_call / (time.perf_counter() - start)


def per_image_rate(transform, pil_images, seconds):
    """Images per second of a per-image transform (PIL image -> list of views), over the given images."""
    return images_per_second(lambda: [transform(img) for img in pil_images], len(pil_images), seconds)


def augmentation_rates(side, global_size, local_size, args):
    """Images/s of the three augmentation pipelines on side x side inputs -> dict (None: not installed)."""
    device = torch.device(args.device)
    images, pil_images = noise_images(args.batch_size, side, args.seed)
    images = images.to(device)
    batched = BatchedMultiCrop(dino_recipes(global_size, local_size))
    generator = torch.Generator().manual_seed(args.seed)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = {"batched": images_per_second(lambda: batched(images, generator), len(images), args.seconds,
                                          synchronize)}
    few = pil_images[:64]                      # the per-image pipelines need no batch: a cycle of 64 images
    rates["multicrop"] = per_image_rate(MultiCrop(global_size, local_size), few, args.seconds)
    try:
        from lightly.transforms import DINOTransform    # optional: only this measurement needs it
    except ImportError:
        rates["lightly"] = None
    else:
        # DINOTransform's defaults are DINO's recipe, so the same as MultiCrop's but for the sizes
        rates["lightly"] = per_image_rate(DINOTransform(global_crop_size=global_size, local_crop_size=local_size,
                                                        n_local_views=6), few, args.seconds)
    return rates


def training_step_rates(side, global_size, local_size, arch, args):
    """Images/s of whole training steps as train.py runs them (bf16 autocast and channels_last on a GPU):
    views made beforehand ("model"), and the batched multi-crop of a uint8 batch on the device followed by
    the step ("with crops"). Their ratio is the share of a step the augmentation costs."""
    device = torch.device(args.device)
    settings = train.build_parser().parse_args(["--arch", arch, "--device", args.device])
    precision = precision_for(device, arch)                 # train.py's: bf16 autocast and channels_last on a GPU
    net = HyDeSModel(build_backbone(arch, global_size)).to(device, memory_format=precision.memory_format)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr)
    images, _ = noise_images(args.step_batch_size, side, args.seed)
    images = images.to(device)
    labels = torch.zeros(len(images), dtype=torch.int64, device=device)
    crops, generator = BatchedMultiCrop(dino_recipes(global_size, local_size)), torch.Generator().manual_seed(args.seed)
    ready = crops(images, generator)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(views):
        train.training_step(net, views, labels, optimizer, precision, "hydes", settings.kappa, settings.alpha,
                            settings.beta)

    return {"model": images_per_second(lambda: step(ready), len(images), args.seconds, synchronize),
            "with_crops": images_per_second(lambda: step(crops(images, generator)), len(images), args.seconds,
                                            synchronize)}


def markdown_table(rows):
    """rows: list of (input label, rates dict) -> Markdown table with the batched pipeline's speed-ups."""
    def rate(value):
        return "not installed" if value is None else f"{value:,.0f}"

    def ratio(a, b):
        return "-" if b is None else f"{a / b:.1f}x"

    lines = ["| input | views | batched img/s | MultiCrop img/s | Lightly DINOTransform img/s "
             "| batched / MultiCrop | batched / Lightly |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, views, r in rows:
        lines.append(f"| {label} | {views} | {rate(r['batched'])} | {rate(r['multicrop'])} | {rate(r['lightly'])} "
                     f"| {ratio(r['batched'], r['multicrop'])} | {ratio(r['batched'], r['lightly'])} |")
    return "\n".join(lines)


def step_table(rows):
    """rows: list of (input label, views, arch, step rates dict) -> Markdown table of training-step speed."""
    lines = ["| input | views | network | step img/s (views ready) | step img/s (with batched crops) "
             "| share of the step in the crops |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for label, views, arch, r in rows:
        lines.append(f"| {label} | {views} | {arch} | {r['model']:,.0f} | {r['with_crops']:,.0f} "
                     f"| {1 - r['with_crops'] / r['model']:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    refuse(first_problem([
        (args.batch_size >= 1 and args.step_batch_size >= 2, "--batch-size must be >= 1 and --step-batch-size >= 2"),
        (args.seconds > 0 and args.threads >= 1, "--seconds must be > 0 and --threads >= 1"),
    ]))
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {args.device}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPU cores, "
          f"load average {load:.1f}, batch {args.batch_size}, torch {torch.__version__}")
    operations, _ = crop_device_operations(dino_recipes(32, 16), batch=128, side=32)   # any size: the same
    print(f"device operations per step in the crops: {operations} (was {CROP_OPERATIONS_BEFORE})")
    rows, step_rows = [], []
    for name in args.inputs:
        side, global_size, local_size, arch = INPUTS[name]
        views = f"2x{global_size} + 6x{local_size} from {side} px"
        rows.append((name, views, augmentation_rates(side, global_size, local_size, args)))
        if args.steps:
            step_rows.append((name, views, arch, training_step_rates(side, global_size, local_size, arch, args)))
    print(markdown_table(rows))
    if step_rows:
        print()
        print(f"Training steps, batch {args.step_batch_size}, full-size networks:")
        print(step_table(step_rows))
    return rows, step_rows


if __name__ == "__main__":
    main()
