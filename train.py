"""Train a backbone with HyDeS (arXiv 2604.24498, Sections III-IV).

    python train.py --dataset stl10 --arch vit_tiny --kappa 1        # the paper's ViT-T16 on STL-10
    python train.py --dataset cifar10 --arch resnet18                # the paper's CIFAR-10 ResNet-18
    python train.py --dataset cifar10 --method supervised            # Table I's supervised baseline
    torchrun --nproc_per_node=4 train.py --dataset imagenet --arch resnet50 --batch-size 512   # 4 GPUs

The defaults are the paper's: AdamW, learning rate 1e-3, batch 128, 200 epochs, kappa = 1,
alpha = beta = 1, DINO multi-crop with 2 global and 6 local views.

One step of `train()`: a batch of B uint8 images, already on the training device, becomes V = 8 views
(data.BatchedMultiCrop); the backbone and projector map them to z (V, B, D) on the sphere S^{D-1}
(models.HyDeSModel); AdamW takes a step on loss = beta H_local - alpha H_global (hydes.hydes_loss,
Eqs. 2-4). Every epoch ends with OUT/ckpt.pt rewritten (model, optimiser, grad scaler, the online linear
probe, step, random-number states, data order, the arguments, which args.json holds too, and the epoch's
log line); then, after epochs 1, 6, 11, ... and the last (--eval-every 5, the paper's setup's cadence),
the monitor: the k-NN and a round of the persistent linear probe whose curves Figures 6-8 plot, and the
checkpoint once more; then a line in OUT/log.jsonl (loss, H_global, H_local, MI, lr, kappa, beta,
images/s after the session's first step, that step's seconds where it fell, and at evaluations linear
and k-NN top-1 and top-5).

The file reads in that order: the parser, main(), train(), the step, the helpers train() calls, the
checks of the settings, and at the end, under its own heading, run control: what stops a run early
(Ctrl-C, a cluster's SIGTERM, --max-minutes, a non-finite loss, dead loading workers), decided alike on
every torchrun process, and the lock that keeps a second run out of the folder.
`--resume` continues bit for bit on CPU: the data order and every augmentation are functions of --seed
and the step, and the checkpoint holds the rest.
"""

import argparse
import fcntl
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import (DATASETS, GLOBAL_SCALE, LOCAL_SCALE, BatchedMultiCrop, DatasetError, EpochOrder, FullImageCrops,
                  HelpFormatter, InMemoryBatches, WorkerBatches, append_jsonl, augmentation_seed, dataset_split,
                  default_crop_sizes, dino_recipes, drop_unreadable_images, error_message, first_problem,
                  folder_image_sizes, load_into_memory, native_image_size, one_image_size, read_jsonl, refuse,
                  supervised_recipes, uint8_dataset, unwritable, write_atomically)
from evaluate import PaperLinearProbe, knn_accuracy, labelled_splits
from hydes import hydes_loss, infonce_loss
from models import (ARCHS, PRECISIONS, STEMS, CheckpointError, HyDeSModel, auto_precision, build_backbone,
                    cpu_bf16_convolutions_are_right, extract_features, precision_for, safe_load, save_checkpoint,
                    vit_patch_size)

# The terms each objective logs, summed over an epoch's steps. InfoNCE runs log HyDeS's entropies of their
# embeddings too, so that the two objectives can be compared in the same terms.
LOGGED = {"hydes": ("loss", "h_global", "h_local", "mi"), "infonce": ("loss", "h_global", "h_local", "mi"),
          "supervised": ("loss", "accuracy")}
# Settings that --resume takes from the command line; every other one comes from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "max_minutes", "eval_every", "workers", "data_source", "device", "data_dir",
                       "skip_bad_images", "log_every", "keep_every", "compile")
# How checkpoints written before a flag existed were trained, where that differs from the flag's default:
# the ResNet stem followed the crop size, and the views went through the network by resolution.
SETTINGS_BEFORE_THEIR_FLAGS = {"stem": lambda saved: "cifar" if saved["global_size"] <= 64 else "imagenet",
                               "forward": lambda saved: "per-resolution"}
# --data-source auto keeps the decoded training images on the device when they fit in this many bytes:
# CIFAR's 150 MB and STL-10's 2.9 GB do; ImageNet (250 GB at 256 px) and Food-101 (15 GB) do not.
IN_MEMORY_BYTES = 4 * 2**30
# torch.compile's modes that --compile offers. "default" fuses the network's operations into fewer, larger
# kernels; "reduce-overhead" also records the compiled forward and backward as CUDA graphs and replays
# them, so that the host launches one graph instead of each kernel: the remedy for a step bound by
# launches, as the paper's small crops make it on a GPU (README, Speed).
COMPILE_MODES = ("default", "reduce-overhead")


