"""HyDeS: Hyperspherical Density Shaping, the loss.

Rodríguez-Betancourt & Casasola-Murillo, "Self-Supervised Representation Learning via Hyperspherical
Density Shaping", arXiv 2604.24498 (2026), Section III.

Notation
--------
    B         images in the batch
    V         views of each image (multi-crop: 2 global + 6 local, so V = 8)
    N = V*B   embeddings in the batch
    D         embedding dimension; every embedding z lies on the unit sphere S^{D-1}
    s_ij      cosine similarity z_i . z_j  (in [-1, 1] because ||z|| = 1)
    kappa     concentration of the von Mises-Fisher kernel (the inverse of a bandwidth)
    P(i)      the positives of i: the other V-1 views of the same image
    alpha     weight of the global entropy;  beta: weight of the local entropy
    R         processes under data parallelism, each with B images (global batch R*B; R = 1 by default)

The paper's equations
---------------------
    (1)  K(z_i, z_j) = C_D(kappa) exp(kappa s_ij)                      vMF kernel on S^{D-1}
         C_D(kappa)  = kappa^{D/2-1} / ((2 pi)^{D/2} I_{D/2-1}(kappa))  its normaliser (the paper names
                       C_D(kappa) only; this is the standard vMF normalising constant)

    (2)  H_global = E_i [ -log E_{j in batch, j != i} K(z_i, z_j) ]      entropy of the marginal
    (3)  H_local  = E_i [ -log E_{j in P(i)}          K(z_i, z_j) ]      entropy given another view
    (4)  I(Z1; Z2) ~ alpha H_global - beta H_local                      mutual information

Training minimises  loss = beta H_local - alpha H_global, which maximises (4). Only alpha = beta = 1 is
the mutual-information estimate proper; the paper adds the weights "to facilitate experiments" (Section
VII-C varies beta).

What the code computes
----------------------
An inner mean of kernel values is a log-mean-exp, evaluated stably as

    log (1/M) sum_j C exp(kappa s_ij) = log C + logsumexp_j(kappa s_ij) - log M.

The entropies are returned in nats with log C included, so they are true differential entropies of the
kernel density estimate (a uniform density on S^{D-1} has entropy log|S^{D-1}|), not entropies up to a
constant. The constant log C never changes a gradient (kappa is a setting of the run, not a weight),
and at alpha = beta it cancels from the loss value as well.

Which pairs P(i) holds
----------------------
Eq. (3) does not say which views P(i) holds. We take every other view of the same image: a global
crop's positives are the other global crop and the 6 local ones, a local crop's are the 2 globals and the
5 other locals, so local-local pairs count as much as local-global ones. DINO, whose multi-crop the paper
uses, compares each view with the global views only (its teacher sees only globals); restricting P(i) to
global views would be the analogue here. The paper says only "the set P(i) of positive pairs of i";
every other view is our reading.

Neighbours
----------
Wang & Isola's uniformity loss, log E_{i,j} exp(-t ||z_i - z_j||^2), is a log of a mean over all pairs: a
Renyi-2 entropy estimate. On the sphere ||z_i - z_j||^2 = 2 - 2 s_ij, so its Gaussian kernel is a vMF
kernel with kappa = 2t. HyDeS instead takes the mean of logs (a Shannon entropy, by leave-one-out
resubstitution). InfoNCE's denominator, log sum_j exp(s_ij / tau), is the same per-anchor log-mean-exp as
H_global with kappa = 1/tau; its numerator is H_local with a single positive.
"""

import math
from functools import lru_cache

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------
# The vMF normaliser C_D(kappa) of Eq. (1)

def _log_bessel_series(nu, x):
    """log sum_{k>=0} (x^2/4)^k / (k! Gamma(k+nu+1)), in float64.

    I_nu(x) = (x/2)^nu times this sum (the power series of the modified Bessel function of the first
    kind). Why the series is enough for every (nu, x) this project needs:
      - all terms are positive, so summing them in log space (logsumexp) loses no precision to
        cancellation, however large x is;
      - the ratio of consecutive terms is (x/2)^2 / ((k+1)(k+nu+1)) < 1/4 once k+1 > x, so after
        K = ceil(x) + 64 terms the remainder is below 4^-64 of the last term: truncation error is far
        under float64 rounding. For x <= 1e3 that is at most ~1100 terms, computed once and cached.
    The error left is float64 rounding of lgamma, about 1e-16 * lgamma(K + nu) ~ 1e-12 in the log.
    """
    num_terms = int(math.ceil(x)) + 64
    k = torch.arange(num_terms, dtype=torch.float64)
    if x == 0.0:
        return -math.lgamma(nu + 1.0)          # only the k = 0 term survives
    log_terms = k * (2.0 * math.log(x / 2.0)) - torch.lgamma(k + 1.0) - torch.lgamma(k + nu + 1.0)
    return torch.logsumexp(log_terms, dim=0).item()


