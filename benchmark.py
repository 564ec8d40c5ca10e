"""Training-step throughput and numerics on one device, as Markdown tables.

    python benchmark.py --device cuda                          # a GPU: eager and reduce-overhead rows, both settings
    python benchmark.py --device cuda --modes eager compiled reduce-overhead --precision auto fp32
    python benchmark.py --device cpu --width 16 --threads 2    # a CPU, with a laptop-sized ResNet

The settings are the paper's networks and batch, at train.py's default crop sides (ours): CIFAR-10's
ResNet-18 with 2 x 32 + 6 x 16 px views of 32 px images and STL-10's ViT-Tiny with 2 x 96 + 6 x 48 px views
of 96 px images, batch 128, train.py's defaults otherwise (blur on).
The images are seeded uniform noise (no download): a step does the same work whatever the pixels. Images/s
count source images, 8 views each. The first table times the crops alone: data.multi_crop on a uint8 batch
held on the device. The second has a row per setting, --forward, --precision and --modes:
  img/s           whole steps as train.py's loop takes them, the code that trains: data.draw_views on the
                  CPU, one copy to the device, train.training_step with train.loss_of_batch (views, network,
                  loss), backward and fused AdamW; compiled and reduce-overhead torch.compile loss_of_batch
                  as train.py --compile [reduce-overhead] does (CUDA graphs on a GPU)
  vs eager        img/s over the eager row's of the same setting and precision, in the same process
  peak memory     torch.cuda.max_memory_allocated over the row's steps (n/a on a CPU)
  gradient error  ||g - g64|| / ||g64||: the row's step's gradient (at its third call: a replay under CUDA
                  graphs) against the same step run eagerly in float64 (the loss in float32 in both): it
                  catches a kernel that computes the wrong thing, orders of magnitude above the precision's
                  own error (SPEED.md gives the ranges seen), or nan
  first step      seconds of the row's first step: the compilation, cuDNN's autotuning
* marks train.py's --precision auto on the device. SPEED.md records the tables printed so far, with machines.
"""

import argparse
import copy
import functools
import itertools
import os
import time
import traceback

import numpy as np
import torch

import train
from data import dino_recipes, draw_views, multi_crop
from models import STEMS, HyDeSModel, build_backbone
from settings import (NARROW_RESNET_ON_A_CPU, PRECISIONS, HelpFormatter, auto_precision, cpu_has_native_bf16,
                      ctrl_c_in_one_line, default_device, device_argument, first_problem, narrow_resnet_on_a_cpu,
                      numbers_are_finite, precision_for, refuse, seed_rule)

# (input side, global crop, local crop, architecture) for CIFAR-10/100 and STL-10: the paper's networks, our crops
INPUTS = {"cifar": (32, 32, 16, "resnet18"), "stl10": (96, 96, 48, "vit_tiny")}
# The table's modes -> torch.compile's mode (None: not compiled), as train.py's --compile takes them
MODES = {"eager": None, "compiled": "default", "reduce-overhead": "reduce-overhead"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", type=device_argument, default=default_device(), help="cpu, cuda, cuda:N or mps")
    p.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS), help="settings to time")
    p.add_argument("--modes", nargs="+", choices=list(MODES),
                   help="eager; compiled and reduce-overhead as train.py --compile [reduce-overhead], a minute or more "
                        "of compilation each (several on a CPU). Default: eager reduce-overhead on a GPU, eager on a CPU")
    p.add_argument("--precision", nargs="+", default=["auto"], choices=PRECISIONS,
                   help="as train.py's --precision (auto: what train.py picks for the network here; fp16: GPUs only)")
    p.add_argument("--forward", nargs="+", default=["per-view"], choices=("per-view", "per-resolution"),
                   help="as train.py's --forward: per-view (our reading of the cited code), per-resolution (a call "
                        "per crop size)")
    p.add_argument("--width", type=int, help="ResNet-18's base width (the paper's 64); 16 makes it laptop-sized")
    p.add_argument("--stem", default="imagenet", choices=STEMS, help="ResNet-18's stem (train.py's --stem)")
    p.add_argument("--proj-hidden", type=int, default=2048, help="hidden width of the projector MLP")
    p.add_argument("--batch-size", type=int, default=128, help="images per step and per call of the crops")
    p.add_argument("--seconds", type=float, default=5.0, help="time each row for at least this long after a warm-up")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on a CPU; on a CPU shared with other jobs more threads than idle cores are slower")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise images, the weights and the crops")
    return p.parse_args(argv)


