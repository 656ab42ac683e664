"""Sequence-parallel SpatioTemporalAttention: DSP vs Ulysses, measured side by side.

Spawns P gloo processes on loopback (CPU) per world size and times one layer per
strategy, forward and forward+backward, on frames sharded along T.  Bytes are what one
rank passes to the all-to-alls (``stfast.distributed.count_comm``; the slowest/largest
rank is reported), also in units of the rank's activation share ``M/P = B*T*N*C/P``
elements, the unit of the table in ``stfast/distributed.py``.

``python -m bench.distributed [--world-sizes 2,4] [--modes divided,heads]`` prints a
table; ``python -m bench --suite distributed`` calls :func:`run`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (name, B, T, N, C, H): a TimeSformer-like video layer and a traffic-forecasting layer,
# cut to what a 2-core CPU times in seconds.
SHAPES = (("video", 1, 8, 196, 256, 8), ("traffic", 8, 12, 207, 64, 8))
STRATEGIES = ("dsp", "ulysses")
PASSES = ("fwd", "fwd+bwd")
WORLD_SIZES = (2, 4)
# DSP is stfast's strategy; Ulysses is the alternative it is measured against, so
# python -m bench reports DSP's speed-up over it.
FAMILY = {"dsp": "distributed", "ulysses": "ulysses"}
# Seconds to start P processes, import torch and stfast in each and set up gloo; and a
# layer's time over its FLOPs at fused-SDPA speed (measured on 2 cores, 2 ranks).
STARTUP_S = 8.0
SLOWDOWN = 5.0


def _threads_per_rank(threads: int | None, world: int) -> int:
    return max(1, (threads or os.cpu_count() or 1) // world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed_reps(fn, budget_s: float) -> list[float]:
    """Per-call seconds of ``fn`` on this rank; every rank runs the same number of calls
    (decided from the slowest rank's warm-up) so the collectives stay matched."""
    fn()
    start = time.perf_counter()
    fn()
    first = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(first, op=dist.ReduceOp.MAX)
    reps = int(min(30, max(3, budget_s / max(first.item(), 1e-6))))
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _measure(sp, x_loc, passes, budget_s, announce):
    """``{pass: (median seconds, bytes, remote bytes, all-to-all calls)}`` on this rank;
    ``announce(pass)`` before each pass."""
    from stfast.distributed import count_comm

    gy = torch.randn_like(x_loc)

    def fwd():
        with torch.no_grad():
            sp(x_loc)

    def fwd_bwd():
        x = x_loc.detach().requires_grad_()
        sp(x).backward(gy)

    out = {}
    for pass_, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        if pass_ not in passes:
            continue
        announce(pass_)
        with count_comm() as c:
            fn()
        times = _timed_reps(fn, budget_s)
        out[pass_] = (statistics.median(times), c.all_to_all_bytes, c.all_to_all_remote_bytes, c.all_to_all_calls)
    return out


def _worker(rank, world, port, config, result_path, steps):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        threads = _threads_per_rank(config["threads"], world)
        torch.set_num_threads(threads)
        from stfast.distributed import SequenceParallelSpatioTemporalAttention

        dtype = getattr(torch, config["dtype"])
        rows = []
        for name, b, t, n, c, h in SHAPES:
            for mode in config["modes"]:
                for strategy in STRATEGIES:
                    torch.manual_seed(0)
                    sp = SequenceParallelSpatioTemporalAttention(c, h, mode=mode, strategy=strategy).to(dtype)
                    x_loc = torch.randn(b, t, n, c, dtype=dtype).tensor_split(world, 1)[rank].contiguous()
                    def announce(pass_):
                        if rank == 0:
                            steps.put(f"distributed/{name} {mode} P={world} sp-{strategy} {pass_}")
                    measured = _measure(sp, x_loc, config["passes"], config["budget"], announce)
                    share = x_loc.numel() * x_loc.element_size()
                    everyone = [None] * world
                    dist.all_gather_object(everyone, (measured, share))
                    if rank:
                        continue
                    for pass_ in measured:
                        seconds = max(m[pass_][0] for m, _ in everyone)
                        sent = max(m[pass_][1] for m, _ in everyone)
                        remote = max(m[pass_][2] for m, _ in everyone)
                        shares = max(m[pass_][1] / s for m, s in everyone)
                        ms = seconds * 1e3
                        rows.append(dict(
                            suite="distributed", name=f"{strategy}/{mode}", case=f"{name} {mode} P={world}",
                            shape=f"B={b} T={t} N={n} C={c} H={h} P={world}", problem_class=None,
                            density=None, dtype=config["dtype"],
                            device=f"cpu (gloo, {world} processes)", threads_per_rank=threads,
                            **{"pass": pass_}, impl=f"sp-{strategy}", family=FAMILY[strategy],
                            backend="gloo",
                            status="ok", reason=None, ms=ms, time_ms=ms, bytes_per_layer=sent,
                            remote_bytes_per_layer=remote, activation_shares=shares,
                            all_to_all_calls=measured[pass_][3], world_size=world, mode=mode,
                            strategy=strategy))
        if rank == 0:
            # strategies side by side per (case, pass), the grouping bench tables use
            order = {case: i for i, case in enumerate(dict.fromkeys(r["case"] for r in rows))}
            rows.sort(key=lambda r: (order[r["case"]], PASSES.index(r["pass"])))
            Path(result_path).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _config(args) -> dict:
    dtype = getattr(args, "dtype", None) or torch.float32
    return dict(
        dtype=str(dtype).replace("torch.", ""),
        modes=list(getattr(args, "modes", None) or ("divided",)),
        passes=[p for p in (getattr(args, "passes", None) or PASSES) if p in PASSES],
        budget=float(getattr(args, "budget", None) or 0.6),
        threads=getattr(args, "threads", None),
        world_sizes=list(getattr(args, "world_sizes", None) or WORLD_SIZES),
    )


def _layer_flops(b, t, n, c, mode_passes: int) -> float:
    """Forward FLOPs of ``mode_passes`` attentions with their q/k/v and output projections."""
    tokens = b * t * n
    return mode_passes * (8.0 * tokens * c * c + 2.0 * tokens * c * (n + t))


def estimate(args=None, flops_per_s: float = 1e11) -> list[float]:
    """Expected seconds of each row :func:`run` returns, in its order (a process start
    charged to each world size's first row), from the layer's FLOPs at ``flops_per_s``
    times a measured slowdown (small heads, gloo, processes sharing cores): rough, for
    the progress bar's time left."""
    config = _config(args)
    steps = []
    for world in config["world_sizes"]:
        first = len(steps)
        for _, b, t, n, c, _ in SHAPES:
            fwd = _layer_flops(b, t, n, c, 2) / world / flops_per_s * SLOWDOWN
            for _ in config["modes"]:
                for _ in STRATEGIES:
                    for pass_ in config["passes"]:
                        call = fwd * (3.5 if pass_ == "fwd+bwd" else 1.0)
                        reps = min(30, max(3, config["budget"] / call))
                        steps.append((reps + 2) * call)
        if len(steps) > first:
            steps[first] += STARTUP_S
    return steps


def run(args=None, progress=None) -> list[dict]:
    """Result rows (``name``, ``suite``, ``shape``, ``time_ms``, ``bytes_per_layer`` and the
    keys of ``python -m bench`` rows) for every shape, mode, strategy, world size and pass.

    Reads ``args.world_sizes`` (default 2, 4), ``args.modes`` (default divided),
    ``args.dtype`` (default float32), ``args.passes``, ``args.budget`` (seconds of timing
    per row) and ``args.threads`` (split among the ranks; default all cores) when present.
    ``progress.step(label)`` is called as rank 0 starts each row.
    """
    config = _config(args)
    rows = []
    steps = mp.get_context("spawn").SimpleQueue()
    for world in config["world_sizes"]:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "rows.json"
            workers = mp.spawn(_worker, args=(world, _free_port(), config, str(result), steps),
                               nprocs=world, join=False)
            while True:
                finished = workers.join(timeout=0.2)
                while not steps.empty():
                    label = steps.get()
                    if progress is not None:
                        progress.step(label)
                if finished:
                    break
            rows += json.loads(result.read_text())
    return rows


def table(rows: list[dict]) -> str:
    cols = ("case", "strategy", "pass", "ms", "bytes/layer/rank", "remote bytes", "x M/P", "all-to-alls")
    body = [(r["case"], r["strategy"], r["pass"], f"{r['time_ms']:.2f}", f"{r['bytes_per_layer']:,}",
             f"{r['remote_bytes_per_layer']:,}", f"{r['activation_shares']:.2f}", str(r["all_to_all_calls"]))
            for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", default="2,4", help="comma-separated process counts (default 2,4)")
    p.add_argument("--modes", default="divided", help="comma-separated modes (default divided)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    p.add_argument("--budget", type=float, default=0.6, help="seconds of timing per row (default 0.6)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads in all, split among the ranks (default: every core)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    a = p.parse_args(argv)
    args = argparse.Namespace(world_sizes=[int(w) for w in a.world_sizes.split(",")],
                              modes=a.modes.split(","), dtype=getattr(torch, a.dtype), budget=a.budget,
                              threads=a.threads)
    rows = run(args)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
