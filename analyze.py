"""What the representation looks like: the measurements of Section VI (Tables III and IV, Figs. 2, 3, 5).

    python analyze.py runs/cifar10-resnet18-kappa1/ckpt.pt --out analysis/
    python analyze.py resnet50.pth --dataset imagenet --data-dir /path/to/imagenet --table3 t3.md
    python analyze.py curves runs/kappa0.1 runs/kappa1 runs/kappa10 --out fig7.png     # Figs. 6-8

For the checkpoint's dataset (or --dataset), on the frozen backbone's features of the labelled test split
(extracted once in float32 and cached, shared with evaluate.py where its features are float32), it reports:

  Table III (geometry, Section VI-B)  anisotropy, feature correlation, centre vector norm, centroid rank,
                                      embedding rank, d', mean +- std pairwise angle over all pairs and
                                      over positive pairs
  Table IV (semantics, Section VI-C)  Spearman correlation of the class centroids' similarities with
                                      WordNet's Wu-Palmer and Leacock-Chodorow similarities, the
                                      cophenetic correlation against WordNet, and Spearman with the
                                      similarities of the class names under all-MiniLM-L6-v2
  Fig. 5                              centroids.png: the class-centroid cosine-similarity matrix, classes
                                      in WordNet order where known
  Figs. 2 and 3                       saliency.png: per image, the input beside its heat map (ResNet:
                                      SmoothGrad-CAM over all stages; ViT: CLS-to-patch attention
                                      averaged over heads and blocks)

Anisotropy, embedding rank and correlation follow the code that the paper cites (Kalapos & Gyires-Tóth
2024; the notes above `anisotropy`); the other columns, which the paper names without defining, are ours.

Optional extras, imported only where needed: nltk with WordNet for the WordNet columns and the WordNet
ordering of the heat map (pip install nltk && python -m nltk.downloader wordnet), sentence-transformers
for the MiniLM column (pip install sentence-transformers), matplotlib for the pictures (pip install
matplotlib). Without them the other measurements are still written and what was skipped is named.

`analyze.py curves RUN ...` (Figs. 6-8) draws a metric of each run's log.jsonl per epoch, one labelled line
per run, in one PNG.

Output in --out (default analysis/ beside the checkpoint): analyze.jsonl (one JSON line per run, appended),
centroids.png, saliency.png; Tables III and IV rows on stdout and, with --table3/--table4, appended to
Markdown files that several runs share.
"""

import argparse
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from backbones import (add_checkpoint_arguments, checkpoint_argument_rules, load_for_probing, network_digest,
                       parse_checkpoint_arguments)
from checkpoints import CheckpointError, keep_results, read_jsonl, write_atomically
from data import (GLOBAL_SCALE, DatasetError, dataset_split, default_crop_sizes, dino_recipes, multi_crop,
                  eval_transform, save_png, unnormalize)
from loading import cached_features, extract_features
from models import VisionTransformer
from settings import (HelpFormatter, ctrl_c_in_one_line, error_message, first_problem, refuse,
                      replaces_a_file, seed_rule, unwritable, unwritable_file)


# ----------------------------------------------------------------------------------------------------
# Geometry (Table III, Section VI-B)
#
# Legend: N features f_i, the raw backbone output (pooled, neither centred nor normalised), rows of the
# matrix X (N, F); sigma_1 >= sigma_2 >= ... its singular values; z_i = f_i / |f_i| on the sphere; C classes
# with centroids mu_c = mean of the z_i of class c, (C, F); s_ij = z_i . z_j the cosine similarity.
#
# Whose definitions. The paper measures with the evaluation setup of Kalapos & Gyires-Tóth 2024 (its
# [19]), whose code (github.com/kaland313/SSL-Whitening, pretrain/metrics.py: eval_feature_descriptors
# and compute_feature_descriptors) defines three of Table III's columns: `anisotropy`, `rank` (the
# paper's "Embed. Rank") and `correlation`. Read from that file:
#   - what is measured: the pooled backbone features of every image of the held-out split (the whole
#     validation set, backbone in eval mode, no gradient), raw: not normalised, not centred;
#   - anisotropy = sigma_1^2 / sum_k sigma_k^2 of that raw matrix;
#   - rank = the number of its singular values above 0.1, an absolute tolerance (torch.matrix_rank with
#     tol=0.1, which applies no relative tolerance; torch.linalg.matrix_rank(X, atol=0.1, rtol=0) today);
#   - correlation = the mean |Pearson correlation| over the F(F-1) ordered pairs of different dimensions.
# Where we differ, and why: (i) that file's images are resized to the input size and normalised, with no
# centre crop; ours go through data.eval_transform, so that the probes' cached features serve here too
# (the same at CIFAR's and STL-10's native sizes; a 224 centre crop for ImageNet-sized data). (ii) It
# computes in float32; we compute in float64 from the float32 features, which changes the numbers only by
# rounding. (iii) A constant dimension (a dead ReLU channel) has no Pearson correlation (0/0): that
# file's main value then turns into -1, and its "nan-safe" value counts the dimension's pairs as 0 while
# keeping F(F-1) in the denominator; we compute the latter, which is the former whenever no dimension is
# constant, and report how many dimensions were constant. (iv) It calls torch.matrix_rank, deprecated in
# PyTorch 1.9 and since removed: on today's PyTorch its try/except reports a rank of -1 (its container: 1.10).
#
# The other columns of Table III (CVN, centroid rank, d', the angles) are not in that file: their
# definitions are ours, each stated with its reference beside the code. Which rank the paper's Centroid
# Rank holds is not stated anywhere (the cited file has none, and the paper's text speaks of an "effective
# rank" when it discusses its rank columns): Table III shows our effective rank there, an open choice.