# ----------------------------------------------------------------------------------------------------
# The settings (checked further down, in `settings`)

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="folder = any DATA_DIR with train/<class>/* and test/<class>/* (or val/)")
    g.add_argument("--data-dir", default="data", help="root folder of the dataset (downloaded there when possible)")
    g.add_argument("--global-crops", type=int, default=2, help="global views per image (paper: 2)")
    g.add_argument("--local-crops", type=int, default=6, help="local views per image (paper: 6)")
    g.add_argument("--global-size", type=int, help="global crop side; default by resolution: 32, 96 or 224")
    g.add_argument("--local-size", type=int, help="local crop side; default by resolution: 16, 48 or 96")
    g.add_argument("--global-scale", type=float, nargs=2, default=GLOBAL_SCALE, metavar=("MIN", "MAX"),
                   help="area fraction of a global crop (paper: 0.4 1.0)")
    g.add_argument("--local-scale", type=float, nargs=2, default=LOCAL_SCALE, metavar=("MIN", "MAX"),
                   help="area fraction of a local crop (paper: 0.05 0.4)")
    g.add_argument("--no-blur", dest="blur", action="store_false",
                   help="drop DINO's Gaussian blur (CIFAR recipes often do: it erases much of a 32 px image)")
    g.add_argument("--data-source", default="auto", choices=("auto", "memory", "workers"),
                   help="memory: decode the training images once and keep them on the training device; workers: "
                        "decode every batch in --workers processes (for data larger than the device's memory); "
                        "auto: memory when the decoded images fit in 4 GiB and share one size (images of mixed "
                        "sizes always go through the workers, which crop each whole image). The views are the "
                        "same either way")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="decode every image file once before training and leave out those that fail "
                        "(default: stop with an error naming the file)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=ARCHS,
                   help="the paper's: resnet18 (CIFAR, STL-10, Food-101), resnet50 (ImageNet), vit_tiny (STL-10)")
    g.add_argument("--stem", default="imagenet", choices=STEMS,
                   help="ResNet stem. imagenet: 7x7 stride-2 conv + max-pool (timm's resnet18, which the paper's "
                        "setup builds, we infer, even for 32 px images); cifar: 3x3 stride-1 conv, no max-pool, "
                        "which keeps 4x more resolution and trains far better on 32-96 px images (README)")
    g.add_argument("--forward", default="per-view", choices=("per-view", "per-resolution"),
                   help="per-view: BatchNorm over one view's batch, as one network call per view computes (the "
                        "paper's setup), in one backbone call per crop size whose BatchNorms keep the views apart; "
                        "per-resolution: BatchNorm over all the views of a crop size, as DINO")
    g.add_argument("--width", type=int, help="ResNet base width (64) or ViT width (192); smaller for laptops")
    g.add_argument("--depth", type=int, help="ViT blocks (12)")
    g.add_argument("--heads", type=int, help="ViT attention heads (3)")
    g.add_argument("--proj-hidden", type=int, default=2048, help="hidden width of the projector MLP")
    g.add_argument("--proj-dim", type=int, default=256,
                   help="D, the sphere S^{D-1} the loss lives on (paper tried 128-4096: no clear difference)")

    g = p.add_argument_group("loss (Eqs. 1-4)")
    g.add_argument("--method", default="hydes", choices=tuple(LOGGED),
                   help="hydes: the paper's objective; infonce: multi-positive InfoNCE (SimCLR) on the same views "
                        "with temperature 1/kappa; supervised: a linear classifier on the backbone, cross-entropy "
                        "on one RandomResizedCrop (8-100%%) and flip per labelled image, the paper's setup's "
                        "supervised baseline (Table I)")
    g.add_argument("--kappa", type=float, default=1.0,
                   help="vMF concentration: higher learns faster early and stalls later (Section VII-B)")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of H_global (1 = the MI estimate)")
    g.add_argument("--beta", type=float, default=1.0,
                   help="weight of H_local (1 = the MI estimate; lower learns faster early, Section VII-C)")
    g.add_argument("--kappa-final", type=float,
                   help="move kappa from --kappa to this value over the run, by a cosine of the step (default: "
                        "constant); e.g. --kappa 10 --kappa-final 1 for kappa 10's fast start and kappa 1's finish")
    g.add_argument("--beta-final", type=float,
                   help="move beta from --beta to this value over the run, likewise (default: constant)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=200,
                   help="passes over the training set (paper: 200); 0 saves and evaluates the untrained network")
    g.add_argument("--batch-size", type=int, default=128, help="images per step (each gives V views)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-6,
                   help="AdamW weight decay; the paper names none, its evaluation setup's configurations use 1e-6")
    g.add_argument("--schedule", default="constant", choices=("constant", "cosine"),
                   help="constant: the paper states one learning rate; cosine: warm-up then cosine decay to 0")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up (cosine schedule only)")
    g.add_argument("--max-minutes", type=float,
                   help="stop after this many minutes of training in this session (a resumed run counts afresh), "
                        "save, and run the final evaluation")

    g = p.add_argument_group("monitoring")
    g.add_argument("--eval-every", type=int, default=5,
                   help="the online k-NN and linear probe after epochs 1, 1+N, 1+2N, ... and the last (the paper's "
                        "cadence at N = 5; 0: never); each costs a forward pass over the labelled train and test splits")
    g.add_argument("--knn-k", type=int, default=200, help="neighbours that vote in the online k-NN")
    g.add_argument("--knn-temperature", type=float, default=0.1, help="T in the k-NN vote weight exp(s/T)")
    g.add_argument("--log-every", type=int, default=20, help="steps between progress-bar updates")
    g.add_argument("--keep-every", type=int, default=0,
                   help="also keep OUT/ckpt-epochE.pt every N epochs (0: never), for linear-probe curves "
                        "(Figs. 6-8): evaluate.py on each, then analyze.py curves OUT/eval.jsonl --metric linear_top1")

    g = p.add_argument_group("system")
    g.add_argument("--out", help="run folder (default runs/DATASET-ARCH-kappaK)")
    g.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                   help="continue from OUT/ckpt.pt with its saved settings; --resume auto: continue if there is a "
                        "checkpoint, else start (for a cluster's requeue script)")
    g.add_argument("--force", action="store_true",
                   help="start anew in an OUT that holds a run, deleting its checkpoints, log and probe results")
    g.add_argument("--seed", type=int, default=0,
                   help="fixes the initial weights, the data order and every augmentation")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu; under torchrun, each process takes the GPU of its LOCAL_RANK")
    g.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                   help="torch.compile the model: faster steps on a GPU after a compilation of a minute or two. "
                        "--compile alone is torch.compile's default mode; --compile reduce-overhead also replays "
                        "the compiled forward and backward as CUDA graphs, one launch for hundreds of kernels "
                        "(GPUs only, measured on one GPU, not yet under torchrun; on a CPU it is the default mode)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="arithmetic of the forward pass (the loss is float32 whatever this says). auto: bf16 "
                        "autocast on GPUs that have it natively, fp16 with gradient scaling on older GPUs; on CPUs "
                        "with AVX-512 BF16 or AMX, bf16 for ResNets whose convolutions oneDNN computes right on "
                        "these crops (README), else float32; fp16 runs on GPUs only. --resume keeps the run's")
    return p


