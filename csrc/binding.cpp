// The torch binding of the CUDA kernels: validates the lowered 5-D views (device, dtype,
// shapes, strides, alignment, schedule tables), fills AttnParams with their strides (no
// copies) and launches on the current stream.  Bad input raises ValueError/TypeError.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "params.h"

namespace stfast {
namespace {

constexpr int kHeadDims[] = {64, 128, 192, 256};
constexpr int kMaxHeadDim = 256;

int padded_head_dim(int d) {
  for (int dp : kHeadDims)
    if (d <= dp) return dp;
  return 0;
}

void check_view(const at::Tensor& t, const char* name, const at::Device& device, bool output) {
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK_VALUE(t.stride(-1) == 1, name, " must have stride 1 in its last dim, got strides ", t.strides());
  for (int i = 0; i < t.dim() - 1; ++i) {
    TORCH_CHECK_VALUE(t.size(i) <= 1 || t.stride(i) % 8 == 0, name, " must have strides that are multiples of 8 elements "
                      "(16-byte rows), got strides ", t.strides());
  }
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                    " must start at a 16-byte aligned address");
  if (output) {
    for (int i = 0; i < t.dim(); ++i)
      TORCH_CHECK_VALUE(t.size(i) <= 1 || t.stride(i) != 0, name, " is written and must not have stride 0 "
                        "in dim ", i, ", got strides ", t.strides());
  }
}

void copy_strides(int64_t* dst, const at::Tensor& t, int n) {
  for (int i = 0; i < n; ++i) dst[i] = t.stride(i);
}

void check_shape(const at::Tensor& t, const char* name, std::vector<int64_t> expected) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), name, " must have shape ", at::IntArrayRef(expected),
                    ", got ", t.sizes());
}

