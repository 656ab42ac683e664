// Warp-level building blocks for sm_80+: cp.async tile copies, ldmatrix, mma.sync
// m16n8k16 with fp32 accumulation, and the swizzled shared-memory tile layout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "params.h"

namespace stfast {

template <int DTYPE> struct Elem;
template <> struct Elem<kFloat16> { using T = __half; using T2 = __half2; };
template <> struct Elem<kBFloat16> { using T = __nv_bfloat16; using T2 = __nv_bfloat162; };

// Explicit conversions: torch builds CUDA code with the implicit half/bfloat16 ones disabled.
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// STFAST_SIMT: tests/simt runs these sources on the CPU; it replaces only the inline PTX
// below and the dynamic shared memory declaration.
#ifdef STFAST_SIMT
#define STFAST_DYNAMIC_SMEM(T, name) T* const name = static_cast<T*>(simt::dynamic_smem())
#else
#define STFAST_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A [rows, DP] tile stores row r's 16-byte chunk c at chunk c ^ (r & 7): the eight rows an
// ldmatrix phase reads then hit eight different bank groups (DP >= 64 keeps 8 chunks per row).
template <int DP>
__device__ __forceinline__ int swizzle(int row, int col) {
  static_assert(DP % 64 == 0, "swizzle needs at least 8 chunks of 16 bytes per row");
  return row * DP + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

// src_bytes 0 fills the 16 bytes with zeros (rows past L, columns past D) without reading.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
#ifdef STFAST_SIMT
  simt::cp_async(dst, src, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef STFAST_SIMT
  simt::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef STFAST_SIMT
  simt::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Copies rows [0, ROWS) of a strided global tile into a swizzled [ROWS, DP] shared tile.
template <typename T, int ROWS, int DP>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row_stride, int rows_valid,
                                          int cols_valid) {
  constexpr int kChunks = DP / 8;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool valid = r < rows_valid && c < cols_valid;
    const T* src = valid ? gmem + r * row_stride + c : gmem;
    cp_async_16(smem_addr(smem + swizzle<DP>(r, c)), src, valid);
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#ifdef STFAST_SIMT
  simt::ldmatrix_x4(r, addr, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#ifdef STFAST_SIMT
  simt::ldmatrix_x4(r, addr, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// The A operand (16 x 16, row-major) at rows [row0, row0+16), cols [col0, col0+16).
template <typename T, int DP>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* smem, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, smem_addr(smem + swizzle<DP>(row0 + lane % 16, col0 + (lane / 16) * 8)));
}

// B operands of two n8 tiles whose n index is the smem row: rows [n0, n0+16), k cols
// [k0, k0+16).  b[0..1] feed n-tile n0, b[2..3] n-tile n0+8.
template <typename T, int DP>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], const T* smem, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(b, smem_addr(smem + swizzle<DP>(n0 + (lane / 16) * 8 + lane % 8, k0 + ((lane / 8) % 2) * 8)));
}

// B operands of two n8 tiles whose k index is the smem row: k rows [k0, k0+16), n cols
// [n0, n0+16).  b[0..1] feed n-tile n0, b[2..3] n-tile n0+8.
template <typename T, int DP>
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[4], const T* smem, int k0, int n0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(b, smem_addr(smem + swizzle<DP>(k0 + ((lane / 8) % 2) * 8 + lane % 8, n0 + (lane / 16) * 8)));
}

template <int DTYPE>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<kFloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                    uint32_t b1) {
#ifdef STFAST_SIMT
  simt::mma_16816(c, a, b0, b1, kFloat16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<kBFloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
#ifdef STFAST_SIMT
  simt::mma_16816(c, a, b0, b1, kBFloat16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <int DTYPE>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<kFloat16>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<kBFloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The accumulators of n-tiles 2j and 2j+1 (a 16 x 16 block) as the A operand of the next mma.
template <int DTYPE, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&acc)[NT][4], int j) {
  a[0] = pack2<DTYPE>(acc[2 * j][0], acc[2 * j][1]);
  a[1] = pack2<DTYPE>(acc[2 * j][2], acc[2 * j][3]);
  a[2] = pack2<DTYPE>(acc[2 * j + 1][0], acc[2 * j + 1][1]);
  a[3] = pack2<DTYPE>(acc[2 * j + 1][2], acc[2 * j + 1][3]);
}

// Writes a warp's 16 x (8*NT) accumulator (times mul) to rows row0.. of a strided tensor.
template <int DTYPE, int NT>
__device__ __forceinline__ void store_acc(void* base, int64_t row_stride, int row0, int rows_valid,
                                          int cols_valid, const float (&acc)[NT][4], float mul) {
  using T2 = typename Elem<DTYPE>::T2;
  using T = typename Elem<DTYPE>::T;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + lane / 4 + h * 8;
    if (row >= rows_valid) continue;
    T* dst = static_cast<T*>(base) + row * row_stride;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int col = j * 8 + (lane % 4) * 2;
      if (col < cols_valid) {
        const uint32_t packed = pack2<DTYPE>(acc[j][2 * h] * mul, acc[j][2 * h + 1] * mul);
        *reinterpret_cast<T2*>(dst + col) = *reinterpret_cast<const T2*>(&packed);
      }
    }
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace stfast
