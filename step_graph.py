"""The training step as one graph (train.py --step-graph): the crops, the network, the loss and AdamW,
captured once as a CUDA graph and replayed every step, so that the host launches one graph a step
instead of some 250 kernels and never waits for the GPU between steps.

Machinery: a reader of the method may skip this file. train.training_step, with the crops before it, is
the step as the method reads; this file runs the same step in a form of fixed shapes, and test_hydes.py
checks the two against each other (the same views exactly, the same weights to float32's rounding).
train.py calls it as

    whole_step = WholeStep(net, optimizer, crops, loss, logged, precision, device)
    terms = whole_step(images, labels, generator, lr, beta)       # one step; its logged terms, on the device

What a graph needs, and how the step provides it:
  - Nothing read by the host inside the step, and every shape fixed. The crops draw their parameters in
    shapes that depend on nothing drawn (batched_crops.BatchedMultiCrop(every_crop=True): masks where the
    readable form gathers the chosen crops); the loss's constants (log C_D(kappa), the ceilings) are
    Python numbers of the settings. So kappa stays fixed over a run here (--kappa-final is refused):
    log C_D(kappa) is a series the host sums.
  - Inputs at fixed addresses. A replay reads the tensors the capture read, so each step's inputs are
    copied into them: the uint8 batch into `images`, and into one device buffer (ParameterBuffer) the
    augmentation parameters with the learning rate and beta of the step, in ONE host-to-device copy from
    page-locked memory.
  - An optimiser the graph can hold: `adamw_`, AdamW written as foreach tensor operations with the
    learning rate and the step count as device tensors. torch.optim.AdamW's step() reads its step count
    and learning rate on the host unless capturable; its capturable form refuses CPU tensors, and its
    fused kernel has no rule by which torch.compile could trace a tensor learning rate (PyTorch 2.14). The
    state stays in the torch.optim.AdamW that train.py builds (exp_avg, exp_avg_sq, step), so checkpoints
    are the same with or without the graph, and a run may resume either way.

Which way the augmentation stays a function of (seed, step, rank): the parameters are drawn on the CPU
from train.augmentation_generator, as without the graph, and copied into the buffer before each replay,
rather than drawn on the device from a generator state the graph advances. So the views are those of
the readable step, on any device, a resumed run draws the views an uninterrupted one would, and the CPU
draws step t + 1's parameters while the GPU runs step t (two page-locked buffers take turns).

On a GPU the first WARMUP_STEPS calls run the step eagerly on a side stream (cuDNN picks its algorithms,
autograd and the caches of constants are set up), as CUDA graphs require; the next call captures the
graph, then replays it. Every call takes one real step: the capture records without computing, and the
replay that follows computes. On a CPU the same function runs each call (compiled into one graph with
--compile: `torch.compile(fullgraph=True)` refuses any break).
"""

import warnings

import torch

WARMUP_STEPS = 3        # eager steps on a side stream before the capture (PyTorch's CUDA-graph guide uses 3)


def adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """AdamW (Loshchilov & Hutter, with torch.optim.AdamW's defaults), in place, for lists of tensors:

        theta <- theta (1 - lr lambda)                      decoupled weight decay
        m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
        theta <- theta - lr/(1 - beta1^t) m / (sqrt(v)/sqrt(1 - beta2^t) + eps)

    lr: a 0-d tensor on the parameters' device; steps: the per-parameter step counts t (0-d float
    tensors there, torch.optim.AdamW's state["step"]), incremented first. No value is read by the host,
    so a graph can hold it. Every parameter has taken the same number of steps, so steps[0] gives the
    bias corrections for all. They are computed in float64, as torch.optim.AdamW computes them (in
    Python), then rounded to float32 once: in float32, 1 - 0.999^1 comes out 1.3e-5 too small relative
    to its value (0.999 is not a float32), which would move the first steps by as much."""
    beta1, beta2 = betas
    torch._foreach_add_(steps, 1)
    t = steps[0].double()
    step_size = (lr.double() / (1 - beta1 ** t)).float()                    # 0-d: lr / (1 - beta1^t)
    bias2_sqrt = (1 - beta2 ** t).sqrt().float()                           # 0-d: sqrt(1 - beta2^t)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, bias2_sqrt)
    torch._foreach_add_(denominators, eps)
    updates = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_mul_(updates, -step_size)
    torch._foreach_add_(params, updates)


