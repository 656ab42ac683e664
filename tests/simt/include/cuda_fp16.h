// __half for the emulator (tests/simt): storage plus the conversions csrc/ uses.
#pragma once

#include "simt/device.h"

struct alignas(2) __half {
  uint16_t x;
};
struct alignas(4) __half2 {
  __half x, y;
};
inline float __half2float(__half h) { return simt::half_bits_to_float(h.x); }
inline __half __float2half_rn(float f) { return {simt::float_to_half_bits(f)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  return simt::shfl_xor(mask, value, lane_mask);
}
inline size_t __cvta_generic_to_shared(const void* p) { return simt::smem_offset(p); }
