"""The fast form of the multi-crop: data.MultiCrop's recipe for a whole uint8 batch at once, on the device.

Machinery: a reader of the method may skip this file. data.MultiCrop is the specification, one PIL image
at a time; this file makes the same views (tested against it, view by view and in distribution) from a
uint8 batch already on the training device, because eight PIL views per image on CPU workers starve a
GPU. Both take the one recipe, data.ViewRecipe / data.dino_recipes. train.py calls it as

    crops = BatchedMultiCrop(dino_recipes(32, 16))
    views = crops(images, generator)          # (B, 3, H, W) uint8 -> V tensors (B, 3, h, w), normalised

Every step is one tensor operation over the batch with per-image random parameters. At CIFAR size a
GPU runs each such operation in microseconds, so a step's cost is the number of operations the host
launches, not their arithmetic. Four choices keep that number small and independent of the image size
and the batch (benchmark.py counts them):
  - the views that share a size and a crop scale are one batch: the 6 local views of B images are one
    (6B, ...) tensor, each image with its own parameters;
  - the random parameters (a few numbers per image) are drawn on the CPU from a torch.Generator, so a
    seed gives the same views on any device, and they reach the device in ONE copy;
  - a step with probability p runs on every image, with an identity parameter for the images it skips
    (factor 1, hue shift 0, grey weight 0), but for the blur and the solarisation, whose work is worth
    gathering the chosen images (`on_chosen_`);
  - brightness, contrast and saturation are blends, and contrast and saturation fold into one.
Images are floats in [0, 1] from the crop on. PIL rounds to uint8 after every step, which moves values
by up to ~1/255 per step. Where the result deviates from MultiCrop (fixed jitter order, one clip for
contrast and saturation, sampled Gaussian blur, one clip after the crop's two passes) the functions
below say so.
"""

import math
from functools import lru_cache

import torch

from data import IMAGENET_MEAN, IMAGENET_STD
from precision import cpu_has_native_bf16

LUMA = (0.299, 0.587, 0.114)        # ITU-R 601 weights, PIL's convert("L") and torchvision's grayscale


