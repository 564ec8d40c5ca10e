"""Train a backbone with HyDeS (arXiv 2604.24498, Sections III-IV).

    python train.py --dataset stl10 --arch vit_tiny --kappa 1        # the paper's ViT-T16 on STL-10
    python train.py --dataset cifar10 --arch resnet18                # the paper's CIFAR-10 ResNet-18
    python train.py --dataset cifar10 --method supervised            # Table I's supervised baseline
    torchrun --nproc_per_node=4 train.py --dataset imagenet --arch resnet50 --batch-size 512   # 4 GPUs

The defaults are the paper's: AdamW, learning rate 1e-3, batch 128, 200 epochs, kappa = 1,
alpha = beta = 1, DINO multi-crop with 2 global and 6 local views.

The file reads in the order a run goes: the settings, then `train()`, whose loop takes one `training_step`
a batch. A step: a batch of B uint8 images, already on the training device, becomes V = 8 views (the
recipe of data.dino_recipes, made by batched_crops.BatchedMultiCrop); the backbone and projector map
them to z (V, B, D) on the sphere S^{D-1} (models.HyDeSModel); AdamW takes a step on
loss = beta H_local - alpha H_global (hydes.hydes_loss, Eqs. 2-4). Every epoch ends with OUT/ckpt.pt
rewritten; after epochs 1, 6, 11, ... and the last (--eval-every 5, the paper's setup's cadence), the
monitor: the k-NN and a round of the persistent linear probe whose curves Figures 6-8 plot; then a line
in OUT/log.jsonl (loss, H_global, H_local, MI and how near it is to its ceiling, lr, kappa, beta, images/s,
and at evaluations linear and k-NN top-1 and top-5).

What a reader may skip lives in files of its own: loading.py feeds the batches, runcontrol.py decides
when a run stops early (Ctrl-C, SIGTERM, --max-minutes, a non-finite loss), resume.py saves and restores
the run bit for bit, checks.py refuses bad settings in one line, precision.py picks the arithmetic, and
step_graph.py runs training_step with its crops as one CUDA graph (--step-graph).
"""

import argparse
import json
import math
import os
import random
import shutil
import time
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist

from batched_crops import BatchedMultiCrop
from checkpoints import CheckpointError, save_checkpoint
from checks import (HelpFormatter, check_crop_sizes, check_training_args, ctrl_c_in_one_line, error_message, refuse,
                    unwritable)
from data import (DATASETS, GLOBAL_SCALE, LOCAL_SCALE, DatasetError, default_crop_sizes, dino_recipes,
                  native_image_size, supervised_recipes)
from evaluate import PaperLinearProbe, knn_accuracy
from features import extract_features
from hydes import hydes_loss, infonce_loss, mi_ceiling, own_view_share
from loading import (InMemoryBatches, MonitorImages, augmentation_seed, labelled_training_images,
                     note_mixed_sizes, training_data)
from models import ARCHS, STEMS, HyDeSModel, build_backbone
from per_view_batchnorm import convert_per_view_batchnorm
from precision import PRECISIONS, precision_for, run_arithmetic
from records import append_jsonl
from resume import (NothingToTrain, checkpoint_state, epoch_sums_so_far, open_run_folder, process_holding, restore,
                    resume_settings)
from runcontrol import RunControl, distributed_setup
from step_graph import WholeStep

# The terms each objective logs, summed over an epoch's steps. InfoNCE runs log HyDeS's entropies of their
# embeddings too, so that the two objectives can be compared in the same terms; both log how close the MI
# estimate is to its ceiling (ceiling_terms).
ON_THE_SPHERE = ("loss", "h_global", "h_local", "mi", "mi_fraction", "own_share")
LOGGED = {"hydes": ON_THE_SPHERE, "infonce": ON_THE_SPHERE, "supervised": ("loss", "accuracy")}
# torch.compile's modes that --compile offers. "default" fuses the network's operations into fewer, larger
# kernels; "reduce-overhead" also records the compiled forward and backward as CUDA graphs and replays
# them, so that the host launches one graph instead of each kernel: the remedy for a step bound by
# launches, as the paper's small crops make it on a GPU (SPEED.md).
COMPILE_MODES = ("default", "reduce-overhead")


