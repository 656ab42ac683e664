"""Pure-PyTorch attention: the float64 oracle and the ``torch`` backend (CPU fallback).

* :func:`oracle` materializes every score (O(L^2)); tests compare every backend
  against it in float64.
* :class:`TorchBackend` is exact and memory-efficient: dense, causal and
  spatio-temporal problems go through ``F.scaled_dot_product_attention`` on the
  lowered views; block-sparse problems compute only their active blocks, a chunk
  of query blocks at a time, never an ``L x L`` mask or score matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .backends import Backend
from .lowering import LoweredLayout, Problem, from5

# Bounds on the elements of one chunk's score-sized tensors in the block-sparse path.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK_ELEMENTS = 1 << 18


def safe_lse(scores: torch.Tensor, valid: torch.Tensor | None):
    """``(lse [..., 1], exp(scores - m), denom)`` with m the (detached) row max; a row
    with no valid key has LSE -inf, and every gradient stays finite (0 for such rows)."""
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    m = scores.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    denom = p.sum(-1, keepdim=True)
    empty = denom == 0
    denom = torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, float("-inf"), m + torch.log(denom))
    return lse, p, denom


def safe_softmax_attend(scores: torch.Tensor, valid: torch.Tensor | None, v: torch.Tensor):
    """``softmax(scores) @ v`` and the log-sum-exp; rows with no valid key give output
    0 and LSE -inf, and their gradients are 0 (never NaN)."""
    lse, p, denom = safe_lse(scores, valid)
    out = (p.to(v.dtype) @ v) / denom.to(v.dtype)
    return out, lse.squeeze(-1)


def causal_visible(causal: str | None, q_pos: torch.Tensor, k_pos: torch.Tensor, lq: int, lk: int):
    """Bool ``[..., |q_pos|, |k_pos|]``: which keys the causal rule lets each query see."""
    offset = lk - lq if causal == "bottom_right" else 0
    return k_pos[..., None, :] <= q_pos[..., :, None] + offset


def _mask_terms(mask: torch.Tensor | None):
    """Split a user mask into (bool visibility or None, additive float or None)."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return mask, None
    return None, mask


def layout_dense(layout: LoweredLayout, batch, lq: int, lk: int) -> torch.Tensor:
    """Bool ``[B0, B1, B2, Lq, Lk]`` visibility of a block layout.  O(L^2): oracle only."""
    b = layout.block
    heads = layout.head_index(batch, layout.block_type.device)
    bt = layout.block_type[heads]  # [B0, B1, B2, Mq, Mk]
    pm = torch.cat([layout.partial_masks,
                    torch.zeros(1, b, b, dtype=torch.bool, device=bt.device)])
    part = pm[layout.partial_index[heads].long()]  # [..., Mq, Mk, b, b]
    full = (bt == 1)[..., None, None].expand(part.shape)
    dense = (full | part).transpose(-3, -2)  # [..., Mq, b, Mk, b]
    dense = dense.reshape(*batch, bt.shape[-2] * b, bt.shape[-1] * b)
    return dense[..., :lq, :lk]


def oracle(problem: Problem, dtype: torch.dtype = torch.float64):
    """Plain math on every score: ``(out5, lse5)`` in ``dtype`` (float64 by default)."""
    p = problem
    q, k, v = (t.to(dtype) for t in (p.q, p.k, p.v))
    scores = (q @ k.transpose(-1, -2)) * p.scale
    valid = None
    visible, additive = _mask_terms(p.mask)
    if additive is not None:
        scores = scores + additive.to(dtype)
    if visible is not None:
        valid = visible
    if p.causal:
        c = causal_visible(p.causal, torch.arange(p.lq, device=q.device),
                           torch.arange(p.lk, device=q.device), p.lq, p.lk)
        valid = c if valid is None else valid & c
    if p.layout is not None:
        lay = layout_dense(p.layout, p.batch, p.lq, p.lk).to(q.device)
        valid = lay if valid is None else valid & lay
    return safe_softmax_attend(scores, valid, v)


def _mergeable(t: torch.Tensor, dim: int) -> bool:
    """Whether dims ``dim`` and ``dim + 1`` of ``t`` merge into one without a copy
    (decided from strides, so torch.compile traces it without a try/except)."""
    outer, inner = t.shape[dim], t.shape[dim + 1]
    return outer == 1 or inner == 1 or t.stride(dim) == t.stride(dim + 1) * inner


