"""What a kernel configuration needs from a streaming multiprocessor, before it is compiled.

The launcher prunes autotune configurations with this model and refuses a problem
(so ``auto`` falls back) when nothing fits, instead of letting Triton raise
``OutOfResources`` on the first call or compile configurations that spill.

* Shared memory: the tiles Triton stages through shared memory, one buffer per
  pipeline stage for the tiles loaded inside the loop, plus the tiles loaded once.
* Registers: the fp32 accumulators and the score tiles a thread keeps live, plus the
  operand tiles held in registers across the loop, per thread.  A configuration
  whose estimate exceeds the kernel's budget spills; the budgets were read off
  ptxas for sm_80/sm_90 (``tests/triton_aot.py`` prints the table and fails when a
  configuration this model accepts spills or overflows shared memory).

Sizes are in bytes (shared memory) and 32-bit registers per thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute
# capability, for when the device properties do not report it.
SMEM_OPTIN = {(8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376,
              (9, 0): 232_448, (10, 0): 232_448, (12, 0): 101_376}
_DEFAULT_SMEM = 101_376

KERNELS = ("fwd", "dq", "dkdv", "packed_fwd", "packed_bwd")

# Live 32-bit values per thread above which ptxas spills (255 registers, less the
# addresses, indices and softmax state each kernel keeps).
REGISTER_BUDGET = {"fwd": 192, "dq": 160, "dkdv": 128, "packed_fwd": 192, "packed_bwd": 128}


@dataclass(frozen=True)
class Tile:
    """One launch configuration of a kernel: tile sizes, warps, pipeline stages."""

    block_m: int
    block_n: int
    warps: int
    stages: int


@dataclass(frozen=True)
class Need:
    smem: int
    registers: int


def need(kernel: str, elem: int, d_pad: int, dv_pad: int, t: Tile) -> Need:
    """Shared memory and live registers per thread of ``kernel`` with tile ``t`` for
    operands of ``elem`` bytes and padded head dims ``d_pad`` (q, k) / ``dv_pad`` (v)."""
    bm, bn, threads = t.block_m, t.block_n, 32 * t.warps
    stages = max(1, t.stages)
    words = elem / 4  # registers per operand element
    if kernel == "fwd":
        # q once; k and v per stage.  acc[BM, DV] fp32, scores and probabilities.
        smem = bm * d_pad * elem + stages * bn * (d_pad + dv_pad) * elem
        regs = (bm * dv_pad + bm * d_pad * words + 2 * bm * bn) / threads
    elif kernel == "dq":
        # q and dO once; k and v per stage.  dq[BM, D] fp32, scores, dp, ds.
        smem = bm * (d_pad + dv_pad) * elem + stages * bn * (d_pad + dv_pad) * elem
        regs = (bm * d_pad + bm * (d_pad + dv_pad) * words + 3 * bm * bn) / threads
    elif kernel == "dkdv":
        # k and v once; q, dO, lse and delta per stage.  dk, dv fp32, scores, dp, ds.
        smem = bn * (d_pad + dv_pad) * elem + stages * bm * ((d_pad + dv_pad) * elem + 8)
        regs = (bn * (d_pad + dv_pad) + bn * (d_pad + dv_pad) * words + 3 * bm * bn) / threads
    elif kernel == "packed_fwd":
        smem = (bm * d_pad + bn * (d_pad + dv_pad)) * elem
        regs = (bm * dv_pad + (bm * d_pad + bn * (d_pad + dv_pad)) * words + 2 * bm * bn) / threads
    elif kernel == "packed_bwd":
        # q, k, v, o, dO and the transposed operands of the four products.
        smem = (2 * bm * (d_pad + dv_pad) + 2 * bn * (d_pad + dv_pad)) * elem + bm * bn * elem
        regs = (bm * d_pad + bn * (d_pad + dv_pad)
                + (bm * (d_pad + 2 * dv_pad) + bn * (d_pad + dv_pad)) * words + 3 * bm * bn) / threads
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return Need(int(smem), int(regs + 0.5))


def fits(kernel: str, elem: int, d_pad: int, dv_pad: int, t: Tile, smem_limit: int) -> bool:
    """Within the device's shared memory and the kernel's register budget."""
    n = need(kernel, elem, d_pad, dv_pad, t)
    return n.smem <= smem_limit and n.registers <= REGISTER_BUDGET[kernel]


def launchable(kernel: str, elem: int, d_pad: int, dv_pad: int, t: Tile, smem_limit: int) -> bool:
    """Within shared memory: it launches, though it may spill."""
    return need(kernel, elem, d_pad, dv_pad, t).smem <= smem_limit


def smem_limit(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device`` (bytes)."""
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    return limit or SMEM_OPTIN.get((props.major, props.minor), _DEFAULT_SMEM)


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
