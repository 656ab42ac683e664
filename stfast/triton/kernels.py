"""Flash-attention kernels over strided 5-D problems, in reading order.

One family serves every lowered :class:`~stfast.lowering.Problem`:

* ``_scores``: the shared scoring rule (element mask, key bounds, causal, block
  partial mask), used identically by the forward pass and both backward passes so
  the recomputed probabilities match the saved log-sum-exp bit for bit.
* ``_fwd_kernel``: online softmax over key tiles.  The schedule is either implicit
  (dense/causal: an unmasked loop over tiles every query of the tile sees fully, then
  a masked loop over the diagonal and the ragged tail) or a block-sparse table.
* ``_bwd_preprocess``: ``delta = rowsum(dO * O)``.
* ``_bwd_dkdv_kernel``: one program per key tile walks the query tiles that see it;
  for GQA it also walks the query heads sharing the kv head, so each dk/dv is
  reduced in registers (deterministic, no atomics) and written once.
* ``_bwd_dq_kernel``: one program per query tile walks its key tiles (deterministic).
* ``_packed_fwd_kernel`` / ``_packed_bwd_kernel``: short sequences (e.g. the time
  axis, T = 8..64) packed several per tile with a block-diagonal mask; a whole
  sequence fits the tile, so one program does the forward or the full backward.

Addressing is by strides of three batch indices and one sequence index; batch
offsets are 64-bit because a strided view can span more than 2**31 elements.
Scores are kept in log2 units (``qk_scale = scale * log2(e)``) so the softmax is
``exp2``; the saved LSE is in natural-log units.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Integer arguments that change with sequence length and batch shape.  The JIT would
# otherwise compile a variant per value class (== 1, divisible by 16) of each.  None
# of them sets the alignment of a q/k/v/o/dO tile (the LSE is read and written one
# float per row), so their divisibility buys no vectorisation.  LQ_KEY/LK_KEY are the
# bucketed lengths the autotuner keys on and are not read by the kernels.
_LENGTHS = ["B1", "B2", "Lq", "Lk", "Mq", "Mk", "causal_off", "LQ_KEY", "LK_KEY", "sl0", "sl1", "sl2"]
_PACKED_LENGTHS = ["B_total", "B1", "B2", "P", "Lq", "Lk", "causal_off", "sl0", "sl1", "sl2"]


@triton.jit
def _batch_offset(b0, b1, b2, s0, s1, s2):
    return b0.to(tl.int64) * s0 + b1.to(tl.int64) * s1 + b2.to(tl.int64) * s2


@triton.jit
def _split_batch(flat, B1, B2):
    return flat // (B1 * B2), (flat // B2) % B1, flat % B2


@triton.jit
def _scores(qk, pos_m, pos_n, Lk, causal_off, m_ptrs, m_ok, keep,
            BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
            MASK_BOOL: tl.constexpr, KEEP: tl.constexpr):
    """Scaled scores (log2 units) with -inf wherever a query may not see a key."""
    s = qk
    if HAS_MASK:
        m = tl.load(m_ptrs, mask=m_ok, other=0)
        if MASK_BOOL:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            s = s + m.to(tl.float32) * 1.4426950408889634
    if BOUNDS:
        s = tl.where(pos_n[None, :] < Lk, s, float("-inf"))
    if CAUSAL:
        s = tl.where(pos_n[None, :] <= pos_m[:, None] + causal_off, s, float("-inf"))
    if KEEP:
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _partial_keep(PM, pidx, btype, rows, cols, LB: tl.constexpr):
    """Element mask of a partial layout block (all True for a full block: not loaded)."""
    is_partial = (rows[:, None] * 0 + cols[None, :] * 0 + btype) == 2
    ptrs = PM + tl.maximum(pidx, 0).to(tl.int64) * LB * LB + rows[:, None] * LB + cols[None, :]
    return tl.load(ptrs, mask=is_partial, other=1) != 0


@triton.jit
def _query_block_row(head, start_m, Mq, LB: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row of the kv tables for the layout block holding query tile ``start_m``, and
    the tile's rows inside that block."""
    i = start_m // LB
    return head.to(tl.int64) * Mq + i, start_m - i * LB + tl.arange(0, BLOCK_M)


