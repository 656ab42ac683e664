"""The sweep: every case x implementation x pass becomes one row (a dict).

A row's ``status`` is ``ok`` (timed), ``skipped`` (not installed or not supported
here, with the reason), ``error`` (the call raised) or ``wrong`` (its result
disagreed with the reference: reported with the error size, never timed).
"""

from __future__ import annotations

import math
import time

import torch

from .competitors import Impl, competitors
from .measure import TOLERANCE, Reference, make_step, median_ms, peak_bytes, sync
from .shapes import Case, Inputs

# Rough costs for the duration estimate (measured on a 2-core CPU): a torch.compile of
# flex_attention, and the float64 oracle's slowdown against a fused float32 call.
COMPILE_S = 3.0
ORACLE_SLOWDOWN = 6.0
CALL_OVERHEAD_S = 2e-4

# Dense bfloat16/float16 tensor-core peak (TFLOP/s) per device, from the vendors' specs.
DEVICE_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "4090": {"bf16": 165.0, "fp32": 82.6},
}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    name = device_name(device)
    key = "fp32" if dtype == torch.float32 else "bf16"
    for fragment, peaks in DEVICE_PEAK_TFLOPS.items():
        if fragment in name:
            return peaks[key]
    return None


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:240]


def blank_row(**fields) -> dict:
    """A row with every key the reports read (rows from bench/distributed.py too)."""
    row = {"suite": None, "case": None, "problem_class": None, "shape": "", "density": None,
           "dtype": None, "device": None, "pass": None, "impl": None, "family": None, "backend": None,
           "status": "ok", "reason": None, "ms": None, "reps": None, "tflops": None, "frac_peak": None,
           "peak_mb": None, "speedup": None, "compile_s": None, "max_err": None, "reference": None}
    row.update(fields)
    return row


def _row(case: Case, impl: Impl, pass_: str, dtype, device, **fields) -> dict:
    return blank_row(suite=case.suite, case=case.name, problem_class=case.pclass, shape=case.describe(),
                     density=case.density, dtype=str(dtype).replace("torch.", ""),
                     device=device_name(device), impl=impl.name, family=impl.family,
                     backend=impl.backend, **{"pass": pass_, **fields})


def _measure(case, impl, pass_, inputs, ref, dtype, device, budget_s) -> dict:
    step, checked = make_step(impl.fn, inputs, pass_, ref.dout)
    start = time.perf_counter()
    out, grads = checked()
    sync(device)
    first_s = time.perf_counter() - start
    err = ref.error(out, grads)
    del out, grads
    common = dict(max_err=err, reference=ref.source)
    if not math.isfinite(err) or err > TOLERANCE[dtype]:
        return _row(case, impl, pass_, dtype, device, status="wrong", **common,
                    reason=f"max error {err:.3g} relative to the reference exceeds {TOLERANCE[dtype]:g}")
    ms, reps = median_ms(step, device, budget_s=budget_s, warmed=True)
    peak = peak_bytes(step, device) + impl.held_bytes
    tflops = case.flops(pass_) / (ms * 1e-3) / 1e12
    top = device_peak(device, dtype)
    return _row(case, impl, pass_, dtype, device, ms=ms, reps=reps, tflops=tflops,
                frac_peak=tflops / top if top else None, peak_mb=peak / 2**20,
                compile_s=max(0.0, first_s - ms * 1e-3) if impl.compiled else None, **common)


def run_case(case: Case, impls: list[Impl], passes, dtype, device, budget_s, progress) -> list[dict]:
    rows = []
    inputs = ref = None
    for pass_ in passes:
        for impl in impls:
            progress.step(f"{case.id} {impl.name} {pass_}")
            if impl.fn is None or (pass_ != "fwd" and impl.no_backward):
                rows.append(_row(case, impl, pass_, dtype, device, status="skipped",
                                 reason=impl.reason or impl.no_backward))
                continue
            try:
                if inputs is None:
                    inputs = Inputs(case, dtype, device)
                    ref = Reference(case, inputs, need_grads=any(p != "fwd" for p in passes))
                rows.append(_measure(case, impl, pass_, inputs, ref, dtype, device, budget_s))
            except Exception as exc:  # an unsupported or failing call is a result, not a crash
                rows.append(_row(case, impl, pass_, dtype, device, status="error", reason=_short(exc)))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def add_speedups(rows: list[dict]) -> None:
    """``speedup`` = best competitor's time / this row's time, per (case, pass)."""
    best: dict = {}
    for r in rows:
        if r["status"] == "ok" and r["family"] not in ("stfast", "distributed") and r["ms"]:
            key = (r["suite"], r["case"], r["pass"])
            best[key] = min(best.get(key, math.inf), r["ms"])
    for r in rows:
        key = (r["suite"], r["case"], r["pass"])
        if r["status"] == "ok" and r.get("ms") and key in best:
            r["speedup"] = best[key] / r["ms"]


