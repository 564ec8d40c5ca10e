"""Train a backbone with HyDeS (arXiv 2604.24498, Sections III-IV).

    python train.py --dataset stl10 --arch vit_tiny --kappa 1        # Table I's ViT-T16 on STL-10
    python train.py --dataset cifar10 --arch resnet18                # Table I's CIFAR-10 ResNet-18
    python train.py --dataset cifar10 --method supervised            # Table I's supervised baseline
    torchrun --nproc_per_node=4 train.py --dataset imagenet --arch resnet50 --batch-size 512   # 4 GPUs

The defaults are the paper's: AdamW, learning rate 1e-3, batch 128, 200 epochs (Section IV's for CIFAR,
STL-10 and Food-101; it gives none for its ImageNet runs), alpha = beta = 1, DINO multi-crop with 2
global (40-100% of the image) and 6 local (5-40%) views. Ours: kappa = 1 (the paper names a kappa only for
Figure 5's network) and the crop sides; our inference from the evaluation code the paper cites: the
ImageNet stem, per-view BatchNorm and AdamW's weight decay of 1e-6 (the paper names none).

The file reads in the order a run goes: the settings, then `train()`, whose loop takes one `training_step`
a batch. A step: a batch of B uint8 images, already on the training device, becomes V = 8 views (the
recipe of data.dino_recipes, made by data.make_views); the backbone and projector map them to z (V, B, D)
on the sphere S^{D-1} (models.HyDeSModel); AdamW takes a step on loss = beta H_local - alpha H_global
(hydes.hydes_loss, Eqs. 2-4). With --compile, torch.compile compiles the views, the network and the loss
of a step (`loss_of_batch`) together. Every epoch ends with OUT/ckpt.pt rewritten; after epochs 1, 6,
11, ... and the last (--eval-every 5, the cited evaluation code's cadence), the monitor: the k-NN and a
round of the online linear probe whose curves Figures 6-8 plot; then a line in OUT/log.jsonl (loss,
H_global, H_local, MI, images/s, and at evaluations linear and k-NN top-1 and top-5).

What a reader may skip lives in files of its own: loading.py feeds the batches, runs.py saves and
restores the run bit for bit and decides when it stops early (Ctrl-C, SIGTERM, --max-minutes, a
non-finite loss), and settings.py refuses bad settings in one line and picks the arithmetic.
"""

import argparse
import functools
import json
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist

from checkpoints import CheckpointError, append_jsonl, save_checkpoint
from data import (DATASETS, GLOBAL_SCALE, LOCAL_SCALE, DatasetError, default_crop_sizes, dino_recipes, draw_views,
                  make_views, native_image_size, supervised_recipes)
from evaluate import PaperLinearProbe, knn_accuracy
from hydes import hydes_loss
from loading import InMemoryBatches, extract_features, labelled_splits, note_mixed_sizes, training_data
from models import ARCHS, STEMS, HyDeSModel, build_backbone
from runs import (NothingToTrain, RunControl, checkpoint_state, distributed_setup, epoch_sums_so_far, open_run_folder,
                  refuse_a_second_run, restore, resume_settings)
from settings import (PRECISIONS, HelpFormatter, check_crop_sizes, check_training_args, ctrl_c_in_one_line,
                      default_device, device_argument, error_message, precision_for, refuse, run_arithmetic,
                      unwritable)

# The terms each objective logs, summed over an epoch's steps
LOGGED = {"hydes": ("loss", "h_global", "h_local", "mi"), "supervised": ("loss", "accuracy")}


# ----------------------------------------------------------------------------------------------------
# The settings