def main(argv=None):
    try:
        args, checkpoint = settings(argv)      # parsed, checked, crop sizes resolved; --resume: the saved ones
        rank, world_size, device = distributed_setup(args)
        with RunControl(args, rank, world_size, device) as control:
            train(args, checkpoint, control)
    except DatasetError as error:              # a dataset missing, or an image unreadable outside the steps
        raise SystemExit(f"error: {error_message(error)}")
    except CheckpointError as error:           # a checkpoint that cannot be written: a full disk, say
        raise SystemExit(f"error: {error}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Training (Section III)

def train(args, checkpoint, control):
    """Pre-train for args.epochs; `control` decides when to stop early (see RunControl)."""
    device, logged = control.device, LOGGED[args.method]
    precision = precision_for(device, args.arch, args.arithmetic)   # autocast, grad scaler, tensor layout
    # cuDNN times its algorithms for each convolution shape once and keeps the fastest: a run has few shapes
    # (two crop sizes), so this costs a moment at the first step and pays at every other
    torch.backends.cudnn.benchmark = device.type == "cuda"

    # ---- data: uint8 images in an order fixed by (seed, epoch), made into views on the device each step
    recipes = view_recipes(args)
    batches, order, classes = training_data(args, recipes, control)
    crops = BatchedMultiCrop(recipes)
    steps_per_epoch = order.batches_per_epoch
    control.total_steps = args.epochs * steps_per_epoch           # for its estimate of the time the run needs

    # ---- model and optimiser: `net` is the plain module (saved, evaluated), `model` what the step calls
    seed_everything(args.seed)     # here, not earlier: DataLoaders draw from torch's stream as data load
    net = build_model(args, len(classes), control, precision.memory_format)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")     # one kernel, and no host wait under fp16
    # The online linear probe of the paper's setup: one layer on the frozen features, trained 2 epochs at
    # each evaluation and kept from one to the next (evaluate.PaperLinearProbe); the checkpoint keeps it.
    probe = PaperLinearProbe(net.backbone.num_features, len(classes), device, args.seed)
    state = (net, optimizer, precision.scaler, probe)                # what a checkpoint saves and restores
    monitor = Monitor(args, device, labelled_training_images(batches, args))
    step = restore(checkpoint, *state, steps_per_epoch) if checkpoint else 0
    model = parallel(net, args, control)
    if control.main_process:
        control.claim_run_folder()                 # a second train.py on OUT is refused from here on
        open_run_folder(args, checkpoint, step)
        source = "in memory" if isinstance(batches, InMemoryBatches) else f"{args.workers} loading workers"
        print(f"{args.dataset}: {order.num_images} images ({source}), {steps_per_epoch} steps/epoch, "
              f"views {' + '.join(f'{n}x{size}' for size, n in Counter(r.size for r in recipes).items())}; {args.arch} "
              f"{sum(p.numel() for p in net.backbone.parameters()) / 1e6:.2f}M params; device {device}, {args.arithmetic}"
              + (f" x {control.world_size} processes" if control.world_size > 1 else ""))

    if checkpoint is not None and step >= args.epochs * steps_per_epoch and control.main_process:
        print(f"{args.out} has trained {step // steps_per_epoch} epochs already; raise --epochs to train further")
    if checkpoint is not None and checkpoint.get("log_record", {}).get("evaluation_pending") and args.eval_every:
        # The run was stopped during (or just before) an evaluation: do it now, on the very network and
        # probe it would have evaluated, so that the log and the probe continue as if it never stopped.
        end_of_epoch(dict(checkpoint["log_record"]), True, state, monitor, steps_per_epoch, args, control)

    # ---- the loop. Each step: multi-crop views -> z on the sphere -> loss (Eq. 4) -> AdamW. Each epoch: a
    # checkpoint, the online k-NN and linear probe every --eval-every epochs, a line in the log.
    for epoch in range(step // steps_per_epoch, args.epochs):           # a resumed run starts in its epoch
        model.train()
        order.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)   # skip the batches already trained
        first_step, epoch_start = step, time.time()
        # The logged terms are summed on the device: reading them every step would make the host wait for
        # the GPU every step. The progress bar reads them every --log-every steps, the log once an epoch.
        sums = torch.zeros(len(logged), device=device)
        for images, labels in control.batches(batches, step, sums, f"epoch {epoch + 1}/{args.epochs}"):
            for group in optimizer.param_groups:        # the schedule is a function of the step: resumable
                group["lr"] = learning_rate(args, step, steps_per_epoch)
            # uint8 images (B, 3, H, W), or the V uint8 crops the workers cut from images of mixed sizes ->
            # V views (B, 3, h, w), globals first, drawn from a generator seeded by (seed, step, rank): a
            # resumed run draws the views an uninterrupted one would.
            views = crops(images, augmentation_generator(args.seed, step, control.rank))
            kappa, beta = loss_schedule(args, step, control.total_steps)
            terms = training_step(model, views, labels, optimizer, precision, args.method, kappa, args.alpha, beta)
            sums += terms
            control.watch(terms)       # a non-finite loss is recorded on the device, read at the next log step
            step += 1
        control.check_finite()         # before anything is saved: a non-finite loss never reaches a checkpoint

        # ---- the end of an epoch, or of a run stopped early (the epoch is then fractional): save, then
        # evaluate (a fault or a signal during the evaluation must not cost the epoch), then log
        record = {"epoch": round(step / steps_per_epoch, 4), "step": step, **control.means(sums, step - first_step),
                  "lr": learning_rate(args, max(0, step - 1), steps_per_epoch),
                  **dict(zip(("kappa", "beta"), loss_schedule(args, max(0, step - 1), control.total_steps))),
                  **epoch_rate(step - first_step, epoch_start, control, args.batch_size),
                  "minutes": control.minutes()}
        due = evaluation_due(step, steps_per_epoch, args, last=step == control.total_steps or control.out_of_time)
        end_of_epoch(record, due, state, monitor, steps_per_epoch, args, control)
        if control.stop_after_save(step):
            break

    if args.epochs == 0 and checkpoint is None:     # the untrained baseline: the same network, saved and evaluated
        end_of_epoch({"epoch": 0, "step": 0}, bool(args.eval_every), state, monitor, steps_per_epoch, args, control)


# ----------------------------------------------------------------------------------------------------
# The step

def training_step(model, views, labels, optimizer, precision, method, kappa, alpha, beta):
    """One AdamW step of --method's loss on the V views (B, 3, h, w) of a batch, at this step's kappa and
    beta (loss_schedule); returns the LOGGED terms, detached, stacked (len(LOGGED[method]),)."""
    autocast, scaler, memory_format = precision
    # The input in the network's layout (NHWC for ResNets on GPUs), else every convolution converts it.
    views = [v.contiguous(memory_format=memory_format) for v in views]
    # The last step's gradients are dropped before this step's forward pass, and CUDA graphs (--compile
    # reduce-overhead) are told that a new step begins: their outputs, these gradients among them, live in
    # memory that the next replay overwrites. Dropped, not zeroed in place: a .grad left in that memory
    # would be overwritten under AdamW's feet. Without CUDA graphs the second call does nothing.
    optimizer.zero_grad(set_to_none=True)
    torch.compiler.cudagraph_mark_step_begin()
    with autocast:                                # bf16 matmuls on GPUs; the loss itself runs in float32
        z = model(views)                          # (V, B, D) on the sphere (supervised: (V, B, C) logits)
    out = objective(z, labels, method, kappa, alpha, beta)
    scaler.scale(out["loss"]).backward()          # scaled only for fp16; otherwise the loss itself
    scaler.step(optimizer)                        # AdamW (fp16: skipped if the scaled gradients overflowed)
    scaler.update()
    # Kept on the device, stacked (len(LOGGED),): the caller sums them without waiting for the GPU.
    return torch.stack([out[k].detach() for k in LOGGED[method]])


def objective(z, labels, method, kappa, alpha, beta):
    """The loss of `method` on the model's output, as a dict holding "loss" and the other LOGGED terms."""
    if method == "hydes":
        return hydes_loss(z, kappa, alpha, beta)                             # Eq. (4) on z (V, B, D)
    if method == "infonce":
        return infonce_loss(z, kappa)
    logits = z.flatten(0, 1)                                                 # (V, B, C) logits -> (V*B, C)
    targets = labels.repeat(z.shape[0])                                      # (B,) -> (V*B,), row v*B + b
    return {"loss": torch.nn.functional.cross_entropy(logits, targets),
            "accuracy": (logits.argmax(dim=1) == targets).float().mean()}


def epoch_rate(steps, epoch_start, control, batch_size):
    """The log's images_per_s for an epoch of `steps` steps begun at `epoch_start`: of the steps after
    this session's first when the epoch holds it (its compilation and set-up logged apart, first_step_s)."""
    if control.first_step_ended is None or control.first_step_ended < epoch_start or steps < 2:
        return {"images_per_s": steps * batch_size / (time.time() - epoch_start)}
    return {"images_per_s": (steps - 1) * batch_size / (time.time() - control.first_step_ended),
            "first_step_s": control.first_step_seconds}


def learning_rate(args, step, steps_per_epoch):
    """Constant (the paper), or linear warm-up then cosine decay to zero over the whole run: a function of
    the step alone, so that a resumed run continues the schedule."""
    if args.schedule == "constant":
        return args.lr
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.epochs * steps_per_epoch - warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def loss_schedule(args, step, total_steps):
    """(kappa, beta) at `step`: constant, or with --kappa-final / --beta-final a cosine from the start value
    at step 0 to the final one at the last step, value = final + (start - final) (1 + cos(pi t)) / 2 with
    t = step / (total_steps - 1). A function of the step alone, so a resumed run continues the schedule;
    `total_steps` is --epochs' steps (raising --epochs on --resume stretches what is left of it)."""
    t = min(1.0, step / max(1, total_steps - 1))

    def cosine(start, final):
        return start if final is None else final + (start - final) * 0.5 * (1 + math.cos(math.pi * t))
    return cosine(args.kappa, args.kappa_final), cosine(args.beta, args.beta_final)


def augmentation_generator(seed, step, rank):
    """The generator of step `step`'s augmentation on process `rank`: a function of the three, so that a
    resumed run draws the views an uninterrupted one would, and processes draw different ones."""
    return torch.Generator().manual_seed(augmentation_seed(seed, step, rank))


# ----------------------------------------------------------------------------------------------------
# What train() calls: data, model, evaluation, log and checkpoint

def view_recipes(args):
    """The views of each image: DINO's multi-crop (data.dino_recipes) for the self-supervised objectives,
    one RandomResizedCrop and flip for the supervised baseline, as in the paper's setup."""
    if args.method == "supervised":
        return supervised_recipes(args.global_size)
    return dino_recipes(args.global_size, args.local_size, args.global_crops, args.local_crops,
                        args.global_scale, args.local_scale, args.blur)


def training_data(args, recipes, control):
    """(batches, order, classes): `batches` yields (images, labels (B,)) on the training device, in the
    order of `order` (an EpochOrder). Images of one size come whole, uint8 (B, 3, H, W), from memory or
    from loading workers (--data-source), and their views are cut on the device; images of mixed sizes
    come from the workers as the V uint8 views (B, 3, s, s) they cut from each whole image (FullImageCrops)."""
    if args.data_source == "memory" and not one_image_size(args.dataset, args.data_dir):
        raise SystemExit(f"error: --data-source memory holds images of one size, and {args.dataset}'s differ: the "
                         f"loading workers cut their crops from each whole image; use --data-source workers or auto")
    with control.first_process_first():           # process 0 downloads and extracts the dataset alone
        # The labelled images only for the supervised baseline (STL-10: its 5k train, not the 100k unlabelled).
        dataset = uint8_dataset(args.dataset, args.data_dir, recipes, labelled=args.method == "supervised")
        if args.eval_every:                       # the monitor's test split must exist before hours of training
            dataset_split(args.dataset, args.data_dir, "test", None)
    if args.skip_bad_images:
        dropped = drop_unreadable_images(dataset, args.workers)
        if dropped and control.main_process:
            print(f"warning: skipping {len(dropped)} unreadable image(s) of {len(dataset) + len(dropped)}, "
                  f"for example {dropped[0]}")
    order = EpochOrder(len(dataset), args.batch_size, args.seed, control.rank, control.world_size)
    if order.batches_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} images is less than one batch of {args.batch_size}; "
                         f"lower --batch-size")
    if isinstance(dataset, FullImageCrops):       # mixed sizes: the workers cut the crops
        return WorkerBatches(dataset, order, control.device, args.workers), order, dataset.classes
    fits = len(dataset) * dataset[0][0].numel() <= IN_MEMORY_BYTES
    if args.data_source == "memory" or (args.data_source == "auto" and fits):
        images, labels = load_into_memory(dataset, control.device, args.workers)   # (N, 3, H, W) uint8, once
        return InMemoryBatches(images, labels, order), order, dataset.classes
    return WorkerBatches(dataset, order, control.device, args.workers), order, dataset.classes


