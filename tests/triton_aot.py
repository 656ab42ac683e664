"""Compile every Triton kernel launch of a representative problem matrix for real GPUs
(sm_80, sm_90) without a GPU: the launchers run on CPU tensors with the kernels'
``run`` replaced by a recorder, and each recorded launch is compiled ahead of time
with Triton's own toolchain (ptxas ships in the wheel).

The interpreter (``TRITON_INTERPRET=1``) checks the kernels' arithmetic; this checks
what only the GPU compiler enforces (constexpr globals, tensor shapes of tl.dot,
types), and reports the shared memory each tile configuration needs.

Run as a script (``tests/test_triton.py`` does, in a subprocess without
``TRITON_INTERPRET``); prints one line per compiled kernel and exits non-zero on the
first compile error.
"""

import os
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import stfast  # noqa: E402
from stfast.lowering import lower  # noqa: E402
from stfast.triton import kernels, launch  # noqa: E402

# Largest shared memory per block a kernel may use (bytes): A100 (sm_80) and H100/H200.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
          torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1", torch.int64: "i64"}

launches = []


def _record_autotuned(self, *args, **kwargs):
    launches.append((self.fn, args, kwargs, self.configs))


def _record_plain(self, *args, grid, warmup, **kwargs):
    launches.append((self, args, kwargs, None))


def _problems():
    """(name, kind, q, k, v, lowering keywords) covering every kernel and specialization."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    q = torch.randn(1, 4, 300, 64, dtype=bf16)
    yield "dense causal bf16 D64", "dense", q, q, q, dict(causal="top_left")
    q, kv = torch.randn(1, 4, 200, 72, dtype=fp16), torch.randn(1, 2, 150, 72, dtype=fp16)
    mask = (torch.rand(1, 1, 200, 150) > 0.5).expand(1, 4, 200, 150)
    yield "gqa bool-mask bottom-right fp16 D72", "dense", q, kv, kv, dict(causal="bottom_right", mask=mask)
    q = torch.randn(1, 2, 130, 38, dtype=fp32)
    yield "additive-mask fp32 D38", "dense", q, q, q, dict(mask=torch.randn(130, 130).expand(1, 2, 130, 130))
    q = torch.randn(1, 2, 256, 256, dtype=bf16)
    yield "dense causal bf16 D256", "dense", q, q, q, dict(causal="top_left")
    layout = stfast.layouts.local(512, window=100, block=64)
    q = torch.randn(1, 2, 512, 128, dtype=bf16)
    yield "block-sparse bf16 D128", "dense", q, q, q, dict(layout=layout.lowered("cpu", (0, 0, 0)))
    x = torch.randn(2, 16, 40, 4, 64, dtype=bf16)
    yield "packed time axis bf16 D64", "time", x, x, x, dict(causal="top_left")


def _signature(fn, args, kwargs, config):
    names = fn.arg_names
    sig, constexprs = {}, {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
        elif value is None:
            sig[name] = "constexpr"
            constexprs[(names.index(name),)] = None
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    extra = {k: v for k, v in kwargs.items() if k in names}
    if config is not None:
        extra.update(config.kwargs)
    for name, value in extra.items():
        sig[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    return sig, constexprs


def _compile(job):
    label, name, sig, constexprs, arch, warps, stages, _ = job
    kernel = triton.compile(ASTSource(fn=getattr(kernels, name), signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
    return label, arch, kernel.metadata.shared


def main() -> int:
    Autotuner.run = _record_autotuned
    JITFunction.run = _record_plain
    jobs = []
    for name, kind, q, k, v, kw in _problems():
        del launches[:]
        p = lower(kind, q, k, v, scale=q.shape[-1] ** -0.5, **kw)
        _, out5 = p.new_output()
        lse5 = p.new_lse()
        launch.forward(p, out5, lse5)
        (_, dq5), (_, dk5), (_, dv5) = p.new_grads(q, k, v)
        launch.backward(p, out5, torch.randn_like(out5), lse5, dq5, dk5, dv5)
        for fn, args, kwargs, configs in launches:
            if configs is None:
                picks = [(None, kwargs.get("num_warps", 4), kwargs.get("num_stages", 2), True)]
            else:
                # The first (largest) tile may exceed a device's shared memory (the
                # autotuner then skips it); the last (smallest) must always fit.
                kept = launch._prune(configs, dict(zip(fn.arg_names, args)), **kwargs)
                picks = [(c, c.num_warps, c.num_stages, c is kept[-1]) for c in (kept[0], kept[-1])]
            for config, warps, stages, must_fit in picks:
                sig, constexprs = _signature(fn, args, kwargs, config)
                tile = "" if config is None else f" {config.kwargs}"
                for arch in (80, 90):
                    jobs.append((f"{name}: {fn.__name__}{tile}", fn.__name__, sig, constexprs, arch, warps,
                                 stages, must_fit))
    too_big = []
    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for (label, arch, shared), job in zip(pool.map(_compile, jobs), jobs):
            over = shared > SMEM_LIMIT[arch]
            print(f"sm_{arch} {label}: {shared} B shared{' (over the limit)' if over else ''}")
            if over and job[-1]:
                too_big.append(f"sm_{arch} {label}")
    print(f"compiled {len(jobs)} kernels")
    if too_big:
        print("the smallest tile does not fit in shared memory:\n  " + "\n  ".join(too_big))
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
