"""``python -m bench``: stfast side by side with what users would otherwise pick.

See bench/README.md for the options and how to read the output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import stfast

from . import distributed, report
from .measure import Progress, clock, flops_per_second
from .run import add_speedups, blank_row, device_name, estimate, plan, sweep
from .shapes import PRESETS, SUITES, select

PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="all", choices=SUITES + ("all",),
                   help="which family of problems (default: all)")
    p.add_argument("--pass", dest="passes", default="fwd,fwd+bwd",
                   help="comma-separated passes among fwd, bwd, fwd+bwd (default: fwd,fwd+bwd)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="shapes to run (default: full on CUDA, cpu on CPU, cpu-full on CPU with --full)")
    p.add_argument("--full", action="store_true",
                   help="the full sweep for the device: on CPU the cpu-full preset and 2 and 4 "
                        "distributed ranks (about 7 minutes on 2 cores) instead of the ~3-minute default")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's default here, "
                        f"{torch.get_num_threads()}); recorded in every report")
    p.add_argument("--out", default="bench/out", help="output folder (bench/results for committed runs)")
    p.add_argument("--compare", default=None, metavar="OLD.json", help="flag changes against an earlier run")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="relative slow-down --compare calls a regression (default 0.10)")
    p.add_argument("--update-dispatch", action="store_true",
                   help="write the measured backend order to stfast/dispatch.json")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per row (default 1.0 on CUDA, 0.6 on CPU)")
    args = p.parse_args(argv)
    args.passes = tuple(x.strip() for x in args.passes.split(","))
    bad = [x for x in args.passes if x not in PASSES]
    if bad:
        p.error(f"--pass must be a comma-separated list of {PASSES}, got {bad}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    on_gpu = args.device.type == "cuda"
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    args.preset = args.preset or ("full" if on_gpu else "cpu-full" if args.full else "cpu")
    args.budget = args.budget or (1.0 if on_gpu else 0.6)
    args.suites = SUITES if args.suite == "all" else (args.suite,)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be a positive integer, got {args.threads}")
    args.threads = args.threads or torch.get_num_threads()
    args.world_sizes = (2, 4) if args.full or on_gpu else (2,)
    return args


def _distributed_rows(args, progress) -> list[dict]:
    """``--suite distributed`` lives in bench/distributed.py."""
    base = dict(suite="distributed", case="(suite)", dtype=str(args.dtype).replace("torch.", ""),
                device=device_name(args.device), impl="(suite)", family="distributed", **{"pass": "-"})
    try:
        return [blank_row(**{**base, **row}) for row in distributed.run(args, progress)]
    except Exception as exc:  # a broken suite is reported, the others still count
        return [blank_row(**base, status="error", reason=f"{type(exc).__name__}: {exc}"[:240])]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    name = device_name(args.device)
    cases = select(args.preset, args.suites)
    load_before = os.getloadavg()
    plans = plan(cases, args.device)
    rate = flops_per_second(args.device, args.dtype)
    steps = estimate(plans, args.passes, args.budget, rate, args.device.type)
    if "distributed" in args.suites:
        # the ranks run on the CPU whatever --device says
        cpu_rate = rate if args.device.type == "cpu" else flops_per_second(torch.device("cpu"), torch.float32)
        steps += distributed.estimate(args, cpu_rate)
    cores = os.cpu_count() or 1
    print(f"stfast {stfast.__version__} | torch {torch.__version__} | {name} | {args.dtype} | "
          f"torch threads: {args.threads} of {cores} cores | load average {load_before[0]:.2f} | preset {args.preset} | "
          f"{len(cases)} cases | passes {', '.join(args.passes)}", file=sys.stderr)
    print(f"{len(steps)} rows; expected to take about {clock(sum(steps))} (SDPA runs at "
          f"{rate / 1e9:.0f} GFLOP/s here now; the bar corrects the estimate as rows finish)"
          + ("" if args.full or args.device.type == "cuda" else "; --full for the full sweep"),
          file=sys.stderr)
    warning = report.load_warning(load_before[0], None, cores, args.threads)
    if warning:
        print(warning, file=sys.stderr)
    progress = Progress(steps)
    rows = sweep(plans, args.passes, args.dtype, args.device, args.budget, progress)
    if "distributed" in args.suites:
        rows += _distributed_rows(args, progress)
    progress.close()
    elapsed = time.perf_counter() - progress.start
    add_speedups(rows)
    during = statistics.median(progress.loads) if progress.loads else None
    meta = dict(device=name, torch=torch.__version__, stfast=stfast.__version__,
                dtype=str(args.dtype).replace("torch.", ""), preset=args.preset, passes=list(args.passes),
                suites=list(args.suites), threads=args.threads, cpu_count=cores, commit=_commit(),
                when=datetime.datetime.now().isoformat(timespec="seconds"),
                command="python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
                backends=stfast.backends.available(), triton_interpret=os.environ.get("TRITON_INTERPRET"),
                load_average=[round(x, 2) for x in load_before + os.getloadavg()],
                load_during=round(during, 2) if during is not None else None,
                estimated_s=round(sum(steps), 3), elapsed_s=round(elapsed, 3))
    meta["load_warning"] = report.load_warning(load_before[0], during, cores, args.threads)
    comparison = None
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        comparison = report.compare(rows, old["rows"], args.threshold)
    print(report.text_table(rows))
    print()
    print(report.targets_markdown(report.targets(rows)))
    if comparison is not None:
        print()
        print(report.compare_text(comparison))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    Path(f"{stem}.json").write_text(json.dumps(
        dict(meta=meta, rows=rows, targets=report.targets(rows), comparison=comparison), indent=1) + "\n")
    Path(f"{stem}.md").write_text(report.markdown(meta, rows, comparison))
    why_not = report.plot(rows, Path(f"{stem}.png"), meta)
    written = [f"{stem}.json", f"{stem}.md"] + ([] if why_not else [f"{stem}.png"])
    print(f"\n{report.conditions(meta)}")
    if meta["load_warning"]:
        print(meta["load_warning"])
    print(f"wrote {', '.join(written)}" + (f" ({why_not})" if why_not else ""))
    if args.update_dispatch:
        report.update_dispatch(rows, name)
        print(f"updated {report.DISPATCH_FILE} for {name!r}: {report.dispatch_order(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
