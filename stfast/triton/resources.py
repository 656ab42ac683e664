"""What a kernel configuration needs from a streaming multiprocessor, before it runs.

The launcher prunes autotune configurations with this and refuses a problem (so
``auto`` falls back) when nothing fits, instead of letting Triton raise
``OutOfResources`` on the first call or tune configurations that spill.

Two sources, best first:

* Measured: registers, spill bytes and shared memory of every configuration compiled
  for sm_80 and sm_90 with the JIT's real specialisation (``_measured.py``, written by
  ``python tests/triton_aot.py --write-table``; the AOT test fails when the table no
  longer matches the compiler).  Keyed by (arch, kernel, element mask, dtype, padded
  head dim, tile).  A device of another capability uses the nearest measured arch
  (sm_86/89 -> sm_80, sm_100+ -> sm_90) against its own shared-memory limit.
* Estimated, for what was never compiled: the tiles Triton stages through shared
  memory (one buffer per pipeline stage for the tiles loaded in the loop, the tiles
  loaded once, the score tile's layout conversion, the element mask per stage) and the
  values a thread keeps live, against a per-kernel budget.  Deliberately pessimistic.

Sizes are in bytes (shared memory) and 32-bit registers per thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._measured import MEASURED

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute
# capability, for when the device properties do not report it.
SMEM_OPTIN = {(8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376,
              (9, 0): 232_448, (10, 0): 232_448, (12, 0): 101_376}
_DEFAULT_SMEM = 101_376

KERNELS = ("fwd", "dq", "dkdv", "packed_fwd", "packed_bwd")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Live 32-bit values per thread above which the estimate calls a configuration spilling
# (255 registers, less addresses, indices and softmax state).
REGISTER_BUDGET = {"fwd": 96, "dq": 96, "dkdv": 64, "packed_fwd": 96, "packed_bwd": 64}


@dataclass(frozen=True)
class Tile:
    """One launch configuration of a kernel: tile sizes, warps, pipeline stages."""

    block_m: int
    block_n: int
    warps: int
    stages: int


@dataclass(frozen=True)
class Target:
    """What the pruner needs to know of a device: its measured-table arch and its
    opt-in shared memory per block."""

    arch: int
    smem_limit: int


@dataclass(frozen=True)
class Need:
    smem: int
    registers: int
    spills: int | None = None  # measured spill bytes; None for an estimate
    measured: bool = False

    def fits(self, smem_limit: int, kernel: str) -> bool:
        if self.smem > smem_limit:
            return False
        if self.measured:
            return self.spills == 0
        return self.registers <= REGISTER_BUDGET[kernel]


def estimate(kernel: str, elem: int, d_pad: int, dv_pad: int, t: Tile, masked: bool = False) -> Need:
    """The pessimistic model of a configuration that was never compiled."""
    bm, bn, threads = t.block_m, t.block_n, 32 * t.warps
    stages = max(1, t.stages)
    words = elem / 4  # registers per operand element
    scores = bm * bn * 4 + (stages * bm * bn if masked else 0)  # layout conversion, mask tiles
    if kernel == "fwd":
        smem = bm * d_pad * elem + stages * bn * (d_pad + dv_pad) * elem
        regs = (bm * dv_pad + bm * d_pad * words + 2 * bm * bn) / threads
    elif kernel == "dq":
        smem = bm * (d_pad + dv_pad) * elem + stages * bn * (d_pad + dv_pad) * elem
        regs = (bm * d_pad + bm * (d_pad + dv_pad) * words + 3 * bm * bn) / threads
    elif kernel == "dkdv":
        smem = bn * (d_pad + dv_pad) * elem + stages * bm * ((d_pad + dv_pad) * elem + 8)
        regs = (bn * (d_pad + dv_pad) + bn * (d_pad + dv_pad) * words + 3 * bm * bn) / threads
    elif kernel == "packed_fwd":
        smem = (bm * d_pad + bn * (d_pad + dv_pad)) * elem
        regs = (bm * dv_pad + (bm * d_pad + bn * (d_pad + dv_pad)) * words + 2 * bm * bn) / threads
    elif kernel == "packed_bwd":
        smem = (2 * bm * (d_pad + dv_pad) + 2 * bn * (d_pad + dv_pad)) * elem + bm * bn * elem
        regs = (bm * d_pad + bn * (d_pad + dv_pad)
                + (bm * (d_pad + 2 * dv_pad) + bn * (d_pad + dv_pad)) * words + 3 * bm * bn) / threads
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    regs += bm * bn / threads * (4 if masked else 0)  # 64-bit mask addresses and bytes
    return Need(int(smem + scores), int(regs + 0.5))


def need(kernel: str, dtype: torch.dtype, d_pad: int, dv_pad: int, t: Tile, masked: bool,
         arch: int) -> Need:
    """Measured need of ``kernel`` with tile ``t`` on ``arch`` (80 or 90), else the estimate.

    A head-dim pair (d_pad, dv_pad) is looked up as its larger bucket: needs grow with
    the head dim.  float16 and bfloat16 stand in for each other (same tiles, same MMA
    shapes) when only one was compiled."""
    name = DTYPE_NAMES[dtype]
    d = max(d_pad, dv_pad)
    tile = (t.block_m, t.block_n, t.warps, t.stages)
    alias = {"bf16": "fp16", "fp16": "bf16"}.get(name, name)
    for dname in (name, alias):
        hit = MEASURED.get((arch, kernel, masked, dname, d, *tile))
        if hit is not None:
            regs, spills, smem = hit
            return Need(smem, regs, spills, measured=True)
    elem = torch.empty((), dtype=dtype).element_size()
    return estimate(kernel, elem, d, d, t, masked)


def target(device: torch.device) -> Target:
    """The pruning target of a CUDA ``device``."""
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    limit = limit or SMEM_OPTIN.get((props.major, props.minor), _DEFAULT_SMEM)
    return Target(90 if props.major >= 9 else 80, limit)


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
