"""Training-step throughput and numerics on one device, in one table; or, with --augmentations, the
batched multi-crop against per-image pipelines.

    python benchmark.py --device cuda               # the paper's networks, every precision and mode
    python benchmark.py --device cpu --width 16     # the same on a CPU, with a laptop-sized ResNet
    python benchmark.py --augmentations             # batched multi-crop vs DINO's PIL recipe vs Lightly

It first prints the device operations (kernel launches on a GPU) of one call of the batched crops, which
bound a GPU's step at CIFAR size more than their arithmetic: 196 per step, against 1,528 when every view
was made on its own (crop_device_operations, counted on the meta device, the same for any image size).

The settings are the paper's: CIFAR-10's ResNet-18 with 2 x 32 + 6 x 16 px views of 32 px images, and
STL-10's ViT-Tiny with 2 x 96 + 6 x 48 px views of 96 px images, batch 128, train.py's defaults for
everything else. The images are seeded uniform noise (no download): a step does the same work
whatever the pixels. For each setting, each precision the device offers (bf16 autocast, fp16 autocast
with gradient scaling, float32), each layout of a ResNet's tensors (channels_last, contiguous) and, on
a GPU, eager, torch.compile'd (with train.py's layout, and its precision unless --precision names
others) and torch.compile'd with CUDA graphs (mode "reduce-overhead", train.py --compile
reduce-overhead), and the whole step as one graph (train.py --step-graph), one row:
  img/s            whole training steps as train.py runs them: the batched crops of a uint8 batch on the
                   device, the forward pass, the loss, backward and AdamW (train.training_step); images/s
                   count source images, 8 views each
  host syncs/step  times the host waited for the GPU in a steady-state step, counted by CUDA's sync debug
                   mode (torch.cuda.set_sync_debug_mode("warn") warns at each synchronising call; its
                   documentation warns that a few kinds of synchronisation go unseen). 0 is the goal: the
                   host then queues the next step while the GPU computes this one
  peak memory      torch.cuda.max_memory_allocated over the row's steps (n/a on a CPU)
  gradient error   ||g - g64|| / ||g64||: the gradient of one step on the same weights and views, against
                   the same step in float64 (the loss itself runs in float32 in both, as hydes.py does
                   by design; that moves the reference by about 2e-7). An untrained network's gradient on
                   noise images is ill-conditioned, a sum over many pixels that BatchNorm makes cancel:
                   float32 lands anywhere from 1e-6 to 1e-2, and bf16 at 0.1 to 0.5 (rounding the views
                   alone to bf16 moves a width-16 ResNet's gradient by 23%). What the column catches is a
                   row orders of magnitude above the others of its precision, or nan: a kernel that
                   computes the wrong thing, as bf16 convolutions on the CPU below do
The row marked * is what train.py uses by default on that device (--precision auto).

SPEED.md records the tables this benchmark printed, with their machines and commands.

--augmentations times, in one process and one after the other:
  batched     batched_crops.BatchedMultiCrop on uint8 batches already in the device's memory (CPU or GPU)
  MultiCrop   data.MultiCrop, DINO's per-image PIL recipe, one image at a time
  Lightly     lightly.transforms.DINOTransform with the same views, when lightly is installed
with all of DINO's blur and solarisation. The per-image pipelines are single-threaded PIL code; where
other projects train with them they run in DataLoader workers, one per core, so on a k-core machine
multiply their rate by at most k.
"""

import argparse
import copy
import itertools
import os
import time
import traceback
import types
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import evaluate
import train
from batched_crops import BatchedMultiCrop
from checks import (NARROW_RESNET_ON_A_CPU, HelpFormatter, ctrl_c_in_one_line, first_problem, narrow_resnet_on_a_cpu,
                    numbers_are_finite, refuse, seed_rule)
from data import MultiCrop, dino_recipes
from models import STEMS, HyDeSModel, build_backbone
from per_view_batchnorm import convert_per_view_batchnorm
from precision import PRECISIONS, auto_precision, cpu_has_native_bf16, precision_for
from step_graph import WARMUP_STEPS, WholeStep