def anisotropy(sigma):
    """Table III's anisotropy (cited): sigma_1^2 / sum_k sigma_k^2 of the raw, uncentred features X (N, F).

    sum_k sigma_k^2 = |X|_F^2, so this is the share of the features' energy along their top direction: 1
    when every f_i lies on one line, 1/F when it is spread equally over F orthogonal directions. Uncentred,
    a common mean direction counts: anisotropy >= |mean f|^2 / mean |f|^2 (CVN^2 when all norms are equal).
    """
    energy = sigma.double().pow(2)
    return (energy.max() / energy.sum()).item()


def rank_above(sigma, tol=0.1):
    """Table III's rank (cited): how many singular values of the raw features exceed tol (see the notes above)."""
    return int((sigma > tol).sum())


def effective_rank(sigma):
    """Effective rank (Roy & Vetterli 2007), ours: exp(-sum_k p_k log p_k) with p_k = sigma_k / sum sigma,
    between 1 (one direction) and the number of singular values (all equal); RankMe (Garrido et al. 2023)
    applies it to embeddings."""
    p = sigma.double() / sigma.sum()
    p = p[p > 0]                                                  # 0 log 0 = 0
    return math.exp(-(p * p.log()).sum().item())


def feature_correlation(feats):
    """Table III's correlation (cited): (1 / (F(F-1))) sum_{a != b} |r_ab|, the mean absolute Pearson
    correlation of two different dimensions of the raw features (N, F); 0 for decorrelated dimensions, the
    target of Barlow Twins and VICReg. A constant dimension's pairs count as 0 (see the notes above).
    Returns (correlation, the number of constant dimensions); the correlation is nan for one dimension.
    """
    feats = feats.double()
    centred = feats - feats.mean(0)                                          # (N, F)
    std = centred.pow(2).mean(0).sqrt()                                      # (F,)
    constant = std <= 1e-12 * std.max()              # constant up to the rounding of the mean
    standard = torch.where(constant, 0.0, centred / std)                     # (N, F), constant columns 0
    corr = standard.T @ standard / len(standard)                             # (F, N) x (N, F) -> (F, F)
    dims = corr.shape[0]
    off_diagonal = ~torch.eye(dims, dtype=torch.bool)
    mean = corr[off_diagonal].abs().sum().item() / (dims * (dims - 1)) if dims > 1 else float("nan")
    return mean, int(constant.sum())


def class_centroids(z, labels, num_classes):
    """mu_c = mean of the unit embeddings of class c: (N, F), (N,) -> (C, F)."""
    sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype).index_add_(0, labels, z)        # (C, F)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).unsqueeze(1).to(z)       # (C, 1)
    return sums / counts


def angle_stats(cosines):
    """Mean and standard deviation, in degrees, of the angles arccos(s) of a set of cosine similarities."""
    angles = torch.rad2deg(torch.arccos(cosines.clamp(-1, 1)))
    return angles.mean().item(), angles.std().item()


def geometry_metrics(feats, labels, pos_feats=None, max_points=4000, seed=0, centroids=None):
    """Table III's measurements of raw features (N, F) with integer labels (N,).

    pos_feats: (2, P, F), the features of two augmented views of P images, for the positive-pair angle
    (None: left out). The all-pairs statistics use a seeded subset of max_points features: 4,000 give 8
    million pairs, which pins a mean to well under 0.01 while an (N, N) matrix of 50,000 would need 20 GB.
    The others use every feature, as the cited code does. centroids: the class centroids (C, F) of the
    unit features, if the caller has them (None: computed here, for the classes 0..max(labels)).
    """
    feats, labels = feats.double(), labels.long()
    z = F.normalize(feats, dim=1)                                            # (N, F) on the sphere
    result = {"points": len(z), "pair_points": min(max_points, len(z))}

    # The cited columns (Kalapos & Gyires-Tóth's definitions, see above), on the raw features.
    sigma = torch.linalg.svdvals(feats)                                      # (min(N, F),) of X (N, F)
    result["anisotropy"] = anisotropy(sigma)
    result["rank"] = rank_above(sigma, 0.1)
    result["correlation"], result["constant_dims"] = feature_correlation(feats)

    # Centre vector norm (Jha et al. 2024, the paper's [17]): |mean_i z_i|, 1 when all embeddings point the
    # same way, about 1/sqrt(N) for embeddings spread uniformly over the sphere.
    result["center_norm"] = z.mean(0).norm().item()

    # Table III's "Centroid Rank", ours: the effective rank of the centroid matrix (C, F) (see the notes
    # above for the doubt).
    if centroids is None:
        centroids = class_centroids(z, labels, int(labels.max()) + 1)        # (C, F)
    result["centroid_effective_rank"] = effective_rank(torch.linalg.svdvals(centroids.double()))

    # All pairs i != j of the subset.
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(z), generator=generator)[:max_points]
    zs, ls = z[subset], labels[subset]
    sims = zs @ zs.T                                                         # (n, F) x (F, n) -> (n, n)
    upper = torch.triu(torch.ones_like(sims, dtype=torch.bool), diagonal=1)  # each unordered pair once
    pair_sims = sims[upper]
    same_class = (ls[:, None] == ls[None, :])[upper]

    # Sensitivity index d' (signal detection theory) between the similarities of same-class pairs and of
    # different-class pairs: (mean_same - mean_diff) / sqrt((var_same + var_diff) / 2). Higher = the
    # classes are told apart by similarity alone.
    same, different = pair_sims[same_class], pair_sims[~same_class]
    if len(same) > 1 and len(different) > 1:
        result["d_prime"] = ((same.mean() - different.mean()) / ((same.var() + different.var()) / 2).sqrt()).item()

    # Pairwise angle arccos(s_ij), mean and std in degrees, over all pairs (the uniformity side of Wang &
    # Isola 2020, the paper's [28]) and over positive pairs, the two views of one image (alignment).
    result["angle_mean"], result["angle_std"] = angle_stats(pair_sims)
    if pos_feats is not None:
        first, second = F.normalize(pos_feats.double(), dim=2)               # each (P, F)
        result["positive_angle_mean"], result["positive_angle_std"] = angle_stats((first * second).sum(1))
        result["positive_pairs"] = len(first)
    return result