def labelled_training_images(batches, args):
    """(images, labels) that training holds in memory, when they are the labelled train split as the monitor
    evaluates it: the same files (every dataset but STL-10, whose 100k unlabelled images are trained on
    too, data.pretrain_dataset; the supervised baseline trains on the labelled split itself) at the
    evaluation size, where eval_transform changes nothing. Else None, and the monitor decodes its own
    copy."""
    labelled = args.method == "supervised" or args.dataset != "stl10"
    if isinstance(batches, InMemoryBatches) and labelled and batches.images.shape[-2:] == (args.global_size,) * 2:
        return batches.images, batches.labels
    return None


def build_model(args, num_classes, control, memory_format):
    """HyDeSModel on the device: backbone + projector onto the sphere, or + a linear classifier for
    --method supervised."""
    backbone = build_backbone(args.arch, args.global_size, args.width, args.depth, args.heads, args.stem)
    net = HyDeSModel(backbone, args.proj_hidden, args.proj_dim, num_classes if args.method == "supervised" else None,
                     per_view=args.forward == "per-view")
    if control.world_size > 1 and control.device.type == "cuda":
        # BatchNorm over the global batch too, so that K GPUs train the network one GPU would (same
        # state_dict keys). PyTorch's SyncBatchNorm runs on GPUs only: with gloo on CPUs each process
        # normalises its own share of the batch.
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net.to(control.device, memory_format=memory_format)


def parallel(net, args, control):
    """What the step calls: under torchrun, DDP (each process embeds its share of the batch; H_global still
    spans all of it, hydes.GatherBatch); with --compile, torch.compile."""
    model = net
    if control.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[control.device.index] if control.device.type == "cuda" else None)
    return torch.compile(model, mode=args.compile) if args.compile else model


def evaluation_due(step, steps_per_epoch, args, last):
    """Whether the monitor evaluates at `step`: after epochs 1, 1 + N, 1 + 2N, ... (N = --eval-every), the
    cadence of the paper's setup, whose code evaluates when the 0-based epoch is a multiple of 5, and
    after the last epoch (`last`, also a run stopped by --max-minutes), which it evaluates only when 5
    divides the 0-based epoch. A fractional epoch (a stop) is evaluated only when last."""
    if not args.eval_every:
        return False
    epochs_done, fraction = divmod(step, steps_per_epoch)
    return last or (fraction == 0 and (epochs_done - 1) % args.eval_every == 0)


def end_of_epoch(record, evaluate_now, state, monitor, steps_per_epoch, args, control):
    """Save, evaluate, save again, log. The first checkpoint carries the epoch's log record, marked
    `evaluation_pending` when an evaluation is due, so that whatever happens during the evaluation (an
    unreadable test image, a signal, a kill) the epoch is kept, and a resumed run evaluates it first (see
    train). The second, once the evaluation is done, holds the probe it trained and the record with its
    figures. A signal received during the epoch skips the evaluation, to stop quickly; the resumed run
    makes up for it."""
    record["evaluation_pending"] = bool(evaluate_now)
    evaluate_now = evaluate_now and not control.signalled
    if control.main_process:
        save(*state, record, steps_per_epoch, args)
    if evaluate_now:
        result = control.evaluation(lambda: monitor.evaluate(state[0], state[3], record["step"], control))
        if result:                                # {}: cut short by a signal; the checkpoint still says pending
            record.update(result, evaluation_pending=False)
            if control.main_process:
                save(*state, record, steps_per_epoch, args)
    if control.main_process:
        line = {k: v for k, v in record.items() if k != "evaluation_pending"}
        print(json.dumps(line))
        append_jsonl(os.path.join(args.out, "log.jsonl"), line)


