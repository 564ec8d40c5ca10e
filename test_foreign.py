"""Tests of loading checkpoint files (issue 34): files that are no checkpoint, named in one line; other
libraries' checkpoints built as their libraries lay them out (timm's own constructors; Lightly, solo-learn,
DINO and MoCo v3 rebuilt by hand from their sources' naming), each compared with the library's own network
or a hand-written reference of it, or refused in one line; our own exports read back as they were written.
To be merged into test_hydes.py.

Run: python -m pytest -q test_foreign.py (timm's tests skip without timm).
"""

import gzip
import io
import json
import math
import os
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import analyze
import checkpoints
import evaluate
import models
import segment
import train

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# ----------------------------------------------------------------------------------------------------
# Helpers (as in test_hydes.py)

def with_random_statistics(net, seed=0):
    """`net` with its BatchNorm statistics and affine weights and its LayerNorm weights randomised, so that a
    load that drops or misplaces them shows in the features."""
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and module.weight is not None:
            module.weight.data.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return net.eval()


def under(prefix, state):
    return {f"{prefix}{k}": v for k, v in state.items()}


def one_line(error, path, limit=300):
    """The message of a refusal, checked to be one line of at most `limit` characters (the file's path
    counted as FILE)."""
    text = str(error.value).replace(str(path), "FILE")
    assert "\n" not in text and len(text) <= limit, (len(text), text)
    return text


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


def lightly_numbered(state):
    """This project's CIFAR ResNet's names -> those of Lightly's benchmarks' backbone,
    nn.Sequential(*list(ResNetGenerator(...).children())[:-1], nn.AdaptiveAvgPool2d(1)): 0 conv1, 1 bn1,
    2-5 layer1-4, the blocks' downsample called shortcut (lightly/models/resnet.py)."""
    numbers = {"conv1": "0", "bn1": "1", "layer1": "2", "layer2": "3", "layer3": "4", "layer4": "5"}
    return {f"{numbers[k.split('.')[0]]}.{k.split('.', 1)[1]}".replace(".downsample.", ".shortcut."): v
            for k, v in state.items()}