def _flatten_batch(t5: torch.Tensor, merge: int) -> torch.Tensor:
    """``[B0, B1, B2, ...]`` -> 4-D for SDPA by merging the batch pair starting at
    dim ``merge``; a view when the strides allow, else a copy that keeps the other
    stride-0 (broadcast) batch dim at size 1."""
    if _mergeable(t5, merge):
        return t5.flatten(merge, merge + 1)
    rest = 2 if merge == 0 else 0
    t = t5.narrow(rest, 0, 1) if t5.stride(rest) == 0 else t5
    return t.flatten(merge, merge + 1)


class TorchBackend(Backend):
    name = "torch"
    differentiable = True

    def run(self, problem: Problem, need_lse: bool):
        if problem.layout is not None:
            out5, lse5 = _block_sparse(problem, need_lse)
        else:
            out5 = _dense_sdpa(problem)
            lse5 = _dense_lse(problem) if need_lse else None
        return from5(out5, problem.kind), lse5


def _dense_visibility(p: Problem) -> tuple[torch.Tensor | None, bool]:
    """The SDPA mask of a dense problem and whether SDPA's own ``is_causal`` applies
    (it is top-left, which bottom-right equals when Lq == Lk)."""
    if p.causal is None:
        return p.mask, False
    if p.mask is None and (p.causal == "top_left" or p.lq == p.lk):
        return None, True
    c = causal_visible(p.causal, torch.arange(p.lq, device=p.device),
                       torch.arange(p.lk, device=p.device), p.lq, p.lk)
    return (c if p.mask is None else _combine(p.mask, c)), False


