"""The loss on the sphere, in pictures (Section III): what Eq. (2) and Eq. (3) do to points on S^2.

    python sphere.py                                   # sphere.png: kappa 1 and 10, four steps each
    python sphere.py --kappa 1 10 20 --steps 0 50 200 1000 --images 8 --views 4

No network and no data: B images with V views each are V*B free unit vectors in 3-D (D = 3, the sphere
S^2), all drawn uniformly at random, then moved by Adam on hydes.hydes_loss alone (Eq. 4, alpha = beta =
1). Minimising beta H_local gathers each image's views (Eq. 3: the density of an image's other views
around each view grows); maximising alpha H_global spreads all the points (Eq. 2: the density of the
whole batch flattens). The picture shows both at work, and how kappa, the inverse bandwidth of the
kernel, sets the balance. A broad kernel (kappa = 1) sees the whole sphere: each image's views gather
into one point and the images spread as far apart as they can (4 images: a tetrahedron). A sharp kernel
(kappa = 10) sees only near neighbours: every view gathers with a few views of its image, but an image
may end as several small clusters spread over the sphere, for Eq. (3) then cannot tell that they belong
together, and Eq. (2) gains from more, smaller clusters. (So on 6-8 images here; test_hydes.py checks
both on 4.)

Each panel is the sphere at one step, seen as two orthographic hemispheres: the front (z >= 0) as seen
from +z, and the back (z < 0) as seen from -z, so each point appears once; a colour per image. Above each
panel: H_global, H_local and MI = H_global - H_local in nats, against the estimate's ceiling
log((N - 1)/(V - 1)) (hydes.mi_ceiling): how far the images can be told apart by this kernel. A uniform
density on S^2 has entropy log(4 pi) = 2.53 nats: H_global's value at step 0, up to the bias of a
leave-one-out estimate from so few points, which a sharp kernel makes larger.
"""

import argparse
import math

import torch
import torch.nn.functional as F

from analyze import MissingExtra, plotting, save_figure
from hydes import hydes_loss, mi_ceiling
from settings import (HelpFormatter, first_problem, numbers_are_finite, refuse, replaces_a_file, seed_rule,
                      unwritable_file)


# ----------------------------------------------------------------------------------------------------
# The points, moved by the loss alone

