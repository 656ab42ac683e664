// State shared by the emulator's parts: the grid being run, its fibers (one per CUDA
// thread), the warps' rendezvous slots, shared memory with its shadow, and the report.
#pragma once

#include <stdint.h>

#include <deque>
#include <random>
#include <string>
#include <vector>

#include "../include/simt/device.h"

namespace simt {

// When cp.async copies land, and in which order fibers and blocks run.
enum Schedule : int { kAtWait = 0, kAtIssue = 1, kRandom = 2 };

struct Copy {
  uint32_t dst;
  const void* src;
  int bytes;
  bool landed;
  const void* site;  // of the cp.async, for reports
};

enum class State { kReady, kBarrier, kWarp, kExited };

struct Fiber {
  void* sp = nullptr;
  char* stack_top = nullptr;
  Coords coords{};
  int tid = 0;
  State state = State::kReady;
  const void* site = nullptr;  // call site of the barrier or warp op it waits at
  std::vector<Copy> uncommitted;
  std::deque<std::vector<Copy>> groups;  // committed, oldest first
};

// Warp collectives: each lane deposits its operands, the last lane to arrive computes
// for all 32 from the PTX ISA fragment tables.
enum class WarpOp : int { kNone, kShfl, kLdmatrix, kLdmatrixTrans, kMmaF16, kMmaBF16 };
struct Warp {
  WarpOp op = WarpOp::kNone;
  const void* site = nullptr;
  int arrived = 0;
  alignas(16) unsigned char in[32][48];
  alignas(16) unsigned char out[32][16];
};

// Shadow of one 16-byte chunk of shared memory (every cp.async and ldmatrix row is one).
struct Chunk {
  int16_t pending;  // thread whose cp.async into it is not yet waited for, or -1
  int16_t writer;   // thread whose completed copy wrote it last, -1: never written
  int16_t reader;   // last reader since read_epoch's barrier, -2: several
  uint32_t write_epoch, read_epoch;
};

struct Config {
  int schedule = kAtWait;
  uint64_t seed = 0;
  int smem_optin = 232448;  // H100
  int num_sms = 2;          // few, so the delta kernel's grid-stride loop turns
};

struct Grid {
  dim3 grid, block;
  uint3 block_idx{};
  int smem_bytes = 0;
  char* smem = nullptr;  // this launch's, between guard pages
  char* smem_map = nullptr;
  size_t smem_map_bytes = 0;
  std::vector<Chunk> shadow;
  uint32_t epoch = 0;  // block barriers passed
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  KernelBody body = nullptr;
  void* ctx = nullptr;
  std::mt19937_64 rng;
};

extern Config g_config;
extern Grid* g_grid;
extern Fiber* g_fiber;  // running fiber, null on the scheduler

// The first error of a launch ends it; the report names block, thread and code address
// (a shared object and offset, for addr2line).
struct Report {
  std::string kind, message, location;
  int block[3] = {0, 0, 0};
  int thread = -1;
};
extern Report g_report;
[[noreturn]] void fail(const std::string& kind, const std::string& message, const void* pc, int thread = -1);
bool failed();
std::string code_location(const void* pc);

// api.cpp: launch bookkeeping for cudaFuncSetAttribute / cudaGetLastError.
bool check_launch(const void* kernel, dim3 block, int smem_bytes);
void record_launch(cudaError_t result);

// Suspends the running fiber until the scheduler resumes it.
void suspend(State state, const void* site);

// memory.cpp
void smem_begin_launch(int bytes);
void smem_begin_block();
void smem_end_launch();
void smem_read(uint32_t offset, int tid, const char* what, const void* site);
const unsigned char* smem_bytes_at(uint32_t offset);
void land_copies(Fiber& f, bool all);  // kRandom lands some at each suspension
void check_exit_copies(Fiber& f);  // the kernels wait for every copy before exiting
std::string describe_address(const void* addr);

// warp.cpp
void run_warp_op(Warp& w, WarpOp op);

}  // namespace simt
