// Forward pass: one CTA per (batch element, BM query rows).  K/V tiles stream through
// double-buffered shared memory with cp.async while tensor cores compute S = Q K^T and
// O += P V; the softmax is online, in registers, in log2 units.  Writes O and the LSE.
#pragma once

#include <math_constants.h>

#include "mma.cuh"
#include "schedule.cuh"

namespace stfast {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Copies the K and V tiles that start at key row `start` into shared memory (async).
template <typename T, int BN, int DP>
__device__ __forceinline__ void load_kv_tile(T* sK, T* sV, const T* k, const T* v, const AttnParams& p,
                                             int start) {
  load_tile<T, BN, DP>(sK, k + start * p.k_s[3], p.k_s[3], p.Lk - start, p.D);
  load_tile<T, BN, DP>(sV, v + start * p.v_s[3], p.v_s[3], p.Lk - start, p.D);
}

// Step `it` of a double-buffered walk over a key schedule: issues the copy of tile
// it + 1 into the other buffer, waits for tile `it`, and returns its buffer (0 or 1).
// The copy of tile 0 is issued and committed before the walk starts.
template <typename T, int BN, int DP, class Schedule>
__device__ __forceinline__ int await_kv_tile(T* sK, T* sV, const T* k, const T* v, const AttnParams& p,
                                             const Schedule& sched, int it) {
  const int buf = it & 1;
  if (it + 1 < sched.count) {
    load_kv_tile<T, BN, DP>(sK + (buf ^ 1) * BN * DP, sV + (buf ^ 1) * BN * DP, k, v, p,
                            sched.tile(it + 1).start);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
  return buf;
}

template <int DTYPE, int DP>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const __grid_constant__ AttnParams p) {
  using T = typename Elem<DTYPE>::T;
  constexpr int BM = fwd_block_m(DP), BN = fwd_block_n(DP);
  constexpr int NT = BN / 8, DT = DP / 8;
  STFAST_DYNAMIC_SMEM(uint4, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * DP;  // [2][BN][DP]
  T* sV = sK + 2 * BN * DP;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Batch b(blockIdx.x, p);
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;  // longest causal rows first
  const T* q = static_cast<const T*>(p.q) + b.offset(p.q_s) + q0 * p.q_s[3];
  const T* k = static_cast<const T*>(p.k) + b.offset(p.k_s);
  const T* v = static_cast<const T*>(p.v) + b.offset(p.v_s);
  const KeySchedule<BM, BN> sched(p, p.block ? b.head(p) : 0, q0);
  const Masker masker(p, b);
  const float scale_log2 = p.scale * kLog2e;

  float acc_o[DT][4] = {};
  float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
  float row_sum[2] = {0.f, 0.f};

  load_tile<T, BM, DP>(sQ, q, p.q_s[3], p.Lq - q0, p.D);
  if (sched.count > 0) load_kv_tile<T, BN, DP>(sK, sV, k, v, p, sched.tile(0).start);
  cp_async_commit();

  for (int it = 0; it < sched.count; ++it) {
    const Tile tile = sched.tile(it);
    const int buf = await_kv_tile<T, BN, DP>(sK, sV, k, v, p, sched, it);
    const T* tK = sK + buf * BN * DP;
    const T* tV = sV + buf * BN * DP;

    float s[NT][4] = {};
#pragma unroll
    for (int kc = 0; kc < DP / 16; ++kc) {
      uint32_t a[4];
      load_a<T, DP>(a, sQ, warp * 16, kc * 16);
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; ++n2) {
        uint32_t bf[4];
        load_b_rows<T, DP>(bf, tK, n2 * 16, kc * 16);
        mma_16816<DTYPE>(s[2 * n2], a, bf[0], bf[1]);
        mma_16816<DTYPE>(s[2 * n2 + 1], a, bf[2], bf[3]);
      }
    }

    const bool need_mask = masker.needed(q0, tile.start, BM, BN, tile);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = s[j][e] * scale_log2;
        s[j][e] = need_mask ? masker.apply(x, q0 + warp * 16 + lane / 4 + (e / 2) * 8,
                                           tile.start + j * 8 + (lane % 4) * 2 + (e & 1), tile)
                            : x;
      }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = row_max[h];
#pragma unroll
      for (int j = 0; j < NT; ++j) m = fmaxf(m, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
      m = quad_max(m);
      // A row that has seen only hidden keys keeps max -inf; subtracting 0 instead keeps
      // exp2 at exactly 0 rather than NaN.
      const float base = m == -CUDART_INF_F ? 0.f : m;
      const float alpha = exp2f(row_max[h] - base);
      row_max[h] = m;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        s[j][2 * h] = exp2f(s[j][2 * h] - base);
        s[j][2 * h + 1] = exp2f(s[j][2 * h + 1] - base);
        sum += s[j][2 * h] + s[j][2 * h + 1];
      }
      row_sum[h] = row_sum[h] * alpha + sum;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        acc_o[d][2 * h] *= alpha;
        acc_o[d][2 * h + 1] *= alpha;
      }
    }

#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
      uint32_t a[4];
      acc_to_a<DTYPE, NT>(a, s, kc);
#pragma unroll
      for (int d2 = 0; d2 < DT / 2; ++d2) {
        uint32_t bf[4];
        load_b_cols<T, DP>(bf, tV, kc * 16, d2 * 16);
        mma_16816<DTYPE>(acc_o[2 * d2], a, bf[0], bf[1]);
        mma_16816<DTYPE>(acc_o[2 * d2 + 1], a, bf[2], bf[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float l = quad_sum(row_sum[h]);
    inv[h] = l > 0.f ? 1.f / l : 0.f;
    const int row = q0 + warp * 16 + lane / 4 + h * 8;
    if (lane % 4 == 0 && row < p.Lq) {
      p.lse[b.offset(p.lse_s) + row * p.lse_s[3]] =
          l > 0.f ? (row_max[h] + log2f(l)) * kLn2 : -CUDART_INF_F;
    }
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      acc_o[d][2 * h] *= inv[h];
      acc_o[d][2 * h + 1] *= inv[h];
    }
  }
  store_acc<DTYPE, DT>(static_cast<T*>(p.o) + b.offset(p.o_s), p.o_s[3], q0 + warp * 16, p.Lq, p.D, acc_o,
                       1.f);
}

}  // namespace stfast
