"""Backbones (ResNet-18/50, ViT-Tiny) and the projector onto the sphere S^{D-1}.

The paper (Section IV) trains ResNet-18 on CIFAR-10/100, STL-10 and Food-101, ResNet-50 on ImageNet-1k
and ViT-Tiny with 16-pixel patches on STL-10. The backbone's pooled output (ResNet: global average pool;
ViT: the final CLS token) is the representation every probe uses; the projector and the sphere exist
only for the loss.

Every backbone has a size knob (ResNet base width, ViT width/depth/heads) so that a laptop configuration
is the same code with smaller numbers.

The end of the file holds what every script needs to run a network: the device's precision (autocast,
grad scaling, memory layout), checkpoints written so that a kill never leaves a broken one and read so
that a file never runs code, a frozen backbone loaded from one (ours, or torchvision's, timm's, Lightly's,
solo-learn's and DINO's), a backbone exported to torchvision's or timm's layout, and its features,
extracted once and cached.
"""

import argparse
import hashlib
import json
import math
import os
import pickle
from contextlib import nullcontext
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import (DATASETS, cpu_has_native_bf16, dataset_split, eval_transform, native_image_size, normalize,
                  write_atomically)

ARCHS = ("resnet18", "resnet50", "vit_tiny")


# ----------------------------------------------------------------------------------------------------
# BatchNorm that can hold several views in one call

class ViewBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode call may hold several views of the same B images: with
    `views` = k (set by HyDeSModel for one call; rows v B to (v + 1) B - 1 are view v), each view is
    normalised by its own statistics, and the running statistics move as k calls of one view each, in
    order, would move them (batch_norm_per_view). So one call computes what the paper's setup computes
    with a call per view (HyDeSModel, per_view), with k times fewer kernel launches, which is what
    bounds a GPU's step at 16-96 px. With views = 1, or in eval mode, it is nn.BatchNorm2d; its
    parameters and buffers are the same, so state_dicts load into torchvision's ResNets and back."""

    views = 1

    def forward(self, x):
        return batch_norm_per_view(self, x) if self.views > 1 and self.training else super().forward(x)


class ViewBatchNorm1d(nn.BatchNorm1d):
    """The same for (k B, C) inputs (the projector's BatchNorms), else nn.BatchNorm1d."""

    views = 1

    def forward(self, x):
        return batch_norm_per_view(self, x) if self.views > 1 and self.training else super().forward(x)


VIEW_NORMS = (ViewBatchNorm2d, ViewBatchNorm1d)


def batch_norm_per_view(norm, x):
    """Training-mode BatchNorm of `norm` (a ViewBatchNorm) on x (k B, C, *spatial), k = norm.views, each
    view v (rows v B to (v + 1) B - 1) by its own statistics; the running statistics updated as by k
    calls of one view each, in order. -> (k B, C, *spatial), in x's memory layout. For the BatchNorms
    the networks here build: affine, with running statistics and a momentum."""
    if not (norm.affine and norm.track_running_stats and norm.momentum is not None):
        raise ValueError("batch_norm_per_view needs an affine BatchNorm with running statistics and a momentum")
    views, channels, spatial = norm.views, x.shape[1], x.shape[2:]
    batch = x.shape[0] // views
    # (k B, C, *S) -> (B, k C, *S): channel c of view v becomes channel v C + c, so that the statistics per
    # channel over (B, *S) are each view's own. One copy (views are the outer dimension), channels last
    # in memory, as x is for ResNets: (k, B, *S, C) -> (B, *S, k, C).
    channels_last = x.movedim(1, -1).unflatten(0, (views, batch))                    # (k, B, *S, C)
    grouped = channels_last.movedim(0, -2).reshape(batch, *spatial, views * channels).movedim(-1, 1)
    # Each view's running statistics as if it came first, u_v = (1 - m) r_0 + m s_v: (k C,) each
    running_mean, running_var = norm.running_mean.repeat(views), norm.running_var.repeat(views)
    y = F.batch_norm(grouped, running_mean, running_var, norm.weight.repeat(views), norm.bias.repeat(views),
                     training=True, momentum=norm.momentum, eps=norm.eps)
    with torch.no_grad():                                  # ... then as k updates in a row would leave them
        # Eager calls take c and w_v from the cache. torch.compile would ignore the cache, trace the
        # function and warn that it did: it is given the function itself, whose c and w_v become constants
        # of the graph.
        sequence = in_sequence.__wrapped__ if torch.compiler.is_compiling() else in_sequence
        start_weight, view_weights = sequence(views, norm.momentum, x.device, norm.running_mean.dtype)
        for running, once in ((norm.running_mean, running_mean), (norm.running_var, running_var)):
            running.addmv_(once.view(views, channels).T, view_weights, beta=start_weight)   # c r_0 + sum_v w_v u_v
        norm.num_batches_tracked.add_(views)
    # (B, k C, *S) -> (k B, C, *S), one copy: (B, *S, k, C) -> (k, B, *S, C)
    y = y.movedim(1, -1).unflatten(-1, (views, channels)).movedim(-2, 0).reshape(x.shape[0], *spatial, channels)
    y = y.movedim(-1, 1)
    layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    return y.contiguous(memory_format=layout)              # x's layout (a copy only if x was not channels-last)


