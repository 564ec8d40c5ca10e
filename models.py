"""Backbones (ResNet-18/50, ViT-Tiny) and the projector onto the sphere S^{D-1} (Section IV).

The paper trains ResNet-18 on CIFAR-10/100, STL-10 and Food-101, ResNet-50 on ImageNet-1k and ViT-Tiny
with 16-pixel patches on STL-10. The backbone's pooled output (ResNet: global average pool; ViT: the
final CLS token) is the representation every probe uses; the projector and the sphere exist only for
the loss. Every backbone has a size knob (ResNet base width, ViT width/depth/heads) so that a laptop
configuration is the same code with smaller numbers.

The networks are plain torch.nn modules with plain BatchNorm. How the views share a BatchNorm's
statistics is decided by how HyDeSModel.forward calls the network: once per view (the default), or once
per crop size (DINO's way).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

ARCHS = ("resnet18", "resnet50", "vit_tiny")
STEMS = ("imagenet", "cifar")


# ----------------------------------------------------------------------------------------------------
# ResNet, of torchvision's blocks (BasicBlock for ResNet-18, Bottleneck v1.5 for ResNet-50) so that
# state_dicts are interchangeable

def _shortcut(in_planes, out_planes, stride):
    """The projection shortcut (1x1 conv + BN) when the shape changes, else None (identity)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


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
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_planes = width
        stages = []
        for i, num_blocks in enumerate(layers):
            planes, stride = width * 2 ** i, (1 if i == 0 else 2)
            blocks = []
            for b in range(num_blocks):
                block_stride = stride if b == 0 else 1
                shortcut = _shortcut(in_planes, planes * block.expansion, block_stride)
                blocks.append(block(in_planes, planes, block_stride, downsample=shortcut))
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
        patch_pos = self.resize_positions(patch_pos, grid_h, grid_w)                         # (1, C, h, w)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)          # (1, hw, C)
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    def resize_positions(self, table, grid_h, grid_w):
        """The (1, C, s, s) table resized bicubically to the input's grid (DINO's files: backbones.DinoViT)."""
        return F.interpolate(table, size=(grid_h, grid_w), mode="bicubic", align_corners=False)

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
# Building by name, the projector, and the model the loss sees

def vit_patch_size(image_size):
    """16-pixel patches from 96 px up (Table I's VIT-T16 on STL-10: 6x6 patches per global crop),
    4-pixel patches for small images (32 px CIFAR crops: 8x8 patches, 16 px local crops: 4x4)."""
    return 16 if image_size >= 96 else 4


def build_backbone(arch, image_size, width=None, depth=None, heads=None, stem=None):
    """A backbone by name. width/depth/heads shrink it for laptops; None keeps the standard size.

    arch: resnet18 | resnet50 | vit_tiny. image_size: the global crop size, which picks the ViT's patch
    size and positional grid. stem (ResNets): "imagenet" or "cifar" (see ResNet). train.py always names
    one (--stem, default imagenet); None, for a network built outside a run, picks by size: the CIFAR stem
    up to 64 px, as other libraries' small-image ResNets usually have it.
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
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class HyDeSModel(nn.Module):
    """Backbone + projector + L2 normalisation: a list of V views -> embeddings z (V, B, D) on S^{D-1}.

    With `num_classes` the head is instead a linear classifier and the output its logits (V, B, C),
    unnormalised: the supervised baseline of Table I, same backbone (train.py --method).

    How the views go through the network matters only through BatchNorm, whose training-mode statistics
    are those of the batch it is given (a ViT's backbone has none: LayerNorm and attention act within each
    image; its projector has):
    - per_view=True (train.py --forward per-view, the default): the backbone and projector are called once
      per view, so every BatchNorm normalises one view's B images. Our reading of the Lightly training
      steps of the evaluation code the paper cites, which embed each view on its own; the paper names
      neither way.
    - per_view=False (--forward per-resolution, DINO's MultiCropWrapper): the backbone is called once per
      crop size (the 2 global crops as one batch of 2B, the 6 local ones as one of 6B) and the projector
      once on all N = V B features.
    Which trains better is measured in REPRODUCE.md. In eval mode the two give the same output.
    """

    def __init__(self, backbone, proj_hidden=2048, proj_dim=256, num_classes=None, per_view=True):
        super().__init__()
        self.backbone = backbone
        self.num_classes, self.per_view = num_classes, per_view
        if num_classes is None:
            self.projector = projector(backbone.num_features, proj_hidden, proj_dim)
        else:
            self.classifier = nn.Linear(backbone.num_features, num_classes)

    def forward(self, views):
        """views: list of V tensors (B, 3, H_v, W_v), views of one size adjacent (globals, then locals)."""
        if self.per_view:
            return torch.stack([self.head(self.backbone(view)) for view in views])   # V x (B, D) -> (V, B, D)
        features = [self.backbone(torch.cat(same_size))                # (k B, 3, H, W) -> (k B, F)
                    for same_size in runs_of_one_size(views)]
        z = self.head(torch.cat(features))                            # (N, F) -> (N, D), N = V B, view v at v B
        return z.view(len(views), len(views[0]), -1)                  # (N, D) -> (V, B, D)

    def head(self, features):
        """Backbone features (n, F) -> points on S^{D-1} (n, D), in float32; or, for the supervised
        baseline, logits (n, C)."""
        if self.num_classes is not None:
            return self.classifier(features).float()
        return F.normalize(self.projector(features).float(), dim=-1)


def runs_of_one_size(views):
    """The views split into runs of adjacent views of one size: DINO's [2 globals], [6 locals]."""
    runs = []
    for view in views:
        if runs and runs[-1][-1].shape[-2:] == view.shape[-2:]:
            runs[-1].append(view)
        else:
            runs.append([view])
    return runs