class ParameterBuffer:
    """A step's augmentation parameters (BatchedMultiCrop.draw's list of dicts) and scalars (the learning
    rate, beta), all float32, in one device tensor at a fixed address: `views` is the same list of dicts
    and dict of scalars, as views of that tensor, for the graph to read; `load` writes a step's values
    into it through page-locked host memory, in one copy that does not make the host wait."""

    def __init__(self, example, scalar_names, device):
        self.shapes = [{name: t.shape for name, t in group.items()} for group in example]
        self.scalar_names = scalar_names
        size = sum(t.numel() for group in example for t in group.values()) + len(scalar_names)
        self.device_buffer = torch.empty(size, device=device)
        cuda = device.type == "cuda"
        self.host_buffers = [torch.empty(size, pin_memory=cuda) for _ in range(2 if cuda else 1)]
        # After a copy from a host buffer is queued, the buffer must not be rewritten until the copy is
        # done: an event per buffer, waited for before the buffer's next turn (two steps later)
        self.copied = [torch.cuda.Event() if cuda else None for _ in self.host_buffers]
        self.turn = 0
        parts = iter(self.device_buffer.split([s.numel() for group in self.shapes for s in group.values()]
                                              + [1] * len(scalar_names)))
        self.views = ([{name: next(parts).view(shape) for name, shape in group.items()} for group in self.shapes],
                      {name: next(parts).view(()) for name in scalar_names})

    def load(self, parameters, scalars):
        """Write one step's parameters (shaped as the example's) and scalars (a dict of floats)."""
        if [{name: t.shape for name, t in group.items()} for group in parameters] != self.shapes:
            raise ValueError("the step's augmentation parameters changed shape; the graph needs fixed shapes")
        host, copied = self.host_buffers[self.turn], self.copied[self.turn]
        if copied is not None:
            copied.synchronize()          # the copy queued from this buffer two steps ago is done
        flat = [t.reshape(-1) for group in parameters for t in group.values()]
        torch.cat(flat + [torch.tensor([scalars[name] for name in self.scalar_names])], out=host)
        self.device_buffer.copy_(host, non_blocking=True)
        if copied is not None:
            copied.record()
        self.turn = (self.turn + 1) % len(self.host_buffers)