# ----------------------------------------------------------------------------------------------------
# Positive pairs: two views of one image under the training augmentation (Table III, Section VI-B)

class TwoViews(torch.utils.data.Dataset):
    """Item 2k is image k's first global crop, item 2k + 1 its second, made by data.multi_crop as training
    makes them. Both come from one draw seeded by (seed, k), whichever loading worker makes them, so that
    extract_features returns pairs in adjacent rows."""

    def __init__(self, dataset, indices, recipes, seed):
        self.dataset, self.indices, self.recipes, self.seed = dataset, indices, recipes, seed

    def __len__(self):
        return 2 * len(self.indices)

    def __getitem__(self, item):
        image, label = self.dataset[self.indices[item // 2]]                 # PIL image, RGB, of any size
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]    # (1, 3, H, W) uint8
        seed = int(np.random.SeedSequence([self.seed, item // 2]).generate_state(1, np.uint64)[0])
        views = multi_crop(pixels, torch.tensor([pixels.shape[-2:]]), self.recipes, torch.Generator().manual_seed(seed))
        return views[item % 2][0], label                                     # (3, s, s), normalised


def positive_pair_features(backbone, dataset, data_dir, split, train_args, image_size, count, device, workers, seed):
    """Features (2, P, F) of two views of P seeded random images of the split, in the checkpoint's training
    augmentation (another library's backbone, which carries no training arguments: dino_recipes')."""
    args = train_args or {}
    global_size, local_size = default_crop_sizes(image_size)
    recipes = dino_recipes(args.get("global_size", global_size), args.get("local_size", local_size),
                           global_crops=2, local_crops=0, global_scale=tuple(args.get("global_scale", GLOBAL_SCALE)),
                           blur=args.get("blur", True))
    images = dataset_split(dataset, data_dir, split, transform=None)
    indices = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    feats, _ = extract_features(backbone, TwoViews(images, indices, recipes, seed), device, workers=workers,
                                desc="positive pairs", exact=True)
    return feats.view(len(indices), 2, -1).transpose(0, 1)      # (2P, F) -> (P, 2, F) -> (2, P, F)


# ----------------------------------------------------------------------------------------------------
# Rank statistics and hierarchical clustering, in numpy, no scipy (Table IV, Section VI-C)

def rankdata(values):
    """Ranks 1..n with ties given the average of the ranks they span (scipy.stats.rankdata's default)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)                                      # the highest rank of each distinct value
    return (last - (counts - 1) / 2.0)[inverse]


def pearson(a, b):
    a, b = np.asarray(a, np.float64) - np.mean(a), np.asarray(b, np.float64) - np.mean(b)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def spearman(a, b):
    """Spearman's rho: the Pearson correlation of the (average-tie) ranks."""
    return pearson(rankdata(a), rankdata(b))


def upper_triangle(matrix):
    """The entries above the diagonal of a (C, C) matrix, row by row: one value per unordered pair."""
    return matrix[np.triu_indices(len(matrix), k=1)]


def mantel_p_value(a, b, permutations=999, seed=0):
    """One-sided p-value of Spearman(a, b) for two (C, C) symmetric matrices, by permuting the classes of b.
    The pairs are not independent (each class is in C-1 of them), so a t-test would be too optimistic.
    Ranks are computed once: permuting the classes of a matrix permutes the ranks of its pairs."""
    rng = np.random.default_rng(seed)
    ranks_a = rankdata(upper_triangle(a))
    rank_matrix = np.zeros_like(b, dtype=np.float64)
    rank_matrix[np.triu_indices(len(b), k=1)] = rankdata(upper_triangle(b))
    rank_matrix += rank_matrix.T                                  # (C, C) symmetric ranks of b's pairs
    observed = pearson(ranks_a, upper_triangle(rank_matrix))
    exceed = sum(pearson(ranks_a, upper_triangle(rank_matrix[np.ix_(order, order)])) >= observed
                 for order in (rng.permutation(len(b)) for _ in tqdm(range(permutations), desc="Mantel permutations",
                                                                     leave=False, mininterval=1)))
    return (1 + exceed) / (1 + permutations)


def average_linkage(distances):
    """Agglomerative clustering with average linkage (UPGMA) of a (C, C) distance matrix, O(C^3).

    Returns (cophenetic, leaves): cophenetic[i, j] is the height at which i and j first join a cluster
    (Sokal & Rohlf 1962); leaves is the tree's left-to-right leaf order, similar classes side by side.
    """
    d = np.array(distances, dtype=np.float64)
    count = len(d)
    np.fill_diagonal(d, np.inf)
    sizes = np.ones(count)
    members = [[i] for i in range(count)]
    cophenetic = np.zeros((count, count))
    for _ in range(count - 1):
        a, b = np.unravel_index(np.argmin(d), d.shape)
        a, b = min(a, b), max(a, b)
        cophenetic[np.ix_(members[a], members[b])] = d[a, b]
        cophenetic[np.ix_(members[b], members[a])] = d[a, b]
        d[a] = (sizes[a] * d[a] + sizes[b] * d[b]) / (sizes[a] + sizes[b])    # cluster a becomes A+B
        d[:, a] = d[a]
        d[a, a] = np.inf
        d[b], d[:, b] = np.inf, np.inf                                        # cluster b is gone
        sizes[a] += sizes[b]
        members[a], members[b] = members[a] + members[b], []
    return cophenetic, next(m for m in members if m)


# ----------------------------------------------------------------------------------------------------
# Class names -> WordNet and MiniLM similarities, and how well the centroids agree (Table IV, Section VI-C)

class MissingExtra(RuntimeError):
    """An optional package (nltk, WordNet, sentence-transformers, matplotlib) is missing; the message says what
    to install."""


CIFAR10_SYNSETS = {
    "airplane": "airplane.n.01", "automobile": "car.n.01", "bird": "bird.n.01", "cat": "cat.n.01",
    "deer": "deer.n.01", "dog": "dog.n.01", "frog": "frog.n.01", "horse": "horse.n.01", "ship": "ship.n.01",
    "truck": "truck.n.01",
}
STL10_SYNSETS = {**{k: v for k, v in CIFAR10_SYNSETS.items() if k not in ("automobile", "frog")},
                 "car": "car.n.01", "monkey": "monkey.n.01"}
WNID = re.compile(r"^n\d{8}$")      # an ImageNet class folder: 'n' and the synset's offset in WordNet 3.0


def is_wnid_list(class_names):
    return all(WNID.match(name) for name in class_names)


def synset_names(class_names):
    """The WordNet synset ('dog.n.01') of each class, or None: ImageNet's wnids (n01440764) by offset, as
    Table IV needs; CIFAR-10's and STL-10's names (also as `folder` class folders) by the tables above."""
    if is_wnid_list(class_names):
        wordnet = load_wordnet()
        return [wordnet.synset_from_pos_and_offset("n", int(name[1:])).name() for name in class_names]
    for table in (CIFAR10_SYNSETS, STL10_SYNSETS):
        if all(name in table for name in class_names):
            return [table[name] for name in class_names]
    return None


def load_wordnet():
    """nltk's WordNet reader, loaded (about 10 s the first time), or MissingExtra saying what to install."""
    message = "WordNet similarities need nltk and WordNet: pip install nltk && python -m nltk.downloader wordnet"
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
    except (ImportError, LookupError):
        raise MissingExtra(message) from None
    return wordnet


def wordnet_similarities(names):
    """Wu-Palmer and Leacock-Chodorow similarities between all pairs of synsets: two (C, C) arrays, by
    nltk's definitions (the tests write them out): WUP = 2 depth(lcs) / ((path(a, lcs) + depth(lcs)) +
    (path(b, lcs) + depth(lcs))), lcs the lowest common subsumer, in (0, 1]; LCH = -log((path(a, b) + 1) /
    (2 * 19)), 19 the depth of WordNet's noun hierarchy. Both grow with semantic closeness."""
    wordnet = load_wordnet()
    synsets = [wordnet.synset(name) for name in names]
    count = len(synsets)
    wup, lch = np.ones((count, count)), np.zeros((count, count))
    for i in tqdm(range(count), desc="WordNet similarities", leave=False, mininterval=1):   # 500k pairs for 1,000
        for j in range(i + 1, count):
            wup[i, j] = wup[j, i] = synsets[i].wup_similarity(synsets[j])
            lch[i, j] = lch[j, i] = synsets[i].lch_similarity(synsets[j])
    return wup, lch


def text_similarities(words, model=None):
    """Cosine similarities (C, C) of the words embedded by all-MiniLM-L6-v2 (sentence-transformers), the
    model of Section VI-C (Section IV names L2-v2). model: a local copy, else downloaded on first use."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MissingExtra("MiniLM similarities need sentence-transformers: pip install sentence-transformers") from None
    name = model or "all-MiniLM-L6-v2"
    try:
        encoder = SentenceTransformer(name, device="cpu")
    except Exception as error:  # no network, no such folder: errors of several libraries (OSError, HTTP, ...)
        raise MissingExtra(f"cannot load the text model {name!r} ({type(error).__name__}); pass --text-model "
                           f"with a local copy of all-MiniLM-L6-v2") from None
    embedded = encoder.encode(list(words), convert_to_tensor=True, normalize_embeddings=True).cpu().double()
    return (embedded @ embedded.T).numpy()                       # (C, 384) x (384, C) -> (C, C)


def semantic_alignment(similarity, class_names, text_model=None, permutations=999):
    """Table IV: how the class centroids' cosine similarities (C, C) agree with WordNet's and MiniLM's.

    Every column is a Spearman correlation over the class pairs, positive = aligned, with a Mantel p-value
    (the paper reports p < 0.05). Cophenetic: the centroids' average-linkage tree on 1 - cos against
    WordNet's distance 1 - WUP (Spearman, where the classic coefficient is Pearson's). Returns (result,
    skipped: one-line reasons for the columns not computed, references: the (C, C) matrices compared with).
    """
    if len(class_names) < 3:
        return {}, [f"semantic alignment needs at least 3 classes (pairs to rank), not {len(class_names)}"], {}
    result, skipped, references = {}, [], {}
    try:
        names = synset_names(class_names)
        if names is None:
            skipped.append("WordNet columns: no WordNet synsets for these class names (known: ImageNet wnids, "
                           "CIFAR-10, STL-10)")
        else:
            references["wup"], references["lch"] = wordnet_similarities(names)
    except MissingExtra as error:
        skipped.append(f"WordNet columns skipped: {error}")
    try:                 # the words: an ImageNet synset's first lemma ('tench'), else the class folder's name
        words = [n.split(".")[0] for n in synset_names(class_names)] if is_wnid_list(class_names) else class_names
        references["minilm"] = text_similarities([word.replace("_", " ") for word in words], text_model)
    except MissingExtra as error:
        skipped.append(f"MiniLM column skipped: {error}")
    for column, reference in references.items():
        result[column] = spearman(upper_triangle(similarity), upper_triangle(reference))
        result[column + "_p"] = mantel_p_value(similarity, reference, permutations)
    if "wup" in references:
        cophenetic, _ = average_linkage(1 - similarity)
        result["cophenetic"] = spearman(upper_triangle(cophenetic), upper_triangle(1 - references["wup"]))
        result["cophenetic_p"] = mantel_p_value(-cophenetic, references["wup"], permutations)
    return result, skipped, references


# ----------------------------------------------------------------------------------------------------
# The pictures, drawn by matplotlib (an optional extra), and the class-centroid heat map (Fig. 5, Section VI-B)

def plotting():
    """The matplotlib package, or MissingExtra saying what to install. The pictures are matplotlib Figure
    objects, never pyplot's: nothing is shown, no backend is switched, no global figure is left to close."""
    try:
        import matplotlib.figure
    except ImportError:
        raise MissingExtra("the pictures need matplotlib: pip install matplotlib") from None
    return matplotlib


def save_figure(figure, path):
    """Write a matplotlib figure as a PNG, whole or not at all."""
    write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=100, bbox_inches="tight"))


def viridis(values):
    """(H, W) in [0, 1] -> (3, H, W) RGB in matplotlib's viridis colour map."""
    return torch.from_numpy(plotting().colormaps["viridis"](values.numpy())[..., :3]).float().permute(2, 0, 1)


def save_heatmap(matrix, labels, path, low=0.0):
    """Fig. 5: a (C, C) matrix in the viridis colour map from low (dark purple) to 1 (yellow), as the
    paper's; the class names beside the rows for up to 40 classes, at least 15 px apart; beyond that a
    pixel per class at least (ImageNet's 1000 classes: 1000 px); a colour bar on the right."""
    count = len(matrix)
    # inches at 100 px each, of which the axes take about two thirds (the colour bar and margins the rest)
    side = max(5.0, count * (0.23 if count <= 40 else 0.016))
    figure = plotting().figure.Figure(figsize=(side + 1, side))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="viridis", vmin=low, vmax=1.0, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks(range(count) if count <= 40 else [], labels if count <= 40 else [])
    figure.colorbar(image)
    save_figure(figure, path)
    return figure


# ----------------------------------------------------------------------------------------------------
# Saliency: SmoothGrad-CAM for ResNets, CLS attention for ViTs (Figs. 2 and 3, Section VI-A)

@torch.no_grad()
def vit_attention_map(backbone, image):
    """Fig. 3: the CLS token's attention to each patch, averaged over heads and over all blocks, upsampled
    (bilinear) to the image and scaled to [0, 1]. image (3, H, W) -> (H, W)."""
    maps, (grid_h, grid_w) = backbone.attention_maps(image[None])         # (depth, 1, heads, T, T)
    cls_to_patches = maps[:, 0, :, 0, 1:].mean((0, 1))                     # (depth, heads, h*w) -> (h*w,)
    heat = cls_to_patches.reshape(1, 1, grid_h, grid_w)                    # (h*w,) -> (1, 1, h, w)
    return scale_to_unit(F.interpolate(heat, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0])


def smoothgrad_cam(backbone, image, samples=16, noise=0.15, seed=0):
    """Fig. 2: SmoothGrad-CAM over all stages of a ResNet. image (3, H, W) -> (H, W) in [0, 1].

    Grad-CAM (Selvaraju et al. 2017) at stage k: ReLU(sum_c alpha_c A_c) with A (C_k, h_k, w_k) the stage's
    output and alpha_c the spatial mean of d target / d A_c. SmoothGrad (Smilkov et al. 2017): the maps
    are averaged over `samples` copies of the image with Gaussian noise of std noise * (max - min) of the
    image (their 10-20 %). "Across all layers" (the paper): each stage's averaged map, upsampled to the
    image and scaled to [0, 1], then the four are averaged.

    The target: a self-supervised backbone has no class score, and the paper does not say what it used.
    We take the projection of the pooled feature onto the direction of the clean image's own feature,
    f(x_noisy) . f(x) / |f(x)|: "what makes this image's representation point where it points". At the
    clean image its gradient equals that of the feature norm |f(x)|, but under noise it keeps asking
    about the clean image's direction rather than about whatever the noisy copy's feature is.
    """
    x = image[None]                                                           # (1, 3, H, W)
    with torch.no_grad():
        direction = F.normalize(backbone(x), dim=1)                           # (1, F)
    generator = torch.Generator().manual_seed(seed)
    sigma = noise * (x.max() - x.min())
    noisy = x + sigma * torch.randn((samples, *x.shape[1:]), generator=generator).to(x)   # (S, 3, H, W)
    noisy.requires_grad_(True)                        # the weights are frozen: the graph starts at the input
    stages = backbone.stages(noisy)                                           # list of (S, C_k, h_k, w_k)
    pooled = stages[-1].mean((2, 3))                                          # the representation, (S, F)
    target = (pooled * direction).sum()                                       # summed over the S copies
    gradients = torch.autograd.grad(target, stages)
    heat = torch.zeros(image.shape[-2:])
    for activation, gradient in zip(stages, gradients):
        alpha = gradient.mean((2, 3), keepdim=True)                           # (S, C_k, 1, 1)
        cam = F.relu((alpha * activation).sum(1, keepdim=True))               # (S, 1, h_k, w_k)
        cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)
        heat += scale_to_unit(cam.mean(0)[0].detach().cpu())                  # SmoothGrad mean, (H, W)
    return scale_to_unit(heat / len(stages))