class Monitor:
    """The online evaluation: k-NN top-1 and top-5 (evaluate.knn_accuracy) and a round of the paper's
    persistent linear probe (evaluate.PaperLinearProbe), top-1 and top-5 on test, from one forward pass of
    the frozen backbone over the labelled train split and the test split (eval_transform, no augmentation).

    Splits whose evaluation-size images fit in IN_MEMORY_BYTES as uint8 (CIFAR's 184 MB, STL-10's 360 MB)
    are decoded at the first evaluation and kept: every later one is a forward pass over tensors, with no
    image decoded again. The features are the same as through the files: the uint8 images are those of
    eval_transform before its tensor conversion, normalised on the device. Where training keeps the
    labelled train split in memory at the evaluation size (CIFAR, a folder of such images, not STL-10's
    unlabelled images), those tensors are the monitor's train split and only the test split is decoded.
    ImageNet and Food-101 are decoded by the loading workers at each evaluation.
    """

    def __init__(self, args, device, train_images=None):
        self.args, self.device = args, device
        self.train_images = train_images  # (images, labels) of the labelled train split, if training holds them
        self.decoded = None             # [train, test] as TensorDatasets of uint8 images, once they are kept

    def splits(self):
        """The two labelled splits, giving uint8 images, and the loading workers to read them with."""
        args = self.args
        if self.decoded is not None:
            return self.decoded, 0
        if self.train_images is not None:             # training decoded the train split: the test split only
            test, = labelled_splits(args.dataset, args.data_dir, args.global_size, normalised=False,
                                    workers=args.workers, skip_bad_images=args.skip_bad_images, names=("test",))
            train = torch.utils.data.TensorDataset(*(t.cpu() for t in self.train_images))   # CPU, as below
            self.decoded = [train, torch.utils.data.TensorDataset(*load_into_memory(test, "cpu", args.workers))]
            return self.decoded, 0
        splits = labelled_splits(args.dataset, args.data_dir, args.global_size, normalised=False,
                                 workers=args.workers, skip_bad_images=args.skip_bad_images)
        if sum(len(split) for split in splits) * 3 * args.global_size ** 2 > IN_MEMORY_BYTES:
            return splits, args.workers
        self.decoded = [torch.utils.data.TensorDataset(*load_into_memory(split, "cpu", args.workers))
                        for split in splits]
        return self.decoded, 0

    def evaluate(self, net, probe, step, control):
        """The monitor's figures as a dict. Process 0 evaluates while the others wait for it."""
        args, device, result = self.args, self.device, {}
        try:
            if control.main_process:
                splits, workers = self.splits()
                train_feats, train_labels, test_feats, test_labels = (
                    t.to(device) for split, name in zip(splits, ("train", "test"))
                    for t in extract_features(net.backbone, split, device, workers=workers,
                                              desc=f"monitor: {name} features"))
                result["knn_top1"], result["knn_top5"] = knn_accuracy(
                    train_feats, train_labels, test_feats, test_labels, args.knn_k, args.knn_temperature)
                # The probe's batches are drawn from (seed, step): a resumed run draws the same ones.
                generator = torch.Generator().manual_seed(int(np.random.SeedSequence([args.seed, step]).generate_state(1)[0]))
                probe.train_round(train_feats, train_labels, generator)
                result["linear_top1"], result["linear_top5"] = probe.score(test_feats, test_labels)
        finally:
            control.barrier()    # reached by every process, also when process 0's evaluation was cut short
        return result


def save(net, optimizer, scaler, probe, record, steps_per_epoch, args):
    """Rewrite OUT/ckpt.pt, and with --keep-every keep a copy of it as OUT/ckpt-epochE.pt."""
    path, step = os.path.join(args.out, "ckpt.pt"), record["step"]
    save_checkpoint(path, checkpoint_state(net, optimizer, scaler, probe, record, steps_per_epoch, args))
    if args.keep_every and step % (args.keep_every * steps_per_epoch) == 0:
        shutil.copyfile(path, os.path.join(args.out, f"ckpt-epoch{step // steps_per_epoch}.pt"))


def checkpoint_state(model, optimizer, scaler, probe, record, steps_per_epoch, args):
    """One dict with everything to resume or evaluate the run.

    `epoch` counts completed epochs (evaluate.py reports it); `data_order` says where in which epoch's
    order the next batch starts. The learning-rate schedule is a function of the step, so the step
    restores it; the optimiser state holds AdamW's moments and step counts; `linear_probe` the online
    probe's layer and Adam state. `log_record` is the epoch's line of log.jsonl, with
    `evaluation_pending` while a due evaluation has not run.
    """
    step = record["step"]
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "linear_probe": probe.state_dict(),
            "epoch": step // steps_per_epoch, "step": step, "args": vars(args), "rng": random_states(),
            "data_order": {"seed": args.seed, "epoch": step // steps_per_epoch,
                           "next_batch": step % steps_per_epoch, "batches_per_epoch": steps_per_epoch},
            "log_record": dict(record)}


def restore(checkpoint, net, optimizer, scaler, probe, steps_per_epoch):
    """Load a checkpoint's weights, optimiser, scaler, online probe and random states; returns the step to
    continue at."""
    if checkpoint["data_order"]["batches_per_epoch"] != steps_per_epoch:
        raise SystemExit(f"error: the checkpoint was trained with {checkpoint['data_order']['batches_per_epoch']}"
                         f" steps per epoch but the data now gives {steps_per_epoch}; resume with the same "
                         f"data (and the same --skip-bad-images)")
    net.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:          # empty when saved disabled (CPU, bf16), e.g. resumed on an fp16 GPU
        scaler.load_state_dict(checkpoint["scaler"])
    if "linear_probe" in checkpoint:  # absent from checkpoints written before the probe was online
        probe.load_state_dict(checkpoint["linear_probe"])
    restore_random_states(checkpoint["rng"])
    return checkpoint["step"]


def open_run_folder(args, checkpoint, step):
    """Make OUT ready: on --resume, forget log lines the checkpoint does not hold; with --force, delete the
    old run's checkpoints, log and probe results (not the feature cache); write args.json."""
    if checkpoint is not None:
        print(f"resuming {os.path.join(args.out, 'ckpt.pt')} at step {step}")
        resume_log(os.path.join(args.out, "log.jsonl"), checkpoint)
    elif args.force and os.path.isdir(args.out):
        for name in os.listdir(args.out):
            if name in ("ckpt.pt", "log.jsonl", "eval.jsonl", "segment.jsonl") or name.startswith("ckpt-epoch"):
                os.remove(os.path.join(args.out, name))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)


