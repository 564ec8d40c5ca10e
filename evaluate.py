"""Evaluate a frozen backbone: linear probe and k-NN, top-1 and top-5 (the paper's Table I).

    python evaluate.py runs/cifar10-resnet18-kappa1/ckpt.pt
    python evaluate.py resnet50_supervised.pth --dataset imagenet --data-dir /data/imagenet

The checkpoint is one written by train.py (architecture and dataset read from it), or another library's
(torchvision and timm state_dicts, Lightly, solo-learn, DINO, MoCo: backbones.load_backbone finds the
backbone, reads its architecture from its tensors and leaves the heads out), so that other methods'
published networks are probed by the same code. Features are extracted once with the evaluation
transform (no augmentation) and cached on disk, keyed by the checkpoint's content and the network taken
from it, the dataset, its folder, the split, its files and the resolution: a second probe of the same
checkpoint extracts nothing, a changed checkpoint or split is extracted anew.
`--export FILE` writes the backbone in torchvision's or timm's layout instead of probing it.

k-NN (Wu et al. 2018, InstDisc; DINO): each test feature finds its k most similar training features by
cosine similarity s; each neighbour votes for its class with weight exp(s / T); classes are ranked by
their summed votes. Defaults k = 200, T = 0.1. train.py's online monitor calls the same functions.

Linear probe: the offline probe (ours), the layer of the paper's evaluation setup's online probe
(Kalapos & Gyires-Toth 2024; see PaperLinearProbe), one linear layer on the raw features, Adam at lr 1e-3
without weight decay, batch 256, trained 41 rounds of 2 epochs on the final checkpoint's features: the
rounds a 200-epoch run's online probe gets. The cited code probes only online, during pre-training: that
is train.py's `linear_top1` in log.jsonl, which Figures 6-8 plot. The paper does not say which of the two
its Table I's linear columns hold. We set the online probe beside them for runs trained in its setup, and
this offline one where no online figure exists (published checkpoints, HyDeS* on ImageNet-100) and as the
online figure's best case (REPRODUCE.md, Table I).

Output: a table row on stdout, the same figures appended as a JSON line to --json (default: eval.jsonl
beside the checkpoint), and, with --table FILE, a Markdown row appended to a table several runs share.
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from backbones import (add_checkpoint_arguments, checkpoint_argument_rules, export_backbone, load_backbone_from_args,
                       load_for_probing, network_digest, parse_checkpoint_arguments)
from checkpoints import CheckpointError, keep_results
from data import DatasetError
from loading import cached_features
from settings import (HelpFormatter, ctrl_c_in_one_line, error_message, first_problem, knn_temperature_rule,
                      numbers_are_finite, refuse, replaces_a_file, unwritable, unwritable_file)


# ----------------------------------------------------------------------------------------------------
# k-NN

# Top-5 is reported only with more than 5 classes: with 5 or fewer, every top-5 holds the truth (100%).
TOP_K = 5


def rank_classes(scores):
    """Indices of the TOP_K highest scores per row, ties going to the lower class index (a stable sort,
    so the result does not depend on the sorting kernel): (Q, C) -> (Q, min(TOP_K, C))."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :TOP_K]


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=200, temperature=0.1,
                 chunk_elements=2**26):
    """Weighted k-NN top-1 and top-5 accuracy in percent; top-5 is None with 5 classes or fewer, where it
    is 100 by construction.

    train_feats (M, F), test_feats (Q, F): any scale (they are L2-normalised here), on the device the
    computation should run on. Queries go in chunks of about chunk_elements / M, so the (chunk, M)
    similarity matrix stays bounded (2^26 floats = 256 MB), whatever the size of the training set:
    1.28M ImageNet features take 52 queries at a time. Neighbours tied at the k-th place are taken in
    torch.topk's order; classes tied in votes are ranked by index (rank_classes).
    """
    device = train_feats.device
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_feats = F.normalize(train_feats.float(), dim=1)
    train_labels = train_labels.to(device)
    k = min(k, train_feats.shape[0])
    chunk = max(1, chunk_elements // train_feats.shape[0])
    correct_top1 = correct_top5 = 0
    for start in range(0, test_feats.shape[0], chunk):
        queries = F.normalize(test_feats[start:start + chunk].to(device).float(), dim=1)   # (q, F)
        sims = queries @ train_feats.T                                         # (q, F) x (F, M) -> (q, M)
        top_sims, top_idx = sims.topk(k, dim=1)                                # (q, k)
        weights = (top_sims / temperature).exp()                               # exp(s / T), (q, k)
        votes = torch.zeros(queries.shape[0], num_classes, device=device)      # (q, C)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        ranked = rank_classes(votes)                                           # (q, 5)
        truth = test_labels[start:start + chunk].to(device).unsqueeze(1)       # (q, 1)
        correct_top1 += (ranked[:, :1] == truth).sum().item()
        correct_top5 += (ranked == truth).any(dim=1).sum().item()
    n = test_feats.shape[0]
    return 100.0 * correct_top1 / n, 100.0 * correct_top5 / n if num_classes > TOP_K else None


# ----------------------------------------------------------------------------------------------------
# The linear probe of the evaluation code the paper cites (persistent, Adam, raw features): online in train.py,
# offline here

PAPER_PROBE_EPOCHS = 2           # epochs of the setup's probe at each evaluation
PAPER_PROBE_BATCH = 256
# A 200-epoch run of the paper's setup evaluates after epochs 1, 6, ..., 196 (its code evaluates when the
# 0-based epoch is a multiple of 5) and train.py adds the end: 41 evaluations, 82 probe epochs in all.
PAPER_EVALUATIONS = 41


def seeded_linear(num_features, num_classes, seed):
    """nn.Linear(num_features, num_classes) initialised by PyTorch's default law, U(-1/sqrt(F), 1/sqrt(F))
    for the weight and the bias, but drawn from a generator seeded by `seed`, so that the probe's weights do
    not depend on the global random stream (nn.Linear's own initialisation draws from it, then is replaced)."""
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(num_features, num_classes)
    bound = 1 / math.sqrt(num_features)
    with torch.no_grad():
        for parameter in (layer.weight, layer.bias):
            parameter.copy_(torch.rand(parameter.shape, generator=generator) * 2 * bound - bound)
    return layer


class PaperLinearProbe:
    """The linear probe of the paper's evaluation setup, the online benchmark of Kalapos & Gyires-Toth
    2024 (file pretrain/online_classification_benchmark.py of their code), as train.py runs it (the module
    docstring relates it to Table I and Figures 6-8). One linear layer on the raw, unstandardised backbone
    features, trained by Adam at PyTorch's defaults (learning rate 1e-3, no weight decay, constant) on
    batches of 256, and kept from one evaluation to the next. Each evaluation trains it PAPER_PROBE_EPOCHS
    more epochs on the features of the moment, then scores the test split. The layer and Adam's moments
    are the state a checkpoint keeps (state_dict), so that a resumed run continues the same probe.

    Online, its figure depends on the history of the run: features that drift between evaluations leave
    a probe fitted to older ones, and 2 epochs a time is far from convergence early on. It is the number
    to set beside the paper's, not the best linear accuracy (offline_linear_probe gives its best case).
    """

    def __init__(self, num_features, num_classes, device, seed=0):
        self.layer = seeded_linear(num_features, num_classes, seed).to(device)
        self.optimizer = torch.optim.Adam(self.layer.parameters())         # lr 1e-3, no decay: the defaults

    def train_round(self, feats, labels, generator):
        """PAPER_PROBE_EPOCHS epochs over features (M, F) and labels (M,), on the layer's device. The order is
        drawn once per evaluation and every epoch passes over the same batches, as in the cited code, which
        shuffles while it extracts the features; the last batch may be smaller (no drop_last there)."""
        batches = torch.randperm(len(feats), generator=generator).to(feats.device).split(PAPER_PROBE_BATCH)
        for _ in range(PAPER_PROBE_EPOCHS):
            for batch in batches:
                loss = F.cross_entropy(self.layer(feats[batch]), labels[batch])    # (b, F) -> (b, C) logits
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()

    @torch.no_grad()
    def score(self, feats, labels):
        """(top-1, top-5) in percent on features (Q, F) and labels (Q,)."""
        return topk_accuracy(self.layer(feats), labels)

    def state_dict(self):
        return {"layer": self.layer.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.layer.load_state_dict(state["layer"])
        self.optimizer.load_state_dict(state["optimizer"])


def offline_linear_probe(train_feats, train_labels, test_feats, test_labels, evaluations=PAPER_EVALUATIONS):
    """The offline probe (ours): PaperLinearProbe's layer trained `evaluations` rounds of PAPER_PROBE_EPOCHS
    epochs (as many as a full run's online probe gets) on a finished network's features, which do not move
    between rounds: the online figure's best case. Returns (top-1, top-5) in percent."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = PaperLinearProbe(train_feats.shape[1], num_classes, train_feats.device, seed=0)
    generator = torch.Generator().manual_seed(0)
    for _ in tqdm(range(evaluations), desc="offline linear probe", leave=False):
        probe.train_round(train_feats, train_labels, generator)
    return probe.score(test_feats, test_labels)


@torch.no_grad()
def topk_accuracy(logits, labels):
    """(top-1, top-5) accuracy in percent of (Q, C) logits; top-5 is None when C <= 5 (knn_accuracy)."""
    ranked = rank_classes(logits)
    truth = labels.unsqueeze(1)
    return (100.0 * (ranked[:, :1] == truth).float().mean().item(),
            100.0 * (ranked == truth).any(dim=1).float().mean().item() if logits.shape[1] > TOP_K else None)


# ----------------------------------------------------------------------------------------------------
# The script: one row of Table I

TABLE_COLUMNS = ("dataset", "method", "arch", "epoch", "linear_top1", "linear_top5", "knn_top1",
                 "knn_top5")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("--probe", choices=("both", "linear", "knn"), default="both", help="which probes to run")
    p.add_argument("--knn-k", type=int, default=200, help="neighbours that vote")
    p.add_argument("--knn-temperature", type=float, default=0.1, help="T in the vote weight exp(s/T)")
    p.add_argument("--json", help="JSON-lines file to append the result to (default: eval.jsonl beside the checkpoint)")
    p.add_argument("--table", help="Markdown file to append a Table I row to")
    p.add_argument("--export", metavar="FILE",
                   help="write the backbone as a plain state_dict in torchvision's layout (ResNets) or timm's "
                        "(ViT-Tiny), print the lines of Python that load it, and probe nothing")
    p.add_argument("--force", action="store_true", help="let --export replace an existing file (never the checkpoint "
                                                        "it reads)")
    args = parse_checkpoint_arguments(p, argv)
    args.json = args.json or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval.jsonl")
    return args


def check_args(args):
    """Every argument, before any work: the first problem as a one-line message, or None."""
    return first_problem([
        numbers_are_finite(args, ("knn_temperature",)),
        (args.knn_k >= 1 and args.knn_temperature > 0,
         f"--knn-k must be >= 1 and --knn-temperature > 0 (got {args.knn_k} and {args.knn_temperature:g})"),
        knn_temperature_rule(args.knn_temperature),
        *checkpoint_argument_rules(args),
    ]) or (replaces_a_file(args.export, "--export", args.force, reading=args.checkpoint)
           or unwritable_file(args.export, "--export") if args.export else
           unwritable(args.cache_dir, "--cache-dir") or unwritable_file(args.json, "--json")
           or unwritable_file(args.table, "--table"))


def main(argv=None):
    args = parse_args(argv)
    refuse(check_args(args))
    with ctrl_c_in_one_line(f"no result was written; the features extracted so far are kept in {args.cache_dir}"):
        try:
            if args.export:
                backbone, info = load_backbone_from_args(args, quiet=True)
                lines = export_backbone(backbone, args.export)
                print(f"# {info['loaded']}\n{lines}")                      # Python a user can paste
                return None
            result = evaluate_checkpoint(args, torch.device(args.device))
        except (CheckpointError, DatasetError) as error:
            raise SystemExit(f"error: {error_message(error)}")
        keep_results(result, args.json, [(result, TABLE_COLUMNS, args.table)])
    return result


def evaluate_checkpoint(args, device):
    """Load, extract (or read cached) features, run the probes; returns the result dict."""
    backbone, info, dataset, data_dir, image_size = load_for_probing(args, device)
    digest = network_digest(args.checkpoint, info)
    timings = {}
    start = time.time()
    train_feats, train_labels, train_cached = cached_features(backbone, args.checkpoint, digest, dataset, data_dir,
                                                              "train", image_size, device, args.cache_dir, args.workers)
    test_feats, test_labels, test_cached = cached_features(backbone, args.checkpoint, digest, dataset, data_dir,
                                                           "test", image_size, device, args.cache_dir, args.workers)
    timings["features_s"] = time.time() - start
    extracted = len(train_labels) * (not train_cached) + len(test_labels) * (not test_cached)
    classes = len(set(train_labels.tolist()))
    if classes < 2:
        raise DatasetError(f"{dataset} has fewer than 2 classes in its training split; a probe needs at least 2")

    result = {"dataset": dataset, "method": info["method"], "arch": info["arch"], "epoch": info["epoch"],
              "checkpoint": os.path.abspath(args.checkpoint), "image_size": image_size,
              "train_images": len(train_labels), "test_images": len(test_labels)}
    if args.probe in ("both", "knn"):
        start = time.time()
        result["knn_top1"], result["knn_top5"] = knn_accuracy(
            train_feats.to(device), train_labels, test_feats, test_labels, args.knn_k, args.knn_temperature)
        timings["knn_s"] = time.time() - start
        result.update(knn_k=args.knn_k, knn_temperature=args.knn_temperature)
    if args.probe in ("both", "linear"):
        start = time.time()
        splits = (train_feats.to(device), train_labels.to(device), test_feats.to(device), test_labels.to(device))
        result["linear_top1"], result["linear_top5"] = offline_linear_probe(*splits)
        timings["linear_s"] = time.time() - start
    result.update({k: round(v, 2) for k, v in timings.items()})
    if classes <= TOP_K:
        print(f"note: top-5 is left out (blank in the table, null in the JSON line): with {dataset}'s "
              f"{classes} classes every top-5 is 100%")
    speed = f"{extracted / timings['features_s']:.0f} images/s" if extracted else "read from the cache"
    print(f"features {timings['features_s']:.1f} s ({speed})"
          + (f", k-NN {timings['knn_s']:.1f} s ({len(test_labels) / timings['knn_s']:.0f} queries/s)"
             if "knn_s" in timings else "")
          + (f", linear probe {timings['linear_s']:.1f} s" if "linear_s" in timings else ""))
    return result


if __name__ == "__main__":
    main()
