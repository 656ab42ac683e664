"""Block-sparse on a busy CPU: the torch backend against dense masked SDPA and compiled
FlexAttention (same block mask), with and without one competing busy-loop process, at
1 and 2 intra-op threads.

    python -m bench.load [--length 8192] [--window 384] [--rounds 5] [--out DIR]

CI runners, pytest-xdist workers and data loaders share the CPU with the attention
call; a design that opens many short parallel regions per call loses its threads to
them.  Each condition times the implementations in interleaved rounds (one call of
each per round, medians over rounds), so load that comes and goes hits every
implementation alike.  Peak memory (beyond the inputs, the dense mask counted for
the masked SDPA, which must hold it) is measured once, on one thread, with
:func:`bench.measure.peak_bytes` (its profiler sees only the calling thread's
allocations, so it cannot measure the torch backend's worker threads at 2).  The load average is recorded before and after each
condition: this machine may be shared.  Writes ``load-cpu.json`` and ``load-cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import stfast

from .competitors import _flex_attention, _masked_sdpa, flex_block_mask
from .measure import Progress, peak_bytes

RESULTS = Path(__file__).with_name("results")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


class _Hog:
    """One busy-loop process competing for the CPU while the block runs."""

    def __init__(self, on: bool):
        self.on = on
        self.proc = None

    def __enter__(self):
        if self.on:
            self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)  # let it reach its loop
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def _impls(layout, q, k, v):
    """``{name: (fwd, fwd_bwd or None)}``; each callable does one full pass."""
    sdpa = _masked_sdpa(layout)
    flex = _flex_attention()
    block_mask = flex_block_mask(layout, q.device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(q, k, v)
        return run

    def fwd_bwd(fn):
        def run():
            return torch.autograd.grad(fn(*leaves), leaves, dout)
        return run

    stf = lambda a, b, c: stfast.block_sparse_attention(a, b, c, layout, backend="torch")  # noqa: E731
    fl = lambda a, b, c: flex(a, b, c, block_mask=block_mask)  # noqa: E731
    # FlexAttention has no CPU backward (see bench.competitors._flex).
    return {"stfast[torch]": (fwd(stf), fwd_bwd(stf)),
            "sdpa+mask": (fwd(sdpa), fwd_bwd(sdpa)),
            "flex (compiled)": (fwd(fl), None)}


def _interleaved(steps: dict, rounds: int, progress: Progress, label: str) -> dict:
    for step in steps.values():
        step()  # warm-up: allocator, thread pool, compile
    times = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
        progress.step(f"{label} round {r + 1}/{rounds}")
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--window", type=int, default=384, help="local window (384 at L=8192: ~10%% density)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]

    layout = stfast.layouts.local(args.length, args.window, block=args.block)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.length, args.dim, generator=gen) for _ in range(3))
    impls = _impls(layout, q, k, v)
    mask_bytes = layout.num_heads * args.length * args.length  # the dense bool mask SDPA holds

    with torch.no_grad():
        want = impls["sdpa+mask"][0]()
        got = impls["stfast[torch]"][0]()
    err = float((got - want).abs().max())

    torch.set_num_threads(1)
    peaks = {}
    for name, (fwd, fwd_bwd) in impls.items():
        held = mask_bytes if name == "sdpa+mask" else 0
        fwd()
        peaks[(name, "fwd")] = peak_bytes(fwd, q.device) + held
        if fwd_bwd is not None:
            fwd_bwd()
            peaks[(name, "fwd+bwd")] = peak_bytes(fwd_bwd, q.device) + held

    conditions = [(n, hog) for n in threads for hog in (False, True)]
    progress = Progress([1.0] * (len(conditions) * 2 * args.rounds))
    rows = []
    for n, hog in conditions:
        torch.set_num_threads(n)
        torch._dynamo.reset()  # Inductor bakes the thread count into the compiled flex kernel
        impls = _impls(layout, q, k, v)
        before = _loadavg()
        with _Hog(hog):
            for pass_, pick in (("fwd", 0), ("fwd+bwd", 1)):
                steps = {name: pair[pick] for name, pair in impls.items() if pair[pick] is not None}
                label = f"threads={n} {'hog' if hog else 'idle'} {pass_}"
                times = _interleaved(steps, args.rounds, progress, label)
                for name, ts in times.items():
                    rows.append(dict(threads=n, hog=hog, pass_=pass_, impl=name,
                                     median_ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts),
                                     peak_mb=peaks[(name, pass_)] / 2**20))
        after = _loadavg()
        for row in rows:
            if row["threads"] == n and row["hog"] == hog:
                row["loadavg"] = f"{before} -> {after}"
    progress.close()

    meta = dict(length=args.length, window=args.window, heads=args.heads, dim=args.dim,
                block=args.block, density=layout.density, rounds=args.rounds,
                max_abs_err_vs_sdpa=err, torch=torch.__version__, cpus=os.cpu_count())
    md = _markdown(meta, rows)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load-cpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (args.out / "load-cpu.md").write_text(md)
    return 0


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Block-sparse under load (CPU, {meta['cpus']} cores, torch {meta['torch']})", "",
             f"B=1 H={meta['heads']} L={meta['length']} D={meta['dim']} float32, local window "
             f"{meta['window']}, block {meta['block']}, density {meta['density']:.3f}; medians of "
             f"{meta['rounds']} interleaved rounds; stfast vs masked SDPA max abs diff "
             f"{meta['max_abs_err_vs_sdpa']:.2e}.", "",
             "| threads | load | pass | impl | median ms (min-max) | stfast speed-up | peak MB | loadavg |",
             "|---|---|---|---|---|---|---|---|"]
    stf = {(r["threads"], r["hog"], r["pass_"]): r["median_ms"] for r in rows if r["impl"] == "stfast[torch]"}
    for r in rows:
        ratio = r["median_ms"] / stf[(r["threads"], r["hog"], r["pass_"])]
        lines.append(f"| {r['threads']} | {'1 hog' if r['hog'] else 'none'} | {r['pass_']} | {r['impl']} | "
                     f"{r['median_ms']:.0f} ({r['min_ms']:.0f}-{r['max_ms']:.0f}) | "
                     f"{'' if r['impl'] == 'stfast[torch]' else f'{ratio:.2f}x'} | {r['peak_mb']:.1f} | "
                     f"{r['loadavg']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