@triton.jit
def _kv_entry(KVI, BT, PI, row, t, Mk):
    """The t-th active key block of a table row: (block index, type, partial mask)."""
    j = tl.load(KVI + row * Mk + t)
    return j, tl.load(BT + row * Mk + j), tl.load(PI + row * Mk + j)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, m_base, skl, svl, smq, smk, start_n,
              offs_m, offs_d, offs_dv, Lq, Lk, D, DV, qk_scale, causal_off, keep,
              BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, KEEP: tl.constexpr,
              DOT_PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Lk
    rows_n = offs_n.to(tl.int64)
    k = tl.load(k_base + rows_n[:, None] * skl + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    m_ptrs = m_base + offs_m.to(tl.int64)[:, None] * smq + rows_n[None, :] * smk
    m_ok = (offs_m < Lq)[:, None] & n_ok[None, :]
    s = _scores(qk, offs_m, offs_n, Lk, causal_off, m_ptrs, m_ok, keep,
                BOUNDS, CAUSAL, HAS_MASK, MASK_BOOL, KEEP)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; subtract 0 instead so that
    # exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + rows_n[:, None] * svl + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _query_tile(CAUSAL: tl.constexpr):
    """Index of this program's query tile.  Causal tiles are launched longest first
    (the last tile sees the most keys), so the short ones fill the tail of the grid."""
    if CAUSAL:
        return tl.num_programs(1) - 1 - tl.program_id(1)
    return tl.program_id(1)


@triton.jit
def _causal_bounds(start_m, Lk, causal_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr):
    """Key range of a query tile: [0, lo) needs no mask, [lo, hi) does."""
    full_tiles = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Lk, tl.maximum(0, start_m + BLOCK_M + causal_off))
        lo = tl.minimum(tl.maximum(0, start_m + causal_off + 1) // BLOCK_N * BLOCK_N, full_tiles)
        lo = tl.minimum(lo, hi)
    else:
        hi = Lk
        lo = full_tiles
    return lo, hi


@triton.jit(do_not_specialize=_LENGTHS)
def _fwd_kernel(Q, K, V, O, LSE, MASK, PM, KVC, KVI, BT, PI,
                sq0, sq1, sq2, sql, sk0, sk1, sk2, skl, sv0, sv1, sv2, svl,
                so0, so1, so2, sol, sl0, sl1, sl2, sll, sm0, sm1, sm2, smq, smk,
                hs0, hs1, hs2, B1, B2, Lq, Lk, D, DV, Mq, Mk, qk_scale, causal_off, LQ_KEY, LK_KEY,
                D_PAD: tl.constexpr, DV_PAD: tl.constexpr, LB: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b0, b1, b2 = _split_batch(tl.program_id(0), B1, B2)
    start_m = _query_tile(CAUSAL) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_ok = offs_m < Lq
    q_base = Q + _batch_offset(b0, b1, b2, sq0, sq1, sq2)
    k_base = K + _batch_offset(b0, b1, b2, sk0, sk1, sk2)
    v_base = V + _batch_offset(b0, b1, b2, sv0, sv1, sv2)
    m_base = MASK + _batch_offset(b0, b1, b2, sm0, sm1, sm2)
    q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * sql + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if LB > 0:
        row, rows_in_block = _query_block_row(b0 * hs0 + b1 * hs1 + b2 * hs2, start_m, Mq, LB, BLOCK_M)
        for t in range(0, tl.load(KVC + row)):
            j, btype, pidx = _kv_entry(KVI, BT, PI, row, t, Mk)
            for sub in range(0, tl.minimum(LB, Lk - j * LB), BLOCK_N):
                keep = _partial_keep(PM, pidx, btype, rows_in_block, sub + tl.arange(0, BLOCK_N), LB)
                acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, m_base, skl, svl, smq,
                                          smk, j * LB + sub, offs_m, offs_d, offs_dv, Lq, Lk, D, DV,
                                          qk_scale, causal_off, keep, BLOCK_N, True, CAUSAL,
                                          HAS_MASK, MASK_BOOL, True, DOT_PREC)
    else:
        lo, hi = _causal_bounds(start_m, Lk, causal_off, BLOCK_M, BLOCK_N, CAUSAL)
        for start_n in range(0, lo, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, m_base, skl, svl, smq, smk,
                                      start_n, offs_m, offs_d, offs_dv, Lq, Lk, D, DV, qk_scale,
                                      causal_off, 0, BLOCK_N, False, False, HAS_MASK, MASK_BOOL,
                                      False, DOT_PREC)
        for start_n in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, m_base, skl, svl, smq, smk,
                                      start_n, offs_m, offs_d, offs_dv, Lq, Lk, D, DV, qk_scale,
                                      causal_off, 0, BLOCK_N, True, CAUSAL, HAS_MASK, MASK_BOOL,
                                      False, DOT_PREC)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_base = O + _batch_offset(b0, b1, b2, so0, so1, so2)
    tl.store(o_base + offs_m.to(tl.int64)[:, None] * sol + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv < DV)[None, :])
    l_base = LSE + _batch_offset(b0, b1, b2, sl0, sl1, sl2)
    tl.store(l_base + offs_m.to(tl.int64) * sll, lse, mask=m_ok)