def scale_to_unit(heat):
    low, high = heat.min(), heat.max()
    return (heat - low) / (high - low).clamp_min(1e-12)


def save_saliency_grid(backbone, dataset, indices, path, device, samples=16, seed=0):
    """saliency.png: one row per image, the input beside its heat map laid over it (colour map at 60 %),
    enlarged by a whole factor (nearest neighbour, so pixels stay visible) to at least 128 px."""
    backbone = backbone.eval()
    rows = []
    for index in indices:
        image = dataset[index][0].to(device)
        heat = (vit_attention_map(backbone, image).cpu() if isinstance(backbone, VisionTransformer)
                else smoothgrad_cam(backbone, image, samples, seed=seed))
        picture = unnormalize(image).clamp(0, 1).cpu()       # displayable RGB (3, S, S), where the heat map is
        overlay = 0.4 * picture + 0.6 * viridis(heat)
        rows.append(torch.cat([picture, overlay], dim=2))                     # (3, S, 2S)
    grid = torch.cat(rows, dim=1)                                             # (3, n*S, 2S)
    scale = math.ceil(128 / rows[0].shape[1])
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    save_png(grid, path)
    return grid


# ----------------------------------------------------------------------------------------------------
# Entry point: one checkpoint -> Tables III and IV, Figs. 2, 3 and 5

