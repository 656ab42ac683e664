// The binding's launch_fwd/launch_bwd for the emulator: each forwards to the launcher
// that the loaded kernel unit registered (units are built and loaded separately, so
// a mutated kernel header rebuilds only the units a test needs).
#include "params.h"

extern "C" void* simt_launcher(int pass, int dtype, int dp);

namespace stfast {

using Launcher = cudaError_t (*)(const AttnParams&, cudaStream_t);

template <int DTYPE, int DP>
cudaError_t launch_fwd(const AttnParams& p, cudaStream_t stream) {
  const auto fn = reinterpret_cast<Launcher>(simt_launcher(0, DTYPE, DP));
  return fn ? fn(p, stream) : cudaErrorNotSupported;
}

template <int DTYPE, int DP>
cudaError_t launch_bwd(const AttnParams& p, cudaStream_t stream) {
  const auto fn = reinterpret_cast<Launcher>(simt_launcher(1, DTYPE, DP));
  return fn ? fn(p, stream) : cudaErrorNotSupported;
}

#define SIMT_UNITS(DT)                                                                                  \
  template cudaError_t launch_fwd<DT, 64>(const AttnParams&, cudaStream_t);                             \
  template cudaError_t launch_fwd<DT, 128>(const AttnParams&, cudaStream_t);                            \
  template cudaError_t launch_fwd<DT, 192>(const AttnParams&, cudaStream_t);                            \
  template cudaError_t launch_fwd<DT, 256>(const AttnParams&, cudaStream_t);                            \
  template cudaError_t launch_bwd<DT, 64>(const AttnParams&, cudaStream_t);                             \
  template cudaError_t launch_bwd<DT, 128>(const AttnParams&, cudaStream_t);                            \
  template cudaError_t launch_bwd<DT, 192>(const AttnParams&, cudaStream_t);                            \
  template cudaError_t launch_bwd<DT, 256>(const AttnParams&, cudaStream_t);
SIMT_UNITS(kFloat16)
SIMT_UNITS(kBFloat16)

}  // namespace stfast
