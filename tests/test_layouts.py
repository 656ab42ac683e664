"""Layout builders against independent element-wise definitions, at odd sizes and at L = 64k."""

import math
import sys

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

import stfast
from stfast import layouts
from stfast.layouts import FULL, PARTIAL, SKIP, BlockLayout
from stfast.lowering import lower
from stfast.reference import oracle

BIG = 65536


def index_grid(lq, lk=None):
    lk = lq if lk is None else lk
    return torch.arange(lq)[:, None], torch.arange(lk)[None, :]


def block_any(dense, block):
    """Bool ``[H, Mq, Mk]``: blocks of an element mask holding any visible pair."""
    h, lq, lk = dense.shape
    mq, mk = math.ceil(lq / block), math.ceil(lk / block)
    padded = torch.zeros(h, mq * block, mk * block, dtype=torch.bool)
    padded[:, :lq, :lk] = dense
    return padded.view(h, mq, block, mk, block).any(4).any(2)


def check_layout(layout, expected):
    """Every derived view of ``layout`` agrees with the element mask ``expected``."""
    expected = expected if expected.dim() == 3 else expected[None]
    dense = layout.to_dense_mask()
    assert dense.dtype == torch.bool and dense.shape == expected.shape
    assert torch.equal(dense, expected)
    assert layout.visible_pairs() == int(expected.sum())
    assert layout.density == pytest.approx(block_any(expected, layout.block).float().mean().item())
    again = layouts.from_mask(dense, block=layout.block)
    assert torch.equal(again.block_type, layout.block_type)
    assert torch.equal(again.to_dense_mask(), dense)
    masks = layout.partial_masks.flatten(1)
    assert torch.unique(masks, dim=0).shape[0] == masks.shape[0], "partial masks not deduplicated"
    assert bool(((layout.partial_index >= 0) == (layout.block_type == PARTIAL)).all())


# --- causal -----------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,block", [(97, 16), (129, 32), (1, 16), (64, 16), (17, 32), (97, 1)])
def test_causal(seq_len, block):
    i, j = index_grid(seq_len)
    layout = layouts.causal(seq_len, block=block)
    check_layout(layout, j <= i)
    assert layout.partial_masks.shape[0] <= 1, "diagonal blocks must share one mask"


# --- local ------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,window,block,causal", [
    (97, 0, 16, False), (97, 5, 16, True), (129, 20, 16, False), (129, 33, 32, True),
    (97, 200, 16, False), (113, 16, 16, False), (97, 3, 32, False)])
def test_local(seq_len, window, block, causal):
    i, j = index_grid(seq_len)
    expected = (i - j).abs() <= window
    if causal:
        expected = expected & (j <= i)
    check_layout(layouts.local(seq_len, window, block=block, causal=causal), expected)


# --- strided ----------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,stride,block,causal", [
    (97, 7, 16, False), (97, 7, 16, True), (129, 40, 16, False), (129, 40, 16, True),
    (129, 1, 32, False), (97, 16, 16, True), (97, 100, 16, False), (129, 33, 32, True)])
def test_strided(seq_len, stride, block, causal):
    i, j = index_grid(seq_len)
    expected = ((i - j).abs() < stride) | ((i - j) % stride == 0)
    if causal:
        expected = expected & (j <= i)
    check_layout(layouts.strided(seq_len, stride, block=block, causal=causal), expected)


# --- frame_causal -----------------------------------------------------------------------

@pytest.mark.parametrize("frames,tokens,block", [(5, 19, 16), (3, 40, 32), (7, 3, 16),
                                                  (4, 32, 16), (1, 17, 16), (6, 21, 8)])
def test_frame_causal(frames, tokens, block):
    i, j = index_grid(frames * tokens)
    layout = layouts.frame_causal(frames, tokens, block=block)
    check_layout(layout, j // tokens <= i // tokens)
    if tokens % block == 0:
        assert layout.partial_masks.shape[0] == 0


# --- bigbird ----------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,block,g,w,r", [(200, 16, 1, 3, 2), (97, 16, 0, 3, 1),
                                                  (129, 32, 2, 1, 3), (97, 16, 1, 2, 0),
                                                  (97, 16, 0, 0, 50)])
