"""The run folder and --resume: what a checkpoint holds, restoring it bit for bit, the settings a resumed
run keeps, the log made to agree with the checkpoint, and the lock that keeps a second run out.

Machinery: a reader of the method may skip this file; train.py reads `save(...)` and `restore(...)`.
A resumed run continues bit for bit on a CPU: the data order and every augmentation are functions of
--seed and the step (loading.py), and the checkpoint holds the rest (weights, AdamW's moments, the grad
scaler, the online probe, every random-number state).
"""

import argparse
import fcntl
import json
import os
import random

import numpy as np
import torch

from checkpoints import CheckpointError, safe_load
from records import read_jsonl, write_atomically

# Settings that --resume takes from the command line; every other one comes from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "max_minutes", "eval_every", "workers", "data_source", "device", "data_dir",
                       "skip_bad_images", "log_every", "keep_every", "compile", "step_graph")


def resume_settings(args, argv, build_parser):
    """--resume: the checkpoint and the run's settings, with the ones typed again that may change (argv
    parsed by build_parser() tells which were typed). Without --resume: refuses an OUT that holds a run,
    unless --force. Returns (args, checkpoint or None)."""
    checkpoint_path = os.path.join(args.out, "ckpt.pt")
    if args.resume and args.force:
        raise SystemExit("error: --resume continues the run in OUT and --force deletes it: pick one")
    if args.resume == "auto":                  # a requeued job: continue where there is a checkpoint, else start
        args.resume = os.path.exists(checkpoint_path)
    if not args.resume:
        if not args.force and any(os.path.exists(os.path.join(args.out, f)) for f in ("ckpt.pt", "log.jsonl")):
            raise SystemExit(f"error: {args.out} holds a run; pass --resume to continue it, --force to replace it, "
                             f"or --out for a new folder")
        return args, None
    if not os.path.exists(checkpoint_path):
        raise SystemExit(f"error: --resume given but there is no {checkpoint_path}; drop --resume to start anew")
    try:
        checkpoint = safe_load(checkpoint_path)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")
    if not (isinstance(checkpoint, dict) and {"args", "model", "step", "data_order"} <= set(checkpoint)):
        raise SystemExit(f"error: {checkpoint_path} is not a checkpoint train.py wrote (no run settings, step or data "
                         f"order: a plain state_dict?); move it away to start anew in {args.out}")
    given, saved = settings_given(argv, build_parser()), checkpoint["args"]
    trained = checkpoint["step"] / checkpoint["data_order"]["batches_per_epoch"]
    if "epochs" in given and args.epochs < trained:      # nothing to do, and args.json must keep saying what ran
        raise NothingToTrain(f"{args.out} has trained {trained:g} epochs already; raise --epochs to train further "
                             f"(the run is left as it is)")
    fixed = sorted(k for k in given - set(RESUMABLE_OVERRIDES) - {"out", "resume"}
                   if normalised(getattr(args, k)) != normalised(saved.get(k)))
    if fixed:
        changeable = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_OVERRIDES)
        raise SystemExit(f"error: --resume takes the run's settings from its checkpoint; --{fixed[0].replace('_', '-')} "
                         f"cannot change from {saved.get(fixed[0])} (only {changeable} can); drop it, or start a "
                         f"new run with --out")
    # The folder may have moved since: OUT is the one given now. A setting newer than the checkpoint takes
    # its default, which is how the run was trained.
    defaults = vars(build_parser().parse_args([]))
    args = argparse.Namespace(**{**defaults, **saved, **{k: getattr(args, k) for k in given}, "resume": True,
                                 "out": args.out})
    return args, checkpoint


class NothingToTrain(Exception):
    """--resume with fewer --epochs than the run has trained: train.py says so and leaves the run as it is."""


def settings_given(argv, parser):
    """The settings typed on the command line, as opposed to left at their defaults. argparse fills in
    a default only where the namespace it parses into lacks the attribute, so a namespace pre-filled
    with a marker shows which ones the command line set."""
    unset = object()
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset)))
    return {k for k, v in vars(parsed).items() if v is not unset}


def normalised(value):
    """Settings compare equal whether argparse gave a list or a checkpoint a tuple."""
    return list(value) if isinstance(value, tuple) else value


def checkpoint_state(model, optimizer, scaler, probe, record, steps_per_epoch, args):
    """One dict with everything to resume or evaluate the run.

    `epoch` counts completed epochs (evaluate.py reports it); `data_order` says where in which epoch's
    order the next batch starts. The learning-rate schedule is a function of the step, so the step
    restores it; the optimiser state holds AdamW's moments and step counts; `linear_probe` the online
    probe's layer and Adam state. `log_record` is the epoch's line of log.jsonl, with
    `evaluation_pending` while a due evaluation has not run.
    """
    step = record["step"]
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "linear_probe": probe.state_dict(),
            "epoch": step // steps_per_epoch, "step": step, "args": vars(args), "rng": random_states(),
            "data_order": {"seed": args.seed, "epoch": step // steps_per_epoch,
                           "next_batch": step % steps_per_epoch, "batches_per_epoch": steps_per_epoch},
            "log_record": dict(record)}


