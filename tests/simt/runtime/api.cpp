// The CUDA runtime calls csrc/ makes on the host, answered for the emulated device, and
// the C interface the Python runner drives through ctypes: configuration, the last
// report, and the registry of launchers that each separately built kernel unit fills.
#include <cstring>
#include <map>
#include <tuple>

#include "runtime.h"

namespace simt {

Report g_report;

namespace {

cudaError_t g_last_error = cudaSuccess;
std::map<const void*, int> g_max_dynamic_smem;
std::map<std::tuple<int, int, int>, void*> g_launchers;  // (pass, dtype, padded head dim)
std::string g_message;

void set_report(const std::string& kind, const std::string& message) {
  g_report = Report{};
  g_report.kind = kind;
  g_report.message = message;
}

}  // namespace

bool check_launch(const void* kernel, dim3 block, int smem_bytes) {
  const unsigned threads = block.x * block.y * block.z;
  std::string problem;
  if (threads == 0 || threads > 1024) problem = "block of " + std::to_string(threads) + " threads";
  const auto it = g_max_dynamic_smem.find(kernel);
  const int allowed = it == g_max_dynamic_smem.end() ? 48 * 1024 : it->second;
  if (smem_bytes > allowed)
    problem = std::to_string(smem_bytes) + " bytes of dynamic shared memory, but the kernel allows " +
              std::to_string(allowed) + " (cudaFuncSetAttribute MaxDynamicSharedMemorySize)";
  if (problem.empty()) return true;
  set_report("launch", "invalid launch: " + problem);
  record_launch(cudaErrorInvalidConfiguration);
  return false;
}

void record_launch(cudaError_t result) {
  if (result != cudaSuccess && g_last_error == cudaSuccess) g_last_error = result;
  if (result == cudaSuccess) g_report = Report{};
}

}  // namespace simt

using simt::g_config;
using simt::g_report;

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// One emulated device: the binding asks with CPU tensors' device index (-1).
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = g_config.num_sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = g_config.smem_optin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = simt::g_last_error;
  simt::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  if (g_report.kind.empty()) return "emulated CUDA error";
  simt::g_message = "simt " + g_report.kind + ": " + g_report.message;
  return simt::g_message.c_str();
}

cudaError_t simt_func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > g_config.smem_optin)
    return cudaErrorInvalidValue;
  simt::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

void simt_configure(int schedule, uint64_t seed, int smem_optin, int num_sms) {
  g_config.schedule = schedule;
  g_config.seed = seed;
  g_config.smem_optin = smem_optin;
  g_config.num_sms = num_sms;
}

// The last launch's report: kind, message and "object+0xoffset" (empty when it passed).
const char* simt_report_field(int which) {
  switch (which) {
    case 0: return g_report.kind.c_str();
    case 1: return g_report.message.c_str();
    default: return g_report.location.c_str();
  }
}
int simt_report_int(int which) { return which < 3 ? g_report.block[which] : g_report.thread; }
void simt_clear_report() {
  g_report = simt::Report{};
  simt::g_last_error = cudaSuccess;
}

void simt_clear_launchers() { simt::g_launchers.clear(); }
void simt_register_launcher(int pass, int dtype, int dp, void* fn) { simt::g_launchers[{pass, dtype, dp}] = fn; }
void* simt_launcher(int pass, int dtype, int dp) {
  const auto it = simt::g_launchers.find({pass, dtype, dp});
  if (it != simt::g_launchers.end()) return it->second;
  simt::set_report("launch", "no emulated kernel unit is loaded for pass " + std::to_string(pass) + " dtype " +
                                 std::to_string(dtype) + " head dim " + std::to_string(dp));
  return nullptr;
}

}  // extern "C"
