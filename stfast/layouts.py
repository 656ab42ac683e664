"""Block-sparse layouts: which key blocks each query block attends to.

A :class:`BlockLayout` stores a per-head (or shared) ``[H|1, Mq, Mk]`` block type
(0 skipped, 1 full, 2 partial) and, for partial blocks, a deduplicated stack of
``[block, block]`` element masks.  Memory is O(number of blocks), never O(L^2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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

    A layout is immutable: it keeps its own copies of the tensors, and
    ``block_type``, ``partial_index`` and ``partial_masks`` return fresh copies, so
    editing one never changes the layout (its cached device tables could not follow).
    To change a pattern, build a new ``BlockLayout`` from the edited copies.
    """

    def __init__(self, block_type: torch.Tensor, *, block: int, seq_len_q: int,
                 seq_len_k: int | None = None, partial_masks: torch.Tensor | None = None,
                 partial_index: torch.Tensor | None = None):
        if isinstance(block, bool) or not isinstance(block, int):
            raise TypeError(f"block must be a positive int, got {block!r} of type {type(block).__name__}")
        if block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        seq_len_k = seq_len_q if seq_len_k is None else seq_len_k
        _check_int("seq_len_q", seq_len_q, 1)
        _check_int("seq_len_k", seq_len_k, 1)
        block_type = _as_tensor("block_type", block_type)
        if block_type.dtype.is_complex:
            raise TypeError(f"block_type must be an integer or bool tensor, got {block_type.dtype}")
        if block_type.dim() == 2:
            block_type = block_type.unsqueeze(0)
        mq, mk = math.ceil(seq_len_q / block), math.ceil(seq_len_k / block)
        if block_type.dim() != 3 or tuple(block_type.shape[1:]) != (mq, mk) or block_type.shape[0] < 1:
            raise ValueError(
                f"block_type must have shape [H|1, {mq}, {mk}] for seq_len_q={seq_len_q}, "
                f"seq_len_k={seq_len_k}, block={block}; got {tuple(block_type.shape)}")
        # Check the values before the int8 cast: 257 would wrap to 1 and 1.9 truncate to 1.
        bad = (block_type != block_type.round()) | (block_type < SKIP) | (block_type > PARTIAL) \
            if block_type.dtype != torch.bool else torch.zeros((), dtype=torch.bool)
        if bad.any():
            where = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(f"block_type values must be 0 (skip), 1 (full) or 2 (partial), got "
                             f"{block_type[tuple(where)].item()!r} at {where}")
        block_type = block_type.to(torch.int8)
        if partial_masks is None:
            if partial_index is not None:
                raise ValueError("partial_masks is required when partial_index is given")
            partial_masks = torch.zeros(0, block, block, dtype=torch.bool)
            partial_index = torch.full(block_type.shape, -1, dtype=torch.int32)
        if partial_index is None:
            raise ValueError("partial_index is required when partial_masks is given")
        partial_masks = _as_tensor("partial_masks", partial_masks)
        if partial_masks.dtype != torch.bool:
            raise TypeError(f"partial_masks must be a bool tensor (True = attend), got {partial_masks.dtype}")
        if partial_masks.dim() != 3 or tuple(partial_masks.shape[1:]) != (block, block):
            raise ValueError(f"partial_masks must have shape [P, {block}, {block}], "
                             f"got {tuple(partial_masks.shape)}")
        partial_index = _as_tensor("partial_index", partial_index)
        if partial_index.dtype.is_floating_point or partial_index.dtype.is_complex \
                or partial_index.dtype == torch.bool:
            raise TypeError(f"partial_index must be an integer tensor, got {partial_index.dtype}")
        try:
            partial_index = partial_index.expand(block_type.shape)
        except RuntimeError:
            raise ValueError(f"partial_index must be broadcastable to block_type's shape "
                             f"{list(block_type.shape)}, got {list(partial_index.shape)}") from None
        is_partial = block_type == PARTIAL
        bad = is_partial & ((partial_index < 0) | (partial_index >= partial_masks.shape[0]))
        if bad.any():
            raise ValueError("every partial block needs a partial_index into partial_masks")
        self.block = block
        self.seq_len_q = seq_len_q
        self.seq_len_k = seq_len_k
        # Own copies, never the caller's memory: the lowered tables cached below must
        # stay true to them.
        self._block_type = block_type.clone().contiguous()
        self._partial_index = torch.where(is_partial, partial_index, -1).to(torch.int32).contiguous()
        self._partial_masks = partial_masks.clone().contiguous()
        active = self._block_type > 0
        self.row_counts = tuple(active.sum(-1).amax(0).tolist())
        self._lowered: dict = {}

    @property
    def block_type(self) -> torch.Tensor:
        """``[H|1, Mq, Mk]`` int8: 0 skipped, 1 full, 2 partial (a copy)."""
        return self._block_type.clone()

    @property
    def partial_index(self) -> torch.Tensor:
        """``[H|1, Mq, Mk]`` int32 row into :attr:`partial_masks`, -1 elsewhere (a copy)."""
        return self._partial_index.clone()

    @property
    def partial_masks(self) -> torch.Tensor:
        """``[P, block, block]`` bool element masks of the partial blocks (a copy)."""
        return self._partial_masks.clone()

    @property
    def num_heads(self) -> int:
        """1 when the pattern is shared by all heads."""
        return self._block_type.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._block_type.shape)

    @property
    def density(self) -> float:
        """Fraction of the blocks that are computed (the work a kernel does)."""
        return float((self._block_type > 0).float().mean())

    def visible_pairs(self) -> int:
        """Exact number of (query, key) pairs visible, summed over layout heads."""
        b = self.block
        mq, mk = self._block_type.shape[1:]
        rows = torch.full((mq,), b)
        rows[-1] = self.seq_len_q - b * (mq - 1)
        cols = torch.full((mk,), b)
        cols[-1] = self.seq_len_k - b * (mk - 1)
        full = ((self._block_type == FULL).long() * rows[:, None] * cols[None, :]).sum()
        hi, qi, ki = torch.nonzero(self._block_type == PARTIAL, as_tuple=True)
        # 2-D prefix sums per distinct mask: a block's count is one lookup, so the cost is
        # O(partial blocks + distinct masks * block^2), not O(partial blocks * block^2).
        counts = F.pad(self._partial_masks.long().cumsum(1).cumsum(2), (1, 0, 1, 0))
        idx = self._partial_index[hi, qi, ki].long()
        return int(full + counts[idx, rows[qi], cols[ki]].sum())

    def to_dense_mask(self) -> torch.Tensor:
        """The element mask ``[H|1, seq_len_q, seq_len_k]`` (bool).  O(L^2): for tests
        and pictures, never used on a kernel path."""
        h, mq, mk = self._block_type.shape
        b = self.block
        full = (self._block_type == FULL)[:, :, None, :, None].expand(h, mq, b, mk, b)
        pm = torch.cat([self._partial_masks, torch.zeros(1, b, b, dtype=torch.bool)])
        part = pm[self._partial_index.long()]  # index -1 picks the appended all-False mask
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
                self.block, self._block_type.to(device), self._partial_index.to(device),
                self._partial_masks.to(device), tuple(head_strides), self.row_counts)
        return self._lowered[key]

    def picture(self, path=None, head: int = 0, max_size: int = 64) -> str:
        """A text picture of one head's block pattern: rows are query blocks, columns key
        blocks; ``█`` full, ``▒`` partial, ``·`` skipped.

        A layout wider or taller than ``max_size`` blocks is shown at reduced
        resolution: each character stands for ``f x f`` blocks (said in the header) and
        is ``█`` if all of them are full, ``·`` if all are skipped, ``▒`` otherwise.
        With ``path``, also writes the full-resolution pattern as a PNG (needs matplotlib).
        """
        _check_int("head", head, 0)
        if head >= self.num_heads:
            raise ValueError(f"head must be in [0, {self.num_heads - 1}] for a layout with "
                             f"{self.num_heads} head(s), got {head}")
        _check_int("max_size", max_size, 1)
        grid = self._block_type[head]
        mq, mk = grid.shape
        f = math.ceil(max(mq, mk) / max_size)
        rq, rk = math.ceil(mq / f), math.ceil(mk / f)
        # Pad to whole f x f cells with a marker (3) that counts as neither full nor skipped.
        cells = F.pad(grid.to(torch.int64), (0, rk * f - mk, 0, rq * f - mq), value=3)
        cells = cells.view(rq, f, rk, f).transpose(1, 2).reshape(rq, rk, f * f)
        present = cells != 3
        all_full = ((cells == FULL) | ~present).all(-1)
        all_skip = ((cells == SKIP) | ~present).all(-1)
        chars = [["█" if fu else "·" if sk else "▒" for fu, sk in zip(fr, sr)]
                 for fr, sr in zip(all_full.tolist(), all_skip.tolist())]
        header = f"{self!r}, head {head}"
        if f > 1:
            header += f"; 1 character = {f}x{f} blocks"
        text = "\n".join([header] + ["".join(row) for row in chars])
        if path is not None:
            self._write_png(path, head)
        return text

    def _write_png(self, path, head: int) -> None:
        try:
            from matplotlib.colors import ListedColormap
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("BlockLayout.picture(path=...) needs matplotlib to write a PNG; "
                              "install it with `pip install matplotlib` (or stfast[plot])") from exc
        grid = self._block_type[head].numpy()
        fig = Figure(figsize=(6, 6 * grid.shape[0] / max(grid.shape[1], 1) + 0.5))
        ax = fig.subplots()
        # Figure, not pyplot: no global state, no display backend needed.
        ax.imshow(grid, cmap=ListedColormap(["white", "#1f3b73", "#8fb3e8"]), vmin=0, vmax=2,
                  interpolation="nearest")
        ax.set_xlabel(f"key block (block = {self.block} tokens)")
        ax.set_ylabel("query block")
        ax.set_title(f"density {self.density:.3f}: dark full, light partial, white skipped")
        fig.savefig(path, dpi=100, bbox_inches="tight")

    def __str__(self) -> str:
        return self.picture()

    def to_flex_block_mask(self, device=None):
        """The same pattern as a ``torch.nn.attention.flex_attention.BlockMask``
        (``B = 1``, ``H`` = layout heads, ``BLOCK_SIZE = block``).

        Its ``mask_mod`` looks the element up in this layout's tables, so it is exact on
        every block, and FlexAttention only calls it on the partial ones.
        """
        from torch.nn.attention.flex_attention import BlockMask

        device = torch.device("cpu") if device is None else torch.device(device)
        b = self.block
        bt = self._block_type.to(device)
        pidx = self._partial_index.to(device)
        masks = self._partial_masks.to(device)
        if masks.shape[0] == 0:
            masks = torch.zeros(1, b, b, dtype=torch.bool, device=device)
        shared = self.num_heads == 1

        def mask_mod(batch, h, q_idx, kv_idx):
            head = h * 0 if shared else h
            qb, kb = q_idx // b, kv_idx // b
            kind = bt[head, qb, kb]
            elem = masks[pidx[head, qb, kb].clamp(min=0), q_idx % b, kv_idx % b]
            return (kind == FULL) | ((kind == PARTIAL) & elem)

        def ordered(select):
            counts = select.sum(-1, dtype=torch.int32)
            order = torch.sort((~select).to(torch.int8), dim=-1, stable=True).indices
            return counts[None].contiguous(), order.to(torch.int32)[None].contiguous()

        kv_num, kv_idx = ordered(bt == PARTIAL)
        full_num, full_idx = ordered(bt == FULL)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=b,
                                        mask_mod=mask_mod,
                                        seq_lengths=(self.seq_len_q, self.seq_len_k))

    def __repr__(self) -> str:
        return (f"BlockLayout(heads={self.num_heads}, seq_len_q={self.seq_len_q}, "
                f"seq_len_k={self.seq_len_k}, block={self.block}, density={self.density:.3f}, "
                f"partial_blocks={int((self._block_type == PARTIAL).sum())})")


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
    _check_int("block", block, 1)
    mask = mask.cpu()
    h, lq, lk = mask.shape
    if lq < 1 or lk < 1:
        raise ValueError(f"mask must have at least one query and one key, got shape {tuple(mask.shape)}")
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


