// Kernels that test the emulator itself (tests/test_simt_unit.py): csrc's ldmatrix/mma
// helpers against a matmul, the fp16/bf16 conversions, a double-buffered cp.async loop with
// planted races, and one kernel per check (bounds, alignment, deadlock, divergence, reads
// of never-written shared memory).  Built like a kernel unit, with -DSTFAST_SIMT.
#include "mma.cuh"

#define SIMT_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using namespace stfast;

struct MatmulArgs {
  const void* a;  // [16][16] row-major
  const void* b;  // [16][16]: [n][k] (trans 0) or [k][n] (trans 1)
  void* d;        // [16][16] of the same dtype
  int trans;
};

template <int DTYPE>
__global__ void matmul_kernel(const MatmulArgs args) {
  using T = typename Elem<DTYPE>::T;
  STFAST_DYNAMIC_SMEM(uint4, smem_raw);
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + 16 * 64;
  load_tile<T, 16, 64>(sA, static_cast<const T*>(args.a), 16, 16, 16);
  load_tile<T, 16, 64>(sB, static_cast<const T*>(args.b), 16, 16, 16);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  if (threadIdx.x >= 32) return;
  float acc[2][4] = {};
  uint32_t a[4], b[4];
  load_a<T, 64>(a, sA, 0, 0);
  if (args.trans)
    load_b_cols<T, 64>(b, sB, 0, 0);
  else
    load_b_rows<T, 64>(b, sB, 0, 0);
  mma_16816<DTYPE>(acc[0], a, b[0], b[1]);
  mma_16816<DTYPE>(acc[1], a, b[2], b[3]);
  store_acc<DTYPE, 2>(args.d, 16, 0, 16, 16, acc, 1.f);
}

struct PipeArgs {
  const __half* src;  // [tiles][128][8]
  float* out;         // [128]
  int tiles;
  int variant;  // 0 correct, 1 no barrier before a buffer is refilled, 2 wait_group 2
};

// Each thread copies one 16-byte chunk per tile into a double buffer; warp w then reads
// (ldmatrix) the chunks that warp w+1 copied, so every read depends on other threads.
__global__ void pipeline_kernel(const PipeArgs args) {
  STFAST_DYNAMIC_SMEM(uint4, smem_raw);
  __half* buf = reinterpret_cast<__half*>(smem_raw);  // [2][128][8]
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  auto load = [&](int tile) {
    cp_async_16(smem_addr(buf + ((tile & 1) * 128 + t) * 8), args.src + (tile * 128 + t) * 8, true);
    cp_async_commit();
  };
  float sum = 0.f;
  load(0);
  for (int it = 0; it < args.tiles; ++it) {
    if (it + 1 < args.tiles) {
      load(it + 1);
      if (args.variant == 2)
        cp_async_wait<2>();
      else
        cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    uint32_t r[4];
    ldmatrix_x4(r, smem_addr(buf + ((it & 1) * 128 + ((warp + 1) % 4) * 32 + lane) * 8));
    for (int i = 0; i < 4; ++i)
      sum += __half2float(__half{static_cast<uint16_t>(r[i] & 0xffffu)}) +
             __half2float(__half{static_cast<uint16_t>(r[i] >> 16)});
    if (args.variant != 1) __syncthreads();
  }
  args.out[t] = sum;
}

struct CheckArgs {
  const __half* src;  // [128 * 8]
  float* out;         // [128]
  int which;
};

// One planted fault per `which`; the emulator must stop each with a report.
__global__ void checks_kernel(const CheckArgs args) {
  STFAST_DYNAMIC_SMEM(uint4, smem_raw);
  __half* s = reinterpret_cast<__half*>(smem_raw);  // [128][8]
  const int t = threadIdx.x;
  float v = 0.f;
  switch (args.which) {
    case 0:  // plain load past the end of a tensor
      v = __half2float(args.src[(t + 1) * 8]);
      break;
    case 1:  // cp.async from a misaligned global address
      cp_async_16(smem_addr(s + t * 8), args.src + t * 8 + 1, true);
      cp_async_commit();
      cp_async_wait<0>();
      break;
    case 2:  // cp.async past the end of dynamic shared memory
      cp_async_16(smem_addr(s + (t + 1) * 8), args.src + t * 8, true);
      cp_async_commit();
      cp_async_wait<0>();
      break;
    case 3: {  // ldmatrix of shared memory nobody wrote
      uint32_t r[4];
      ldmatrix_x4(r, smem_addr(s + t * 8));
      v = static_cast<float>(r[0]);
      break;
    }
    case 4:  // lane 0 at a shuffle, everyone else at a barrier
      if (t == 0)
        v = quad_sum(1.f);
      else
        __syncthreads();
      break;
    case 5:  // half a warp at one shuffle, half at another
      v = t % 32 < 16 ? __shfl_xor_sync(0xffffffffu, 1.f, 1) : __shfl_xor_sync(0xffffffffu, 2.f, 1);
      break;
    case 6:  // exits with a cp.async never waited for
      cp_async_16(smem_addr(s + t * 8), args.src + t * 8, true);
      cp_async_commit();
      break;
  }
  args.out[t] = v;
}

}  // namespace

SIMT_EXPORT int simt_selftest_matmul(const void* a, const void* b, void* d, int dtype, int trans) {
  const MatmulArgs args{a, b, d, trans};
  const int smem = 2 * 16 * 64 * 2;
  return dtype == kFloat16 ? simt::launch(matmul_kernel<kFloat16>, dim3(1), kThreads, smem, nullptr, args)
                           : simt::launch(matmul_kernel<kBFloat16>, dim3(1), kThreads, smem, nullptr, args);
}

SIMT_EXPORT int simt_selftest_pipeline(const void* src, float* out, int tiles, int variant) {
  const PipeArgs args{static_cast<const __half*>(src), out, tiles, variant};
  return simt::launch(pipeline_kernel, dim3(1), kThreads, 2 * 128 * 16, nullptr, args);
}

SIMT_EXPORT int simt_selftest_check(const void* src, float* out, int which) {
  const CheckArgs args{static_cast<const __half*>(src), out, which};
  return simt::launch(checks_kernel, dim3(1), kThreads, 128 * 16, nullptr, args);
}

SIMT_EXPORT void simt_selftest_round(const float* x, uint16_t* half_bits, uint16_t* bf16_bits, int n) {
  for (int i = 0; i < n; ++i) {
    half_bits[i] = __float2half_rn(x[i]).x;
    bf16_bits[i] = __float2bfloat16_rn(x[i]).x;
  }
}

SIMT_EXPORT void simt_selftest_widen(const uint16_t* bits, float* from_half, float* from_bf16, int n) {
  for (int i = 0; i < n; ++i) {
    from_half[i] = __half2float(__half{bits[i]});
    from_bf16[i] = __bfloat162float(__nv_bfloat16{bits[i]});
  }
}
