"""A frozen backbone from any checkpoint: train.py's, or another library's (torchvision, timm, Lightly,
solo-learn, DINO, MoCo, BYOL), and the export of one to torchvision's and timm's layouts.

Machinery: a reader of the method may skip this file. The file says what it is: the network is built from
its tensors' names and shapes (`backbone_shape`); the flags only say what no tensor records, and one that
contradicts the file is an error naming both. evaluate.py, segment.py and analyze.py probe a frozen
backbone through `load_for_probing` / `load_backbone`, whatever library trained it.
"""

import hashlib
import math
import os
from collections import Counter

import torch
import torch.nn.functional as F

from checkpoints import CheckpointError, safe_load, save_checkpoint
from data import DATASETS, native_image_size
from models import ARCHS, BasicBlock, VisionTransformer, build_backbone
from settings import default_device, device_argument


METHOD_NAMES = {"hydes": "HyDeS", "supervised": "Supervised"}


def load_backbone(path, device="cpu", arch=None, checkpoint_key=None, heads=None, stem_padding=None, quiet=False,
                  trust_pickle=False):
    """A frozen backbone (eval mode, no gradients) on `device`, from a train.py checkpoint or from another
    library's checkpoint or state_dict (`find_backbone`). What no tensor records (a ViT's heads, a 3x3
    conv1's padding, a missing ReLU, how positions are resized) comes from what the file records (train.py's
    settings, our --export's note), else from the flags, else from the layout's library (`Found.rules`),
    else from the usual rule, which the printed line then names.

    arch, checkpoint_key, heads, stem_padding, trust_pickle: add_backbone_arguments' flags, whose help says
    what each does and its default. quiet: leave info["loaded"] unprinted.

    Returns (backbone, info): info holds arch, image_size (train.py's crop size, else None), method (the
    objective a train.py checkpoint was trained with, else the file's name: resnet50_byol.pth ->
    resnet50_byol), train_args, epoch (completed epochs; None for a foreign checkpoint), `loaded`, the
    printed line, and `network`, which tensors were built into what (the feature cache keys on it: two
    networks of one file never share).
    """
    checkpoint = safe_load(path, trust_pickle)
    if isinstance(checkpoint, torch.nn.Module):                  # torch.save(model), read with --trust-pickle
        checkpoint = checkpoint.state_dict()
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict; save the "
                              f"backbone's model.state_dict() instead")
    trained, model = checkpoint.get("args"), checkpoint.get("model")
    # train.py's: its settings in args, the backbone under backbone. (a hand-rolled {'model', 'args'} is not)
    ours = (isinstance(trained, dict) and {"arch", "global_size", "method"} <= set(trained) and
            isinstance(model, dict) and any(str(k).startswith("backbone.") for k in model))
    if ours and checkpoint_key is not None:
        raise CheckpointError(f"--checkpoint-key {checkpoint_key}, but {path} is train.py's, which holds one "
                              f"backbone; drop --checkpoint-key")
    found = find_backbone(checkpoint, path, checkpoint_key)      # ours: 'backbone.' of 'model'
    recorded = ({"heads": trained.get("heads") or 3, "stem_padding": 1} if ours else            # train.py's
                getattr(checkpoint, "_metadata", {}).get("", {}).get(EXPORT_NOTE, {}))         # our --export's
    shape = backbone_shape(found.state, path)
    said = {name: value for name, value in (("heads", heads), ("stem_padding", stem_padding)) if value is not None}
    problem = contradiction(shape, arch, said, recorded, path)
    if problem:
        raise CheckpointError(problem)
    shape.update({**found.rules, **said, **recorded})
    notes = []
    if shape["arch"] == "vit_tiny" and "heads" not in shape:
        # No tensor records a ViT's heads: timm's and DINO's ViTs give each 64 channels (Tiny 192/3, Small 384/6)
        if shape["width"] % 64:
            raise CheckpointError(f"{path} holds a ViT of width {shape['width']}, not a multiple of 64 channels per "
                                  f"head, and no tensor records its heads: pass --heads")
        shape["heads"] = shape["width"] // 64
        if shape.get("positions") != "dino":           # DINO's vision_transformer.py: 64 channels a head, no guess
            notes.append(f"{shape['heads']} heads assumed (64 channels each, as in timm and DINO): pass --heads if not")
    state, splits = averaged_splits(found.state)
    if splits:
        notes.append(f"BatchNorm statistics of {splits} splits averaged (Lightly's SplitBatchNorm, as its eval mode)")
    backbone = build_from_shape(shape)
    built = backbone.state_dict()
    # num_batches_tracked is left out of files older than torch 0.4.1; BatchNorm fills it in (eval mode never reads it)
    missing = sorted(k for k in set(built) - set(state) if not k.endswith("num_batches_tracked"))
    if missing:
        raise CheckpointError(f"{path}: {found.where} lacks {len(missing)} of the {len(built)} tensors "
                              f"of {describe(shape)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    wrong = [k for k, v in built.items() if k in state and state[k].shape != v.shape]
    if wrong:                  # a wide or grouped ResNet, say: torch's own message lists every tensor
        raise CheckpointError(f"{path}: {len(wrong)} tensors do not fit {describe(shape)}, e.g. {wrong[0]} is "
                              f"{tuple(state[wrong[0]].shape)} in the file, {tuple(built[wrong[0]].shape)} in the "
                              f"network; this project builds the standard ResNets and ViTs only")
    unplaced = found.unplaced(built)
    if unplaced:               # LayerScale, qk-norm, registers: left out, the network would compute something else
        raise CheckpointError(f"{path}: {found.where} holds {len(unplaced)} tensors of its backbone that this "
                              f"project's {shape['arch']} has no place for ({', '.join(unplaced[:2])}"
                              f"{', ...' if len(unplaced) > 2 else ''}); this project builds plain ResNets and ViTs: "
                              f"probe it with the library that made it")
    backbone.load_state_dict({k: state[k] for k in built if k in state})
    network = f"{describe(shape)}, {len(built)} tensors from {found.where}"
    left_out = found.left_out(built)
    info = {"arch": shape["arch"], "image_size": None, "train_args": None, "epoch": None,
            "method": os.path.splitext(os.path.basename(path))[0], "network": network,
            "loaded": "; ".join([f"{path}: {network}", *notes] + ([f"left out {left_out}"] if left_out else []))}
    if ours:
        method = METHOD_NAMES.get(trained["method"], trained["method"])     # as saved by an earlier version
        info.update(image_size=trained["global_size"], train_args=trained, method=method, epoch=checkpoint.get("epoch"))
    if not quiet:
        print(info["loaded"])
    # Frozen: the probes train heads on top, and saliency needs gradients of activations, never of weights.
    return backbone.to(device).eval().requires_grad_(False), info


def averaged_splits(state):
    """The state with each BatchNorm's statistics kept once per split (Lightly's SplitBatchNorm, num_splits=8:
    8 C values for C channels) averaged over the splits, which is what SplitBatchNorm's eval mode
    normalises by; and the number of splits (0 where there are none)."""
    state, splits = dict(state), 0
    for name, value in state.items():
        weight = state.get(name.rsplit(".", 1)[0] + ".weight")
        if (name.endswith(("running_mean", "running_var")) and weight is not None
                and value.numel() > weight.numel() and value.numel() % weight.numel() == 0):
            splits = value.numel() // weight.numel()
            state[name] = value.view(splits, weight.numel()).mean(0)
    return state, splits


# ----------------------------------------------------------------------------------------------------
# What a file's tensors say: the architecture, its width and depth, the stem, the positional grid

def backbone_shape(state, path):
    """The network a backbone state_dict (this project's names) describes, read from its tensors alone: a
    dict with arch and its numbers (a ResNet's width and stem, a ViT's width, patch, depth and grid); None
    where they are neither a ResNet (conv1.weight, layer1-4) nor a ViT (patch_embed, pos_embed, blocks)."""
    if "conv1.weight" in state and any(k.startswith("layer4.") for k in state):
        blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in state
        arch = {(False, (2, 2, 2, 2)): "resnet18", (True, (3, 4, 6, 3)): "resnet50"}.get((bottleneck, blocks))
        kernel = state["conv1.weight"].shape[-1]
        if arch is None:
            raise CheckpointError(f"{path} holds a ResNet of {'Bottleneck' if bottleneck else 'basic'} blocks "
                                  f"{'-'.join(map(str, blocks))}, which this project does not build (resnet18: basic "
                                  f"2-2-2-2, resnet50: Bottleneck 3-4-6-3)")
        if kernel not in (3, 7):
            raise CheckpointError(f"{path}'s conv1 is {kernel}x{kernel}; this project builds a 7x7 (ImageNet) or 3x3 "
                                  f"(CIFAR) stem")
        return {"arch": arch, "width": state["conv1.weight"].shape[0], "stem": "imagenet" if kernel == 7 else "cifar"}
    if "patch_embed.weight" in state and "pos_embed" in state and "blocks.0.attn.qkv.weight" in state:
        width, _, patch, _ = state["patch_embed.weight"].shape
        tokens = state["pos_embed"].shape[1]
        grid = math.isqrt(tokens - 1)
        if grid * grid != tokens - 1:
            raise CheckpointError(f"{path}'s pos_embed holds {tokens} positions, not a class token and a square grid; "
                                  f"this project's ViT has both")
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        return {"arch": "vit_tiny", "width": width, "patch": patch, "depth": depth, "grid": grid}
    return None


def contradiction(shape, arch, said, recorded, path):
    """The first flag (said: {"heads": 6}) that contradicts the file or what it records (train.py's
    settings, our --export's note), or fits no part of its network, as a one-line message; or None."""
    if arch is not None and arch != shape["arch"]:
        return f"--arch {arch}, but {path} holds {describe(shape)}; drop --arch (the file says what it is)"
    if "heads" in said and shape["arch"] != "vit_tiny":
        return f"--heads applies to a ViT, and {path} holds {describe(shape)}; drop --heads"
    if "stem_padding" in said and shape.get("stem") != "cifar":
        held = "is 7x7 (the ImageNet stem, padded by 3)" if "stem" in shape else f"holds {describe(shape)}"
        return f"--stem-padding applies to a 3x3 conv1, and {path} {held}; drop --stem-padding"
    for name, value in said.items():
        if name in recorded and value != recorded[name]:
            flag = "--" + name.replace("_", "-")
            return f"{flag} {value}, but {path} was written by this project with {recorded[name]}; drop {flag}"
    return None


def build_from_shape(shape):
    """The backbone `backbone_shape` describes, with what no tensor records (see load_backbone) filled in."""
    if shape["arch"] == "vit_tiny":
        if shape["width"] % shape["heads"]:
            raise CheckpointError(f"a ViT of width {shape['width']} cannot have {shape['heads']} heads "
                                  f"(they must divide it)")
        vit = DinoViT if shape.get("positions") == "dino" else VisionTransformer
        return vit(shape["grid"] * shape["patch"], shape["patch"], shape["width"], shape["depth"], shape["heads"])
    backbone = build_backbone(shape["arch"], None, width=shape["width"], stem=shape["stem"])
    if shape["stem"] == "cifar":
        backbone.conv1.padding = (shape.get("stem_padding", 1),) * 2      # solo-learn's CIFAR stem pads by 2, ours by 1
    if not shape.get("stem_relu", True):
        backbone.relu = torch.nn.Identity()       # the stem's only: each block has its own
    return backbone


class DinoViT(VisionTransformer):
    """DINO's ViT, whose interpolate_pos_encoding resizes the positional grid by a scale factor of
    (grid + 0.1) / side rather than to the grid's size (ours): other sampling points, other features."""

    def resize_positions(self, table, grid_h, grid_w):
        side = table.shape[-1]
        return F.interpolate(table, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")


def describe(shape):
    """'a resnet18 (width 64, CIFAR stem padded by 1)', 'a vit_tiny (width 192, depth 12, 3 heads, 16-px
    patches, 14x14 grid resized bicubically)', with what else was built: 'no ReLU after bn1', the rule a
    ViT's positions are resized by for other image sizes (DINO's, or ours: bicubic to the grid, without
    timm's antialiasing)."""
    if shape["arch"] == "vit_tiny":
        heads = f", {shape['heads']} heads" if "heads" in shape else ""
        resized = "as DINO does" if shape.get("positions") == "dino" else "bicubically"
        return (f"a vit_tiny (width {shape['width']}, depth {shape['depth']}{heads}, {shape['patch']}-px patches, "
                f"{shape['grid']}x{shape['grid']} grid resized {resized})")
    stem = "ImageNet stem" if shape["stem"] == "imagenet" else f"CIFAR stem padded by {shape.get('stem_padding', 1)}"
    relu = "" if shape.get("stem_relu", True) else ", no ReLU after bn1"
    return f"a {shape['arch']} (width {shape['width']}, {stem}{relu})"


def summary(state):
    """What a dict of tensors holds, briefly: '412 tensors: encoder_q. (200), encoder_k. (200), fc. (4) ...'."""
    groups = Counter(key.split(".")[0] + ("." if "." in key else "") for key in state).most_common()
    return (f"{len(state)} tensors: " + ", ".join(f"{name} ({n})" for name, n in groups[:4]) +
            (" ..." if len(groups) > 4 else ""))


# ----------------------------------------------------------------------------------------------------
# Where other libraries keep the backbone

# The containers checkpoints keep their weights in, tried in this order: Lightning's (Lightly, solo-learn)
# and MoCo's state_dict, torchvision's reference scripts' model, DINO's teacher (the network DINO evaluates).
CHECKPOINT_KEYS = ("state_dict", "model", "teacher")

# Momentum methods keep two copies of the encoder and evaluate the online one (MoCo's encoder_q and
# base_encoder, BYOL's online network, Lightly's and solo-learn's backbone). A prefix with one of these
# words is the other copy, taken only when no other prefix holds a backbone.
MOMENTUM_WORDS = ("momentum", "target", "ema", "encoder_k", "key_encoder")

# Lightly's examples keep the backbone as nn.Sequential(*list(resnet.children())[:-1]): the children by
# number. Of torchvision's ResNet: conv1 bn1 relu maxpool layer1 ... layer4 avgpool (relu, maxpool and
# avgpool hold nothing); of Lightly's own ResNetGenerator (a CIFAR-stem ResNet whose blocks call their
# downsample "shortcut"): conv1 bn1 layer1 ... layer4, and no ReLU after bn1, which its forward applies as
# F.relu, no child: the network Lightly trains so has none, and is built without. Each is told by where its
# layer4 lies.
NUMBERED_RESNETS = ({"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"},
                    {"0": "conv1", "1": "bn1", "2": "layer1", "3": "layer2", "4": "layer3", "5": "layer4"})

# What ends a backbone's first tensor, and so marks its prefix: a ResNet's stem, a ViT's patch embedding
# (ours, timm's), Lightly's numbered ResNet.
ANCHORS = ("conv1.weight", "patch_embed.weight", "patch_embed.proj.weight", "0.weight")

# Parts of timm's and DINOv2's ViTs that lie beside the blocks and change the features (a norm before the
# blocks or after pooling, attention pooling, register tokens): a file that has them is refused, as is one
# with tensors inside the blocks or stages that ours lack (LayerScale's ls1.gamma, qk-norm's q_norm, SE).
BACKBONE_EXTRAS = ("norm_pre", "fc_norm", "attn_pool", "reg_token", "register_tokens")


class Found:
    """A backbone found in a checkpoint. state: its tensors in this project's names; where: a phrase
    ("'backbone.' of 'state_dict'"); rules: what the layout's library builds that no tensor records (see
    find_backbone). left_out(taken) names, briefly, the file's tensors that were not taken."""

    def __init__(self, tensors, names, prefix, others, where, rules):
        self.tensors, self.names, self.prefix, self.others = tensors, names, prefix, others
        self.state = {ours: tensors[theirs] for ours, theirs in names.items()}
        self.where, self.rules = where, rules

    def unplaced(self, taken):
        """The file's names of backbone tensors that the built network (`taken`: its names) has no place for;
        heads (fc, head) and whatever else lies beside its modules and BACKBONE_EXTRAS are no part of it."""
        modules = {name.split(".")[0] for name in taken} | set(BACKBONE_EXTRAS)
        return [self.names[k] for k in self.names if k not in taken and k.split(".")[0] in modules]

    def left_out(self, taken):
        taken = {self.names[k] for k in taken if k in self.names}
        groups = Counter()
        for name in self.tensors:
            if name in taken:
                continue
            group = next((p for p in self.others if name.startswith(p)), None)       # another copy's prefix
            if group is None:
                base = self.prefix if name.startswith(self.prefix) else ""
                rest = name[len(base):]
                group = base + rest.split(".")[0] + ("." if "." in rest else "")
            groups[group] += 1
        words = [f"{g} ({n}{', the momentum copy' if any(w in g for w in MOMENTUM_WORDS) else ''})"
                 for g, n in groups.items()]
        return ", ".join(words[:4]) + (" ..." if len(words) > 4 else "")


def find_backbone(checkpoint, path, key):
    """The backbone in a checkpoint (another library's, or train.py's 'model') -> Found. key: the container to
    read (DINO: teacher or student), by default the first of CHECKPOINT_KEYS present, else the checkpoint.

    Whatever prefix a training wrapper adds is found (module., model., encoder_q., backbone.vit., a dict
    inside the checkpoint, ...): a prefix is what precedes an ANCHORS key and leaves a whole backbone
    (`backbone_shape`) once stripped. torch.compile's _orig_mod. is dropped and timm's ViT names become
    this project's. Of several backbones the online one is taken (MOMENTUM_WORDS), then the one with the
    most tensors."""
    if key is not None and not isinstance(checkpoint.get(key), dict):
        keys = [str(k) for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
        held = (f"its keys are {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}" if keys else
                f"it holds {summary(checkpoint)} and nothing else: drop --checkpoint-key")
        raise CheckpointError(f"{path} has no {key!r}; {held}")
    key = key or next((k for k in CHECKPOINT_KEYS if isinstance(checkpoint.get(k), dict)), None)
    container = checkpoint[key] if key else checkpoint
    tensors = {k.replace("_orig_mod.", ""): v for k, v in tensors_in(container).items()}
    candidates, refusals, numbered = {}, [], {}              # prefix -> {our name: the file's name}
    for name in tensors:
        for anchor in ANCHORS:
            prefix = name[:-len(anchor)] if name.endswith(anchor) else None
            if prefix is None or (prefix and not prefix.endswith(".")) or prefix in candidates:
                continue
            children = None
            if anchor == "0.weight":                         # a numbered Sequential: which ResNet's, if any
                children = next((numbers for numbers in NUMBERED_RESNETS if all(f"{prefix}{n}.0.conv1.weight" in tensors
                                 for n, child in numbers.items() if child.startswith("layer"))), None)
                if children is None:
                    continue
            names = our_names([k for k in tensors if k.startswith(prefix)], prefix, children)
            try:
                if backbone_shape({ours: tensors[theirs] for ours, theirs in names.items()}, path) is None:
                    continue                                 # layer1.0.conv1.weight: one block, not a backbone
            except CheckpointError as error:                 # a ResNet101: a backbone this project cannot build
                refusals.append((len(names), str(error)))
                continue
            candidates[prefix], numbered[prefix] = names, children
    inside = f" of {key!r}" if key else ""
    if not candidates and refusals:
        raise CheckpointError(max(refusals)[1])
    if not candidates:
        raise CheckpointError(f"no ResNet or ViT backbone in {path}{inside}, which holds {summary(tensors)}; a "
                              f"ResNet's keys end in conv1.weight and layer1-4, a ViT's in patch_embed and blocks")
    prefix = min(candidates, key=lambda p: (any(w in p for w in MOMENTUM_WORDS), -len(candidates[p]), len(p)))
    others = sorted((p for p in candidates if p != prefix), key=len, reverse=True)
    rules = {}                     # what the layout's library builds that no tensor records
    if key == "state_dict" and prefix == "backbone." and "classifier.weight" in tensors:
        rules["stem_padding"] = 2  # solo-learn's CIFAR stem
    if numbered[prefix] is NUMBERED_RESNETS[1]:
        rules["stem_relu"] = False    # ResNetGenerator's stem ReLU is F.relu in its forward, no child: not kept
    if any(p in prefix for p in ("base_encoder.", "momentum_encoder.")):
        rules["heads"] = 12        # MoCo v3: its vits.py gives every ViT 12 heads (ViT-S: 32 channels each)
    if key in ("teacher", "student"):
        rules["positions"] = "dino"   # DINO's ViT resizes its positional grid its own way (DinoViT)
    where = (repr(prefix) if prefix else "the top level") + inside
    return Found(tensors, candidates[prefix], prefix, others, where, rules)


def tensors_in(container, prefix=""):
    """The tensors of a dict and of the dicts inside it, by dotted name: {"net": {"conv1.weight": t}} ->
    {"net.conv1.weight": t}, so that a backbone kept one level down under any name is found."""
    tensors = {}
    for key, value in container.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            tensors.update(tensors_in(value, f"{prefix}{key}."))
        elif isinstance(value, torch.nn.Module):            # a pickled model, read with --trust-pickle
            tensors.update(tensors_in(value.state_dict(), f"{prefix}{key}."))
    return tensors


def our_names(keys, prefix, children):
    """{this project's name: the file's name} for the keys under `prefix`: the prefix stripped, a numbered
    Sequential's children named (`children`: one of NUMBERED_RESNETS), Lightly's block "shortcut" called
    downsample, timm's ViT names renamed (TIMM_NAMES)."""
    names = {}
    for key in keys:
        rest = key[len(prefix):]
        if children is not None:
            child, _, tail = rest.partition(".")
            if child not in children:
                continue
            rest = f"{children[child]}.{tail}"
        rest = rest.replace(".shortcut.", ".downsample.")
        names[from_timm(rest)] = key
    return names


# Our ViT's names, and timm's (which DINO's ViT shares): the patch embedding is a bare convolution here,
# and the MLP an nn.Sequential. Every other key is the same, and so are the computations.
TIMM_NAMES = (("patch_embed.", "patch_embed.proj."), (".mlp.0.", ".mlp.fc1."), (".mlp.2.", ".mlp.fc2."))


def to_timm(state):
    """A VisionTransformer state_dict in timm's layout (loads strictly into timm's vit_tiny_patch16_224)."""
    return {_renamed(key, TIMM_NAMES): value for key, value in state.items()}


def from_timm(key):
    """A timm (or DINO) ViT key -> this project's name for it; any other key unchanged."""
    return _renamed(key, [(theirs, ours) for ours, theirs in TIMM_NAMES])


def _renamed(key, pairs):
    for old, new in pairs:
        key = key.replace(old, new)
    return key


# Where an export notes what no tensor records (a ViT's heads, a 3x3 conv1's padding, ...), so that this project
# reads it back as it was: the state_dict's own metadata, which load_state_dict reads only for module versions,
# so the file still loads strictly into torchvision and timm.
EXPORT_NOTE = "hydes_export"


def export_backbone(backbone, out_path):
    """Write a loaded backbone as a plain state_dict in the layout the field loads: torchvision's for
    ResNets, timm's for ViTs. Returns the lines of Python that load it, for its width, stem and grid (the
    README shows them)."""
    state = backbone.state_dict()
    if isinstance(backbone, VisionTransformer):
        renamed = to_timm(state)
        state.clear()
        state.update(renamed)                     # the same OrderedDict, which keeps its _metadata
        dim, depth, heads = backbone.num_features, len(backbone.blocks), backbone.blocks[0].attn.heads
        note = {"heads": heads}
        if isinstance(backbone, DinoViT):
            note["positions"] = "dino"
        size = math.isqrt(backbone.pos_embed.shape[1] - 1) * backbone.patch_size     # its own positional grid
        # a narrower or shallower ViT than ViT-Tiny says so to timm
        shape = f", embed_dim={dim}, depth={depth}, num_heads={heads}" if (dim, depth, heads) != (192, 12, 3) else ""
        how = (f'import timm, torch\nmodel = timm.create_model("vit_tiny_patch16_224", img_size={size}, '
               f'patch_size={backbone.patch_size}{shape}, num_classes=0)\n')
    else:
        width, kernel, padding = backbone.conv1.out_channels, backbone.conv1.kernel_size[0], backbone.conv1.padding[0]
        arch = "resnet18" if isinstance(backbone.layer1[0], BasicBlock) else "resnet50"
        relu = not isinstance(backbone.relu, torch.nn.Identity)
        note = {"stem_relu": relu, **({"stem_padding": padding} if kernel == 3 else {})}
        if width == 64:
            how = (f"import torch, torchvision\nmodel = torchvision.models.{arch}(); model.fc = torch.nn.Identity()\n" +
                   ("" if kernel == 7 else f"model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, {padding}, bias=False); "
                                           f"model.maxpool = torch.nn.Identity()\n"))
        else:
            blocks = "BasicBlock, [2, 2, 2, 2]" if arch == "resnet18" else "Bottleneck, [3, 4, 6, 3]"
            how = (f"# a width-{width} {arch}: torchvision's ResNets are 64 wide; load it with models.py\n"
                   f"import models, torch\nmodel = models.ResNet(models.{blocks}, width={width}, "
                   f"stem=\"{'imagenet' if kernel == 7 else 'cifar'}\")\n" +
                   (f"model.conv1.padding = ({padding}, {padding})\n" if kernel == 3 and padding != 1 else ""))
        how += "" if relu else "model.relu = torch.nn.Identity()          # no ReLU after bn1, as it was trained\n"
    state._metadata[""][EXPORT_NOTE] = note
    save_checkpoint(out_path, state, "nothing was exported")
    return how + f"model.load_state_dict(torch.load({out_path!r}))"      # a Python literal: any path pastes


def add_backbone_arguments(p):
    """The arguments that name a backbone (evaluate.py, segment.py, analyze.py)."""
    p.add_argument("checkpoint", help="a ckpt.pt from train.py, or another library's checkpoint or state_dict "
                                      "(torchvision, timm, Lightly, solo-learn, DINO, MoCo, ...)")
    p.add_argument("--arch", choices=ARCHS, help="check that the file holds this architecture (it is read from the "
                                                  "file's tensors: never needed)")
    p.add_argument("--checkpoint-key", help="which network of a checkpoint that holds several to load, e.g. teacher "
                                            "or student for DINO (default: state_dict, model or teacher, if present)")
    p.add_argument("--heads", type=int, help="a foreign ViT's attention heads, which no tensor records (default: "
                                             "12 in MoCo v3's layout, else 64 channels per head, as in timm and DINO)")
    p.add_argument("--stem-padding", type=int, choices=(1, 2), help="a 3x3 conv1's padding, which no tensor records "
                                                                     "(default: 2 in solo-learn's layout, else 1)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read a checkpoint that pickles objects, not only tensors (a whole model saved with "
                        "torch.save(model)): loading it runs code from the file, so only for a file you trust")


def backbone_argument_rules(args):
    """The checks of add_backbone_arguments' numbers, as (ok, message) rules for settings.first_problem."""
    return [(args.heads is None or 1 <= args.heads <= 64, f"--heads must lie in 1 ... 64 (got {args.heads})")]


def load_backbone_from_args(args, device="cpu", quiet=False):
    """load_backbone with add_backbone_arguments' flags."""
    return load_backbone(args.checkpoint, device, args.arch, args.checkpoint_key, args.heads, args.stem_padding,
                         quiet, args.trust_pickle)


def network_digest(path, info):
    """What the feature cache keys on: the file's bytes (not its name or date) and which of its networks
    was built how."""
    with open(path, "rb") as f:
        file_digest = hashlib.file_digest(f, "sha256").hexdigest()
    return f"{file_digest}:{hashlib.sha256(info['network'].encode()).hexdigest()[:16]}"


def add_checkpoint_arguments(p):
    """The arguments that name a backbone and the data to probe it on (evaluate.py, analyze.py)."""
    add_backbone_arguments(p)
    p.add_argument("--dataset", choices=DATASETS,
                   help="probe another dataset than the one trained on (e.g. imagenet100 for an ImageNet backbone)")
    p.add_argument("--data-dir", help="dataset root (default: the one saved in the checkpoint, else data/)")
    p.add_argument("--image-size", type=int,
                   help="evaluation resolution (default: the training crop size, else the dataset's: 32, 96, 224)")
    p.add_argument("--method", help="name for the table's method column (default: HyDeS or Supervised "
                                     "for our checkpoints, the file name for another library's)")
    p.add_argument("--cache-dir", help="feature cache (default: features/ beside the checkpoint)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--device", type=device_argument, default=default_device(), help="cpu, cuda, cuda:N or mps")


def parse_checkpoint_arguments(parser, argv):
    """parser.parse_args, then the defaults that follow the checkpoint's folder (the feature cache)."""
    args = parser.parse_args(argv)
    args.cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "features")
    return args


def checkpoint_argument_rules(args):
    """The checks of add_checkpoint_arguments' numbers, as (ok, message) rules for settings.first_problem."""
    return [*backbone_argument_rules(args),
            (args.image_size is None or 8 <= args.image_size <= 1024,
             f"--image-size must lie in 8 ... 1024 px (got {args.image_size})"),
            (args.workers >= 0, f"--workers must be >= 0 (got {args.workers})")]


def load_for_probing(args, device):
    """(backbone, info, dataset, data_dir, image_size) from add_checkpoint_arguments' flags: what is not given
    comes from the checkpoint's training arguments, else (another library's checkpoint) from the dataset."""
    backbone, info = load_backbone_from_args(args, device)
    trained = info["train_args"] or {}
    dataset = args.dataset or trained.get("dataset")
    if dataset is None:
        raise CheckpointError(f"{args.checkpoint} is another library's checkpoint, which names no dataset; pass "
                              f"--dataset and --data-dir")
    data_dir = args.data_dir or trained.get("data_dir", "data")
    info["image_size"] = args.image_size or info["image_size"] or native_image_size(dataset, data_dir)
    info["method"] = args.method or info["method"]
    return backbone, info, dataset, data_dir, info["image_size"]