# torch.compile's modes that --compile offers. "default" fuses the step's operations (views, network,
# loss) into fewer, larger kernels; "reduce-overhead" also records the compiled forward and backward as
# CUDA graphs and replays them, so that the host launches one graph instead of each kernel: the remedy
# for a step bound by launches, as small crops (32/16 px) make it on a GPU (SPEED.md).
COMPILE_MODES = ("default", "reduce-overhead")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="folder = any DATA_DIR with train/<class>/* and test/<class>/* (or val/)")
    g.add_argument("--data-dir", default="data", help="root folder of the dataset (downloaded there when possible)")
    g.add_argument("--global-crops", type=int, default=2, help="global views per image (paper: 2)")
    g.add_argument("--local-crops", type=int, default=6, help="local views per image (paper: 6)")
    g.add_argument("--global-size", type=int,
                   help="global crop side; default by the data's resolution: 32, 96 or 224 (ours: the paper gives "
                        "only area fractions)")
    g.add_argument("--local-size", type=int, help="local crop side; default by resolution: 16, 48 or 96 (ours)")
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
                   help="per-view: the backbone and projector called once per view, so BatchNorm normalises one "
                        "view's batch (our reading of the cited evaluation code; the paper names neither way); "
                        "per-resolution: the backbone called once per crop size, BatchNorm over all the views of "
                        "a size, as DINO")
    g.add_argument("--width", type=int, help="ResNet base width (64) or ViT width (192); smaller for laptops")
    g.add_argument("--depth", type=int, help="ViT blocks (12)")
    g.add_argument("--heads", type=int, help="ViT attention heads (3)")
    g.add_argument("--proj-hidden", type=int, default=2048, help="hidden width of the projector MLP")
    g.add_argument("--proj-dim", type=int, default=256,
                   help="D, the sphere S^{D-1} the loss lives on (paper tried 128-4096: no clear difference)")

    g = p.add_argument_group("loss (Eqs. 1-4)")
    g.add_argument("--method", default="hydes", choices=tuple(LOGGED),
                   help="hydes: the paper's objective; supervised: a linear classifier on the backbone, cross-entropy "
                        "on one RandomResizedCrop (8-100%%) and flip per labelled image, the "
                        "supervised baseline (Table I) as the evaluation code the paper cites trains it")
    g.add_argument("--kappa", type=float, default=1.0,
                   help="vMF concentration (1: Figure 5's network; the paper names no other): higher learns faster "
                        "early and stalls later (Section VII-B)")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of H_global (1 = the MI estimate)")
    g.add_argument("--beta", type=float, default=1.0,
                   help="weight of H_local (1 = the MI estimate; lower learns faster early, Section VII-C)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=200,
                   help="passes over the training set (paper: 200 on CIFAR, STL-10, Food-101); 0 saves and "
                        "evaluates the untrained network")
    g.add_argument("--batch-size", type=int, default=128, help="images per step (each gives V views)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-6,
                   help="AdamW weight decay; the paper names none, its evaluation setup's configurations use 1e-6")
    g.add_argument("--max-minutes", type=float,
                   help="stop after this many minutes of training in this session (a resumed run counts afresh), "
                        "save, and run the final evaluation")

    g = p.add_argument_group("monitoring")
    g.add_argument("--eval-every", type=int, default=5,
                   help="the online k-NN and linear probe after epochs 1, 1+N, 1+2N, ... and the last (the cited "
                        "evaluation code's cadence at N = 5; 0: never); each costs a forward pass over the labelled "
                        "train and test splits")
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
    g.add_argument("--device", type=device_argument, default=default_device(),
                   help="cpu, cuda, cuda:N or mps (float32); under torchrun, each process takes the GPU of its "
                        "LOCAL_RANK")
    g.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                   help="torch.compile the step's views, network and loss: faster steps on a GPU after a "
                        "compilation of a minute or two. --compile alone is torch.compile's default mode; --compile "
                        "reduce-overhead also replays the compiled forward and backward as CUDA graphs, one launch "
                        "for hundreds of kernels (GPUs only; on a CPU it is the default mode)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="arithmetic of the forward pass (the loss is float32 whatever this says). auto: bf16 "
                        "autocast on GPUs that have it natively, fp16 with gradient scaling on older GPUs; on CPUs "
                        "with AVX-512 BF16 or AMX, bf16 for ResNets whose convolutions oneDNN computes right on "
                        "these crops (SPEED.md), else float32; fp16 runs on GPUs only. --resume keeps the run's")
    return p


