"""Precision: what arithmetic a network runs in, on which device, and the CPU bf16 guard.

Machinery: a reader of the method may skip this file; the method is the same in any precision. train.py,
the probes and benchmark.py take from here the forward pass's autocast (bf16 on GPUs that have it, fp16
with gradient scaling on older ones, float32 or bf16 on CPUs), the grad scaler, and the tensor layout
(channels_last for ResNets). The loss itself always runs in float32 (hydes.py says why). On CPUs, bf16 is
used only where the CPU computes it natively and where oneDNN's bf16 convolutions are known to be right
for the network and crop sizes at hand (`cpu_bf16_convolutions_are_right`).
"""

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn as nn

from models import ResNet, build_backbone


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 dot products in hardware: the avx512_bf16 (Cooper Lake, Zen 4 and
    later) or amx_bf16 (Sapphire Rapids and later) flags of /proc/cpuinfo, on Linux; False elsewhere.
    torch.backends.cpu.get_cpu_capability() does not tell: it names the widest vector instruction set
    PyTorch's own kernels use ("AVX512", "AVX2"), and Skylake's AVX-512 has no bf16, which oneDNN then
    emulates through float32 with conversions (so it saves little there, if anything; not measured)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
    autocast = nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
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
    if (arch is not None and arch.startswith("resnet") and smallest_crop is not None and cpu_has_native_bf16()
            and cpu_bf16_convolutions_are_right(arch, stem, smallest_crop)):
        return "bf16"
    return "fp32"


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
    return precision_for(device, resnet, "bf16" if resnet and cpu_has_native_bf16() else "fp32")


def run_arithmetic(args, checkpoint):
    """What the run computes in: --precision, or for auto what auto_precision picks for this network,
    crops and device. A resumed run on the same kind of device keeps the arithmetic it started in, so that
    a change in what auto picks (a newer version of this file, say) never changes a run midway; on another
    kind of device auto is decided afresh."""
    if args.precision != "auto":
        return args.precision
    saved = checkpoint["args"] if checkpoint is not None else {}
    if saved and torch.device(saved["device"]).type == torch.device(args.device).type:
        return saved["arithmetic"]
    return auto_precision(torch.device(args.device), args.arch, args.stem, min(args.global_size, args.local_size))
