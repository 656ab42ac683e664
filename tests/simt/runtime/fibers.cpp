// One fiber per CUDA thread on one OS thread: a hand-written x86-64 context switch, the
// block scheduler (forward, reversed or random order between suspension points), block
// barriers, deadlock detection, and the fault handler that turns a hit guard page into
// a report naming the buffer, block, thread and code address.
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <numeric>

#include "runtime.h"

#if !defined(__x86_64__) || !defined(__linux__)
#error "the SIMT emulator's context switch is written for x86-64 Linux"
#endif

// simt_switch(save, next): saves the callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores its pointer in *save and resumes the stack `next`.
extern "C" void simt_switch(void** save, void* next);
asm(R"(
.text
.globl simt_switch
.hidden simt_switch
.type simt_switch,@function
simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size simt_switch, .-simt_switch
)");

namespace simt {

Coords* g_coords = nullptr;
Grid* g_grid = nullptr;
Fiber* g_fiber = nullptr;
Config g_config;

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kStackBytes = 128 * 1024;

void* g_sched_sp = nullptr;
bool g_failed = false;
struct Abort {};

// Fiber stacks, each above an inaccessible page, reused by every launch.
char* g_stacks = nullptr;
int g_stack_count = 0;

char* stack_top(int i) { return g_stacks + (i + 1) * (kStackBytes + kPage); }

void ensure_stacks(int n) {
  if (n <= g_stack_count) return;
  if (g_stacks) munmap(g_stacks, g_stack_count * (kStackBytes + kPage));
  const size_t bytes = n * (kStackBytes + kPage);
  g_stacks = static_cast<char*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  for (int i = 0; i < n; ++i) mprotect(g_stacks + i * (kStackBytes + kPage), kPage, PROT_NONE);
  g_stack_count = n;
}

[[noreturn]] void to_scheduler() {
  simt_switch(&g_fiber->sp, g_sched_sp);
  __builtin_unreachable();  // an aborted or exited fiber is never resumed
}

extern "C" void simt_fiber_main() {
  Fiber& f = *g_fiber;
  g_grid->body(g_grid->ctx);
  check_exit_copies(f);
  const Warp& w = g_grid->warps[f.tid / 32];
  if (w.arrived > 0)
    fail("divergence", "thread exits while lanes of its warp wait at a warp-synchronous op", w.site);
  f.state = State::kExited;
  to_scheduler();
}

void start_fiber(Fiber& f) {
  uint64_t* sp = reinterpret_cast<uint64_t*>(f.stack_top);
  *--sp = 0;  // simt_fiber_main's return address slot: never used, keeps the ABI alignment
  *--sp = reinterpret_cast<uint64_t>(&simt_fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0; fnstcw %1" : "=m"(mxcsr), "=m"(fpucw));
  *--sp = mxcsr | static_cast<uint64_t>(fpucw) << 32;
  f.sp = sp;
}

void resume(Fiber& f) {
  g_fiber = &f;
  g_coords = &f.coords;
  simt_switch(&g_sched_sp, f.sp);
  g_fiber = nullptr;
  if (g_failed) throw Abort{};
}

// ---- faults: a guard page or a wild address inside a fiber ends the launch
const void* g_fault_addr = nullptr;
const void* g_fault_pc = nullptr;
struct sigaction g_old_segv, g_old_bus;
char g_alt_stack[64 * 1024];

void fault_exit() {
  // +1: locations are reported for return addresses, one byte past the call.
  fail("memory", "invalid access to " + describe_address(g_fault_addr), static_cast<const char*>(g_fault_pc) + 1);
}

void on_fault(int sig, siginfo_t* info, void* raw) {
  if (g_fiber == nullptr || g_fault_pc != nullptr) {  // not ours: let the previous handler see it
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    return;
  }
  auto* uc = static_cast<ucontext_t*>(raw);
  g_fault_addr = info->si_addr;
  g_fault_pc = reinterpret_cast<const void*>(uc->uc_mcontext.gregs[REG_RIP]);
  // Continue the fiber in fault_exit on the top of its own stack (it is never resumed).
  const uintptr_t sp = ((reinterpret_cast<uintptr_t>(g_fiber->stack_top) - 1024) & ~uintptr_t{15}) - 8;
  uc->uc_mcontext.gregs[REG_RSP] = static_cast<greg_t>(sp);
  uc->uc_mcontext.gregs[REG_RIP] = reinterpret_cast<greg_t>(&fault_exit);
  (void)sig;
}

struct FaultHandler {
  stack_t old_stack;
  FaultHandler() {
    stack_t ss{};
    ss.ss_sp = g_alt_stack;
    ss.ss_size = sizeof(g_alt_stack);
    sigaltstack(&ss, &old_stack);
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
    g_fault_pc = nullptr;
  }
  ~FaultHandler() {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaltstack(&old_stack, nullptr);
  }
};

std::string where(const Fiber& f) { return "thread " + std::to_string(f.tid); }

void order(std::vector<int>& ids, std::mt19937_64& rng) {
  std::iota(ids.begin(), ids.end(), 0);
  if (g_config.schedule == kAtIssue) std::reverse(ids.begin(), ids.end());
  if (g_config.schedule == kRandom) std::shuffle(ids.begin(), ids.end(), rng);
}

void run_block(Grid& g) {
  const int n = static_cast<int>(g.block.x * g.block.y * g.block.z);
  smem_begin_block();
  g.epoch = 0;
  for (Warp& w : g.warps) w = Warp{};
  for (int t = 0; t < n; ++t) {
    Fiber& f = g.fibers[t];
    f.tid = t;
    f.state = State::kReady;
    f.uncommitted.clear();
    f.groups.clear();
    f.coords = Coords{{t % g.block.x, (t / g.block.x) % g.block.y, t / (g.block.x * g.block.y)}, g.block_idx,
                      g.block, g.grid};
    f.stack_top = stack_top(t);
    start_fiber(f);
  }
  std::vector<int> ids(n);
  while (true) {
    order(ids, g.rng);
    for (int t : ids)
      if (g.fibers[t].state == State::kReady) resume(g.fibers[t]);
    int live = 0, ready = 0, at_barrier = 0;
    const Fiber* first_barrier = nullptr;
    for (const Fiber& f : g.fibers) {
      live += f.state != State::kExited;
      ready += f.state == State::kReady;
      if (f.state == State::kBarrier) {
        ++at_barrier;
        if (!first_barrier) first_barrier = &f;
      }
    }
    if (live == 0) return;
    if (ready) continue;
    if (at_barrier == live) {
      for (Fiber& f : g.fibers) {
        if (f.state != State::kBarrier) continue;
        if (f.site != first_barrier->site)
          fail("divergence", where(f) + " waits at a different __syncthreads than " + where(*first_barrier),
               f.site, f.tid);
        f.state = State::kReady;
      }
      ++g.epoch;
      continue;
    }
    // Nobody can run: some threads wait at a barrier, others at a warp op whose warp
    // never completes (a lane is at the barrier or has exited).
    for (const Fiber& f : g.fibers)
      if (f.state == State::kWarp)
        fail("deadlock", where(f) + " waits at a warp-synchronous op that its warp never completes" +
                             (first_barrier ? " (" + where(*first_barrier) + " waits at __syncthreads)" : ""),
             f.site, f.tid);
    fail("deadlock", "no thread can run", nullptr);
  }
}

}  // namespace

bool failed() { return g_failed; }

void fail(const std::string& kind, const std::string& message, const void* pc, int thread) {
  if (!g_failed) {
    g_failed = true;
    g_report.kind = kind;
    g_report.message = message;
    g_report.location = code_location(pc);
    if (g_grid) {
      g_report.block[0] = g_grid->block_idx.x;
      g_report.block[1] = g_grid->block_idx.y;
      g_report.block[2] = g_grid->block_idx.z;
    }
    g_report.thread = thread >= 0 ? thread : (g_fiber ? g_fiber->tid : -1);
  }
  if (g_fiber) to_scheduler();
  throw Abort{};
}

void suspend(State state, const void* site) {
  Fiber& f = *g_fiber;
  f.state = state;
  f.site = site;
  if (g_config.schedule == kRandom) land_copies(f, false);
  simt_switch(&f.sp, g_sched_sp);
}

void __attribute__((noinline)) syncthreads() { suspend(State::kBarrier, __builtin_return_address(0)); }

cudaError_t run_grid(dim3 grid, dim3 block, int smem_bytes, KernelBody body, void* ctx, const void* kernel) {
  if (!check_launch(kernel, block, smem_bytes)) return cudaErrorInvalidConfiguration;
  const int n = static_cast<int>(block.x * block.y * block.z);
  Grid g;
  g.grid = grid;
  g.block = block;
  g.body = body;
  g.ctx = ctx;
  g.fibers.resize(n);
  g.warps.resize((n + 31) / 32);
  g.rng.seed(g_config.seed);
  g_grid = &g;
  g_failed = false;
  ensure_stacks(n);
  smem_begin_launch(smem_bytes);
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
  if (g_config.schedule == kAtIssue) std::reverse(blocks.begin(), blocks.end());
  if (g_config.schedule == kRandom) std::shuffle(blocks.begin(), blocks.end(), g.rng);
  cudaError_t result = cudaSuccess;
  {
    FaultHandler handler;
    try {
      for (const uint3& b : blocks) {
        g.block_idx = b;
        run_block(g);
      }
    } catch (const Abort&) {
      result = cudaErrorLaunchFailure;
    }
  }
  smem_end_launch();
  g_grid = nullptr;
  g_fiber = nullptr;
  record_launch(result);
  return result;
}

}  // namespace simt