def resume_log(log_path, checkpoint):
    """On resume, make the log agree with the checkpoint: forget lines of steps it does not hold (a run
    killed after it logged but before it saved), so that the resumed run's lines replace them rather than
    repeat them; add the checkpoint's own line if it is missing (a run killed during the evaluation that
    follows the save), unless its evaluation is pending: train() runs it and logs the line with its
    figures. Rewritten atomically; a last line cut short by a kill is dropped (read_jsonl)."""
    step, saved = checkpoint["step"], checkpoint.get("log_record", {})
    records = [r for r in read_jsonl(log_path) if r["step"] <= step] if os.path.exists(log_path) else []
    if saved.get("evaluation_pending"):           # train() evaluates it and logs the line with its figures
        records = [r for r in records if r["step"] < step]
    elif saved and not any(r["step"] == step for r in records):
        records.append({k: v for k, v in saved.items() if k != "evaluation_pending"})
    write_atomically(log_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_states():
    """Every random-number stream a run could draw from, in a form torch.load(weights_only=True) accepts
    (numpy's state is an array and a few numbers, kept as a tensor and plain values)."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                      "has_gauss": has_gauss, "cached_gauss": cached_gauss},
            "python": random.getstate()}


def restore_random_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():     # as many as this machine has GPUs
        torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------------------------
# Checking the settings, and --resume's

def settings(argv):
    """The run's settings: parsed, merged with the checkpoint's on --resume, checked, and the crop sizes
    resolved from the data's resolution, all before any image is decoded or weight built, so that a
    mistake costs a second, not a dataset's decoding, and the settings never change once training starts.
    Returns (args, checkpoint or None)."""
    args = build_parser().parse_args(argv)
    if args.out is None:
        objective_name = {"hydes": f"kappa{args.kappa:g}", "infonce": f"infonce-kappa{args.kappa:g}",
                          "supervised": "supervised"}[args.method]
        args.out = os.path.join("runs", f"{args.dataset}-{args.arch}-{objective_name}")
    holder = process_holding(args.out)
    if holder:
        raise SystemExit(f"error: another train.py (process {holder}) is running in {args.out}; wait for it to end, "
                         f"or pick another --out")
    args, checkpoint = resume_settings(args, argv)
    problem = check_args(args)
    if problem is None and (args.global_size is None or args.local_size is None):
        native = native_image_size(args.dataset, args.data_dir)
        default_global, default_local = default_crop_sizes(native)
        args.global_size = args.global_size or default_global
        args.local_size = args.local_size or default_local
        sizes = folder_image_sizes(args.data_dir) if args.dataset == "folder" else {}
        if len(sizes) > 1:                     # say what a folder of mixed sizes trains at
            sides = [min(size) for size in sizes]
            print(f"note: {args.data_dir}/train holds images of {len(sizes)} sizes (shorter sides {min(sides)} to "
                  f"{max(sides)} px); crops follow the median shorter side, {native} px: "
                  f"{args.global_size} and {args.local_size} px (--global-size and --local-size set them)")
    refuse(problem or check_crop_sizes(args) or unwritable(args.out, "--out"))
    args.arithmetic = run_arithmetic(args, checkpoint)
    return args, checkpoint


def run_arithmetic(args, checkpoint):
    """What the run computes in: --precision, or for auto what models.auto_precision picks for this network,
    crops and device. A resumed run on the same kind of device keeps the arithmetic it started in, so that
    a change in what auto picks (a newer version of this file, say) never changes a run midway; on another
    kind of device auto is decided afresh."""
    if args.precision != "auto":
        return args.precision
    saved = checkpoint["args"] if checkpoint is not None else {}
    if saved and torch.device(saved["device"]).type == torch.device(args.device).type:
        if "arithmetic" in saved:
            return saved["arithmetic"]
        if torch.device(args.device).type == "cpu":
            return "fp32"                  # auto meant float32 on every CPU before the arithmetic was kept
    return auto_precision(torch.device(args.device), args.arch, args.stem, min(args.global_size, args.local_size))


def check_args(args):
    """Every setting that can be checked without data. Returns the first problem as a one-line message,
    or None."""
    (global_min, global_max), (local_min, local_max) = args.global_scale, args.local_scale
    rules = [
        (args.kappa > 0, f"--kappa must be > 0 (got {args.kappa:g}); the paper uses 1 and tries 0.1 to 20"),
        (args.kappa_final is None or args.kappa_final > 0, f"--kappa-final must be > 0 (got {args.kappa_final})"),
        (args.beta_final is None or args.beta_final >= 0, f"--beta-final must be >= 0 (got {args.beta_final})"),
        (args.alpha >= 0 and args.beta >= 0, "--alpha and --beta must be >= 0 (the paper uses 1 and 1)"),
        (args.alpha > 0 or args.beta > 0, "--alpha and --beta are both 0, which leaves no loss to train on"),
        (args.batch_size >= 2, f"--batch-size must be >= 2 (got {args.batch_size}): H_global compares images"),
        (args.global_crops >= 1, f"--global-crops must be >= 1 (got {args.global_crops}); the paper uses 2"),
        (args.local_crops >= 0, f"--local-crops must be >= 0 (got {args.local_crops}); the paper uses 6"),
        (args.global_crops + args.local_crops >= 2,
         "H_local needs at least 2 views of each image: raise --global-crops or --local-crops"),
        (0 < global_min <= global_max <= 1 and 0 < local_min <= local_max <= 1,
         "--global-scale and --local-scale are area fractions MIN MAX with 0 < MIN <= MAX <= 1"),
        (args.proj_dim >= 2, f"--proj-dim must be >= 2 (got {args.proj_dim}): the sphere S^(D-1) needs D >= 2"),
        (args.proj_hidden >= 1, f"--proj-hidden must be >= 1 (got {args.proj_hidden})"),
        (all(v is None or v >= 1 for v in (args.width, args.depth, args.heads)),
         "--width, --depth and --heads must be >= 1"),
        (args.arch == "vit_tiny" or (args.depth is None and args.heads is None),
         f"--depth and --heads shape vit_tiny only, not {args.arch}; drop them"),
        (args.arch != "vit_tiny" or (args.width or 192) % (args.heads or 3) == 0,
         f"a ViT of width {args.width or 192} cannot split into {args.heads or 3} heads; pick a width divisible by them"),
        (args.epochs >= 0, f"--epochs must be >= 0 (got {args.epochs}; 0 evaluates the untrained network)"),
        (args.lr > 0 and args.weight_decay >= 0, "--lr must be > 0 and --weight-decay >= 0"),
        (args.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
        (args.max_minutes is None or args.max_minutes > 0, "--max-minutes must be > 0"),
        (args.eval_every >= 0 and args.knn_k >= 1 and args.knn_temperature > 0,
         "--eval-every must be >= 0, --knn-k >= 1 and --knn-temperature > 0"),
        (args.log_every >= 1 and args.workers >= 0 and args.keep_every >= 0,
         "--log-every must be >= 1, --workers and --keep-every >= 0"),
        (not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device} but PyTorch sees no CUDA GPU here; pass --device cpu"),
        (args.precision != "fp16" or args.device.startswith("cuda"),
         "--precision fp16 is for GPUs without bf16 (on a CPU, bf16 gives its speed without gradient scaling); "
         "use fp32 or bf16"),
    ]
    return first_problem(rules)


def check_crop_sizes(args):
    """Crop sizes, once they are resolved from the data's resolution: a ViT needs whole patches."""
    if min(args.global_size, args.local_size) < 8:
        return f"crops of {args.global_size} and {args.local_size} px are too small; use at least 8 px"
    smallest = min(args.global_size, args.local_size)
    if (args.precision == "bf16" and not args.device.startswith("cuda") and args.arch.startswith("resnet")
            and not cpu_bf16_convolutions_are_right(args.arch, args.stem, smallest)):
        # e.g. the ImageNet stem's layer4 meets 16 px crops at 1 x 1: oneDNN's bf16 weight gradient of a
        # convolution whose stride exceeds its input's side is wrong in PyTorch 2.14 (see README)
        return (f"--precision bf16 on a CPU computes wrong gradients for {args.arch}'s {args.stem} stem on "
                f"{smallest} px crops (a strided convolution meets a 1-pixel input); use --precision fp32, "
                f"or --stem cifar")
    if args.arch.startswith("vit"):
        patch = vit_patch_size(args.global_size)
        if args.global_size % patch or args.local_size % patch:
            return (f"{args.arch} cuts {args.global_size} px images into {patch} px patches, so --global-size and "
                    f"--local-size must be multiples of {patch} (got {args.global_size} and {args.local_size})")
    return None


def resume_settings(args, argv):
    """--resume: the checkpoint and the run's settings, with the ones typed again that may change.
    Without --resume: refuses an OUT that holds a run, unless --force. Returns (args, checkpoint or None)."""
    checkpoint_path = os.path.join(args.out, "ckpt.pt")
    if args.resume and args.force:
        raise SystemExit("error: --resume continues the run in OUT and --force deletes it: pick one")
    if args.resume == "auto":                  # a requeued job: continue where there is a checkpoint, else start
        args.resume = os.path.exists(checkpoint_path)
    if not args.resume:
        if not args.force and any(os.path.exists(os.path.join(args.out, f)) for f in ("ckpt.pt", "log.jsonl")):
            raise SystemExit(f"error: {args.out} holds a run; pass --resume to continue it, --force to replace it, "
                             f"or --out for a new folder")
        return args, None
    if not os.path.exists(checkpoint_path):
        raise SystemExit(f"error: --resume given but there is no {checkpoint_path}; drop --resume to start anew")
    try:
        checkpoint = safe_load(checkpoint_path)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")
    given, saved = settings_given(argv), checkpoint["args"]
    fixed = sorted(k for k in given - set(RESUMABLE_OVERRIDES) - {"out", "resume"}
                   if normalised(getattr(args, k)) != normalised(saved.get(k)))
    if fixed:
        changeable = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_OVERRIDES)
        raise SystemExit(f"error: --resume takes the run's settings from its checkpoint; --{fixed[0].replace('_', '-')} "
                         f"cannot change from {saved.get(fixed[0])} (only {changeable} can); drop it, or start a "
                         f"new run with --out")
    # Settings newer than the checkpoint take their defaults, or the value it was trained with where the
    # default has changed since (SETTINGS_BEFORE_THEIR_FLAGS); the folder may have moved since.
    defaults = vars(build_parser().parse_args([]))
    before = {k: rule(saved) for k, rule in SETTINGS_BEFORE_THEIR_FLAGS.items() if k not in saved}
    if isinstance(saved.get("compile"), bool):       # --compile was a switch before it took a mode
        saved = {**saved, "compile": "default" if saved["compile"] else None}
    args = argparse.Namespace(**{**defaults, **before, **saved, **{k: getattr(args, k) for k in given},
                                 "resume": True, "out": args.out})
    return args, checkpoint


