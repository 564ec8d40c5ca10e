"""Train a backbone with HyDeS (arXiv 2604.24498, Sections III-IV).

    python train.py --dataset stl10 --arch vit_tiny --kappa 1        # the paper's ViT-T16 on STL-10
    python train.py --dataset cifar10 --arch resnet18                # the paper's CIFAR-10 ResNet-18
    python train.py --dataset cifar10 --method supervised            # Table I's supervised baseline
    torchrun --nproc_per_node=4 train.py --dataset imagenet --arch resnet50 --batch-size 512   # 4 GPUs

The defaults are the paper's: AdamW, learning rate 1e-3, batch 128, 200 epochs, kappa = 1,
alpha = beta = 1, DINO multi-crop with 2 global and 6 local views. The run's folder (--out) receives
args.json (every resolved setting), log.jsonl (one line per epoch: loss, H_global, H_local, MI, lr,
images/s and, every --eval-every epochs, the online k-NN top-1 that Figures 6-8 plot) and ckpt.pt
(model, optimiser, grad scaler, epoch, step, random-number states, data order and the arguments),
rewritten after every epoch.

Speed: the multi-crop views of a whole batch are made on the training device (data.BatchedMultiCrop),
from images decoded once into its memory when they fit; bf16 autocast and channels_last on GPUs;
--compile for torch.compile. Under torchrun each process embeds its share of the global batch and
H_global spans all of it (hydes.GatherBatch).

Reliability: `--resume` continues bit for bit on CPU (the data order and every augmentation are a function
of --seed, epoch and step; the checkpoint holds the rest). Checkpoints are written to a temporary file
and renamed, so a crash or a kill during the write leaves the previous one intact. Ctrl-C or SIGTERM
finishes the current step, saves, and exits with the command that resumes.
"""

import argparse
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import (DATASETS, BatchedMultiCrop, DatasetError, EpochOrder, InMemoryBatches, MultiCrop, SeededSamples,
                  dataset_split, default_crop_sizes, drop_unreadable_images, error_message, load_into_memory,
                  native_image_size, pretrain_dataset, uint8_dataset)
from evaluate import CheckpointError, knn_evaluate, safe_load
from hydes import hydes_loss, infonce_loss
from models import ARCHS, HyDeSModel, build_backbone, vit_patch_size

# Settings that --resume takes from the command line; every other one comes from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "max_minutes", "eval_every", "workers", "device", "data_dir", "skip_bad_images",
                       "log_every", "keep_every", "compile")