# Table III's columns in the paper's order (anisotropy, rank and correlation by the cited definitions; the
# paper's "Centroid Rank" by ours, the effective rank; see the Geometry notes).
TABLE3_COLUMNS = ("dataset", "method", "arch", "anisotropy", "correlation", "center_norm", "centroid_effective_rank",
                  "rank", "d_prime", "all_pairwise_angle", "positive_pairwise_angle")
TABLE4_COLUMNS = ("dataset", "method", "arch", "wup", "lch", "cophenetic", "minilm")


def table3_row(result):
    """Table III's cells: angles as 'mean° ± std°', the correlation with three decimals (as the paper's
    Food-101 rows), effective ranks with one; the other floats with two (markdown_row)."""
    row = dict(result)
    row["all_pairwise_angle"] = f"{result['angle_mean']:.2f}° ± {result['angle_std']:.2f}°"
    if "positive_angle_mean" in result:
        row["positive_pairwise_angle"] = f"{result['positive_angle_mean']:.2f}° ± {result['positive_angle_std']:.2f}°"
    row["correlation"] = f"{result['correlation']:.3f}"
    row["centroid_effective_rank"] = f"{result['centroid_effective_rank']:.1f}"
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("--pairs", type=int, default=4000,
                   help="random subset for all-pairs statistics (mean cosine, d', angles): n(n-1)/2 pairs; "
                        "4000 gives 8M pairs in ~1 s, the (n, n) matrix takes 8n^2 bytes")
    p.add_argument("--positive-images", type=int, default=2000,
                   help="images whose two augmented views give the positive-pair angle (0: skip)")
    p.add_argument("--images", type=int, default=8, help="images in saliency.png (0: no saliency picture)")
    p.add_argument("--smooth-samples", type=int, default=16,
                   help="noisy copies per image for SmoothGrad-CAM (ResNets); more = smoother, slower")
    p.add_argument("--permutations", type=int, default=999, help="Mantel permutations for Table IV's p-values")
    p.add_argument("--text-model", help="local folder of all-MiniLM-L6-v2, Table IV's MiniLM column (default: "
                                        "downloaded by sentence-transformers)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets, the crops and the SmoothGrad noise")
    p.add_argument("--out", help="folder for analyze.jsonl and the PNGs (default: analysis/ beside the checkpoint)")
    p.add_argument("--force", action="store_true", help="replace the PNGs that --out holds already")
    p.add_argument("--table3", help="Markdown file to append a Table III row to")
    p.add_argument("--table4", help="Markdown file to append a Table IV row to")
    p.epilog = "Learning curves of several runs (Figs. 6-8): python analyze.py curves --help"
    args = parse_checkpoint_arguments(p, argv)
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "analysis")
    return args