def _combine(mask: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask & visible
    return mask.masked_fill(~visible, float("-inf"))


def _dense_sdpa(p: Problem) -> torch.Tensor:
    mask, is_causal = _dense_visibility(p)
    dead = None
    if mask is not None:
        # SDPA gives NaN for a row that sees no key; let such rows see every key
        # (finite, harmless) and zero them, so outputs and gradients stay 0.  No
        # data-dependent branch, so torch.compile traces it whole.
        dead = ~(mask.any(-1, keepdim=True) if mask.dtype == torch.bool else
                 (mask > float("-inf")).any(-1, keepdim=True))
        mask = mask | dead if mask.dtype == torch.bool else mask.masked_fill(dead, 0.0)
        if mask.dtype != torch.bool:
            mask = mask.to(p.dtype)
    merge = 0 if _mergeable(p.q, 0) else 1
    if mask is not None:
        mask = _flatten_batch(mask.expand(*p.batch, p.lq, p.lk), merge)
    q, k, v = (_flatten_batch(t, merge) for t in (p.q, p.k, p.v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=p.scale)
    out = out.view(*p.batch, p.lq, p.v_dim)
    if dead is not None:
        out = out.masked_fill(dead.expand(*p.batch, p.lq, 1), 0.0)
    return out


def _dense_lse(p: Problem) -> torch.Tensor:
    """Log-sum-exp of a dense problem, a chunk of query rows at a time."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, math.prod(p.batch) * p.lk))
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    visible, additive = _mask_terms(p.mask)
    chunks = []
    for start in range(0, p.lq, rows):
        sl = slice(start, min(start + rows, p.lq))
        scores = (p.q[..., sl, :].to(compute) @ p.k.to(compute).transpose(-1, -2)) * p.scale
        if additive is not None:
            scores = scores + additive[..., sl, :].to(compute)
        valid = None if visible is None else visible[..., sl, :]
        if p.causal:
            c = causal_visible(p.causal, torch.arange(sl.start, sl.stop, device=p.device),
                               torch.arange(p.lk, device=p.device), p.lq, p.lk)
            valid = c if valid is None else valid & c
        chunks.append(safe_lse(scores, valid)[0].squeeze(-1))
    return torch.cat(chunks, -1)


def _block_sparse(p: Problem, need_lse: bool):
    """Only the active blocks, a chunk of query blocks at a time (see
    :class:`_BlockSparseAttention`)."""
    lay = p.layout
    nb = math.prod(p.batch)
    mq, mk = lay.block_type.shape[-2:]
    q, k, v = (_as_blocks(t, nb, blocks, lay.block) for t, blocks in ((p.q, mq), (p.k, mk), (p.v, mk)))
    out, lse = _BlockSparseAttention.apply(p, need_lse, q, k, v)
    out = out.flatten(1, 2)[:, :p.lq].to(p.dtype).view(*p.batch, p.lq, p.v_dim)
    return out, (lse.flatten(1, 2)[:, :p.lq].view(*p.batch, p.lq) if need_lse else None)


def _as_blocks(t5: torch.Tensor, nb: int, blocks: int, b: int) -> torch.Tensor:
    """``[B0, B1, B2, L, D]`` -> ``[nb, blocks, b, D]``, padding L only when it is not a
    multiple of the block (and copying only when the strides need it)."""
    t = t5.reshape(nb, t5.shape[3], t5.shape[4])
    if blocks * b != t.shape[1]:
        t = F.pad(t, (0, 0, 0, blocks * b - t.shape[1]))
    return t.view(nb, blocks, b, -1)


class _BlockSparseAttention(torch.autograd.Function):
    """Block-sparse attention over ``[nb, M, b, D]`` blocks, a chunk of query blocks
    at a time against their gathered key blocks.

    The forward runs SDPA per chunk (scores only when the LSE is asked for); the
    backward recomputes each chunk's probabilities and scatters dk/dv into one
    buffer, so memory stays O(L) beyond inputs and outputs and no ``L x L`` tensor
    exists at any point.
    """

    @staticmethod
    def forward(ctx, p: Problem, need_lse: bool, q, k, v):
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        lse = q.new_empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        for b0, b1, qblocks, n in _chunks(p, q):
            c = _Chunk(p, q, k, v, b0, b1, qblocks, n)
            if need_lse:
                out[b0:b1, qblocks], lse[b0:b1, qblocks] = c.attend_math()
            else:
                out[b0:b1, qblocks] = c.attend_sdpa()
        ctx.p = p
        ctx.save_for_backward(q, k, v, out)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        p = ctx.p
        q, k, v, out = ctx.saved_tensors
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(q.shape, dtype=compute, device=q.device)
        dk = torch.zeros(k.shape, dtype=compute, device=q.device)
        dv = torch.zeros(v.shape, dtype=compute, device=q.device)
        mk = k.shape[1]
        dk_flat, dv_flat = dk.view(-1, *k.shape[2:]), dv.view(-1, *v.shape[2:])
        for b0, b1, qblocks, n in _chunks(p, q):
            c = _Chunk(p, q, k, v, b0, b1, qblocks, n)
            probs = c.probabilities(compute)  # [nb', c, b, n*b]
            do = dout[b0:b1, qblocks].to(compute)
            delta = (do * out[b0:b1, qblocks].to(compute)).sum(-1, keepdim=True)
            dscores = probs * (do @ c.vg.to(compute).transpose(-1, -2) - delta) * p.scale
            dq[b0:b1, qblocks] = dscores @ c.kg.to(compute)
            # Scatter-add the gathered blocks' gradients: rows of [nb * Mk, b, D].
            dest = (torch.arange(b0, b1, device=q.device)[:, None, None] * mk + c.kv_idx).flatten()
            b = p.layout.block
            dk_flat.index_add_(0, dest, (dscores.transpose(-1, -2) @ c.q.to(compute)).reshape(-1, b, k.shape[-1]))
            dv_flat.index_add_(0, dest, (probs.transpose(-1, -2) @ do).reshape(-1, b, v.shape[-1]))
        return None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _chunks(p: Problem, q: torch.Tensor):
    """``(b0, b1, qblocks, n)``: the batch rows, query blocks and gathered key-block
    count of each chunk.

    Query blocks are grouped by how many key blocks they see, so a few dense rows
    (BigBird's global blocks) do not make every row gather as many; chunks are sized
    so that score-shaped temporaries stay a fraction of the inputs (within bounds).
    """
    b = p.layout.block
    nb = q.shape[0]
    counts = p.layout.row_counts
    budget = max(_MIN_CHUNK_ELEMENTS, min(_CHUNK_ELEMENTS, q.numel() // 4))
    order = sorted(range(len(counts)), key=counts.__getitem__)
    start = 0
    while start < len(order):
        # Grow the group while padding every row to the group's largest count wastes
        # at most a quarter of its work.
        stop = start + 1
        while stop < len(order) and counts[order[stop]] * 4 <= max(1, counts[order[start]]) * 5:
            stop += 1
        n = max(1, counts[order[stop - 1]])
        rows = max(1, budget // (b * n * b))
        group = order[start:stop]
        for b0 in range(0, nb, rows):
            b1 = min(nb, b0 + rows)
            per = max(1, rows // (b1 - b0))
            for i in range(0, len(group), per):
                yield b0, b1, torch.tensor(group[i:i + per], device=q.device), n
        start = stop


class _Chunk:
    """Query blocks ``qblocks`` of batch rows ``b0:b1`` with their first ``n`` key
    blocks gathered (``kg``/``vg`` ``[nb', c, n*b, D]``) and what each query sees."""

    def __init__(self, p: Problem, q, k, v, b0, b1, qblocks, n):
        lay = p.layout
        dev = q.device
        self.p = p
        heads = lay.head_index(p.batch, dev).flatten()[b0:b1]
        self.kv_idx = lay.kv_indices[heads[:, None], qblocks[None, :], :n].long()  # [nb', c, n]
        ar = torch.arange(b0, b1, device=dev)[:, None, None]
        self.q = q[b0:b1, qblocks]
        self.kg = k[ar, self.kv_idx].flatten(2, 3)
        self.vg = v[ar, self.kv_idx].flatten(2, 3)
        if p.mask is None:
            # Visibility depends only on the layout head: compute it once per head and
            # broadcast it over the batch instead of once per batch element.
            layout_heads = torch.arange(lay.block_type.shape[0], device=dev)
            self.valid, self.additive = _chunk_visibility(p, layout_heads, None, qblocks, n)
            if layout_heads.numel() > 1:
                self.valid = self.valid[heads]
        else:
            self.valid, self.additive = _chunk_visibility(p, heads, torch.arange(b0, b1, device=dev),
                                                          qblocks, n)

    def scores(self, compute: torch.dtype) -> torch.Tensor:
        s = (self.q.to(compute) @ self.kg.to(compute).transpose(-1, -2)) * self.p.scale
        return s if self.additive is None else s + self.additive.to(compute)

    def attend_math(self):
        compute = torch.float64 if self.q.dtype == torch.float64 else torch.float32
        return safe_softmax_attend(self.scores(compute), self.valid, self.vg.to(compute))

    def probabilities(self, compute: torch.dtype) -> torch.Tensor:
        _, p, denom = safe_lse(self.scores(compute), self.valid)
        return p / denom

    def attend_sdpa(self) -> torch.Tensor:
        # SDPA gives NaN for a row that sees no key: such rows see everything, then are zeroed.
        dead = ~self.valid.any(-1, keepdim=True)
        q = self.q
        bias = torch.zeros(self.valid.shape, dtype=q.dtype, device=q.device) if self.additive is None \
            else self.additive.to(q.dtype)
        bias = bias.masked_fill(~self.valid, float("-inf")).masked_fill(dead, 0.0)
        out = F.scaled_dot_product_attention(q, self.kg, self.vg, attn_mask=bias, scale=self.p.scale)
        return out.masked_fill(dead, 0.0)


def _chunk_visibility(p: Problem, heads, batch_ids, qblock_ids, n: int):
    """``(valid, additive)``, each ``[R, c, b, n * b]``, for the query blocks
    ``qblock_ids`` of R rows (layout head ``heads[r]``; batch element ``batch_ids[r]``
    when the problem has a user mask): which of the first ``n`` gathered key slots
    each query sees, and the user's additive mask on them (or None)."""
    lay = p.layout
    b = lay.block
    dev = heads.device
    kv_idx = lay.kv_indices[heads[:, None], qblock_ids[None, :], :n].long()  # [R, c, n]
    slot_ok = torch.arange(n, device=dev) < lay.kv_counts[heads[:, None], qblock_ids[None, :], None]
    q_pos = qblock_ids[:, None] * b + torch.arange(b, device=dev)  # [c, b]
    k_pos = kv_idx[..., None] * b + torch.arange(b, device=dev)  # [R, c, n, b]
    btype = lay.block_type[heads[:, None, None], qblock_ids[None, :, None], kv_idx]  # [R, c, n]
    valid = (slot_ok & (btype > 0))[:, :, None, :, None] & (k_pos < p.lk)[:, :, None]
    if lay.partial_masks.shape[0]:
        pidx = lay.partial_index[heads[:, None, None], qblock_ids[None, :, None], kv_idx]
        pm = torch.cat([lay.partial_masks, torch.ones(1, b, b, dtype=torch.bool, device=dev)])
        elem = pm[torch.where(btype == 2, pidx, pm.shape[0] - 1).long()]  # [R, c, n, bq, bk]
        valid = valid & elem.permute(0, 1, 3, 2, 4)
    if p.causal:
        offset = p.lk - p.lq if p.causal == "bottom_right" else 0
        valid = valid & (k_pos[:, :, None] <= q_pos[None, :, :, None, None] + offset)
    additive = None
    if p.mask is not None:
        _, b1, b2 = p.batch
        bi = batch_ids[:, None, None, None, None]
        m = p.mask[bi // (b1 * b2), (bi // b2) % b1, bi % b2,
                   q_pos.clamp(max=p.lq - 1)[None, :, :, None, None], k_pos.clamp(max=p.lk - 1)[:, :, None]]
        if m.dtype == torch.bool:
            valid = valid & m
        else:
            additive = m.flatten(-2)
            valid = valid & (m > float("-inf"))
    return valid.flatten(-2), additive


BACKEND = TorchBackend()
