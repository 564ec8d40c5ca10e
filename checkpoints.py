"""Checkpoint files: written so that a kill never leaves a broken one, read so that a file never runs
code, and loaded from other libraries' layouts (torchvision, timm, Lightly, solo-learn, DINO) or exported
to torchvision's and timm's.

Machinery: a reader of the method may skip this file. evaluate.py, segment.py and analyze.py probe a
frozen backbone through `load_for_probing` / `load_backbone`, whatever library trained it; train.py saves
through `save_checkpoint`.
"""

import argparse
import math
import os
import pickle

import torch

from data import DATASETS, native_image_size
from models import ARCHS, VisionTransformer, build_backbone
from records import write_atomically


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


def save_checkpoint(path, state):
    """Write `state` so that `path` always holds a complete checkpoint, whenever the process dies: the
    bytes go to a temporary file beside it, fsynced, then renamed over it (records.write_atomically). A
    kill mid-write leaves a stray PATH.*.tmp, never read, and the previous checkpoint untouched; a write
    that fails (a full disk) removes its temporary file and says why."""
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except OSError as error:
        raise CheckpointError(f"cannot write {path} ({error.strerror or error}); the previous checkpoint, if any, "
                              f"is intact: free disk space or fix the folder, then continue with --resume") from None


# DINO saves its settings as an argparse.Namespace: plain data, rebuilt without running code, so it is
# allowed beside tensors, numbers, strings and containers (torch 2.4 and newer).
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([argparse.Namespace])


