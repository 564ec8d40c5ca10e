"""Train a backbone with HyDeS (arXiv 2604.24498, Sections III-IV).

    python train.py --dataset stl10 --arch vit_tiny --kappa 1        # the paper's ViT-T16 on STL-10
    python train.py --dataset cifar10 --arch resnet18                # the paper's CIFAR-10 ResNet-18

The defaults are the paper's: AdamW, learning rate 1e-3, batch 128, 200 epochs, kappa = 1,
alpha = beta = 1, DINO multi-crop with 2 global and 6 local views. The run's folder (--out) receives
args.json (every resolved setting), log.jsonl (one line per epoch: loss, H_global, H_local, MI, lr,
images/s and, every --eval-every epochs, the online k-NN top-1 that Figures 6-8 plot) and ckpt.pt
(model, optimiser, grad scaler, epoch, step and the arguments), rewritten after every epoch.
"""

import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from data import (DATASETS, DatasetError, MultiCrop, dataset_split, default_crop_sizes, native_image_size,
                  pretrain_dataset)
from evaluate import CheckpointError, knn_evaluate, safe_load
from hydes import hydes_loss
from models import ARCHS, HyDeSModel, build_backbone

# Settings that --resume takes from the command line; every other one comes from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "max_minutes", "eval_every", "workers", "device", "resume")


def parse_args(argv=None):
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

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=ARCHS)
    g.add_argument("--width", type=int, help="ResNet base width (64) or ViT width (192); smaller for laptops")
    g.add_argument("--depth", type=int, help="ViT blocks (12)")
    g.add_argument("--heads", type=int, help="ViT attention heads (3)")
    g.add_argument("--proj-hidden", type=int, default=2048, help="hidden width of the projector MLP")
    g.add_argument("--proj-dim", type=int, default=256,
                   help="D, the sphere S^{D-1} the loss lives on (paper tried 128-4096: no clear difference)")

    g = p.add_argument_group("loss (Eqs. 1-4)")
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
                   help="stop after this many minutes of training, save, and run the final k-NN")

    g = p.add_argument_group("monitoring")
    g.add_argument("--eval-every", type=int, default=1,
                   help="online k-NN every N epochs and at the end (0: never); costs a pass over train+test")
    g.add_argument("--knn-k", type=int, default=200)
    g.add_argument("--knn-temperature", type=float, default=0.1)
    g.add_argument("--log-every", type=int, default=20, help="steps between progress-bar updates")

    g = p.add_argument_group("system")
    g.add_argument("--out", help="run folder (default runs/DATASET-ARCH-kappaK)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt with its saved settings")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.path.join("runs", f"{args.dataset}-{args.arch}-kappa{args.kappa:g}")
    return args