def restore(checkpoint, net, optimizer, scaler, probe, steps_per_epoch):
    """Load a checkpoint's weights, optimiser, scaler, online probe and random states; returns the step to
    continue at."""
    if checkpoint["data_order"]["batches_per_epoch"] != steps_per_epoch:
        raise SystemExit(f"error: the checkpoint was trained with {checkpoint['data_order']['batches_per_epoch']}"
                         f" steps per epoch but the data now gives {steps_per_epoch}; resume with the same "
                         f"data (and the same --skip-bad-images)")
    net.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:          # empty when saved disabled (CPU, bf16), e.g. resumed on an fp16 GPU
        scaler.load_state_dict(checkpoint["scaler"])
    probe.load_state_dict(checkpoint["linear_probe"])
    restore_random_states(checkpoint["rng"])
    return checkpoint["step"]


def open_run_folder(args, checkpoint, step):
    """Make OUT ready: on --resume, forget log lines the checkpoint does not hold; with --force, delete the
    old run's checkpoints, log and probe results (not the feature cache); write args.json."""
    if checkpoint is not None:
        print(f"resuming {os.path.join(args.out, 'ckpt.pt')} at step {step}")
        resume_log(os.path.join(args.out, "log.jsonl"), checkpoint)
    elif args.force and os.path.isdir(args.out):
        for name in os.listdir(args.out):
            if name in ("ckpt.pt", "log.jsonl", "eval.jsonl", "segment.jsonl") or name.startswith("ckpt-epoch"):
                os.remove(os.path.join(args.out, name))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)


def resume_log(log_path, checkpoint):
    """On resume, make the log agree with the checkpoint: forget lines of steps it does not hold (a run
    killed after it logged but before it saved), so that the resumed run's lines replace them rather than
    repeat them; add the checkpoint's own line if it is missing (a run killed during the evaluation that
    follows the save), unless its evaluation is pending: train() runs it and logs the line with its
    figures. Rewritten atomically; a last line cut short by a kill is dropped (read_jsonl)."""
    step, saved = checkpoint["step"], checkpoint.get("log_record", {})
    records = [r for r in read_jsonl(log_path) if r["step"] <= step] if os.path.exists(log_path) else []
    if saved.get("evaluation_pending"):           # train() evaluates it and logs the line with its figures
        records = [r for r in records if r["step"] < step]
    elif saved and not any(r["step"] == step for r in records):
        records.append({k: v for k, v in saved.items() if k != "evaluation_pending"})
    write_atomically(log_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def epoch_sums_so_far(checkpoint, logged, steps, device):
    """The logged terms summed over the epoch's first `steps` steps, (len(logged),) on `device`: zeros at
    an epoch's start; for a run resumed in the middle of an epoch, its checkpoint's means of those steps
    times their number, so that the epoch's line averages all its steps, not only those after the resume.
    (The means are those of all processes, so every process starts from the same share.)"""
    if steps == 0:
        return torch.zeros(len(logged), device=device)
    record = checkpoint["log_record"]
    return torch.tensor([record[k] for k in logged], device=device) * steps


def random_states():
    """Every random-number stream a run could draw from, in a form torch.load(weights_only=True) accepts
    (numpy's state is an array and a few numbers, kept as a tensor and plain values)."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                      "has_gauss": has_gauss, "cached_gauss": cached_gauss},
            "python": random.getstate()}


def restore_random_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():     # as many as this machine has GPUs
        torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def lock_run_folder(out):
    """Make OUT and hold an exclusive lock on OUT/.lock for as long as this process lives, so that a second
    train.py on the same folder is refused rather than interleaving two runs' checkpoints and logs. The
    operating system drops the lock when the process ends, however it ends: a crash never leaves it stuck."""
    try:
        os.makedirs(out, exist_ok=True)
        handle = open(os.path.join(out, ".lock"), "a+")
    except OSError as error:
        raise SystemExit(f"error: cannot write in {out} ({error.strerror}); pick a writable --out") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:         # it was free when the settings were checked: a race, which it lost
        handle.seek(0)
        raise SystemExit(f"error: another train.py (process {handle.read().strip() or '?'}) is running in {out}; "
                         f"wait for it to end, or pick another --out") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def process_holding(out):
    """The process id written in OUT/.lock if a live process holds that lock, else None. Asked before
    anything else, so that a second run is told at once, not after its data are loaded."""
    try:
        with open(os.path.join(out, ".lock")) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)     # released when the file closes
            except BlockingIOError:
                return handle.read().strip() or "?"
    except OSError:                 # no lock file: no run has claimed this folder yet
        pass
    return None
