"""Bad input, refused in one line: the checks of train.py's settings and the helpers every script's
checks share (the rule list, writable output folders, the help format, an error's one-line message).

Machinery: a reader of the method may skip this file. Every script checks all its arguments before any
work, so that a mistake costs a second and reads as one line naming the problem and the fix
(ERRORS.md lists them).
"""

import argparse
import contextlib
import math
import os
import sys

import torch

from models import vit_patch_size
from precision import cpu_bf16_convolutions_are_right


def error_message(error):
    """The one-line message of an error, also when a DataLoader worker raised it.

    A worker's exception is re-raised in the main process with the worker's traceback prepended to its
    message; the original message is the text after the last "ErrorName: " of that traceback.
    """
    last_line = str(error).strip().splitlines()[-1]
    return last_line.split("Error: ", 1)[1] if "Traceback" in str(error) and "Error: " in last_line else last_line


@contextlib.contextmanager
def ctrl_c_in_one_line(kept):
    """Ctrl-C inside the block ends the script with one line that says what is kept (`kept`), not a
    traceback, and the exit status 130 a shell gives a SIGINT."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C): {kept}", file=sys.stderr)
        raise SystemExit(130) from None


def first_problem(rules):
    """The message of the first rule (ok, message) that fails, or None: every script checks all its
    arguments this way before any work, so that a mistake costs a second and reads as one line."""
    return next((message for ok, message in rules if not ok), None)


def refuse(problem):
    """Stop the script with `problem` as its one-line error message; no problem (None), no stop."""
    if problem:
        raise SystemExit(f"error: {problem}")


def unwritable(folder, option):
    """Why `folder` could not take a script's outputs (a path through a file, a read-only file system, no
    permission), as a one-line message naming `option`; None if it could. Nothing is created: the nearest
    folder that exists is asked."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot write in {folder} ({existing} is a file); pass {option} with a writable folder"
    if not os.access(existing, os.W_OK):
        return f"cannot write in {folder} (read-only or no permission); pass {option} with a writable folder"
    return None


def unwritable_file(path, option):
    """Why a file a script will append to could not be written (its folder's problems, or a folder where
    the file should be), as a one-line message naming `option`; None if it could, or if path is None."""
    if path is None:
        return None
    if os.path.isdir(path):
        return f"{path} is a folder; pass {option} with a file name"
    return unwritable(os.path.dirname(os.path.abspath(path)), option)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every script's --help: the module docstring as written, and each flag's default after its help
    (unless the help already says it, or there is none to show)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in help:
            help += " (default: %(default)s)"
        return help


# PyTorch 2.14's oneDNN CPU convolution (seen on an AVX2 CPU) hangs or corrupts memory in the backward
# pass of a 1x1 stride-2 convolution with 2 to 5 input channels in channels_last, the layout ResNets run
# in: a ResNet's first downsampling shortcut has --width input channels.
NARROW_RESNET_ON_A_CPU = ("a ResNet of --width {width} trains through a 1x1 stride-2 convolution of {width} channels, "
                          "which hangs or corrupts memory in PyTorch's CPU convolutions; use --width 6 or more")


def narrow_resnet_on_a_cpu(arch, width, device):
    return arch.startswith("resnet") and width is not None and 2 <= width <= 5 and not str(device).startswith("cuda")


# The largest kappa the vMF normaliser's series is exact for (hydes._log_bessel_series), and the smallest
# k-NN temperature whose vote weights exp(s / T) stay finite in float32 summed over 200 neighbours
# (exp(1 / 0.02) = 5e21). numpy's seeds are 32-bit.
LARGEST_KAPPA, SMALLEST_KNN_TEMPERATURE, LARGEST_SEED = 1000.0, 0.02, 2**32 - 1
# Beyond these a typo, not a setting: crops of more than 1024 px or a network thousands of times the
# paper's would run the machine out of memory rather than train.
LARGEST_CROP, LARGEST_VIEWS, LARGEST_DIM = 1024, 64, 65536


def not_finite(args, names):
    """The first flag of `names` (attribute names of args) set to nan or an infinity, as '--flag', or
    None; a flag may hold a number, a list of them, or None (not given)."""
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v is not None and not math.isfinite(v) for v in values):
            return "--" + name.replace("_", "-")
    return None


def numbers_are_finite(args, names):
    """A rule for first_problem: every float flag of `names` is a finite number."""
    flag = not_finite(args, names)
    value = getattr(args, flag[2:].replace("-", "_")) if flag else None
    return flag is None, f"{flag} must be a finite number (got {value})"