# (input side, global crop, local crop, architecture), the paper's settings for CIFAR-10/100 and STL-10
INPUTS = {"cifar": (32, 32, 16, "resnet18"), "stl10": (96, 96, 48, "vit_tiny")}
LAYOUTS = {torch.channels_last: "channels_last", torch.contiguous_format: "contiguous"}
# The table's modes -> torch.compile's mode (None: not compiled): train.py's --compile and --compile
# reduce-overhead (CUDA graphs), and train.py --step-graph without and with --compile (the whole step,
# crops to AdamW, as one CUDA graph: step_graph.py)
MODES = {"eager": None, "compiled": "default", "reduce-overhead": "reduce-overhead", "step-graph": None,
         "step-graph-compiled": "default"}
STEP_GRAPH_MODES = ("step-graph", "step-graph-compiled")
FORWARDS = ("per-view", "per-resolution")          # train.py's --forward
# Device operations of one BatchedMultiCrop call with dino_recipes(32, 16) and a batch of 128, counted as
# crop_device_operations does, when each view was made on its own (a crop, jitter, grayscale, blur,
# solarisation and normalisation per view, the chosen images of each step gathered; 105 of them
# host-to-device copies of parameters). The same for any image size and batch.
CROP_OPERATIONS_BEFORE = 1528


class DeviceOperations(TorchDispatchMode):
    """Counts the ATen operations dispatched on one device type: those with a tensor there among their
    arguments or results. Views (view, expand, slice, permute, ...) are left out: they change a tensor's
    shape and strides and launch nothing. Copies from another device are also counted apart."""

    def __init__(self, device_type):
        super().__init__()
        self.device_type, self.count, self.transfers = device_type, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        devices = {t.device.type for t in tree_flatten((args, kwargs, result))[0] if isinstance(t, torch.Tensor)}
        # _unsafe_view is a view that the schema does not mark as one (matmul reshapes its result with it)
        if self.device_type in devices and not (func.is_view or func == torch.ops.aten._unsafe_view.default):
            self.count += 1
            self.transfers += len(devices) > 1 and func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
        return result


def crop_device_operations(recipes, batch, side):
    """The device operations of one BatchedMultiCrop call on a (batch, 3, side, side) uint8 batch ->
    (operations, of which host-to-device copies). Counted on the meta device, which stands for a GPU:
    its tensors have shapes but no values, the parameters are drawn on the CPU as for a GPU, and every
    operation on the images' device is one a GPU would launch. A call before the count fills the
    per-device caches of constants (batched_crops.constant), as the first training step does."""
    crops, images = BatchedMultiCrop(recipes), torch.empty(batch, 3, side, side, dtype=torch.uint8, device="meta")
    crops(images, torch.Generator().manual_seed(0))
    with DeviceOperations("meta") as counter:
        crops(images, torch.Generator().manual_seed(1))
    return counter.count, counter.transfers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS), help="settings to time")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS,
                   help="precisions to time (auto: train.py's default on the device); default: every one the "
                        "device offers: bf16 where native on a GPU, fp16 (GPUs only) and fp32; on a CPU bf16 and fp32")
    p.add_argument("--modes", nargs="+", choices=list(MODES),
                   help="eager: the network as written; compiled: torch.compile'd as train.py --compile runs it; "
                        "reduce-overhead: as train.py --compile reduce-overhead, compiled and replayed as CUDA "
                        "graphs; step-graph: as train.py --step-graph, the whole step (crops, network, loss, AdamW) "
                        "replayed as one CUDA graph (on a CPU the same function, run as it is); step-graph-compiled: "
                        "as train.py --step-graph --compile. Rows other than eager in train.py's layout only, and in "
                        "its precision unless --precision names others (step-graph rows never in fp16, which train.py "
                        "refuses there); a compiled one compiles for a minute or more. In the order given; default: "
                        "all five on a GPU, eager on a CPU")
    p.add_argument("--forward", nargs="+", default=["per-view"], choices=FORWARDS,
                   help="train.py's --forward to time: per-view (the paper's setup, train.py's default: BatchNorm "
                        "over each view) or per-resolution (BatchNorm over all the views of a crop size)")
    p.add_argument("--width", type=int,
                   help="ResNet-18's base width (the paper's 64); 16 makes the CIFAR setting laptop-sized")
    p.add_argument("--stem", default="imagenet", choices=STEMS,
                   help="ResNet-18's stem (train.py's --stem): cifar for the README's laptop network")
    p.add_argument("--proj-hidden", type=int, default=2048, help="hidden width of the projector MLP")
    p.add_argument("--step-batch-size", type=int, default=128, help="images per training step (the paper's 128)")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="time each row (or pipeline) for at least this long, after its warm-up; more is steadier")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on a CPU; on a CPU shared with other jobs more threads than idle "
                        "cores make it slower, not faster")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise images, the weights and the crops")
    p.add_argument("--profile", action="store_true",
                   help="after each row, torch.profiler's table of the operations that took most time over 5 steps, "
                        "and on a GPU its busy share of the step: what bounds the step")
    p.add_argument("--augmentations", action="store_true",
                   help="time the multi-crop pipelines instead of training steps: batched, MultiCrop, Lightly")
    p.add_argument("--batch-size", type=int, default=256,
                   help="--augmentations: images per batched call; larger amortises Python overhead, up to memory")
    p.add_argument("--monitor", type=int, nargs=2, metavar=("TRAIN", "TEST"),
                   help="time train.py's online evaluation instead (features of TRAIN + TEST in-memory uint8 images "
                        "of the first --inputs setting, k-NN, the probe's two epochs), twice: e.g. 50000 10000, "
                        "CIFAR-10's")
    return p.parse_args(argv)