def check_args(args):
    """Every argument, before any work: the first problem as a one-line message, or None."""
    return first_problem([
        (args.pairs >= 2, f"--pairs must be >= 2 (got {args.pairs}): the all-pairs statistics need two points"),
        (args.pairs <= 20000, f"--pairs must be at most 20000 (got {args.pairs}): its (n, n) matrix takes 8 n^2 bytes"),
        seed_rule(args.seed),
        (args.positive_images >= 0 and args.images >= 0, "--positive-images and --images must be >= 0 (0 skips)"),
        (args.smooth_samples >= 1, f"--smooth-samples must be >= 1 (got {args.smooth_samples})"),
        (args.permutations >= 1, f"--permutations must be >= 1 (got {args.permutations}); 999 gives p down to 0.001"),
        *checkpoint_argument_rules(args),
    ]) or unwritable(args.out, "--out") or unwritable(args.cache_dir, "--cache-dir") \
        or unwritable_file(args.table3, "--table3") or unwritable_file(args.table4, "--table4") \
        or replaces_a_file(os.path.join(args.out, "centroids.png"), "--out", args.force) \
        or (replaces_a_file(os.path.join(args.out, "saliency.png"), "--out", args.force) if args.images else None)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["curves"]:                   # the other program, at the end of the file
        with ctrl_c_in_one_line("no figure was written"):
            return curves_main(argv[1:])
    args = parse_args(argv)
    refuse(check_args(args))
    with ctrl_c_in_one_line(f"no result was written; the features extracted so far are kept in {args.cache_dir}"):
        try:
            result, pictures = analyze_checkpoint(args, torch.device(args.device))
        except (CheckpointError, DatasetError) as error:
            raise SystemExit(f"error: {error_message(error)}")
        p_values = [f"{c} {result[c + '_p']:.3f}" for c in ("wup", "lch", "cophenetic", "minilm") if c + "_p" in result]
        if p_values:
            print(f"Mantel p-values ({args.permutations} permutations of the classes): " + ", ".join(p_values))
        for reason in result["skipped"]:
            print(f"skipped: {reason}")
        # The rows and analyze.jsonl first, the pictures after: a failure to write one never costs the others
        rows = [(table3_row(result), TABLE3_COLUMNS, args.table3), (result, TABLE4_COLUMNS, args.table4)]
        keep_results(result, os.path.join(args.out, "analyze.jsonl"), rows, pictures)
        return result