class WholeStep:
    """train.training_step, with the batched crops before it, as one function of fixed shapes: captured
    as a CUDA graph on a GPU (after WARMUP_STEPS eager steps), run as it is on a CPU (compiled into one
    graph when `compile`). Each call takes one AdamW step; see the module docstring.

    net: the HyDeSModel (its parameters and buffers are updated in place, the graph's inputs and
    outputs); optimizer: the torch.optim.AdamW that holds the state (lr, betas, eps, weight decay from
    its param group; its step() is never called); crops: a BatchedMultiCrop(every_crop=True);
    loss(z, labels, beta) -> dict with "loss" and every name in `logged`; precision: precision.Precision,
    without gradient scaling. The first call's batch sets the shape (B, 3, H, W) of every later one."""

    def __init__(self, net, optimizer, crops, loss, logged, precision, device, compile=False):
        if not crops.every_crop:
            raise ValueError("WholeStep needs BatchedMultiCrop(recipes, every_crop=True): fixed shapes")
        if precision.scaler.is_enabled():
            raise ValueError("WholeStep runs without gradient scaling (fp16): use bf16 or fp32")
        self.net, self.crops, self.loss, self.logged, self.precision = net, crops, loss, logged, precision
        self.device = device
        if device.type == "cuda" and device.index is not None:
            # The capture stream, the replay and the buffer's events use the current device: make it this one
            torch.cuda.set_device(device)
        group, = optimizer.param_groups       # train.py's one group of every parameter
        self.params = [p for p in group["params"] if p.requires_grad]
        self.hyper = {"betas": group["betas"], "eps": group["eps"], "weight_decay": group["weight_decay"]}
        self.state = [self.optimizer_state(optimizer, p) for p in self.params]
        self.images = self.labels = self.buffer = None     # the inputs the graph reads: see fixed_inputs
        if compile:
            torch._dynamo.config.trace_autograd_ops = True      # lets Dynamo trace backward() into the graph
            # Dynamo notes each lru_cache it traces through; those the step meets cache pure functions of the
            # settings (batched_crops.products_dtype, hydes.log_vmf_normalizer), so the notes are noise
            warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
        self.function = torch.compile(self.step, fullgraph=True) if compile else self.step
        self.calls, self.graph, self.terms = 0, None, None

    @staticmethod
    def optimizer_state(optimizer, p):
        """torch.optim.AdamW's state of p (exp_avg, exp_avg_sq, step), made as its first step() would make
        it if p has none yet (a new run), the step count moved to p's device (a graph reads it there)."""
        state = optimizer.state[p]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                         exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
        state["step"] = state["step"].to(p.device, torch.float32)
        return state

    def step(self):
        """The step on the fixed inputs: views -> z -> loss -> gradients -> AdamW. -> the logged terms
        (len(logged),), detached. As train.training_step, but for its inputs and its optimiser."""
        autocast, _, memory_format = self.precision
        parameters, scalars = self.buffer.views
        views = self.crops.views(self.images, parameters, cut=False)          # V views (B, 3, h, w)
        views = [v.contiguous(memory_format=memory_format) for v in views]
        for p in self.params:             # dropped, not zeroed: backward writes new gradients
            p.grad = None
        with autocast:
            z = self.net(views)                                               # (V, B, D) on the sphere
        out = self.loss(z, self.labels, scalars["beta"])
        out["loss"].backward()
        with torch.no_grad():             # AdamW changes the parameters in place, outside autograd
            adamw_(self.params, [p.grad for p in self.params], [s["exp_avg"] for s in self.state],
                   [s["exp_avg_sq"] for s in self.state], [s["step"] for s in self.state], scalars["lr"],
                   **self.hyper)
        return torch.stack([out[k].detach() for k in self.logged])

    def __call__(self, images, labels, generator, lr, beta):
        """One step on a uint8 batch (B, 3, H, W) and its labels (B,), the augmentation drawn from
        `generator`, at learning rate `lr` and loss weight `beta` (floats) -> the logged terms, on the
        device. On a GPU they are the graph's output: read or copy them before the next call."""
        if self.images is None:
            self.fixed_inputs(images)
        if tuple(images.shape) != tuple(self.images.shape) or images.dtype != torch.uint8:
            raise ValueError(f"the step graph was built for uint8 batches {tuple(self.images.shape)}, got "
                             f"{images.dtype} {tuple(images.shape)}")
        self.buffer.load(self.crops.draw(len(images), tuple(images.shape[2:]), generator), {"lr": lr, "beta": beta})
        self.images.copy_(images, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        self.calls += 1
        if self.device.type != "cuda":
            return self.function()
        if self.calls <= WARMUP_STEPS:            # eager, on a side stream (as graph capture requires)
            return self.on_side_stream(self.function)
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.terms

    def fixed_inputs(self, images):
        """The tensors the graph reads, at addresses that never change, for batches shaped as `images`:
        the uint8 batch, its labels, and the ParameterBuffer of the augmentation and the scalars."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("the step graph needs uint8 batches (B, 3, H, W) of one image size")
        self.images = torch.zeros(images.shape, dtype=torch.uint8, device=self.device)
        self.labels = torch.zeros(len(images), dtype=torch.int64, device=self.device)
        example = self.crops.draw(len(images), tuple(images.shape[2:]), torch.Generator().manual_seed(0))
        self.buffer = ParameterBuffer(example, ("lr", "beta"), self.device)

    def on_side_stream(self, run):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            result = run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return result

    def capture(self):
        """Record the step as a CUDA graph; its output `terms` is rewritten by every replay. The gradients
        are dropped first, so that backward allocates them in the graph's own memory. thread_local: the
        loading workers' pin-memory thread may call CUDA during the capture (a page-locked allocation),
        which the default mode ("global") counts as breaking it; PyTorch's own CUDA-graph trees capture
        so too. The graph is kept only once its capture has ended well."""
        for p in self.params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.terms = self.function()
        self.graph = graph