def seed_rule(seed):
    """A rule for first_problem: --seed within numpy's 32-bit seeds."""
    return 0 <= seed <= LARGEST_SEED, f"--seed must lie in 0 ... {LARGEST_SEED} (got {seed})"


def knn_temperature_rule(temperature):
    """A rule for first_problem: a k-NN temperature whose float32 votes exp(s / T) stay finite."""
    return (temperature >= SMALLEST_KNN_TEMPERATURE,
            f"--knn-temperature must be at least {SMALLEST_KNN_TEMPERATURE} (got {temperature:g}): the votes "
            f"exp(s / T) overflow in float32 below it; the k-NN protocol uses 0.1")


def check_training_args(args):
    """Every setting that can be checked without data. Returns the first problem as a one-line message,
    or None."""
    (global_min, global_max), (local_min, local_max) = args.global_scale, args.local_scale
    rules = [
        numbers_are_finite(args, ("kappa", "kappa_final", "alpha", "beta", "beta_final", "lr", "weight_decay",
                                  "warmup_epochs", "max_minutes", "knn_temperature", "global_scale", "local_scale")),
        (args.kappa > 0, f"--kappa must be > 0 (got {args.kappa:g}); the paper uses 1 and tries 0.1 to 20"),
        (args.kappa_final is None or args.kappa_final > 0, f"--kappa-final must be > 0 (got {args.kappa_final})"),
        (max(args.kappa, args.kappa_final or 0) <= LARGEST_KAPPA,
         f"--kappa and --kappa-final must be at most {LARGEST_KAPPA:g} (got {max(args.kappa, args.kappa_final or 0):g}): "
         f"the vMF normaliser is computed exactly up to there; the paper tries 0.1 to 20"),
        seed_rule(args.seed),
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
        (args.global_crops + args.local_crops <= LARGEST_VIEWS,
         f"--global-crops and --local-crops make {args.global_crops + args.local_crops} views; at most {LARGEST_VIEWS}"),
        (all(s is None or s <= LARGEST_CROP for s in (args.global_size, args.local_size)),
         f"--global-size and --local-size must be at most {LARGEST_CROP} px (the paper's largest crop is 224)"),
        (args.proj_dim >= 2, f"--proj-dim must be >= 2 (got {args.proj_dim}): the sphere S^(D-1) needs D >= 2"),
        (max(args.proj_dim, args.proj_hidden, args.width or 1) <= LARGEST_DIM,
         f"--proj-dim, --proj-hidden and --width must be at most {LARGEST_DIM} (the paper tries D = 128 to 4096)"),
        (args.proj_hidden >= 1, f"--proj-hidden must be >= 1 (got {args.proj_hidden})"),
        (all(v is None or v >= 1 for v in (args.width, args.depth, args.heads)),
         "--width, --depth and --heads must be >= 1"),
        (not narrow_resnet_on_a_cpu(args.arch, args.width, args.device),
         NARROW_RESNET_ON_A_CPU.format(width=args.width)),
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
        knn_temperature_rule(args.knn_temperature),
        (args.log_every >= 1 and args.workers >= 0 and args.keep_every >= 0,
         "--log-every must be >= 1, --workers and --keep-every >= 0"),
        (not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device} but PyTorch sees no CUDA GPU here; pass --device cpu"),
        (not args.step_graph or args.kappa_final is None,
         "--step-graph holds kappa fixed (log C_D(kappa) is summed on the host); drop --kappa-final or --step-graph"),
        (not args.step_graph or args.precision != "fp16",
         "--step-graph runs without fp16's gradient scaling; use --precision bf16 or fp32 with it"),
        (not args.step_graph or args.compile != "reduce-overhead",
         "--step-graph captures its own CUDA graph of the whole step; pass --compile (the default mode) with it, not "
         "--compile reduce-overhead"),
        (not args.step_graph or int(os.environ.get("WORLD_SIZE", 1)) == 1,
         "--step-graph runs on one process; drop it under torchrun"),
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
        # convolution whose stride exceeds its input's side is wrong in PyTorch 2.14 (SPEED.md)
        return (f"--precision bf16 on a CPU computes wrong gradients for {args.arch}'s {args.stem} stem on "
                f"{smallest} px crops (a strided convolution meets a 1-pixel input); use --precision fp32, "
                f"or --stem cifar")
    if args.arch.startswith("vit"):
        patch = vit_patch_size(args.global_size)
        if args.global_size % patch or args.local_size % patch:
            return (f"{args.arch} cuts {args.global_size} px images into {patch} px patches, so --global-size and "
                    f"--local-size must be multiples of {patch} (got {args.global_size} and {args.local_size})")
    return None
