// Host-side launchers: grid shapes, the dynamic shared-memory opt-in read from the
// device, and the launch error of every kernel returned to the binding.
#pragma once

#include <cuda_runtime.h>

#include "bwd_kernel.cuh"
#include "fwd_kernel.cuh"

namespace stfast {

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, int smem, const AttnParams& p, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (smem > optin) return cudaErrorInvalidConfiguration;  // the binding checks first, with a message
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
#ifdef STFAST_SIMT
  if ((err = simt::launch(kernel, grid, kThreads, smem, stream, p)) != cudaSuccess) return err;
#else
  kernel<<<grid, kThreads, smem, stream>>>(p);
#endif
  return cudaGetLastError();
}

inline unsigned batch_count(const AttnParams& p) {
  return static_cast<unsigned>(static_cast<int64_t>(p.B0) * p.B1 * p.B2);
}

template <int DTYPE, int DP>
cudaError_t launch_fwd(const AttnParams& p, cudaStream_t stream) {
  const dim3 grid(batch_count(p), (p.Lq + fwd_block_m(DP) - 1) / fwd_block_m(DP));
  return launch(fwd_kernel<DTYPE, DP>, grid, fwd_smem_bytes(DP), p, stream);
}

template <int DTYPE, int DP>
cudaError_t launch_bwd(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(batch_count(p)) * p.Lq;
  // Enough warps to cover every row once, but no more than the GPU keeps resident.
  const int64_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  const dim3 delta_grid(static_cast<unsigned>(blocks < p.num_sms * 16LL ? blocks : p.num_sms * 16LL));
  cudaError_t err = launch(delta_kernel<DTYPE, DP>, delta_grid, 0, p, stream);
  if (err != cudaSuccess) return err;
  const dim3 dkdv_grid(batch_count(p) / p.kv_group, (p.Lk + dkdv_block_n(DP) - 1) / dkdv_block_n(DP));
  err = launch(dkdv_kernel<DTYPE, DP>, dkdv_grid, dkdv_smem_bytes(DP), p, stream);
  if (err != cudaSuccess) return err;
  const dim3 dq_grid(batch_count(p), (p.Lq + fwd_block_m(DP) - 1) / fwd_block_m(DP));
  return launch(dq_kernel<DTYPE, DP>, dq_grid, dq_smem_bytes(DP), p, stream);
}

}  // namespace stfast