def safe_load(path):
    """torch.load with weights_only=True: tensors, numbers, strings and containers, never code. A file
    that holds anything else (a pickle that would import or call something) is refused, not executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"no checkpoint file at {str(path)!r}; pass the ckpt.pt that train.py wrote") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, so it is refused "
                              f"unread (loading it could run code); re-save its state_dict alone") from None
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(f"{path} is not a readable PyTorch file ({str(error).splitlines()[0]})") from None


METHOD_NAMES = {"hydes": "HyDeS", "infonce": "InfoNCE", "supervised": "Supervised"}


def load_backbone(path, arch=None, image_size=None, device="cpu", checkpoint_key=None):
    """A frozen backbone (eval mode, no gradients) on `device`, from a train.py checkpoint, or from another
    library's checkpoint or state_dict with `arch` (see `foreign_backbone_state`).

    Returns (backbone, info): info holds arch, image_size, method (the objective a train.py checkpoint
    was trained with, else the file's name: resnet50_byol.pth -> resnet50_byol), the training arguments
    and the number of completed epochs (None for a foreign checkpoint).
    """
    checkpoint = safe_load(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict; save the "
                              f"backbone's model.state_dict() instead")
    if "args" in checkpoint and "model" in checkpoint and isinstance(checkpoint["args"], dict):
        args = checkpoint["args"]
        if arch is not None and arch != args["arch"]:
            raise CheckpointError(f"{path} holds a {args['arch']} but --arch {arch} was given; drop --arch, "
                                  f"which is only for other libraries' checkpoints")
        backbone = build_backbone(args["arch"], args["global_size"], args["width"], args["depth"], args["heads"],
                                  args.get("stem"))
        prefix = "backbone."
        backbone.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["model"].items() if k.startswith(prefix)})
        info = {"arch": args["arch"], "image_size": args["global_size"],
                "method": METHOD_NAMES[args.get("method", "hydes")],
                "train_args": args, "epoch": checkpoint["epoch"]}
    else:
        if arch is None:
            raise CheckpointError(f"{path} is not a train.py checkpoint; to load another library's checkpoint or "
                                  f"state_dict, name its architecture with --arch ({', '.join(ARCHS)})")
        backbone = build_backbone(arch, image_size)
        state, taken = foreign_backbone_state(checkpoint, backbone, checkpoint_key, path)
        if "pos_embed" in state and state["pos_embed"].shape != backbone.pos_embed.shape:
            # A ViT trained at another size (DINO's and timm's at 224 px) keeps its own grid of positions,
            # resized at each forward pass to the probe's (VisionTransformer.positional_embedding).
            patch, tokens = state["patch_embed.weight"].shape[-1], state["pos_embed"].shape[1]
            backbone = build_backbone(arch, math.isqrt(tokens - 1) * patch)
        try:
            backbone.load_state_dict(state)                                      # strict: a mismatch is an error
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
            raise CheckpointError(f"{path} does not match a {arch} at {image_size} px: {first}") from None
        print(f"{path}: {taken}")
        if arch.startswith("resnet") and state["conv1.weight"].shape[-1] == 3:
            print("note: a CIFAR-stem ResNet (3x3 conv1), which this project pads by 1. If it comes from "
                  "solo-learn, whose conv1 pads by 2, its weights load but its features differ from solo-learn's")
        info = {"arch": arch, "image_size": image_size, "method": os.path.splitext(os.path.basename(path))[0],
                "train_args": None, "epoch": None}
    # Frozen: the probes train heads on top, and saliency needs gradients of activations, never of weights.
    return backbone.to(device).eval().requires_grad_(False), info


# Where other libraries keep the backbone: bare (torchvision, timm, exported), under DataParallel's module.,
# Lightly's and solo-learn's backbone. (Lightning's state_dict), DINO's (module.)backbone., and others'
# encoder. or model.backbone. The prefix that fills most of the backbone's keys wins (the first, on a tie).
# Momentum copies (backbone_momentum., momentum_backbone.) are under none of them, so never taken.
BACKBONE_PREFIXES = ("", "backbone.", "module.", "module.backbone.", "encoder.", "module.encoder.", "model.backbone.")


# The containers checkpoints keep their weights in, tried in this order: Lightning and solo-learn's
# state_dict, torchvision's reference scripts' model, DINO's teacher (the network DINO evaluates).
CHECKPOINT_KEYS = ("state_dict", "model", "teacher")


def foreign_backbone_state(checkpoint, backbone, key=None, path="the checkpoint"):
    """The backbone's weights in another library's checkpoint -> (state_dict for `backbone`, a line that
    says what was taken and what left out). key: the container to read (DINO: teacher or student), by
    default the first of CHECKPOINT_KEYS present, else the checkpoint itself. ViT weights in timm's
    layout (timm, DINO) are renamed to this project's."""
    if key is not None and not isinstance(checkpoint.get(key), dict):
        raise CheckpointError(f"{path} has no {key!r}; its keys are {', '.join(map(str, checkpoint))}")
    key = key or next((k for k in CHECKPOINT_KEYS if isinstance(checkpoint.get(k), dict)), None)
    container = checkpoint[key] if key else checkpoint
    wanted = set(backbone.state_dict())
    best_prefix, best = None, {}
    for prefix in BACKBONE_PREFIXES:
        state = {k[len(prefix):]: v for k, v in container.items() if k.startswith(prefix)}
        if isinstance(backbone, VisionTransformer):
            state = from_timm(state)
        if len(wanted & set(state)) > len(wanted & set(best)):
            best_prefix, best = prefix, state
    state = {k: v for k, v in best.items() if k in wanted}
    left_out = sorted({k.split(".")[0] + "." for k in container if not k.startswith(best_prefix or "")} |
                      {best_prefix + k.split(".")[0] + "." for k in best if k not in wanted})
    where = f"under {best_prefix!r}" if best_prefix else "at the top level"
    return state, (f"took {len(state)} tensors {where} of {key!r}" if key else f"took {len(state)} tensors {where}") + (
        f"; left out {', '.join(left_out[:6])}{' ...' if len(left_out) > 6 else ''}" if left_out else "")


# Our ViT's names, and timm's (which DINO's ViT shares): the patch embedding is a bare convolution here,
# and the MLP an nn.Sequential. Every other key is the same, and so are the computations.
TIMM_NAMES = (("patch_embed.", "patch_embed.proj."), (".mlp.0.", ".mlp.fc1."), (".mlp.2.", ".mlp.fc2."))


def to_timm(state):
    """A VisionTransformer state_dict in timm's layout (loads strictly into timm's vit_tiny_patch16_224)."""
    return {_renamed(key, TIMM_NAMES): value for key, value in state.items()}


def from_timm(state):
    """timm's (or DINO's) ViT names -> this project's."""
    return {_renamed(key, [(theirs, ours) for ours, theirs in TIMM_NAMES]): value for key, value in state.items()}


def _renamed(key, pairs):
    for old, new in pairs:
        if old.startswith("."):                 # a part inside the key: blocks.3.mlp.0.weight
            key = key.replace(old, new)
        elif key.startswith(old):               # the key's first part: patch_embed.weight
            key = new + key[len(old):]
    return key


def export_backbone(checkpoint_path, out_path, arch=None, image_size=224, checkpoint_key=None):
    """Write the backbone of a checkpoint as a plain state_dict in the layout the field loads: torchvision's
    for ResNets, timm's for ViT-Tiny. Returns the lines of Python that load it (the README shows them).
    arch, image_size, checkpoint_key: for another library's checkpoint, as in load_backbone."""
    backbone, info = load_backbone(checkpoint_path, arch, image_size, checkpoint_key=checkpoint_key)
    state, size = backbone.state_dict(), info["image_size"]
    if isinstance(backbone, VisionTransformer):
        state = to_timm(state)
        shape = ""                  # a narrower or shallower ViT than ViT-Tiny says so to timm
        dim, depth, heads = backbone.num_features, len(backbone.blocks), backbone.blocks[0].attn.heads
        if (dim, depth, heads) != (192, 12, 3):
            shape = f", embed_dim={dim}, depth={depth}, num_heads={heads}"
        how = (f'import timm, torch\nmodel = timm.create_model("vit_tiny_patch16_224", img_size={size}, '
               f'patch_size={backbone.patch_size}{shape}, num_classes=0)\n'
               f'model.load_state_dict(torch.load("{out_path}"))')
    else:
        width = backbone.conv1.out_channels
        stem = ("" if backbone.conv1.kernel_size[0] == 7 else
                "model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = torch.nn.Identity()\n")
        how = (f'import torch, torchvision\nmodel = torchvision.models.{info["arch"]}(); model.fc = torch.nn.Identity()\n'
               f'{stem}model.load_state_dict(torch.load("{out_path}"))')
        if width != 64:
            how = (f"# a width-{width} ResNet: torchvision's ResNets have width 64; load it with this project's\n"
                   f'import models, torch\nmodel = models.build_backbone("{info["arch"]}", {size}, width={width})\n'
                   f'model.load_state_dict(torch.load("{out_path}"))')
    write_atomically(out_path, lambda f: torch.save(state, f))
    return how


def add_checkpoint_arguments(p):
    """The arguments that name a backbone and the data to probe it on (evaluate.py, analyze.py)."""
    p.add_argument("checkpoint", help="a ckpt.pt from train.py, or another library's checkpoint (with --arch)")
    p.add_argument("--arch", choices=ARCHS,
                   help="architecture of another library's checkpoint or state_dict (torchvision, timm, Lightly, "
                        "solo-learn, DINO): its backbone is found under the usual prefixes, its heads left out")
    p.add_argument("--checkpoint-key", help="which network of another library's checkpoint to load, e.g. teacher or "
                                            "student for DINO (default: state_dict, model or teacher, if present)")
    p.add_argument("--dataset", choices=DATASETS,
                   help="probe another dataset than the one trained on (e.g. imagenet100 for an ImageNet backbone)")
    p.add_argument("--data-dir", help="dataset root (default: the one saved in the checkpoint, else data/)")
    p.add_argument("--image-size", type=int,
                   help="evaluation resolution (default: the training crop size, else the dataset's: 32, 96, 224)")
    p.add_argument("--method", help="name for the table's method column (default: HyDeS, InfoNCE or Supervised "
                                     "for our checkpoints, the file name for a torchvision-format state_dict)")
    p.add_argument("--cache-dir", help="feature cache (default: features/ beside the checkpoint)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")


def parse_checkpoint_arguments(parser, argv):
    """parser.parse_args, then the defaults that follow the checkpoint's folder (the feature cache)."""
    args = parser.parse_args(argv)
    args.cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "features")
    return args