Plan = list[tuple[Case, list[Impl], str | None]]


def plan(cases: list[Case], device) -> Plan:
    """``(case, implementations, why the case cannot be set up or None)`` per case."""
    plans = []
    for case in cases:
        try:
            plans.append((case, competitors(case, device), None))
        except Exception as exc:  # e.g. a layout builder missing or refusing its arguments
            plans.append((case, [], _short(exc)))
    return plans


def _work_factor(case: Case, impl: Impl) -> float:
    """Executed FLOPs over the case's useful FLOPs, roughly: what an estimate needs to
    tell a dense masked or unfused call from a fused one."""
    s = case.shape
    length = (s["N"] if case.pclass == "space" else s["T"]) if case.spatiotemporal else s["L"]
    # Short sequences (the time axis) and narrow heads leave the vector units idle: about
    # 12x at L=8 and 5x at D=8 on a 2-core CPU.
    factor = 128 / min(length, 128) * 32 / min(s["D"], 32)
    if impl.name.startswith("sdpa+mask"):
        factor /= case.density or 1.0  # computes every block, masked ones included
    if impl.name.endswith("[math]"):
        factor *= 2.5  # unfused: materialises the scores
    return factor


def step_seconds(case: Case, impl: Impl, pass_: str, budget_s: float, flops_per_s: float,
                 device_type: str = "cpu") -> float:
    """Expected seconds of one row: the checked call (which is also the warm-up), the
    timed calls (CPU: at least 3, at most 50, else as many as fit in the budget; CUDA:
    do_bench's warm-up and the whole budget) and the profiled call, plus a compile for
    compiled implementations. A rough figure, for the time-left estimate."""
    if impl.fn is None or (pass_ != "fwd" and impl.no_backward):
        return 0.0
    call = case.flops(pass_) * _work_factor(case, impl) / flops_per_s + CALL_OVERHEAD_S
    compile_s = COMPILE_S if impl.compiled else 0.0
    if device_type == "cuda":
        return max(budget_s, 0.1) + 0.025 + 2 * call + compile_s
    reps = min(50, max(3, budget_s / call))
    return (reps + 2) * call + compile_s


def reference_seconds(case: Case, passes, flops_per_s: float) -> float:
    """Expected seconds of a case's inputs and reference: the float64 oracle computes
    every score, masked ones too, several times slower than a fused float32 call."""
    s = case.shape
    length = (s["N"] if case.pclass == "space" else s["T"]) if case.spatiotemporal else s["L"]
    seqs = s["B"] * s["H"] * ((s["T"] if case.pclass == "space" else s["N"]) if case.spatiotemporal else 1)
    dense = 4.0 * seqs * length * length * s["D"] * (3.5 if any(p != "fwd" for p in passes) else 1.0)
    return ORACLE_SLOWDOWN * dense / flops_per_s


def estimate(plans: Plan, passes, budget_s: float, flops_per_s: float, device_type: str = "cpu") -> list[float]:
    """Expected seconds of every step of :func:`sweep`, in its order."""
    steps = []
    for case, impls, failure in plans:
        if failure is not None:
            steps += [0.0] * len(passes)
            continue
        first = len(steps)
        steps += [step_seconds(case, impl, pass_, budget_s, flops_per_s, device_type)
                  for pass_ in passes for impl in impls]
        runs = [i for i in range(first, len(steps)) if steps[i] > 0]
        if runs:
            steps[runs[0]] += reference_seconds(case, passes, flops_per_s)
    return steps


def sweep(plans: Plan, passes, dtype, device, budget_s: float, progress) -> list[dict]:
    rows = []
    for case, impls, failure in plans:
        if failure is not None:
            for pass_ in passes:
                progress.step(f"{case.id} {pass_}")
                rows.append(_row(case, Impl("(all)", "-"), pass_, dtype, device, status="error",
                                 reason=f"case setup failed: {failure}"))
            continue
        rows += run_case(case, impls, passes, dtype, device, budget_s, progress)
        impls.clear()  # drops dense masks and compiled closures before the next case
    return rows
