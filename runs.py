"""A training run: its folder and lock, what a checkpoint holds and bit-exact resume, stopping early (Ctrl-C,
SIGTERM, --max-minutes, a non-finite loss), and torchrun agreement.

Machinery: a reader of the method may skip this file; train.py reads `for images, sizes, labels in
control.batches(...)`, `checkpoint_state(...)` and `restore(...)`. A resumed run continues bit for bit on a
CPU: the data order and every augmentation are functions of --seed and the step (loading.py), and the
checkpoint holds the rest (weights, AdamW's moments, the grad scaler, the online probe). Nothing draws from a
global random stream after the network's initialisation, so no random state is saved. RunControl's docstring
gives the rules for stopping early, alike on every torchrun process.
"""

import argparse
import fcntl
import json
import os
import shlex
import signal
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints import CheckpointError, read_jsonl, safe_load, write_atomically
from data import DatasetError
from settings import error_message

# ----------------------------------------------------------------------------------------------------
# The run folder: the settings a resumed run keeps, the log made to agree with the checkpoint, the lock

# Settings that --resume takes from the command line; every other one comes from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "max_minutes", "eval_every", "workers", "data_source", "device", "data_dir",
                       "skip_bad_images", "log_every", "keep_every", "compile")
# Settings that earlier versions of train.py had (or values they took), each with the values that this
# version trains alike: a run saved with any other cannot continue as it began.
EARLIER_SETTINGS = {"method": ("hydes", "supervised"), "kappa_final": (None,), "beta_final": (None,),
                    "schedule": ("constant",), "warmup_epochs": (0,)}


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
    missing = [key for key in RESUMED_STATE if key not in checkpoint]
    if missing:
        raise SystemExit(f"error: {checkpoint_path} holds no {' or '.join(missing)} (saved for evaluation only?), so "
                         f"the run cannot continue exactly; evaluate it with evaluate.py, or start anew with --force")
    given, saved = settings_given(argv, build_parser()), checkpoint["args"]
    earlier = [k for k, alike in EARLIER_SETTINGS.items() if saved.get(k, alike[0]) not in alike]
    if earlier:
        raise SystemExit(f"error: {checkpoint_path} was trained with --{earlier[0].replace('_', '-')} "
                         f"{saved[earlier[0]]}, which this version of train.py does not have, so the run cannot "
                         f"continue as it began; evaluate it with evaluate.py, or start anew with --force")
    fixed = sorted(k for k in given - set(RESUMABLE_OVERRIDES) - {"out", "resume"}
                   if normalised(getattr(args, k)) != normalised(saved.get(k)))
    if fixed:
        changeable = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_OVERRIDES)
        raise SystemExit(f"error: --resume takes the run's settings from its checkpoint; "
                         f"--{fixed[0].replace('_', '-')} cannot change from {saved.get(fixed[0])} (only {changeable} "
                         f"can); drop it, or start a new run with --out")
    # The folder may have moved since: OUT is the one given now. A setting newer than the checkpoint takes
    # its default, which is how the run was trained; one older than this version is left out.
    defaults = vars(build_parser().parse_args([]))
    saved = {k: v for k, v in saved.items() if k not in EARLIER_SETTINGS or k in defaults}
    args = argparse.Namespace(**{**defaults, **saved, **{k: getattr(args, k) for k in given}, "resume": True,
                                 "out": args.out})
    # Nothing to do: said before any file is touched (args.json must keep saying what ran, the log its lines)
    trained = checkpoint["step"] / checkpoint["data_order"]["batches_per_epoch"]
    pending = checkpoint.get("log_record", {}).get("evaluation_pending") and args.eval_every
    if args.epochs <= trained and not pending:
        raise NothingToTrain(f"{args.out} has trained {trained:g} epochs already; raise --epochs to train further "
                             f"(the run is left as it is)")
    return args, checkpoint


class NothingToTrain(Exception):
    """--resume with no more --epochs than the run has trained: train.py says so and leaves the run as it is."""


# What restore() loads besides the weights: a checkpoint without them cannot continue the run exactly
RESUMED_STATE = ("optimizer", "scaler", "linear_probe")


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
    settings = json.dumps(vars(args), indent=2).encode()
    write_atomically(os.path.join(args.out, "args.json"), lambda f: f.write(settings))   # whole, or as it was


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


def refuse_a_second_run(out):
    """Stop, in one line, if a live process holds OUT/.lock (RunControl.claim_run_folder). Asked before
    anything else, so that a second run is told at once, not after its data are loaded."""
    try:
        with open(os.path.join(out, ".lock")) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)     # released when the file closes
            except BlockingIOError:
                raise another_run(out, handle) from None
    except OSError:                 # no lock file: no run has claimed this folder yet
        pass