def checkpoint_argument_rules(args):
    """The checks of add_checkpoint_arguments' numbers, as (ok, message) rules for checks.first_problem."""
    return [(args.image_size is None or 8 <= args.image_size <= 1024,
             f"--image-size must lie in 8 ... 1024 px (got {args.image_size})"),
            (args.workers >= 0, f"--workers must be >= 0 (got {args.workers})")]


def load_for_probing(args, device):
    """The frozen backbone and what to probe it on: (backbone, info, dataset, data_dir, image_size), from
    the arguments of `add_checkpoint_arguments`; what is not given comes from the checkpoint's training
    arguments. info["method"] is --method when given."""
    foreign_size = args.image_size       # only used for a torchvision-format state_dict
    if foreign_size is None and args.arch is not None and args.dataset is not None:
        foreign_size = native_image_size(args.dataset, args.data_dir or "data")
    backbone, info = load_backbone(args.checkpoint, args.arch, foreign_size or 224, device, args.checkpoint_key)
    trained = info["train_args"] or {}
    dataset = args.dataset or trained.get("dataset")
    if dataset is None:
        raise CheckpointError("a torchvision-format state_dict carries no dataset; pass --dataset and --data-dir")
    info["method"] = args.method or info["method"]
    data_dir = args.data_dir or trained.get("data_dir", "data")
    return backbone, info, dataset, data_dir, args.image_size or info["image_size"]