def settings_given(argv):
    """The settings typed on the command line, as opposed to left at their defaults. argparse fills in
    a default only where the namespace it parses into lacks the attribute, so a namespace pre-filled
    with a marker shows which ones the command line set."""
    parser, unset = build_parser(), object()
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset)))
    return {k for k, v in vars(parsed).items() if v is not unset}


def normalised(value):
    """Settings compare equal whether argparse gave a list or a checkpoint a tuple."""
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------------------------------
# Run control: stopping early, alike on every process

def lock_run_folder(out):
    """Make OUT and hold an exclusive lock on OUT/.lock for as long as this process lives, so that a second
    train.py on the same folder is refused rather than interleaving two runs' checkpoints and logs. The
    operating system drops the lock when the process ends, however it ends: a crash never leaves it stuck."""
    try:
        os.makedirs(out, exist_ok=True)
        handle = open(os.path.join(out, ".lock"), "a+")
    except OSError as error:
        raise SystemExit(f"error: cannot write in {out} ({error.strerror}); pick a writable --out") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:         # it was free when the settings were checked: a race, which it lost
        handle.seek(0)
        raise SystemExit(f"error: another train.py (process {handle.read().strip() or '?'}) is running in {out}; "
                         f"wait for it to end, or pick another --out") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def process_holding(out):
    """The process id written in OUT/.lock if a live process holds that lock, else None. Asked before
    anything else, so that a second run is told at once, not after its data are loaded."""
    try:
        with open(os.path.join(out, ".lock")) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)     # released when the file closes
            except BlockingIOError:
                return handle.read().strip() or "?"
    except OSError:                 # no lock file: no run has claimed this folder yet
        pass
    return None