def lightly_benchmark_forward(net):
    """What Lightly's benchmark backbone computes with ResNetGenerator's children: conv1, bn1 (no ReLU:
    ResNetGenerator.forward applies it as F.relu, which children() does not keep), layer1-4, the pool."""
    return torch.nn.Sequential(net.conv1, net.bn1, net.layer1, net.layer2, net.layer3, net.layer4,
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


def timm_vit(**kwargs):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    settings = {"img_size": 32, "patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 2, "num_classes": 0,
                **kwargs}
    return with_random_statistics(timm.models.vision_transformer.VisionTransformer(**settings))


def export_and_reread(path, tmp_path, capsys, **flags):
    """evaluate.py --export of `path`, then the export loaded back: (backbone, printed line, export lines)."""
    out = tmp_path / f"exported-{os.path.basename(path)}.pth"
    evaluate.main([str(path), "--export", str(out)])
    lines = capsys.readouterr().out
    backbone, _ = checkpoints.load_backbone(out, **flags)
    return backbone, capsys.readouterr().out, lines


# ----------------------------------------------------------------------------------------------------
# Files that are no checkpoint: named in one line, with what to do

@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_files_that_are_no_checkpoint_say_what_they_are_in_one_line(tmp_path):
    state = models.build_backbone("resnet18", 32, width=8).state_dict()
    whole, legacy = io.BytesIO(), io.BytesIO()
    torch.save(state, whole)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(tmp_path / "zipped.zip", "w") as archive:
        archive.writestr("ckpt.pt", whole.getvalue())
    files = {   # file: (bytes, what the message must say)
        "empty.pth": (b"", r"is empty, 0 bytes \(an interrupted copy\?\)"),
        "notes.pth": (b"epoch 10: loss 3.2\n", r"is a text file, not a checkpoint \(it begins 'epoch 10: loss 3.2'\)"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 46830571\n",
                    r"is a Git LFS pointer, not the weights; run git lfs pull"),
        "page.pth": (b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n",
                     r"is an HTML page, not a checkpoint"),
        "config.json": (json.dumps({"arch": "resnet18"}).encode(), r"is a JSON file, not a checkpoint"),
        "model.pth.gz": (gzip.compress(whole.getvalue()), r"is gzip-compressed; decompress it \(gunzip\)"),
        "cut.pth": (whole.getvalue()[:len(whole.getvalue()) // 2], r"cut short \(an interrupted download or copy\?\)"),
        "cut-legacy.pth": (legacy.getvalue()[:len(legacy.getvalue()) // 2], r"cut short"),
        "cut-legacy-start.pth": (legacy.getvalue()[:100], r"cut short"),
        "zipped.zip": ((tmp_path / "zipped.zip").read_bytes(), r"is a zip archive, not a PyTorch file; unzip it"),
        "binary.bin": (bytes(range(256)), r"is not a PyTorch file \(it begins with the bytes 00 01 02"),
    }
    for name, (content, message) in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(checkpoints.CheckpointError, match=message) as error:
            checkpoints.load_backbone(tmp_path / name)
        one_line(error, tmp_path / name, 160)
    scripted = torch.jit.script(torch.nn.Conv2d(3, 4, 3))
    torch.jit.save(scripted, tmp_path / "scripted.pt")
    with pytest.raises(checkpoints.CheckpointError, match="is a TorchScript archive .torch.jit.save.; torch.jit.load"):
        checkpoints.load_backbone(tmp_path / "scripted.pt")


def test_an_empty_checkpoint_is_one_line_in_all_four_scripts(tmp_path):
    # It raised IndexError inside safe_load's own error handler (the message of torch's error was empty)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"")
    empty = str(tmp_path / "run" / "ckpt.pt")
    for main, argv in ((train.main, ["--out", str(tmp_path / "run"), "--resume"]),
                       (evaluate.main, [empty]), (analyze.main, [empty]),
                       (segment.main, [empty, "--data-dir", str(tmp_path)])):
        with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt is empty, 0 bytes \(an interrupted copy\?\)"):
            main(argv)


# ----------------------------------------------------------------------------------------------------
# Safe loading that still loads: numpy scalars; a pickled model only when trusted

def test_numpy_scalars_load_and_a_pickled_model_is_refused_in_one_line_unless_trusted(tmp_path, capsys,
                                                                                          monkeypatch):
    net = with_random_statistics(torchvision.models.resnet18())
    # torchvision's ImageNet reference script: best_acc1 a numpy scalar (a float64 or a 0-d tensor's .item())
    torch.save({"state_dict": net.state_dict(), "best_acc1": np.float64(71.3), "epoch": np.int64(90),
                "dtype": np.dtype("float32"), "arch": "resnet18"}, tmp_path / "imagenet.pth.tar")
    loaded, _ = checkpoints.load_backbone(tmp_path / "imagenet.pth.tar")
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(loaded(x), net(x), atol=1e-5)

    torch.save(net, tmp_path / "whole.pth")                         # torch.save(model): a pickled ResNet
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load_backbone(tmp_path / "whole.pth")
    assert "holds a pickled torchvision.models.resnet.ResNet" in one_line(error, tmp_path / "whole.pth")
    assert "refused unread" in str(error.value) and "pass --trust-pickle if you trust the file" in str(error.value)
    trusted, _ = checkpoints.load_backbone(tmp_path / "whole.pth", trust_pickle=True)
    assert torch.allclose(trusted(x), net(x), atol=1e-5)
    torch.save({"model": net, "epoch": 3}, tmp_path / "inside.pth")       # a model inside a dict
    trusted, _ = checkpoints.load_backbone(tmp_path / "inside.pth", trust_pickle=True)
    assert torch.allclose(trusted(x), net(x), atol=1e-5)
    capsys.readouterr()
    evaluate.main([str(tmp_path / "whole.pth"), "--trust-pickle", "--export", str(tmp_path / "exported.pth")])
    assert "whole.pth: a resnet18 (width 64, ImageNet stem)" in capsys.readouterr().out     # the flag, end to end

    # Trusted, but its class exists only where it was saved: one line, not a traceback
    module = types.ModuleType("gone_module")
    module.Net = type("Net", (torch.nn.Module,), {"__module__": "gone_module"})
    monkeypatch.setitem(sys.modules, "gone_module", module)
    torch.save(module.Net(), tmp_path / "gone.pth")
    monkeypatch.delitem(sys.modules, "gone_module")
    with pytest.raises(checkpoints.CheckpointError, match=r"pickles a class that cannot be imported here \(No module "
                                                          r"named 'gone_module'\); load it where its code is"):
        checkpoints.load_backbone(tmp_path / "gone.pth", trust_pickle=True)


# ----------------------------------------------------------------------------------------------------
# A backbone tensor is never left out: LayerScale, qk-norm, SE are refused, heads are left out

@pytest.mark.parametrize("kwargs, named", [({"init_values": 0.1}, "blocks.0.ls1.gamma"),
                                           ({"qk_norm": True}, "blocks.0.attn.q_norm.weight")])
def test_backbone_tensors_our_vit_has_no_place_for_are_refused_in_one_line(tmp_path, kwargs, named):
    torch.save(timm_vit(**kwargs).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(checkpoints.CheckpointError, match="tensors of its backbone that this project's vit_tiny has no "
                                                          r"place for \(" + named.replace(".", r"\.")) as error:
        checkpoints.load_backbone(tmp_path / "vit.pth")
    assert "probe it with the library that made it" in one_line(error, tmp_path / "vit.pth")


def test_a_timm_vit_with_its_classifier_loads_exactly_and_the_head_is_left_out(tmp_path, capsys):
    net = timm_vit()
    state = {**net.state_dict(), "head.weight": torch.randn(10, 128), "head.bias": torch.zeros(10)}
    torch.save(state, tmp_path / "vit.pth")
    loaded, _ = checkpoints.load_backbone(tmp_path / "vit.pth")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), net(x), atol=1e-5)
    assert "left out head. (2)" in capsys.readouterr().out


def test_a_resnet_block_with_more_than_ours_is_refused(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["layer2.0.se.fc1.weight"] = torch.randn(8, 128, 1, 1)               # squeeze-and-excitation
    torch.save(state, tmp_path / "seresnet.pth")
    with pytest.raises(checkpoints.CheckpointError, match=r"1 tensors of its backbone .* \(layer2\.0\.se\.fc1\."):
        checkpoints.load_backbone(tmp_path / "seresnet.pth")


# ----------------------------------------------------------------------------------------------------
# The network as it was trained: Lightly's benchmarks, SplitBatchNorm

@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_lightlys_benchmark_backbone_is_built_without_the_relu_that_its_children_lack(tmp_path, capsys, arch):
    net = with_random_statistics(models.build_backbone(arch, 32, width=8, stem="cifar"))
    torch.save({"state_dict": {**under("backbone.", lightly_numbered(net.state_dict())),
                               "projection_head.layers.0.weight": torch.randn(8, 8)}}, tmp_path / "lightly.ckpt")
    x = torch.randn(2, 3, 32, 32)
    loaded, _ = checkpoints.load_backbone(tmp_path / "lightly.ckpt")
    assert torch.allclose(loaded(x), lightly_benchmark_forward(net)(x), atol=1e-5)
    assert relative_difference(net(x), lightly_benchmark_forward(net)(x)) > 1e-2      # the ReLU matters
    assert f"a {arch} (width 8, CIFAR stem padded by 1, no ReLU after bn1)" in capsys.readouterr().out
    # ResNetGenerator's own names, not numbered: its forward has the ReLU (F.relu), and so does the network built
    named = {k.replace(".downsample.", ".shortcut."): v for k, v in net.state_dict().items()}
    torch.save(named, tmp_path / "generator.pth")
    assert torch.allclose(checkpoints.load_backbone(tmp_path / "generator.pth")[0](x), net(x), atol=1e-5)


class SplitBatchNorm(torch.nn.BatchNorm2d):
    """lightly/models/batchnorm.py's SplitBatchNorm: statistics kept per split (num_splits x C), collated
    into their mean when the module goes from train to eval mode, whose forward uses the first C."""

    def __init__(self, num_features, num_splits):
        super().__init__(num_features)
        self.num_splits = num_splits
        self.register_buffer("running_mean", torch.zeros(num_features * num_splits))
        self.register_buffer("running_var", torch.ones(num_features * num_splits))

    def train(self, mode=True):
        if self.training is True and mode is False:
            self.running_mean = self.running_mean.view(self.num_splits, self.num_features).mean(0).repeat(
                self.num_splits)
            self.running_var = self.running_var.view(self.num_splits, self.num_features).mean(0).repeat(
                self.num_splits)
        return super().train(mode)

    def forward(self, x):
        assert not self.training
        return F.batch_norm(x, self.running_mean[:self.num_features], self.running_var[:self.num_features],
                            self.weight, self.bias, False, self.momentum, self.eps)


def test_lightlys_split_batchnorm_loads_with_its_statistics_averaged_as_its_eval_mode_does(tmp_path, capsys):
    net = with_random_statistics(models.build_backbone("resnet18", 32, width=8, stem="cifar")).train()
    generator = torch.Generator().manual_seed(1)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                split = SplitBatchNorm(child.num_features, 8)
                split.weight.data.copy_(child.weight)
                split.bias.data.copy_(child.bias)
                split.running_mean.copy_(torch.randn(8 * child.num_features, generator=generator) * 0.1)
                split.running_var.copy_(torch.rand(8 * child.num_features, generator=generator) + 0.5)
                setattr(parent, name, split)
    torch.save({"state_dict": under("backbone.", lightly_numbered(net.state_dict()))}, tmp_path / "split.ckpt")
    x = torch.randn(2, 3, 32, 32)
    reference = lightly_benchmark_forward(net.eval())             # eval(): SplitBatchNorm collates its splits
    loaded, _ = checkpoints.load_backbone(tmp_path / "split.ckpt")
    assert torch.allclose(loaded(x), reference(x), atol=1e-5)
    assert "BatchNorm statistics of 8 splits averaged (Lightly's SplitBatchNorm" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Heads and positions: the layout's library's rule, or the assumption named

def test_moco_v3_vits_have_its_12_heads_and_an_assumed_head_count_is_named(tmp_path, capsys):
    online, momentum = timm_vit(embed_dim=96, num_heads=12), timm_vit(embed_dim=96, num_heads=12)
    torch.save({"state_dict": {**under("module.base_encoder.", online.state_dict()),   # moco-v3's main_moco.py
                               **under("module.momentum_encoder.", momentum.state_dict()),
                               "module.predictor.0.weight": torch.randn(8, 8)}}, tmp_path / "mocov3.pth.tar")
    x = torch.randn(2, 3, 32, 32)
    loaded, _ = checkpoints.load_backbone(tmp_path / "mocov3.pth.tar")
    assert loaded.blocks[0].attn.heads == 12 and torch.allclose(loaded(x), online(x), atol=1e-5)
    assert "assumed" not in capsys.readouterr().out
    # A bare ViT: 64 channels per head assumed, and said, with the flag that says otherwise
    net = timm_vit(embed_dim=128, num_heads=4)
    torch.save(net.state_dict(), tmp_path / "vit.pth")
    checkpoints.load_backbone(tmp_path / "vit.pth")
    assert "2 heads assumed (64 channels each, as in timm and DINO): pass --heads if not" in capsys.readouterr().out
    told, _ = checkpoints.load_backbone(tmp_path / "vit.pth", heads=4)
    assert torch.allclose(told(x), net(x), atol=1e-5) and "assumed" not in capsys.readouterr().out


def dino_interpolate_pos_encoding(pos_embed, patch_size, x, w, h):
    """facebookresearch/dino vision_transformer.py's VisionTransformer.interpolate_pos_encoding, verbatim
    but for `self`."""
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def dino_forward(net, x):
    """DINO's VisionTransformer.forward (prepare_tokens, blocks, norm, CLS) with a timm ViT's modules."""
    B, nc, w, h = x.shape
    tokens = net.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat((net.cls_token.expand(B, -1, -1), tokens), dim=1)
    tokens = tokens + dino_interpolate_pos_encoding(net.pos_embed, 16, tokens, w, h)
    return net.norm(net.blocks(tokens))[:, 0]


def test_a_dino_vit_at_another_size_resizes_its_positions_as_dino_does(tmp_path, capsys):
    net = timm_vit(img_size=64, patch_size=16)                  # a 4x4 grid, probed on 6x6 and 2x3
    torch.save({"teacher": {**under("backbone.", net.state_dict()), "head.last_layer.weight_g": torch.ones(1, 8)},
                "student": under("module.backbone.", net.state_dict()), "epoch": 100}, tmp_path / "dino.pth")
    loaded, _ = checkpoints.load_backbone(tmp_path / "dino.pth")
    assert "4x4 grid resized as DINO does" in capsys.readouterr().out
    for side in ((64, 64), (96, 96), (32, 48)):
        x = torch.randn(2, 3, *side)
        assert torch.allclose(loaded(x), dino_forward(net, x), atol=1e-5), side
    x = torch.randn(2, 3, 96, 96)
    ours = models.VisionTransformer(64, 16, 128, 2, 2).eval()
    ours.load_state_dict(loaded.state_dict())
    assert relative_difference(ours(x), dino_forward(net, x)) > 1e-4             # the rules do differ


# ----------------------------------------------------------------------------------------------------
# Our own exports read back as they were written

def test_exports_read_back_with_what_no_tensor_records(tmp_path, capsys):
    x = torch.randn(2, 3, 32, 32)
    # solo-learn: conv1 padded by 2
    solo = torchvision.models.resnet18()
    solo.fc, solo.maxpool = torch.nn.Identity(), torch.nn.Identity()
    solo.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 2, bias=False)
    solo = with_random_statistics(solo)
    torch.save({"state_dict": {**under("backbone.", solo.state_dict()), "classifier.weight": torch.randn(10, 512),
                               "classifier.bias": torch.zeros(10)}}, tmp_path / "solo.ckpt")
    again, line, _ = export_and_reread(tmp_path / "solo.ckpt", tmp_path, capsys)
    assert torch.allclose(again(x), solo(x), atol=1e-5) and "CIFAR stem padded by 2" in line
    # Lightly's benchmark: no ReLU after bn1, in the file and in the printed lines
    net = with_random_statistics(models.build_backbone("resnet18", 32, width=8, stem="cifar"))
    torch.save({"state_dict": under("backbone.", lightly_numbered(net.state_dict()))}, tmp_path / "lightly.ckpt")
    again, _, lines = export_and_reread(tmp_path / "lightly.ckpt", tmp_path, capsys)
    space = {}
    exec(lines, space)
    reference = lightly_benchmark_forward(net)(x)
    assert torch.allclose(space["model"].eval()(x), reference, atol=1e-5)
    assert torch.allclose(again(x), reference, atol=1e-5)
    # MoCo v3's 12 heads; the export loads strictly into timm, and a contradicting flag is refused
    online = timm_vit(embed_dim=96, num_heads=12)
    torch.save({"state_dict": under("module.base_encoder.", online.state_dict())}, tmp_path / "mocov3.pth.tar")
    again, line, lines = export_and_reread(tmp_path / "mocov3.pth.tar", tmp_path, capsys)
    assert torch.allclose(again(x), online(x), atol=1e-5) and "12 heads" in line and "assumed" not in line
    space = {}
    exec(lines, space)                                                        # timm's, strictly
    assert torch.allclose(space["model"].eval()(x), online(x), atol=1e-5)
    with pytest.raises(checkpoints.CheckpointError, match="--heads 6, but .* was written by this project with 12; "
                                                          "drop --heads"):
        checkpoints.load_backbone(tmp_path / "exported-mocov3.pth.tar.pth", heads=6)
    # DINO's resize of the positions
    dino = timm_vit(img_size=64, patch_size=16)
    torch.save({"teacher": under("backbone.", dino.state_dict())}, tmp_path / "dino.pth")
    again, line, _ = export_and_reread(tmp_path / "dino.pth", tmp_path, capsys)
    x = torch.randn(2, 3, 96, 96)
    assert torch.allclose(again(x), dino_forward(dino, x), atol=1e-5) and "resized as DINO does" in line


# ----------------------------------------------------------------------------------------------------
# Files that are not what they seem; flags that do not apply; a built line for every file

def test_hand_rolled_checkpoints_with_model_and_args_are_read_as_the_foreign_files_they_are(tmp_path):
    net = with_random_statistics(torchvision.models.resnet18())
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    hand_rolled = {   # a common training script's: vars(args) beside the model, backbone under backbone. or not
        "backbone.pth": {"model": under("backbone.", net.state_dict()), "args": {"arch": "resnet18", "lr": 0.1,
                                                                                 "method": "simclr"}, "epoch": 100},
        "plain.pth": {"model": net.state_dict(), "args": {"lr": 0.1}},
    }
    for name, checkpoint in hand_rolled.items():
        torch.save(checkpoint, tmp_path / name)
        loaded, info = checkpoints.load_backbone(tmp_path / name)
        assert torch.allclose(loaded(x), net(x), atol=1e-5) and info["train_args"] is None, name


def test_checkpoint_key_on_a_bare_state_dict_says_so_briefly(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(checkpoints.CheckpointError, match="has no 'student'; it holds 320 tensors: .* and nothing "
                                                          "else: drop --checkpoint-key") as error:
        checkpoints.load_backbone(tmp_path / "resnet50.pth", checkpoint_key="student")
    one_line(error, tmp_path / "resnet50.pth", 200)


def test_flags_that_do_not_apply_to_the_files_network_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet.pth")
    torch.save(checkpoints.to_timm(models.build_backbone("vit_tiny", 32, depth=1).state_dict()), tmp_path / "vit.pth")
    cases = [("resnet.pth", {"heads": 4}, r"--heads applies to a ViT, and .* holds a resnet18 .*; drop --heads"),
             ("vit.pth", {"stem_padding": 2}, r"--stem-padding applies to a 3x3 conv1, and .*vit.pth holds a vit_tiny "
                                              r".*; drop --stem-padding")]
    for name, flags, message in cases:
        with pytest.raises(checkpoints.CheckpointError, match=message) as error:
            checkpoints.load_backbone(tmp_path / name, **flags)
        one_line(error, tmp_path / name)


def test_evaluate_prints_what_was_built_for_our_own_checkpoints_too(tmp_path, capsys):
    backbone = with_random_statistics(models.build_backbone("resnet18", 32, 8, stem="cifar"))
    args = {"arch": "resnet18", "global_size": 32, "width": 8, "depth": None, "heads": None, "method": "hydes",
            "stem": "cifar", "dataset": "folder", "data_dir": str(tmp_path / "images")}
    projector = {"projector.0.weight": torch.randn(16, 64)}
    torch.save({"args": args, "epoch": 2, "model": {**under("backbone.", backbone.state_dict()), **projector}},
               tmp_path / "ckpt.pt")
    for split, count in (("train", 4), ("test", 2)):
        for cls, colour in (("a", 40), ("b", 200)):
            os.makedirs(tmp_path / "images" / split / cls)
            for i in range(count):
                Image.fromarray(np.full((32, 32, 3), colour + i, np.uint8)).save(tmp_path / "images" / split / cls /
                                                                                 f"{i}.png")
    capsys.readouterr()
    evaluate.main([str(tmp_path / "ckpt.pt"), "--probe", "knn", "--workers", "0", "--knn-k", "2"])
    assert (f"{tmp_path / 'ckpt.pt'}: a resnet18 (width 8, CIFAR stem padded by 1), 120 tensors from 'backbone.' of "
            f"'model'; left out projector. (1)") in capsys.readouterr().out