# Element masks evaluated per batch when deciding partial blocks (bounds temporary memory).
_EVAL_ELEMENTS = 1 << 22


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} "
                        f"of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _as_tensor(name: str, value) -> torch.Tensor:
    try:
        return torch.as_tensor(value).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}") from None


def _check_triple(name: str, value, minimum: int) -> tuple[int, int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{name} must be a tuple of 3 ints, got {value!r}")
    for axis, v in zip("012", value):
        _check_int(f"{name}[{axis}]", v, minimum)
    return tuple(value)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")


def _resolve(block: int, seq_len_q: int, seq_len_k: int, block_type: torch.Tensor,
             undecided: torch.Tensor, keys: torch.Tensor, visible) -> BlockLayout:
    """Finish a layout whose full and skipped blocks are known except ``undecided`` ones.

    ``block_type`` ``[H, Mq, Mk]`` holds the known types.  Each undecided block (in
    ``undecided.nonzero()`` order) has an int64 key; blocks with equal keys must have
    equal element masks, so one representative per key is evaluated with
    ``visible(head [r], q_pos [r, block], k_pos [r, block]) -> bool [r, block, block]``
    (positions run past the sequence ends; those elements are never read).  A block is
    then full if every in-range element is visible, skipped if none is, partial
    otherwise, exactly as :func:`from_mask` decides; partial masks are deduplicated.
    """
    b = block
    mq, mk = block_type.shape[1:]
    hs, qs, ks = undecided.nonzero(as_tuple=True)
    n = hs.numel()
    partial_index = torch.full(block_type.shape, -1, dtype=torch.int32)
    partial_masks = torch.zeros(0, b, b, dtype=torch.bool)
    if n:
        # The last block row/column sees fewer in-range elements: keep its type separate.
        edge = (qs == mq - 1).long() * 2 + (ks == mk - 1).long()
        inverse = _group(keys.long() * 4 + edge, 4 * block_type.numel())
        reps = torch.empty(int(inverse.max()) + 1, dtype=torch.long)
        reps[inverse] = torch.arange(n)  # any member of a group represents it
        ar = torch.arange(b)
        per = max(1, _EVAL_ELEMENTS // (b * b))
        types, found = [], []
        for s in range(0, reps.numel(), per):
            r = reps[s:s + per]
            q_pos = qs[r, None] * b + ar
            k_pos = ks[r, None] * b + ar
            m = visible(hs[r], q_pos, k_pos).to(torch.bool).cpu()
            inside = (q_pos < seq_len_q)[:, :, None] & (k_pos < seq_len_k)[:, None, :]
            any_ = (m & inside).flatten(1).any(1)
            all_ = (m | ~inside).flatten(1).all(1)
            t = torch.where(all_, FULL, torch.where(any_, PARTIAL, SKIP))
            types.append(t)
            found.append(m[t == PARTIAL])
        rep_type = torch.cat(types).to(torch.int8)
        rep_index = torch.full(rep_type.shape, -1, dtype=torch.int32)
        found = torch.cat(found)
        if found.shape[0]:
            unique, which = torch.unique(found.flatten(1), dim=0, return_inverse=True)
            partial_masks = unique.view(-1, b, b)
            rep_index[rep_type == PARTIAL] = which.to(torch.int32)
        block_type = block_type.clone()
        block_type[hs, qs, ks] = rep_type[inverse]
        partial_index[hs, qs, ks] = rep_index[inverse]
    return BlockLayout(block_type, block=b, seq_len_q=seq_len_q, seq_len_k=seq_len_k,
                       partial_masks=partial_masks, partial_index=partial_index)


def _group(keys: torch.Tensor, table_limit: int) -> torch.Tensor:
    """Dense group ids ``0..U-1`` of int64 ``keys`` (equal keys, equal ids)."""
    lo = keys.min()
    span = int(keys.max() - lo) + 1
    if span > table_limit:
        return torch.unique(keys, return_inverse=True)[1]
    # Keys in a small range: a lookup table is O(n) where sorting is O(n log n).
    seen = torch.zeros(span, dtype=torch.bool)
    seen[keys - lo] = True
    return (seen.cumsum(0) - 1)[keys - lo]


def _block_grid(mq: int, mk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(mq)[:, None], torch.arange(mk)[None, :]


def _diagonal_band(seq_len: int, block: int, lo: int, hi: int, stripes=None) -> BlockLayout:
    """Layout of ``lo <= j - i <= hi``, or of ``stripes(j - i)`` where that is true.

    Both depend on ``j - i`` only, so a block's element mask depends only on its block
    offset ``J - I``: one mask per offset is evaluated.  ``stripes`` is
    ``(fn, reach)``: ``fn(diff) -> bool`` is false wherever ``diff > reach``.
    """
    m = math.ceil(seq_len / block)
    qi, ki = _block_grid(m, m)
    d = ki - qi
    # j - i over block (I, J) spans [d*b - (b-1), d*b + (b-1)].
    dmin, dmax = d * block - (block - 1), d * block + (block - 1)
    inside = (dmin >= lo) & (dmax <= hi)
    if stripes is None:
        undecided = ~inside & (dmax >= lo) & (dmin <= hi)
    else:
        undecided = ~inside & (dmin <= max(hi, stripes[1]))
    block_type = torch.where(inside, FULL, SKIP).to(torch.int8)[None]
    undecided = undecided[None]
    _, qs, ks = undecided.nonzero(as_tuple=True)

    def visible(_, q_pos, k_pos):
        diff = k_pos[:, None, :] - q_pos[:, :, None]
        vis = (diff >= lo) & (diff <= hi)
        return vis if stripes is None else vis | stripes[0](diff)

    return _resolve(block, seq_len, seq_len, block_type, undecided, ks - qs, visible)


def causal(seq_len: int, block: int = 64) -> BlockLayout:
    """Causal attention: query ``i`` sees keys ``j <= i``.

    Blocks below the diagonal are full, above skipped; diagonal blocks are partial and
    share one triangular mask.
    """
    _check_int("seq_len", seq_len, 1)
    _check_int("block", block, 1)
    return _diagonal_band(seq_len, block, -seq_len, 0)


def local(seq_len: int, window: int, block: int = 64, causal: bool = False) -> BlockLayout:
    """Sliding-window attention: query ``i`` sees keys ``j`` with ``|i - j| <= window``
    (``causal=True``: ``i - window <= j <= i``).

    Blocks at the window edges are partial; their masks depend only on the block
    offset, so each distinct one is stored once.
    """
    _check_int("seq_len", seq_len, 1)
    _check_int("window", window, 0)
    _check_int("block", block, 1)
    _check_bool("causal", causal)
    return _diagonal_band(seq_len, block, -window, 0 if causal else window)


def strided(seq_len: int, stride: int, block: int = 64, causal: bool = False) -> BlockLayout:
    """The Sparse Transformer *strided* pattern (Child et al., 2019), both heads' sets
    combined: query ``i`` sees key ``j`` when ``|i - j| < stride`` (the local band) or
    ``(i - j) % stride == 0`` (every ``stride``-th token, at any distance).
    ``causal=True`` keeps only ``j <= i``.

    Block masks depend only on the block offset: at most one mask per offset.  With
    ``stride <= block`` every key block holds a strided key, so the density is 1.
    """
    _check_int("seq_len", seq_len, 1)
    _check_int("stride", stride, 1)
    _check_int("block", block, 1)
    _check_bool("causal", causal)
    hi = 0 if causal else stride - 1

    def every_stride(diff):
        on = diff % stride == 0
        return on & (diff <= 0) if causal else on

    return _diagonal_band(seq_len, block, -(stride - 1), hi,
                          stripes=(every_stride, 0 if causal else seq_len))


def frame_causal(num_frames: int, tokens_per_frame: int, block: int = 64) -> BlockLayout:
    """Frame-causal joint spatio-temporal attention over ``num_frames * tokens_per_frame``
    tokens in frame-major order: a token of frame ``f`` sees every token of frames
    ``<= f`` (``j // N <= i // N`` with ``N = tokens_per_frame``).

    Blocks that straddle a frame boundary are partial.
    """
    _check_int("num_frames", num_frames, 1)
    _check_int("tokens_per_frame", tokens_per_frame, 1)
    _check_int("block", block, 1)
    n = tokens_per_frame
    seq_len = num_frames * n
    m = math.ceil(seq_len / block)
    qi, ki = _block_grid(m, m)
    # Query i sees keys j < end(i) = (i // N + 1) * N; over query block I, end() grows
    # from end(I*b) to end(I*b + b - 1).
    end_lo = (qi * block // n + 1) * n
    end_hi = ((qi * block + block - 1) // n + 1) * n
    first_key, last_key = ki * block, ki * block + block - 1
    full = last_key < end_lo
    skip = first_key >= end_hi
    block_type = torch.where(full, FULL, SKIP).to(torch.int8)[None]
    undecided = (~full & ~skip)[None]
    _, qs, ks = undecided.nonzero(as_tuple=True)

    def visible(_, q_pos, k_pos):
        return (k_pos[:, None, :] // n) <= (q_pos[:, :, None] // n)

    return _resolve(block, seq_len, seq_len, block_type, undecided, qs * m + ks, visible)


def bigbird(seq_len: int, *, num_global: int, num_window: int, num_random: int,
            block: int = 64, seed: int = 0) -> BlockLayout:
    """Block-level BigBird (Zaheer et al., 2020), all blocks full.

    With ``M = ceil(seq_len / block)`` blocks, query block ``I`` attends key block ``J``
    when any of:

    * global: ``I < num_global`` or ``J < num_global`` (the first blocks attend and are
      attended by everything);
    * window: ``I - (num_window - 1) // 2 <= J <= I + num_window // 2`` (``num_window``
      blocks around the diagonal; 3 gives ``|I - J| <= 1``);
    * random: each query block picks ``num_random`` further key blocks
      uniformly among those not already attended (all of them if fewer remain),
      drawn from ``torch.Generator().manual_seed(seed)``: the same seed always gives
      the same layout.
    """
    _check_int("seq_len", seq_len, 1)
    _check_int("num_global", num_global, 0)
    _check_int("num_window", num_window, 0)
    _check_int("num_random", num_random, 0)
    _check_int("block", block, 1)
    _check_int("seed", seed, 0)
    m = math.ceil(seq_len / block)
    qi, ki = _block_grid(m, m)
    glob = (qi < num_global) | (ki < num_global)
    window = (ki >= qi - (num_window - 1) // 2) & (ki <= qi + num_window // 2) & (num_window > 0)
    active = glob | window
    if num_random:
        gen = torch.Generator().manual_seed(seed)
        # Taken blocks sort last (2 > any uniform draw); the k smallest draws per row
        # are a uniform random subset of the free ones.
        draws = torch.rand(m, m, generator=gen).masked_fill(active, 2.0)
        k = min(num_random, m)
        value, pick = draws.topk(k, dim=1, largest=False)
        chosen = torch.zeros(m, m, dtype=torch.bool)
        chosen.scatter_(1, pick, value < 2.0)
        active = active | chosen
    block_type = torch.where(active, FULL, SKIP).to(torch.int8)
    return BlockLayout(block_type, block=block, seq_len_q=seq_len)


def sliding_tile_3d_order(grid, tile) -> torch.Tensor:
    """Token permutation for :func:`sliding_tile_3d`.

    Returns ``perm`` (int64, length ``T * Hs * Ws``): position ``p`` of the tile order
    holds the token whose row-major ``(T, Hs, Ws)`` index is ``perm[p]``.  Tile order
    lists tiles row-major over the tile grid ``(T/t, Hs/h, Ws/w)`` and, inside a
    tile, its ``t * h * w`` tokens row-major.  Use ``x[:, perm]`` to go to tile order
    and ``y[:, perm.argsort()]`` to come back.
    """
    (nt, nh, nw), (t, h, w) = _tile_grid(grid, tile)
    idx = torch.arange(nt * t * nh * h * nw * w).view(nt, t, nh, h, nw, w)
    return idx.permute(0, 2, 4, 1, 3, 5).flatten()


def _tile_grid(grid, tile):
    grid = _check_triple("grid", grid, 1)
    tile = _check_triple("tile", tile, 1)
    for axis, (g, t) in enumerate(zip(grid, tile)):
        if g % t:
            raise ValueError(f"grid[{axis}] must be divisible by tile[{axis}]: got grid={grid}, "
                             f"tile={tile} ({g} % {t} = {g % t})")
    return tuple(g // t for g, t in zip(grid, tile)), tile


def sliding_tile_3d(grid, tile, window, causal_time: bool = False, *, border: str = "shift",
                    num_global: int = 0, global_position: str = "suffix") -> BlockLayout:
    """Sliding-tile attention over a video grid ``(T, Hs, Ws)``, as Sliding Tile
    Attention (STA, FastVideo) and NATTEN define it.

    Video tokens must be in *tile order* (see :func:`sliding_tile_3d_order`); a block
    is one tile, ``block = t * h * w``.  ``window = (wt, wh, ww)`` counts tiles, odd
    or even.  Along each axis with ``M`` tiles, a window of ``k`` tiles reaches
    ``left = k // 2`` tiles back and ``right = k - 1 - left`` forward from its centre
    (STA's rule; for odd ``k`` the window is NATTEN's neighbourhood), and query tile
    ``a`` sees key tiles ``a'`` with ``c - left <= a' <= c + right``, where:

    * ``border="shift"`` (default, STA and NATTEN): ``c = clamp(a, left, M - 1 - right)``:
      every query tile sees a full ``k``-tile window, shifted inwards at the border
      (all ``M`` tiles when ``k >= M``);
    * ``border="clip"``: ``c = a``: the window is cut at the border, so border tiles
      see fewer keys.

    ``causal_time=True`` also requires ``a'_t <= a_t``.

    ``num_global`` global tokens (STA's text tokens in MM-DiT video models) see every
    token and are seen by every token; they come after the video tokens
    (``global_position="suffix"``, as in STA and HunyuanVideo) or before them
    (``"prefix"``, e.g. CogVideoX's text-first order).  ``seq_len = T * Hs * Ws +
    num_global``; blocks straddling a global/video boundary are partial.
    """
    (nt, nh, nw), (t, h, w) = _tile_grid(grid, tile)
    window = _check_triple("window", window, 1)
    _check_bool("causal_time", causal_time)
    if border not in ("shift", "clip"):
        raise ValueError(f"border must be 'shift' (STA/NATTEN: the window centre is clamped) or "
                         f"'clip' (the window is cut at the border), got {border!r}")
    _check_int("num_global", num_global, 0)
    if global_position not in ("prefix", "suffix"):
        raise ValueError(f"global_position must be 'prefix' or 'suffix', got {global_position!r}")
    tiles = torch.arange(nt * nh * nw)
    coords = (tiles // (nh * nw), tiles // nw % nh, tiles % nw)
    active = torch.ones(tiles.numel(), tiles.numel(), dtype=torch.bool)
    for c, k, m in zip(coords, window, (nt, nh, nw)):
        left = k // 2
        right = k - 1 - left
        # clamp() with min > max gives max: a window wider than the grid sees it all.
        centre = c.clamp(left, m - 1 - right) if border == "shift" else c
        active &= (c[None, :] >= centre[:, None] - left) & (c[None, :] <= centre[:, None] + right)
    if causal_time:
        active &= coords[0][None, :] <= coords[0][:, None]
    block = t * h * w
    video = tiles.numel() * block
    if num_global == 0:
        return BlockLayout(torch.where(active, FULL, SKIP).to(torch.int8), block=block, seq_len_q=video)
    return _with_global_tokens(active, block, video, num_global,
                               num_global if global_position == "prefix" else 0)


def _with_global_tokens(active: torch.Tensor, block: int, video: int, num_global: int,
                        offset: int) -> BlockLayout:
    """A tile-level pattern ``active [tiles, tiles]`` over ``video`` tokens that start
    at ``offset``, plus ``num_global`` tokens that see and are seen by all.

    A block holds the tokens of at most two tiles (a block is one tile long), so its
    type follows from the 2 x 2 tile pairs it touches; only the blocks where those
    disagree, or that straddle the global/video boundary, are evaluated element-wise.
    """
    seq_len = video + num_global
    m = math.ceil(seq_len / block)
    start = torch.arange(m) * block
    stop = (start + block).clamp(max=seq_len)
    in_video_lo = start.clamp(offset, offset + video)
    in_video_hi = stop.clamp(offset, offset + video)
    has_video = in_video_hi > in_video_lo
    has_global = (stop - start) > (in_video_hi - in_video_lo)
    n_tiles = active.shape[0]
    lo = ((in_video_lo - offset) // block).clamp(max=n_tiles - 1)
    hi = ((in_video_hi - 1 - offset) // block).clamp(0, n_tiles - 1)
    pairs = torch.stack([active[lo[:, None], lo[None, :]], active[lo[:, None], hi[None, :]],
                         active[hi[:, None], lo[None, :]], active[hi[:, None], hi[None, :]]])
    both_video = has_video[:, None] & has_video[None, :]
    glob = has_global[:, None] | has_global[None, :]
    all_global = ~has_video[:, None] | ~has_video[None, :]
    any_ = glob | (both_video & pairs.any(0))
    all_ = all_global | (~glob & pairs.all(0))
    block_type = torch.where(all_, FULL, SKIP).to(torch.int8)[None]
    undecided = (any_ & ~all_)[None]
    _, qs, ks = undecided.nonzero(as_tuple=True)
    # Equal keys, equal element masks: every block splits at the same token offset
    # (global tokens first in the one block that straddles the global/video boundary),
    # so its 2 x 2 tile pattern and which side straddles decide its mask.
    bits = (pairs[:, qs, ks].long() * torch.tensor([1, 2, 4, 8])[:, None]).sum(0)
    keys = bits + 16 * has_global[qs].long() + 32 * has_global[ks].long()

    def is_global(pos):
        return (pos < offset) | (pos >= offset + video)

    def tile_of(pos):
        return ((pos - offset) // block).clamp(0, n_tiles - 1)

    def visible(_, q_pos, k_pos):
        tq, tk = tile_of(q_pos), tile_of(k_pos)
        vis = active[tq[:, :, None], tk[:, None, :]]
        return vis | is_global(q_pos)[:, :, None] | is_global(k_pos)[:, None, :]

    return _resolve(block, seq_len, seq_len, block_type, undecided, keys, visible)


def from_flex_block_mask(block_mask) -> BlockLayout:
    """A layout from a ``torch.nn.attention.flex_attention.BlockMask``.

    The block mask's full blocks become full blocks; each of its partial blocks (or
    every listed block when it keeps no separate full blocks) is resolved by
    evaluating ``block_mask.mask_mod`` on that block only (vmapped, on the block
    mask's device).  Its ``H`` becomes the layout's heads; ``B`` must be 1 and the
    block size square (``Q_BLOCK_SIZE == KV_BLOCK_SIZE``).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a torch.nn.attention.flex_attention.BlockMask, "
                        f"got {type(block_mask).__name__}")
    q_block, kv_block = block_mask.BLOCK_SIZE
    if q_block != kv_block:
        raise ValueError(f"block_mask.BLOCK_SIZE must be square (stfast blocks are block x block), "
                         f"got {tuple(block_mask.BLOCK_SIZE)}")
    kv_num = block_mask.kv_num_blocks
    if kv_num.dim() != 3 or kv_num.shape[0] != 1:
        raise ValueError(f"block_mask must have batch size B = 1 (a layout is shared by the batch), "
                         f"got kv_num_blocks of shape {tuple(kv_num.shape)}")
    b = int(q_block)
    lq, lk = (int(s) for s in block_mask.seq_lengths)
    mq, mk = math.ceil(lq / b), math.ceil(lk / b)
    listed = _listed_blocks(kv_num, block_mask.kv_indices, mq, mk)
    full = torch.zeros_like(listed)
    if block_mask.full_kv_num_blocks is not None:
        full = _listed_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, mq, mk)
    block_type = torch.where(full, FULL, SKIP).to(torch.int8)
    undecided = listed & ~full
    hs, qs, ks = undecided.nonzero(as_tuple=True)
    device = kv_num.device
    mask_mod = block_mask.mask_mod
    fn = torch.vmap(mask_mod, in_dims=(None, None, None, 0))
    fn = torch.vmap(fn, in_dims=(None, None, 0, None))
    fn = torch.vmap(fn, in_dims=(0, 0, 0, 0))

    def visible(head, q_pos, k_pos):
        # mask_mods may index tensors of length L: never call them past the ends.
        q_in, k_in = q_pos < lq, k_pos < lk
        args = (torch.zeros_like(head), head, q_pos.clamp(max=lq - 1), k_pos.clamp(max=lk - 1))
        out = fn(*(a.to(device) for a in args)).to(torch.bool).cpu()
        return out & q_in[:, :, None] & k_in[:, None, :]

    keys = (hs * mq + qs) * mk + ks
    return _resolve(b, lq, lk, block_type, undecided, keys, visible)


def _listed_blocks(counts: torch.Tensor, indices: torch.Tensor, mq: int, mk: int) -> torch.Tensor:
    """Bool ``[H, mq, mk]``: the blocks a FlexAttention ``(num_blocks, indices)`` pair lists."""
    counts, indices = counts[0].cpu().long(), indices[0].cpu().long()
    listed = torch.arange(indices.shape[-1]) < counts[..., None]
    # Slots past a row's count hold arbitrary indices: they must not clear listed ones.
    width = max(mk, int(indices.max()) + 1 if indices.numel() else 0)
    dense = torch.zeros(*indices.shape[:-1], width, dtype=torch.int8)
    dense.scatter_reduce_(-1, indices.clamp(min=0), listed.to(torch.int8), reduce="amax")
    out = torch.zeros(dense.shape[0], mq, mk, dtype=torch.bool)
    rows = min(mq, dense.shape[1])
    out[:, :rows] = dense[:, :rows, :mk] > 0
    return out
