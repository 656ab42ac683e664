"""Launchers: turn a lowered :class:`~stfast.lowering.Problem` into kernel arguments.

Nothing here copies q/k/v: every tensor is passed with the strides of its 5-D view.
Short sequences (``max(Lq, Lk) <= PACK_MAX_LEN``, no block layout, no GQA) go to the
packed kernels when their whole tiles fit the device; everything else to the tiled
ones, whose tile sizes are autotuned on a GPU among the configurations the resource
model (:mod:`.resources`) accepts for the dtype, head dim and device (one small
config under ``TRITON_INTERPRET=1``).  Every launch runs on q's device.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from ..lowering import Problem
from . import kernels, resources

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Sequences this short are packed several per tile (block-diagonal mask) instead of
# each being padded to a full tile.
PACK_MAX_LEN = 64
PACK_ROWS = 64


def _config(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Hopper and Ampere favour 128-row query tiles with 3 pipeline stages; the small tiles
# remain for block-sparse layouts of block 16/32, element masks and head dims near 256.
# Configurations that spill at every head dim on sm_80/sm_90 (128x128 forward tiles,
# 8-warp dk/dv tiles) are not listed; the resource model prunes the rest per dtype,
# head dim, mask and device.
_SMALL = [_config(32, 32, 4, 2), _config(16, 16, 2, 2)]
GPU_CONFIGS = {
    "fwd": [_config(128, 64, 8, 3), _config(128, 64, 4, 3), _config(64, 64, 4, 3), _config(64, 32, 4, 3)]
    + _SMALL,
    # dk/dv keeps k, v and both fp32 gradients live across its loop: at head dims of 64
    # and up only narrow query tiles stay out of local memory.
    "dkdv": [_config(32, 128, 4, 2), _config(64, 64, 4, 3), _config(32, 64, 4, 2)] + _SMALL
    + [_config(16, 32, 4, 2), _config(16, 16, 4, 2)],
    "dq": [_config(128, 64, 8, 2), _config(128, 32, 4, 2), _config(64, 64, 4, 3), _config(64, 32, 4, 2)]
    + _SMALL,
}
_KERNEL_CONFIGS = {k: [_config(16, 16, 1, 1)] for k in GPU_CONFIGS} if INTERPRET else GPU_CONFIGS


def _tile(c) -> resources.Tile:
    return resources.Tile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


# bf16/fp16 problems with head dims up to this never run a spilling configuration:
# they are refused instead (auto takes SDPA).  Wider heads and TF32 take the least
# spilling configuration when none is spill-free.
SPILL_FREE_MAX_D = 128


def selectable(kernel: str, dtype: torch.dtype, d_pad: int, dv_pad: int, lb: int,
               target: resources.Target | None, configs=None, masked: bool = False) -> list:
    """The configs of ``kernel`` the autotuner may try on ``target``: tiles that divide
    the layout block, within shared memory and without spilling (an element mask or a
    layout's partial blocks cost registers per score).  When every one would spill,
    only the one that spills least, except for bf16/fp16 at head dims <=
    ``SPILL_FREE_MAX_D``; empty when nothing may run (the backend then refuses the
    problem).  ``target=None`` (the interpreter) keeps every config."""
    configs = [c for c in (_KERNEL_CONFIGS[kernel] if configs is None else configs)
               if not lb or (lb % c.kwargs["BLOCK_M"] == 0 and lb % c.kwargs["BLOCK_N"] == 0)]
    if target is None:
        return configs
    masked = masked or lb > 0
    needs = [(c, resources.need(kernel, dtype, d_pad, dv_pad, _tile(c), masked, target.arch)) for c in configs]
    kept = [c for c, n in needs if n.fits(target.smem_limit, kernel)]
    if kept or (dtype != torch.float32 and max(d_pad, dv_pad) <= SPILL_FREE_MAX_D):
        return kept
    launchable = [(c, n) for c, n in needs if n.smem <= target.smem_limit]
    if not launchable:
        return []
    return [min(launchable, key=lambda cn: (cn[1].spills or 0, cn[1].registers))[0]]


def device_target(device: torch.device) -> resources.Target | None:
    """The pruning target of ``device``; None under the interpreter."""
    if INTERPRET or device.type != "cuda":
        return None
    return resources.target(device)


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        kept = selectable(kernel, q.dtype, kwargs["D_PAD"], kwargs["DV_PAD"], kwargs["LB"],
                          device_target(q.device), configs, kwargs["HAS_MASK"])
        if not kept:  # resource_reasons refuses such problems before any launch
            raise RuntimeError(f"no {kernel} configuration fits on {q.device} for D_PAD={kwargs['D_PAD']}")
        return kept
    return prune


# The autotuner keys on bucketed lengths, so a decode loop or variable-length batches
# re-tune once per power of two instead of once per length; past the cap the best tile
# no longer moves.
_KEY = ["LQ_KEY", "LK_KEY", "D_PAD", "DV_PAD", "LB", "CAUSAL", "HAS_MASK", "MASK_BOOL", "DOT_PREC"]
KEY_CAP = 16384


def length_key(n: int) -> int:
    return min(triton.next_power_of_2(max(1, n)), KEY_CAP)


def _autotune(kernel, fn):
    return triton.autotune(configs=_KERNEL_CONFIGS[kernel], key=_KEY,
                           prune_configs_by={"early_config_prune": _pruner(kernel)})(fn)


_fwd = _autotune("fwd", kernels._fwd_kernel)
_dkdv = _autotune("dkdv", kernels._bwd_dkdv_kernel)
_dq = _autotune("dq", kernels._bwd_dq_kernel)


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


def _on_device(device: torch.device):
    """Triton launches on the current device and its current stream: make that q's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _packing(p: Problem) -> tuple[int, int, int]:
    """(sequences per tile, BLOCK_M, BLOCK_N) of a packed launch."""
    per_tile = max(1, PACK_ROWS // max(p.lq, p.lk))
    return per_tile, max(16, triton.next_power_of_2(per_tile * p.lq)), \
        max(16, triton.next_power_of_2(per_tile * p.lk))


def packed_warps(p: Problem, kernel: str, target: resources.Target | None) -> int | None:
    """Warps of a packed launch of ``kernel`` ("packed_fwd" / "packed_bwd"), or None when
    the problem must take the tiled kernels: not packable, or its whole tiles (in the
    backward pass q, k, v, o, dO and all three gradients) would overflow shared
    memory or spill, as they do for wide float32 heads."""
    if p.layout is not None or p.groups != 1 or max(p.lq, p.lk) > PACK_MAX_LEN:
        return None
    if target is None:
        return 1
    _, bm, bn = _packing(p)
    d_pad, dv_pad = _pad(p.head_dim), _pad(p.v_dim)
    # Measured at the largest packed tile (64 x 64; no loop, so one stage); smaller
    # packs need less.
    for warps in (4, 8):
        n = resources.need(kernel, p.dtype, d_pad, dv_pad, resources.Tile(PACK_ROWS, PACK_ROWS, warps, 1),
                           p.mask is not None, target.arch)
        if n.fits(target.smem_limit, kernel):
            return warps
    return None


def use_packed(p: Problem) -> bool:
    return packed_warps(p, "packed_fwd", device_target(p.device)) is not None


def reduces_kv_heads(p: Problem, dk5: torch.Tensor, dv5: torch.Tensor) -> bool:
    """Whether dk/dv are one buffer shared by the B2 query heads (GQA), so the backward
    pass must sum over B2.  A k or v that the caller broadcast over heads also has
    stride 0 along B2, but its gradient buffers are full: each head is written alone."""
    return p.batch[2] > 1 and all(t.stride(2) == 0 for t in (p.k, p.v, dk5, dv5))


MAX_BATCH = 2**31 - 1


def resource_reasons(p: Problem, requires_grad: bool, target: resources.Target | None) -> list[str]:
    """Why the kernels cannot run ``p`` on ``target`` (None: the interpreter), so that
    ``auto`` falls back."""
    reasons = []
    b0, b1, b2 = p.batch
    if b0 * b1 * b2 > MAX_BATCH:
        reasons.append(f"the batch (B0*B1*B2 = {b0}*{b1}*{b2} = {b0 * b1 * b2}) must be <= {MAX_BATCH}, "
                       "the largest grid dimension")
    if target is None:
        return reasons
    if p.dtype == torch.float32 and _dot_precision(p.dtype) == "ieee":
        reasons.append("float32 with torch.backends.cuda.matmul.allow_tf32=False compiles tl.dot to "
                       "FMA code that spills; allow TF32, use bfloat16/float16, or another backend")
        return reasons
    d_pad, dv_pad = _pad(p.head_dim), _pad(p.v_dim)
    lb = p.layout.block if p.layout is not None else 0
    needed = [("fwd", packed_warps(p, "packed_fwd", target))]
    if requires_grad:
        needed += [("dq", packed_warps(p, "packed_bwd", target)),
                   ("dkdv", packed_warps(p, "packed_bwd", target))]
    for kernel, packed in needed:
        if packed is None and not selectable(kernel, p.dtype, d_pad, dv_pad, lb, target, GPU_CONFIGS[kernel],
                                             p.mask is not None):
            reasons.append(f"no {kernel} tile fits in {target.smem_limit} B of shared memory without "
                           f"spilling registers for {p.dtype} with head dims D={p.head_dim}, Dv={p.v_dim}"
                           f"{' and an element mask' if p.mask is not None else ''}")
    return reasons


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
                causal=p.causal is not None, keys=(length_key(p.lq), length_key(p.lk)))


def forward(p: Problem, out5: torch.Tensor, lse5: torch.Tensor) -> None:
    with _on_device(p.device):
        _forward(p, out5, lse5)


def backward(p: Problem, out5, dout5, lse5, dq5, dk5, dv5) -> None:
    with _on_device(p.device):
        _backward(p, out5, dout5, lse5, dq5, dk5, dv5)


def _forward(p: Problem, out5: torch.Tensor, lse5: torch.Tensor) -> None:
    c = _common(p)
    b0, b1, b2 = p.batch
    warps = packed_warps(p, "packed_fwd", device_target(p.device))
    if warps is not None:
        per_tile, bm, bn = _packing(p)
        n = b0 * b1 * b2
        kernels._packed_fwd_kernel[(triton.cdiv(n, per_tile),)](
            p.q, p.k, p.v, out5, lse5, c["mask"],
            *_strides5(p.q), *_strides5(p.k), *_strides5(p.v), *_strides5(out5), *lse5.stride(),
            *c["mask_strides"], n, b1, b2, per_tile, p.lq, p.lk, p.head_dim, p.v_dim,
            c["qk_scale"], c["causal_off"],
            D_PAD=c["d_pad"], DV_PAD=c["dv_pad"], CAUSAL=c["causal"], HAS_MASK=c["has_mask"],
            MASK_BOOL=c["mask_bool"], DOT_PREC=c["prec"], BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
            num_stages=1)
        return
    lay = _layout_args(p)
    pm, kvc, kvi, bt, pi, _, _ = lay["tables"]
    grid = lambda meta: (b0 * b1 * b2, triton.cdiv(p.lq, meta["BLOCK_M"]))  # noqa: E731
    _fwd[grid](
        p.q, p.k, p.v, out5, lse5, c["mask"], pm, kvc, kvi, bt, pi,
        *_strides5(p.q), *_strides5(p.k), *_strides5(p.v), *_strides5(out5), *lse5.stride(),
        *c["mask_strides"], *lay["head_strides"], b1, b2, p.lq, p.lk, p.head_dim, p.v_dim,
        lay["mq"], lay["mk"], c["qk_scale"], c["causal_off"], *c["keys"],
        D_PAD=c["d_pad"], DV_PAD=c["dv_pad"], LB=lay["lb"], CAUSAL=c["causal"],
        HAS_MASK=c["has_mask"], MASK_BOOL=c["mask_bool"], DOT_PREC=c["prec"])


# Fewest dk/dv programs worth launching before a GQA group is split across programs
# (None: twice the device's SM count).
DKDV_MIN_PROGRAMS = None


def kv_group_splits(p: Problem) -> int:
    """Into how many programs per key tile the B2 query heads sharing a kv head are
    split, so that an MQA/GQA backward fills the GPU.  A divisor of B2: each program
    sums an equal, fixed run of heads, and the partial sums are added in a fixed
    order afterwards, so the result stays deterministic."""
    b0, b1, b2 = p.batch
    target = DKDV_MIN_PROGRAMS
    if target is None:
        target = 2 * resources.sm_count(p.device) if p.device.type == "cuda" else 1
    tiles = triton.cdiv(p.lk, 128)  # the fewest key tiles any config launches
    for splits in range(1, b2 + 1):
        if b2 % splits == 0 and b0 * b1 * splits * tiles >= target:
            return splits
    return b2


def _backward(p: Problem, out5, dout5, lse5, dq5, dk5, dv5) -> None:
    c = _common(p)
    b0, b1, b2 = p.batch
    shared = reduces_kv_heads(p, dk5, dv5)
    warps = None if shared else packed_warps(p, "packed_bwd", device_target(p.device))
    if warps is not None:
        per_tile, bm, bn = _packing(p)
        n = b0 * b1 * b2
        kernels._packed_bwd_kernel[(triton.cdiv(n, per_tile),)](
            p.q, p.k, p.v, out5, dout5, lse5, dq5, dk5, dv5, c["mask"],
            *_strides5(p.q), *_strides5(p.k), *_strides5(p.v), *_strides5(out5), *_strides5(dout5),
            *lse5.stride(), *c["mask_strides"], *_strides5(dq5), *_strides5(dk5), *_strides5(dv5),
            n, b1, b2, per_tile, p.lq, p.lk, p.head_dim, p.v_dim, p.scale, c["qk_scale"],
            c["causal_off"],
            D_PAD=c["d_pad"], DV_PAD=c["dv_pad"], CAUSAL=c["causal"], HAS_MASK=c["has_mask"],
            MASK_BOOL=c["mask_bool"], DOT_PREC=c["prec"], BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
            num_stages=1)
        return
    delta = torch.empty(b0 * b1 * b2, p.lq, dtype=torch.float32, device=p.device)
    pre_block = 16 if INTERPRET else 64
    kernels._bwd_preprocess[(b0 * b1 * b2, triton.cdiv(p.lq, pre_block))](
        out5, dout5, delta, *_strides5(out5), *_strides5(dout5), b1, b2, p.lq, p.v_dim,
        DV_PAD=c["dv_pad"], BLOCK_M=pre_block)
    lay = _layout_args(p)
    pm, kvc, kvi, bt, pi, qc, qi = lay["tables"]
    common = (*_strides5(p.q), *_strides5(p.k), *_strides5(p.v), *_strides5(dout5), *lse5.stride(),
              *c["mask_strides"])
    meta = dict(D_PAD=c["d_pad"], DV_PAD=c["dv_pad"], LB=lay["lb"], CAUSAL=c["causal"],
                HAS_MASK=c["has_mask"], MASK_BOOL=c["mask_bool"], DOT_PREC=c["prec"])
    splits = kv_group_splits(p) if shared else b2
    dk_out, dv_out = dk5, dv5
    if shared and splits > 1:
        # One partial dk/dv per run of heads, in float32, summed below.
        dk_out = torch.empty(b0, b1, splits, p.lk, p.head_dim, dtype=torch.float32, device=p.device)
        dv_out = torch.empty(b0, b1, splits, p.lk, p.v_dim, dtype=torch.float32, device=p.device)
    _dkdv[lambda m: (b0 * b1 * splits, triton.cdiv(p.lk, m["BLOCK_N"]))](
        p.q, p.k, p.v, dout5, lse5, delta, dk_out, dv_out, c["mask"], pm, qc, qi, bt, pi,
        *common, *_strides5(dk_out), *_strides5(dv_out), *lay["head_strides"], b1, b2, b2 // splits,
        p.lq, p.lk, p.head_dim, p.v_dim, lay["mq"], lay["mk"], p.scale, c["qk_scale"],
        c["causal_off"], *c["keys"], **meta)
    if dk_out is not dk5:
        dk5[:, :, 0].copy_(dk_out.sum(2))
        dv5[:, :, 0].copy_(dv_out.sum(2))
    _dq[lambda m: (b0 * b1 * b2, triton.cdiv(p.lq, m["BLOCK_M"]))](
        p.q, p.k, p.v, dout5, lse5, delta, dq5, c["mask"], pm, kvc, kvi, bt, pi,
        *common, *_strides5(dq5), *lay["head_strides"], b1, b2, p.lq, p.lk, p.head_dim, p.v_dim,
        lay["mq"], lay["mk"], p.scale, c["qk_scale"], c["causal_off"], *c["keys"], **meta)