def main(argv=None):
    try:
        args, checkpoint = run_settings(argv)  # parsed, checked, crop sizes resolved; --resume: the saved ones
        rank, world_size, device = distributed_setup(args)
        # The first Ctrl-C stops after the step and saves (RunControl); a second one stops at once
        with ctrl_c_in_one_line(f"stopped at once by a second Ctrl-C; {os.path.join(args.out, 'ckpt.pt')} holds "
                                f"the last epoch saved (continue with --resume)"):
            with RunControl(args, rank, world_size, device, LOGGED[args.method]) as control:
                train(args, checkpoint, control)
    except NothingToTrain as done:             # --resume with no more --epochs than trained
        print(done)
    except DatasetError as error:              # a dataset missing, or an image unreadable outside the steps
        raise SystemExit(f"error: {error_message(error)}")
    except CheckpointError as error:           # a file that cannot be written (a full disk), features not finite
        raise SystemExit(f"error: {error}")
    except RuntimeError as error:              # under torchrun: a collective that another process left
        if not (dist.is_initialized() and peer_is_gone(error)):
            raise
        who = f"rank {1 - rank}" if world_size == 2 else "another process (torchrun's report names it)"
        if rank == 0:        # said at once: torchrun's SIGTERM to the survivors may end the teardown below
            print(f"error: {who} of the {world_size} training processes stopped (killed?), so rank {rank} cannot go "
                  f"on; {os.path.join(args.out, 'ckpt.pt')} holds the last epoch saved: continue with --resume",
                  file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def peer_is_gone(error):
    """Whether a collective failed because another process is gone: gloo reports a closed connection,
    NCCL a DistBackendError."""
    return isinstance(error, dist.DistBackendError) or any(
        words in str(error) for words in ("Connection reset by peer", "Connection closed by peer"))


def run_settings(argv):
    """The run's settings: parsed, merged with the checkpoint's on --resume, checked, and the crop sizes
    resolved from the data's resolution, all before any image is decoded or weight built, so that a
    mistake costs a second, not a dataset's decoding, and the settings never change once training starts.
    Returns (args, checkpoint or None)."""
    args = build_parser().parse_args(argv)
    if args.out is None:
        objective_name = f"kappa{args.kappa:g}" if args.method == "hydes" else "supervised"
        args.out = os.path.join("runs", f"{args.dataset}-{args.arch}-{objective_name}")
    refuse_a_second_run(args.out)
    args, checkpoint = resume_settings(args, argv, build_parser)      # --resume: the checkpoint's settings
    problem = check_training_args(args)
    if problem is None and (args.global_size is None or args.local_size is None):
        native = native_image_size(args.dataset, args.data_dir)       # the crops follow the data's resolution
        default_global, default_local = default_crop_sizes(native)
        args.global_size = default_global if args.global_size is None else args.global_size
        args.local_size = default_local if args.local_size is None else args.local_size
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
    batches, order, classes = training_data(args, recipes, control)   # the crops size mixed images' canvas
    steps_per_epoch = order.batches_per_epoch

    # ---- model and optimiser: `net` is the plain module (saved, evaluated), `model` what the step calls
    # The initial weights are the run's only draw from a global random stream (the views, the data order and the
    # probe's batches have generators of their own): seeded here, not earlier, for DataLoaders draw from it
    torch.manual_seed(args.seed)
    net = build_model(args, len(classes), control, precision.memory_format)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=True)      # one kernel for all the parameters, on GPUs and CPUs
    # The online linear probe of the evaluation code the paper cites: one layer on the frozen features,
    # trained 2 epochs at each evaluation and kept from one to the next (evaluate.PaperLinearProbe); the
    # checkpoint keeps it.
    probe = PaperLinearProbe(net.backbone.num_features, len(classes), device, args.seed)
    state = (net, optimizer, precision.scaler, probe)                # what a checkpoint saves and restores
    monitor = Monitor(args, device)
    step = restore(checkpoint, *state, steps_per_epoch) if checkpoint else 0
    model = net if control.world_size == 1 else torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)   # each process: its share of the batch
    step_loss = functools.partial(loss_of_batch, model, recipes, precision, args.method, args.kappa, args.alpha,
                                  args.beta)
    if args.compile:
        # One graph of views, network and loss (the backward is compiled with it); kappa, alpha and beta are
        # constants of the graph.
        step_loss = torch.compile(step_loss, mode=args.compile, dynamic=False)
    if control.main_process:
        control.claim_run_folder()                 # a second train.py on OUT is refused from here on
        open_run_folder(args, checkpoint, step)
        source = "in memory" if isinstance(batches, InMemoryBatches) else f"{args.workers} loading workers"
        print(f"{args.dataset}: {order.num_images} images ({source}), {steps_per_epoch} steps/epoch, "
              f"views {' + '.join(f'{n}x{size}' for size, n in Counter(r.size for r in recipes).items())}; {args.arch} "
              f"{sum(p.numel() for p in net.backbone.parameters()) / 1e6:.2f}M params; device {device}, "
              f"{args.arithmetic}"
              + (f" x {control.world_size} processes" if control.world_size > 1 else ""))

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
        # images: uint8 (B, 3, H, W) on the device; sizes: each image's (height, width) on the CPU, its
        # part of the canvas when the images differ in size (loading.py)
        for images, sizes, labels in control.batches(batches, step, sums, step - first_step, description):
            # Every random choice of the step's views, drawn on the CPU from a generator seeded by (seed, step,
            # rank), so a resumed run draws the views an uninterrupted one would; on the device in one copy.
            parameters = draw_views(recipes, sizes, augmentation_generator(args.seed, step, control.rank))
            parameters = parameters.pin_memory() if device.type == "cuda" else parameters
            parameters = parameters.to(device, non_blocking=True)
            terms = training_step(step_loss, images, parameters, labels, optimizer, precision.scaler, logged)
            sums += terms
            control.watch(terms)       # a non-finite loss is recorded on the device, read at the next log step
            step += 1
        control.check_finite()         # before anything is saved: a non-finite loss never reaches a checkpoint

        # ---- the end of an epoch, or of a run stopped early (the epoch is then fractional): save, then
        # evaluate (a fault or a signal during the evaluation must not cost the epoch), then log
        record = {"epoch": round(step / steps_per_epoch, 4), "step": step, **control.means(sums, step - first_step),
                  # of the steps this session took in the epoch: a session's first epoch holds its set-up (cuDNN's
                  # autotuning, --compile's compilation)
                  "images_per_s": (step - resumed_at) * args.batch_size / (time.time() - epoch_start),
                  "minutes": control.minutes()}
        last = step == args.epochs * steps_per_epoch or control.out_of_time
        due = evaluation_due(step, steps_per_epoch, args, last)
        end_of_epoch(record, due, state, monitor, steps_per_epoch, args, control)
        if control.stop_after_save(step):
            break

    if args.epochs == 0 and checkpoint is None:     # the untrained baseline: the same network, saved and evaluated
        end_of_epoch({"epoch": 0, "step": 0}, bool(args.eval_every), state, monitor, steps_per_epoch, args, control)


