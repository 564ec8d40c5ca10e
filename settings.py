"""Settings: one-line refusals of bad settings and bad numbers, the help formatter, and the arithmetic
(precision) each device runs in.

Machinery: a reader of the method may skip this file; the method is the same in any precision. Every script
checks all its arguments before any work, so that a mistake costs a second and reads as one line naming the
problem and the fix (ERRORS.md lists them). train.py, the probes and benchmark.py take from here the forward
pass's autocast (auto_precision says which, on which device), the grad scaler, and the tensor layout
(channels_last for ResNets). The loss itself always runs in float32 (hydes.py says why).
"""

import argparse
import contextlib
import math
import os
import sys
from typing import NamedTuple

import torch
import torch.nn as nn

from models import ResNet, build_backbone, vit_patch_size

# ----------------------------------------------------------------------------------------------------
# Refusals in one line, shared by every script

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
    """The message of the first rule (ok, message) that fails, or None."""
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


def default_device():
    """Every script's default --device: the GPU if PyTorch sees one, else the CPU. (An Apple GPU is never
    the default: pass --device mps for it.)"""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_argument(text):
    """argparse type of every script's --device: a device this machine has, or a one-line error that says
    which ones it has. cpu, cuda, cuda:N (N below the number of GPUs PyTorch sees) and mps (an Apple GPU,
    where PyTorch was built with it: it runs in float32, see auto_precision)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; pass cpu, cuda, cuda:N or mps") from None
    gpus = torch.cuda.device_count()
    if device.type == "cuda" and gpus == 0:
        raise argparse.ArgumentTypeError(f"{text}, but PyTorch sees no CUDA GPU here; pass --device cpu")
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise argparse.ArgumentTypeError(f"{text}, but PyTorch sees {gpus} GPU(s), cuda:0 to cuda:{gpus - 1}; "
                                         f"pass one of those")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("mps (an Apple GPU), but this PyTorch has no MPS device here; "
                                         "pass --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: these scripts run on cpu, cuda or mps")
    return str(device)


def replaces_a_file(path, option, force, reading=None):
    """Why writing the file `path` whole (named by `option`, or kept in the folder it names) would destroy
    one the user owns, as a one-line message; None if it would not. A file that exists is replaced only
    with --force; the file the script reads (`reading`) and anything but a regular file (a device such as
    /dev/null, a pipe) never are."""
    if not os.path.exists(path):
        return None
    if not os.path.isfile(path):
        return f"{path} exists and is not a regular file (a device, folder or pipe); pass another {option}"
    if reading is not None and os.path.exists(reading) and os.path.samefile(path, reading):
        return f"{path} is the file this command reads; pass another {option}"
    if not force:
        return f"{path} exists; pass --force to replace it, or another {option}"
    return None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every script's --help: the module docstring as written, and each flag's default after its help
    (unless the help already says it, or there is none to show)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in help:
            help += " (default: %(default)s)"
        return help


# ----------------------------------------------------------------------------------------------------
# The limits of the numbers, and train.py's settings

# The largest kappa the vMF normaliser's series is exact for (hydes._log_bessel_series), and the smallest
# k-NN temperature whose vote weights exp(s / T) stay finite in float32 summed over 200 neighbours
# (exp(1 / 0.02) = 5e21). numpy's seeds are 32-bit.
LARGEST_KAPPA, SMALLEST_KNN_TEMPERATURE, LARGEST_SEED = 1000.0, 0.02, 2**32 - 1
# Beyond these a typo, not a setting: crops of more than 1024 px or a network thousands of times the
# paper's would run the machine out of memory rather than train.
LARGEST_CROP, LARGEST_VIEWS, LARGEST_DIM = 1024, 64, 65536


def numbers_are_finite(args, names):
    """A rule for first_problem: every float flag of `names` (attribute names of args) is a finite number;
    a flag may hold a number, a list of them, or None (not given)."""
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v is not None and not math.isfinite(v) for v in values):
            return False, f"--{name.replace('_', '-')} must be a finite number (got {value})"
    return True, None


def device_rule(device):
    """A rule for first_problem: a device this machine has (device_argument), also where a resumed run
    takes it from its checkpoint rather than from the command line."""
    try:
        device_argument(device)
    except argparse.ArgumentTypeError as error:
        return False, f"--device {error}"
    return True, None


def seed_rule(seed):
    """A rule for first_problem: --seed within numpy's 32-bit seeds."""
    return 0 <= seed <= LARGEST_SEED, f"--seed must lie in 0 ... {LARGEST_SEED} (got {seed})"