def analyze_checkpoint(args, device):
    """Load, extract (or read cached) features, measure, draw, in Section VI's order; returns the result
    dict, whose "skipped" lists the reasons for the columns that could not be computed."""
    backbone, info, dataset, data_dir, image_size = load_for_probing(args, device)     # frozen, on device
    os.makedirs(args.out, exist_ok=True)
    split = "test"            # the held-out split, which the cited metrics code measures (the paper names none)
    # float32 features (exact): Table III's rank counts singular values above 0.1, which bf16 noise also passes
    feats, labels, _ = cached_features(backbone, args.checkpoint, network_digest(args.checkpoint, info), dataset,
                                       data_dir, split, image_size, device, args.cache_dir, args.workers, exact=True)
    data = dataset_split(dataset, data_dir, split, eval_transform(image_size))     # for the class names, Figs. 2-3
    class_names = data.classes
    if len(set(labels.tolist())) < 2:
        raise DatasetError(f"{dataset} has fewer than 2 classes in its {split} split; the analysis compares classes")
    result = {"dataset": dataset, "method": info["method"], "arch": info["arch"], "epoch": info["epoch"],
              "checkpoint": os.path.abspath(args.checkpoint), "split": split, "image_size": image_size}

    # The class centroids of the unit features, computed once: Table III takes their rank, Table IV and
    # Fig. 5 their cosine similarities.
    centroids = class_centroids(F.normalize(feats.double(), dim=1), labels.long(), len(class_names))   # (C, F)

    # Table III
    pos_feats = None
    if args.positive_images > 0:
        pos_feats = positive_pair_features(backbone, dataset, data_dir, split, info["train_args"], image_size,
                                           args.positive_images, device, args.workers, args.seed)
    result.update(geometry_metrics(feats, labels, pos_feats, args.pairs, args.seed, centroids))

    # Table IV
    unit = F.normalize(centroids, dim=1)
    similarity = (unit @ unit.T).numpy()                                      # (C, F) x (F, C) -> (C, C)
    semantic, skipped, references = semantic_alignment(similarity, class_names, args.text_model, args.permutations)
    result.update(semantic)

    # Fig. 5 in an order that shows structure: ImageNet's wnids sorted, which is WordNet's order (dogs
    # 151-268 together, the paper's bright block); else the leaf order of the average-linkage tree of
    # WordNet's distances (the same for every checkpoint of a dataset), or without WordNet of the centroids'.
    if is_wnid_list(class_names):
        order, result["heatmap_order"] = list(np.argsort(class_names, kind="stable")), "wordnet (wnid order)"
    else:
        wordnet = "wup" in references
        order = average_linkage(1 - (references["wup"] if wordnet else similarity))[1]
        result["heatmap_order"] = ("wordnet" if wordnet else "centroids") + " (average-linkage leaf order)"
    ordered, names = similarity[np.ix_(order, order)], [class_names[i] for i in order]
    try:
        plotting()
    except MissingExtra as error:               # the figures without the pictures, as without WordNet's columns
        result["skipped"] = skipped + [str(error)]
        return result, []
    result["centroids_png"] = os.path.join(args.out, "centroids.png")
    # On the paper's 0 to 1 scale (comparable across checkpoints: darker = closer to 90 degrees), widened
    # below 0 when some centroids lie further than 90 degrees apart.
    low = min(0.0, float(upper_triangle(similarity).min()))
    pictures = [(result["centroids_png"],       # drawn once the figures are saved (main)
                 lambda: save_heatmap(ordered, names, result["centroids_png"], low=low))]

    # Figs. 2 and 3
    if args.images > 0:
        result["saliency_png"] = os.path.join(args.out, "saliency.png")
        indices = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.images].tolist()
        pictures.append((result["saliency_png"], lambda: save_saliency_grid(
            backbone, data, indices, result["saliency_png"], device, args.smooth_samples, args.seed)))
    result["skipped"] = skipped
    return result, pictures