# ----------------------------------------------------------------------------------------------------
# The step

def training_step(step_loss, images, parameters, labels, optimizer, scaler, logged):
    """One AdamW step on a batch: step_loss (loss_of_batch with the run's model, recipes, precision and
    loss; compiled with --compile) on the uint8 images and the view parameters drawn for them, then the
    backward pass and AdamW. Returns the `logged` terms,
    detached, stacked (len(logged),)."""
    # The last step's gradients are dropped before this step's forward pass, and CUDA graphs (--compile
    # reduce-overhead) are told that a new step begins: their outputs, these gradients among them, live in
    # memory that the next replay overwrites. Dropped, not zeroed in place: a .grad left in that memory
    # would be overwritten under AdamW's feet. Without CUDA graphs the second call does nothing.
    optimizer.zero_grad(set_to_none=True)
    torch.compiler.cudagraph_mark_step_begin()
    out = step_loss(images, parameters, labels)
    scaler.scale(out["loss"]).backward()          # scaled only for fp16; otherwise the loss itself
    scaler.step(optimizer)                        # AdamW (fp16: skipped if the scaled gradients overflowed)
    scaler.update()
    # Kept on the device, stacked (len(logged),): the caller sums them without waiting for the GPU.
    return torch.stack([out[k].detach() for k in logged])


def loss_of_batch(model, recipes, precision, method, kappa, alpha, beta, images, parameters, labels):
    """The forward half of a step: uint8 images (B, 3, H, W) -> V views (data.make_views, from the random
    choices drawn for them, data.draw_views) -> z (V, B, D) on the sphere -> the loss (Eq. 4) and the other
    LOGGED terms, as objective's dict. No value is read back to the host, so torch.compile can make one
    graph of it and CUDA graphs can replay it."""
    views = make_views(images, recipes, parameters)          # V views (B, 3, s, s), globals first
    # The input in the network's layout (NHWC for ResNets on GPUs), else every convolution converts it.
    views = [view.contiguous(memory_format=precision.memory_format) for view in views]
    with precision.autocast:                                 # bf16 matmuls on GPUs; the loss runs in float32
        z = model(views)                                     # (V, B, D) on the sphere (supervised: (V, B, C) logits)
    return objective(z, labels, method, kappa, alpha, beta)


def objective(z, labels, method, kappa, alpha, beta):
    """The loss of `method` on the model's output, as a dict holding "loss" and the other LOGGED terms."""
    if method == "hydes":
        return hydes_loss(z, kappa, alpha, beta)                             # Eq. (4) on z (V, B, D)
    logits = z.flatten(0, 1)                                                 # (V, B, C) logits -> (V*B, C)
    targets = labels.repeat(z.shape[0])                                      # (B,) -> (V*B,), row v*B + b
    return {"loss": torch.nn.functional.cross_entropy(logits, targets),
            "accuracy": (logits.argmax(dim=1) == targets).float().mean()}