def noise_images(count, side, seed):
    """count seeded uniform-noise images: uint8 (N, 3, side, side) and the same as PIL images."""
    pixels = np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [Image.fromarray(p) for p in pixels]


def monitor_seconds(name, train_count, test_count, args, device):
    """train.py's Monitor.evaluate on train_count + test_count noise images of setting `name` (INPUTS),
    kept in the device's memory as the monitor keeps CIFAR's and STL-10's, with 10 classes and the
    paper's network -> the seconds of its first evaluation (cuDNN's choices, the probe's set-up) and of
    its second, what every later one takes."""
    side, global_size, _, arch = INPUTS[name]
    settings = train.build_parser().parse_args(["--arch", arch, "--device", args.device, "--global-size", str(global_size),
                                                *(["--width", str(args.width)] if args.width and arch != "vit_tiny" else [])])
    torch.manual_seed(args.seed)
    net = HyDeSModel(build_backbone(arch, global_size, settings.width, stem=args.stem), 64, 16).to(device)
    monitor = train.Monitor(settings, device)
    monitor.images.decoded = [torch.utils.data.TensorDataset(noise_images(count, side, args.seed)[0].to(device),
                                                             torch.arange(count, device=device) % 10)
                              for count in (train_count, test_count)]
    probe = evaluate.PaperLinearProbe(net.backbone.num_features, 10, device, args.seed)
    control = types.SimpleNamespace(main_process=True, barrier=lambda: None)
    seconds = []
    for step in range(2):
        start = time.perf_counter()
        monitor.evaluate(net, probe, step, control)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def images_per_second(run_once, images_per_call, seconds, synchronize=lambda: None):
    """Calls run_once() (after one warm-up call) until `seconds` have passed -> images per second."""
    run_once()
    synchronize()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run_once()
        calls += 1
    synchronize()
    return calls * images_per_call / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------
# Training steps

def precisions_to_time(args, device, auto):
    """The precisions of the table's rows, "auto" replaced by `auto`, what it means for this network on
    `device` (precision.auto_precision)."""
    if args.precision:
        names = [auto if name == "auto" else name for name in args.precision]
    elif device.type == "cuda":
        names = ["bf16"] * (auto == "bf16") + ["fp16", "fp32"]
    else:
        names = ["bf16", "fp32"]
    return list(dict.fromkeys(names))


