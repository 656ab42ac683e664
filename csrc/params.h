// The lowered attention problem as plain data, shared by the torch binding (host C++)
// and the kernel files (CUDA, no torch headers), plus the tile configuration of every
// kernel so the binding can check shared-memory needs before it launches anything.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __CUDACC__
#define STFAST_HOST_DEVICE __host__ __device__
#else
#define STFAST_HOST_DEVICE
#endif

namespace stfast {

enum DType : int { kFloat16 = 0, kBFloat16 = 1 };
enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kFloat32Mask = 2, kFloat16Mask = 3, kBFloat16Mask = 4 };

// Strides are in elements; index order is (b0, b1, b2, row) and the last dim has stride 1.
struct AttnParams {
  const void* q; int64_t q_s[4];
  const void* k; int64_t k_s[4];
  const void* v; int64_t v_s[4];
  void* o; int64_t o_s[4];
  float* lse; int64_t lse_s[4];

  int B0, B1, B2, Lq, Lk, D;
  float scale;
  bool causal;
  int causal_offset;  // query i sees keys j <= i + causal_offset

  const void* mask; int mask_kind; int64_t mask_s[5];  // (b0, b1, b2, row, col)

  int block;  // 0: dense schedule; else block size of the layout tables below
  const int8_t* block_type; int64_t bt_s[3];
  const int32_t* partial_index; int64_t pi_s[3];
  const uint8_t* partial_masks; int64_t pm_s[3];
  const int32_t* kv_counts; int64_t kc_s[2];
  const int32_t* kv_indices; int64_t ki_s[3];
  const int32_t* q_counts; int64_t qc_s[2];
  const int32_t* q_indices; int64_t qi_s[3];
  int64_t head_s[3];

  // Backward only.
  const void* dout; int64_t do_s[4];
  void* dq; int64_t dq_s[4];
  void* dk; int64_t dk_s[4];
  void* dv; int64_t dv_s[4];
  float* delta;    // [B0*B1*B2, Lq] workspace: rowsum(dout * out)
  int kv_group;    // B2 when dk/dv are shared over b2 (GQA) and summed in one CTA, else 1
  int num_sms;
};

constexpr int kThreads = 128;  // four warps; each owns 16 rows of a tile

// Tile sizes per padded head dim DP (64, 128 or 256), chosen to fit sm_80's 163 KiB.
STFAST_HOST_DEVICE constexpr int fwd_block_m(int) { return 64; }
STFAST_HOST_DEVICE constexpr int fwd_block_n(int dp) { return dp > 128 ? 32 : 64; }
STFAST_HOST_DEVICE constexpr int dkdv_block_n(int) { return 64; }
STFAST_HOST_DEVICE constexpr int dkdv_block_m(int dp) { return dp > 128 ? 32 : 64; }

STFAST_HOST_DEVICE constexpr int fwd_smem_bytes(int dp) { return (fwd_block_m(dp) + 4 * fwd_block_n(dp)) * dp * 2; }
STFAST_HOST_DEVICE constexpr int dq_smem_bytes(int dp) { return (2 * fwd_block_m(dp) + 4 * fwd_block_n(dp)) * dp * 2; }
STFAST_HOST_DEVICE constexpr int dkdv_smem_bytes(int dp) {
  return (2 * dkdv_block_n(dp) + 4 * dkdv_block_m(dp)) * dp * 2 + 4 * dkdv_block_m(dp) * 4;
}

// Layout blocks must tile into whole kernel tiles in both directions.
constexpr int kLayoutBlockMultiple = 64;

template <int DTYPE, int DP> cudaError_t launch_fwd(const AttnParams& p, cudaStream_t stream);
template <int DTYPE, int DP> cudaError_t launch_bwd(const AttnParams& p, cudaStream_t stream);

}  // namespace stfast
