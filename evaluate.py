"""Evaluate a frozen backbone: k-NN classification on its dataset's labelled splits.

    python evaluate.py runs/cifar10-resnet18/ckpt.pt

The k-NN protocol is the weighted cosine vote used across the field (Wu et al. 2018, InstDisc; DINO):
each test feature finds its k most similar training features (cosine similarity s), each neighbour votes
for its class with weight exp(s / T), and the class with the largest summed weight wins. Defaults
k = 200, T = 0.1. train.py's online monitor calls the same functions.
"""

import argparse

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DatasetError, dataset_split, eval_transform
from models import build_backbone


@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size=256, workers=2, desc="features"):
    """Frozen features of a whole dataset: (N, F) float32 on the CPU, and labels (N,) int64."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for images, targets in tqdm(loader, desc=desc, leave=False):
        with autocast:
            features.append(backbone(images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=200, temperature=0.1, chunk_elements=2**26):
    """Weighted k-NN top-1 and top-5 accuracy in percent.

    train_feats (M, F), test_feats (Q, F): any scale (they are L2-normalised here). Queries are processed
    in chunks of about chunk_elements / M so that the (chunk, M) similarity matrix stays bounded in
    memory, whatever the size of the training set.
    """
    device = train_feats.device
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_feats = F.normalize(train_feats.float(), dim=1)
    test_feats = F.normalize(test_feats.float(), dim=1)
    k = min(k, train_feats.shape[0])
    chunk = max(1, chunk_elements // train_feats.shape[0])
    correct_top1 = correct_top5 = 0
    for start in range(0, test_feats.shape[0], chunk):
        queries = test_feats[start:start + chunk].to(device)                  # (q, F)
        sims = queries @ train_feats.T                                         # (q, F) x (F, M) -> (q, M)
        top_sims, top_idx = sims.topk(k, dim=1)                                # (q, k)
        weights = (top_sims / temperature).exp()                               # exp(s / T), (q, k)
        votes = torch.zeros(queries.shape[0], num_classes, device=device)      # (q, C)
        votes.scatter_add_(1, train_labels.to(device)[top_idx], weights)
        ranked = votes.topk(min(5, num_classes), dim=1).indices                # (q, 5)
        truth = test_labels[start:start + chunk].to(device).unsqueeze(1)       # (q, 1)
        correct_top1 += (ranked[:, :1] == truth).sum().item()
        correct_top5 += (ranked == truth).any(dim=1).sum().item()
    n = test_feats.shape[0]
    return 100.0 * correct_top1 / n, 100.0 * correct_top5 / n


def knn_evaluate(backbone, dataset, data_dir, image_size, device, k=200, temperature=0.1, workers=2):
    """Extract train and test features of a dataset's labelled splits and return k-NN (top1, top5)."""
    transform = eval_transform(image_size)
    train_feats, train_labels = extract_features(backbone, dataset_split(dataset, data_dir, "train", transform),
                                                 device, workers=workers, desc="k-NN train features")
    test_feats, test_labels = extract_features(backbone, dataset_split(dataset, data_dir, "test", transform),
                                               device, workers=workers, desc="k-NN test features")
    feats_device = device if device.type == "cuda" else torch.device("cpu")
    return knn_accuracy(train_feats.to(feats_device), train_labels, test_feats, test_labels, k, temperature)


def load_backbone(path):
    """Rebuild the backbone of a train.py checkpoint; returns (backbone, saved training arguments, epoch)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    args = checkpoint["args"]
    backbone = build_backbone(args["arch"], args["global_size"], args["width"], args["depth"], args["heads"])
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["model"].items() if k.startswith(prefix)})
    return backbone, args, checkpoint["epoch"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a ckpt.pt written by train.py")
    parser.add_argument("--dataset", help="evaluate on another dataset than the one trained on")
    parser.add_argument("--data-dir", help="root of the dataset (default: the one saved in the checkpoint)")
    parser.add_argument("--knn-k", type=int, default=200, help="neighbours that vote (default 200)")
    parser.add_argument("--knn-temperature", type=float, default=0.1, help="T in the vote weight exp(s/T)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    try:
        backbone, train_args, epoch = load_backbone(args.checkpoint)
    except (FileNotFoundError, IsADirectoryError):
        raise SystemExit(f"error: no checkpoint at {args.checkpoint!r}; pass the ckpt.pt that train.py wrote")
    device = torch.device(args.device)
    dataset = args.dataset or train_args["dataset"]
    data_dir = args.data_dir or train_args["data_dir"]
    try:
        top1, top5 = knn_evaluate(backbone.to(device), dataset, data_dir, train_args["global_size"], device,
                                  args.knn_k, args.knn_temperature, args.workers)
    except DatasetError as error:
        raise SystemExit(f"error: {error}")
    print(f"{dataset} {train_args['arch']} after {epoch} epochs: "
          f"k-NN (k={args.knn_k}, T={args.knn_temperature}) top-1 {top1:.2f}  top-5 {top5:.2f}")


if __name__ == "__main__":
    main()