@lru_cache(maxsize=64)
def in_sequence(views, momentum, device, dtype):
    """The running statistics after k = `views` updates in a row, r <- (1 - m) r + m s_v for v = 1..k, as
    c r_0 + sum_v w_v u_v of the start r_0 and the one-view updates u_v = (1 - m) r_0 + m s_v:
    r_k = (1 - m)^k r_0 + sum_v (1 - m)^(k - v) m s_v = c r_0 + sum_v w_v u_v, with w_v = (1 - m)^(k - v) and
    c = (1 - m)^k - (1 - m) sum_v w_v. -> (c, w (k,) on `device`), made once per (k, m, device, dtype):
    a tensor built from Python numbers on a GPU is a copy the host waits for."""
    keep = 1 - momentum
    weights = [keep ** (views - v) for v in range(1, views + 1)]
    return keep ** views - keep * sum(weights), torch.tensor(weights, dtype=dtype).to(device)


# ----------------------------------------------------------------------------------------------------
# ResNet, with torchvision's attribute names so that state_dicts are interchangeable

class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). Attribute names follow torchvision.models.resnet."""
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = ViewBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = ViewBatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with 4x expansion (ResNet-50), stride on the 3x3 as torchvision (v1.5)."""
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = ViewBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = ViewBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = ViewBatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_planes, out_planes, stride):
    """The projection shortcut (1x1 conv + BN) when the shape changes, else None (identity)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), ViewBatchNorm2d(out_planes))


class ResNet(nn.Module):
    """ResNet backbone returning the globally pooled feature (B, C).

    stem "imagenet": the 7x7 stride-2 convolution and 3x3 max-pool of He et al. (torchvision's and timm's
    resnet18/50), which shrink a 32 px image to 8 px before the first block. stem "cifar": a 3x3 stride-1
    convolution and no max-pool, the usual choice for 32-64 px images. With the ImageNet stem and width
    64 the state_dict loads, strictly, into torchvision.models.resnet18/50() once its fc is replaced by
    nn.Identity().
    """

    def __init__(self, block, layers, width=64, stem="imagenet"):
        super().__init__()
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = ViewBatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_planes = width
        stages = []
        for i, num_blocks in enumerate(layers):
            planes, stride = width * 2 ** i, (1 if i == 0 else 2)
            blocks = []
            for b in range(num_blocks):
                blocks.append(block(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()            # torchvision's classifier slot, empty: we want features
        self.num_features = in_planes
        for m in self.modules():           # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self, x):
        """The output of each stage, (B, C_k, H_k, W_k) for k = 1..4: hypercolumns are built from these."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outputs.append(x)
        return outputs

    def forward(self, x):
        return torch.flatten(self.avgpool(self.stages(x)[-1]), 1)    # (B, C, h, w) -> (B, C)