def descend(images=6, views=8, kappa=1.0, steps=(0, 20, 100, 500), lr=0.02, seed=0):
    """B = images images of V = views views as unit vectors in 3-D, uniform at first, moved by Adam on
    hydes_loss. Returns one snapshot per step of `steps`: dict of z (V, B, 3) and the loss's terms."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(views, images, 3, generator=generator, dtype=torch.float64)  # (V, B, 3), any norm
    points.requires_grad_()
    optimizer = torch.optim.Adam([points], lr=lr)
    snapshots = []
    for step in range(max(steps) + 1):
        z = F.normalize(points, dim=-1)          # (V, B, 3) on S^2: the direction is all that counts
        terms = hydes_loss(z, kappa)             # float32 inside, as in training
        if step in steps:
            snapshots.append({"step": step, "z": z.detach().clone(),
                              **{k: float(v.detach()) for k, v in terms.items()}})
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    return snapshots


# ----------------------------------------------------------------------------------------------------
# The drawing

def hemispheres(z):
    """Where each point of z (..., 3) is drawn: the front hemisphere (z >= 0) as seen from +z (x to the right,
    y up) and the back (z < 0) as seen from -z (its mirror image: -x to the right), so each point appears
    once. -> (front (M, 2), back (K, 2), and the mask of the front points, (...))."""
    front = z[..., 2] >= 0
    return z[front][:, :2], z[~front][:, :2] * torch.tensor([-1.0, 1.0], dtype=z.dtype), front


def draw_figure(runs, path):
    """runs: {kappa: snapshots} -> one PNG, a row per kappa, a panel per snapshot: its two hemispheres as
    discs, the points in their images' colours (matplotlib's C0, C1, ...), the entropies above."""
    rows, columns = len(runs), max(len(snapshots) for snapshots in runs.values())
    figure = plotting().figure.Figure(figsize=(3.2 * columns, 2.2 * rows))
    axes = figure.subplots(rows, 2 * columns, squeeze=False)
    for row, (kappa, snapshots) in enumerate(runs.items()):
        views, images, _ = snapshots[0]["z"].shape                          # z (V, B, 3)
        ceiling = mi_ceiling(views, views * images)
        image_of = torch.arange(images).expand(views, images)               # (V, B): each point's image
        axes[row, 0].set_ylabel(f"kappa = {kappa:g}")
        for column, snapshot in enumerate(snapshots):
            front, back, is_front = hemispheres(snapshot["z"])
            discs = ((front, image_of[is_front]), (back, image_of[~is_front]))
            for disc, (points, images_drawn) in enumerate(discs):
                ax = axes[row, 2 * column + disc]
                ax.add_patch(plotting().patches.Circle((0, 0), 1, facecolor="0.98", edgecolor="0.6"))
                ax.scatter(points[:, 0], points[:, 1], s=9, c=[f"C{i % 10}" for i in images_drawn.tolist()])
                ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), aspect="equal", xticks=[], yticks=[],
                       xlabel=("front", "back")[disc])
            axes[row, 2 * column].set_title(
                f"step {snapshot['step']}: H_global {snapshot['h_global']:.2f}  H_local {snapshot['h_local']:.2f}\n"
                f"MI {snapshot['mi']:.2f} of ceiling {ceiling:.2f} ({snapshot['mi'] / ceiling:.0%})",
                loc="left", fontsize=8)
    save_figure(figure, path)
    return figure


# ----------------------------------------------------------------------------------------------------
# The script

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--kappa", type=float, nargs="+", default=[1.0, 10.0], help="one row of panels per kappa")
    p.add_argument("--steps", type=int, nargs="+", default=[0, 20, 100, 500], help="the steps drawn, one panel each")
    p.add_argument("--images", type=int, default=6,
                   help="B, images in the batch (a colour each, matplotlib's ten in turn)")
    p.add_argument("--views", type=int, default=8, help="V, views of each image (the paper's multi-crop: 8)")
    p.add_argument("--lr", type=float, default=0.02, help="Adam's learning rate on the points")
    p.add_argument("--seed", type=int, default=0, help="fixes the starting points")
    p.add_argument("--out", default="sphere.png", help="PNG file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def check_args(args):
    return first_problem([
        (all(k > 0 and math.isfinite(k) for k in args.kappa), "--kappa values must be finite and > 0"),
        (all(s >= 0 for s in args.steps) and max(args.steps) <= 100_000, "--steps must lie in 0 ... 100000"),
        (args.images >= 2 and args.views >= 2, "--images and --views must be >= 2: Eq. 2 compares images, "
                                               "Eq. 3 views"),
        (args.images * args.views <= 10_000, "--images times --views must be at most 10000 points"),
        numbers_are_finite(args, ("lr",)),
        (args.lr > 0, "--lr must be > 0"),
        seed_rule(args.seed),
    ]) or replaces_a_file(args.out, "--out", args.force) or unwritable_file(args.out, "--out")


def main(argv=None):
    args = parse_args(argv)
    refuse(check_args(args))
    try:
        plotting()
    except MissingExtra as error:
        raise SystemExit(f"error: {error}")
    steps = sorted(set(args.steps))
    runs = {kappa: descend(args.images, args.views, kappa, steps, args.lr, args.seed) for kappa in args.kappa}
    draw_figure(runs, args.out)
    ceiling = mi_ceiling(args.views, args.views * args.images)
    for kappa, snapshots in runs.items():
        for s in snapshots:
            print(f"kappa {kappa:g} step {s['step']}: H_global {s['h_global']:.3f} H_local {s['h_local']:.3f} "
                  f"MI {s['mi']:.3f} (ceiling {ceiling:.3f})")
    print(f"wrote {args.out}")
    return runs


if __name__ == "__main__":
    main()