@lru_cache      # the series is summed once per (D, kappa) a run uses
@torch.compiler.assume_constant_result      # a number of the settings: torch.compile folds it into its graph
def log_vmf_normalizer(dim, kappa):
    """Eq. (1): log C_D(kappa) = (D/2 - 1) log kappa - (D/2) log 2 pi - log I_{D/2-1}(kappa).

    Returned as a Python float (float64 accuracy). Writing I_nu(kappa) = (kappa/2)^nu S(kappa) with
    S the series above, the (D/2 - 1) log kappa terms cancel exactly and

        log C_D(kappa) = nu log 2 - (D/2) log 2 pi - log S(kappa),    nu = D/2 - 1,

    which stays accurate as kappa -> 0 (no log 0, no cancellation of two huge logs) and gives at
    kappa = 0 exactly -log|S^{D-1}|, the uniform density: a vMF kernel with no concentration.
    """
    if dim < 2:
        raise ValueError(f"the vMF kernel needs an embedding dimension D >= 2, got {dim}")
    if kappa < 0:
        raise ValueError(f"kappa must be >= 0, got {kappa}")
    nu = dim / 2.0 - 1.0
    return nu * math.log(2.0) - (dim / 2.0) * math.log(2.0 * math.pi) - _log_bessel_series(nu, float(kappa))


# ----------------------------------------------------------------------------------------------------
# Eqs. (2) and (3): leave-one-out kernel density estimates of the entropy

def global_entropy(z, kappa, whole_batch=None, first_image=0):
    """Eq. (2): H_global, each embedding scored against all N-1 others of the batch.

    z: (V, B, D) float32, unit-norm: the embeddings whose entropy terms are averaged (the rows).
    whole_batch: (V, B_all, D), the batch they are scored against (the columns); z itself by default.
    Under data parallelism (see `hydes_loss`) z is one process's share and whole_batch the gathered
    global batch, in which z stands at images first_image ... first_image + B - 1.
    Returns a scalar tensor (nats), the mean over z's rows.
    The "others" include the image's own other views: the paper's B - {Z_i} removes only Z_i itself.
    """
    whole_batch = z if whole_batch is None else whole_batch
    num_views, rows_per_view, dim = z.shape
    images = whole_batch.shape[1]
    n = num_views * images                                    # N, over the whole batch
    rows = z.reshape(num_views * rows_per_view, dim)          # (V, B, D) -> (V*B, D), row v*B + b
    columns = whole_batch.reshape(n, dim)                     # (V, B_all, D) -> (N, D), column v*B_all + b
    logits = kappa * (rows @ columns.T)                       # (V*B, D) x (D, N) -> (V*B, N), kappa s_ij
    # Leave-one-out: the self term exp(kappa s_ii) = exp(kappa) is the largest in every row and would
    # swamp the estimate (the "density" would just measure the kernel's own peak). A -inf logit is an
    # exact zero inside logsumexp; multiplying by a 0/1 mask would leave exp(kappa) in the sum.
    # Row v*B + b is embedding (v, first_image + b) of the batch: column v*B_all + first_image + b.
    view = torch.arange(num_views, device=z.device)[:, None]                  # (V, 1)
    image = first_image + torch.arange(rows_per_view, device=z.device)[None]  # (1, B)
    self_column = (view * images + image).reshape(-1, 1)                      # (V*B, 1)
    logits = logits.scatter(1, self_column, float("-inf"))
    log_mean_kernel = torch.logsumexp(logits, dim=1) - math.log(n - 1)        # (V*B,)
    return -(log_vmf_normalizer(dim, kappa) + log_mean_kernel).mean()


def local_entropy(z, kappa):
    """Eq. (3): H_local, each embedding scored against P(i), the other V-1 views of its image.

    z: (V, B, D) float32, unit-norm. Returns a scalar tensor (nats). Only the V x V blocks of
    same-image pairs are needed, so they are computed directly rather than masked out of the N x N
    matrix of Eq. (2): O(B V^2 D) work instead of O(B^2 V^2 D).
    """
    num_views, batch, dim = z.shape
    logits = kappa * torch.einsum("vbd,wbd->bvw", z, z)       # (V,B,D),(V,B,D) -> (B, V, V)
    self_mask = torch.eye(num_views, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))     # a view is not its own positive
    log_mean_kernel = torch.logsumexp(logits, dim=2) - math.log(num_views - 1)   # (B, V)
    return -(log_vmf_normalizer(dim, kappa) + log_mean_kernel).mean()