@triton.jit(do_not_specialize=["B1", "B2", "Lq"])
def _bwd_preprocess(O, DO, DELTA, so0, so1, so2, sol, sd0, sd1, sd2, sdl, B1, B2, Lq, DV,
                    DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_b = tl.program_id(0)
    b0, b1, b2 = _split_batch(pid_b, B1, B2)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, DV_PAD)
    ok = (offs_m < Lq)[:, None] & (offs_dv < DV)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + _batch_offset(b0, b1, b2, so0, so1, so2) + rows * sol + offs_dv[None, :],
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + _batch_offset(b0, b1, b2, sd0, sd1, sd2) + rows * sdl + offs_dv[None, :],
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_b.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _load_lse2(l_ptrs, ok):
    """LSE in log2 units; a row that saw no key (or is out of range) gets +inf, so
    its probabilities exp2(s - lse) are 0 and its gradients vanish."""
    lse = tl.load(l_ptrs, mask=ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, l_base, dl_base, m_base, sql, sdl, sll, smq, smk,
               start_m, offs_n, offs_d, offs_dv, Lq, Lk, D, DV, qk_scale, causal_off, keep,
               BLOCK_M: tl.constexpr, BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, KEEP: tl.constexpr,
               DOT_PREC: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    rows = offs_m.to(tl.int64)
    q = tl.load(q_base + rows[:, None] * sql + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    do = tl.load(do_base + rows[:, None] * sdl + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
    lse2 = _load_lse2(l_base + rows * sll, m_ok)
    delta = tl.load(dl_base + rows, mask=m_ok, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    m_ptrs = m_base + rows[:, None] * smq + offs_n.to(tl.int64)[None, :] * smk
    s = _scores(qk, offs_m, offs_n, Lk, causal_off, m_ptrs, m_ok[:, None] & (offs_n < Lk)[None, :],
                keep, BOUNDS, CAUSAL, HAS_MASK, MASK_BOOL, KEEP)
    p = tl.math.exp2(s - lse2[:, None])
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=_LENGTHS + ["GROUPS"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, MASK, PM, QC, QI, BT, PI,
                     sq0, sq1, sq2, sql, sk0, sk1, sk2, skl, sv0, sv1, sv2, svl,
                     sd0, sd1, sd2, sdl, sl0, sl1, sl2, sll, sm0, sm1, sm2, smq, smk,
                     sdk0, sdk1, sdk2, sdkl, sdv0, sdv1, sdv2, sdvl,
                     hs0, hs1, hs2, B1, B2, GROUPS, Lq, Lk, D, DV, Mq, Mk, scale, qk_scale,
                     causal_off, LQ_KEY, LK_KEY,
                     D_PAD: tl.constexpr, DV_PAD: tl.constexpr, LB: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # With GQA each program sums GROUPS consecutive query heads of the B2 that share
    # its kv head (in a fixed order: deterministic) and writes slot b2 of DK/DV: the
    # shared gradient itself when GROUPS = B2, else a partial sum that the launcher
    # reduces.  Without GQA, GROUPS = 1 and b2 is the program's own head.
    b0, b1, b2 = _split_batch(tl.program_id(0), B1, B2 // GROUPS)
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    n_ok = offs_n < Lk
    cols = offs_n.to(tl.int64)
    k = tl.load(K + _batch_offset(b0, b1, b2, sk0, sk1, sk2) + cols[:, None] * skl + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    v = tl.load(V + _batch_offset(b0, b1, b2, sv0, sv1, sv2) + cols[:, None] * svl + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], dtype=tl.float32)
    for g in range(0, GROUPS):
        bq = b2 * GROUPS + g
        q_base = Q + _batch_offset(b0, b1, bq, sq0, sq1, sq2)
        do_base = DO + _batch_offset(b0, b1, bq, sd0, sd1, sd2)
        l_base = LSE + _batch_offset(b0, b1, bq, sl0, sl1, sl2)
        dl_base = DELTA + ((b0.to(tl.int64) * B1 + b1) * B2 + bq) * Lq
        m_base = MASK + _batch_offset(b0, b1, bq, sm0, sm1, sm2)
        if LB > 0:
            head = b0 * hs0 + b1 * hs1 + bq * hs2
            j = start_n // LB
            cols_in_block = start_n - j * LB + tl.arange(0, BLOCK_N)
            col = head.to(tl.int64) * Mk + j
            for t in range(0, tl.load(QC + col)):
                i = tl.load(QI + col * Mq + t)
                entry = (head.to(tl.int64) * Mq + i) * Mk + j
                btype = tl.load(BT + entry)
                pidx = tl.load(PI + entry)
                for sub in range(0, tl.minimum(LB, Lq - i * LB), BLOCK_M):
                    keep = _partial_keep(PM, pidx, btype, sub + tl.arange(0, BLOCK_M), cols_in_block, LB)
                    dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, l_base, dl_base, m_base, sql,
                                        sdl, sll, smq, smk, i * LB + sub, offs_n, offs_d, offs_dv, Lq,
                                        Lk, D, DV, qk_scale, causal_off, keep, BLOCK_M, True, CAUSAL,
                                        HAS_MASK, MASK_BOOL, True, DOT_PREC)
        else:
            q_tiles_end = tl.cdiv(Lq, BLOCK_M) * BLOCK_M
            if CAUSAL:
                # Rows before q_lo see no key of this tile; rows from q_mid see all of it.
                q_lo = tl.minimum(tl.maximum(0, start_n - causal_off) // BLOCK_M * BLOCK_M, q_tiles_end)
                q_mid = tl.cdiv(tl.maximum(0, start_n + BLOCK_N - 1 - causal_off), BLOCK_M) * BLOCK_M
                q_mid = tl.maximum(tl.minimum(q_mid, q_tiles_end), q_lo)
            else:
                q_lo = 0
                q_mid = 0
            for start_m in range(q_lo, q_mid, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, l_base, dl_base, m_base, sql, sdl,
                                    sll, smq, smk, start_m, offs_n, offs_d, offs_dv, Lq, Lk, D, DV,
                                    qk_scale, causal_off, 0, BLOCK_M, True, CAUSAL, HAS_MASK,
                                    MASK_BOOL, False, DOT_PREC)
            # Keys past Lk only feed their own (unstored) dk/dv columns: no mask needed.
            for start_m in range(q_mid, Lq, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, l_base, dl_base, m_base, sql, sdl,
                                    sll, smq, smk, start_m, offs_n, offs_d, offs_dv, Lq, Lk, D, DV,
                                    qk_scale, causal_off, 0, BLOCK_M, False, False, HAS_MASK,
                                    MASK_BOOL, False, DOT_PREC)
    dk = dk * scale
    tl.store(DK + _batch_offset(b0, b1, b2, sdk0, sdk1, sdk2) + cols[:, None] * sdkl + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d < D)[None, :])
    tl.store(DV_ + _batch_offset(b0, b1, b2, sdv0, sdv1, sdv2) + cols[:, None] * sdvl + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=n_ok[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, m_base, skl, svl, smq, smk, start_n,
             offs_m, offs_d, offs_dv, Lq, Lk, D, DV, qk_scale, causal_off, keep,
             BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, KEEP: tl.constexpr,
             DOT_PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Lk
    cols = offs_n.to(tl.int64)
    k = tl.load(k_base + cols[:, None] * skl + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    v = tl.load(v_base + cols[:, None] * svl + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    m_ptrs = m_base + offs_m.to(tl.int64)[:, None] * smq + cols[None, :] * smk
    s = _scores(qk, offs_m, offs_n, Lk, causal_off, m_ptrs, (offs_m < Lq)[:, None] & n_ok[None, :],
                keep, BOUNDS, CAUSAL, HAS_MASK, MASK_BOOL, KEEP)
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=_LENGTHS)
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, MASK, PM, KVC, KVI, BT, PI,
                   sq0, sq1, sq2, sql, sk0, sk1, sk2, skl, sv0, sv1, sv2, svl,
                   sd0, sd1, sd2, sdl, sl0, sl1, sl2, sll, sm0, sm1, sm2, smq, smk,
                   sdq0, sdq1, sdq2, sdql,
                   hs0, hs1, hs2, B1, B2, Lq, Lk, D, DV, Mq, Mk, scale, qk_scale, causal_off,
                   LQ_KEY, LK_KEY, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, LB: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    b0, b1, b2 = _split_batch(pid_b, B1, B2)
    start_m = _query_tile(CAUSAL) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_ok = offs_m < Lq
    rows = offs_m.to(tl.int64)
    q = tl.load(Q + _batch_offset(b0, b1, b2, sq0, sq1, sq2) + rows[:, None] * sql + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    do = tl.load(DO + _batch_offset(b0, b1, b2, sd0, sd1, sd2) + rows[:, None] * sdl + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
    lse2 = _load_lse2(LSE + _batch_offset(b0, b1, b2, sl0, sl1, sl2) + rows * sll, m_ok)
    delta = tl.load(DELTA + pid_b.to(tl.int64) * Lq + rows, mask=m_ok, other=0.0)
    k_base = K + _batch_offset(b0, b1, b2, sk0, sk1, sk2)
    v_base = V + _batch_offset(b0, b1, b2, sv0, sv1, sv2)
    m_base = MASK + _batch_offset(b0, b1, b2, sm0, sm1, sm2)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    if LB > 0:
        row, rows_in_block = _query_block_row(b0 * hs0 + b1 * hs1 + b2 * hs2, start_m, Mq, LB, BLOCK_M)
        for t in range(0, tl.load(KVC + row)):
            j, btype, pidx = _kv_entry(KVI, BT, PI, row, t, Mk)
            for sub in range(0, tl.minimum(LB, Lk - j * LB), BLOCK_N):
                keep = _partial_keep(PM, pidx, btype, rows_in_block, sub + tl.arange(0, BLOCK_N), LB)
                dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, m_base, skl, svl, smq, smk,
                              j * LB + sub, offs_m, offs_d, offs_dv, Lq, Lk, D, DV, qk_scale,
                              causal_off, keep, BLOCK_N, True, CAUSAL, HAS_MASK, MASK_BOOL, True,
                              DOT_PREC)
    else:
        lo, hi = _causal_bounds(start_m, Lk, causal_off, BLOCK_M, BLOCK_N, CAUSAL)
        for start_n in range(0, lo, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, m_base, skl, svl, smq, smk,
                          start_n, offs_m, offs_d, offs_dv, Lq, Lk, D, DV, qk_scale, causal_off, 0,
                          BLOCK_N, False, False, HAS_MASK, MASK_BOOL, False, DOT_PREC)
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, m_base, skl, svl, smq, smk,
                          start_n, offs_m, offs_d, offs_dv, Lq, Lk, D, DV, qk_scale, causal_off, 0,
                          BLOCK_N, True, CAUSAL, HAS_MASK, MASK_BOOL, False, DOT_PREC)
    dq = dq * scale
    tl.store(DQ + _batch_offset(b0, b1, b2, sdq0, sdq1, sdq2) + rows[:, None] * sdql + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _packed_index(first, idx, L, P, B_total, B1, B2):
    """Tile slot -> (sequence slot, position, in range, b0, b1, b2) for packed tiles."""
    slot = idx // L
    pos = idx - slot * L
    flat = first + slot
    ok = (slot < P) & (flat < B_total)
    flat = tl.where(ok, flat, 0)
    b0, b1, b2 = _split_batch(flat, B1, B2)
    return slot, pos, ok, b0, b1, b2


@triton.jit
def _packed_scores(MASK, q, k, slot_m, pos_m, ok_m, mb0, mb1, mb2, slot_n, pos_n, ok_n,
                   sm0, sm1, sm2, smq, smk, Lk, qk_scale, causal_off,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """Scores of a packed tile: a query sees only keys of its own sequence."""
    keep = (slot_m[:, None] == slot_n[None, :]) & ok_m[:, None] & ok_n[None, :]
    m_ptrs = MASK + (_batch_offset(mb0, mb1, mb2, sm0, sm1, sm2) + pos_m.to(tl.int64) * smq)[:, None] \
        + pos_n.to(tl.int64)[None, :] * smk
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    return _scores(qk, pos_m, pos_n, Lk, causal_off, m_ptrs, keep, keep,
                   False, CAUSAL, HAS_MASK, MASK_BOOL, True)


@triton.jit(do_not_specialize=_PACKED_LENGTHS)
def _packed_fwd_kernel(Q, K, V, O, LSE, MASK,
                       sq0, sq1, sq2, sql, sk0, sk1, sk2, skl, sv0, sv1, sv2, svl,
                       so0, so1, so2, sol, sl0, sl1, sl2, sll, sm0, sm1, sm2, smq, smk,
                       B_total, B1, B2, P, Lq, Lk, D, DV, qk_scale, causal_off,
                       D_PAD: tl.constexpr, DV_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    first = tl.program_id(0) * P
    slot_m, pos_m, ok_m, qb0, qb1, qb2 = _packed_index(first, tl.arange(0, BLOCK_M), Lq, P, B_total, B1, B2)
    slot_n, pos_n, ok_n, kb0, kb1, kb2 = _packed_index(first, tl.arange(0, BLOCK_N), Lk, P, B_total, B1, B2)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    rows_m = pos_m.to(tl.int64)
    rows_n = pos_n.to(tl.int64)
    q = tl.load(Q + (_batch_offset(qb0, qb1, qb2, sq0, sq1, sq2) + rows_m * sql)[:, None] + offs_d[None, :],
                mask=ok_m[:, None] & (offs_d < D)[None, :], other=0.0)
    k = tl.load(K + (_batch_offset(kb0, kb1, kb2, sk0, sk1, sk2) + rows_n * skl)[:, None] + offs_d[None, :],
                mask=ok_n[:, None] & (offs_d < D)[None, :], other=0.0)
    v = tl.load(V + (_batch_offset(kb0, kb1, kb2, sv0, sv1, sv2) + rows_n * svl)[:, None] + offs_dv[None, :],
                mask=ok_n[:, None] & (offs_dv < DV)[None, :], other=0.0)
    s = _packed_scores(MASK, q, k, slot_m, pos_m, ok_m, qb0, qb1, qb2, slot_n, pos_n, ok_n,
                       sm0, sm1, sm2, smq, smk, Lk, qk_scale, causal_off, CAUSAL, HAS_MASK,
                       MASK_BOOL, DOT_PREC)
    m = tl.max(s, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.math.exp2(s - m_safe[:, None])
    l = tl.sum(p, 1)
    empty = l == 0.0
    out = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC) / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), (m_safe + tl.math.log2(tl.where(empty, 1.0, l))) * LN2)
    tl.store(O + (_batch_offset(qb0, qb1, qb2, so0, so1, so2) + rows_m * sol)[:, None] + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=ok_m[:, None] & (offs_dv < DV)[None, :])
    tl.store(LSE + _batch_offset(qb0, qb1, qb2, sl0, sl1, sl2) + rows_m * sll, lse, mask=ok_m)


@triton.jit(do_not_specialize=_PACKED_LENGTHS)
def _packed_bwd_kernel(Q, K, V, O, DO, LSE, DQ, DK, DV_, MASK,
                       sq0, sq1, sq2, sql, sk0, sk1, sk2, skl, sv0, sv1, sv2, svl,
                       so0, so1, so2, sol, sd0, sd1, sd2, sdl, sl0, sl1, sl2, sll,
                       sm0, sm1, sm2, smq, smk, sdq0, sdq1, sdq2, sdql,
                       sdk0, sdk1, sdk2, sdkl, sdv0, sdv1, sdv2, sdvl,
                       B_total, B1, B2, P, Lq, Lk, D, DV, scale, qk_scale, causal_off,
                       D_PAD: tl.constexpr, DV_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Every key a query sees is in this tile, so dq, dk and dv are all complete here.
    first = tl.program_id(0) * P
    slot_m, pos_m, ok_m, qb0, qb1, qb2 = _packed_index(first, tl.arange(0, BLOCK_M), Lq, P, B_total, B1, B2)
    slot_n, pos_n, ok_n, kb0, kb1, kb2 = _packed_index(first, tl.arange(0, BLOCK_N), Lk, P, B_total, B1, B2)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    rows_m = pos_m.to(tl.int64)
    rows_n = pos_n.to(tl.int64)
    qd_ok = ok_m[:, None] & (offs_d < D)[None, :]
    qv_ok = ok_m[:, None] & (offs_dv < DV)[None, :]
    kd_ok = ok_n[:, None] & (offs_d < D)[None, :]
    kv_ok = ok_n[:, None] & (offs_dv < DV)[None, :]
    q = tl.load(Q + (_batch_offset(qb0, qb1, qb2, sq0, sq1, sq2) + rows_m * sql)[:, None] + offs_d[None, :],
                mask=qd_ok, other=0.0)
    k = tl.load(K + (_batch_offset(kb0, kb1, kb2, sk0, sk1, sk2) + rows_n * skl)[:, None] + offs_d[None, :],
                mask=kd_ok, other=0.0)
    v = tl.load(V + (_batch_offset(kb0, kb1, kb2, sv0, sv1, sv2) + rows_n * svl)[:, None] + offs_dv[None, :],
                mask=kv_ok, other=0.0)
    o = tl.load(O + (_batch_offset(qb0, qb1, qb2, so0, so1, so2) + rows_m * sol)[:, None] + offs_dv[None, :],
                mask=qv_ok, other=0.0)
    do = tl.load(DO + (_batch_offset(qb0, qb1, qb2, sd0, sd1, sd2) + rows_m * sdl)[:, None] + offs_dv[None, :],
                 mask=qv_ok, other=0.0)
    lse2 = _load_lse2(LSE + _batch_offset(qb0, qb1, qb2, sl0, sl1, sl2) + rows_m * sll, ok_m)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    s = _packed_scores(MASK, q, k, slot_m, pos_m, ok_m, qb0, qb1, qb2, slot_n, pos_n, ok_n,
                       sm0, sm1, sm2, smq, smk, Lk, qk_scale, causal_off, CAUSAL, HAS_MASK,
                       MASK_BOOL, DOT_PREC)
    p = tl.math.exp2(s - lse2[:, None])
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * scale
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC) * scale
    tl.store(DQ + (_batch_offset(qb0, qb1, qb2, sdq0, sdq1, sdq2) + rows_m * sdql)[:, None] + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_ok)
    tl.store(DK + (_batch_offset(kb0, kb1, kb2, sdk0, sdk1, sdk2) + rows_n * sdkl)[:, None] + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kd_ok)
    tl.store(DV_ + (_batch_offset(kb0, kb1, kb2, sdv0, sdv1, sdv2) + rows_n * sdvl)[:, None] + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=kv_ok)