# Datasets up to this size as uint8 are decoded once and kept on the training device (--augment batched):
# CIFAR's 150 MB and STL-10's 2.9 GB are; ImageNet (250 GB at 256 px) and Food-101 (15 GB) are not.
IN_MEMORY_BYTES = 4 * 2**30
# The terms each objective logs, summed over an epoch's steps. InfoNCE runs log HyDeS's entropies of their
# embeddings too, so that the two objectives can be compared in the same terms.
LOGGED = {"hydes": ("loss", "h_global", "h_local", "mi"), "infonce": ("loss", "h_global", "h_local", "mi"),
          "supervised": ("loss", "accuracy")}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="folder = any DATA_DIR with train/<class>/* and test/<class>/* (or val/)")
    g.add_argument("--data-dir", default="data", help="root folder of the dataset (downloaded there when possible)")
    g.add_argument("--global-crops", type=int, default=2, help="global views per image (paper: 2)")
    g.add_argument("--local-crops", type=int, default=6, help="local views per image (paper: 6)")
    g.add_argument("--global-size", type=int, help="global crop side; default by resolution: 32, 96 or 224")
    g.add_argument("--local-size", type=int, help="local crop side; default by resolution: 16, 48 or 96")
    g.add_argument("--global-scale", type=float, nargs=2, default=(0.4, 1.0), metavar=("MIN", "MAX"),
                   help="area fraction of a global crop (paper: 0.4 1.0)")
    g.add_argument("--local-scale", type=float, nargs=2, default=(0.05, 0.4), metavar=("MIN", "MAX"),
                   help="area fraction of a local crop (paper: 0.05 0.4)")
    g.add_argument("--no-blur", dest="blur", action="store_false",
                   help="drop DINO's Gaussian blur (CIFAR recipes often do: it erases much of a 32 px image)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    g.add_argument("--augment", default="batched", choices=("batched", "per-image"),
                   help="batched: the multi-crop of whole uint8 batches on the training device, images decoded "
                        "once into memory when they fit (no data-loading bottleneck); per-image: DINO's PIL "
                        "recipe in the loading workers, the reference the batched form is tested against")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="decode every image file once before training and leave out those that fail "
                        "(default: stop with an error naming the file)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=ARCHS)
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
                        "on every view (Table I's baselines, same backbone and augmentation)")
    g.add_argument("--kappa", type=float, default=1.0,
                   help="vMF concentration: higher learns faster early and stalls later (Section VII-B)")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of H_global (1 = the MI estimate)")
    g.add_argument("--beta", type=float, default=1.0,
                   help="weight of H_local (1 = the MI estimate; lower learns faster early, Section VII-C)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=200)
    g.add_argument("--batch-size", type=int, default=128, help="images per step (each gives V views)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay; the paper names none, so PyTorch's AdamW default")
    g.add_argument("--schedule", default="constant", choices=("constant", "cosine"),
                   help="constant: the paper states one learning rate; cosine: warm-up then cosine decay to 0")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up (cosine schedule only)")
    g.add_argument("--max-minutes", type=float,
                   help="stop after this many minutes of training in this session (a resumed run counts afresh), save, and run the final k-NN")

    g = p.add_argument_group("monitoring")
    g.add_argument("--eval-every", type=int, default=1,
                   help="online k-NN every N epochs and at the end (0: never); costs a pass over train+test")
    g.add_argument("--knn-k", type=int, default=200)
    g.add_argument("--knn-temperature", type=float, default=0.1)
    g.add_argument("--log-every", type=int, default=20, help="steps between progress-bar updates")
    g.add_argument("--keep-every", type=int, default=0,
                   help="also keep OUT/ckpt-epochE.pt every N epochs (0: never), for linear-probe curves "
                        "(Figs. 6-8): evaluate.py on each, then analyze.py curves OUT/eval.jsonl --metric linear_top1")

    g = p.add_argument_group("system")
    g.add_argument("--out", help="run folder (default runs/DATASET-ARCH-kappaK)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt with its saved settings")
    g.add_argument("--force", action="store_true",
                   help="start anew in an OUT that holds a run, deleting its checkpoints, log and probe results")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="under torchrun, each process takes the GPU of its LOCAL_RANK")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model: faster steps on a GPU after a compilation of a minute or two")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.out is None:
        objective = {"hydes": f"kappa{args.kappa:g}", "infonce": f"infonce-kappa{args.kappa:g}",
                     "supervised": "supervised"}[args.method]
        args.out = os.path.join("runs", f"{args.dataset}-{args.arch}-{objective}")
    return args


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


def check_args(args):
    """Every setting that can be checked without data, before any image is read or weight built.
    Returns the first problem as a one-line message, or None."""
    (global_min, global_max), (local_min, local_max) = args.global_scale, args.local_scale
    rules = [
        (args.kappa > 0, f"--kappa must be > 0 (got {args.kappa:g}); the paper uses 1 and tries 0.1 to 20"),
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
    ]
    return next((message for ok, message in rules if not ok), None)


