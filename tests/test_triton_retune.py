"""Autotuning and JIT specialisation stay bounded as sequence lengths change.

A KV-cache decode loop (``causal="bottom_right"``, Lq = 1, Lk growing by one) and
variable-length training (Lq = Lk = 1000..1040) must not re-tune or recompile per
length.  Counted without a GPU: a subprocess imports the real GPU launchers (no
``TRITON_INTERPRET``), replaces benchmarking and launching with recorders, and counts
Triton's own autotune cache entries and the distinct specialisations the JIT's
binder computes for sm_90.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent

SCRIPT = r"""
import json, sys
import triton_aot  # drops TRITON_INTERPRET before triton is imported
import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from stfast.lowering import lower
from stfast.triton import launch

specs = {}

def record(fn, args, kwargs):
    signature, constexprs, attrs, options = triton_aot.specialize(fn, args, kwargs, 90)
    key = repr((sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                sorted(options.__dict__.items())))
    specs.setdefault(fn.__name__, set()).add(key)

def bench(self, *args, config, **kwargs):
    kwargs.pop("grid", None); kwargs.pop("warmup", None)
    record(self.fn, args, {**kwargs, **config.all_kwargs()})
    return [1.0, 1.0, 1.0]

def run(self, *args, grid, warmup, **kwargs):
    record(self, args, kwargs)

Autotuner._bench = bench
JITFunction.run = run
H100 = launch.resources.Target(90, 232_448)
launch.device_target = lambda device: H100

for length in range(1000, 1041):
    q = torch.randn(1, 8, 1, 64, dtype=torch.bfloat16)
    kv = torch.randn(1, 8, length, 64, dtype=torch.bfloat16)
    p = lower("dense", q, kv, kv, scale=0.125, causal="bottom_right")
    out, out5 = p.new_output()
    launch.forward(p, out5, p.new_lse())
decode = {"tunings": len(launch._fwd.cache), "compiles": len(specs["_fwd_kernel"])}
launch._fwd.cache.clear(); specs.clear()
for length in range(1000, 1041):
    x = torch.randn(1, 8, length, 64, dtype=torch.bfloat16)
    p = lower("dense", x, x, x, scale=0.125, causal="top_left")
    out, out5 = p.new_output()
    lse5 = p.new_lse()
    launch.forward(p, out5, lse5)
    (_, dq5), (_, dk5), (_, dv5) = p.new_grads(x, x, x)
    launch.backward(p, out5, torch.randn_like(out5), lse5, dq5, dk5, dv5)
train = {"tunings": {n: len(t.cache) for n, t in (("fwd", launch._fwd), ("dq", launch._dq), ("dkdv", launch._dkdv))},
         "compiles": {n: len(s) for n, s in specs.items()},
         "configs": {n: len(launch.selectable(n, torch.bfloat16, 64, 64, 0, H100, launch.GPU_CONFIGS[n]))
                     for n in ("fwd", "dq", "dkdv")}}
print(json.dumps({"decode": decode, "train": train}))
"""


@pytest.mark.build
def test_lengths_1000_to_1040_tune_and_compile_a_bounded_number_of_times():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(HERE.parent), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    decode, train = counts["decode"], counts["train"]
    # 41 lengths fall into two power-of-two buckets (1024, 2048): at most two tunings.
    assert decode["tunings"] <= 2, counts
    # The decode forward compiles each candidate config once, whatever Lk is.
    fwd_configs = train["configs"]["fwd"]
    assert decode["compiles"] <= fwd_configs, counts
    for kernel in ("fwd", "dq", "dkdv"):
        assert train["tunings"][kernel] <= 2, counts
        # One compile per candidate config, whatever the length.
        name = {"fwd": "_fwd_kernel", "dq": "_bwd_dq_kernel", "dkdv": "_bwd_dkdv_kernel"}[kernel]
        assert train["compiles"][name] <= train["configs"][kernel], counts
    assert train["compiles"]["_bwd_preprocess"] == 1, counts