def step_rows(name, forward, args, device):
    """The table's rows for one setting (INPUTS[name]), yielded one by one as each is measured, each a dict:
    every precision and layout eager, the other --modes in train.py's layout and precision (or --precision's);
    see the module docstring for what each column measures. A row that fails records its error and the next one runs."""
    side, global_size, local_size, arch = INPUTS[name]
    resnet = ["--stem", args.stem] + (["--width", str(args.width)] if args.width else [])
    settings = train.build_parser().parse_args(["--arch", arch, "--device", args.device, "--forward", forward,
                                                "--proj-hidden", str(args.proj_hidden),
                                                *(resnet if arch.startswith("resnet") else [])])
    torch.manual_seed(args.seed)
    base = HyDeSModel(build_backbone(arch, global_size, settings.width, stem=settings.stem), settings.proj_hidden,
                      settings.proj_dim)                                            # on the CPU, copied per row
    if settings.forward == "per-view":                                              # as train.build_model
        base = convert_per_view_batchnorm(base, images_per_view=args.step_batch_size)
    images, _ = noise_images(args.step_batch_size, side, args.seed)
    images = images.to(device)
    labels = torch.zeros(len(images), dtype=torch.int64, device=device)
    crops = BatchedMultiCrop(dino_recipes(global_size, local_size))
    check_views = crops(images, train.augmentation_generator(args.seed, 0, 0))     # the views of the gradient check
    reference = float64_gradient(base, check_views, labels, settings, device)

    auto = auto_precision(device, arch, settings.stem, local_size)     # train.py's --precision auto
    default = precision_for(device, arch, auto)
    layouts = [default.memory_format] + [torch.contiguous_format] * (default.memory_format != torch.contiguous_format)
    modes = args.modes or (list(MODES) if device.type == "cuda" else ["eager"])
    variants = []                             # (precision, layout, mode), in the order of the modes
    for mode in modes:
        if mode == "eager":                   # every precision and layout
            variants += [(precision, layout, mode) for precision in precisions_to_time(args, device, auto)
                         for layout in layouts]
        else:        # the other modes: train.py's layout, and its precision unless --precision names others
            variants += [(precision, default.memory_format, mode)
                         for precision in (precisions_to_time(args, device, auto) if args.precision else [auto])
                         if not (mode in STEP_GRAPH_MODES and precision == "fp16")]   # train.py refuses fp16 there
    for precision_name, layout, mode in variants:
        row = {"setting": f"{name} {global_size}/{local_size} px", "network": describe(arch, settings),
               "precision": precision_name, "layout": LAYOUTS[layout], "mode": mode,
               "default": (precision_name, layout, mode, forward) == (
                   auto, default.memory_format, "eager", train.build_parser().get_default("forward"))}
        try:
            row.update(time_row(base, precision_for(device, arch, precision_name)._replace(memory_format=layout),
                                MODES[mode], mode in STEP_GRAPH_MODES, crops, images, labels, check_views, reference,
                                settings, args, device))
        except Exception as error:              # a validation run reports every row it can, and each failure
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:120]
        yield row


def describe(arch, settings):
    """The network as the table names it, e.g. "resnet18 w16, cifar stem, per-view"."""
    network = f"{arch} w{settings.width or 64}, {settings.stem} stem" if arch.startswith("resnet") else arch
    return f"{network}, {settings.forward}"


def time_row(base, precision, compile_mode, step_graph, crops, images, labels, check_views, reference, settings,
             args, device):
    """One row's measurements: a copy of the base network in the precision's layout, torch.compile'd in
    `compile_mode` unless it is None, its gradient check, then whole training steps timed, then a few more
    with the host's waits counted. With `step_graph`, the whole step as one graph (graph_step_row)."""
    if device.type == "cuda":
        torch.compiler.reset()                 # compiled code of an earlier row never serves this one
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    net = copy.deepcopy(base).to(device, memory_format=precision.memory_format)
    if step_graph:
        one_step, error = graph_step_row(net, precision, compile_mode is not None, crops, images, labels, reference,
                                         settings, args, device)
        return measure_steps(one_step, error, time.perf_counter() - start, args, device)
    model = torch.compile(net, mode=compile_mode) if compile_mode else net
    # The gradient check first: for a compiled row, its first call compiles the model
    error = gradient_error(net, model, check_views, labels, precision, settings, reference)
    first_step = time.perf_counter() - start               # compilation, cuDNN's autotuning, the fp16 retries
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                  fused=device.type == "cuda")                       # as train.py's
    step_index = itertools.count(1)

    def one_step():                        # train()'s loop body: the step's crops, then training_step
        views = crops(images, train.augmentation_generator(args.seed, next(step_index), 0))
        training_step(model, views, labels, optimizer, precision, settings)

    return measure_steps(one_step, error, first_step, args, device)