def check_crop_sizes(args):
    """Crop sizes, once they are resolved from the data's resolution: a ViT needs whole patches."""
    if min(args.global_size, args.local_size) < 8:
        return f"crops of {args.global_size} and {args.local_size} px are too small; use at least 8 px"
    if args.arch.startswith("vit"):
        patch = vit_patch_size(args.global_size)
        if args.global_size % patch or args.local_size % patch:
            return (f"{args.arch} cuts {args.global_size} px images into {patch} px patches, so --global-size and "
                    f"--local-size must be multiples of {patch} (got {args.global_size} and {args.local_size})")
    return None


def learning_rate(args, step, steps_per_epoch):
    """Constant, or linear warm-up then cosine decay to zero over the whole run."""
    if args.schedule == "constant":
        return args.lr
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.epochs * steps_per_epoch - warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def checkpoint_state(model, optimizer, scaler, step, steps_per_epoch, args):
    """One dict with everything to resume or evaluate the run.

    `epoch` counts completed epochs (evaluate.py reports it); `data_order` says where in which epoch's
    order the next batch starts. The learning-rate schedule is a function of the step, so the step
    restores it; the optimiser state holds AdamW's moments and step counts.
    """
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": step // steps_per_epoch, "step": step, "args": vars(args), "rng": random_states(),
            "data_order": {"seed": args.seed, "epoch": step // steps_per_epoch,
                           "next_batch": step % steps_per_epoch, "batches_per_epoch": steps_per_epoch}}


def save_checkpoint(path, state):
    """Write `state` so that `path` always holds a complete checkpoint, whenever the process dies.

    The bytes go to a temporary file in the same folder (same file system, so the rename is atomic), are
    flushed and fsynced to the disk, and only then renamed over the previous checkpoint; the folder is
    fsynced so the rename itself survives a power cut. A kill mid-write leaves a stray .tmp and the
    previous checkpoint untouched.
    """
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class StopSignals:
    """Turns the first SIGINT (Ctrl-C) or SIGTERM (a cluster's pre-emption) into a request to stop after
    the current step; the handlers are then restored, so a second Ctrl-C stops at once (the checkpoint on
    disk is still whole, by save_checkpoint's rename)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():    # handlers can only be set there
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.received = signum
        self.__exit__()
        # PyTorch's DataLoader raises from a SIGCHLD handler, at whatever line runs, when a worker dies.
        # A SIGTERM sent to the whole job ends the workers too; the step in progress and the save must
        # not be cut short by that (a dead worker is still reported if another batch is asked for).
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def ignore_interrupts_in_worker(worker_id):
    """Ctrl-C reaches every process of the terminal's group; data-loading workers ignore it so that the
    training process decides when to stop (after its step and checkpoint), not a dying worker. SIGTERM
    they must obey, for the DataLoader ends a stuck worker with it: when a cluster's pre-emption sends
    it to all of a job's processes, the training loop sees its workers gone and saves (see `train`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def objective(z, labels, args):
    """The loss of --method on the model's output, as a dict holding "loss" and the other LOGGED terms."""
    if args.method == "hydes":
        return hydes_loss(z, args.kappa, args.alpha, args.beta)              # Eq. (4) on z (V, B, D)
    if args.method == "infonce":
        return infonce_loss(z, args.kappa)
    logits = z.flatten(0, 1)                                                 # (V, B, C) -> (V*B, C)
    targets = labels.repeat(z.shape[0])                                      # (B,) -> (V*B,), row v*B + b
    return {"loss": torch.nn.functional.cross_entropy(logits, targets),
            "accuracy": (logits.argmax(dim=1) == targets).float().mean()}


def training_step(model, views, labels, optimizer, scaler, autocast, args):
    """One AdamW step on the multi-crop views of a batch; returns the LOGGED terms, detached, stacked."""
    with autocast:
        z = model(views)                                      # (V, B, D) on the sphere, or (V, B, C) logits
    out = objective(z, labels, args)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return torch.stack([out[k].detach() for k in LOGGED[args.method]])