def knn_temperature_rule(temperature):
    """A rule for first_problem: a k-NN temperature whose float32 votes exp(s / T) stay finite."""
    return (temperature >= SMALLEST_KNN_TEMPERATURE,
            f"--knn-temperature must be at least {SMALLEST_KNN_TEMPERATURE} (got {temperature:g}): the votes "
            f"exp(s / T) overflow in float32 below it; the k-NN protocol uses 0.1")


def kappa_rule(args):
    """A rule for first_problem: --kappa large enough for the kernel to tell two points
    apart in float32 (our bound). Each entropy term logsumexp_j(kappa s_ij) - log M, with kappa s_ij in
    [-kappa, kappa], is computed from a logsumexp of about log N (N = V B embeddings), which float32 holds
    in steps of about 2^-23 log N; from one point to another it moves by at most 2 kappa. With 2 kappa
    under that step every row rounds alike and the loss is exactly 0; gradients of order kappa remain, and
    vanish under AdamW's eps. The supervised baseline has no kernel."""
    kappa = args.kappa
    num_embeddings = max((args.global_crops + args.local_crops) * args.batch_size, 2)   # below 2: refused apart
    bound = 2.0 ** -24 * math.log(num_embeddings)
    return (args.method == "supervised" or kappa > bound,
            f"--kappa {kappa:g} is too small: the kernel exp(kappa s) cannot tell two points apart in float32 "
            f"(each term, about log N = {math.log(num_embeddings):.1f} for N = {num_embeddings} embeddings, moves by "
            f"at most 2 kappa, under float32's step 2^-23 log N); raise --kappa above {bound:.1e} (the paper tries "
            f"0.1 to 20)")


def check_training_args(args):
    """Every setting that can be checked without data. Returns the first problem as a one-line message,
    or None."""
    (global_min, global_max), (local_min, local_max) = args.global_scale, args.local_scale
    rules = [
        device_rule(args.device),
        numbers_are_finite(args, ("kappa", "alpha", "beta", "lr", "weight_decay", "max_minutes", "knn_temperature",
                                  "global_scale", "local_scale")),
        (args.kappa > 0, f"--kappa must be > 0 (got {args.kappa:g}); the paper tries 0.1 to 20"),
        kappa_rule(args),
        (args.kappa <= LARGEST_KAPPA,
         f"--kappa must be at most {LARGEST_KAPPA:g} (got {args.kappa:g}): the vMF normaliser is computed exactly "
         f"up to there; the paper tries 0.1 to 20"),
        seed_rule(args.seed),
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
         f"--global-crops and --local-crops make {args.global_crops + args.local_crops} views; "
         f"at most {LARGEST_VIEWS}"),
        (all(s is None or s <= LARGEST_CROP for s in (args.global_size, args.local_size)),
         f"--global-size and --local-size must be at most {LARGEST_CROP} px (this project's largest default "
         f"crop is 224)"),
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
         f"a ViT of width {args.width or 192} cannot split into {args.heads or 3} heads; "
         f"pick a width divisible by them"),
        (args.epochs >= 0, f"--epochs must be >= 0 (got {args.epochs}; 0 evaluates the untrained network)"),
        (args.lr > 0 and args.weight_decay >= 0, "--lr must be > 0 and --weight-decay >= 0"),
        (args.max_minutes is None or args.max_minutes > 0, "--max-minutes must be > 0"),
        (args.eval_every >= 0 and args.knn_k >= 1 and args.knn_temperature > 0,
         "--eval-every must be >= 0, --knn-k >= 1 and --knn-temperature > 0"),
        knn_temperature_rule(args.knn_temperature),
        (args.log_every >= 1 and args.workers >= 0 and args.keep_every >= 0,
         "--log-every must be >= 1, --workers and --keep-every >= 0"),
        (args.precision != "bf16" or not args.device.startswith("mps") or torch.amp.is_autocast_available("mps"),
         "--precision bf16, but this PyTorch cannot autocast on mps; pass --precision fp32"),
        (args.precision != "fp16" or args.device.startswith("cuda"),
         "--precision fp16 is for GPUs without bf16 (on a CPU, bf16 gives its speed without gradient scaling); "
         "use fp32 or bf16"),
    ]
    return first_problem(rules)