def test_bigbird(seq_len, block, g, w, r):
    layout = layouts.bigbird(seq_len, num_global=g, num_window=w, num_random=r, block=block, seed=3)
    m = math.ceil(seq_len / block)
    qi, ki = index_grid(m)
    glob = (qi < g) | (ki < g)
    window = (ki >= qi - (w - 1) // 2) & (ki <= qi + w // 2) & (w > 0)
    active = layout.block_type[0] > 0
    assert bool((layout.block_type[0] != PARTIAL).all())
    assert bool((active >= (glob | window)).all()), "global/window blocks missing"
    extra = active & ~(glob | window)
    free = (~(glob | window)).sum(1)
    want = torch.where(torch.arange(m) < g, 0, torch.clamp(free, max=r))
    assert torch.equal(extra.sum(1), want)
    # The element mask is the block pattern, cropped to the sequence.
    rows = torch.arange(seq_len) // block
    check_layout(layout, active[rows][:, rows])
    same = layouts.bigbird(seq_len, num_global=g, num_window=w, num_random=r, block=block, seed=3)
    assert torch.equal(same.block_type, layout.block_type)


def test_bigbird_seed_changes_random_blocks():
    kw = dict(num_global=1, num_window=3, num_random=3, block=16)
    a = layouts.bigbird(1024, seed=0, **kw).block_type
    b = layouts.bigbird(1024, seed=1, **kw).block_type
    assert not torch.equal(a, b)
    assert torch.equal((a > 0).sum(), (b > 0).sum())


# --- sliding_tile_3d --------------------------------------------------------------------

def test_sliding_tile_3d_order_matches_loops():
    grid, tile = (4, 6, 10), (2, 3, 5)
    expected = []
    for a in range(grid[0] // tile[0]):
        for b in range(grid[1] // tile[1]):
            for c in range(grid[2] // tile[2]):
                for t in range(tile[0]):
                    for y in range(tile[1]):
                        for x in range(tile[2]):
                            tt, yy, xx = a * tile[0] + t, b * tile[1] + y, c * tile[2] + x
                            expected.append((tt * grid[1] + yy) * grid[2] + xx)
    perm = layouts.sliding_tile_3d_order(grid, tile)
    assert perm.tolist() == expected


@pytest.mark.parametrize("grid,tile,window,causal_time", [
    ((4, 6, 6), (2, 3, 3), (1, 3, 3), False), ((4, 6, 6), (2, 3, 3), (3, 1, 3), True),
    ((6, 4, 10), (2, 2, 5), (3, 3, 1), True), ((3, 4, 4), (1, 2, 2), (9, 1, 5), False),
    ((2, 3, 5), (1, 1, 1), (1, 3, 3), False)])
def test_sliding_tile_3d_clipped(grid, tile, window, causal_time):
    layout = layouts.sliding_tile_3d(grid, tile, window, causal_time=causal_time, border="clip")
    assert layout.block == tile[0] * tile[1] * tile[2]
    n = grid[0] * grid[1] * grid[2]
    assert layout.seq_len_q == n
    # Row-major token coordinates -> tile coordinates, then the rule, then tile order.
    tok = torch.arange(n)
    coords = (tok // (grid[1] * grid[2]), tok // grid[2] % grid[1], tok % grid[2])
    expected = torch.ones(n, n, dtype=torch.bool)
    for c, size, win in zip(coords, tile, window):
        tc = c // size
        expected &= (tc[:, None] - tc[None, :]).abs() <= win // 2
    if causal_time:
        tt = coords[0] // tile[0]
        expected &= tt[None, :] <= tt[:, None]
    perm = layouts.sliding_tile_3d_order(grid, tile)
    check_layout(layout, expected[perm][:, perm])
    assert layout.partial_masks.shape[0] == 0


def sta_reference_mask(grid, tile, window, text_len):
    """A transcription of FastVideo's published STA mask rule (flex_sta_ref.py,
    ``generate_sta_mask_mod_3d``), evaluated element by element over tile-ordered video
    tokens followed by ``text_len`` text tokens.  Per axis, with ``k`` window tiles and
    ``M`` grid tiles: ``left = k // 2``, ``right = k // 2 + (k % 2 - 1)``, the centre
    is the query tile clamped to ``[left, M - 1 - right]``, and key tiles in
    ``[centre - left, centre + right]`` are seen.  Video queries also see the text;
    text queries see everything."""
    tiles = [g // t for g, t in zip(grid, tile)]
    numel = tile[0] * tile[1] * tile[2]
    video = grid[0] * grid[1] * grid[2]
    n = video + text_len
    idx = torch.arange(n)
    tile_id = idx // numel
    tc = (tile_id // (tiles[1] * tiles[2]), tile_id % (tiles[1] * tiles[2]) // tiles[2], tile_id % tiles[2])
    q_in = idx[:, None] < video
    k_in = idx[None, :] < video
    seen = torch.ones(n, n, dtype=torch.bool)
    for c, k, m in zip(tc, window, tiles):
        left, right = k // 2, k // 2 + (k % 2 - 1)
        centre = torch.clamp(c, left, (m - 1) - right)
        seen &= (c[None, :] >= centre[:, None] - left) & (c[None, :] <= centre[:, None] + right)
    return (q_in & k_in & seen) | (q_in & ~k_in) | ~q_in


# (grid, tile, window, text tokens): published STA shapes use even windows (e.g. 3 x 6 x 10
# tiles); windows wider than the grid see all of it; text tokens partial at block edges.
STA_CASES = [((4, 6, 10), (1, 1, 1), (3, 6, 10), 0), ((6, 8, 8), (2, 2, 2), (2, 2, 4), 0),
             ((6, 4, 6), (2, 2, 3), (3, 4, 1), 0), ((4, 6, 6), (2, 3, 3), (1, 3, 2), 5),
             ((3, 4, 4), (1, 2, 2), (9, 1, 2), 7), ((2, 4, 8), (1, 2, 2), (2, 2, 3), 9),
             ((2, 3, 5), (1, 1, 1), (1, 2, 4), 3), ((4, 8, 8), (1, 4, 4), (2, 3, 2), 21)]


@pytest.mark.parametrize("grid,tile,window,text", STA_CASES)
def test_sliding_tile_3d_matches_sta_reference_mask(grid, tile, window, text):
    layout = layouts.sliding_tile_3d(grid, tile, window, num_global=text)
    assert layout.block == tile[0] * tile[1] * tile[2]
    check_layout(layout, sta_reference_mask(grid, tile, window, text))
    if text == 0:
        assert layout.partial_masks.shape[0] == 0
    # Away from the border, every query tile sees exactly a full window.
    tiles_seen = (layout.block_type[0, :, :] == FULL).sum(1)
    counts = [min(k, g // t) for k, g, t in zip(window, grid, tile)]
    n_tiles = math.prod(g // t for g, t in zip(grid, tile))
    assert bool((tiles_seen[:n_tiles] >= counts[0] * counts[1] * counts[2]).all())


@pytest.mark.parametrize("grid,tile,window,text", STA_CASES[3:])
def test_sliding_tile_3d_global_prefix(grid, tile, window, text):
    layout = layouts.sliding_tile_3d(grid, tile, window, num_global=text, global_position="prefix")
    want = sta_reference_mask(grid, tile, window, text)
    # The same rule with the text tokens moved in front of the video.
    video = want.shape[0] - text
    order = torch.cat([torch.arange(video, video + text), torch.arange(video)])
    check_layout(layout, want[order][:, order])


@pytest.mark.parametrize("length,kernel", [(13, 5), (7, 7), (9, 3), (6, 3)])
def test_sliding_tile_3d_odd_windows_are_natten_neighbourhoods(length, kernel):
    # NATTEN's window start (dilation 1), transcribed: max(i - n, 0), moved back by
    # L - i - n - 1 where the window would pass the end; n = kernel // 2.
    n = kernel // 2
    i = torch.arange(length)
    start = (i - n).clamp(min=0) + (i + n >= length).long() * (length - i - n - 1)
    j = torch.arange(length)[None, :]
    want = (j >= start[:, None]) & (j < start[:, None] + kernel)
    layout = layouts.sliding_tile_3d((1, 1, length), (1, 1, 1), (1, 1, kernel))
    check_layout(layout, want)


def test_sliding_tile_3d_shift_differs_from_clip_only_at_the_border():
    shift = layouts.sliding_tile_3d((8, 8, 8), (2, 2, 2), (3, 3, 3))
    clip = layouts.sliding_tile_3d((8, 8, 8), (2, 2, 2), (3, 3, 3), border="clip")
    per_row = (shift.block_type[0] > 0).sum(1)
    assert bool((per_row == 27).all()), "every query tile sees a full 3 x 3 x 3 window"
    assert int((clip.block_type[0] > 0).sum(1).min()) == 8  # a corner tile, clipped
    assert bool(((clip.block_type > 0) <= (shift.block_type > 0)).all())
    with pytest.raises(ValueError, match="border must be 'shift'"):
        layouts.sliding_tile_3d((8, 8, 8), (2, 2, 2), (3, 3, 3), border="wrap")
    with pytest.raises(ValueError, match="global_position must be 'prefix' or 'suffix'"):
        layouts.sliding_tile_3d((8, 8, 8), (2, 2, 2), (3, 3, 3), num_global=2, global_position="middle")


def test_sliding_tile_3d_with_text_runs_against_the_oracle():
    layout = layouts.sliding_tile_3d((2, 4, 4), (1, 2, 2), (2, 2, 1), num_global=6)
    q, k, v = (torch.randn(1, 2, layout.seq_len_q, 8) for _ in range(3))
    out = stfast.attention(q, k, v, layout=layout, backend="torch")
    p = lower("dense", q.double(), k.double(), v.double(), scale=8 ** -0.5,
              mask=sta_reference_mask((2, 4, 4), (1, 2, 2), (2, 2, 1), 6).expand(1, 2, -1, -1))
    torch.testing.assert_close(out.double(), oracle(p)[0].flatten(1, 2), rtol=1e-5, atol=1e-5)


# --- large sizes: O(blocks) memory, exact counts ---------------------------------------

def _small(layout, max_masks):
    mq = math.ceil(layout.seq_len_q / layout.block)
    mk = math.ceil(layout.seq_len_k / layout.block)
    assert layout.block_type.numel() == mq * mk
    assert layout.partial_index.numel() == mq * mk
    assert layout.partial_masks.shape[0] <= max_masks


def test_large_causal():
    layout = layouts.causal(BIG, block=64)
    _small(layout, 1)
    assert layout.visible_pairs() == BIG * (BIG + 1) // 2


@pytest.mark.parametrize("causal", [False, True])
def test_large_local(causal):
    w = 1000
    layout = layouts.local(BIG, w, block=64, causal=causal)
    _small(layout, 8)
    i = torch.arange(BIG)
    hi = i if causal else torch.clamp(i + w, max=BIG - 1)
    assert layout.visible_pairs() == int((hi - torch.clamp(i - w, min=0) + 1).sum())


@pytest.mark.parametrize("causal", [False, True])
def test_large_strided(causal):
    s = 256
    layout = layouts.strided(BIG, s, block=64, causal=causal)
    _small(layout, 16)
    i = torch.arange(BIG)
    # The band |i - j| < s on each side, then the multiples of s beyond it.
    per_row = 1 + torch.clamp(i, max=s - 1) + i // s
    if not causal:
        rest = BIG - 1 - i
        per_row = per_row + torch.clamp(rest, max=s - 1) + rest // s
    assert layout.visible_pairs() == int(per_row.sum())


def test_large_frame_causal():
    frames, tokens = 16, 4095
    layout = layouts.frame_causal(frames, tokens, block=64)
    _small(layout, 64)
    f = torch.arange(frames)
    assert layout.visible_pairs() == int((tokens * (f + 1) * tokens).sum())
    aligned = layouts.frame_causal(64, 1024, block=64)
    _small(aligned, 0)


def test_large_bigbird_and_tiles():
    layout = layouts.bigbird(BIG, num_global=2, num_window=3, num_random=3, block=64)
    _small(layout, 0)
    m = BIG // 64
    qi, ki = index_grid(m)
    fixed = (qi < 2) | (ki < 2) | ((ki - qi).abs() <= 1)
    want = torch.where(torch.arange(m) < 2, m, fixed.sum(1) + 3)
    assert torch.equal((layout.block_type[0] > 0).sum(1), want)
    tiles = layouts.sliding_tile_3d((16, 64, 64), (4, 8, 8), (3, 3, 3))
    _small(tiles, 0)
    assert tiles.seq_len_q == BIG


# --- FlexAttention interop --------------------------------------------------------------

def _windowed_heads(b, h, q, kv):
    return ((q - kv).abs() <= 20) & ((q // 7 + h) % 3 != 0)


def _document(doc):
    def mask_mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & (kv <= q)
    return mask_mod


@pytest.mark.parametrize("separate_full", [True, False])
@pytest.mark.parametrize("lq,lk,heads,block", [(97, 129, 2, 16), (129, 97, 1, 32), (97, 97, 3, 16)])
def test_from_flex_block_mask(lq, lk, heads, block, separate_full):
    gen = torch.Generator().manual_seed(lq + lk)
    doc = torch.sort(torch.randint(0, 4, (max(lq, lk),), generator=gen)).values
    for mod in (_windowed_heads, _document(doc)):
        bm = create_block_mask(mod, 1, heads, lq, lk, device="cpu", BLOCK_SIZE=block,
                               separate_full_blocks=separate_full)
        layout = layouts.from_flex_block_mask(bm)
        assert layout.num_heads == heads and layout.block == block
        check_layout(layout, create_mask(mod, 1, heads, lq, lk, device="cpu")[0])


def test_from_flex_full_blocks_skip_mask_mod():
    # FlexAttention never calls mask_mod on full blocks: they are full whatever it says.
    nothing = lambda b, h, q, kv: q < 0  # noqa: E731
    kv_num = torch.tensor([[[1, 0]]], dtype=torch.int32)
    kv_idx = torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.int32)
    full_num = torch.tensor([[[1, 1]]], dtype=torch.int32)
    full_idx = torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=16,
                                  mask_mod=nothing, seq_lengths=(20, 25))
    layout = layouts.from_flex_block_mask(bm)
    assert layout.block_type[0].tolist() == [[FULL, SKIP], [SKIP, FULL]]
    i, j = index_grid(20, 25)
    check_layout(layout, (i // 16) == (j // 16))


@pytest.mark.parametrize("make", [
    lambda: layouts.causal(97, block=16), lambda: layouts.local(129, 20, block=32, causal=True),
    lambda: layouts.strided(97, 7, block=16), lambda: layouts.frame_causal(5, 19, block=16),
    lambda: layouts.from_mask(torch.rand(2, 97, 113, generator=torch.Generator().manual_seed(0)) < 0.3,
                              block=16)])
def test_to_flex_block_mask_round_trip(make):
    layout = make()
    bm = layout.to_flex_block_mask()
    assert tuple(bm.seq_lengths) == (layout.seq_len_q, layout.seq_len_k)
    assert tuple(bm.BLOCK_SIZE) == (layout.block, layout.block)
    assert torch.equal(bm.to_dense()[0], layout.block_type > 0)
    dense = create_mask(bm.mask_mod, 1, layout.num_heads, layout.seq_len_q, layout.seq_len_k,
                        device="cpu")[0]
    assert torch.equal(dense, layout.to_dense_mask())
    back = layouts.from_flex_block_mask(bm)
    assert torch.equal(back.block_type, layout.block_type)
    assert torch.equal(back.to_dense_mask(), layout.to_dense_mask())


def test_from_flex_block_mask_errors():
    with pytest.raises(TypeError, match="block_mask must be"):
        layouts.from_flex_block_mask(torch.ones(4, 4, dtype=torch.bool))
    two = create_block_mask(_windowed_heads, 2, 1, 64, 64, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match=r"batch size B = 1.*\(2, 1, 4\)"):
        layouts.from_flex_block_mask(two)
    rect = create_block_mask(_windowed_heads, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=(16, 32))
    with pytest.raises(ValueError, match=r"BLOCK_SIZE must be square.*\(16, 32\)"):
        layouts.from_flex_block_mask(rect)


# --- picture ----------------------------------------------------------------------------

def test_picture_text():
    layout = layouts.local(97, 20, block=16, causal=True)
    text = layout.picture()
    header, *rows = text.split("\n")
    assert "density" in header and "head 0" in header
    symbol = {FULL: "█", PARTIAL: "▒", SKIP: "·"}
    assert rows == ["".join(symbol[v] for v in row) for row in layout.block_type[0].tolist()]
    assert str(layout) == text


def test_picture_of_huge_layout_is_reduced():
    layout = layouts.causal(BIG, block=64)
    header, *rows = layout.picture().split("\n")
    assert "16x16 blocks" in header
    assert len(rows) == 64 and all(len(r) == 64 for r in rows)
    # Cells below the diagonal are all full, above all skipped, on it mixed.
    assert rows[5] == "█" * 5 + "▒" + "·" * 58


def test_picture_heads_and_errors():
    heads = layouts.from_mask(torch.stack([torch.eye(40, dtype=torch.bool),
                                           torch.ones(40, 40, dtype=torch.bool)]), block=16)
    assert heads.picture(head=1).split("\n")[1:] == ["███"] * 3
    with pytest.raises(ValueError, match=r"head must be in \[0, 1\].*got 2"):
        heads.picture(head=2)
    with pytest.raises(TypeError, match="head must be an int"):
        heads.picture(head="0")


def test_picture_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "layout.png"
    layouts.frame_causal(5, 19, block=16).picture(path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_picture_png_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.colors", None)
    with pytest.raises(ImportError, match="matplotlib"):
        layouts.causal(97, block=16).picture(path=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --- argument validation ----------------------------------------------------------------

@pytest.mark.parametrize("call,exc,message", [
    (lambda: layouts.causal(0), ValueError, r"seq_len must be an int >= 1, got 0"),
    (lambda: layouts.causal(97.0), TypeError, r"seq_len must be an int >= 1, got 97.0"),
    (lambda: layouts.causal(97, block=0), ValueError, r"block must be an int >= 1, got 0"),
    (lambda: layouts.local(97, -1), ValueError, r"window must be an int >= 0, got -1"),
    (lambda: layouts.local(97, 4, causal=1), TypeError, r"causal must be a bool, got 1"),
    (lambda: layouts.local(97, True), TypeError, r"window must be an int"),
    (lambda: layouts.strided(97, 0), ValueError, r"stride must be an int >= 1, got 0"),
    (lambda: layouts.strided(97, 4, causal="yes"), TypeError, r"causal must be a bool"),
    (lambda: layouts.bigbird(97, num_global=-1, num_window=3, num_random=1), ValueError,
     r"num_global must be an int >= 0, got -1"),
    (lambda: layouts.bigbird(97, num_global=1, num_window=3, num_random=1.5), TypeError,
     r"num_random must be an int >= 0, got 1.5"),
    (lambda: layouts.bigbird(97, num_global=1, num_window=-3, num_random=1), ValueError,
     r"num_window must be an int >= 0, got -3"),
    (lambda: layouts.bigbird(97, num_global=1, num_window=3, num_random=1, seed=-1), ValueError,
     r"seed must be an int >= 0, got -1"),
    (lambda: layouts.frame_causal(0, 10), ValueError, r"num_frames must be an int >= 1, got 0"),
    (lambda: layouts.frame_causal(4, 0), ValueError, r"tokens_per_frame must be an int >= 1, got 0"),
    (lambda: layouts.sliding_tile_3d((4, 6), (2, 3, 3), (1, 1, 1)), ValueError,
     r"grid must be a tuple of 3 ints, got \(4, 6\)"),
    (lambda: layouts.sliding_tile_3d((4, 6, 6), (2, 0, 3), (1, 1, 1)), ValueError,
     r"tile\[1\] must be an int >= 1, got 0"),
    (lambda: layouts.sliding_tile_3d((4, 6, 7), (2, 3, 3), (1, 1, 1)), ValueError,
     r"grid\[2\] must be divisible by tile\[2\].*7 % 3 = 1"),
    (lambda: layouts.sliding_tile_3d((4, 6, 6), (2, 3, 3), (1, 0, 1)), ValueError,
     r"window\[1\] must be an int >= 1, got 0"),
    (lambda: layouts.sliding_tile_3d((4, 6, 6), (2, 3, 3), (1, 1, 1), num_global=-1), ValueError,
     r"num_global must be an int >= 0, got -1"),
    (lambda: layouts.sliding_tile_3d((4, 6, 6), (2, 3, 3), (1, 1, 1), causal_time=None), TypeError,
     r"causal_time must be a bool, got None"),
    (lambda: layouts.sliding_tile_3d_order((4, 6, 6), (4, 4, 3)), ValueError,
     r"grid\[1\] must be divisible by tile\[1\]"),
    (lambda: layouts.from_mask(torch.ones(5, 5, dtype=torch.bool), block=0), ValueError,
     r"block must be an int >= 1, got 0"),
    (lambda: layouts.from_mask(torch.ones(5, 5)), TypeError, r"mask must be a bool tensor"),
])
def test_bad_arguments(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


# --- through the public API -------------------------------------------------------------

def _oracle_out(q, k, v, layout, head_strides):
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    p = lower("dense", q64, k64, v64, scale=1.0 / math.sqrt(q.shape[-1]),
              layout=layout.lowered("cpu", head_strides))
    out5, _ = oracle(p)
    return out5.flatten(1, 2)


def test_attention_with_causal_layout_end_to_end():
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, 97, 38, generator=gen) for _ in range(3))
    layout = layouts.causal(97, block=16)
    out = stfast.attention(q, k, v, layout=layout, backend="torch")
    torch.testing.assert_close(out.double(), _oracle_out(q, k, v, layout, (0, 0, 0)),
                               rtol=1e-5, atol=1e-5)
    dense_causal = stfast.attention(q, k, v, causal=True, backend="torch")
    torch.testing.assert_close(out, dense_causal, rtol=1e-5, atol=1e-5)


def test_attention_with_per_head_flex_layout_end_to_end():
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 97, 8, generator=gen) for _ in range(3))
    bm = create_block_mask(_windowed_heads, 1, 2, 97, 97, device="cpu", BLOCK_SIZE=16)
    layout = layouts.from_flex_block_mask(bm)
    out = stfast.attention(q, k, v, layout=layout, backend="torch")
    torch.testing.assert_close(out.double(), _oracle_out(q, k, v, layout, (0, 1, 1)),
                               rtol=1e-5, atol=1e-5)
    dense = create_mask(_windowed_heads, 1, 2, 97, 97, device="cpu")
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(8)
    direct = torch.softmax(scores.masked_fill(~dense, float("-inf")), -1).nan_to_num() @ v.double()
    torch.testing.assert_close(out.double(), direct, rtol=1e-5, atol=1e-5)


def test_block_layout_rejects_bad_block_type():
    with pytest.raises(ValueError, match=r"block_type must have shape \[H\|1, 7, 7\]"):
        BlockLayout(torch.ones(6, 7, dtype=torch.int8), block=16, seq_len_q=97)


def test_layout_is_immutable_so_cached_tables_cannot_go_stale():
    # int8 input: the old constructor kept the caller's own tensor.
    given = torch.tensor([[1, 0], [1, 1]], dtype=torch.int8)
    layout = BlockLayout(given, block=8, seq_len_q=16)
    before = layout.to_dense_mask()
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    stfast.attention(q, k, v, layout=layout, backend="torch")  # lowers and caches the tables
    layout.block_type[0, 0, 1] = FULL  # a skipped block edited into a full one...
    given[0, 1] = FULL  # ...and the constructor's input edited too
    assert torch.equal(layout.to_dense_mask(), before) and layout.density == 0.75
    out = stfast.attention(q, k, v, layout=layout, backend="torch")
    p = lower("dense", q.double(), k.double(), v.double(), scale=8 ** -0.5,
              mask=before.expand(1, 2, 16, 16))
    torch.testing.assert_close(out.double(), oracle(p)[0].flatten(1, 2), rtol=1e-5, atol=1e-5)
    # The way to change a pattern: a new layout from the edited copy.
    edited = layout.block_type
    edited[0, 0, 1] = FULL
    assert BlockLayout(edited, block=8, seq_len_q=16).density == 1.0
