"""Frozen features of a whole dataset, extracted in the probes' precision and cached on disk.

Machinery: a reader of the method may skip this file; what it computes is `backbone(images)` in eval
mode over a split, under torch.no_grad. evaluate.py, analyze.py and train.py's monitor call
`extract_features`; evaluate.py and analyze.py go through `cached_features`, whose key follows the
checkpoint's bytes, the split's files and the precision, so that a second probe extracts nothing and a
changed checkpoint or split is extracted anew.
"""

import hashlib
import json
import os

import torch
from tqdm import tqdm

from checkpoints import CheckpointError, write_atomically
from data import dataset_split, eval_transform, normalize
from settings import features_precision, precision_for


@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size=256, workers=2, desc="features", exact=False,
                     checkpoint=None):
    """Frozen features of a whole dataset: (N, F) float32 on the CPU, and labels (N,) int64, from normalised
    images (eval_transform) or uint8 ones. Features that are not finite (broken weights) raise a
    CheckpointError naming `checkpoint`: no probe should score them.

    exact=False: in features_precision, fast and enough for the probes. exact=True: in float32, for
    analyze.py, whose numerical ranks count singular values above float32 rounding: bf16's 8-bit mantissa
    fills the null space, so a rank-16 matrix comes out as rank 200 or more."""
    if isinstance(dataset, torch.utils.data.TensorDataset):     # images already in memory (train.py's monitor):
        images, targets = dataset.tensors                          # slices of them, no loader, no per-image Python
        loader = [(images[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    else:
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
        labels.append(targets.cpu())
    backbone.train(was_training)
    features = torch.cat(features)                                 # (N, F)
    broken = (~torch.isfinite(features).all(dim=1)).sum().item()
    if broken:
        raise CheckpointError(f"{checkpoint or 'the network'} gives features that are not finite (NaN or inf) for "
                              f"{broken} of {len(features)} images: its weights are broken (a run that diverged?); "
                              f"probe another checkpoint")
    return features, torch.cat(labels)


def cached_features(backbone, checkpoint, checkpoint_digest, dataset, data_dir, split, image_size, device, cache_dir,
                    workers=2, exact=False):
    """extract_features of `checkpoint` for one split, read from cache_dir when the same key was extracted before.
    Returns (features (N, F), labels (N,), whether they came from the cache).

    The key: the checkpoint's bytes, the dataset, its folder, the split, the resolution, the split's files
    and the precision of the forward pass (exact: see extract_features), so that features extracted under
    bf16 never stand in for float32 ones. A cache file that cannot be read is extracted anew."""
    data = dataset_split(dataset, data_dir, split, eval_transform(image_size))
    # The split's class names and, for image folders, every file's path, size and time, so that adding,
    # removing or replacing an image changes the key (CIFAR's and STL-10's arrays are fixed files)
    files = hashlib.sha256(json.dumps([list(data.classes), len(data)]).encode())
    for path, label in getattr(data, "samples", []):
        stat = os.stat(path)
        files.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    key = {"checkpoint": checkpoint_digest, "dataset": dataset, "data_dir": os.path.abspath(data_dir),
           "split": split, "image_size": image_size, "files": files.hexdigest(),
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
                                        exact=exact, checkpoint=checkpoint)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        write_atomically(path, lambda f: torch.save({"key": key, "features": features, "labels": labels}, f))
    except OSError as error:        # a full disk: the features are in memory, so the probes go on without a cache
        print(f"warning: could not cache the {split} features in {cache_dir} ({error.strerror or error}); "
              f"they will be extracted again next time")
    return features, labels, False