def constant(values, device, dtype):
    """A small tensor of `values` (a tuple) on `device`, made once per device and dtype: a tensor built
    from a Python list on a GPU is a copy the host waits for, which a training step should not. Under
    torch.compile (step_graph.py) a constant of the compiled graph instead."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return cached_constant(values, device, dtype)


@lru_cache(maxsize=None)
def cached_constant(values, device, dtype):
    return torch.tensor(values, dtype=dtype).to(device)


def view_groups(recipes):
    """The views made as one batch, those of one crop size and scale (and flip, jitter strengths and blur
    range, which a group shares): lists of view indices, in order of first appearance (DINO's: [0, 1], the
    globals, and [2, ..., 7], the locals)."""
    groups = {}
    for i, recipe in enumerate(recipes):
        key = (recipe.size, recipe.scale, recipe.flip_p, recipe.jitter, recipe.blur_sigma)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def sample_crop_boxes(batch, height, width, scale, generator, ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision's RandomResizedCrop.get_params for `batch` images at once -> (B, 4) int64 boxes
    (x0, y0, w, h) in pixels.

    Per image, as torchvision: up to 10 attempts of an area fraction ~ U(scale) and an aspect ratio
    log-uniform in `ratio`, rounded to whole pixels; the first attempt that fits is kept and placed
    uniformly; if none fits, the largest centred crop whose aspect ratio lies in `ratio`. All attempts
    are drawn at once and the first fitting one picked: the same distribution as the loop.
    """
    area = torch.empty(batch, attempts).uniform_(*scale, generator=generator) * (height * width)  # (B, 10)
    log_ratio = torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * aspect)).long()                       # (B, 10); round half to even,
    h = torch.round(torch.sqrt(area / aspect)).long()                       # as Python's round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)                 # (B, 10)
    first = fits.long().argmax(dim=1, keepdim=True)                         # (B, 1), first fitting attempt
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]               # (B,)
    # Fallback, the same for every image of the size: the whole image, cut to the nearest allowed ratio.
    if width / height < ratio[0]:
        fallback_w, fallback_h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        fallback_w, fallback_h = int(round(height * ratio[1])), height
    else:
        fallback_w, fallback_h = width, height
    found = fits.any(dim=1)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    # x0 ~ U{0, ..., width - w}, like torch.randint(0, width - w + 1); centred for the fallback.
    u = torch.rand(batch, 2, generator=generator)
    x0 = torch.where(found, (u[:, 0] * (width - w + 1)).long(), (width - w) // 2)
    y0 = torch.where(found, (u[:, 1] * (height - h + 1)).long(), (height - h) // 2)
    return torch.stack([x0, y0, w, h], dim=1)


def crop_geometry(boxes, flip, size):
    """Where the output pixels of each crop lie in its image, on the CPU: boxes (N, 4) (x0, y0, w, h),
    flip (N,) bool -> dict of (2, N) float tensors, [0] along the rows (y), [1] along the columns (x):

        first, step   output pixel i is centred on source position first + i step, where source pixel j
                      is centred on j: as PIL's Resample.c, on start + (i + 1/2) length / size - 1/2
        widening      max(1, length / size): when shrinking, PIL widens the kernel by this factor, so that
                      it also filters out the detail too fine for the output (antialiasing)
        middle, half  source pixel j lies in the crop when |j - middle| < half

    A mirrored crop reads its columns from the right (output i at output size-1-i's centre, a negative
    step), so the flip costs nothing on the device.
    """
    x0, y0, w, h = boxes.float().unbind(1)
    start, length = torch.stack([y0, x0]), torch.stack([h, w])                  # (2, N), rows then columns
    scale = length / size                                                       # source pixels per output pixel
    mirrored = torch.stack([torch.zeros_like(flip), flip])                      # (2, N); rows never mirror
    first = start - 0.5 + torch.where(mirrored, size - 0.5, 0.5) * scale
    return {"first": first, "step": torch.where(mirrored, -scale, scale), "widening": scale.clamp_min(1.0),
            "middle": start + (length - 1) / 2, "half": length / 2}


def cubic_kernel(t, a=-0.5):
    """PIL's bicubic filter (Keys' cubic convolution, a = -0.5): weight of a pixel t pixels away, 0 from |t| = 2."""
    t = t.abs().clamp_max(2)                                      # far(2) = 0, so the clamp zeroes |t| > 2
    near = ((a + 2) * t - (a + 3)) * t * t + 1                    # |t| < 1
    far = (((t - 5) * t + 8) * t - 4) * a                         # 1 <= |t| <= 2
    return torch.where(t < 1, near, far)


def resize_matrices(geometry, size, source_size):
    """The weights of PIL's bicubic resize of each crop, along the rows and the columns at once:
    geometry (crop_geometry's, on the device) -> (2, N, size, source_size), row i of matrix [a, n] the
    weights output pixel i of crop n gives each source pixel along axis a; each row sums to one.

    Source pixels outside the crop get no weight, as PIL resizes the cut crop. Only the pixels under the
    kernel (taps) are evaluated, then added into the full rows. The kernel reaches less than 2 widening
    pixels, and no crop is wider than the image, so 2 ceil(2 source_size / size) taps around the centre
    cover it: a bound known without reading the boxes on the host.
    """
    reach = math.ceil(2 * source_size / size)
    device = geometry["first"].device
    positions = constant(tuple(range(size)), device, torch.float32).view(-1, 1)              # (size, 1)
    taps = constant(tuple(range(1 - reach, reach + 1)), device, torch.float32)                # (T,)
    first, step, widening, middle, half = (geometry[k][..., None, None] for k in
                                           ("first", "step", "widening", "middle", "half"))  # each (2, N, 1, 1)
    centre = torch.addcmul(first, step, positions)                                           # (2, N, size, 1)
    source = torch.floor(centre) + taps                                                      # (2, N, size, T)
    weights = cubic_kernel((source - centre) / widening) * ((source - middle).abs() < half)
    weights = weights / weights.sum(dim=3, keepdim=True)
    matrices = torch.zeros(*centre.shape[:3], source_size, device=device)
    # taps outside the image have weight 0 (outside the crop), so clamping their index changes nothing
    return matrices.scatter_add_(3, source.clamp(0, source_size - 1).long(), weights)


@lru_cache(maxsize=None)
@torch.compiler.assume_constant_result
def products_dtype(device):
    """The dtype of the crops' matrix products (the resize and the blur) on `device`: bf16 on a CPU that
    multiplies it natively (AVX-512 BF16 or AMX), where they run several times faster than in float32
    (SPEED.md); float32 elsewhere: on CPUs without it bf16 is emulated, and on a
    GPU the products are a sliver of a step bound by launches, which the casts would add to."""
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def resized_crops(source, geometry, size):
    """Cut each crop from its image, resize it to size x size, mirror it where crop_geometry says:
    source (B, H, 3, W) pixel values 0 ... 255 in the products' dtype (products_dtype), the image's
    channels side by side in each row; n crops per image (geometry (2, n B), crop b of view v at v B + b)
    -> (n B, 3, size, size) float32 in [0, 1].

    PIL's crop-then-bicubic-resize is separable: R X C^T, one matrix per axis and crop. Along the rows
    all n crops and 3 channels of an image at once, (B, n size, H) @ (B, H, 3 W); then, channels first,
    along the columns one product per crop, (n B, 3 size, W) @ (n B, W, size). PIL clips the cubic's
    overshoot to [0, 255] after each of its two passes; here once, at the end (a difference only next to
    sharp edges).

    In bf16 (products_dtype) the source is exact, as bf16 holds the integers 0 ... 255 exactly; what it
    rounds is each weight, by up to 2^-8 of itself (so a pixel's weights sum to one within about 0.4%),
    and each pass's output, to bf16's grid: whole grey levels from 128 to 256, as PIL rounds, finer below,
    steps of 2 levels above 256 (the cubic's overshoot, clipped at the end). Where the weights' sum is
    near one the rounded output mostly lands back on the source's level: on 200 CIFAR-10 images, 0.29
    grey levels from PIL on average in float32, 0.32 in bf16; at most 2 levels off on a smooth image,
    1.1 in float32. (Dividing by the rounded weights' sums halved the worst case, a flat region's, but
    moved the average to 0.35: such outputs no longer land on whole levels.)
    """
    batch, height, _, width = source.shape
    rows, columns = resize_matrices(geometry, size, max(height, width)).to(source.dtype)   # each (n B, size, max(H, W))
    views = len(rows) // batch
    rows = rows[..., :height].reshape(views, batch, size, height).transpose(0, 1).reshape(batch, -1, height)
    crops = torch.bmm(rows, source.view(batch, height, 3 * width))             # (B, n size, 3 W)
    crops = crops.view(batch, views, size, 3, width).permute(1, 0, 3, 2, 4).reshape(-1, 3 * size, width)
    crops = torch.bmm(crops, columns[..., :width].transpose(1, 2))             # (n B, 3 size, size)
    crops = crops.view(-1, 3, size, size)
    return crops.float().div_(255).clamp_(0, 1)                                # (n B, 3, size, size) in [0, 1]


def per_image(values):
    """(N,) per-image values -> (N, 1, 1, 1), to broadcast over (N, 3, h, w)."""
    return values.view(-1, 1, 1, 1)


def luminance(x):
    """The luma: (N, 3, h, w) -> (N, 1, h, w)."""
    r, g, b = x.split(1, dim=1)
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2])


