// Which tiles a CTA visits and which scores inside a tile survive: the dense, causal
// and block-sparse schedules and the element masks, shared by the forward, dQ and
// dK/dV kernels so all three agree on every score.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include "params.h"

namespace stfast {

struct Batch {
  int b0, b1, b2;
  __device__ Batch(int64_t flat, const AttnParams& p) {
    b2 = static_cast<int>(flat % p.B2);
    b1 = static_cast<int>((flat / p.B2) % p.B1);
    b0 = static_cast<int>(flat / (static_cast<int64_t>(p.B2) * p.B1));
  }
  __device__ int64_t offset(const int64_t* s) const { return b0 * s[0] + b1 * s[1] + b2 * s[2]; }
  __device__ int64_t flat(const AttnParams& p) const {
    return (static_cast<int64_t>(b0) * p.B1 + b1) * p.B2 + b2;
  }
  __device__ int head(const AttnParams& p) const {
    return static_cast<int>(b0 * p.head_s[0] + b1 * p.head_s[1] + b2 * p.head_s[2]);
  }
};

// One tile of keys (forward, dQ) or queries (dK/dV): where it starts and how to mask it.
struct Tile {
  int start;
  int block_type;     // 1 full, 2 partial (dense schedules: 1)
  int partial_index;  // into partial_masks when block_type == 2
};

// Key tiles of BN keys for the query tile at q0 (BM rows).
template <int BM, int BN>
struct KeySchedule {
  const AttnParams& p;
  int head, q0, count, per_block, qblock;
  __device__ KeySchedule(const AttnParams& p_, int head_, int q0_) : p(p_), head(head_), q0(q0_) {
    if (p.block == 0) {
      int end = p.Lk;
      if (p.causal) end = min(end, q0 + BM + p.causal_offset);  // last row sees keys < q0+BM+offset
      count = end > 0 ? (end + BN - 1) / BN : 0;
      per_block = 1;
      qblock = 0;
    } else {
      per_block = p.block / BN;
      qblock = q0 / p.block;
      count = p.kv_counts[head * p.kc_s[0] + qblock * p.kc_s[1]] * per_block;
    }
  }
  __device__ Tile tile(int it) const {
    if (p.block == 0) return {it * BN, 1, -1};
    const int kb = p.kv_indices[head * p.ki_s[0] + qblock * p.ki_s[1] + (it / per_block) * p.ki_s[2]];
    const int64_t at = head * p.bt_s[0] + qblock * p.bt_s[1] + kb * p.bt_s[2];
    const int type = p.block_type[at];
    const int pidx = type == 2 ? p.partial_index[head * p.pi_s[0] + qblock * p.pi_s[1] + kb * p.pi_s[2]] : -1;
    return {kb * p.block + (it % per_block) * BN, type, pidx};
  }
};

// Query tiles of BM queries for the key tile at k0 (BN keys).
template <int BM, int BN>
struct QuerySchedule {
  const AttnParams& p;
  int head, k0, count, first, per_block, kblock;
  __device__ QuerySchedule(const AttnParams& p_, int head_, int k0_) : p(p_), head(head_), k0(k0_) {
    if (p.block == 0) {
      first = 0;
      if (p.causal) first = max(0, k0 - p.causal_offset) / BM;  // first query that sees key k0
      const int tiles = (p.Lq + BM - 1) / BM;
      count = max(0, tiles - first);
      per_block = 1;
      kblock = 0;
    } else {
      first = 0;
      per_block = p.block / BM;
      kblock = k0 / p.block;
      count = p.q_counts[head * p.qc_s[0] + kblock * p.qc_s[1]] * per_block;
    }
  }
  __device__ Tile tile(int it) const {
    if (p.block == 0) return {(first + it) * BM, 1, -1};
    const int qb = p.q_indices[head * p.qi_s[0] + kblock * p.qi_s[1] + (it / per_block) * p.qi_s[2]];
    const int64_t at = head * p.bt_s[0] + qb * p.bt_s[1] + kblock * p.bt_s[2];
    const int type = p.block_type[at];
    const int pidx = type == 2 ? p.partial_index[head * p.pi_s[0] + qb * p.pi_s[1] + kblock * p.pi_s[2]] : -1;
    return {qb * p.block + (it % per_block) * BM, type, pidx};
  }
};

// Element-level visibility of a (query row, key col) pair inside a tile.
struct Masker {
  const AttnParams& p;
  const char* mask;  // this batch element's mask, or null
  __device__ Masker(const AttnParams& p_, const Batch& b) : p(p_) {
    mask = p.mask_kind == kNoMask
               ? nullptr
               : static_cast<const char*>(p.mask) + b.offset(p.mask_s) * mask_elem_size(p.mask_kind);
  }
  static __device__ int mask_elem_size(int kind) {
    return kind == kBoolMask ? 1 : (kind == kFloat32Mask ? 4 : 2);
  }
  // Whether any score of the BM x BN tile at (q0, k0) may need masking.
  __device__ bool needed(int q0, int k0, int bm, int bn, const Tile& t) const {
    return mask != nullptr || t.block_type == 2 || k0 + bn > p.Lk || q0 + bm > p.Lq ||
           (p.causal && k0 + bn - 1 > q0 + p.causal_offset);
  }
  // The score in log2 units (x = s * scale * log2(e) + bias * log2(e)), -inf when hidden.
  __device__ float apply(float x, int row, int col, const Tile& t) const {
    if (col >= p.Lk || row >= p.Lq) return -CUDART_INF_F;
    if (p.causal && col > row + p.causal_offset) return -CUDART_INF_F;
    if (t.block_type == 2) {
      const int64_t at = t.partial_index * p.pm_s[0] + (row % p.block) * p.pm_s[1] + (col % p.block) * p.pm_s[2];
      if (!p.partial_masks[at]) return -CUDART_INF_F;
    }
    if (mask != nullptr) {
      const int64_t at = row * p.mask_s[3] + col * p.mask_s[4];
      constexpr float kLog2e = 1.4426950408889634f;
      switch (p.mask_kind) {
        case kBoolMask:
          if (!reinterpret_cast<const uint8_t*>(mask)[at]) return -CUDART_INF_F;
          break;
        case kFloat32Mask:
          x += reinterpret_cast<const float*>(mask)[at] * kLog2e;
          break;
        case kFloat16Mask:
          x += __half2float(reinterpret_cast<const __half*>(mask)[at]) * kLog2e;
          break;
        default:
          x += __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(mask)[at]) * kLog2e;
          break;
      }
    }
    return x;
  }
};

}  // namespace stfast