# ----------------------------------------------------------------------------------------------------
# Learning curves, a program of their own (Figs. 6-8, Section VII): a logged metric per epoch, a line per run

def read_curves(runs, metric):
    """{run: (epochs, values)} from each RUN/log.jsonl (or a log file given directly), keeping the lines
    that hold `metric` (train.py logs the probes only at its evaluations, every --eval-every epochs)."""
    curves = {}
    for run in runs:
        log = run if os.path.isfile(run) else os.path.join(run, "log.jsonl")
        if not os.path.exists(log):
            raise SystemExit(f"error: {run} has no log.jsonl; pass run folders written by train.py")
        records = read_jsonl(log)          # a last line cut short by a kill is dropped, with a warning
        # By epoch, the last value of an epoch kept: eval.jsonl lists kept checkpoints in the order they
        # were probed (a shell glob puts epoch 100 before epoch 20), and a probe may be repeated.
        # A value of None: top-5 with 5 classes or fewer, which is not reported
        points = dict(sorted(((r["epoch"], r[metric]) for r in records
                              if r.get(metric) is not None and r.get("epoch") is not None),
                             key=lambda point: point[0]))        # a stable sort: the last probe of an epoch wins
        if not points:
            raise SystemExit(f"error: {log} logs no {metric}; the probes are logged at train.py's evaluations "
                             f"(--eval-every, not 0), the loss terms every epoch, top-5 only with more than 5 "
                             f"classes")
        curves[run] = (tuple(points), tuple(points.values()))
    return curves


def plot_curves(curves, labels, metric, path):
    """One line with round markers per run (matplotlib's default colours, in order), the epoch on x and the
    metric on y; the legend, one entry per run, to the right of the axes, where no line can run under it.
    Non-finite values (a diverged loss) are not drawn. Saved as a PNG."""
    figure = plotting().figure.Figure(figsize=(7.2, 4.8))
    axes = figure.subplots()
    for (epochs, values), label in zip(curves.values(), labels):
        finite = [(epoch, value) for epoch, value in zip(epochs, values) if math.isfinite(value)]
        axes.plot([epoch for epoch, _ in finite], [value for _, value in finite], marker="o", label=label)
    axes.set(xlabel="epoch", ylabel=metric)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1))
    save_figure(figure, path)
    return figure


def curves_main(argv):
    p = argparse.ArgumentParser(prog="analyze.py curves", formatter_class=HelpFormatter,
                                description="Learning curves of several train.py runs in one PNG (Figs. 6-8).")
    p.add_argument("runs", nargs="+", help="run folders (each with its log.jsonl)")
    p.add_argument("--metric", default="linear_top1",
                   help="a key of log.jsonl: linear_top1 (default: the online linear probe, what Figs. 6-8 plot), "
                        "linear_top5, knn_top1, knn_top5, loss, mi, h_global, h_local, accuracy")
    p.add_argument("--labels", nargs="+", help="legend entries, one per run (default: the folders' names)")
    p.add_argument("--out", default="curves.png", help="PNG file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    refuse(replaces_a_file(args.out, "--out", args.force) or unwritable_file(args.out, "--out"))
    # A run folder, or the folder of a log file given directly (RUN/eval.jsonl), names its line.
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(run)) if os.path.isfile(run)
                                              else os.path.normpath(run)) for run in args.runs]
    try:
        plotting()
        if len(labels) != len(args.runs):
            raise SystemExit(f"error: {len(labels)} --labels for {len(args.runs)} runs; give one label per run")
        curves = read_curves(args.runs, args.metric)
    except (MissingExtra, DatasetError) as error:       # no matplotlib; a log with a broken line inside it
        raise SystemExit(f"error: {error}")
    plot_curves(curves, labels, args.metric, args.out)
    for (epochs, values), label in zip(curves.values(), labels):
        print(f"{label}: " + ", ".join(f"epoch {e:g} {v:.2f}" for e, v in zip(epochs, values)))
    print(f"wrote {args.out}")
    return curves


if __name__ == "__main__":
    main()