def check_crop_sizes(args):
    """Crop sizes, once they are resolved from the data's resolution: a ViT needs whole patches."""
    smallest = min(args.global_size, args.local_size)
    if smallest < 8:
        return f"crops of {args.global_size} and {args.local_size} px are too small; use at least 8 px"
    if args.local_crops and args.local_size > args.global_size:
        return (f"--local-size {args.local_size} is larger than --global-size {args.global_size}: multi-crop's local "
                f"views are the small ones; swap them, or give --local-size at most --global-size")
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


# ----------------------------------------------------------------------------------------------------
# The arithmetic each device runs in, and two faults of oneDNN's CPU convolutions that settings must avoid

PRECISIONS = ("auto", "fp32", "bf16", "fp16")      # train.py's and benchmark.py's --precision


class Precision(NamedTuple):
    autocast: object            # context manager for the forward pass
    scaler: object              # torch.amp.GradScaler; a no-op unless fp16
    memory_format: object       # torch.channels_last or torch.contiguous_format


def precision_for(device, arch=None, precision="auto", stem=None, smallest_crop=None):
    """How a network runs on `device` at `precision` (PRECISIONS): the forward pass under bf16 or fp16
    autocast or in float32, and the layout of ResNets' tensors. What "auto" means is auto_precision's
    (the ResNet's stem and the smallest crop side matter on a CPU). fp16 is for GPUs only (train.py
    refuses it on a CPU).

    ResNets (`arch`) run with NHWC tensors (channels_last): cuDNN's tensor-core convolutions want that
    layout, and oneDNN's CPU convolutions are faster with it too (benchmark.py measures both)."""
    if precision == "auto":
        precision = auto_precision(device, arch, stem, smallest_crop)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu", enabled=dtype == torch.float16)
    channels_last = arch is not None and arch.startswith("resnet")
    return Precision(autocast, scaler, torch.channels_last if channels_last else torch.contiguous_format)


def auto_precision(device, arch=None, stem=None, smallest_crop=None):
    """What --precision auto means: "bf16", "fp16" or "fp32".

    On a GPU: bf16 where it is native (Ampere and later), fp16 with gradient scaling on older ones
    (fp16's 5-bit exponent underflows small gradients without it; their bf16 is emulated, and slow).
    On a CPU: bf16 for a ResNet on a CPU with native bf16 (cpu_has_native_bf16) whose convolutions are
    all computed right on these crops (cpu_bf16_convolutions_are_right), float32 otherwise: ViT-Tiny,
    where bf16 was slower than float32 on a CPU (SPEED.md), and the probes' features without a network
    (arch None)."""
    if device.type == "cuda":
        # including_emulation=False: pre-Ampere GPUs accept bf16 tensors but compute them slowly
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if (device.type == "cpu" and arch is not None and arch.startswith("resnet") and smallest_crop is not None
            and cpu_has_native_bf16() and cpu_bf16_convolutions_are_right(arch, stem, smallest_crop)):
        return "bf16"
    return "fp32"                   # also an Apple GPU (mps), unless asked: --precision bf16, where MPS autocasts