def learning_rate(args, step, steps_per_epoch):
    """Constant, or linear warm-up then cosine decay to zero over the whole run."""
    if args.schedule == "constant":
        return args.lr
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.epochs * steps_per_epoch - warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(path, model, optimizer, scaler, epoch, step, args):
    """One dict with everything to resume or evaluate the run; `epoch` counts completed epochs.

    Written to a temporary file beside the target, then renamed: a crash never leaves half a checkpoint.
    """
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": epoch, "step": step, "args": vars(args)}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    checkpoint_path = os.path.join(args.out, "ckpt.pt")
    checkpoint = None
    if args.resume:
        if not os.path.exists(checkpoint_path):
            raise SystemExit(f"error: --resume given but there is no {checkpoint_path}; drop --resume to start anew")
        try:
            checkpoint = safe_load(checkpoint_path)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}")
        command_line = {k: getattr(args, k) for k in RESUMABLE_OVERRIDES}
        args = argparse.Namespace(**{**checkpoint["args"], **command_line})
    elif os.path.exists(checkpoint_path):
        raise SystemExit(f"error: {checkpoint_path} exists; pass --resume to continue it or --out for a new run")

    # ---- device and precision: bf16 autocast on GPUs that have it, fp16 + grad scaling otherwise, fp32 on CPU
    device = torch.device(args.device)
    use_cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast("cuda", dtype=amp_dtype) if use_cuda else nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and amp_dtype == torch.float16)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # ---- data: multi-crop views of the pre-training images
    try:
        native = native_image_size(args.dataset, args.data_dir)
        default_global, default_local = default_crop_sizes(native)
        args.global_size = args.global_size or default_global
        args.local_size = args.local_size or default_local
        transform = MultiCrop(args.global_size, args.local_size, args.global_crops, args.local_crops,
                              tuple(args.global_scale), tuple(args.local_scale), args.blur)
        dataset = pretrain_dataset(args.dataset, args.data_dir, transform)
        if args.eval_every:          # the k-NN monitor's labelled splits must exist before hours of training
            dataset_split(args.dataset, args.data_dir, "test", None)
    except DatasetError as error:
        raise SystemExit(f"error: {error}")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=use_cuda, persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} images is less than one batch of {args.batch_size}; "
                         f"lower --batch-size")

    # ---- model and optimiser
    backbone = build_backbone(args.arch, args.global_size, args.width, args.depth, args.heads)
    model = HyDeSModel(backbone, args.proj_hidden, args.proj_dim).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start_epoch, step = 0, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        print(f"resuming {checkpoint_path} after epoch {start_epoch} (step {step})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    print(f"{args.dataset}: {len(dataset)} images, {steps_per_epoch} steps/epoch, views {args.global_crops}x"
          f"{args.global_size} + {args.local_crops}x{args.local_size}; {args.arch} "
          f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M params; device {device}")

    def online_knn():
        return knn_evaluate(model.backbone, args.dataset, args.data_dir, args.global_size, device,
                            args.knn_k, args.knn_temperature, args.workers)

    # ---- training
    started = time.time()
    out_of_time = False
    for epoch in range(start_epoch, args.epochs):
        model.train()
        sums = torch.zeros(4, device=device)          # loss, h_global, h_local, mi, summed over steps
        epoch_start, epoch_steps = time.time(), 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True)
        for views, _ in bar:
            lr = learning_rate(args, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            views = [v.to(device, non_blocking=True) for v in views]          # V tensors (B, 3, H, W)
            with autocast:
                z = model(views)                                               # (V, B, D), float32
            out = hydes_loss(z, args.kappa, args.alpha, args.beta)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            sums += torch.stack([out[k].detach() for k in ("loss", "h_global", "h_local", "mi")])
            step += 1
            epoch_steps += 1
            if epoch_steps % args.log_every == 0:            # the only host-device synchronisation
                loss, h_global, h_local, _ = (sums / epoch_steps).tolist()
                if not math.isfinite(out["loss"].item()):
                    raise SystemExit(f"error: loss is {out['loss'].item()} at step {step} (H_global "
                                     f"{out['h_global'].item()}, H_local {out['h_local'].item()}); lower --lr "
                                     f"or --kappa. The last good checkpoint is {checkpoint_path}")
                images_per_s = epoch_steps * args.batch_size / (time.time() - epoch_start)
                bar.set_postfix(loss=f"{loss:.3f}", H_global=f"{h_global:.3f}", H_local=f"{h_local:.3f}",
                                img_s=f"{images_per_s:.0f}")
            if args.max_minutes and time.time() - started > 60 * args.max_minutes:
                out_of_time = True
                break
        bar.close()

        # ---- end of epoch (or of the time budget): log, evaluate, checkpoint
        loss, h_global, h_local, mi = (sums / max(1, epoch_steps)).tolist()
        if not math.isfinite(loss):
            raise SystemExit(f"error: the mean loss of epoch {epoch + 1} is {loss} (H_global {h_global}, "
                             f"H_local {h_local}); lower --lr or --kappa. Last good checkpoint: {checkpoint_path}")
        record = {"epoch": epoch + (0 if out_of_time else 1), "step": step, "loss": loss,
                  "h_global": h_global, "h_local": h_local, "mi": mi, "lr": lr,
                  "images_per_s": epoch_steps * args.batch_size / (time.time() - epoch_start),
                  "minutes": (time.time() - started) / 60}
        last = out_of_time or epoch + 1 == args.epochs
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or last):
            record["knn_top1"], record["knn_top5"] = online_knn()
        print(json.dumps(record))
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        save_checkpoint(checkpoint_path, model, optimizer, scaler, epoch + (0 if out_of_time else 1), step, args)
        if out_of_time:
            print(f"stopped after {args.max_minutes} minutes at step {step}; checkpoint {checkpoint_path}")
            break

    if args.epochs == 0:    # the random-initialisation baseline: the same network, evaluated untrained
        save_checkpoint(checkpoint_path, model, optimizer, scaler, 0, 0, args)
        if args.eval_every:
            top1, top5 = online_knn()
            print(json.dumps({"epoch": 0, "knn_top1": top1, "knn_top5": top5}))


if __name__ == "__main__":
    main()
