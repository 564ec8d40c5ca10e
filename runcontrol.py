"""Run control: what stops a run before its last epoch, decided alike on every torchrun process.

Machinery: a reader of the method may skip this file; train.py reads `for images, labels in
control.batches(...)`. Ctrl-C or a cluster's SIGTERM stop after the current step and save; --max-minutes
saves, evaluates and ends; a non-finite loss stops without saving the weights it produced; dead loading
workers end the epoch as a signal does. Under torchrun the processes agree on each of these before every
step, over a CPU process group, so that none waits forever in a collective the others never reach.
"""

import os
import signal
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

from checks import error_message
from data import DatasetError
from resume import lock_run_folder


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
        self.total_steps, self.estimated = None, False
        # When this session's first step ended, and what it took: compilation (--compile), cuDNN's choice of
        # algorithms and lazy set-up all happen in it, so the rates (progress bar, log) and the estimate of
        # the run's time count from its end
        self.first_step_ended, self.first_step_seconds = None, None
        # Host-side agreement between processes: a gloo group over the same processes (NCCL's would wait
        # for the GPU). Every process builds it here, in the same order, as new_group requires.
        self.host_group = dist.new_group(backend="gloo") if world_size > 1 else None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():    # handlers can only be set there
            self.previous_handlers = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        self.restore_handlers()
        if self.lock is not None:
            self.lock.close()               # releases the run folder
            self.lock = None

    def claim_run_folder(self):
        """Lock OUT for this run, before anything is written in it (see lock_run_folder)."""
        self.lock = lock_run_folder(self.args.out)

    def restore_handlers(self):
        for s, handler in self.previous_handlers.items():
            signal.signal(s, handler)
        self.previous_handlers = {}

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
        iterator, steps, start, untimed = iter(batches), 0, time.time(), 0
        try:
            while True:
                batch, workers_gone = None, False
                try:
                    batch = next(iterator)
                except StopIteration:
                    pass
                except DatasetError as error:       # an unreadable image, met by a loading worker
                    raise SystemExit(f"error: {error_message(error)}; the last checkpoint "
                                     f"{os.path.join(self.args.out, 'ckpt.pt')} is intact")
                except RuntimeError:                # the loading workers are gone: after a signal, a stop
                    if self.received is None:
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
                if self.first_step_ended is None:       # this session's first step: the rates count from its end
                    start, untimed = self.end_first_step(start), 1
                if steps % self.args.log_every == 0 and steps > untimed:   # the host waits for the device here,
                    seconds_per_step = max(time.time() - start, 1e-9) / (steps - untimed)   # once in log_every steps
                    self.estimate_once(seconds_per_step, step + steps)
                    self.check_finite()
                    means = self.means(sums, summed + steps)
                    bar.set_postfix(**{k: f"{v:.3f}" for k, v in means.items() if k not in ("mi", "own_share")},
                                    img_s=f"{self.args.batch_size / seconds_per_step:.0f}")
        finally:
            bar.close()

    def end_first_step(self, start):
        """Note the end of this session's first step, begun at `start` (its GPU work waited for: one wait a
        session), and what it took; -> the time it ended."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.first_step_ended = time.time()
        self.first_step_seconds = self.first_step_ended - start
        return self.first_step_ended

    def estimate_once(self, seconds_per_step, step):
        """Once the first steps are timed: on one GPU without CUDA graphs (neither --compile reduce-overhead
        nor --step-graph), that --compile reduce-overhead would make the steps faster; if the whole run
        would take more than a few hours here, say so, and on a CPU how to try the method in minutes (a
        fresh machine runs the paper's 200 full-width epochs)."""
        if self.estimated or not self.main_process or not self.total_steps:
            return
        self.estimated = True
        gpu = self.device.type == "cuda"
        if gpu and self.world_size == 1 and self.args.compile != "reduce-overhead" and not self.args.step_graph:
            tqdm.write("note: --compile reduce-overhead replays the network as CUDA graphs, which speeds up steps "
                       "bound by kernel launches, as the paper's small crops make them (SPEED.md)")
        hours = seconds_per_step * (self.total_steps - step) / 3600
        if hours > 3:
            tqdm.write(f"note: at {self.args.batch_size / seconds_per_step:.0f} images/s this run needs about "
                       f"{hours:.0f} more hours on {self.device}." + ("" if gpu else
                       " To try the method in minutes here, train the README's laptop run: --width 16 "
                       "--proj-hidden 512 --kappa 10 --beta 0.5 --lr 3e-3 --no-blur --stem cifar "
                       "--forward per-resolution --max-minutes 10"))

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
        path = os.path.join(self.args.out, "ckpt.pt")
        kept = f"the last good checkpoint {path} is kept" if os.path.exists(path) else "no checkpoint had been written yet"
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

    def images_per_second(self, steps, epoch_start):
        """The log's images_per_s for an epoch of `steps` steps begun at `epoch_start`: of the steps after
        this session's first when the epoch holds it (its compilation and set-up logged apart, first_step_s)."""
        batch_size = self.args.batch_size
        if self.first_step_ended is None or self.first_step_ended < epoch_start or steps < 2:
            return {"images_per_s": steps * batch_size / (time.time() - epoch_start)}
        return {"images_per_s": (steps - 1) * batch_size / (time.time() - self.first_step_ended),
                "first_step_s": self.first_step_seconds}

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
            raise SystemExit(f"error: {error_message(error)}; the checkpoint {os.path.join(self.args.out, 'ckpt.pt')} "
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
                print(f"{signal.Signals(signum).name}: stopped after step {step} and saved "
                      f"{os.path.join(self.args.out, 'ckpt.pt')}; continue with\n"
                      f"    {launcher} train.py --out {self.args.out} --resume")
            raise SystemExit(128 + signum)
        if self.out_of_time and self.main_process:
            print(f"stopped after {self.args.max_minutes} minutes at step {step}; checkpoint "
                  f"{os.path.join(self.args.out, 'ckpt.pt')}")
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