def augmentation_generator(seed, step, rank):
    """The generator of step `step`'s augmentation on process `rank`: a function of the three, so that a
    resumed run draws the views an uninterrupted one would, and processes draw different ones. The three
    are mixed into one 64-bit seed by numpy's SeedSequence (nearby seeds give unrelated streams)."""
    mixed = np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


def view_recipes(args):
    """The views of each image: DINO's multi-crop (data.dino_recipes) for HyDeS, one RandomResizedCrop and
    flip for the supervised baseline, as the evaluation code the paper cites trains it."""
    if args.method == "supervised":
        return supervised_recipes(args.global_size)
    return dino_recipes(args.global_size, args.local_size, args.global_crops, args.local_crops,
                        args.global_scale, args.local_scale, args.blur)


# ----------------------------------------------------------------------------------------------------
# What train() calls: the model, the evaluation, the checkpoint

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
        try:
            append_jsonl(os.path.join(args.out, "log.jsonl"), line)
        except OSError as error:       # the checkpoint holds the epoch and its line; a resumed run writes it
            raise CheckpointError(f"cannot append to {os.path.join(args.out, 'log.jsonl')} ({error.strerror or error});"
                                  f" {os.path.join(args.out, 'ckpt.pt')} holds this epoch and its log line: free disk "
                                  f"space, then continue with --resume") from None


# What to do when the monitor meets features that are not finite: the run diverged
MONITOR_REMEDY = ("the run diverged: lower --lr and start anew, or continue with --resume --eval-every 0 to "
                  "train without the monitor")


class Monitor:
    """The online evaluation: k-NN top-1 and top-5 (evaluate.knn_accuracy) and a round of the online
    linear probe (evaluate.PaperLinearProbe, kept from one evaluation to the next), top-1 and top-5 on
    test, from one forward pass of the frozen backbone over the labelled train split and the test split
    (eval_transform, no augmentation), which the loading workers decode at each evaluation."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.splits = None             # the labelled train and test splits, listed at the first evaluation

    def evaluate(self, net, probe, step, control):
        """The monitor's figures as a dict. Process 0 evaluates while the others wait for it."""
        args, device, result = self.args, self.device, {}
        try:
            if control.main_process:
                if self.splits is None:
                    self.splits = labelled_splits(args.dataset, args.data_dir, args.global_size, args.workers,
                                                  args.skip_bad_images)
                # (extract_features refuses features that are not finite: the network diverged, its loss may
                # not show it yet; the epoch is saved, marked for this evaluation)
                train_feats, train_labels, test_feats, test_labels = (
                    t.to(device) for split, name in zip(self.splits, ("train", "test"))
                    for t in extract_features(net.backbone, split, device, workers=args.workers,
                                              desc=f"monitor: {name} features",
                                              checkpoint=f"the network at step {step}", remedy=MONITOR_REMEDY))
                result["knn_top1"], result["knn_top5"] = knn_accuracy(
                    train_feats, train_labels, test_feats, test_labels, args.knn_k, args.knn_temperature)
                # The probe's batches are drawn from (seed, step): a resumed run draws the same ones.
                seed = np.random.SeedSequence([args.seed, step]).generate_state(1)[0]
                probe.train_round(train_feats, train_labels, torch.Generator().manual_seed(int(seed)))
                result["linear_top1"], result["linear_top5"] = probe.score(test_feats, test_labels)
        finally:
            control.barrier()    # reached by every process, also when process 0's evaluation was cut short
        return result


def save(net, optimizer, scaler, probe, record, steps_per_epoch, args):
    """Rewrite OUT/ckpt.pt, and with --keep-every keep a copy of it as OUT/ckpt-epochE.pt."""
    path, step = os.path.join(args.out, "ckpt.pt"), record["step"]
    state = checkpoint_state(net, optimizer, scaler, probe, record, steps_per_epoch, args)
    save_checkpoint(path, state)
    if args.keep_every and step % (args.keep_every * steps_per_epoch) == 0:      # written as safely as ckpt.pt
        save_checkpoint(os.path.join(args.out, f"ckpt-epoch{step // steps_per_epoch}.pt"), state,
                        f"{path} holds this epoch: free disk space, then continue with --resume")


if __name__ == "__main__":
    main()