def resume_settings(args, argv, checkpoint_path):
    """--resume: the checkpoint and the run's settings, with the ones typed again that may change.
    Without --resume: refuses an OUT that holds a run, unless --force. Returns (args, checkpoint or None)."""
    if args.resume and args.force:
        raise SystemExit("error: --resume continues the run in OUT and --force deletes it: pick one")
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
    # Settings newer than the checkpoint take their defaults; the folder may have moved since.
    defaults = vars(build_parser().parse_args([]))
    args = argparse.Namespace(**{**defaults, **saved, **{k: getattr(args, k) for k in given},
                                 "resume": True, "out": args.out})
    return args, checkpoint


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
    # While process 0 runs the online k-NN the others wait at a barrier; the default 10-minute timeout
    # would kill an ImageNet run there.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return dist.get_rank(), world_size, device


def agreed(flags, device):
    """Each flag made true on every process if it is true on any, so that all stop together and take
    the same path; the flags themselves without data parallelism. One all_reduce, a host-device
    synchronisation: call it sparingly."""
    if not dist.is_initialized():
        return tuple(flags)
    flags = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return tuple(f > 0 for f in flags.tolist())


def training_batches(args, device, rank, world_size):
    """The training data as (batches, order, crops, classes): `batches` yields (inputs, labels) in the
    order of `order` (an EpochOrder); `crops` is the BatchedMultiCrop that turns uint8 inputs into views
    on the device, or None when the inputs are already the views (--augment per-image). The dataset
    object itself is not returned: in memory, its decoded copy is all that is kept.

    --augment batched: datasets that fit in IN_MEMORY_BYTES (CIFAR, STL-10, the folder copies) are
    decoded once into a uint8 tensor on the device, so an epoch needs no workers at all; bigger ones
    (ImageNet, Food-101) are decoded to one fixed size by DataLoader workers and cropped on the device.
    """
    native = native_image_size(args.dataset, args.data_dir)
    default_global, default_local = default_crop_sizes(native)
    args.global_size = args.global_size or default_global
    args.local_size = args.local_size or default_local
    problem = check_crop_sizes(args)
    if problem:
        raise SystemExit(f"error: {problem}")
    views = (args.global_size, args.local_size, args.global_crops, args.local_crops, tuple(args.global_scale),
             tuple(args.local_scale), args.blur)
    labelled = args.method == "supervised"    # labelled images only (STL-10: its 5k train, not the 100k unlabelled)
    if world_size > 1 and rank > 0:
        dist.barrier()               # process 0 downloads and extracts the dataset first, alone
    if args.augment == "per-image":
        transform, crops = MultiCrop(*views), None
        dataset = (dataset_split(args.dataset, args.data_dir, "train", transform) if labelled
                   else pretrain_dataset(args.dataset, args.data_dir, transform))
    else:
        dataset, crops = uint8_dataset(args.dataset, args.data_dir, args.global_size, labelled), BatchedMultiCrop(*views)
    if args.eval_every:              # the k-NN monitor's labelled splits must exist before hours of training
        dataset_split(args.dataset, args.data_dir, "test", None)
    if world_size > 1 and rank == 0:
        dist.barrier()
    if args.skip_bad_images:
        dropped = drop_unreadable_images(dataset, args.workers)
        if dropped and rank == 0:
            print(f"warning: skipping {len(dropped)} unreadable image(s) of {len(dataset) + len(dropped)}, "
                  f"for example {dropped[0]}")
    order = EpochOrder(len(dataset), args.batch_size, args.seed, rank, world_size)
    if order.batches_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} images is less than one batch of {args.batch_size}; "
                         f"lower --batch-size")
    if crops is not None and len(dataset) * dataset[0][0].numel() <= IN_MEMORY_BYTES:
        images, labels = load_into_memory(dataset, device, args.workers)       # (N, 3, H, W) uint8, once
        return InMemoryBatches(images, labels, order), order, crops, dataset.classes
    loader = torch.utils.data.DataLoader(
        SeededSamples(dataset), batch_sampler=order, num_workers=args.workers, pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0, worker_init_fn=ignore_interrupts_in_worker)
    return loader, order, crops, dataset.classes