def distributed_setup(args):
    """torchrun starts one process per GPU with RANK, LOCAL_RANK and WORLD_SIZE set: join them in a process
    group (NCCL on GPUs, gloo on CPUs). Returns (rank, world_size, device); (0, 1, --device) without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, torch.device(args.device)
    if args.batch_size % world_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} is the global batch and must split evenly over "
                         f"{world_size} processes")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # While process 0 runs the monitor the others wait at a barrier; the default 10-minute timeout
    # would kill an ImageNet run there.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return dist.get_rank(), world_size, device


class RunControl:
    """Decides when a run stops before its last epoch, and says so, alike on every process. The rules:

    - A signal: the first Ctrl-C (SIGINT) or SIGTERM (a cluster's pre-emption) asks to stop after the
      current step, so that no step is cut in half; the run saves and exits with the command that resumes.
      Ctrl-C's handler is then restored, so a second Ctrl-C stops at once (the checkpoint on disk is
      whole, by save_checkpoint's rename); a second SIGTERM (torchrun forwards the one it receives) is
      ignored, for it must not kill the process before its save. A signal before the first step, while
      the data load, stops the run at once: there is nothing to save yet.
    - Loading workers that died: a SIGTERM to the whole job ends them too, and the next batch never
      comes. Every step taken is whole, so the run saves as for the signal. Without a signal it is an error.
    - The time budget (--max-minutes): the run saves, runs the final evaluation and ends normally.
    - A non-finite loss: the run stops naming the step and the terms, and its weights are never saved.
      It is recorded on the device at every step (`watch`) and read only where the host waits anyway.
    - Agreement: under torchrun all processes must stop before the same step and take the same path (a
      signal skips the evaluation, the time budget does not), or one would wait forever in a collective the
      others never reach: a process whose loading workers died, say, while the others still have batches.
      So before every step the processes agree on (no batch, a stop asked, out of time), by an all_reduce
      of three numbers over a CPU (gloo) group: it waits for the other processes' hosts, never for a GPU.
    """

    def __init__(self, args, rank, world_size, device):
        self.args, self.rank, self.world_size, self.device = args, rank, world_size, device
        self.main_process = rank == 0              # the one that prints, logs, evaluates and saves
        self.logged = LOGGED[args.method]
        self.started = time.time()                 # restarted at the first step: the budget counts training
        self.received = None                       # the first signal received, if any
        self.signalled = self.out_of_time = False  # the agreed reasons to stop
        self.previous_handlers, self.lock, self.training = {}, None, False
        # (step, loss terms) of the first non-finite loss; step -1 while there is none.
        self.first_nonfinite = torch.full((1 + len(self.logged),), -1.0, device=device)
        self.device_step = None
        self.total_steps, self.estimated = None, False
        # When this session's first step ended, and what it took: compilation (--compile), cuDNN's choice of
        # algorithms and lazy set-up all happen in it, so the rates (progress bar, log) and the estimate of
        # the run's time count from its end
        self.first_step_ended, self.first_step_seconds = None, None
        # Host-side agreement between processes: a gloo group over the same processes (NCCL's would wait
        # for the GPU). Every process builds it here, in the same order, as new_group requires.
        self.host_group = dist.new_group(backend="gloo") if world_size > 1 else None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():    # handlers can only be set there
            self.previous_handlers = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        self.restore_handlers()
        if self.lock is not None:
            self.lock.close()               # releases the run folder
            self.lock = None

    def claim_run_folder(self):
        """Lock OUT for this run, before anything is written in it (see lock_run_folder)."""
        self.lock = lock_run_folder(self.args.out)

    def restore_handlers(self):
        for s, handler in self.previous_handlers.items():
            signal.signal(s, handler)
        self.previous_handlers = {}

    def handle(self, signum, frame):
        if not self.training:       # still loading data or building the model: nothing to save, stop at once
            raise SystemExit(128 + signum)
        if self.received is not None:               # a second SIGTERM: torchrun forwards the one it got
            return
        self.received = signum
        # A second Ctrl-C stops at once (the checkpoint on disk is whole, by save_checkpoint's rename).
        signal.signal(signal.SIGINT, self.previous_handlers.get(signal.SIGINT, signal.default_int_handler))
        # PyTorch's DataLoader raises from a SIGCHLD handler, at whatever line runs, when a worker dies.
        # After a SIGTERM to the whole job the workers die too; the step in progress and the save must not
        # be cut short by that (a dead worker is still reported if another batch is asked for). The
        # handler comes back with the others in __exit__.
        self.previous_handlers.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))

    def batches(self, batches, step, sums, description):
        """The epoch's batches with a progress bar, until the epoch ends or a stop is agreed. `step`: the
        run's step at the first batch; `sums`: the logged terms summed so far, for the bar."""
        if not self.training:       # the time budget counts training, not the data's loading
            self.training, self.started = True, time.time()
        self.device_step = torch.tensor(float(step), device=self.device)   # float32 counts steps exactly to 2^24
        bar = tqdm(total=len(batches), desc=description, dynamic_ncols=True, disable=not self.main_process)
        iterator, steps, start, untimed = iter(batches), 0, time.time(), 0
        try:
            while True:
                batch, workers_gone = None, False
                try:
                    batch = next(iterator)
                except StopIteration:
                    pass
                except DatasetError as error:       # an unreadable image, met by a loading worker
                    raise SystemExit(f"error: {error_message(error)}; the last checkpoint "
                                     f"{os.path.join(self.args.out, 'ckpt.pt')} is intact")
                except RuntimeError:                # the loading workers are gone: after a signal, a stop
                    if self.received is None:
                        raise
                    workers_gone = True
                over_budget = steps > 0 and bool(self.args.max_minutes) and self.minutes() > self.args.max_minutes
                ended, self.signalled, self.out_of_time = self.agreed(
                    batch is None and not workers_gone, self.received is not None or workers_gone, over_budget)
                if ended or self.signalled or self.out_of_time:
                    return
                yield batch
                steps += 1
                bar.update()
                if self.first_step_ended is None:       # this session's first step: the rates count from its end
                    start, untimed = self.end_first_step(start), 1
                if steps % self.args.log_every == 0 and steps > untimed:   # the host waits for the device here,
                    seconds_per_step = max(time.time() - start, 1e-9) / (steps - untimed)   # once in log_every steps
                    self.estimate_once(seconds_per_step, step + steps)
                    self.check_finite()
                    bar.set_postfix(**{k: f"{v:.3f}" for k, v in self.means(sums, steps).items() if k != "mi"},
                                    img_s=f"{self.args.batch_size / seconds_per_step:.0f}")
        finally:
            bar.close()

    def end_first_step(self, start):
        """Note the end of this session's first step, begun at `start` (its GPU work waited for: one wait a
        session), and what it took; -> the time it ended."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.first_step_ended = time.time()
        self.first_step_seconds = self.first_step_ended - start
        return self.first_step_ended

    def estimate_once(self, seconds_per_step, step):
        """Once the first steps are timed: on one GPU without CUDA graphs, that --compile reduce-overhead
        would make the steps faster; if the whole run would take more than a few hours here, say so, and on a
        CPU how to try the method in minutes (a fresh machine runs the paper's 200 full-width epochs)."""
        if self.estimated or not self.main_process or not self.total_steps:
            return
        self.estimated = True
        gpu = self.device.type == "cuda"
        if gpu and self.world_size == 1 and self.args.compile != "reduce-overhead":
            tqdm.write("note: --compile reduce-overhead runs the network as CUDA graphs: on an H200 it ran the "
                       "paper's small-crop steps (CIFAR-10 ResNet-18, STL-10 ViT-Tiny, per-resolution) 1.9x and 3.9x "
                       "as fast as eager, after a minute of compilation (README, Speed)")
        hours = seconds_per_step * (self.total_steps - step) / 3600
        if hours > 3:
            tqdm.write(f"note: at {self.args.batch_size / seconds_per_step:.0f} images/s this run needs about "
                       f"{hours:.0f} more hours on {self.device}." + ("" if gpu else
                       " To try the method in minutes here, train the README's laptop run: --width 16 "
                       "--proj-hidden 512 --kappa 10 --beta 0.5 --lr 3e-3 --no-blur --stem cifar "
                       "--forward per-resolution --max-minutes 10"))

    def watch(self, terms):
        """Record the step and terms (len(logged),) if the loss is the first non-finite one, on the device."""
        record_now = (self.first_nonfinite[0] < 0) & ~torch.isfinite(terms[0])
        self.first_nonfinite = torch.where(record_now, torch.cat([self.device_step[None], terms]), self.first_nonfinite)
        self.device_step += 1

    def check_finite(self):
        """Stop at the first non-finite loss, naming its step and terms; the weights it produced are never saved."""
        steps_before, *values = self.first_nonfinite.tolist()
        if not self.agreed(steps_before >= 0)[0]:
            return
        terms = dict(zip(self.logged, values))
        others = ", ".join(f"{k} {v}" for k, v in terms.items() if k not in ("loss", "mi"))
        path = os.path.join(self.args.out, "ckpt.pt")
        kept = f"the last good checkpoint {path} is kept" if os.path.exists(path) else "no checkpoint had been written yet"
        if not self.main_process:   # process 0 names the step and terms it saw; the others stop quietly
            raise SystemExit(1)
        raise SystemExit(f"error: the loss became {terms['loss']} at step {int(steps_before) + 1} ({others}); "
                         f"{kept}. Likely causes: a learning rate too high (lower --lr), or fp16 overflow at a "
                         f"large --kappa on a GPU without bf16 (lower --kappa)")

    def means(self, sums, steps):
        """The logged terms summed over `steps` steps -> their means, averaged over the processes (each
        holds its share of the batch's), as a dict."""
        if self.world_size > 1:
            sums = sums.clone()
            dist.all_reduce(sums)
            sums /= self.world_size
        return dict(zip(self.logged, (sums / max(1, steps)).tolist()))

    def minutes(self):
        return (time.time() - self.started) / 60

    def evaluation(self, evaluate):
        """Run evaluate() after the epoch's checkpoint is saved -> its result, or {} when a signal cut it
        short (the loading workers die with a SIGTERM to the whole job); a signal received during it
        stops the run after the log line, as one during a step does. An unreadable image is an error
        naming the saved checkpoint."""
        try:
            result = evaluate()
        except DatasetError as error:
            raise SystemExit(f"error: {error_message(error)}; the checkpoint {os.path.join(self.args.out, 'ckpt.pt')} "
                             f"was saved before the evaluation: mend the image or add --skip-bad-images, then --resume")
        except RuntimeError:
            if self.received is None:
                raise
            result = {}
        self.signalled = self.agreed(self.received is not None)[0]
        return result

    def stop_after_save(self, step):
        """After an epoch's checkpoint: exit if a signal asked to, naming the command that resumes; say so
        and return True if the time budget is spent; else False."""
        if self.signalled:
            self.barrier()          # nobody exits (prompting torchrun to stop the rest) before the save
            signum = self.received or signal.SIGTERM         # this process may have agreed without a signal
            if self.main_process:
                launcher = f"torchrun --nproc_per_node={self.world_size}" if self.world_size > 1 else "python"
                print(f"{signal.Signals(signum).name}: stopped after step {step} and saved "
                      f"{os.path.join(self.args.out, 'ckpt.pt')}; continue with\n"
                      f"    {launcher} train.py --out {self.args.out} --resume")
            raise SystemExit(128 + signum)
        if self.out_of_time and self.main_process:
            print(f"stopped after {self.args.max_minutes} minutes at step {step}; checkpoint "
                  f"{os.path.join(self.args.out, 'ckpt.pt')}")
        return self.out_of_time

    def agreed(self, *flags):
        """Each flag (a host-side bool) made true on every process if it is true on any; the flags
        themselves without data parallelism. One small all_reduce on the CPU group: no GPU involved."""
        if self.world_size == 1:
            return flags
        flags = torch.tensor([float(f) for f in flags])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.host_group)
        return tuple(f > 0 for f in flags.tolist())

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    @contextmanager
    def first_process_first(self):
        """Process 0 runs the block alone (a download, say) before the others run it."""
        if self.rank > 0:
            dist.barrier()
        yield
        if self.rank == 0 and self.world_size > 1:
            dist.barrier()


if __name__ == "__main__":
    main()
