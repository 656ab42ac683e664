// __nv_bfloat16 for the emulator (tests/simt): storage plus the conversions csrc/ uses.
#pragma once

#include "cuda_fp16.h"

struct alignas(2) __nv_bfloat16 {
  uint16_t x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __bfloat162float(__nv_bfloat16 b) { return simt::bf16_bits_to_float(b.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {simt::float_to_bf16_bits(f)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