def augmentation_generator(seed, step, rank):
    """The generator of step `step`'s batched augmentation on process `rank`: a function of the three,
    so that a resumed run draws the views an uninterrupted one would, and processes draw different ones."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]))


def main(argv=None):
    args = parse_args(argv)
    checkpoint_path = os.path.join(args.out, "ckpt.pt")
    args, checkpoint = resume_settings(args, argv, checkpoint_path)
    problem = check_args(args)
    if problem:
        raise SystemExit(f"error: {problem}")
    rank, world_size, device = distributed_setup(args)
    try:
        train(args, checkpoint, checkpoint_path, rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, checkpoint, checkpoint_path, rank, world_size, device):
    main_process = rank == 0             # the one that prints, logs, evaluates and saves

    # ---- device and precision: bf16 autocast on GPUs that have it, fp16 + grad scaling otherwise, fp32 on CPU
    use_cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast("cuda", dtype=amp_dtype) if use_cuda else nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and amp_dtype == torch.float16)
    # ResNets run faster with NHWC tensors on GPUs (cuDNN's tensor-core convolutions want them); on the
    # CPU the default layout is kept, so CPU runs stay bit-exact across resumes.
    memory_format = torch.channels_last if use_cuda and args.arch.startswith("resnet") else torch.contiguous_format

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # ---- data: the training images in an order fixed by (seed, epoch), and how they become views
    try:
        batches, order, crops, classes = training_batches(args, device, rank, world_size)
    except DatasetError as error:
        raise SystemExit(f"error: {error_message(error)}")
    steps_per_epoch = order.batches_per_epoch

    # ---- model and optimiser; `net` is the plain module (saved, evaluated), `model` what the step calls
    backbone = build_backbone(args.arch, args.global_size, args.width, args.depth, args.heads)
    num_classes = len(classes) if args.method == "supervised" else None
    net = HyDeSModel(backbone, args.proj_hidden, args.proj_dim, num_classes)
    if world_size > 1 and use_cuda:
        # BatchNorm over the global batch too, so that K GPUs train the network one GPU would (same
        # state_dict keys). PyTorch's SyncBatchNorm runs on GPUs only: with gloo on CPUs each process
        # normalises its own share of the batch.
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:      # empty when saved disabled (CPU, bf16), e.g. resumed on an fp16 GPU
            scaler.load_state_dict(checkpoint["scaler"])
        restore_random_states(checkpoint["rng"])
        step = checkpoint["step"]
        if checkpoint["data_order"]["batches_per_epoch"] != steps_per_epoch:
            raise SystemExit(f"error: the checkpoint was trained with {checkpoint['data_order']['batches_per_epoch']}"
                             f" steps per epoch but the data now gives {steps_per_epoch}; resume with the same "
                             f"data (and the same --skip-bad-images)")
    model = net
    if world_size > 1:      # each process its share of the batch; H_global still spans all (hydes.GatherBatch)
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if use_cuda else None)
    if args.compile:
        model = torch.compile(model)
    if main_process:
        if checkpoint is not None:
            print(f"resuming {checkpoint_path} at step {step} (epoch {step // steps_per_epoch + 1}, "
                  f"batch {step % steps_per_epoch + 1})")
            drop_log_records_after(os.path.join(args.out, "log.jsonl"), step)
        elif args.force:            # the old run's checkpoints, logs and probe results, not the feature cache
            old = ["ckpt.pt", "log.jsonl", "eval.jsonl", "segment.jsonl"]
            if os.path.isdir(args.out):
                old += [f for f in os.listdir(args.out) if f.startswith("ckpt-epoch")]
            for name in old:
                if os.path.exists(os.path.join(args.out, name)):
                    os.remove(os.path.join(args.out, name))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        source = "in memory" if isinstance(batches, InMemoryBatches) else f"{args.workers} workers"
        print(f"{args.dataset}: {order.num_images} images ({source}, {args.augment} multi-crop), {steps_per_epoch} "
              f"steps/epoch, views {args.global_crops}x{args.global_size} + {args.local_crops}x{args.local_size}; "
              f"{args.arch} {sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M params; device {device}"
              + (f" x {world_size} processes" if world_size > 1 else ""))

    def online_knn():
        """Process 0 evaluates; the others wait for it."""
        result = None
        if main_process:
            result = knn_evaluate(net.backbone, args.dataset, args.data_dir, args.global_size, device,
                                  args.knn_k, args.knn_temperature, args.workers)
        if dist.is_initialized():
            dist.barrier()
        return result

    def save():
        if main_process:
            save_checkpoint(checkpoint_path, checkpoint_state(net, optimizer, scaler, step, steps_per_epoch, args))

    # ---- training
    started = time.time()
    logged = LOGGED[args.method]
    # The first non-finite loss, as (step, loss terms), recorded on the device: no synchronisation per step.
    first_nonfinite = torch.full((1 + len(logged),), -1.0, device=device)
    device_step = torch.tensor(float(step), device=device)         # float32 counts steps exactly up to 2^24
    with StopSignals() as stop:
        for epoch in range(step // steps_per_epoch, args.epochs):
            model.train()
            order.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)
            sums = torch.zeros(len(logged), device=device)          # loss terms summed over this epoch's steps
            epoch_start, epoch_steps = time.time(), 0
            signalled = out_of_time = False
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True, disable=not main_process)
            try:
                for inputs, labels in bar:
                    lr = learning_rate(args, step, steps_per_epoch)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    if crops is None:                                  # views made by the loading workers
                        views = [v.to(device, non_blocking=True) for v in inputs]
                    else:                                              # uint8 (B, 3, H, W) -> views on the device
                        views = crops(inputs.to(device, non_blocking=True), augmentation_generator(args.seed, step, rank))
                    views = [v.contiguous(memory_format=memory_format) for v in views]     # V tensors (B, 3, H, W)
                    labels = labels.to(device, non_blocking=True)     # (B,); used by --method supervised only
                    terms = training_step(model, views, labels, optimizer, scaler, autocast, args)
                    sums += terms
                    record_now = (first_nonfinite[0] < 0) & ~torch.isfinite(terms[0])
                    first_nonfinite = torch.where(record_now, torch.cat([device_step[None], terms]), first_nonfinite)
                    device_step += 1
                    step += 1
                    epoch_steps += 1
                    over_budget = bool(args.max_minutes) and time.time() - started > 60 * args.max_minutes
                    log_now = epoch_steps % args.log_every == 0
                    if log_now:                                        # the only host-device synchronisation
                        stop_if_nonfinite(first_nonfinite, logged, checkpoint_path, device)
                        means = dict(zip(logged, (reduced(sums, world_size) / epoch_steps).tolist()))
                        bar.set_postfix(**{k: f"{v:.3f}" for k, v in means.items() if k != "mi"},
                                        img_s=f"{epoch_steps * args.batch_size / (time.time() - epoch_start):.0f}")
                    # Processes must stop at the same step and take the same path after it (a signal skips the
                    # k-NN, a time budget does not): with several, they agree at log steps only.
                    if world_size == 1 or log_now:
                        signalled, out_of_time = agreed((stop.received is not None, over_budget), device)
                    if signalled or out_of_time:
                        break
            except DatasetError as error:       # an unreadable image, raised in a loading worker
                raise SystemExit(f"error: {error_message(error)}; the last checkpoint {checkpoint_path} is intact")
            except RuntimeError:
                # A SIGTERM to the whole job also ended the loading workers, and the next batch never
                # came. Every step taken is whole: save them, as for any other signalled stop.
                if stop.received is None:
                    raise
                signalled = True
            finally:
                bar.close()
            stop_if_nonfinite(first_nonfinite, logged, checkpoint_path, device)

            # ---- end of the epoch, of the time budget or of a signalled stop: log, evaluate, checkpoint
            record = {"epoch": round(step / steps_per_epoch, 4), "step": step,
                      **dict(zip(logged, (reduced(sums, world_size) / max(1, epoch_steps)).tolist())),
                      "lr": learning_rate(args, max(0, step - 1), steps_per_epoch),
                      "images_per_s": epoch_steps * args.batch_size / (time.time() - epoch_start),
                      "minutes": (time.time() - started) / 60}
            finished = epoch + 1 == args.epochs or out_of_time
            if args.eval_every and not signalled and (step % (args.eval_every * steps_per_epoch) == 0 or finished):
                knn = online_knn()
                if main_process:
                    record["knn_top1"], record["knn_top5"] = knn
            if main_process:
                print(json.dumps(record))
                with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
            save()
            if main_process and args.keep_every and step % (args.keep_every * steps_per_epoch) == 0:
                shutil.copyfile(checkpoint_path, os.path.join(args.out, f"ckpt-epoch{step // steps_per_epoch}.pt"))
            if signalled:
                if dist.is_initialized():
                    dist.barrier()          # nobody exits (prompting torchrun to stop the rest) before the save
                signum = stop.received or signal.SIGTERM         # this process may have agreed without a signal
                if main_process:
                    launcher = f"torchrun --nproc_per_node={world_size}" if world_size > 1 else "python"
                    print(f"{signal.Signals(signum).name}: stopped after step {step} and saved {checkpoint_path}; "
                          f"continue with\n    {launcher} train.py --out {args.out} --resume")
                raise SystemExit(128 + signum)
            if out_of_time:
                if main_process:
                    print(f"stopped after {args.max_minutes} minutes at step {step}; checkpoint {checkpoint_path}")
                break

    if args.epochs == 0:    # the random-initialisation baseline: the same network, evaluated untrained
        save()
        if args.eval_every:
            knn = online_knn()
            if main_process:          # epoch 0 of the learning curves
                record = {"epoch": 0, "step": 0, "knn_top1": knn[0], "knn_top5": knn[1]}
                print(json.dumps(record))
                with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")


def reduced(sums, world_size):
    """The loss terms summed over steps, averaged over processes (each holds its share of the batch's)."""
    if world_size > 1:
        sums = sums.clone()
        dist.all_reduce(sums)
        sums /= world_size
    return sums


def drop_log_records_after(log_path, step):
    """On resume, forget log lines of steps the checkpoint does not hold (a run killed between writing
    its log line and its checkpoint), so that the resumed run's lines replace them rather than repeat them."""
    if os.path.exists(log_path):
        with open(log_path) as f:
            lines = [line for line in f if json.loads(line)["step"] <= step]
        with open(log_path, "w") as f:
            f.writelines(lines)


def stop_if_nonfinite(first_nonfinite, logged, checkpoint_path, device):
    """Stop at the first non-finite loss, naming its step and terms; the weights it produced are never saved."""
    steps_before, *values = first_nonfinite.tolist()
    if not agreed((steps_before >= 0,), device)[0]:
        return
    terms = dict(zip(logged, values))
    others = ", ".join(f"{k} {v}" for k, v in terms.items() if k not in ("loss", "mi"))
    kept = (f"the last good checkpoint {checkpoint_path} is kept" if os.path.exists(checkpoint_path)
            else "no checkpoint had been written yet")
    raise SystemExit(f"error: the loss became {terms['loss']} at step {int(steps_before) + 1} ({others}); "
                     f"{kept}. Likely causes: a learning rate too high (lower --lr), or fp16 overflow at a "
                     f"large --kappa on a GPU without bf16 (lower --kappa)")


if __name__ == "__main__":
    main()