def train_settings(name, forward, args):
    """train.py's settings (its defaults) for the network of setting `name` (INPUTS) and `forward`."""
    side, global_size, local_size, arch = INPUTS[name]
    resnet = ["--stem", args.stem] + (["--width", str(args.width)] if args.width else [])
    return train.build_parser().parse_args(["--arch", arch, "--device", args.device, "--forward", forward,
                                            "--global-size", str(global_size), "--local-size", str(local_size),
                                            "--proj-hidden", str(args.proj_hidden),
                                            *(resnet if arch.startswith("resnet") else [])])


def noise_images(count, side, seed, device):
    """count seeded uniform-noise images, uint8 (count, 3, side, side) on `device`, and their sizes (count, 2)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (count, 3, side, side), dtype=np.uint8)
    return torch.from_numpy(pixels).to(device), torch.full((count, 2), side, dtype=torch.int64)


def synchronize(device):
    if device.type == "cuda":                       # a CPU's work is done when the call returns
        torch.cuda.synchronize(device)


def images_per_second(run_once, images_per_call, seconds, device):
    """Calls run_once() (after one warm-up call) until `seconds` have passed -> images per second."""
    run_once()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls == 0:
        run_once()
        calls += 1
    synchronize(device)
    return calls * images_per_call / (time.perf_counter() - start)


def crops_per_second(name, args, device):
    """data.multi_crop's images/s on a batch of setting `name` held on `device`, DINO's blur on."""
    side, global_size, local_size, _ = INPUTS[name]
    images, sizes = noise_images(args.batch_size, side, args.seed, device)
    recipes, generator = dino_recipes(global_size, local_size), torch.Generator().manual_seed(args.seed)
    return images_per_second(lambda: multi_crop(images, sizes, recipes, generator), len(images), args.seconds, device)


# ----------------------------------------------------------------------------------------------------
# Training steps

def step_rows(name, forward, args, device):
    """The rows of setting `name` and `forward` as dicts, yielded as each is measured: each precision, each
    mode, eager first. A row that fails records its error and the next one runs."""
    side, global_size, local_size, arch = INPUTS[name]
    settings = train_settings(name, forward, args)
    torch.manual_seed(args.seed)
    base = HyDeSModel(build_backbone(arch, global_size, settings.width, stem=settings.stem), settings.proj_hidden,
                      settings.proj_dim, per_view=forward == "per-view")       # on the CPU, copied per row
    recipes = train.view_recipes(settings)
    images, sizes = noise_images(args.batch_size, side, args.seed, device)
    labels = torch.zeros(len(images), dtype=torch.int64, device=device)
    reference = float64_gradient(base, recipes, images, sizes, labels, settings, args, device)
    network = f"{arch} w{settings.width or 64}, {settings.stem} stem" if arch.startswith("resnet") else arch
    auto = auto_precision(device, arch, settings.stem, local_size)            # train.py's --precision auto
    modes = args.modes or (["eager", "reduce-overhead"] if device.type == "cuda" else ["eager"])
    eager = {}                                      # precision -> the eager row's img/s
    for precision, mode in itertools.product(dict.fromkeys(auto if p == "auto" else p for p in args.precision),
                                             [m for m in MODES if m in modes]):
        row = {"setting": f"{name} {global_size}/{local_size} px", "network": f"{network}, {forward}",
               "precision": precision, "auto": precision == auto, "mode": mode}
        try:
            row.update(time_row(base, precision_for(device, arch, precision), mode, recipes, images, sizes, labels,
                                reference, settings, args, device))
            if mode == "eager":
                eager[precision] = row["images_per_s"]
            row["vs_eager"] = row["images_per_s"] / eager[precision] if precision in eager else None
        except Exception as error:                  # a validation run reports every row it can
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:120]
        yield row


def time_row(base, precision, mode, recipes, images, sizes, labels, reference, settings, args, device):
    """One row: train.py's step (compiled as `mode` says) on a copy of the base network: its first step
    timed, its gradient checked, then steps timed."""
    torch.compiler.reset()                          # compiled code of an earlier row never serves this one
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    net = copy.deepcopy(base).to(device, memory_format=precision.memory_format)
    step_loss = functools.partial(train.loss_of_batch, net, recipes, precision, settings.method, settings.kappa,
                                  settings.alpha, settings.beta)
    if MODES[mode]:                                 # as train.py --compile [reduce-overhead]
        step_loss = torch.compile(step_loss, mode=MODES[mode], dynamic=False)

    def step(optimizer, index):                     # train()'s loop body: the step's views drawn, then the step
        parameters = draw_views(recipes, sizes, train.augmentation_generator(args.seed, index, 0))
        parameters = (parameters.pin_memory() if device.type == "cuda" else parameters).to(device, non_blocking=True)
        train.training_step(step_loss, images, parameters, labels, optimizer, precision.scaler,
                            train.LOGGED[settings.method])

    # The gradient check, on step 0's views, with SGD at learning rate 0 so that the weights stay the
    # reference's; the third call's gradient at least: under CUDA graphs the first call runs the compiled
    # code, the second records the graphs and later ones replay them. Under fp16 the first steps overflow
    # at GradScaler's initial scale and are skipped, as in training: repeated until the scale comes down.
    check, start, error = torch.optim.SGD(net.parameters(), lr=0.0), time.perf_counter(), float("nan")
    step(check, 0)
    synchronize(device)
    first_step = time.perf_counter() - start
    for attempt in range(1, 40):
        step(check, 0)
        gradient = flat_gradient(net)
        if attempt >= 2 and torch.isfinite(gradient).all():
            error = float((gradient - reference).norm() / reference.norm())
            break
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    index = itertools.count(1)
    rate = images_per_second(lambda: step(optimizer, next(index)), len(images), args.seconds, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"images_per_s": rate, "peak_bytes": peak, "gradient_error": error, "first_step_s": first_step}


def flat_gradient(net):
    """Every parameter's gradient, flattened and concatenated, float64 on the CPU (zeros where none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double().cpu()
                      for p in net.parameters()])