def color_jitter_(x, brightness, contrast, saturation, hue):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) in place, with each image's own factors (N,) (identity: 1, 1, 1,
    0), in the fixed order brightness, contrast, saturation, hue: (N, 3, h, w) in [0, 1] -> x.

    Deviation: torchvision draws a new order of the four operations at every call; here it is always
    the same. Why that changes little: the first three are blends of the image with black, with its mean
    grey level m and with its own grey version, and each keeps the grey levels the others blend with (in
    proportion), so they commute exactly until a value is clipped at 0 or 1 (test_hydes.py checks this).
    The same fact folds contrast f and saturation g into one blend, as lum(f x + (1 - f) m) = f lum(x) +
    (1 - f) m:   g (f x + (1 - f) m) + (1 - g) lum(f x + (1 - f) m) = g f x + (1 - g) f lum(x) + (1 - f) m,
    clipped once where PIL clips after each. On 2,000 CIFAR images with random factors it moves the mean
    difference from PIL's recipe from 1.36/255 to 1.38/255 (PIL's uint8 rounding is the rest); folding
    the brightness in too would make it 1.77/255, as its clipping changes the mean m, so it stays apart.
    """
    f, g = per_image(contrast), per_image(saturation)
    x.mul_(per_image(brightness)).clamp_max_(1)                    # the blend with black (x >= 0)
    grey = luminance(x)                                            # (N, 1, h, w)
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)                  # (N, 1, 1, 1), m
    x.mul_(g * f).add_(torch.addcmul((1 - f) * mean, (1 - g) * f, grey)).clamp_(0, 1)
    return adjust_hue_(x, hue)


def adjust_hue_(x, shift):
    """Rotate the hue by shift (N,) turns through HSV in place, as torchvision does; saturation and value
    kept: (N, 3, h, w) -> x.

    RGB -> HSV with the hue in sixths of a turn, as torchvision: by the largest channel R, G or B (on ties
    the first), hue = (g - b) / chroma, 2 + (b - r) / chroma or 4 + (r - g) / chroma. Back with the
    closed form for each channel n = 5, 3, 1 (R, G, B): value - chroma clamp(min(k, 4 - k), 0, 1),
    k = (n + hue) mod 6, which is value - chroma (2 - clamp(d, 1, 2)) with d the distance from k to the
    nearest of 2 + 6 Z. Here k = n + hue + 6 shift lies in (-1, 11) for |shift| < 1/6 turn (at most 0.1),
    where d = ||k - 5| - 3|, the distance to the nearer of 2 and 8 (the others are 3 or more away, and
    any d above 2 counts as 2): no modulo, no branch. Grey pixels (chroma 0) are unchanged whatever their hue.
    """
    r, g, b = x.split(1, dim=1)                                                  # each (N, 1, h, w)
    value = x.amax(dim=1, keepdim=True)
    chroma = value - x.amin(dim=1, keepdim=True)
    hue = torch.where(value == r, g - b, torch.where(value == g, (b - r).add_(chroma, alpha=2),
                                                     (r - g).add_(chroma, alpha=4)))
    hue = hue / chroma.clamp_min(1e-12)                                          # (N, 1, h, w), in [-1, 5)
    n = constant((5.0, 3.0, 1.0), x.device, x.dtype).view(3, 1, 1)               # R, G, B
    k = x.copy_(hue).add_(6 * per_image(shift) + n)                              # (N, 3, h, w), x's memory
    return k.sub_(5).abs_().sub_(3).abs_().clamp_(1, 2).mul_(chroma).add_(value - 2 * chroma)


def grayscale_(x, weight):
    """In place, the luma in all three channels (PIL convert("L") then back to RGB) where weight (N,) is
    1, the image where it is 0: (N, 3, h, w) -> x."""
    return x.lerp_(luminance(x), per_image(weight))                            # exact at weights 0 and 1


def blur_kernels(sigma, largest_sigma):
    """(N,) sigmas in pixels -> (N, 2 r + 1) sampled Gaussians of radius r = 3 largest_sigma (DINO's 2: 6 px,
    13 taps; the cut tails hold 0.3% of the weight at sigma = 2), normalised. Drawn on the CPU with the
    other parameters."""
    radius = math.ceil(3 * largest_sigma)
    kernels = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma.view(-1, 1) ** 2))   # (N, 13)
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_blur(x, kernels):
    """Blur each square image with its own kernel (blur_kernels'): (N, 3, s, s) -> (N, 3, s, s).

    PIL's GaussianBlur(radius) takes the standard deviation in pixels of the image it is given, so the
    same sigma ~ U(0.1, 2.0) applies to 96 and 16 px crops alike, as here. The blur is separable: M X M^T
    with one (s, s) matrix per image, (M x)_i = sum_k g_k x_clamp(i+k), the image border extended outwards
    as PIL's box filters do; two batched matrix products, faster on a CPU than a grouped convolution, in
    bf16 where the device has it natively (products_dtype): x, each pass's output and each weight
    rounded by up to 2^-8 of their values, and each output pixel divided by the sums of its rounded
    weights (r_i r_j), which makes them sum to one again. Unlike the resize's source, x is not on bf16's
    grid, so the division helps here: 0.23 grey levels from float32 on average against 0.27 without it.
    Deviation: PIL approximates the Gaussian by three extended box filters; this is the sampled Gaussian
    (inside the image they agree to ~1/255 at sigma = 2; below sigma ~1 PIL's blurs noticeably more).
    """
    count, size, radius = len(x), x.shape[-1], kernels.shape[1] // 2
    pixels = constant(tuple(range(size)), x.device, torch.long).view(-1, 1)
    source = (pixels + constant(tuple(range(-radius, radius + 1)), x.device, torch.long)).clamp(0, size - 1)   # (s, 13)
    matrices = torch.zeros(count, size, size, device=x.device).scatter_add_(
        2, source.expand(count, -1, -1), kernels[:, None, :].expand(-1, size, -1))   # (N, s, s)
    matrices = matrices.to(products_dtype(x.device))        # bf16 or float32, as resized_crops' products
    blurred = torch.bmm(x.reshape(count, 3 * size, size).to(matrices.dtype), matrices.transpose(1, 2))  # along w: (N, 3 s, s)
    blurred = matrices[:, None] @ blurred.view(count, 3, size, size)           # along h: (N, 1, s, s) @ (N, 3, s, s)
    if matrices.dtype == torch.float32:
        return blurred
    sums = matrices.float().sum(2)                                             # (N, s): r_i
    # .float() then in place: torch.div(bf16, float32) takes a slow path on a CPU (several times slower)
    return blurred.float().div_((sums[:, :, None] * sums[:, None, :])[:, None])   # / (N, 1, s, s) r_i r_j


def solarize(x):
    """Invert the pixels at or above 128/255 (PIL ImageOps.solarize: 255 - v where v >= 128)."""
    return torch.where(x >= 128 / 255, 1 - x, x)


def on_chosen_(x, chosen, operation, *per_image_args, every_crop=False):
    """x[chosen] = operation(x[chosen], *per_image_args), in place: for the steps whose work is worth
    gathering the chosen images (the blur, p = 0.1 to 1; the solarisation, 0.2 in one view), where the
    others run on every image with an identity parameter. chosen: (b,) indices as floats, on x's device
    (draw_parameters'); per_image_args: tensors (b, ...) of the chosen images. -> x

    every_crop (draw_parameters'): chosen is a (N,) 0/1 mask and per_image_args are every image's; the
    operation runs on all N images and the mask keeps its result where it is 1, x itself elsewhere
    (exactly: a selection, not a blend), so that no shape depends on what was drawn."""
    if every_crop:
        return x.copy_(torch.where(per_image(chosen) > 0, operation(x, *per_image_args), x))
    if len(chosen):                                    # a shape, known on the host: no device read
        rows = chosen.long()
        x[rows] = operation(x[rows], *per_image_args)
    return x


def normalize_(x):
    """In place, x / std - mean / std per channel with ImageNet's statistics, as T.Normalize after
    T.ToTensor: (N, 3, h, w) in [0, 1] -> x, normalised."""
    scale = constant(tuple(1 / s for s in IMAGENET_STD), x.device, x.dtype).view(3, 1, 1)
    shift = constant(tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)), x.device, x.dtype).view(3, 1, 1)
    return x.mul_(scale).add_(shift)


def draw_parameters(recipes, batch, image_size, generator, every_crop=False):
    """Every random choice of one view group (view_groups), drawn on the CPU: `recipes` the group's n
    views, `image_size` (H, W) to cut the crops from, or None for views already cut (FullImageCrops)
    -> dict of float tensors, crop b of view v at v B + b:

        first ... half                 crop_geometry's (2, n B), when cutting crops
        brightness, contrast,          (n B,) jitter factors, the identity (1, 1, 1, 0) where no jitter
        saturation, hue
        grey                           (n B,) 1 for grayscale, else 0
        blurred, kernels               (b,) indices of the crops to blur, (b, 13) their kernels
        solarised                      indices of the crops to solarise

    Every crop draws all its parameters whether or not a step applies, in an order set by the generator
    alone: the boxes (MultiCrop's RandomResizedCrop), the flips, then one (n B, 9) uniform draw. The
    chosen crops' indices are found here, on the CPU, so a GPU never waits for a nonzero().

    every_crop: the same draws in shapes that depend on nothing drawn, for a step captured as one graph
    (step_graph.py), whose tensors must keep their shapes from one step to the next: `blurred` and
    `solarised` are then (n B,) masks, 1 for a chosen crop, and `kernels` (n B, 13) holds every crop's.
    """
    count, recipe = batch * len(recipes), recipes[0]        # the group's shared size, scale, flip, jitter, blur
    parameters = {}
    if image_size is not None:
        boxes = sample_crop_boxes(count, *image_size, recipe.scale, generator)
        flip = torch.rand(count, generator=generator) < recipe.flip_p
        parameters.update(crop_geometry(boxes, flip, recipe.size))

    def chance(name):                                  # (n B,) the probability of the step in each crop's view
        return torch.tensor([getattr(recipe, name) for recipe in recipes]).repeat_interleave(batch)

    def between(u, low, high):
        return low + (high - low) * u

    u = torch.rand(count, 9, generator=generator).unbind(1)  # jitter, its 4 factors, grey, blur, sigma, solarise
    jitter = u[0] < chance("jitter_p")
    names = ("brightness", "contrast", "saturation", "hue")
    for column, (name, spread) in enumerate(zip(names, recipe.jitter), start=1):
        identity = 0.0 if name == "hue" else 1.0
        parameters[name] = torch.where(jitter, between(u[column], identity - spread, identity + spread), identity)
    parameters["grey"] = (u[5] < chance("grayscale_p")).float()
    blurred, solarised = u[6] < chance("blur_p"), u[8] < chance("solarize_p")
    if every_crop:                                                       # (n B,) masks, every crop's kernel
        parameters["blurred"], parameters["solarised"] = blurred.float(), solarised.float()
        parameters["kernels"] = blur_kernels(between(u[7], *recipe.blur_sigma), recipe.blur_sigma[1])
        return parameters
    parameters["blurred"] = torch.nonzero(blurred)[:, 0].float()        # exact as floats below 2^24
    parameters["kernels"] = blur_kernels(between(u[7][blurred], *recipe.blur_sigma), recipe.blur_sigma[1])
    parameters["solarised"] = torch.nonzero(solarised)[:, 0].float()
    return parameters


def to_device(parameters, device):
    """A list of dicts of small CPU float tensors -> the same on `device`, moved by ONE copy: on a GPU
    each copy is a transfer with a launch of its own."""
    tensors = [t for group in parameters for t in group.values()]
    packed = torch.cat([t.reshape(-1) for t in tensors])
    # From page-locked memory a GPU copies while the host goes on; from ordinary memory the copy may make
    # the host wait for the GPU to finish the previous step's work first
    packed = packed.pin_memory() if device.type == "cuda" else packed
    packed = packed.to(device, non_blocking=True)
    parts = iter(packed.split([t.numel() for t in tensors]))                    # views of the one copy
    return [{name: next(parts).view(t.shape) for name, t in group.items()} for group in parameters]


def photometric_views_(x, recipes, parameters, every_crop=False):
    """MultiCrop's steps after the flip for one view group, in place: jitter, grayscale, blur, solarise,
    normalise. x (N, 3, h, w) float in [0, 1]; parameters: draw_parameters' (drawn with `every_crop` or
    not), on x's device -> (N, 3, h, w) normalised. A step that no view of the group takes is skipped (the
    supervised baseline takes none)."""
    p = parameters
    if any(recipe.jitter_p for recipe in recipes):
        x = color_jitter_(x, p["brightness"], p["contrast"], p["saturation"], p["hue"])
    if any(recipe.grayscale_p for recipe in recipes):
        x = grayscale_(x, p["grey"])
    if any(recipe.blur_p for recipe in recipes):
        x = on_chosen_(x, p["blurred"], gaussian_blur, p["kernels"], every_crop=every_crop)
    if any(recipe.solarize_p for recipe in recipes):
        x = on_chosen_(x, p["solarised"], solarize, every_crop=every_crop)
    return normalize_(x)


CPU_CHUNK_VALUES = 4_000_000    # float32 values of the views a CPU makes at once (16 MB): 41 STL-10 images, 372 CIFAR


class BatchedMultiCrop:
    """A uint8 batch (B, 3, H, W), all images the same size, on any device -> list of V float tensors
    (B, 3, h, w), globals first, normalised: what MultiCrop gives after DataLoader collation, so the
    model code is the same. `recipes`: MultiCrop's (dino_recipes) or the supervised baseline's
    (supervised_recipes). Where it deviates from MultiCrop (fixed jitter order, one clip for contrast and
    saturation, sampled Gaussian blur, float arithmetic between steps, one clip after the crop's two
    passes) the functions above say so.

        crops = BatchedMultiCrop(dino_recipes(32, 16))   # or supervised_recipes(32): Table I's baseline
        views = crops(images.to(device), generator)     # generator: a CPU torch.Generator, seeded once

    Images of mixed sizes cannot share a batch: the loading workers cut their crops (FullImageCrops), and
    the call takes the list of V uint8 views (B, 3, s, s) instead, and adds the photometric steps.

    every_crop=True: the same views from parameters whose shapes depend on nothing drawn (draw_parameters'
    every_crop), the whole batch at once: the form that step_graph.py captures as one graph.
    """

    def __init__(self, recipes, every_crop=False):
        self.recipes, self.every_crop = recipes, every_crop
        self.groups = view_groups(recipes)
        self.group_recipes = [[recipes[i] for i in group] for group in self.groups]     # each group's n recipes

    def draw(self, batch, image_size, generator):
        """Every random choice of a step, on the CPU: one draw_parameters dict per view group."""
        return [draw_parameters(r, batch, image_size, generator, self.every_crop) for r in self.group_recipes]

    def __call__(self, images, generator):
        cut = isinstance(images, (list, tuple))                    # views already cut by the loading workers
        if cut:
            sizes = [r.size for r in self.recipes]
            if [tuple(v.shape[1:]) for v in images] != [(3, s, s) for s in sizes] or images[0].dtype != torch.uint8:
                raise ValueError(f"BatchedMultiCrop expects {len(sizes)} uint8 views (B, 3, s, s) of sides {sizes}, "
                                 f"got {[(v.dtype, tuple(v.shape)) for v in images]}")
        elif images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchedMultiCrop expects a uint8 batch (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        batch, device = len(images[0]) if cut else len(images), images[0].device
        parameters = self.draw(batch, None if cut else tuple(images.shape[2:]), generator)
        # On a GPU the whole batch at once (fewer launches). On a CPU a few images at a time: each step's
        # output then stays in the caches, and under glibc's 32 MB threshold for fresh memory from the
        # system (whose first touch of every page costs more than the arithmetic); the same views, as
        # every parameter was drawn for the whole batch.
        values = sum(3 * r.size ** 2 for r in self.recipes)                    # float32 values of one image's views
        chunk = max(1, CPU_CHUNK_VALUES // values) if device.type == "cpu" and not self.every_crop else batch
        if chunk >= batch:
            return self.views(images, to_device(parameters, device), cut)
        views = [torch.empty(batch, 3, r.size, r.size, device=device) for r in self.recipes]
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            part = [parameters_of_images(p, len(r), batch, start, stop)
                    for p, r in zip(parameters, self.group_recipes)]
            made = self.views([v[start:stop] for v in images] if cut else images[start:stop],
                              to_device(part, device), cut)
            for view, part_view in zip(views, made):
                view[start:stop] = part_view
        return views

    def views(self, images, parameters, cut):
        """The V views of images (a uint8 batch (b, 3, H, W), or V uint8 views (b, 3, s, s) when `cut`),
        with parameters drawn for them (draw_parameters', one dict per view group, on their device)."""
        batch, device = len(images[0]) if cut else len(images), images[0].device
        if not cut:       # (b, 3, H, W) uint8 -> (b, H, 3, W) 0 ... 255 in bf16 or float32 (resized_crops'), once
            source = images.permute(0, 2, 1, 3).to(products_dtype(device), memory_format=torch.contiguous_format)
        views = [None] * len(self.recipes)
        for group, group_recipes, p in zip(self.groups, self.group_recipes, parameters):
            if cut:       # n views (b, 3, s, s) uint8 -> (n b, 3, s, s) float, crop i of view v at v b + i
                x = torch.cat([images[i] for i in group]).float().div_(255)
            else:
                x = resized_crops(source, p, group_recipes[0].size)
            x = photometric_views_(x, group_recipes, p, self.every_crop)             # (n b, 3, s, s)
            for i, view in zip(group, x.split(batch)):                               # contiguous (b, 3, s, s)
                views[i] = view
        return views


def parameters_of_images(parameters, views, batch, start, stop):
    """draw_parameters' dict for the n = `views` crops of each of `batch` images -> the same for images
    start ... stop-1 alone, crop b of view v at v (stop - start) + b - start. Made on the CPU."""
    per_crop = {name: t.unflatten(-1, (views, batch))[..., start:stop].flatten(-2)
                for name, t in parameters.items() if name not in ("blurred", "kernels", "solarised")}
    for name, extra in (("blurred", "kernels"), ("solarised", None)):
        crop = parameters[name].long()                                              # (k,) crop indices v B + b
        view, image = crop // batch, crop % batch
        kept = (image >= start) & (image < stop)
        per_crop[name] = (view * (stop - start) + image - start)[kept].float()
        if extra:
            per_crop[extra] = parameters[extra][kept]
    return per_crop