def another_run(out, lock):
    """The error for a run folder whose open lock file `lock` another train.py holds (it wrote its pid)."""
    lock.seek(0)
    return SystemExit(f"error: another train.py (process {lock.read().strip() or '?'}) is running in {out}; wait "
                      f"for it to end, or pick another --out")


# ----------------------------------------------------------------------------------------------------
# What a checkpoint holds, and restoring it bit for bit

def checkpoint_state(model, optimizer, scaler, probe, record, steps_per_epoch, args):
    """One dict with everything to resume or evaluate the run.

    `epoch` counts completed epochs (evaluate.py reports it); `data_order` says where in which epoch's
    order the next batch starts. The optimiser state holds AdamW's moments and step counts;
    `linear_probe` the online probe's layer and Adam state. `log_record` is the epoch's line of log.jsonl, with
    `evaluation_pending` while a due evaluation has not run.
    """
    step = record["step"]
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "linear_probe": probe.state_dict(),
            "epoch": step // steps_per_epoch, "step": step, "args": vars(args),
            "data_order": {"seed": args.seed, "epoch": step // steps_per_epoch,
                           "next_batch": step % steps_per_epoch, "batches_per_epoch": steps_per_epoch},
            "log_record": dict(record)}


def restore(checkpoint, net, optimizer, scaler, probe, steps_per_epoch):
    """Load a checkpoint's weights, optimiser, scaler and online probe; returns the step to continue at."""
    if checkpoint["data_order"]["batches_per_epoch"] != steps_per_epoch:
        raise SystemExit(f"error: the checkpoint was trained with {checkpoint['data_order']['batches_per_epoch']}"
                         f" steps per epoch but the data now gives {steps_per_epoch}; resume with the same "
                         f"data (and the same --skip-bad-images)")
    trained_classes = checkpoint["linear_probe"]["layer"]["weight"].shape[0]    # the online probe's (C, F)
    if trained_classes != probe.layer.out_features:
        raise SystemExit(f"error: the checkpoint was trained on data of {trained_classes} classes but the data now has "
                         f"{probe.layer.out_features}; resume with the same data (--data-dir)")
    net.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:          # empty when saved disabled (CPU, bf16), e.g. resumed on an fp16 GPU
        scaler.load_state_dict(checkpoint["scaler"])
    probe.load_state_dict(checkpoint["linear_probe"])
    return checkpoint["step"]


def epoch_sums_so_far(checkpoint, logged, steps, device):
    """The logged terms summed over the epoch's first `steps` steps, (len(logged),) on `device`: zeros at
    an epoch's start; for a run resumed in the middle of an epoch, its checkpoint's means of those steps
    times their number, so that the epoch's line averages all its steps, not only those after the resume.
    (The means are those of all processes, so every process starts from the same share.)"""
    if steps == 0:
        return torch.zeros(len(logged), device=device)
    record = checkpoint["log_record"]
    return torch.tensor([record[k] for k in logged], device=device) * steps


# ----------------------------------------------------------------------------------------------------
# Stopping early, alike on every torchrun process