def graph_step_row(net, precision, compile, crops, images, labels, reference, settings, args, device):
    """train.py --step-graph's step (step_graph.WholeStep, compiled first with `compile`) on `net` ->
    (one_step, gradient error). The gradient is checked on the views of step 0 (every_crop's are the
    readable crops' exactly) after WARMUP_STEPS + 2 steps at learning rate 0, so that it comes from a
    replay of the graph: AdamW then leaves the weights as they are, and the gradient stays in .grad."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def loss(z, labels, beta):
        return train.objective(z, labels, settings.method, settings.kappa, settings.alpha, beta)
    whole_step = WholeStep(net, optimizer, BatchedMultiCrop(crops.recipes, every_crop=True), loss,
                           train.LOGGED[settings.method], precision, device, compile=compile)
    for _ in range(WARMUP_STEPS + 2):
        whole_step(images, labels, train.augmentation_generator(args.seed, 0, 0), 0.0, settings.beta)
    gradient = flat_gradient(net)
    error = float((gradient - reference).norm() / reference.norm())
    step_index = itertools.count(1)

    def one_step():
        whole_step(images, labels, train.augmentation_generator(args.seed, next(step_index), 0), settings.lr,
                   settings.beta)
    return one_step, error


def measure_steps(one_step, error, first_step, args, device):
    """A row's figures for `one_step` (a training step on the row's batch), after its gradient check."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rate = images_per_second(one_step, args.step_batch_size, args.seconds, synchronize)
    syncs = host_syncs_per_step(one_step, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"images_per_s": rate, "host_syncs": syncs, "peak_bytes": peak, "gradient_error": error,
            "first_step_s": first_step, "profile": profile_steps(one_step, device, synchronize) if args.profile else None}


def training_step(model, views, labels, optimizer, precision, settings):
    """train.training_step with the objective, kappa, alpha and beta of `settings` (train.py's defaults)."""
    return train.training_step(model, views, labels, optimizer, precision, settings.method, settings.kappa,
                               settings.alpha, settings.beta)


def flat_gradient(net):
    """Every parameter's gradient, flattened and concatenated, float64 on the CPU (zeros where none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double().cpu()
                      for p in net.parameters()])


def float64_gradient(base, views, labels, settings, device):
    """The gradient of train.training_step on `views` in float64 (but for the float32 loss), on a copy of
    `base`: the reference of every row's gradient check."""
    net = copy.deepcopy(base).to(device, torch.float64)
    precision = precision_for(device, None, "fp32")       # no autocast, no scaling, contiguous
    training_step(net, [v.double() for v in views], labels, torch.optim.SGD(net.parameters(), lr=0.0),
                        precision, settings)
    return flat_gradient(net)


