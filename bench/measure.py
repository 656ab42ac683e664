"""How each figure is obtained: the reference a call is checked against, time, peak
memory, and the progress bar.

Time is the median of many calls after warm-up: ``triton.testing.do_bench`` (CUDA
events, L2 flushed between calls) on a GPU, ``time.perf_counter`` on the CPU.

Peak memory is the most memory the call holds at once *beyond what was allocated
before it* (inputs, and for the backward pass the saved forward graph): on a GPU
``torch.cuda.max_memory_allocated``; on the CPU the running total of PyTorch's CPU
allocator as recorded by ``torch.profiler`` (``profile_memory=True``), replayed in
time order.  The CPU figure counts every tensor ATen allocates, temporaries
included; it does not see scratch that libraries take with plain ``malloc``
(oneDNN, OpenMP), which is small next to the tensors here.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import torch

from stfast.lowering import from5, lower
from stfast.reference import oracle

# Above this many scores the float64 oracle is too big: check against the torch
# backend in float32 instead (memory-efficient, and itself checked by the tests).
ORACLE_MAX_SCORES = 1 << 25

# Largest error allowed, relative to the largest reference value.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-9}


def _oracle_fn(case, layout):
    kind = case.pclass if case.spatiotemporal else "dense"
    causal = "top_left" if case.pclass == "causal" else None

    def run(q, k, v):
        lowered = layout.lowered(q.device, (0, 1, 0) if layout.num_heads > 1 else (0, 0, 0)) \
            if layout is not None else None
        p = lower(kind, q, k, v, scale=q.shape[-1] ** -0.5, causal=causal, layout=lowered)
        return from5(oracle(p)[0], kind)
    return run


def _torch_fn(case, layout):
    import stfast

    if case.spatiotemporal:
        return lambda q, k, v: stfast.spatiotemporal_attention(q, k, v, axis=case.pclass, backend="torch")
    return lambda q, k, v: stfast.attention(q, k, v, causal=case.pclass == "causal", layout=layout,
                                            backend="torch")


class Reference:
    """The output (and gradients, on demand) a case's calls are checked against."""

    def __init__(self, case, inputs, need_grads: bool):
        s = case.shape  # the oracle materializes every score, masked ones included
        scores = case.visible_pairs() if case.spatiotemporal else s["B"] * s["H"] * s["L"] ** 2
        self.exact = scores <= ORACLE_MAX_SCORES
        layout = case.build_layout()
        dtype = torch.float64 if self.exact else torch.float32
        self.source = "float64 oracle" if self.exact else "torch backend, float32"
        fn = _oracle_fn(case, layout) if self.exact else _torch_fn(case, layout)
        leaves = [t.detach().to(dtype).requires_grad_(need_grads) for t in inputs.leaves]
        with torch.set_grad_enabled(need_grads):
            out = inputs.finish(fn(*inputs.qkv(leaves)))
        gen = torch.Generator(device="cpu").manual_seed(1)
        self.dout = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=inputs.leaves[0].dtype)
        self.grads = None
        if need_grads:
            self.grads = [g.detach() for g in torch.autograd.grad(out, leaves, self.dout.to(dtype))]
        self.out = out.detach()

    def error(self, out, grads=None) -> float:
        """Largest error of ``out`` (and ``grads``) relative to the largest reference value."""
        pairs = [(out, self.out)] + (list(zip(grads, self.grads)) if grads is not None else [])
        worst = 0.0
        for got, want in pairs:
            want = want.to(got.device)
            diff = (got.to(want.dtype) - want).abs().max()
            scale = want.abs().max().clamp(min=1e-6)
            worst = max(worst, float(diff / scale))
        return worst