def features_precision(device, backbone):
    """The forward pass of extract_features(exact=False) and segment.py: bf16 autocast where training's
    --precision auto would train this kind of network in it (fp16 on GPUs without bf16), float32
    otherwise, and a ResNet's channels_last layout.

    On a CPU with native bf16 that is bf16 for ResNets (faster, the same k-NN accuracy to 0.1 point:
    REPRODUCE.md). The oneDNN fault that keeps some ResNets' training in float32
    (cpu_bf16_convolutions_are_right) is in the weight gradient, which a forward pass never computes."""
    resnet = "resnet" if isinstance(backbone, ResNet) else None      # precision_for's layout follows it
    if device.type == "cuda":
        return precision_for(device, resnet)
    cpu_bf16 = device.type == "cpu" and resnet and cpu_has_native_bf16()
    return precision_for(device, resnet, "bf16" if cpu_bf16 else "fp32")


def run_arithmetic(args, checkpoint):
    """What the run computes in: --precision, or for auto what auto_precision picks for this network,
    crops and device. A resumed run on the same kind of device keeps the arithmetic it started in, so that
    a change in what auto picks (a newer version of this file, say) never changes a run midway; on another
    kind of device auto is decided afresh."""
    if args.precision != "auto":
        return args.precision
    if checkpoint is not None and torch.device(checkpoint["args"]["device"]).type == torch.device(args.device).type:
        return checkpoint["args"]["arithmetic"]
    return auto_precision(torch.device(args.device), args.arch, args.stem, min(args.global_size, args.local_size))


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 dot products in hardware: AVX-512 BF16 (Cooper Lake, Zen 4 and later)
    or AMX-BF16 (Sapphire Rapids and later), as PyTorch's cpuinfo reads them. torch.backends.cpu.
    get_cpu_capability() does not tell: it names the widest vector instruction set PyTorch's own kernels use
    ("AVX512", "AVX2"), and Skylake's AVX-512 has no bf16, which oneDNN then emulates through float32 with
    conversions (so it saves little there, if anything; not measured)."""
    capabilities = torch.cpu.get_capabilities()
    return capabilities.get("avx512_bf16", False) or capabilities.get("amx_bf16", False)


def cpu_bf16_convolutions_are_right(arch, stem, smallest_crop):
    """Whether every strided convolution of the ResNet `arch` (with `stem`) meets an input at least as
    wide as its stride, on crops of smallest_crop px. oneDNN (in PyTorch 2.14) returns a wrong bf16
    weight gradient for a convolution whose stride exceeds its input's side: values such as 1e+30 or
    NaN that change from call to call (SPEED.md). The ImageNet stem meets one on 16 px crops (layer4's
    stride-2 convolution at 1 x 1); the CIFAR stem never does on 16 px or more. Found by a forward
    pass on the meta device, which has shapes but no values (so costs next to nothing)."""
    with torch.device("meta"):
        backbone = build_backbone(arch, smallest_crop, stem=stem).eval()   # eval: BatchNorm takes a batch of 1
    fits = []
    for conv in backbone.modules():
        if isinstance(conv, nn.Conv2d) and max(conv.stride) > 1:
            conv.register_forward_pre_hook(
                lambda conv, inputs: fits.append(min(inputs[0].shape[-2:]) >= max(conv.stride)))
    backbone(torch.empty(1, 3, smallest_crop, smallest_crop, device="meta"))   # (1, 3, s, s): shapes only
    return all(fits)


# PyTorch 2.14's oneDNN CPU convolution (seen on an AVX2 CPU) hangs or corrupts memory in the backward
# pass of a 1x1 stride-2 convolution with 2 to 5 input channels in channels_last, the layout ResNets run
# in: a ResNet's first downsampling shortcut has --width input channels.
NARROW_RESNET_ON_A_CPU = ("a ResNet of --width {width} trains through a 1x1 stride-2 convolution of {width} channels, "
                          "which hangs or corrupts memory in PyTorch's CPU convolutions; use --width 6 or more")


def narrow_resnet_on_a_cpu(arch, width, device):
    return arch.startswith("resnet") and width is not None and 2 <= width <= 5 and not str(device).startswith("cuda")
