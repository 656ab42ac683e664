// Backward pass, deterministic and without atomics, in three kernels:
//   1. delta = rowsum(dO * O) per query row;
//   2. dK, dV: one CTA per key tile, looping over the query tiles that see it (and over
//      the GQA group sharing the key head, so shared dK/dV are summed in registers);
//   3. dQ: one CTA per query tile, looping over its key tiles like the forward pass.
// Scores are recomputed from the saved LSE; both passes mask with the same Masker.
#pragma once

#include <math_constants.h>

#include "fwd_kernel.cuh"

namespace stfast {

template <int DTYPE, int DP>
__global__ void __launch_bounds__(kThreads) delta_kernel(const __grid_constant__ AttnParams p) {
  using T = typename Elem<DTYPE>::T;
  const int lane = threadIdx.x % 32;
  const int64_t rows = static_cast<int64_t>(p.B0) * p.B1 * p.B2 * p.Lq;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t r = blockIdx.x * (kThreads / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const Batch b(r / p.Lq, p);
    const int row = static_cast<int>(r % p.Lq);
    const T* o = static_cast<const T*>(p.o) + b.offset(p.o_s) + row * p.o_s[3];
    const T* d = static_cast<const T*>(p.dout) + b.offset(p.do_s) + row * p.do_s[3];
    float sum = 0.f;
    for (int c = lane; c < p.D; c += 32) sum += to_float(o[c]) * to_float(d[c]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) p.delta[r] = sum;
  }
}

// The saved LSE in log2 units; +inf for rows that saw no key so that their P is 0.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -CUDART_INF_F ? CUDART_INF_F : lse * kLog2e;
}