def float64_gradient(base, recipes, images, sizes, labels, settings, args, device):
    """The gradient of train.loss_of_batch on step 0's views with the network in float64 (the views cast to
    it, the loss in float32 as always), uncompiled: the reference of every row's gradient check."""
    net = copy.deepcopy(base).to(device, torch.float64)
    parameters = draw_views(recipes, sizes, train.augmentation_generator(args.seed, 0, 0)).to(device)
    out = train.loss_of_batch(lambda views: net([view.double() for view in views]), recipes,
                              precision_for(device, None, "fp32"), settings.method, settings.kappa, settings.alpha,
                              settings.beta, images, parameters, labels)
    out["loss"].backward()
    return flat_gradient(net)


def step_line(row):
    head = f"| {row['setting']} | {row['network']} | {row['precision']}{'*' * row['auto']} | {row['mode']} "
    if "error" in row:
        return head + f"| failed: {row['error']} | | | | |"
    ratio = "–" if row["vs_eager"] is None else f"{row['vs_eager']:.2f}x"
    memory = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.2f} GiB"
    return head + (f"| {row['images_per_s']:,.0f} | {ratio} | {memory} | {row['gradient_error']:.1e} "
                   f"| {row['first_step_s']:.1f} s |")


# ----------------------------------------------------------------------------------------------------
# The command

def main(argv=None):
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    refuse(first_problem([
        (args.batch_size >= 2 and args.proj_hidden >= 1, "--batch-size must be >= 2 and --proj-hidden >= 1"),
        numbers_are_finite(args, ("seconds",)),
        (args.seconds > 0 and args.threads >= 1, "--seconds must be > 0 and --threads >= 1"),
        seed_rule(args.seed),
        (args.width is None or args.width >= 1, "--width must be >= 1"),
        (not narrow_resnet_on_a_cpu("resnet18", args.width, args.device), NARROW_RESNET_ON_A_CPU.format(width=args.width)),
        (cuda or "fp16" not in args.precision, "--precision fp16 is for GPUs (train.py refuses it on a CPU)"),
    ]))
    with ctrl_c_in_one_line("the rows printed above are what was measured"):
        return measure(args)


def measure(args):
    """The crops' table and the steps' table, printed as they come."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"       # as train.py: each convolution's fastest algorithm
    # One line: the device (a CPU's bf16 native or emulated), the load, torch's version
    bf16 = "native" if cpu_has_native_bf16() else "emulated (no AVX-512 BF16 or AMX)"
    what = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {args.threads} torch thread(s) of {os.cpu_count()} cores, bf16 {bf16}")
    print(f"device {device}: {what}; load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print(f"The crops alone, batch {args.batch_size}:\n| setting | views | img/s |\n| --- | --- | ---: |")
    for name in args.inputs:
        side, global_size, local_size, _ = INPUTS[name]
        rate = crops_per_second(name, args, device)
        print(f"| {name} | 2x{global_size} + 6x{local_size} from {side} px | {rate:,.0f} |", flush=True)
    print(f"\nTraining steps, batch {args.batch_size} (* train.py's --precision auto here):\n| setting | network | "
          "precision | mode | img/s | vs eager | peak memory | gradient error vs float64 | first step |\n"
          "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name, forward in itertools.product(args.inputs, args.forward):
        for row in step_rows(name, forward, args, device):
            print(step_line(row), flush=True)       # row by row: a run cut short keeps what it measured
            rows.append(row)
    if any("error" in row for row in rows):
        raise SystemExit(f"error: {sum('error' in row for row in rows)} row(s) failed (the tracebacks above)")
    return rows


if __name__ == "__main__":
    main()