# ----------------------------------------------------------------------------------------------------
# ViT (Dosovitskiy et al. 2021), pre-norm, in plain PyTorch

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        """(B, T, C) -> (B, T, C); with return_attention, also the weights softmax(q k^T / sqrt(C/h)),
        (B, h, T, T), which the fused kernel never forms: they are computed explicitly, for pictures only."""
        b, t, c = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, c // self.heads)   # (B, T, 3C) -> (B, T, 3, h, C/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                            # each (B, h, T, C/h)
        if return_attention:
            weights = (q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)).softmax(dim=-1)  # -> (B, h, T, T)
            out = weights @ v                                           # (B, h, T, T) x (B, h, T, C/h)
            return self.proj(out.transpose(1, 2).reshape(b, t, c)), weights
        out = F.scaled_dot_product_attention(q, k, v)                   # (B, h, T, C/h)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))          # -> (B, T, C)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, return_attention=False):
        if return_attention:
            out, weights = self.attn(self.norm1(x), return_attention=True)
            x = x + out
            return x + self.mlp(self.norm2(x)), weights
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT returning the final CLS token (B, C).

    The positional embedding is learned for the global crop's grid (image_size / patch_size)^2 and
    bicubically resized for any other grid, so local crops (half the side: a quarter of the patches)
    go through the same network, as in DINO.
    """

    def __init__(self, image_size, patch_size, dim=192, depth=12, heads=3):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by the ViT patch size {patch_size}")
        self.patch_size = patch_size
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        grid = image_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.num_features = dim
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def positional_embedding(self, grid_h, grid_w):
        """(1, 1 + grid_h*grid_w, C): the learned table, resized bicubically to the input's grid."""
        base = self.pos_embed.shape[1] - 1
        if grid_h * grid_w == base and grid_h == grid_w:
            return self.pos_embed
        side, dim = int(math.isqrt(base)), self.pos_embed.shape[2]
        patch_pos = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, C, s, s)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)          # (1, hw, C)
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    def embed(self, x):
        """Patch embedding + CLS token + positions: (B, 3, H, W) -> (B, 1 + h*w, C), and the grid (h, w)."""
        x = self.patch_embed(x)                                   # (B, 3, H, W) -> (B, C, h, w)
        grid_h, grid_w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)                          # -> (B, h*w, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)   # -> (B, 1 + h*w, C)
        return x + self.positional_embedding(grid_h, grid_w), (grid_h, grid_w)

    def stages(self, x, taps=4):
        """Patch tokens as feature maps after `taps` evenly spaced blocks (blocks 3, 6, 9, 12 of 12), the
        ViT counterpart of a ResNet's four stages for hypercolumns: a list of (B, C, h, w); the last one
        passes through the final norm, as the representation does."""
        x, (grid_h, grid_w) = self.embed(x)
        depth = len(self.blocks)
        tap_after = {depth * (k + 1) // taps - 1 for k in range(taps)}
        maps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in tap_after:
                out = self.norm(x) if i == depth - 1 else x
                maps.append(out[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, grid_h, grid_w))  # (B, C, h, w)
        return maps

    def attention_maps(self, x):
        """Every block's attention weights, stacked: (depth, B, heads, T, T) with T = 1 + h*w, and the
        grid (h, w). Row 0 of each map is the CLS token's attention to the patches (Fig. 3)."""
        x, grid = self.embed(x)
        maps = []
        for block in self.blocks:
            x, weights = block(x, return_attention=True)
            maps.append(weights)
        return torch.stack(maps), grid

    def forward(self, x):
        x, _ = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]                                 # the CLS token, (B, C)


# ----------------------------------------------------------------------------------------------------
# Building by name, and the projector

def vit_patch_size(image_size):
    """16-pixel patches from 96 px up (the paper's ViT-T16 on STL-10: 6x6 patches per global crop),
    4-pixel patches for small images (32 px CIFAR crops: 8x8 patches, 16 px local crops: 4x4)."""
    return 16 if image_size >= 96 else 4


STEMS = ("imagenet", "cifar")


