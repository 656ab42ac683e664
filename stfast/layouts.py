"""Block-sparse layouts: which key blocks each query block attends to.

A :class:`BlockLayout` stores a per-head (or shared) ``[H|1, Mq, Mk]`` block type
(0 skipped, 1 full, 2 partial) and, for partial blocks, a deduplicated stack of
``[block, block]`` element masks.  Memory is O(number of blocks), never O(L^2).
"""

from __future__ import annotations

import math

import torch

from .lowering import LoweredLayout

SKIP, FULL, PARTIAL = 0, 1, 2


class BlockLayout:
    """A block schedule over ``seq_len_q x seq_len_k`` with square ``block`` tiles.

    Args:
        block_type: ``[Mq, Mk]`` or ``[H, Mq, Mk]`` integer (0/1/2) or bool tensor.
        block: tile size in tokens.
        seq_len_q, seq_len_k: sequence lengths (``seq_len_k`` defaults to ``seq_len_q``).
        partial_masks: ``[P, block, block]`` bool element masks of the partial blocks.
        partial_index: ``[H|1, Mq, Mk]`` int row into ``partial_masks`` (-1 elsewhere).
    """

    def __init__(self, block_type: torch.Tensor, *, block: int, seq_len_q: int,
                 seq_len_k: int | None = None, partial_masks: torch.Tensor | None = None,
                 partial_index: torch.Tensor | None = None):
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        seq_len_k = seq_len_q if seq_len_k is None else seq_len_k
        if seq_len_q < 1 or seq_len_k < 1:
            raise ValueError(f"seq_len_q and seq_len_k must be >= 1, got {seq_len_q} and {seq_len_k}")
        block_type = torch.as_tensor(block_type).cpu()
        if block_type.dim() == 2:
            block_type = block_type.unsqueeze(0)
        mq, mk = math.ceil(seq_len_q / block), math.ceil(seq_len_k / block)
        if block_type.dim() != 3 or tuple(block_type.shape[1:]) != (mq, mk):
            raise ValueError(
                f"block_type must have shape [H|1, {mq}, {mk}] for seq_len_q={seq_len_q}, "
                f"seq_len_k={seq_len_k}, block={block}; got {tuple(block_type.shape)}")
        block_type = block_type.to(torch.int8)
        if ((block_type < SKIP) | (block_type > PARTIAL)).any():
            raise ValueError("block_type values must be 0 (skip), 1 (full) or 2 (partial)")
        if partial_masks is None:
            partial_masks = torch.zeros(0, block, block, dtype=torch.bool)
            partial_index = torch.full(block_type.shape, -1, dtype=torch.int32)
        if partial_index is None:
            raise ValueError("partial_index is required when partial_masks is given")
        partial_masks = torch.as_tensor(partial_masks).cpu().to(torch.bool)
        partial_index = torch.as_tensor(partial_index).cpu().to(torch.int32).expand(block_type.shape)
        if partial_masks.dim() != 3 or tuple(partial_masks.shape[1:]) != (block, block):
            raise ValueError(f"partial_masks must have shape [P, {block}, {block}], "
                             f"got {tuple(partial_masks.shape)}")
        is_partial = block_type == PARTIAL
        bad = is_partial & ((partial_index < 0) | (partial_index >= partial_masks.shape[0]))
        if bad.any():
            raise ValueError("every partial block needs a partial_index into partial_masks")
        self.block = block
        self.seq_len_q = seq_len_q
        self.seq_len_k = seq_len_k
        self.block_type = block_type.contiguous()
        self.partial_index = torch.where(is_partial, partial_index, -1).contiguous()
        self.partial_masks = partial_masks.contiguous()
        active = self.block_type > 0
        self.max_kv = int(active.sum(-1).max())
        self.max_q = int(active.sum(-2).max())
        self._lowered: dict = {}

    @property
    def num_heads(self) -> int:
        """1 when the pattern is shared by all heads."""
        return self.block_type.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.block_type.shape)

    @property
    def density(self) -> float:
        """Fraction of the blocks that are computed (the work a kernel does)."""
        return float((self.block_type > 0).float().mean())

    def visible_pairs(self) -> int:
        """Exact number of (query, key) pairs visible, summed over layout heads."""
        b = self.block
        mq, mk = self.block_type.shape[1:]
        rows = torch.full((mq,), b)
        rows[-1] = self.seq_len_q - b * (mq - 1)
        cols = torch.full((mk,), b)
        cols[-1] = self.seq_len_k - b * (mk - 1)
        full = ((self.block_type == FULL).long() * rows[:, None] * cols[None, :]).sum()
        idx = self.partial_index[self.block_type == PARTIAL].long()
        hi, qi, ki = torch.nonzero(self.block_type == PARTIAL, as_tuple=True)
        m = self.partial_masks[idx]
        r = torch.arange(b)
        inside = (r[None, :, None] < rows[qi][:, None, None]) & (r[None, None, :] < cols[ki][:, None, None])
        return int(full + (m & inside).sum())

    def to_dense_mask(self) -> torch.Tensor:
        """The element mask ``[H|1, seq_len_q, seq_len_k]`` (bool).  O(L^2): for tests
        and pictures, never used on a kernel path."""
        h, mq, mk = self.block_type.shape
        b = self.block
        full = (self.block_type == FULL)[:, :, None, :, None].expand(h, mq, b, mk, b)
        pm = torch.cat([self.partial_masks, torch.zeros(1, b, b, dtype=torch.bool)])
        part = pm[self.partial_index.long()]  # index -1 picks the appended all-False mask
        part = part.permute(0, 1, 3, 2, 4)
        dense = (full | part).reshape(h, mq * b, mk * b)
        return dense[:, :self.seq_len_q, :self.seq_len_k].contiguous()

    def lowered(self, device, head_strides: tuple[int, int, int]) -> LoweredLayout:
        """The schedule tables on ``device`` for a problem whose batch element
        ``(b0, b1, b2)`` uses layout head ``sum(b_i * head_strides[i])``."""
        device = torch.device(device)
        key = (str(device), tuple(head_strides))
        if key not in self._lowered:
            self._lowered[key] = LoweredLayout.build(
                self.block, self.block_type.to(device), self.partial_index.to(device),
                self.partial_masks.to(device), tuple(head_strides), self.max_kv, self.max_q)
        return self._lowered[key]

    def __repr__(self) -> str:
        return (f"BlockLayout(heads={self.num_heads}, seq_len_q={self.seq_len_q}, "
                f"seq_len_k={self.seq_len_k}, block={self.block}, density={self.density:.3f}, "
                f"partial_blocks={int((self.block_type == PARTIAL).sum())})")


