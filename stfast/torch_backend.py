"""The ``torch`` backend: exact attention in plain PyTorch ops, the CPU default and the
fallback for whatever a kernel backend refuses.

* Dense, causal and spatio-temporal problems run ``F.scaled_dot_product_attention``
  on the lowered views.  A user's mask reaches SDPA at its own size (broadcast dims
  of size 1), bottom-right causal runs as SDPA's top-left ``is_causal`` on shifted
  rows: nothing grows as ``Lq x Lk`` beyond the user's own mask.
* Block-sparse problems compute only their active blocks, never an ``L x L`` mask or
  score matrix, and issue few, large operations per call: query blocks are grouped by
  how many key blocks they see, each slice's mask is built once, and each chunk is one
  attention call over many query blocks (a sliding window reads its keys as a strided
  view, other layouts gather them in one copy).  On a busy CPU every operation ends
  in a parallel region whose threads wait for each other; many small operations turn
  each descheduled thread into a stall, so the count of operations, not their size,
  sets the time under load.  With more than one intra-op thread the chunks of a
  slice therefore run on as many Python threads, each with one intra-op thread and
  taking the next chunk from a shared queue: one parallel region per slice instead
  of one per operation, and a descheduled thread delays only its own chunk.

NaN: a NaN query row gives NaN in that row only; a NaN in a key or value that a row
sees makes that row NaN.  A NaN key or value hidden by causality never spreads.
One hidden by a user's mask spreads to every row on the dense paths (SDPA adds the
mask to the NaN score, and multiplies the NaN value by a zero probability).
Block-sparse: keys of skipped blocks never spread; a NaN inside an active block
spreads to the rows of the query blocks that gather it, even where the element or
causal mask hides it.  Rows that see no key are 0 in every case.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
import torch.nn.functional as F

from .backends import Backend
from .lowering import Problem, from5

# Block-sparse work per operation: gathered key elements of the chunks in flight at once,
# one per worker thread (4 MiB in float32;
# the backward holds a few score-sized temporaries of about that size) and mask elements
# of one slice (16 MiB).  Large enough that a call is a few dozen operations, small
# enough that they stay far below a dense L x L mask (and in cache: 4x larger chunks
# measured slower).
_GATHER_ELEMENTS = 1 << 20
_MASK_ELEMENTS = 1 << 22
# Rows of query x key elements whose LSE one dense chunk computes at once.
_LSE_ELEMENTS = 1 << 22
# Elements of the causal mask of one chunk of bottom-right rows when Lk >= 2 Lq.
_CAUSAL_ROW_ELEMENTS = 1 << 20


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _causal_visible(causal: str | None, q_pos: torch.Tensor, k_pos: torch.Tensor, lq: int, lk: int):
    """Bool ``[..., |q_pos|, |k_pos|]``: which keys the causal rule lets each query see."""
    offset = lk - lq if causal == "bottom_right" else 0
    return k_pos[..., None, :] <= q_pos[..., :, None] + offset


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


def _dense_visibility(p: Problem) -> tuple[torch.Tensor | None, bool]:
    """The SDPA mask of a dense problem (its broadcast dims kept at size 1) and
    whether SDPA's own ``is_causal`` applies (top-left; bottom-right problems are
    shifted to top-left by :func:`_dense_sdpa`, never turned into a mask)."""
    mask = None if p.mask is None else _compact(p.mask)
    if p.causal is None:
        return mask, False
    if mask is None:
        return None, True
    c = _causal_visible(p.causal, torch.arange(p.lq, device=p.device),
                        torch.arange(p.lk, device=p.device), p.lq, p.lk)
    return _combine(mask, c), False


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` with each broadcast (stride-0) dim narrowed to size 1, so that what is
    computed from it, and SDPA's own conversion of it, stays the size of the user's
    mask instead of growing with the batch."""
    for dim in range(t.dim()):
        if t.shape[dim] > 1 and t.stride(dim) == 0:
            t = t.narrow(dim, 0, 1)
    return t