# ----------------------------------------------------------------------------------------------------
# The settings

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
                        "which keeps 4x more resolution and trains far better on 32-96 px images (REPRODUCE.md)")
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
    g.add_argument("--step-graph", action=argparse.BooleanOptionalAction, default=False,
                   help="the whole step (crops, network, loss, AdamW) as one function of fixed shapes, captured as "
                        "ONE CUDA graph and replayed each step, so the GPU never waits for the host (step_graph.py); "
                        "with --compile, compiled into one graph first. The same views and arithmetic as without it, "
                        "up to float32 rounding. One GPU, bf16 or fp32, a fixed --kappa; on a CPU the same function runs. "
                        "--resume may switch it on or off (--no-step-graph)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="arithmetic of the forward pass (the loss is float32 whatever this says). auto: bf16 "
                        "autocast on GPUs that have it natively, fp16 with gradient scaling on older GPUs; on CPUs "
                        "with AVX-512 BF16 or AMX, bf16 for ResNets whose convolutions oneDNN computes right on "
                        "these crops (SPEED.md), else float32; fp16 runs on GPUs only. --resume keeps the run's")
    return p


def main(argv=None):
    try:
        args, checkpoint = settings(argv)      # parsed, checked, crop sizes resolved; --resume: the saved ones
        rank, world_size, device = distributed_setup(args)
        # The first Ctrl-C stops after the step and saves (RunControl); a second one stops at once
        with ctrl_c_in_one_line(f"stopped at once by a second Ctrl-C; {os.path.join(args.out, 'ckpt.pt')} holds "
                                f"the last epoch saved (continue with --resume)"):
            with RunControl(args, rank, world_size, device, LOGGED[args.method]) as control:
                train(args, checkpoint, control)
    except NothingToTrain as done:             # --resume with fewer --epochs than trained
        print(done)
    except DatasetError as error:              # a dataset missing, or an image unreadable outside the steps
        raise SystemExit(f"error: {error_message(error)}")
    except CheckpointError as error:           # a checkpoint that cannot be written: a full disk, say
        raise SystemExit(f"error: {error}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
    args, checkpoint = resume_settings(args, argv, build_parser)      # --resume: the checkpoint's settings
    problem = check_training_args(args)
    if problem is None and (args.global_size is None or args.local_size is None):
        native = native_image_size(args.dataset, args.data_dir)       # the crops follow the data's resolution
        default_global, default_local = default_crop_sizes(native)
        args.global_size = args.global_size or default_global
        args.local_size = args.local_size or default_local
        note_mixed_sizes(args, native)
    refuse(problem or check_crop_sizes(args) or unwritable(args.out, "--out"))
    args.arithmetic = run_arithmetic(args, checkpoint)
    return args, checkpoint


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
    crops = BatchedMultiCrop(recipes, every_crop=args.step_graph)    # every_crop: shapes fixed for a graph
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
    whole_step = one_graph_step(args, net, optimizer, crops, precision, device) if args.step_graph else None
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
        first_step, resumed_at, epoch_start = epoch * steps_per_epoch, step, time.time()
        # The logged terms are summed on the device: reading them every step would make the host wait for
        # the GPU every step. The progress bar reads them every --log-every steps, the log once an epoch.
        # Zeros, or those of the steps a run resumed mid-epoch took before it stopped.
        sums = epoch_sums_so_far(checkpoint, logged, step - first_step, device)
        description = f"epoch {epoch + 1}/{args.epochs}"
        for images, labels in control.batches(batches, step, sums, step - first_step, description):
            lr = learning_rate(args, step, steps_per_epoch)         # the schedules are functions of the step:
            kappa, beta = loss_schedule(args, step, control.total_steps)   # a resumed run continues them
            # The augmentation is drawn from a generator seeded by (seed, step, rank): a resumed run draws
            # the views an uninterrupted one would.
            generator = augmentation_generator(args.seed, step, control.rank)
            if whole_step:             # --step-graph: the same step as one graph (step_graph.py)
                terms = whole_step(images, labels, generator, lr, beta)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # uint8 images (B, 3, H, W), or the V uint8 crops the workers cut from images of mixed
                # sizes -> V views (B, 3, h, w), globals first
                views = crops(images, generator)
                terms = training_step(model, views, labels, optimizer, precision, args.method, kappa, args.alpha,
                                      beta)
            sums += terms
            control.watch(terms)       # a non-finite loss is recorded on the device, read at the next log step
            step += 1
        control.check_finite()         # before anything is saved: a non-finite loss never reaches a checkpoint

        # ---- the end of an epoch, or of a run stopped early (the epoch is then fractional): save, then
        # evaluate (a fault or a signal during the evaluation must not cost the epoch), then log
        record = {"epoch": round(step / steps_per_epoch, 4), "step": step, **control.means(sums, step - first_step),
                  "lr": learning_rate(args, max(0, step - 1), steps_per_epoch),
                  **dict(zip(("kappa", "beta"), loss_schedule(args, max(0, step - 1), control.total_steps))),
                  **control.images_per_second(step - resumed_at, epoch_start),
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
    if method in ("hydes", "infonce"):
        out = hydes_loss(z, kappa, alpha, beta) if method == "hydes" else infonce_loss(z, kappa)   # Eq. (4), z (V, B, D)
        return {**out, **ceiling_terms(z, kappa, out["mi"])}
    logits = z.flatten(0, 1)                                                 # (V, B, C) logits -> (V*B, C)
    targets = labels.repeat(z.shape[0])                                      # (B,) -> (V*B,), row v*B + b
    return {"loss": torch.nn.functional.cross_entropy(logits, targets),
            "accuracy": (logits.argmax(dim=1) == targets).float().mean()}


def ceiling_terms(z, kappa, mi):
    """How near the MI estimate is to its ceiling (hydes.py, "The estimate's ceiling"), for the log:
    mi_fraction, MI / log((N-1)/(V-1)) with N over the global batch, and own_share, the mean share of an
    anchor's kernel mass that falls on its own image's views (hydes.own_view_share, over this process's
    images). A kernel that tells the images apart perfectly has both at 1, and then Eq. (4) has nothing
    left to gain but sharper clusters: a measure of Section VII-B's stall. Diagnostics, no gradient."""
    views, batch = z.shape[:2]
    processes = dist.get_world_size() if dist.is_initialized() else 1
    return {"mi_fraction": mi.detach() / mi_ceiling(views, views * batch * processes),
            "own_share": own_view_share(z.detach(), kappa)}


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
# What train() calls: the views, the model, the evaluation, the checkpoint

def view_recipes(args):
    """The views of each image: DINO's multi-crop (data.dino_recipes) for the self-supervised objectives,
    one RandomResizedCrop and flip for the supervised baseline, as in the paper's setup."""
    if args.method == "supervised":
        return supervised_recipes(args.global_size)
    return dino_recipes(args.global_size, args.local_size, args.global_crops, args.local_crops,
                        args.global_scale, args.local_scale, args.blur)


def build_model(args, num_classes, control, memory_format):
    """HyDeSModel on the device: backbone + projector onto the sphere, or + a linear classifier for
    --method supervised."""
    backbone = build_backbone(args.arch, args.global_size, args.width, args.depth, args.heads, args.stem)
    net = HyDeSModel(backbone, args.proj_hidden, args.proj_dim, num_classes if args.method == "supervised" else None)
    if control.world_size > 1 and control.device.type == "cuda":
        # BatchNorm over the global batch too, so that K GPUs train the network one GPU would (same
        # state_dict keys). PyTorch's SyncBatchNorm runs on GPUs only: with gloo on CPUs each process
        # normalises its own share of the batch.
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if args.forward == "per-view":      # each BatchNorm normalises each view's B images apart (the paper's setup)
        net = convert_per_view_batchnorm(net, images_per_view=args.batch_size // control.world_size)
    return net.to(control.device, memory_format=memory_format)


def parallel(net, args, control):
    """What the step calls: under torchrun, DDP (each process embeds its share of the batch; H_global still
    spans all of it, hydes.GatherBatch); with --compile, torch.compile."""
    model = net
    if control.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[control.device.index] if control.device.type == "cuda" else None)
    if args.step_graph:                    # the step graph compiles the whole step itself
        return model
    return torch.compile(model, mode=args.compile) if args.compile else model


def one_graph_step(args, net, optimizer, crops, precision, device):
    """--step-graph: training_step with the crops before it, as one graph (step_graph.WholeStep)."""
    if precision.scaler.is_enabled():
        raise SystemExit(f"error: --step-graph runs without fp16's gradient scaling, and {device} has no bf16; "
                         f"pass --precision fp32, or drop --step-graph")

    def loss(z, labels, beta):             # kappa is fixed (checks.py refuses --kappa-final with the graph)
        return objective(z, labels, args.method, args.kappa, args.alpha, beta)
    return WholeStep(net, optimizer, crops, loss, LOGGED[args.method], precision, device, compile=bool(args.compile))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    the frozen backbone over the labelled train split and the test split (eval_transform, no augmentation),
    decoded once and kept in memory where they fit (loading.MonitorImages)."""

    def __init__(self, args, device, train_images=None):
        self.args, self.device = args, device
        self.images = MonitorImages(args, device, train_images)

    def evaluate(self, net, probe, step, control):
        """The monitor's figures as a dict. Process 0 evaluates while the others wait for it."""
        args, device, result = self.args, self.device, {}
        try:
            if control.main_process:
                splits, workers = self.images.splits()
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


if __name__ == "__main__":
    main()