def gradient_error(net, model, views, labels, precision, settings, reference, tries=40):
    """||g - g64|| / ||g64|| for one train.training_step of `model` (whose parameters are net's). The step
    goes to SGD at learning rate 0, so that the weights stay those of every other row, and the gradient
    is read where the scaler left it: unscaled, in place (a fused optimizer would keep it scaled). The
    gradient checked is that of the third step at least: under CUDA graphs (reduce-overhead) the first
    call runs the compiled code as it is, the second records the graphs, and only later ones replay them,
    as training does. Under fp16 the first steps overflow at GradScaler's initial scale of 2^16 and are
    skipped, as in training; the check repeats the step until the scaler has come down to a scale that
    does not overflow."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    for attempt in range(tries):
        training_step(model, views, labels, optimizer, precision, settings)
        gradient = flat_gradient(net)
        if attempt >= 2 and torch.isfinite(gradient).all():
            return float((gradient - reference).norm() / reference.norm())
    return float("nan")


def host_syncs_per_step(run_once, device, steps=20):
    """How many times per step the host waits for the GPU: CUDA's sync debug mode warns at each
    synchronising call (a copy to the host, .item(), a pageable copy to the device, a stream
    synchronisation), and the warnings of `steps` steady-state steps are counted. None on a CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")                  # every warning, not the first per source line
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                run_once()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def profile_steps(run_once, device, synchronize, steps=5):
    """--profile: torch.profiler over `steps` steady-state steps -> a table of the operations that took the
    most time (on a GPU by their kernels' time, Self CUDA, with the host's time beside it), and the step's
    wall time with the GPU's busy share of it. A share near 1 means the GPU's arithmetic bounds the step; far
    below 1, the host (Python, dispatch, launches) does, and the table's top host rows say where."""
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * (device.type == "cuda")
    synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            run_once()
        synchronize()
        wall = time.perf_counter() - start
    events = profiler.key_averages()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    summary = f"{wall / steps * 1e3:.1f} ms per step"
    if device.type == "cuda":
        # Kernels only: the profiler also books each kernel's time on the host call that launched it, and
        # on user annotations around it, so a sum over every row would count it twice or more
        busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False)) / 1e6      # microseconds -> seconds
        summary += f", the GPU busy {busy / wall:.0%} of it"
    return events.table(sort_by=sort, row_limit=15) + summary


STEP_COLUMNS = ("| setting | network | precision | layout | mode | img/s | host syncs/step | peak memory "
                "| gradient error vs float64 | first step |\n"
                "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")


def step_line(r):
    """One row (step_rows) of the Markdown table, with * on train.py's default row."""
    head = f"| {r['setting']} | {r['network']} | {r['precision']}{'*' * r['default']} | {r['layout']} | {r['mode']} "
    if "error" in r:
        return head + f"| failed: {r['error']} | | | | |"
    memory = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f} GiB"
    syncs = "n/a" if r["host_syncs"] is None else f"{r['host_syncs']:g}"
    return head + (f"| {r['images_per_s']:,.0f} | {syncs} | {memory} | {r['gradient_error']:.1e} "
                   f"| {r['first_step_s']:.1f} s |")


# ----------------------------------------------------------------------------------------------------
# The multi-crop pipelines (--augmentations)

def per_image_rate(transform, pil_images, seconds):
    """Images per second of a per-image transform (PIL image -> list of views), over the given images."""
    return images_per_second(lambda: [transform(img) for img in pil_images], len(pil_images), seconds)


def augmentation_rates(side, global_size, local_size, args):
    """Images/s of the three augmentation pipelines on side x side inputs -> dict (None: not installed)."""
    device = torch.device(args.device)
    images, pil_images = noise_images(args.batch_size, side, args.seed)
    images = images.to(device)
    batched = BatchedMultiCrop(dino_recipes(global_size, local_size))
    generator = torch.Generator().manual_seed(args.seed)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = {"batched": images_per_second(lambda: batched(images, generator), len(images), args.seconds,
                                          synchronize)}
    few = pil_images[:64]                      # the per-image pipelines need no batch: a cycle of 64 images
    rates["multicrop"] = per_image_rate(MultiCrop(global_size, local_size), few, args.seconds)
    try:
        from lightly.transforms import DINOTransform    # optional: only this measurement needs it
    except ImportError:
        rates["lightly"] = None
    else:
        # DINOTransform's defaults are DINO's recipe, so the same as MultiCrop's but for the sizes
        rates["lightly"] = per_image_rate(DINOTransform(global_crop_size=global_size, local_crop_size=local_size,
                                                        n_local_views=6), few, args.seconds)
    return rates