def build_backbone(arch, image_size, width=None, depth=None, heads=None, stem=None):
    """A backbone by name. width/depth/heads shrink it for laptops; None keeps the standard size.

    arch: resnet18 | resnet50 | vit_tiny. image_size: the global crop size, which picks the ViT's patch
    size and positional grid. stem (ResNets): "imagenet" or "cifar" (see ResNet); None picks by size,
    the CIFAR stem up to 64 px, which is what another library's small-image ResNet usually has.
    """
    if arch in ("resnet18", "resnet50"):
        if depth is not None or heads is not None:
            raise ValueError(f"--depth and --heads apply to vit_tiny only, not {arch}")
        block, layers = (BasicBlock, [2, 2, 2, 2]) if arch == "resnet18" else (Bottleneck, [3, 4, 6, 3])
        stem = stem or ("cifar" if image_size <= 64 else "imagenet")
        return ResNet(block, layers, width=width or 64, stem=stem)
    if arch == "vit_tiny":
        dim, heads = width or 192, heads or 3
        if dim % heads:
            raise ValueError(f"ViT width {dim} is not divisible by its {heads} heads")
        return VisionTransformer(image_size, vit_patch_size(image_size), dim=dim, depth=depth or 12, heads=heads)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def projector(in_dim, hidden_dim=2048, out_dim=256):
    """MLP from the backbone feature to R^D: Linear-BN-ReLU, Linear-BN-ReLU, Linear.

    The paper does not describe its projector, only that D from 128 to 4096 makes no clear difference
    (Section VII-A). We use the common SimCLR/BYOL-style three-layer MLP; the output is L2-normalised
    onto S^{D-1} in HyDeSModel.forward.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), ViewBatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), ViewBatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class HyDeSModel(nn.Module):
    """Backbone + projector + L2 normalisation: a list of views -> embeddings z of shape (V, B, D).

    With `num_classes` the head is instead a linear classifier and the output its logits (V, B, C),
    unnormalised: the supervised baseline of Table I, same backbone (train.py --method).

    per_view: how the views go through the network, which matters only through BatchNorm, whose
    training-mode statistics are those of the batch it is given:
    - True, BatchNorm over one view at a time (the paper's setup: its Lightly training steps embed each
      view on its own), in the backbone and in the projector. The backbone is still called once per
      crop size and the projector once: their BatchNorms (ViewBatchNorm2d/1d) keep the views of a call
      apart, and a ViT's backbone has no BatchNorm (LayerNorm and attention act within each image).
      That computes what a call per view computes (to float rounding; tested), with a quarter of the
      calls, which is what bounds a GPU's step at these sizes (README: Speed). A network whose
      BatchNorms cannot keep views apart (SyncBatchNorm, under torchrun on GPUs) is called once per
      view instead.
    - False, BatchNorm over all the views of a crop size (DINO's official code), so it sees the 2B global
      crops together, then the 6B local crops, and the projector's BatchNorm all N = V*B embeddings at
      once. Which trains better is measured in REPRODUCE.md.
    In eval mode the two give the same output.
    """

    def __init__(self, backbone, proj_hidden=2048, proj_dim=256, num_classes=None, per_view=True):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.per_view = per_view
        if num_classes is None:
            self.projector = projector(backbone.num_features, proj_hidden, proj_dim)
        else:
            self.classifier = nn.Linear(backbone.num_features, num_classes)

    def forward(self, views):
        """views: list of V tensors (B, 3, H_v, W_v), views of one size adjacent (globals, then locals)."""
        batch = views[0].shape[0]
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.per_view and not all(isinstance(m, VIEW_NORMS) for m in norms):
            out = torch.cat([self.head(self.backbone(v)) for v in views])     # V x (B, D) -> (N, D), N = V*B
            return out.view(len(views), batch, -1)                             # (N, D) -> (V, B, D)
        features, start = [], 0
        try:
            while start < len(views):                # the run of views that share views[start]'s size
                end = start
                while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                    end += 1
                keep_views_apart(norms, end - start if self.per_view else 1)
                features.append(self.backbone(torch.cat(views[start:end])))   # (k*B, 3, H, W) -> (k*B, F)
                start = end
            keep_views_apart(norms, len(views) if self.per_view else 1)        # the projector's BatchNorms
            out = self.head(torch.cat(features))                               # (N, F) -> (N, D), view v at v*B
        finally:
            keep_views_apart(norms, 1)               # whatever happens, a later call is plain BatchNorm
        return out.view(len(views), batch, -1)                                 # (N, D) -> (V, B, D)

    def head(self, features):
        """Backbone features (n, F) -> points on S^{D-1} (n, D), in float32; or, for the supervised
        baseline, logits (n, C)."""
        if self.num_classes is not None:
            return self.classifier(features).float()
        return F.normalize(self.projector(features).float(), dim=-1)


def keep_views_apart(norms, views):
    """Tell each ViewBatchNorm of `norms` how many views its next training-mode call holds (1: plain
    BatchNorm over the whole call)."""
    for norm in norms:
        norm.views = views


# ----------------------------------------------------------------------------------------------------
# Precision: one set-up for training, the probes and the benchmark

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
    all computed right on these crops (cpu_bf16_convolutions_are_right), float32 otherwise. There bf16
    trained the README's laptop network 1.4x faster to the same k-NN accuracy; ViT-Tiny ran slower in
    bf16 than in float32 on the CPU we measured (benchmark.py), hence float32 for it; and without a
    network (the probes' features, arch None) float32."""
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
    NaN that change from call to call (README). The ImageNet stem meets one on 16 px crops (layer4's
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


# ----------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, read as data only

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


def save_checkpoint(path, state):
    """Write `state` so that `path` always holds a complete checkpoint, whenever the process dies: the
    bytes go to a temporary file beside it, fsynced, then renamed over it (data.write_atomically). A
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
    """The checks of add_checkpoint_arguments' numbers, as (ok, message) rules for data.first_problem."""
    return [(args.image_size is None or args.image_size >= 8, f"--image-size must be >= 8 (got {args.image_size})"),
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


# ----------------------------------------------------------------------------------------------------
# Frozen features, extracted once and cached

def features_precision(device, backbone):
    """The forward pass of extract_features(exact=False) and segment.py: bf16 autocast where training's
    --precision auto would train this kind of network in it (fp16 on GPUs without bf16), float32
    otherwise, and a ResNet's channels_last layout.

    On a CPU with native bf16 that is bf16 for ResNets. On the README's laptop network after its 10
    minutes (2 threads), CIFAR-10's 60,000 images took 13.6 s against 32.6 s in float32 (42.9 s in
    float32 with contiguous tensors), and the k-NN top-1 was 56.43% against 56.41%. The oneDNN fault
    that keeps some ResNets' training in float32 (cpu_bf16_convolutions_are_right) is in the weight
    gradient, which a forward pass never computes."""
    resnet = "resnet" if isinstance(backbone, ResNet) else None      # precision_for's layout follows it
    if device.type == "cuda":
        return precision_for(device, resnet)
    return precision_for(device, resnet, "bf16" if resnet and cpu_has_native_bf16() else "fp32")


@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size=256, workers=2, desc="features", exact=False):
    """Frozen features of a whole dataset: (N, F) float32 on the CPU, and labels (N,) int64. The dataset
    gives normalised images (eval_transform), or uint8 ones, normalised here on the device.

    exact=False: in features_precision, fast and enough for the probes, whose accuracies do not move with
    the last bits. exact=True: in float32 throughout, for analyze.py, whose numerical ranks count singular
    values above float32 rounding: bf16's 8-bit mantissa rounds every feature by ~0.4% and fills the null
    space, so a rank-16 matrix comes out as rank 200 or more."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    autocast, _, memory_format = precision_for(device, None, "fp32") if exact else features_precision(device, backbone)
    for images, targets in tqdm(loader, desc=desc, leave=False):
        images = images.to(device, non_blocking=True)
        if images.dtype == torch.uint8:           # eval_transform(size, normalised=False): normalise here
            images = normalize(images.float() / 255)
        images = images.contiguous(memory_format=memory_format)     # (B, 3, H, W), NHWC in memory for ResNets
        with autocast:
            features.append(backbone(images).float().cpu())
        labels.append(targets)
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def file_digest(path):
    """SHA-256 of a file's bytes: the cache key follows the checkpoint's content, not its name or date."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_fingerprint(data):
    """A digest of what a split holds: its class names and, for image folders, every file's path, size
    and modification time, so that adding, removing or replacing an image changes it. (Datasets stored
    as arrays, CIFAR and STL-10, are fixed files: their class names and length stand for them.)"""
    digest = hashlib.sha256(json.dumps([list(data.classes), len(data)]).encode())
    for path, label in getattr(data, "samples", []):
        stat = os.stat(path)
        digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached_features(backbone, checkpoint_digest, dataset, data_dir, split, image_size, device, cache_dir,
                    workers=2, exact=False):
    """extract_features for one split, read from cache_dir when the same key was extracted before.
    Returns (features (N, F), labels (N,), whether they came from the cache).

    The key: the checkpoint's bytes, the dataset, its folder, the split, the resolution, the split's files
    (split_fingerprint), and the precision of the forward pass (exact: see extract_features), so that
    features extracted under bf16 never stand in for float32 ones. A cache file that cannot be
    read (cut short, say) is extracted anew."""
    data = dataset_split(dataset, data_dir, split, eval_transform(image_size))
    key = {"checkpoint": checkpoint_digest, "dataset": dataset, "data_dir": os.path.abspath(data_dir),
           "split": split, "image_size": image_size, "files": split_fingerprint(data),
           "precision": str(torch.float32 if exact else getattr(features_precision(device, backbone).autocast,
                                                                "fast_dtype", torch.float32))}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{dataset}-{split}-{name}.pt")
    if os.path.exists(path):
        try:
            cached = torch.load(path, weights_only=True)
            if cached["key"] == key:
                return cached["features"], cached["labels"], True
        except Exception as error:   # any unreadable file (zip, pickle, EOF errors): extract anew, say so
            print(f"warning: the feature cache {path} is unreadable ({type(error).__name__}); extracting anew")
    features, labels = extract_features(backbone, data, device, workers=workers, desc=f"{split} features",
                                        exact=exact)
    os.makedirs(cache_dir, exist_ok=True)
    write_atomically(path, lambda f: torch.save({"key": key, "features": features, "labels": labels}, f))
    return features, labels, False