// Fills everything the forward and backward passes share.
AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                       const at::Tensor& lse, const std::optional<at::Tensor>& mask,
                       const std::vector<at::Tensor>& tables, int64_t block, const std::vector<int64_t>& head_strides,
                       int64_t causal, double scale) {
#ifndef STFAST_SIMT  // tests/simt runs the kernels on CPU tensors
  TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
#endif
  const auto device = q.device();
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 5, "q must be a 5-D [B0, B1, B2, L, D] view, got shape ", q.sizes());
  const int64_t B0 = q.size(0), B1 = q.size(1), B2 = q.size(2), Lq = q.size(3), D = q.size(4);
  TORCH_CHECK_VALUE(k.dim() == 5 && v.dim() == 5, "k and v must be 5-D views, got shapes ", k.sizes(), " and ",
                    v.sizes());
  const int64_t Lk = k.size(3);
  check_shape(k, "k", {B0, B1, B2, Lk, D});
  check_shape(v, "v", {B0, B1, B2, Lk, D});
  check_shape(out, "out", {B0, B1, B2, Lq, D});
  check_shape(lse, "lse", {B0, B1, B2, Lq});
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k, &v, &out})
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "q, k, v and out must share q's dtype ",
                     q.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(D % 8 == 0 && D <= kMaxHeadDim, "head dim must be a multiple of 8 up to ", kMaxHeadDim,
                    ", got ", D);
  TORCH_CHECK_VALUE(Lq >= 1 && Lk >= 1, "sequence lengths must be >= 1, got Lq=", Lq, " Lk=", Lk);
  TORCH_CHECK_VALUE(B0 * B1 * B2 <= INT32_MAX, "batch B0*B1*B2 must be < 2^31, got ", B0 * B1 * B2);
  TORCH_CHECK_VALUE((Lq + 63) / 64 <= 65535 && (Lk + 63) / 64 <= 65535, "sequence lengths must be < 4194304, got Lq=",
                    Lq, " Lk=", Lk);
  TORCH_CHECK_VALUE(causal >= 0 && causal <= 2, "causal must be 0 (none), 1 (top_left) or 2 (bottom_right), got ",
                    causal);
  check_view(q, "q", device, false);
  check_view(k, "k", device, false);
  check_view(v, "v", device, false);
  check_view(out, "out", device, false);
  TORCH_CHECK_VALUE(lse.device() == device, "lse must be on ", device, ", got ", lse.device());
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK_VALUE(lse.size(i) <= 1 || lse.stride(i) != 0, "lse is written and must not have stride 0 in dim ",
                      i, ", got strides ", lse.strides());

  AttnParams p{};
  p.q = q.data_ptr(); copy_strides(p.q_s, q, 4);
  p.k = k.data_ptr(); copy_strides(p.k_s, k, 4);
  p.v = v.data_ptr(); copy_strides(p.v_s, v, 4);
  p.o = out.data_ptr(); copy_strides(p.o_s, out, 4);
  p.lse = lse.data_ptr<float>(); copy_strides(p.lse_s, lse, 4);
  p.B0 = B0; p.B1 = B1; p.B2 = B2; p.Lq = Lq; p.Lk = Lk; p.D = D;
  p.scale = static_cast<float>(scale);
  p.causal = causal != 0;
  p.causal_offset = causal == 2 ? static_cast<int>(Lk - Lq) : 0;
  p.kv_group = 1;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, device.index()));

  p.mask_kind = kNoMask;
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK_VALUE(m.device() == device, "mask must be on ", device, ", got ", m.device());
    check_shape(m, "mask", {B0, B1, B2, Lq, Lk});
    switch (m.scalar_type()) {
      case at::kBool: p.mask_kind = kBoolMask; break;
      case at::kFloat: p.mask_kind = kFloat32Mask; break;
      case at::kHalf: p.mask_kind = kFloat16Mask; break;
      case at::kBFloat16: p.mask_kind = kBFloat16Mask; break;
      default: TORCH_CHECK_TYPE(false, "mask must be bool, float32, float16 or bfloat16, got ", m.scalar_type());
    }
    p.mask = m.data_ptr();
    copy_strides(p.mask_s, m, 5);
  }

  p.block = 0;
  if (!tables.empty()) {
    TORCH_CHECK_VALUE(tables.size() == 7, "tables must hold the 7 LoweredLayout tensors, got ", tables.size());
    TORCH_CHECK_VALUE(block > 0 && block % kLayoutBlockMultiple == 0, "layout block must be a multiple of ",
                      kLayoutBlockMultiple, ", got ", block);
    const auto &bt = tables[0], &pi = tables[1], &pm = tables[2], &kc = tables[3], &ki = tables[4],
               &qc = tables[5], &qi = tables[6];
    const char* names[] = {"block_type", "partial_index", "partial_masks", "kv_counts", "kv_indices", "q_counts",
                           "q_indices"};
    const at::ScalarType types[] = {at::kChar, at::kInt, at::kBool, at::kInt, at::kInt, at::kInt, at::kInt};
    for (int i = 0; i < 7; ++i) {
      TORCH_CHECK_VALUE(tables[i].device() == device, names[i], " must be on ", device, ", got ",
                        tables[i].device());
      TORCH_CHECK_TYPE(tables[i].scalar_type() == types[i], names[i], " must be ", types[i], ", got ",
                       tables[i].scalar_type());
    }
    const int64_t H = bt.size(0), Mq = (Lq + block - 1) / block, Mk = (Lk + block - 1) / block;
    check_shape(bt, "block_type", {H, Mq, Mk});
    check_shape(pi, "partial_index", {H, Mq, Mk});
    TORCH_CHECK_VALUE(pm.dim() == 3 && pm.size(1) == block && pm.size(2) == block,
                      "partial_masks must have shape [P, ", block, ", ", block, "], got ", pm.sizes());
    check_shape(kc, "kv_counts", {H, Mq});
    check_shape(ki, "kv_indices", {H, Mq, Mk});
    check_shape(qc, "q_counts", {H, Mk});
    check_shape(qi, "q_indices", {H, Mk, Mq});
    TORCH_CHECK_VALUE(head_strides.size() == 3, "head_strides must have 3 entries, got ", head_strides.size());
    const int64_t last_head = (B0 - 1) * head_strides[0] + (B1 - 1) * head_strides[1] + (B2 - 1) * head_strides[2];
    TORCH_CHECK_VALUE(head_strides[0] >= 0 && head_strides[1] >= 0 && head_strides[2] >= 0 && last_head < H,
                      "head_strides ", at::IntArrayRef(head_strides), " address layout head ", last_head,
                      " but the layout has ", H, " heads");
    p.block = block;
    p.block_type = bt.data_ptr<int8_t>(); copy_strides(p.bt_s, bt, 3);
    p.partial_index = pi.data_ptr<int32_t>(); copy_strides(p.pi_s, pi, 3);
    p.partial_masks = reinterpret_cast<const uint8_t*>(pm.data_ptr<bool>()); copy_strides(p.pm_s, pm, 3);
    p.kv_counts = kc.data_ptr<int32_t>(); copy_strides(p.kc_s, kc, 2);
    p.kv_indices = ki.data_ptr<int32_t>(); copy_strides(p.ki_s, ki, 3);
    p.q_counts = qc.data_ptr<int32_t>(); copy_strides(p.qc_s, qc, 2);
    p.q_indices = qi.data_ptr<int32_t>(); copy_strides(p.qi_s, qi, 3);
    for (int i = 0; i < 3; ++i) p.head_s[i] = head_strides[i];
  }
  return p;
}

void check_smem(int needed, const at::Device& device) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
  TORCH_CHECK_VALUE(needed <= optin, "this head dim needs ", needed, " bytes of shared memory per block; the "
                    "device allows ", optin);
}

