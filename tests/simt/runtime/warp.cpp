// Warp-synchronous operations: every lane deposits its operands and suspends; the last
// lane to arrive checks that all 32 reached the same op at the same call site and computes
// for the warp from the PTX ISA fragment tables (shfl.sync.bfly, ldmatrix .x4 [.trans],
// mma.sync.m16n8k16.row.col with fp32 accumulation).
#include <cstring>

#include "runtime.h"

namespace simt {
namespace {

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShfl: return "__shfl_xor_sync";
    case WarpOp::kLdmatrix: return "ldmatrix.x4";
    case WarpOp::kLdmatrixTrans: return "ldmatrix.x4.trans";
    case WarpOp::kMmaF16: return "mma.m16n8k16.f16";
    case WarpOp::kMmaBF16: return "mma.m16n8k16.bf16";
    default: return "none";
  }
}

void collective(WarpOp op, const void* site, const void* in, size_t in_bytes, void* out, size_t out_bytes) {
  Grid& g = *g_grid;
  Fiber& f = *g_fiber;
  const int lane = f.tid % 32, base = f.tid - lane;
  Warp& w = g.warps[f.tid / 32];
  if (base + 32 > static_cast<int>(g.fibers.size()))
    fail("divergence", std::string(op_name(op)) + " in a partial warp", site);
  if (w.arrived == 0) {
    w.op = op;
    w.site = site;
  } else if (w.op != op || w.site != site) {
    fail("divergence", std::string("lanes of warp ") + std::to_string(f.tid / 32) + " reach different warp ops (" +
                           op_name(w.op) + " and " + op_name(op) + ") or call sites",
         site);
  }
  for (int l = 0; l < 32; ++l)
    if (g.fibers[base + l].state == State::kExited)
      fail("divergence", std::string(op_name(op)) + " with full mask while lane " + std::to_string(l) + " has exited",
           site);
  memcpy(w.in[lane], in, in_bytes);
  if (++w.arrived < 32) {
    suspend(State::kWarp, site);
  } else {
    run_warp_op(w, op);
    w.arrived = 0;
    w.op = WarpOp::kNone;
    for (int l = 0; l < 32; ++l)
      if (l != lane) g.fibers[base + l].state = State::kReady;
  }
  memcpy(out, w.out[lane], out_bytes);
}

float element(uint16_t bits, WarpOp op) {
  return op == WarpOp::kMmaF16 ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
}
uint16_t lo(uint32_t x) { return static_cast<uint16_t>(x & 0xffffu); }
uint16_t hi(uint32_t x) { return static_cast<uint16_t>(x >> 16); }

}  // namespace

void run_warp_op(Warp& w, WarpOp op) {
  const int base = g_fiber->tid - g_fiber->tid % 32;
  switch (op) {
    case WarpOp::kShfl: {
      for (int l = 0; l < 32; ++l) {
        int lane_mask;
        memcpy(&lane_mask, w.in[l] + 4, 4);
        memcpy(w.out[l], w.in[(l ^ lane_mask) & 31], 4);
      }
      break;
    }
    case WarpOp::kLdmatrix:
    case WarpOp::kLdmatrixTrans: {
      // Matrix i's 8 rows come from the addresses of lanes 8i..8i+7; lane l receives
      // row l/4, columns 2(l%4), 2(l%4)+1 (transposed: rows 2(l%4), 2(l%4)+1 of column l/4).
      uint16_t m[4][8][8];
      for (int l = 0; l < 32; ++l) {
        uint32_t addr;
        memcpy(&addr, w.in[l], 4);
        smem_read(addr, base + l, op_name(op), w.site);
        memcpy(m[l / 8][l % 8], smem_bytes_at(addr), 16);
      }
      for (int l = 0; l < 32; ++l) {
        uint32_t r[4];
        for (int i = 0; i < 4; ++i) {
          const int a = l / 4, b = 2 * (l % 4);
          const uint16_t x0 = op == WarpOp::kLdmatrix ? m[i][a][b] : m[i][b][a];
          const uint16_t x1 = op == WarpOp::kLdmatrix ? m[i][a][b + 1] : m[i][b + 1][a];
          r[i] = x0 | static_cast<uint32_t>(x1) << 16;
        }
        memcpy(w.out[l], r, 16);
      }
      break;
    }
    case WarpOp::kMmaF16:
    case WarpOp::kMmaBF16: {
      // Lane l = 4g + t holds A rows g, g+8 x cols 2t.., 2t+8..; B k-rows 2t.., 2t+8.. of
      // col g; C/D rows g, g+8 x cols 2t, 2t+1.
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        uint32_t a[4], b[2];
        float c[4];
        memcpy(a, w.in[l], 16);
        memcpy(b, w.in[l] + 16, 8);
        memcpy(c, w.in[l] + 24, 16);
        const int gr = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i) {
          const int row = gr + (i % 2) * 8, col = 2 * t + (i / 2) * 8;
          A[row][col] = element(lo(a[i]), op);
          A[row][col + 1] = element(hi(a[i]), op);
        }
        for (int i = 0; i < 2; ++i) {
          B[2 * t + i * 8][gr] = element(lo(b[i]), op);
          B[2 * t + i * 8 + 1][gr] = element(hi(b[i]), op);
        }
        for (int i = 0; i < 4; ++i) C[gr + (i / 2) * 8][2 * t + i % 2] = c[i];
      }
      for (int l = 0; l < 32; ++l) {
        const int gr = l / 4, t = l % 4;
        float d[4];
        for (int i = 0; i < 4; ++i) {
          const int row = gr + (i / 2) * 8, col = 2 * t + i % 2;
          // Products of 16-bit inputs are exact in double; one rounding to fp32 at the end.
          double acc = C[row][col];
          for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
          d[i] = static_cast<float>(acc);
        }
        memcpy(w.out[l], d, 16);
      }
      break;
    }
    default:
      break;
  }
}

float __attribute__((noinline)) shfl_xor(unsigned mask, float value, int lane_mask) {
  const void* site = __builtin_return_address(0);
  if (mask != 0xffffffffu) fail("divergence", "__shfl_xor_sync with a partial mask is not emulated", site);
  unsigned char in[8];
  memcpy(in, &value, 4);
  memcpy(in + 4, &lane_mask, 4);
  float out;
  collective(WarpOp::kShfl, site, in, 8, &out, 4);
  return out;
}

void __attribute__((noinline)) ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr, bool trans) {
  collective(trans ? WarpOp::kLdmatrixTrans : WarpOp::kLdmatrix, __builtin_return_address(0), &smem_addr, 4, r, 16);
}

void __attribute__((noinline)) mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, int dtype) {
  unsigned char in[40];
  memcpy(in, a, 16);
  memcpy(in + 16, &b0, 4);
  memcpy(in + 20, &b1, 4);
  memcpy(in + 24, c, 16);
  collective(dtype == 0 ? WarpOp::kMmaF16 : WarpOp::kMmaBF16, __builtin_return_address(0), in, 40, c, 16);
}

}  // namespace simt