template <int DTYPE, int DP>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const __grid_constant__ AttnParams p) {
  using T = typename Elem<DTYPE>::T;
  constexpr int BM = dkdv_block_m(DP), BN = dkdv_block_n(DP);
  constexpr int MT = BM / 8, DT = DP / 8;
  STFAST_DYNAMIC_SMEM(uint4, smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * DP;
  T* sQ = sV + BN * DP;   // [2][BM][DP]
  T* sDO = sQ + 2 * BM * DP;  // [2][BM][DP]
  float* sLse = reinterpret_cast<float*>(sDO + 2 * BM * DP);  // [2][BM], log2 units
  float* sDelta = sLse + 2 * BM;  // [2][BM]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // With kv_group > 1, blockIdx.x enumerates (b0, b1) and this CTA visits every b2.
  const int64_t flat0 = static_cast<int64_t>(blockIdx.x) * p.kv_group;
  const Batch kb(flat0, p);
  const int k0 = blockIdx.y * BN;
  const float scale_log2 = p.scale * kLog2e;

  load_tile<T, BN, DP>(sK, static_cast<const T*>(p.k) + kb.offset(p.k_s) + k0 * p.k_s[3], p.k_s[3], p.Lk - k0, p.D);
  load_tile<T, BN, DP>(sV, static_cast<const T*>(p.v) + kb.offset(p.v_s) + k0 * p.v_s[3], p.v_s[3], p.Lk - k0, p.D);
  cp_async_commit();

  float acc_dk[DT][4] = {};
  float acc_dv[DT][4] = {};

  for (int g = 0; g < p.kv_group; ++g) {
    const Batch b(flat0 + g, p);
    const T* q = static_cast<const T*>(p.q) + b.offset(p.q_s);
    const T* dout = static_cast<const T*>(p.dout) + b.offset(p.do_s);
    const float* lse = p.lse + b.offset(p.lse_s);
    const float* delta = p.delta + b.flat(p) * p.Lq;
    const QuerySchedule<BM, BN> sched(p, p.block ? b.head(p) : 0, k0);
    const Masker masker(p, b);

    auto load = [&](int it, int buf) {
      const int qs = sched.tile(it).start;
      load_tile<T, BM, DP>(sQ + buf * BM * DP, q + qs * p.q_s[3], p.q_s[3], p.Lq - qs, p.D);
      load_tile<T, BM, DP>(sDO + buf * BM * DP, dout + qs * p.do_s[3], p.do_s[3], p.Lq - qs, p.D);
      cp_async_commit();
      for (int i = threadIdx.x; i < BM; i += kThreads) {
        const bool valid = qs + i < p.Lq;
        sLse[buf * BM + i] = valid ? lse_log2(lse[(qs + i) * p.lse_s[3]]) : CUDART_INF_F;
        sDelta[buf * BM + i] = valid ? delta[qs + i] : 0.f;
      }
    };
    if (sched.count > 0) load(0, 0);

    for (int it = 0; it < sched.count; ++it) {
      const int buf = it & 1;
      const Tile tile = sched.tile(it);
      if (it + 1 < sched.count) {
        load(it + 1, buf ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* tQ = sQ + buf * BM * DP;
      const T* tDO = sDO + buf * BM * DP;
      const float* tLse = sLse + buf * BM;
      const float* tDelta = sDelta + buf * BM;

      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
      float st[MT][4] = {};
      float dpt[MT][4] = {};
#pragma unroll
      for (int kc = 0; kc < DP / 16; ++kc) {
        uint32_t ak[4], av[4];
        load_a<T, DP>(ak, sK, warp * 16, kc * 16);
        load_a<T, DP>(av, sV, warp * 16, kc * 16);
#pragma unroll
        for (int m2 = 0; m2 < MT / 2; ++m2) {
          uint32_t bq[4], bd[4];
          load_b_rows<T, DP>(bq, tQ, m2 * 16, kc * 16);
          load_b_rows<T, DP>(bd, tDO, m2 * 16, kc * 16);
          mma_16816<DTYPE>(st[2 * m2], ak, bq[0], bq[1]);
          mma_16816<DTYPE>(st[2 * m2 + 1], ak, bq[2], bq[3]);
          mma_16816<DTYPE>(dpt[2 * m2], av, bd[0], bd[1]);
          mma_16816<DTYPE>(dpt[2 * m2 + 1], av, bd[2], bd[3]);
        }
      }

      const bool need_mask = masker.needed(tile.start, k0, BM, BN, tile);
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = j * 8 + (lane % 4) * 2 + (e & 1);
          float x = st[j][e] * scale_log2;
          if (need_mask) x = masker.apply(x, tile.start + qi, k0 + warp * 16 + lane / 4 + (e / 2) * 8, tile);
          const float pr = exp2f(x - tLse[qi]);
          st[j][e] = pr;                              // P^T
          dpt[j][e] = pr * (dpt[j][e] - tDelta[qi]);  // dS^T
        }

#pragma unroll
      for (int kc = 0; kc < BM / 16; ++kc) {
        uint32_t ap[4], ads[4];
        acc_to_a<DTYPE, MT>(ap, st, kc);
        acc_to_a<DTYPE, MT>(ads, dpt, kc);
#pragma unroll
        for (int d2 = 0; d2 < DT / 2; ++d2) {
          uint32_t bd[4], bq[4];
          load_b_cols<T, DP>(bd, tDO, kc * 16, d2 * 16);
          load_b_cols<T, DP>(bq, tQ, kc * 16, d2 * 16);
          mma_16816<DTYPE>(acc_dv[2 * d2], ap, bd[0], bd[1]);
          mma_16816<DTYPE>(acc_dv[2 * d2 + 1], ap, bd[2], bd[3]);
          mma_16816<DTYPE>(acc_dk[2 * d2], ads, bq[0], bq[1]);
          mma_16816<DTYPE>(acc_dk[2 * d2 + 1], ads, bq[2], bq[3]);
        }
      }
      __syncthreads();
    }
  }
  cp_async_wait<0>();

  const int row0 = k0 + warp * 16;
  store_acc<DTYPE, DT>(static_cast<T*>(p.dk) + kb.offset(p.dk_s), p.dk_s[3], row0, p.Lk, p.D, acc_dk,
                       p.scale);
  store_acc<DTYPE, DT>(static_cast<T*>(p.dv) + kb.offset(p.dv_s), p.dv_s[3], row0, p.Lk, p.D, acc_dv, 1.f);
}

template <int DTYPE, int DP>
__global__ void __launch_bounds__(kThreads) dq_kernel(const __grid_constant__ AttnParams p) {
  using T = typename Elem<DTYPE>::T;
  constexpr int BM = fwd_block_m(DP), BN = fwd_block_n(DP);
  constexpr int NT = BN / 8, DT = DP / 8;
  STFAST_DYNAMIC_SMEM(uint4, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sDO = sQ + BM * DP;
  T* sK = sDO + BM * DP;  // [2][BN][DP]
  T* sV = sK + 2 * BN * DP;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Batch b(blockIdx.x, p);
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const T* k = static_cast<const T*>(p.k) + b.offset(p.k_s);
  const T* v = static_cast<const T*>(p.v) + b.offset(p.v_s);
  const KeySchedule<BM, BN> sched(p, p.block ? b.head(p) : 0, q0);
  const Masker masker(p, b);
  const float scale_log2 = p.scale * kLog2e;

  float lse[2], delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = q0 + warp * 16 + lane / 4 + h * 8;
    lse[h] = row < p.Lq ? lse_log2(p.lse[b.offset(p.lse_s) + row * p.lse_s[3]]) : CUDART_INF_F;
    delta[h] = row < p.Lq ? p.delta[b.flat(p) * p.Lq + row] : 0.f;
  }

  load_tile<T, BM, DP>(sQ, static_cast<const T*>(p.q) + b.offset(p.q_s) + q0 * p.q_s[3], p.q_s[3], p.Lq - q0, p.D);
  load_tile<T, BM, DP>(sDO, static_cast<const T*>(p.dout) + b.offset(p.do_s) + q0 * p.do_s[3], p.do_s[3],
                       p.Lq - q0, p.D);
  if (sched.count > 0) load_kv_tile<T, BN, DP>(sK, sV, k, v, p, sched.tile(0).start);
  cp_async_commit();

  float acc_dq[DT][4] = {};
  for (int it = 0; it < sched.count; ++it) {
    const Tile tile = sched.tile(it);
    const int buf = await_kv_tile<T, BN, DP>(sK, sV, k, v, p, sched, it);
    const T* tK = sK + buf * BN * DP;
    const T* tV = sV + buf * BN * DP;

    float s[NT][4] = {};
    float dp[NT][4] = {};
#pragma unroll
    for (int kc = 0; kc < DP / 16; ++kc) {
      uint32_t aq[4], ad[4];
      load_a<T, DP>(aq, sQ, warp * 16, kc * 16);
      load_a<T, DP>(ad, sDO, warp * 16, kc * 16);
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; ++n2) {
        uint32_t bk[4], bv[4];
        load_b_rows<T, DP>(bk, tK, n2 * 16, kc * 16);
        load_b_rows<T, DP>(bv, tV, n2 * 16, kc * 16);
        mma_16816<DTYPE>(s[2 * n2], aq, bk[0], bk[1]);
        mma_16816<DTYPE>(s[2 * n2 + 1], aq, bk[2], bk[3]);
        mma_16816<DTYPE>(dp[2 * n2], ad, bv[0], bv[1]);
        mma_16816<DTYPE>(dp[2 * n2 + 1], ad, bv[2], bv[3]);
      }
    }

    const bool need_mask = masker.needed(q0, tile.start, BM, BN, tile);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * scale_log2;
        if (need_mask)
          x = masker.apply(x, q0 + warp * 16 + lane / 4 + (e / 2) * 8, tile.start + j * 8 + (lane % 4) * 2 + (e & 1),
                           tile);
        const float pr = exp2f(x - lse[e / 2]);
        dp[j][e] = pr * (dp[j][e] - delta[e / 2]);  // dS
      }

#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
      uint32_t a[4];
      acc_to_a<DTYPE, NT>(a, dp, kc);
#pragma unroll
      for (int d2 = 0; d2 < DT / 2; ++d2) {
        uint32_t bk[4];
        load_b_cols<T, DP>(bk, tK, kc * 16, d2 * 16);
        mma_16816<DTYPE>(acc_dq[2 * d2], a, bk[0], bk[1]);
        mma_16816<DTYPE>(acc_dq[2 * d2 + 1], a, bk[2], bk[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  store_acc<DTYPE, DT>(static_cast<T*>(p.dq) + b.offset(p.dq_s), p.dq_s[3], q0 + warp * 16, p.Lq, p.D, acc_dq,
                       p.scale);
}

}  // namespace stfast
