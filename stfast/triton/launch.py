"""Launchers: turn a lowered :class:`~stfast.lowering.Problem` into kernel arguments.

Nothing here copies q/k/v: every tensor is passed with the strides of its 5-D view.
Short sequences (``max(Lq, Lk) <= PACK_MAX_LEN``, no block layout, no GQA) go to the
packed kernels; everything else to the tiled ones, whose tile sizes are autotuned
on a GPU (one small config under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch
import triton

from ..lowering import Problem
from . import kernels

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Sequences this short are packed several per tile (block-diagonal mask) instead of
# each being padded to a full tile.
PACK_MAX_LEN = 64
PACK_ROWS = 64


def _config(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


if INTERPRET:
    _FWD_CONFIGS = _DKDV_CONFIGS = _DQ_CONFIGS = [_config(16, 16, 1, 1)]
else:
    # Hopper and Ampere favour 128-row query tiles with 3-4 pipeline stages; the small
    # tiles remain for block-sparse layouts of block 16/32 and for head dims near 256.
    _SMALL = [_config(32, 32, 4, 2), _config(16, 16, 2, 2)]
    _FWD_CONFIGS = [_config(128, 64, 4, 3), _config(128, 64, 8, 3), _config(128, 128, 8, 3),
                    _config(128, 64, 8, 4), _config(64, 64, 4, 3), _config(64, 32, 4, 3)] + _SMALL
    _DKDV_CONFIGS = [_config(64, 128, 8, 2), _config(32, 128, 4, 2), _config(64, 64, 4, 3),
                     _config(32, 64, 4, 2), _config(64, 64, 8, 2)] + _SMALL
    _DQ_CONFIGS = [_config(128, 64, 8, 2), _config(128, 32, 4, 2), _config(64, 64, 4, 3),
                   _config(64, 32, 4, 2), _config(64, 64, 8, 2)] + _SMALL


def _prune(configs, named_args, **kwargs):
    """Tiles of a block-sparse problem must divide the layout block."""
    lb = kwargs.get("LB", named_args.get("LB", 0))
    if not lb:
        return configs
    kept = [c for c in configs if lb % c.kwargs["BLOCK_M"] == 0 and lb % c.kwargs["BLOCK_N"] == 0]
    return kept or [_config(16, 16, 2, 1)]


_KEY = ["Lq", "Lk", "D_PAD", "DV_PAD", "LB", "CAUSAL", "HAS_MASK", "MASK_BOOL", "DOT_PREC"]


def _autotune(configs, fn):
    return triton.autotune(configs=configs, key=_KEY, prune_configs_by={"early_config_prune": _prune})(fn)


_fwd = _autotune(_FWD_CONFIGS, kernels._fwd_kernel)
_dkdv = _autotune(_DKDV_CONFIGS, kernels._bwd_dkdv_kernel)
_dq = _autotune(_DQ_CONFIGS, kernels._bwd_dq_kernel)


def _pad(d: int) -> int:
    # tl.dot needs at least 16 along the reduction; masked loads fill the padding with 0.
    return max(16, triton.next_power_of_2(d))


def _strides5(t: torch.Tensor) -> list[int]:
    """Batch strides and the sequence stride of a 5-D view (last dim is contiguous)."""
    return list(t.stride()[:4])


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _causal_offset(p: Problem) -> int:
    return p.lk - p.lq if p.causal == "bottom_right" else 0


def use_packed(p: Problem) -> bool:
    return p.layout is None and p.groups == 1 and max(p.lq, p.lk) <= PACK_MAX_LEN


def reduces_kv_heads(p: Problem, dk5: torch.Tensor, dv5: torch.Tensor) -> bool:
    """Whether dk/dv are one buffer shared by the B2 query heads (GQA), so the backward
    pass must sum over B2.  A k or v that the caller broadcast over heads also has
    stride 0 along B2, but its gradient buffers are full: each head is written alone."""
    return p.batch[2] > 1 and all(t.stride(2) == 0 for t in (p.k, p.v, dk5, dv5))


def _packing(p: Problem) -> tuple[int, int, int]:
    """(sequences per tile, BLOCK_M, BLOCK_N) of a packed launch."""
    per_tile = max(1, PACK_ROWS // max(p.lq, p.lk))
    return per_tile, max(16, triton.next_power_of_2(per_tile * p.lq)), \
        max(16, triton.next_power_of_2(per_tile * p.lk))


def _packed_warps(c) -> int:
    # A packed program keeps whole q/k/v tiles (and in the backward pass all three
    # gradients) in registers: wide heads need more warps to avoid spilling.
    if INTERPRET:
        return 1
    return 4 if max(c["d_pad"], c["dv_pad"]) <= 64 else 8


def _mask_args(p: Problem):
    """(tensor, strides, has_mask, is_bool); bool masks are read as bytes."""
    if p.mask is None:
        return p.q, [0, 0, 0, 0, 0], False, False
    m = p.mask
    if m.dtype == torch.bool:
        return m.view(torch.uint8), list(m.stride()), True, True
    return m, list(m.stride()), True, False


def _layout_args(p: Problem):
    """Schedule tables (or placeholders) and their sizes."""
    lay = p.layout
    if lay is None:
        dummy = p.q
        return dict(tables=(dummy,) * 7, head_strides=(0, 0, 0), mq=0, mk=0, lb=0)
    pm = lay.partial_masks
    if pm.shape[0] == 0:
        pm = torch.ones(1, lay.block, lay.block, dtype=torch.bool, device=p.device)
    tables = (pm.contiguous().view(torch.uint8), lay.kv_counts.contiguous(), lay.kv_indices.contiguous(),
              lay.block_type.contiguous(), lay.partial_index.contiguous(), lay.q_counts.contiguous(),
              lay.q_indices.contiguous())
    mq, mk = lay.block_type.shape[-2:]
    return dict(tables=tables, head_strides=tuple(lay.head_strides), mq=mq, mk=mk, lb=lay.block)


def _common(p: Problem):
    mask, mask_strides, has_mask, mask_bool = _mask_args(p)
    return dict(mask=mask, mask_strides=mask_strides, has_mask=has_mask, mask_bool=mask_bool,
                qk_scale=p.scale * kernels.LOG2E.value, causal_off=_causal_offset(p),
                d_pad=_pad(p.head_dim), dv_pad=_pad(p.v_dim), prec=_dot_precision(p.dtype),
                causal=p.causal is not None)


def forward(p: Problem, out5: torch.Tensor, lse5: torch.Tensor) -> None:
    c = _common(p)
    b0, b1, b2 = p.batch
    if use_packed(p):
        per_tile, bm, bn = _packing(p)
        n = b0 * b1 * b2
        kernels._packed_fwd_kernel[(triton.cdiv(n, per_tile),)](
            p.q, p.k, p.v, out5, lse5, c["mask"],
            *_strides5(p.q), *_strides5(p.k), *_strides5(p.v), *_strides5(out5), *lse5.stride(),
            *c["mask_strides"], n, b1, b2, per_tile, p.lq, p.lk, p.head_dim, p.v_dim,
            c["qk_scale"], c["causal_off"],
            D_PAD=c["d_pad"], DV_PAD=c["dv_pad"], CAUSAL=c["causal"], HAS_MASK=c["has_mask"],
            MASK_BOOL=c["mask_bool"], DOT_PREC=c["prec"], BLOCK_M=bm, BLOCK_N=bn,
            num_warps=_packed_warps(c))
        return
    lay = _layout_args(p)
    pm, kvc, kvi, bt, pi, _, _ = lay["tables"]
    grid = lambda meta: (b0 * b1 * b2, triton.cdiv(p.lq, meta["BLOCK_M"]))  # noqa: E731
    _fwd[grid](
        p.q, p.k, p.v, out5, lse5, c["mask"], pm, kvc, kvi, bt, pi,
        *_strides5(p.q), *_strides5(p.k), *_strides5(p.v), *_strides5(out5), *lse5.stride(),
        *c["mask_strides"], *lay["head_strides"], b1, b2, p.lq, p.lk, p.head_dim, p.v_dim,
        lay["mq"], lay["mk"], c["qk_scale"], c["causal_off"],
        D_PAD=c["d_pad"], DV_PAD=c["dv_pad"], LB=lay["lb"], CAUSAL=c["causal"],
        HAS_MASK=c["has_mask"], MASK_BOOL=c["mask_bool"], DOT_PREC=c["prec"])


def backward(p: Problem, out5, dout5, lse5, dq5, dk5, dv5) -> None:
    c = _common(p)
    b0, b1, b2 = p.batch
    if use_packed(p):
        per_tile, bm, bn = _packing(p)
        n = b0 * b1 * b2
        kernels._packed_bwd_kernel[(triton.cdiv(n, per_tile),)](
            p.q, p.k, p.v, out5, dout5, lse5, dq5, dk5, dv5, c["mask"],
            *_strides5(p.q), *_strides5(p.k), *_strides5(p.v), *_strides5(out5), *_strides5(dout5),
            *lse5.stride(), *c["mask_strides"], *_strides5(dq5), *_strides5(dk5), *_strides5(dv5),
            n, b1, b2, per_tile, p.lq, p.lk, p.head_dim, p.v_dim, p.scale, c["qk_scale"],
            c["causal_off"],
            D_PAD=c["d_pad"], DV_PAD=c["dv_pad"], CAUSAL=c["causal"], HAS_MASK=c["has_mask"],
            MASK_BOOL=c["mask_bool"], DOT_PREC=c["prec"], BLOCK_M=bm, BLOCK_N=bn,
            num_warps=_packed_warps(c))
        return
    delta = torch.empty(b0 * b1 * b2, p.lq, dtype=torch.float32, device=p.device)
    pre_block = 16 if INTERPRET else 64
    kernels._bwd_preprocess[(b0 * b1 * b2, triton.cdiv(p.lq, pre_block))](
        out5, dout5, delta, *_strides5(out5), *_strides5(dout5), b1, b2, p.lq, p.v_dim,
        DV_PAD=c["dv_pad"], BLOCK_M=pre_block)
    lay = _layout_args(p)
    pm, kvc, kvi, bt, pi, qc, qi = lay["tables"]
    shared = reduces_kv_heads(p, dk5, dv5)
    groups = b2 if shared else 1
    common = (*_strides5(p.q), *_strides5(p.k), *_strides5(p.v), *_strides5(dout5), *lse5.stride(),
              *c["mask_strides"])
    meta = dict(D_PAD=c["d_pad"], DV_PAD=c["dv_pad"], LB=lay["lb"], CAUSAL=c["causal"],
                HAS_MASK=c["has_mask"], MASK_BOOL=c["mask_bool"], DOT_PREC=c["prec"])
    kv_batch = b0 * b1 * (1 if shared else b2)
    _dkdv[lambda m: (kv_batch, triton.cdiv(p.lk, m["BLOCK_N"]))](
        p.q, p.k, p.v, dout5, lse5, delta, dk5, dv5, c["mask"], pm, qc, qi, bt, pi,
        *common, *_strides5(dk5), *_strides5(dv5), *lay["head_strides"], b1, b2, groups,
        p.lq, p.lk, p.head_dim, p.v_dim, lay["mq"], lay["mk"], p.scale, c["qk_scale"],
        c["causal_off"], **meta)
    _dq[lambda m: (b0 * b1 * b2, triton.cdiv(p.lq, m["BLOCK_M"]))](
        p.q, p.k, p.v, dout5, lse5, delta, dq5, c["mask"], pm, kvc, kvi, bt, pi,
        *common, *_strides5(dq5), *lay["head_strides"], b1, b2, p.lq, p.lk, p.head_dim, p.v_dim,
        lay["mq"], lay["mk"], p.scale, c["qk_scale"], c["causal_off"], **meta)