# ----------------------------------------------------------------------------------------------------
# Data parallelism: H_global over the global batch

def data_parallel():
    """True inside an initialised torch.distributed process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GatherBatch(torch.autograd.Function):
    """all_gather with a backward pass: every process's (V, B, D) -> (V, R*B, D) on all, in rank order.

    The plain dist.all_gather returns tensors cut from the autograd graph. Here the backward pass hands
    process q, for its own slice, the SUM over all processes r of the gradients that flowed into that
    slice on r (a reduce-scatter, done as an all_reduce and a slice: gloo has no reduce-scatter, and the
    embeddings are small). `hydes_loss` relies on that sum. (torch.distributed.nn.functional.all_gather
    does the same but is deprecated in favour of a private API.)
    """

    @staticmethod
    def forward(ctx, z):
        slices = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(slices, z.contiguous())                # R tensors (V, B, D)
        return torch.cat(slices, dim=1)                        # -> (V, R*B, D)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()                               # (V, R*B, D), this process's gradient
        dist.all_reduce(grad)                                  # summed over the R processes
        batch = grad.shape[1] // dist.get_world_size()
        first = dist.get_rank() * batch
        return grad[:, first:first + batch]                    # -> (V, B, D), this process's slice


def hydes_loss(z, kappa=1.0, alpha=1.0, beta=1.0):
    """Eq. (4): the HyDeS objective for embeddings z of shape (V, B, D), already on the unit sphere.

    Returns a dict of scalar tensors:
        loss      beta H_local - alpha H_global   (minimise this)
        h_global  Eq. (2), nats
        h_local   Eq. (3), nats
        mi        H_global - H_local, the mutual-information estimate of Eq. (4) with alpha = beta = 1,
                  whatever weights the loss uses: with beta = 0.5 the loss is no longer minus an MI
                  estimate (the paper: only alpha = beta = 1 maximises it), and a logged "mi" of
                  alpha H_global - beta H_local (about -170 nats there) would read as one

    Precision: the similarities and logsumexps run in float32 even under autocast. In bf16 a cosine
    near 1 carries only ~3 significant digits, and in fp16 exp(kappa s) overflows once kappa s >
    ln 65504 ~ 11.1; logsumexp itself never overflows, but it needs its inputs in a wide format.

    Data parallelism (torch.distributed initialised, R > 1 processes of B images each, all the same B):
    H_global is the leave-one-out estimate over the global batch of R*B images, as one process with the
    concatenated batch would compute it; H_local needs only each image's own views, so stays local.
    Process r returns its share, the means over its own V*B rows only:
        loss_r = beta H_local,r - alpha H_global,r,     loss = (1/R) sum_r loss_r   (the one-process loss).
    Why the gradients come out right with no rescaling: loss_r depends on process q's embeddings z_q
    through the gathered columns, so the one-process gradient is d loss/d z_q = (1/R) sum_r d loss_r/d z_q.
    `GatherBatch`'s backward hands process q the sum sum_r d loss_r/d z_q = R d loss/d z_q, and DDP then
    averages the parameter gradients over the R processes: (1/R) sum_q R (d loss/d z_q)(d z_q/d theta)
    = d loss/d theta. (An implementation whose gather keeps only the local gradient would need loss_r
    times R instead.) test_hydes.py checks this against one process on the concatenated batch. The
    returned values are each process's share: average them over processes (all_reduce) to log the loss.
    """
    if z.dim() != 3:
        raise ValueError(f"hydes_loss expects z of shape (V, B, D), got {tuple(z.shape)}")
    num_views, batch, _ = z.shape
    if num_views < 2:
        raise ValueError(f"H_local needs at least 2 views of each image, got V = {num_views}")
    if num_views * batch < 2:
        raise ValueError("H_global needs at least 2 embeddings in the batch")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        if data_parallel():
            everyone = GatherBatch.apply(z)                                      # (V, R*B, D)
            h_global = global_entropy(z, kappa, everyone, first_image=dist.get_rank() * batch)
        else:
            h_global = global_entropy(z, kappa)
        h_local = local_entropy(z, kappa)
    return {"loss": beta * h_local - alpha * h_global, "h_global": h_global, "h_local": h_local,
            "mi": h_global - h_local}

