// Device-side CUDA as the emulator provides it: qualifiers, the thread coordinates of
// the running fiber, __half/__nv_bfloat16 with round-to-nearest-even conversions, and the
// calls that suspend a fiber (barriers, warp collectives, cp.async waits).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace simt {

struct Coords {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern Coords* g_coords;  // the running fiber's

// Suspending calls; `site` of each is its caller's return address (for divergence checks
// and reports).
void syncthreads();
float shfl_xor(unsigned mask, float value, int lane_mask);
void cp_async(uint32_t smem_dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr, bool trans);
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, int dtype);
uint32_t smem_offset(const void* generic);
void* dynamic_smem();

using KernelBody = void (*)(void* ctx);
cudaError_t run_grid(dim3 grid, dim3 block, int smem_bytes, KernelBody body, void* ctx, const void* kernel);

template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, int smem_bytes, cudaStream_t, const Params& p) {
  struct Ctx {
    Kernel kernel;
    const Params* p;
  } ctx{kernel, &p};
  return run_grid(grid, block, smem_bytes, [](void* c) { static_cast<Ctx*>(c)->kernel(*static_cast<Ctx*>(c)->p); },
                  &ctx, reinterpret_cast<const void*>(kernel));
}

// IEEE binary16 / bfloat16 conversions, round to nearest even (the *_rn intrinsics).
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {                         // below 2^-14: a subnormal half
    float a;
    memcpy(&a, &ax, 4);
    return sign | static_cast<uint16_t>(lrintf(a * 16777216.0f));  // exact scaling, RNE
  }
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u) - (112u << 23);
  return sign | static_cast<uint16_t>(rounded >> 13);
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &x, 4);
  return f;
}

}  // namespace simt

#define threadIdx (::simt::g_coords->thread_idx)
#define blockIdx (::simt::g_coords->block_idx)
#define blockDim (::simt::g_coords->block_dim)
#define gridDim (::simt::g_coords->grid_dim)
#define __syncthreads() ::simt::syncthreads()

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