template <bool kForward>
void dispatch(const AttnParams& p, at::ScalarType dtype, const at::Device& device) {
  const int dp = padded_head_dim(p.D);
  check_smem(kForward ? fwd_smem_bytes(dp) : std::max(dq_smem_bytes(dp), dkdv_smem_bytes(dp)), device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaError_t err = cudaErrorInvalidValue;
#define STFAST_CASE(DT, DP)                                                                     \
  if (dp == DP) err = kForward ? launch_fwd<DT, DP>(p, stream) : launch_bwd<DT, DP>(p, stream);
  if (dtype == at::kHalf) {
    STFAST_CASE(kFloat16, 64) STFAST_CASE(kFloat16, 128) STFAST_CASE(kFloat16, 192) STFAST_CASE(kFloat16, 256)
  } else {
    STFAST_CASE(kBFloat16, 64) STFAST_CASE(kBFloat16, 128) STFAST_CASE(kBFloat16, 192) STFAST_CASE(kBFloat16, 256)
  }
#undef STFAST_CASE
  TORCH_CHECK(err == cudaSuccess, "stfast CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             const std::optional<at::Tensor>& mask, const std::vector<at::Tensor>& tables, int64_t block,
             const std::vector<int64_t>& head_strides, int64_t causal, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const AttnParams p = make_params(q, k, v, out, lse, mask, tables, block, head_strides, causal, scale);
  check_view(out, "out", q.device(), true);
  dispatch<true>(p, q.scalar_type(), q.device());
}

void backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& dout, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              const std::optional<at::Tensor>& mask, const std::vector<at::Tensor>& tables, int64_t block,
              const std::vector<int64_t>& head_strides, int64_t causal, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttnParams p = make_params(q, k, v, out, lse, mask, tables, block, head_strides, causal, scale);
  const auto device = q.device();
  check_shape(dout, "dout", q.sizes().vec());
  check_shape(dq, "dq", q.sizes().vec());
  check_shape(dk, "dk", k.sizes().vec());
  check_shape(dv, "dv", v.sizes().vec());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&dout, &dq, &dk, &dv})
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "dout and the gradients must have q's dtype ",
                     q.scalar_type(), ", got ", t->scalar_type());
  check_view(dout, "dout", device, false);
  check_view(dq, "dq", device, true);
  // dk/dv shared over b2 (GQA: stride 0) are summed over the group by one CTA.
  const bool shared = p.B2 > 1 && dk.stride(2) == 0;
  TORCH_CHECK_VALUE(shared == (p.B2 > 1 && dv.stride(2) == 0), "dk and dv must both or neither be shared "
                    "over dim 2, got strides ", dk.strides(), " and ", dv.strides());
  // The summing CTA loads k/v of b2 = 0 only, which is right only when every b2 reads them.
  TORCH_CHECK_VALUE(!shared || (k.stride(2) == 0 && v.stride(2) == 0), "dk and dv shared over dim 2 (stride 0) "
                    "need k and v shared over dim 2 too, got k strides ", k.strides(), " and v strides ",
                    v.strides());
  auto check_grad = [&](const at::Tensor& g, const char* name) {
    check_view(g, name, device, false);
    for (int i = 0; i < 5; ++i)
      TORCH_CHECK_VALUE(g.size(i) <= 1 || g.stride(i) != 0 || (i == 2 && shared), name,
                        " is written and must not have stride 0 in dim ", i, ", got strides ", g.strides());
  };
  check_grad(dk, "dk");
  check_grad(dv, "dv");
  at::Tensor delta = at::empty({p.B0 * p.B1 * p.B2, p.Lq}, q.options().dtype(at::kFloat));
  p.dout = dout.data_ptr(); copy_strides(p.do_s, dout, 4);
  p.dq = dq.data_ptr(); copy_strides(p.dq_s, dq, 4);
  p.dk = dk.data_ptr(); copy_strides(p.dk_s, dk, 4);
  p.dv = dv.data_ptr(); copy_strides(p.dv_s, dv, 4);
  p.delta = delta.data_ptr<float>();
  p.kv_group = shared ? p.B2 : 1;
  dispatch<false>(p, q.scalar_type(), device);
}

}  // namespace
}  // namespace stfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stfast CUDA attention kernels (forward and deterministic backward, fp16/bf16)";
  m.def("forward", &stfast::forward, "Fill out5 and lse5 for a lowered problem");
  m.def("backward", &stfast::backward, "Fill dq5, dk5 and dv5 for a lowered problem");
  m.attr("head_dims") = std::vector<int>(std::begin(stfast::kHeadDims), std::end(stfast::kHeadDims));
  m.attr("max_head_dim") = stfast::kMaxHeadDim;
  m.attr("layout_block_multiple") = stfast::kLayoutBlockMultiple;
  // {padded head dim: (forward, backward) dynamic shared memory}, for stfast.cuda.smem_bytes to be checked against.
  pybind11::dict smem;
  for (int dp : stfast::kHeadDims)
    smem[pybind11::int_(dp)] = pybind11::make_tuple(
        stfast::fwd_smem_bytes(dp), std::max(stfast::dq_smem_bytes(dp), stfast::dkdv_smem_bytes(dp)));
  m.attr("smem_bytes") = smem;
}