def _combine(mask: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask & visible
    return mask.masked_fill(~visible, float("-inf"))


def _dense_sdpa(p: Problem) -> torch.Tensor:
    if p.causal == "bottom_right" and p.mask is None and p.lq != p.lk:
        return _bottom_right(p)
    mask, is_causal = _dense_visibility(p)
    dead = None
    if mask is not None and not _flash_kernel(p.device):
        # SDPA's GPU kernels give NaN for a row that sees no key (its CPU flash kernel
        # gives 0 with zero gradients); let such rows see every key (finite, harmless)
        # and zero them.  No data-dependent branch, so torch.compile traces it whole.
        dead = ~(mask.any(-1, keepdim=True) if mask.dtype == torch.bool else
                 (mask > float("-inf")).any(-1, keepdim=True))
        mask = mask | dead if mask.dtype == torch.bool else mask.masked_fill(dead, 0.0)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(p.dtype)
    # Merge the batch pair that every tensor merges as a view (k/v broadcast over the
    # batch by the caller merge only the inner pair).
    merge = 0 if all(_mergeable(t, 0) for t in (p.q, p.k, p.v)) else 1
    if mask is not None:
        if mask.shape[merge:merge + 2] != (1, 1):
            mask = mask.expand(*mask.shape[:merge], *p.batch[merge:merge + 2], *mask.shape[merge + 2:])
        mask = _flatten_batch(mask, merge)
    q, k, v = (_flatten_batch(t, merge) for t in (p.q, p.k, p.v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=p.scale)
    out = out.view(*p.batch, p.lq, p.v_dim)
    if mask is None:
        return _nan_rows(out, p.q)
    # With a mask SDPA keeps a NaN query row NaN itself.
    return out if dead is None else out.masked_fill(dead.expand(*p.batch, p.lq, 1), 0.0)


def _nan_rows(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A query row holding NaN gives NaN, as every backend does (PyTorch's CPU flash
    kernel without a mask writes zeros for a row whose scores are all NaN).

    Marking rows costs more than a short attention (the time axis: 2.5x its time), so
    on the CPU one sum decides first whether any element can be NaN; it is NaN for
    every NaN input (and for +inf beside -inf, which only takes the slow way).  Under
    torch.compile, and on devices where reading it back would synchronise, the rows
    are marked without that branch."""
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and not q.sum().isnan():
        return out
    return out.masked_fill(q.isnan().any(-1, keepdim=True), float("nan"))


def _bottom_right(p: Problem) -> torch.Tensor:
    """Bottom-right causal attention (query i sees keys j <= i + Lk - Lq), never an
    ``Lq x Lk`` mask.  With Lq > Lk the first Lq - Lk rows see no key (zeros) and the
    rest is top-left causal.  With Lq <= Lk < 2 Lq the queries are placed after Lk - Lq
    zero rows and run as SDPA's top-left ``is_causal`` (at most about 1.3x the work).
    Past that, as in KV-cache decoding and chunked prefill, those zero rows would cost
    O(Lk^2) for O(Lq * Lk) of attention, so chunks of query rows run with a causal mask
    of their own rows only (``_CAUSAL_ROW_ELEMENTS`` elements at most)."""
    shift = p.lk - p.lq
    if shift < 0:
        inner = _dense_sdpa(Problem(p.kind, p.q[..., -shift:, :], p.k, p.v, p.scale, "top_left"))
        return torch.cat([inner.new_zeros(*p.batch, -shift, p.v_dim), inner], -2)
    if shift < p.lq:
        pad = p.q.new_zeros(*p.batch, shift, p.head_dim)
        full = _dense_sdpa(Problem(p.kind, torch.cat([pad, p.q], -2), p.k, p.v, p.scale, "top_left"))
        return full[..., shift:, :]
    rows = max(1, min(p.lq, _CAUSAL_ROW_ELEMENTS // p.lk))
    outs = []
    for start in range(0, p.lq, rows):
        stop = min(start + rows, p.lq)
        keys = stop + shift  # the last row of the chunk sees keys [0, stop - 1 + shift]
        visible = (torch.arange(keys, device=p.device)
                   <= torch.arange(start + shift, stop + shift, device=p.device)[:, None])
        chunk = Problem(p.kind, p.q[..., start:stop, :], p.k[..., :keys, :], p.v[..., :keys, :],
                        p.scale, mask=visible.expand(*p.batch, stop - start, keys))
        outs.append(_dense_sdpa(chunk))
    return torch.cat(outs, -2)


def _dense_lse(p: Problem) -> torch.Tensor:
    """Log-sum-exp of a dense problem, a chunk of query rows at a time: float32 for
    every input dtype, and no gradient, as from every other backend."""
    rows = max(1, _LSE_ELEMENTS // max(1, math.prod(p.batch) * p.lk))
    compute = _compute_dtype(p.dtype)
    chunks = []
    with torch.no_grad():
        for start in range(0, p.lq, rows):
            sl = slice(start, min(start + rows, p.lq))
            scores = (p.q[..., sl, :].to(compute) @ p.k.to(compute).transpose(-1, -2)) * p.scale
            if p.mask is not None:
                if p.mask.dtype == torch.bool:
                    scores = scores.masked_fill(~p.mask[..., sl, :], float("-inf"))
                else:
                    scores = scores + p.mask[..., sl, :].to(compute)
            if p.causal:
                c = _causal_visible(p.causal, torch.arange(sl.start, sl.stop, device=p.device),
                                    torch.arange(p.lk, device=p.device), p.lq, p.lk)
                scores = scores.masked_fill(~c, float("-inf"))
            chunks.append(torch.logsumexp(scores, -1).float())
    return torch.cat(chunks, -1)


# ---------------------------------------------------------------------------------
# Block-sparse


def _block_sparse(p: Problem, need_lse: bool):
    lay = p.layout
    b = lay.block
    mq, mk = lay.block_type.shape[-2:]
    k_base, v_base, kv_batch = _unbroadcast_kv(p)
    q = _as_blocks(p.q, mq, b)
    k, v = _as_blocks(k_base, mk, b), _as_blocks(v_base, mk, b)
    on_cpu = p.device.type == "cpu" and not torch.compiler.is_compiling()
    plan = _Plan(p, kv_batch, torch.get_num_threads() if on_cpu else 1)
    out, lse = _BlockSparseAttention.apply(plan, need_lse, q, k, v)
    out = out.flatten(1, 2)[:, :p.lq].to(p.dtype).view(*p.batch, p.lq, p.v_dim)
    return out, (lse.flatten(1, 2)[:, :p.lq].view(*p.batch, p.lq) if need_lse else None)


def _unbroadcast_kv(p: Problem):
    """k and v without the batch dims they share by stride 0 (GQA), so they are
    neither copied per query head nor summed back in the backward, and their batch
    shape."""
    k, v = p.k, p.v
    for dim in range(3):
        if k.shape[dim] > 1 and k.stride(dim) == 0 and v.stride(dim) == 0:
            k, v = k.narrow(dim, 0, 1), v.narrow(dim, 0, 1)
    return k, v, tuple(k.shape[:3])


def _as_blocks(t5: torch.Tensor, blocks: int, b: int) -> torch.Tensor:
    """``[B0, B1, B2, L, D]`` -> ``[nb, blocks, b, D]``, padding L only when it is not a
    multiple of the block (and copying only when the strides need it)."""
    t = t5.reshape(-1, t5.shape[3], t5.shape[4])
    if blocks * b != t.shape[1]:
        t = F.pad(t, (0, 0, 0, blocks * b - t.shape[1]))
    return t.view(t.shape[0], blocks, b, -1)


class _Plan:
    """How a block-sparse call is cut into operations, decided from Python ints only
    (no device sync, and torch.compile traces it as constants).

    Query blocks are grouped by how many key blocks they see, so a few dense rows
    (BigBird's global blocks) do not make every row gather as many; each group is cut
    into slices whose mask is built once, and each slice into chunks of (batch rows,
    query blocks) whose gathered keys fill about ``_GATHER_ELEMENTS`` shared by the
    ``threads`` chunks in flight at once.
    """

    def __init__(self, p: Problem, kv_batch: tuple[int, int, int], threads: int):
        self.p = p
        self.threads = threads
        lay = p.layout
        b = lay.block
        self.nb = math.prod(p.batch)
        self.kv_batch = kv_batch
        self.kv_per_row = math.prod(kv_batch) == self.nb  # no GQA sharing: rows map 1:1
        self.mask_per_batch = p.mask is not None and any(
            size > 1 and stride != 0 for size, stride in zip(p.mask.shape[:3], p.mask.stride()[:3]))
        layout_heads = lay.block_type.shape[0]
        counts = lay.row_counts
        order = sorted(range(len(counts)), key=counts.__getitem__)
        self.slices = []  # (query blocks, gathered key blocks n, [(b0, b1, i0, i1), ...])
        start = 0
        while start < len(order):
            # Grow the group while padding every row to the group's largest count wastes
            # at most a quarter of its work.
            stop = start + 1
            while stop < len(order) and counts[order[stop]] * 4 <= max(1, counts[order[start]]) * 5:
                stop += 1
            n = max(1, counts[order[stop - 1]])
            per_slice = max(1, _MASK_ELEMENTS // (b * n * b * layout_heads))
            # The rows that see exactly n blocks apart from the padded ones: a sliding
            # window's interior then forms one run of consecutive query blocks.
            widest = sorted(i for i in order[start:stop] if counts[i] == n)
            padded = sorted(i for i in order[start:stop] if counts[i] != n)
            for group in (widest, padded):
                for s0 in range(0, len(group), per_slice):
                    qblocks = group[s0:s0 + per_slice]
                    self.slices.append((qblocks, n, self._chunks(len(qblocks), n * b * p.head_dim)))
            start = stop

    def _chunks(self, c: int, row: int):
        rows = max(1, _GATHER_ELEMENTS // self.threads // row)
        if rows >= c and not self.mask_per_batch:  # whole slices, several batch rows at once
            per = rows // c
            return [(b0, min(self.nb, b0 + per), 0, c) for b0 in range(0, self.nb, per)]
        # One batch row at a time (always when the user mask differs per batch row).
        return [(b0, b0 + 1, i0, min(c, i0 + rows)) for b0 in range(self.nb) for i0 in range(0, c, rows)]


class _Slice:
    """Query blocks ``qblocks`` with their first ``n`` key blocks: the gather indices
    and the additive mask (0 visible, -inf hidden, or the user's value), built once
    and shared by every chunk of the slice."""

    def __init__(self, plan: _Plan, qblocks: list[int], n: int, device, batch_row: int | None):
        p = plan.p
        lay = p.layout
        self.heads = lay.head_index(p.batch, device).flatten()
        self.per_head = lay.block_type.shape[0] > 1
        self.kv_rows = (torch.arange(math.prod(plan.kv_batch), device=device)
                        .view(plan.kv_batch).expand(p.batch).flatten())
        first = qblocks[0]
        self.contiguous = qblocks == list(range(first, first + len(qblocks)))
        self.qblocks = torch.tensor(qblocks, device=device)
        self.first = first
        self.kv_idx = lay.kv_indices[:, self.qblocks, :n].long()  # [layout heads, c, n]
        self.bias, self.dead = _bias(p, self.qblocks, self.kv_idx, n, batch_row)
        self.n = n
        self.band = _band_start(self.kv_idx, lay.block_type.shape[-1]) \
            if plan.kv_per_row and self.contiguous else None

    def rows(self, t: torch.Tensor, b0: int, b1: int, i0: int, i1: int) -> torch.Tensor:
        """The chunk's query blocks of ``t`` ``[nb, M, ...]``."""
        if self.contiguous:
            return t[b0:b1, self.first + i0:self.first + i1]
        return t[b0:b1, self.qblocks[i0:i1]]

    def put(self, dest: torch.Tensor, b0: int, b1: int, i0: int, i1: int, rows: torch.Tensor) -> None:
        if self.contiguous:
            dest[b0:b1, self.first + i0:self.first + i1] = rows
        else:
            dest[b0:b1].index_copy_(1, self.qblocks[i0:i1], rows)

    def index(self, b0: int, b1: int, i0: int, i1: int) -> torch.Tensor:
        """``[R|1, c, n]`` key blocks gathered by each query block of the chunk."""
        if self.per_head:
            return self.kv_idx[self.heads[b0:b1, None], torch.arange(i0, i1, device=self.heads.device)]
        return self.kv_idx[:, i0:i1]

    def of_chunk(self, t: torch.Tensor, b0: int, b1: int, i0: int, i1: int) -> torch.Tensor:
        """The chunk's part of a per-layout-head slice tensor (the mask, the dead rows)."""
        if t.shape[0] == 1:
            return t[:, i0:i1]
        return t[self.heads[b0:b1, None], torch.arange(i0, i1, device=t.device)]

    def window(self, t: torch.Tensor, b0: int, b1: int, i0: int, i1: int) -> torch.Tensor:
        """``[R, c, n*b, D]`` overlapping windows of ``t`` ``[nb, M, b, D]``: query block
        ``i`` of a banded slice sees key blocks ``band + i .. band + i + n - 1``, so its
        keys are a strided view and nothing is copied."""
        s0, s1, s2, s3 = t.stride()
        return t.as_strided((b1 - b0, i1 - i0, self.n * t.shape[2], t.shape[3]), (s0, s1, s2, s3),
                            t.storage_offset() + b0 * s0 + (self.band + i0) * s1)

    def gather(self, k, v, b0, b1, i0, i1):
        """The chunk's keys and values ``[R, c, n*b, D]``, the rows of their blocks in
        ``[nb_kv * M, b, D]``, and the chunk's mask."""
        idx = self.index(b0, b1, i0, i1)
        mk, b = k.shape[1], k.shape[2]
        flat = (self.kv_rows[b0:b1, None, None] * mk + idx).flatten()
        bias = self.of_chunk(self.bias, b0, b1, i0, i1)
        if self.band is not None:
            return self.window(k, b0, b1, i0, i1), self.window(v, b0, b1, i0, i1), flat, bias
        # Rows of the flat [nb_kv * M, b * D] view: index_select copies whole blocks.
        shape = (b1 - b0, idx.shape[1], idx.shape[2] * b)
        kg = k.reshape(-1, b * k.shape[-1]).index_select(0, flat).view(*shape, k.shape[-1])
        vg = v.reshape(-1, b * v.shape[-1]).index_select(0, flat).view(*shape, v.shape[-1])
        return kg, vg, flat, bias


def _band_start(kv_idx: torch.Tensor, mk: int) -> int | None:
    """The first key block of a slice whose query blocks each see ``n`` consecutive key
    blocks, one further per query block (a sliding window), else None.  Read on the
    host (CPU tensors: no device sync); never while tracing, where the gather serves."""
    if kv_idx.shape[0] != 1 or torch.compiler.is_compiling():
        return None
    c, n = kv_idx.shape[1:]
    start = int(kv_idx[0, 0, 0])
    band = start + torch.arange(c, device=kv_idx.device)[:, None] + torch.arange(n, device=kv_idx.device)
    if start + c - 1 + n > mk or not torch.equal(kv_idx[0], band):
        return None
    return start


def _bias(p: Problem, qblocks: torch.Tensor, kv_idx: torch.Tensor, n: int, batch_row: int | None):
    """``(bias [Hl, c, b, n*b], dead [Hl, c, b, 1])``: the additive mask of the gathered
    key slots of ``qblocks`` (-inf for skipped or padding slots, outside a partial
    block's mask, past Lk, causal, hidden by the user's mask; else the user's additive
    value or 0), and the query rows that see no key.  The user mask is taken at
    ``batch_row`` (batch 0 when it is the same for every batch element)."""
    lay = p.layout
    b = lay.block
    dev = qblocks.device
    heads = torch.arange(lay.block_type.shape[0], device=dev)[:, None, None]
    slot_ok = torch.arange(n, device=dev) < lay.kv_counts[:, qblocks, None]
    btype = lay.block_type[heads, qblocks[None, :, None], kv_idx]  # [Hl, c, n]
    q_pos = qblocks[:, None] * b + torch.arange(b, device=dev)  # [c, b]
    k_pos = kv_idx[..., None] * b + torch.arange(b, device=dev)  # [Hl, c, n, b]
    visible = (slot_ok & (btype > 0))[:, :, None, :, None] & (k_pos < p.lk)[:, :, None]
    if lay.partial_masks.shape[0]:
        pidx = lay.partial_index[heads, qblocks[None, :, None], kv_idx]
        pm = torch.cat([lay.partial_masks, torch.ones(1, b, b, dtype=torch.bool, device=dev)])
        elem = pm[torch.where(btype == 2, pidx, pm.shape[0] - 1).long()]  # [Hl, c, n, bq, bk]
        visible = visible & elem.permute(0, 1, 3, 2, 4)
    if p.causal:
        offset = p.lk - p.lq if p.causal == "bottom_right" else 0
        visible = visible & (k_pos[:, :, None] <= q_pos[None, :, :, None, None] + offset)
    compute = _compute_dtype(p.dtype)
    bias = torch.zeros((), dtype=compute, device=dev)
    if p.mask is not None:
        _, s1, s2 = p.batch
        r = batch_row or 0
        m = p.mask[r // (s1 * s2), (r // s2) % s1, r % s2]
        m = m[q_pos.clamp(max=p.lq - 1)[None, :, :, None, None], k_pos.clamp(max=p.lk - 1)[:, :, None]]
        if m.dtype == torch.bool:
            visible = visible & m
        else:
            bias = m.to(compute)
            visible = visible & (m > float("-inf"))
    visible = visible.flatten(-2)
    visible = visible.expand(*visible.shape[:2], b, visible.shape[-1])
    bias = torch.where(visible, bias.flatten(-2) if bias.dim() else bias, float("-inf"))
    return bias, ~visible.any(-1, keepdim=True)


# The slices (index tables and masks) of each lowered layout, per problem geometry, kept
# while the layout lives: building them is dozens of mask operations per call, each a
# parallel region whose spinning threads a busy CPU deschedules.  Only problems
# without a user mask (the mask is per call); never while tracing.
_SLICE_CACHE: dict[int, dict] = {}


def _cacheable(p: Problem) -> bool:
    return p.mask is None and not torch.compiler.is_compiling()


def _slices(plan: _Plan, device):
    """Each slice of the plan with the chunks it serves."""
    p = plan.p
    if _cacheable(p):
        key = (str(device), p.batch, plan.kv_batch, p.lq, p.lk, p.causal, p.dtype, p.head_dim, plan.threads)
        if id(p.layout) not in _SLICE_CACHE:
            _SLICE_CACHE[id(p.layout)] = {}
            weakref.finalize(p.layout, _SLICE_CACHE.pop, id(p.layout), None)
        per_layout = _SLICE_CACHE[id(p.layout)]
        if key not in per_layout:
            per_layout[key] = [(_Slice(plan, qblocks, n, device, None), chunks)
                               for qblocks, n, chunks in plan.slices]
        yield from per_layout[key]
        return
    for qblocks, n, chunks in plan.slices:
        if plan.mask_per_batch:
            for b0 in range(plan.nb):
                yield _Slice(plan, qblocks, n, device, b0), [c for c in chunks if c[0] == b0]
        else:
            yield _Slice(plan, qblocks, n, device, None), chunks


def _jobs(plan: _Plan, device, whole_bands: bool):
    """The chunks of a call as lists of ``(slice, b0, b1, i0, i1)`` jobs to run
    together: every chunk of the call at once when its slices are cached (a slice of a
    single chunk then does not run alone), else a slice's chunks (its mask is built
    for this call and dropped after it).  ``whole_bands``: a banded slice, which
    gathers nothing, as one job."""
    jobs = []
    for sl, chunks in _slices(plan, device):
        if whole_bands and sl.band is not None:
            chunks = [(0, plan.nb, 0, len(sl.qblocks))]
        jobs += [(sl, *c) for c in chunks]
        if not _cacheable(plan.p):
            yield jobs
            jobs = []
    if jobs:
        yield jobs


class _BlockSparseAttention(torch.autograd.Function):
    """Block-sparse attention over ``[nb, M, b, D]`` blocks (k, v: ``[nb_kv, M, b, D]``).

    Each chunk is one attention over ``[R, c]`` query blocks of ``b`` rows against their
    ``n * b`` keys with the slice's additive mask.  Forward: on the CPU one call of
    PyTorch's flash kernel, elsewhere the same math in a few batched operations.
    Backward: the flash kernel's for float16/bfloat16, the math (recomputed softmax)
    for float32/float64, see :func:`_flash_kernel`.  dk/dv are scattered into one
    buffer, so memory stays O(L) beyond inputs and outputs.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, need_lse: bool, q, k, v):
        flash = _flash_kernel(q.device)
        threads = _chunk_threads(q.device)
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        lse = q.new_empty(q.shape[:3], dtype=_compute_dtype(q.dtype))
        # Rows that see no key: the kernel leaves their LSE finite; the API says -inf.
        public = torch.empty_like(lse, dtype=torch.float32) if need_lse else lse.new_empty(0)

        def attend(sl, b0, b1, i0, i1):
            kg, vg, _, bias = sl.gather(k, v, b0, b1, i0, i1)
            qc = sl.rows(q, b0, b1, i0, i1)
            dead = sl.of_chunk(sl.dead, b0, b1, i0, i1)
            if flash:
                o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    qc, kg, vg, attn_mask=bias, scale=plan.p.scale)
            else:
                o, l = _math_attend(qc, kg, vg, bias, dead, plan.p.scale)
            sl.put(out, b0, b1, i0, i1, o)
            sl.put(lse, b0, b1, i0, i1, l.to(lse.dtype))
            if need_lse:
                sl.put(public, b0, b1, i0, i1, l.masked_fill(dead.squeeze(-1), float("-inf")).float())

        for jobs in _jobs(plan, q.device, whole_bands=threads == 1):
            _each(threads, jobs, attend)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(public)
        return out, public

    @staticmethod
    def backward(ctx, dout, _dlse):
        plan = ctx.plan
        q, k, v, out, lse = ctx.saved_tensors
        flash = _flash_kernel(q.device) and q.dtype in (torch.float16, torch.bfloat16)
        threads = _chunk_threads(q.device)
        acc = _compute_dtype(q.dtype)
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        b = k.shape[2]
        # Blocks along dim 1 of [1, blocks, b*D]: PyTorch's CPU index_add_ along dim 0
        # takes a parallel path that is ~50x slower with 2 threads than with 1.
        dk_rows, dv_rows = dk.view(1, -1, b * k.shape[-1]), dv.view(1, -1, b * v.shape[-1])
        delta = None if flash else (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)

        def grads(sl, b0, b1, i0, i1):
            kg, vg, dest, bias = sl.gather(k, v, b0, b1, i0, i1)
            qc, doc = sl.rows(q, b0, b1, i0, i1), sl.rows(dout, b0, b1, i0, i1)
            if flash:
                dqc, dkg, dvg = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    doc, qc, kg, vg, sl.rows(out, b0, b1, i0, i1), sl.rows(lse, b0, b1, i0, i1),
                    0.0, False, attn_mask=bias, scale=plan.p.scale)
            else:
                dqc, dkg, dvg = _math_backward(qc, kg, vg, bias, sl.of_chunk(sl.dead, b0, b1, i0, i1),
                                               doc, sl.rows(delta, b0, b1, i0, i1), plan.p.scale)
            sl.put(dq, b0, b1, i0, i1, dqc)
            return dest, dkg, dvg

        def scatter(dest, dkg, dvg):
            dk_rows.index_add_(1, dest, dkg.reshape(1, -1, dk_rows.shape[-1]).to(acc))
            dv_rows.index_add_(1, dest, dvg.reshape(1, -1, dv_rows.shape[-1]).to(acc))

        for jobs in _jobs(plan, q.device, whole_bands=False):
            _each(threads, jobs, grads, scatter)
        return None, None, dq, dk.to(k.dtype), dv.to(v.dtype)


def _chunk_threads(device: torch.device) -> int:
    """How many Python threads run the chunks of a slice: the intra-op thread count on
    the CPU; one while tracing (torch.compile sees plain operations), elsewhere (a GPU
    parallelises each operation), and under grad mode (a double backward records its
    graph on the calling thread)."""
    if device.type != "cpu" or torch.compiler.is_compiling() or torch.is_grad_enabled():
        return 1
    return torch.get_num_threads()


def _each(threads: int, jobs: list[tuple], work, reduce=None) -> None:
    """``work(*job)`` for every job, on ``threads`` threads that each take the next job
    from a shared queue and run with one intra-op thread; ``reduce(*result)`` is called
    in job order whichever thread finished first, so sums are the same in every run.

    OpenMP thread counts are per thread; PyTorch's ``set_num_threads`` also sets the
    count that threads it has not seen yet start with (and MKL's), which the caller's
    own count restores afterwards.
    """
    threads = min(threads, len(jobs))
    if threads <= 1:
        for job in jobs:
            result = work(*job)
            if reduce is not None:
                reduce(*result)
        return
    caller = torch.get_num_threads()
    inference = torch.is_inference_mode_enabled()
    # A job starts only within threads + 1 of the oldest one not yet reduced: a
    # descheduled thread then holds back at most ``threads`` finished results (memory),
    # not the whole call's.
    window = len(jobs) if reduce is None else threads + 1
    state = dict(next=0, reduced=0, error=None)
    results, turn = {}, threading.Condition()

    def worker():
        torch.set_num_threads(1)
        try:
            with torch.inference_mode(inference), torch.no_grad():
                while True:
                    with turn:
                        turn.wait_for(lambda: state["error"] is not None or state["next"] >= len(jobs)
                                      or state["next"] < state["reduced"] + window)
                        i = state["next"]
                        if state["error"] is not None or i >= len(jobs):
                            return
                        state["next"] += 1
                    result = work(*jobs[i])
                    if reduce is None:
                        continue
                    with turn:
                        results[i] = result
                        while state["reduced"] in results:
                            reduce(*results.pop(state["reduced"]))
                            state["reduced"] += 1
                        turn.notify_all()
        except BaseException as e:  # raised again on the calling thread
            with turn:
                state["error"] = e
                turn.notify_all()

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    torch.set_num_threads(caller)
    if state["error"] is not None:
        raise state["error"]


def _flash_kernel(device: torch.device) -> bool:
    """Whether PyTorch's CPU flash kernel (with an additive mask) runs the chunks;
    elsewhere the same math runs as batched operations.  Its backward serves float16
    and bfloat16 only: in float32 its gradients err up to 9x more than plain
    float32 math on sharp softmaxes (its fast exp), against at most 1.3x for the math."""
    return device.type == "cpu"


def _math_probs(q, kg, bias, dead, scale):
    """Softmax of the masked scores in the compute dtype; rows that see no key see every
    slot instead (finite) and are zeroed by the caller."""
    acc = bias.dtype
    s = torch.matmul(q.to(acc), kg.to(acc).transpose(-1, -2)).mul_(scale).add_(bias)
    return torch.softmax(s.masked_fill_(dead, 0.0), -1), s


def _math_attend(q, kg, vg, bias, dead, scale):
    probs, s = _math_probs(q, kg, bias, dead, scale)
    out = (probs @ vg.to(bias.dtype)).masked_fill_(dead, 0.0)
    return out.to(q.dtype), torch.logsumexp(s, -1)


def _math_backward(q, kg, vg, bias, dead, dout, delta, scale):
    acc = bias.dtype
    probs, _ = _math_probs(q, kg, bias, dead, scale)
    do = dout.to(acc).masked_fill(dead, 0.0)
    dv = probs.transpose(-1, -2) @ do
    ds = (do @ vg.to(acc).transpose(-1, -2)).sub_(delta).mul_(probs)
    return (ds @ kg.to(acc)).mul_(scale).to(q.dtype), (ds.transpose(-1, -2) @ q.to(acc)).mul_(scale), dv


BACKEND = TorchBackend()
