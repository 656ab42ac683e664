"""Known kernel bugs, planted one at a time into a copy of csrc/ as text substitutions
(each ``old`` must occur exactly once), that the emulated oracle run must catch."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class Mutation(NamedTuple):
    name: str
    file: str
    subs: tuple[tuple[str, str], ...]


MUTATIONS = [
    Mutation("fwd: no barrier before the next K/V copy overwrites the tile just read", "fwd_kernel.cuh",
             (("        mma_16816<DTYPE>(acc_o[2 * d2 + 1], a, bf[2], bf[3]);\n      }\n    }\n    __syncthreads();\n",
               "        mma_16816<DTYPE>(acc_o[2 * d2 + 1], a, bf[2], bf[3]);\n      }\n    }\n"),)),
    Mutation("fwd/dq: cp.async wait count 2 leaves the current K/V tile in flight", "fwd_kernel.cuh",
             (("    cp_async_wait<1>();\n  } else {", "    cp_async_wait<2>();\n  } else {"),)),
    Mutation("fwd/dq: no barrier between the K/V wait and the reads of other threads' copies", "fwd_kernel.cuh",
             (("    cp_async_wait<0>();\n  }\n  __syncthreads();\n  return buf;", "    cp_async_wait<0>();\n  }\n  return buf;"),)),
    Mutation("dk/dv: cp.async wait count 2 leaves the current Q/dO tile in flight", "bwd_kernel.cuh",
             (("        load(it + 1, buf ^ 1);\n        cp_async_wait<1>();", "        load(it + 1, buf ^ 1);\n        cp_async_wait<2>();"),)),
    Mutation("dk/dv: prefetch into the buffer being read", "bwd_kernel.cuh",
             (("        load(it + 1, buf ^ 1);", "        load(it + 1, buf);"),)),
    Mutation("dk/dv: no barrier at the end of the query-tile loop", "bwd_kernel.cuh",
             (("          mma_16816<DTYPE>(acc_dk[2 * d2 + 1], ads, bq[2], bq[3]);\n        }\n      }\n      __syncthreads();\n",
               "          mma_16816<DTYPE>(acc_dk[2 * d2 + 1], ads, bq[2], bq[3]);\n        }\n      }\n"),)),
    Mutation("acc_to_a: A fragment registers 1 and 2 swapped", "mma.cuh",
             (("  a[1] = pack2<DTYPE>(acc[2 * j][2], acc[2 * j][3]);\n  a[2] = pack2<DTYPE>(acc[2 * j + 1][0], acc[2 * j + 1][1]);",
               "  a[2] = pack2<DTYPE>(acc[2 * j][2], acc[2 * j][3]);\n  a[1] = pack2<DTYPE>(acc[2 * j + 1][0], acc[2 * j + 1][1]);"),)),
    Mutation("fwd: B fragment registers of S = Q K^T swapped", "fwd_kernel.cuh",
             (("        mma_16816<DTYPE>(s[2 * n2], a, bf[0], bf[1]);", "        mma_16816<DTYPE>(s[2 * n2], a, bf[1], bf[0]);"),)),
    Mutation("key schedule: causal end one key short", "schedule.cuh",
             (("if (p.causal) end = min(end, q0 + BM + p.causal_offset);", "if (p.causal) end = min(end, q0 + BM + p.causal_offset - 1);"),)),
    Mutation("query schedule: first causal query tile rounded up", "schedule.cuh",
             (("first = max(0, k0 - p.causal_offset) / BM;", "first = (max(0, k0 - p.causal_offset) + BM - 1) / BM;"),)),
    Mutation("masker: causal diagonal off by one", "schedule.cuh",
             (("if (p.causal && col > row + p.causal_offset) return", "if (p.causal && col > row + p.causal_offset + 1) return"),)),
    Mutation("store_acc: row guard removed", "mma.cuh",
             (("    if (row >= rows_valid) continue;\n", ""),)),
    Mutation("load_tile: reads one row past the valid rows", "mma.cuh",
             (("const bool valid = r < rows_valid && c < cols_valid;", "const bool valid = r <= rows_valid && c < cols_valid;"),)),
    Mutation("load_tile: column guard removed (reads past D)", "mma.cuh",
             (("const bool valid = r < rows_valid && c < cols_valid;", "const bool valid = r < rows_valid;"),)),
    Mutation("delta: warp reduction skips the 16-lane step", "bwd_kernel.cuh",
             (("for (int off = 16; off > 0; off /= 2)", "for (int off = 8; off > 0; off /= 2)"),)),
    Mutation("dk/dv: sums only the first query head of a GQA group", "bwd_kernel.cuh",
             (("for (int g = 0; g < p.kv_group; ++g)", "for (int g = 0; g < 1; ++g)"),)),
    Mutation("launch: dynamic shared memory above 48 KiB without the opt-in", "launch.cuh",
             (("  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);\n"
               "  if (err != cudaSuccess) return err;\n", ""),)),
    Mutation("quad_max: reduces over lane pairs only", "mma.cuh",
             (("  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));", "  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));"),)),
]


def apply(mutation: Mutation, root: Path) -> None:
    """Plants ``mutation`` into the csrc copy at ``root``; each substitution must match once."""
    path = root / mutation.file
    text = path.read_text()
    for old, new in mutation.subs:
        count = text.count(old)
        if count != 1:
            raise AssertionError(f"{mutation.name}: {old!r} occurs {count} times in {mutation.file}, not once")
        text = text.replace(old, new)
    path.write_text(text)
