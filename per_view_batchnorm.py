"""BatchNorm per view in one call: the paper's setup's statistics at a quarter of the network calls.

Machinery: a reader of the method may skip this file. The paper's setup embeds each view on its own, so
each BatchNorm normalises one view's batch of B images. models.HyDeSModel calls the backbone once per
crop size (DINO's multi-crop forward), with k views of B images in one (k B, ...) batch. After
`convert_per_view_batchnorm(model, B)`, each BatchNorm of the model splits such a call back into its k
views: each view is normalised by its own statistics, and the running statistics move as k calls of one
view each, in order, would move them. So one call computes what k calls compute (to float rounding;
tested), with k times fewer kernel launches, which is what bounds a GPU's step at 16-96 px. The
conversion works as torch.nn.SyncBatchNorm.convert_sync_batchnorm: it swaps each BatchNorm module for
one of a subclass holding the same parameters and buffers, so state_dicts are unchanged.
"""

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F


def convert_per_view_batchnorm(module, images_per_view):
    """`module` with every BatchNorm (nn.BatchNorm1d/2d, nn.SyncBatchNorm) swapped for its per-view form,
    which splits a training-mode call of k B rows into k views of B = images_per_view images, view v in
    rows v B to (v + 1) B - 1. The new modules take over the old ones' parameters and buffers (the same
    tensors), so the state_dict is unchanged. Returns the converted module (a BatchNorm itself is
    replaced; any other module is converted in place and returned)."""
    kind = next((view_kind for kind, view_kind in PER_VIEW_KINDS if type(module) is kind), None)
    if kind is not None:
        converted = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                         **({"process_group": module.process_group} if kind is ViewSyncBatchNorm else {}))
        converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        converted.images_per_view = images_per_view
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_per_view_batchnorm(child, images_per_view))
    return module


def views_in(norm, x):
    """How many views of norm.images_per_view images a training-mode input (k B, ...) holds."""
    if x.shape[0] % norm.images_per_view:
        raise ValueError(f"a per-view BatchNorm of views of {norm.images_per_view} images was given {x.shape[0]} rows")
    return x.shape[0] // norm.images_per_view


class ViewBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode call may hold k views of the same B images: each view is
    normalised by its own statistics, and the running statistics move as k calls of one view each, in
    order, would move them (batch_norm_per_view). With one view, or in eval mode, it is nn.BatchNorm2d;
    its parameters and buffers are the same, so state_dicts load into torchvision's ResNets and back."""

    images_per_view = None              # B, set by convert_per_view_batchnorm

    def forward(self, x):
        views = views_in(self, x) if self.training else 1
        return batch_norm_per_view(self, x, views) if views > 1 else super().forward(x)


class ViewBatchNorm1d(nn.BatchNorm1d):
    """The same for (k B, C) inputs (the projector's BatchNorms), else nn.BatchNorm1d."""

    images_per_view = None

    def forward(self, x):
        views = views_in(self, x) if self.training else 1
        return batch_norm_per_view(self, x, views) if views > 1 else super().forward(x)


class ViewSyncBatchNorm(nn.SyncBatchNorm):
    """nn.SyncBatchNorm (torchrun on GPUs: statistics over every process's share of the batch) called once
    per view of a training-mode call, in order: k collectives, where the single-process form needs none.
    Its statistics cannot be grouped the way batch_norm_per_view groups them, for the collective is
    SyncBatchNorm's own."""

    images_per_view = None

    def forward(self, x):
        views = views_in(self, x) if self.training else 1
        if views == 1:
            return super().forward(x)
        return torch.cat([super(ViewSyncBatchNorm, self).forward(view) for view in x.split(self.images_per_view)])


PER_VIEW_KINDS = ((nn.BatchNorm2d, ViewBatchNorm2d), (nn.BatchNorm1d, ViewBatchNorm1d),
                  (nn.SyncBatchNorm, ViewSyncBatchNorm))
PER_VIEW_NORMS = tuple(view_kind for _, view_kind in PER_VIEW_KINDS)


def batch_norm_per_view(norm, x, views):
    """Training-mode BatchNorm of `norm` (a ViewBatchNorm) on x (k B, C, *spatial), k = `views`, each
    view v (rows v B to (v + 1) B - 1) by its own statistics; the running statistics updated as by k
    calls of one view each, in order. -> (k B, C, *spatial), in x's memory layout. For the BatchNorms
    the networks here build: affine, with running statistics and a momentum."""
    if not (norm.affine and norm.track_running_stats and norm.momentum is not None):
        raise ValueError("batch_norm_per_view needs an affine BatchNorm with running statistics and a momentum")
    channels, spatial = x.shape[1], x.shape[2:]
    batch = x.shape[0] // views
    # (k B, C, *S) -> (B, k C, *S): channel c of view v becomes channel v C + c, so that the statistics per
    # channel over (B, *S) are each view's own. One copy (views are the outer dimension), channels last
    # in memory, as x is for ResNets: (k, B, *S, C) -> (B, *S, k, C).
    channels_last = x.movedim(1, -1).unflatten(0, (views, batch))                    # (k, B, *S, C)
    grouped = channels_last.movedim(0, -2).reshape(batch, *spatial, views * channels).movedim(-1, 1)
    # Each view's running statistics as if it came first, u_v = (1 - m) r_0 + m s_v: (k C,) each
    running_mean, running_var = norm.running_mean.repeat(views), norm.running_var.repeat(views)
    y = F.batch_norm(grouped, running_mean, running_var, norm.weight.repeat(views), norm.bias.repeat(views),
                     training=True, momentum=norm.momentum, eps=norm.eps)
    with torch.no_grad():                                  # ... then as k updates in a row would leave them
        # Eager calls take c and w_v from the cache. torch.compile would ignore the cache, trace the
        # function and warn that it did: it is given the function itself, whose c and w_v become constants
        # of the graph.
        sequence = in_sequence.__wrapped__ if torch.compiler.is_compiling() else in_sequence
        start_weight, view_weights = sequence(views, norm.momentum, x.device, norm.running_mean.dtype)
        for running, once in ((norm.running_mean, running_mean), (norm.running_var, running_var)):
            running.addmv_(once.view(views, channels).T, view_weights, beta=start_weight)   # c r_0 + sum_v w_v u_v
        norm.num_batches_tracked.add_(views)
    # (B, k C, *S) -> (k B, C, *S), one copy: (B, *S, k, C) -> (k, B, *S, C)
    y = y.movedim(1, -1).unflatten(-1, (views, channels)).movedim(-2, 0).reshape(x.shape[0], *spatial, channels)
    y = y.movedim(-1, 1)
    layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    return y.contiguous(memory_format=layout)              # x's layout (a copy only if x was not channels-last)


@lru_cache(maxsize=64)
def in_sequence(views, momentum, device, dtype):
    """The running statistics after k = `views` updates in a row, r <- (1 - m) r + m s_v for v = 1..k, as
    c r_0 + sum_v w_v u_v of the start r_0 and the one-view updates u_v = (1 - m) r_0 + m s_v:
    r_k = (1 - m)^k r_0 + sum_v (1 - m)^(k - v) m s_v = c r_0 + sum_v w_v u_v, with w_v = (1 - m)^(k - v) and
    c = (1 - m)^k - (1 - m) sum_v w_v. -> (c, w (k,) on `device`), made once per (k, m, device, dtype):
    a tensor built from Python numbers on a GPU is a copy the host waits for."""
    keep = 1 - momentum
    weights = [keep ** (views - v) for v in range(1, views + 1)]
    return keep ** views - keep * sum(weights), torch.tensor(weights, dtype=dtype).to(device)