def make_step(fn, inputs, pass_: str, dout):
    """A no-argument callable doing one ``pass_`` of ``fn``, and one that returns
    ``(out, grads | None)`` for the correctness check."""
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                return inputs.finish(fn(*inputs.qkv()))
        return step, lambda: (step(), None)
    leaves = [t.detach().requires_grad_() for t in inputs.leaves]
    if pass_ == "fwd+bwd":
        def step():
            return torch.autograd.grad(inputs.finish(fn(*inputs.qkv(leaves))), leaves, dout)

        def checked():
            out = inputs.finish(fn(*inputs.qkv(leaves)))
            return out.detach(), torch.autograd.grad(out, leaves, dout)
        return step, checked
    state = {}

    def forward():
        state["out"] = inputs.finish(fn(*inputs.qkv(leaves)))
        return state["out"]

    def step():
        return torch.autograd.grad(state["out"], leaves, dout, retain_graph=True)

    def checked():
        out = forward()
        return out.detach(), step()
    return step, checked


def flops_per_second(device: torch.device, dtype: torch.dtype, reps: int = 5) -> float:
    """What fused SDPA reaches here and now (median of ``reps`` forwards, load included):
    the unit of the run's duration estimate. Costs about a tenth of a second on a CPU."""
    import torch.nn.functional as F

    b, h, length, d = 1, 8, 1024, 64
    q, k, v = (torch.randn(b, h, length, d, device=device, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v)
        times = []
        for _ in range(reps):
            sync(device)
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v)
            sync(device)
            times.append(time.perf_counter() - start)
    return 4.0 * b * h * length * length * d / statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(step, device: torch.device, *, budget_s: float, min_reps: int = 3,
              max_reps: int = 50, warmed: bool = False) -> tuple[float, int]:
    """Median milliseconds of ``step`` and how many calls it is the median of.
    ``warmed``: the caller has just run the same computation (the correctness check),
    so a CPU warm-up call would only add a slow call's time to the run."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(step, warmup=25, rep=max(100, int(budget_s * 1000)),
                                  return_mode="median")), -1
        return _cuda_events_ms(step, device, budget_s)
    if not warmed:
        step()  # warm-up: allocator, thread pool, caches
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


def _cuda_events_ms(step, device, budget_s):
    for _ in range(5):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < 20 or (time.perf_counter() - start < budget_s and len(times) < 200):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times), len(times)


def peak_bytes(step, device: torch.device) -> int:
    """Most bytes held at once during ``step`` beyond those allocated before it."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return peak
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.start()
    try:
        result = step()
    finally:
        with _quiet_fd2():
            prof.stop()
    del result
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].alloc_size))
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_fd2():
    """Kineto logs every profiler start and stop from C++ to fd 2; hide those lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar on stderr (a line per step when not a terminal) with the
    elapsed time and the time left.

    ``plan`` holds each step's estimated seconds. The time left is the estimate of the
    steps not finished, scaled by how far the finished ones ran over or under theirs:
    the estimate's absolute error (the machine's speed, its load) corrects itself as the
    run goes, its relative error between kinds of step does not.
    """

    def __init__(self, plan: list[float], width: int = 28, stream=sys.stderr):
        self.plan = [max(1e-3, s) for s in plan] or [1e-3]
        self.total, self.width, self.stream = len(self.plan), width, stream
        self.done = 0
        self.start = time.perf_counter()
        self.tty = stream.isatty()
        self.loads: list[float] = []

    def left_s(self, elapsed: float) -> float:
        finished = sum(self.plan[:max(0, self.done - 1)])
        remaining = sum(self.plan[max(0, self.done - 1):])
        return remaining * (elapsed / finished if finished > 0 else 1.0)

    def step(self, label: str) -> None:
        """Starts the next step (the previous one is finished)."""
        self.done = min(self.done + 1, self.total)
        self.loads.append(os.getloadavg()[0])
        elapsed = time.perf_counter() - self.start
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        text = (f"[{bar}] {self.done}/{self.total}  {clock(elapsed)} elapsed, "
                f"~{clock(self.left_s(elapsed))} left  {label}")
        if self.tty:
            self.stream.write("\r" + text[:120].ljust(120))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