def markdown_table(rows):
    """rows: list of (input label, rates dict) -> Markdown table with the batched pipeline's speed-ups."""
    def rate(value):
        return "not installed" if value is None else f"{value:,.0f}"

    def ratio(a, b):
        return "-" if b is None else f"{a / b:.1f}x"

    lines = ["| input | views | batched img/s | MultiCrop img/s | Lightly DINOTransform img/s "
             "| batched / MultiCrop | batched / Lightly |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, views, r in rows:
        lines.append(f"| {label} | {views} | {rate(r['batched'])} | {rate(r['multicrop'])} | {rate(r['lightly'])} "
                     f"| {ratio(r['batched'], r['multicrop'])} | {ratio(r['batched'], r['lightly'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The command

def describe_device(device, threads):
    """One line: the device, and what a CPU's bf16 is (native or emulated), the load, torch's version."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        what = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    else:
        what = (f"CPU, {threads} torch thread(s) of {os.cpu_count()} cores, bf16 "
                f"{'native (AVX-512 BF16 or AMX)' if cpu_has_native_bf16() else 'emulated (no AVX-512 BF16 or AMX)'}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"device {device}: {what}; load average {load:.1f}; torch {torch.__version__}"


def main(argv=None):
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    refuse(first_problem([
        (args.batch_size >= 1 and args.step_batch_size >= 2, "--batch-size must be >= 1 and --step-batch-size >= 2"),
        (args.monitor is None or min(args.monitor) >= 1, "--monitor takes two image counts >= 1 (train, test)"),
        numbers_are_finite(args, ("seconds",)),
        (args.seconds > 0 and args.threads >= 1, "--seconds must be > 0 and --threads >= 1"),
        seed_rule(args.seed),
        (args.width is None or args.width >= 1, "--width must be >= 1"),
        (not narrow_resnet_on_a_cpu("resnet18", args.width, args.device), NARROW_RESNET_ON_A_CPU.format(width=args.width)),
        (args.proj_hidden >= 1, "--proj-hidden must be >= 1"),
        (not cuda or torch.cuda.is_available(), f"--device {args.device} but PyTorch sees no CUDA GPU here; "
                                                f"pass --device cpu"),
        (cuda or "fp16" not in (args.precision or ()), "--precision fp16 is for GPUs (train.py refuses it on a "
                                                        "CPU); time fp32 or bf16"),
    ]))
    with ctrl_c_in_one_line("the rows printed above are what was measured"):
        return measure(args)


def measure(args):
    """The augmentation rates (--augmentations) or the training steps' rows, printed as they come."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(describe_device(device, torch.get_num_threads()))
    operations, _ = crop_device_operations(dino_recipes(32, 16), batch=128, side=32)   # any size: the same
    print(f"device operations per step in the crops: {operations} (was {CROP_OPERATIONS_BEFORE})")
    if args.monitor:
        train_count, test_count = args.monitor
        first, later = monitor_seconds(args.inputs[0], train_count, test_count, args, device)
        print(f"monitor, {args.inputs[0]}: {train_count:,} + {test_count:,} images in memory: the first evaluation "
              f"{first:.1f} s, the next {later:.1f} s ({(train_count + test_count) / later:,.0f} images/s)")
        return first, later
    if args.augmentations:
        rows = []
        for name in args.inputs:
            side, global_size, local_size, _ = INPUTS[name]
            rows.append((name, f"2x{global_size} + 6x{local_size} from {side} px",
                         augmentation_rates(side, global_size, local_size, args)))
        print(f"batch {args.batch_size}")
        print(markdown_table(rows))
        return rows
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True         # as train.py: each convolution's fastest algorithm
    print(f"Training steps, batch {args.step_batch_size} (* train.py's default here: --precision auto):")
    print(STEP_COLUMNS, flush=True)
    rows = []
    for name, forward in itertools.product(args.inputs, args.forward):
        for row in step_rows(name, forward, args, device):
            print(step_line(row), flush=True)         # row by row: a run cut short keeps what it measured
            if row.get("profile"):
                print(f"profile of the row above:\n{row['profile']}\n", flush=True)
            rows.append(row)
    if any("error" in row for row in rows):
        raise SystemExit(f"error: {sum('error' in row for row in rows)} row(s) failed (the tracebacks above)")
    return rows


if __name__ == "__main__":
    main()