def distributed_setup(args):
    """torchrun starts one process per GPU with RANK, LOCAL_RANK and WORLD_SIZE set: join them in a process
    group (NCCL on GPUs, gloo on CPUs). Returns (rank, world_size, device); (0, 1, --device) without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, torch.device(args.device)
    if args.batch_size % world_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} is the global batch and must split evenly over "
                         f"{world_size} processes")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # While process 0 runs the monitor the others wait at a barrier; the default 10-minute timeout
    # would kill an ImageNet run there.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return dist.get_rank(), world_size, device


class RunControl:
    """Decides when a run stops before its last epoch, and says so, alike on every process. The rules:

    - A signal: the first Ctrl-C (SIGINT) or SIGTERM (a cluster's pre-emption) asks to stop after the
      current step, so that no step is cut in half; the run saves and exits with the command that resumes.
      Ctrl-C's handler is then restored, so a second Ctrl-C stops at once (the checkpoint on disk is
      whole, by save_checkpoint's rename); a second SIGTERM (torchrun forwards the one it receives) is
      ignored, for it must not kill the process before its save. A signal before the first step, while
      the data load, stops the run at once: there is nothing to save yet.
    - Loading workers that died: a SIGTERM to the whole job ends them too, and the next batch never
      comes. Every step taken is whole, so the run saves as for the signal. Without a signal it is an error.
    - The time budget (--max-minutes): the run saves, runs the final evaluation and ends normally.
    - A non-finite loss: the run stops naming the step and the terms, and its weights are never saved.
      It is recorded on the device at every step (`watch`) and read only where the host waits anyway.
    - Agreement: under torchrun all processes must stop before the same step and take the same path (a
      signal skips the evaluation, the time budget does not), or one would wait forever in a collective the
      others never reach: a process whose loading workers died, say, while the others still have batches.
      So before every step the processes agree on (no batch, a stop asked, out of time), by an all_reduce
      of three numbers over a CPU (gloo) group: it waits for the other processes' hosts, never for a GPU.
    """

    def __init__(self, args, rank, world_size, device, logged):
        self.args, self.rank, self.world_size, self.device = args, rank, world_size, device
        self.main_process = rank == 0              # the one that prints, logs, evaluates and saves
        self.logged = logged                       # the names of the loss terms the step returns
        self.started = time.time()                 # restarted at the first step: the budget counts training
        self.received = None                       # the first signal received, if any
        self.signalled = self.out_of_time = False  # the agreed reasons to stop
        self.previous_handlers, self.lock, self.training = {}, None, False
        # (step, loss terms) of the first non-finite loss; step -1 while there is none.
        self.first_nonfinite = torch.full((1 + len(self.logged),), -1.0, device=device)
        self.device_step = None
        # Host-side agreement between processes: a gloo group over the same processes (NCCL's would wait
        # for the GPU). Every process builds it here, in the same order, as new_group requires.
        self.host_group = dist.new_group(backend="gloo") if world_size > 1 else None

    @property
    def checkpoint(self):
        """The run's latest checkpoint, OUT/ckpt.pt."""
        return os.path.join(self.args.out, "ckpt.pt")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():    # handlers can only be set there
            self.previous_handlers = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        if self.lock is not None:
            self.lock.close()               # releases the run folder

    def claim_run_folder(self):
        """Make OUT and hold an exclusive lock on OUT/.lock until __exit__ or the process ends, before anything
        is written in OUT, so that a second train.py on the same folder is refused rather than interleaving two
        runs' checkpoints and logs. The operating system drops the lock when the process ends, however it
        ends: a crash never leaves it stuck."""
        out = self.args.out
        try:
            os.makedirs(out, exist_ok=True)
            self.lock = open(os.path.join(out, ".lock"), "a+")
        except OSError as error:
            raise SystemExit(f"error: cannot write in {out} ({error.strerror}); pick a writable --out") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:         # it was free when the settings were checked: a race, which it lost
            raise another_run(out, self.lock) from None
        self.lock.truncate(0)
        self.lock.write(str(os.getpid()))
        self.lock.flush()

    def handle(self, signum, frame):
        if not self.training:       # still loading data or building the model: nothing to save, stop at once
            raise SystemExit(128 + signum)
        if self.received is not None:               # a second SIGTERM: torchrun forwards the one it got
            return
        self.received = signum
        # A second Ctrl-C stops at once (the checkpoint on disk is whole, by save_checkpoint's rename).
        signal.signal(signal.SIGINT, self.previous_handlers.get(signal.SIGINT, signal.default_int_handler))
        # PyTorch's DataLoader raises from a SIGCHLD handler, at whatever line runs, when a worker dies.
        # After a SIGTERM to the whole job the workers die too; the step in progress and the save must not
        # be cut short by that (a dead worker is still reported if another batch is asked for). The
        # handler comes back with the others in __exit__.
        self.previous_handlers.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))

    def batches(self, batches, step, sums, summed, description):
        """The epoch's batches with a progress bar, until the epoch ends or a stop is agreed. `step`: the
        run's step at the first batch; `sums`: the logged terms summed over the epoch's steps so far, for
        the bar, of which `summed` were taken before this call (a run resumed mid-epoch)."""
        if not self.training:       # the time budget counts training, not the data's loading
            self.training, self.started = True, time.time()
        self.device_step = torch.tensor(float(step), device=self.device)   # float32 counts steps exactly to 2^24
        bar = tqdm(total=len(batches), desc=description, dynamic_ncols=True, disable=not self.main_process)
        iterator, steps, start = iter(batches), 0, time.time()
        try:
            while True:
                batch, workers_gone = None, False
                try:
                    batch = next(iterator)
                except StopIteration:
                    pass
                except DatasetError as error:       # an unreadable image, met by a loading worker
                    raise SystemExit(f"error: {error_message(error)}; the last checkpoint {self.checkpoint} is intact")
                except (RuntimeError, ConnectionError, EOFError):   # the loading workers are gone (a dead worker
                    if self.received is None:       # shows as any of these): after a signal, a stop
                        raise
                    workers_gone = True
                over_budget = steps > 0 and bool(self.args.max_minutes) and self.minutes() > self.args.max_minutes
                ended, self.signalled, self.out_of_time = self.agreed(
                    batch is None and not workers_gone, self.received is not None or workers_gone, over_budget)
                if ended or self.signalled or self.out_of_time:
                    return
                yield batch
                steps += 1
                bar.update()
                if steps % self.args.log_every == 0:    # the host waits for the device here, once in log_every steps
                    seconds_per_step = max(time.time() - start, 1e-9) / steps
                    self.check_finite()
                    means = self.means(sums, summed + steps)
                    bar.set_postfix(**{k: f"{v:.3f}" for k, v in means.items() if k != "mi"},
                                    img_s=f"{self.args.batch_size / seconds_per_step:.0f}")
        finally:
            bar.close()

    def watch(self, terms):
        """Record the step and terms (len(logged),) if the loss is the first non-finite one, on the device."""
        record_now = (self.first_nonfinite[0] < 0) & ~torch.isfinite(terms[0])
        self.first_nonfinite = torch.where(record_now, torch.cat([self.device_step[None], terms]), self.first_nonfinite)
        self.device_step += 1

    def check_finite(self):
        """Stop at the first non-finite loss, naming its step and terms; the weights it produced are never saved."""
        steps_before, *values = self.first_nonfinite.tolist()
        if not self.agreed(steps_before >= 0)[0]:
            return
        terms = dict(zip(self.logged, values))
        others = ", ".join(f"{k} {v}" for k, v in terms.items() if k not in ("loss", "mi"))
        kept = (f"the last good checkpoint {self.checkpoint} is kept" if os.path.exists(self.checkpoint)
                else "no checkpoint had been written yet")
        if not self.main_process:   # process 0 names the step and terms it saw; the others stop quietly
            raise SystemExit(1)
        raise SystemExit(f"error: the loss became {terms['loss']} at step {int(steps_before) + 1} ({others}); "
                         f"{kept}. Likely causes: a learning rate too high (lower --lr), or fp16 overflow at a "
                         f"large --kappa on a GPU without bf16 (lower --kappa)")

    def means(self, sums, steps):
        """The logged terms summed over `steps` steps -> their means, averaged over the processes (each
        holds its share of the batch's), as a dict."""
        if self.world_size > 1:
            sums = sums.clone()
            dist.all_reduce(sums)
            sums /= self.world_size
        return dict(zip(self.logged, (sums / max(1, steps)).tolist()))

    def minutes(self):
        return (time.time() - self.started) / 60

    def evaluation(self, evaluate):
        """Run evaluate() after the epoch's checkpoint is saved -> its result, or {} when a signal cut it
        short (the loading workers die with a SIGTERM to the whole job); a signal received during it
        stops the run after the log line, as one during a step does. An unreadable image is an error
        naming the saved checkpoint."""
        try:
            result = evaluate()
        except DatasetError as error:
            raise SystemExit(f"error: {error_message(error)}; the checkpoint {self.checkpoint} "
                             f"was saved before the evaluation: mend the image or add --skip-bad-images, then --resume")
        except RuntimeError:
            if self.received is None:
                raise
            result = {}
        self.signalled = self.agreed(self.received is not None)[0]
        return result

    def stop_after_save(self, step):
        """After an epoch's checkpoint: exit if a signal asked to, naming the command that resumes; say so
        and return True if the time budget is spent; else False."""
        if self.signalled:
            self.barrier()          # nobody exits (prompting torchrun to stop the rest) before the save
            signum = self.received or signal.SIGTERM         # this process may have agreed without a signal
            if self.main_process:
                launcher = f"torchrun --nproc_per_node={self.world_size}" if self.world_size > 1 else "python"
                print(f"{signal.Signals(signum).name}: stopped after step {step} and saved {self.checkpoint}; continue "
                      f"with\n    {launcher} train.py --out {shlex.quote(self.args.out)} --resume")
            raise SystemExit(128 + signum)
        if self.out_of_time and self.main_process:
            print(f"stopped after {self.args.max_minutes} minutes at step {step}; checkpoint {self.checkpoint}")
        return self.out_of_time

    def agreed(self, *flags):
        """Each flag (a host-side bool) made true on every process if it is true on any; the flags
        themselves without data parallelism. One small all_reduce on the CPU group: no GPU involved."""
        if self.world_size == 1:
            return flags
        flags = torch.tensor([float(f) for f in flags])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.host_group)
        return tuple(f > 0 for f in flags.tolist())

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    @contextmanager
    def first_process_first(self):
        """Process 0 runs the block alone (a download, say) before the others run it."""
        if self.rank > 0:
            dist.barrier()
        yield
        if self.rank == 0 and self.world_size > 1:
            dist.barrier()