def from_mask(mask: torch.Tensor, block: int = 64) -> BlockLayout:
    """Element mask ``[Lq, Lk]`` or ``[H, Lq, Lk]`` (bool, True = attend) -> layout.

    Blocks with every in-range element visible are full, blocks with some are
    partial (their element masks deduplicated), the rest are skipped.
    """
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise ValueError(f"mask must have shape [Lq, Lk] or [H, Lq, Lk], got {tuple(mask.shape)}")
    mask = mask.cpu()
    h, lq, lk = mask.shape
    mq, mk = math.ceil(lq / block), math.ceil(lk / block)
    padded_any = torch.zeros(h, mq * block, mk * block, dtype=torch.bool)
    padded_any[:, :lq, :lk] = mask
    inside = torch.zeros(mq * block, mk * block, dtype=torch.bool)
    inside[:lq, :lk] = True
    blocks = padded_any.view(h, mq, block, mk, block).permute(0, 1, 3, 2, 4)
    inside_blocks = inside.view(mq, block, mk, block).permute(0, 2, 1, 3)
    any_ = blocks.any(-1).any(-1)
    all_ = (blocks | ~inside_blocks).all(-1).all(-1)
    block_type = torch.where(all_ & any_, FULL, torch.where(any_, PARTIAL, SKIP)).to(torch.int8)
    is_partial = block_type == PARTIAL
    partial_index = torch.full(block_type.shape, -1, dtype=torch.int32)
    if is_partial.any():
        stack = blocks[is_partial].reshape(-1, block * block)
        unique, inverse = torch.unique(stack, dim=0, return_inverse=True)
        partial_masks = unique.view(-1, block, block)
        partial_index[is_partial] = inverse.to(torch.int32)
    else:
        partial_masks = torch.zeros(0, block, block, dtype=torch.bool)
    return BlockLayout(block_type, block=block, seq_len_q=lq, seq_len_k=lk,
                       partial_masks=partial_masks, partial_index=partial_index)
