// Memory as the emulator checks it: every tensor in its own mapping between inaccessible
// pages, dynamic shared memory poisoned with NaN per block, and a shadow of shared
// memory per 16-byte chunk that flags cp.async/ldmatrix races (read after write, write
// after read, write after write without a barrier) and reads of never-written bytes.
// cp.async copies land at the covering wait_group, at issue, or at random points.
#include <dlfcn.h>
#include <sys/mman.h>

#include <cstdio>
#include <cstring>

#include "runtime.h"

namespace simt {
namespace {

constexpr size_t kPage = 4096;

struct Buffer {
  std::string name;
  char* map;
  size_t map_bytes;
  char* data;
  size_t bytes;
};
std::vector<Buffer> g_buffers;

size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

// [guard page][data, ending exactly at][guard page]
char* map_guarded(size_t bytes, char** map, size_t* map_bytes) {
  const size_t pages = round_up(bytes, kPage) / kPage;
  *map_bytes = (pages + 2) * kPage;
  *map = static_cast<char*>(mmap(nullptr, *map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (*map == MAP_FAILED) return nullptr;
  mprotect(*map, kPage, PROT_NONE);
  mprotect(*map + (pages + 1) * kPage, kPage, PROT_NONE);
  return *map + (pages + 1) * kPage - bytes;
}

const Buffer* find_buffer(const void* p, bool whole_mapping) {
  const char* c = static_cast<const char*>(p);
  for (const Buffer& b : g_buffers) {
    if (whole_mapping ? (c >= b.map && c < b.map + b.map_bytes) : (c >= b.data && c < b.data + b.bytes)) return &b;
  }
  return nullptr;
}

std::string hex(const void* p) {
  char s[32];
  snprintf(s, sizeof s, "%p", p);
  return s;
}

std::string in_flight(const Fiber& f) {
  size_t n = f.uncommitted.size();
  for (const auto& g : f.groups) n += g.size();
  return std::to_string(n);
}

void land(Copy& c) {
  char* dst = g_grid->smem + c.dst;
  if (c.bytes) memcpy(dst, c.src, c.bytes);
  memset(dst + c.bytes, 0, 16 - c.bytes);
  c.landed = true;
}

bool coin() { return (g_grid->rng() & 3) == 0; }

Chunk& chunk(uint32_t offset, const char* what, const void* site, int tid = -1) {
  if (offset % 16)
    fail("alignment", std::string(what) + " at shared offset " + std::to_string(offset) + " is not 16-byte aligned",
         site, tid);
  if (offset + 16 > static_cast<uint32_t>(g_grid->smem_bytes))
    fail("bounds", std::string(what) + " at shared offset " + std::to_string(offset) + " is outside the " +
                       std::to_string(g_grid->smem_bytes) + " bytes of dynamic shared memory",
         site, tid);
  return g_grid->shadow[offset / 16];
}

}  // namespace

std::string describe_address(const void* addr) {
  const char* c = static_cast<const char*>(addr);
  if (const Buffer* b = find_buffer(addr, true)) {
    if (c >= b->data + b->bytes)
      return std::to_string(c - (b->data + b->bytes)) + " bytes past the end of tensor '" + b->name + "' (" +
             std::to_string(b->bytes) + " bytes)";
    return std::to_string(b->data - c) + " bytes before the start of tensor '" + b->name + "'";
  }
  if (g_grid && g_grid->smem && c >= g_grid->smem - kPage && c < g_grid->smem + g_grid->smem_bytes + kPage)
    return "shared memory offset " + std::to_string(c - g_grid->smem) + " (the launch has " +
           std::to_string(g_grid->smem_bytes) + " bytes)";
  if (g_fiber && c < g_fiber->stack_top && c + 256 * 1024 > g_fiber->stack_top) return "the thread's stack (overflow)";
  return "address " + hex(addr) + ", outside every tensor";
}

void smem_begin_launch(int bytes) {
  Grid& g = *g_grid;
  g.smem_bytes = bytes;
  g.smem = map_guarded(round_up(bytes, 16), &g.smem_map, &g.smem_map_bytes);
  g.shadow.assign(round_up(bytes, 16) / 16, Chunk{});
}

void smem_end_launch() {
  munmap(g_grid->smem_map, g_grid->smem_map_bytes);
  g_grid->smem = nullptr;
}

void smem_begin_block() {
  Grid& g = *g_grid;
  memset(g.smem, 0xff, round_up(g.smem_bytes, 16));  // NaN as fp16, bf16 and fp32
  for (Chunk& c : g.shadow) c = Chunk{-1, -1, -1, 0, UINT32_MAX};
}

const unsigned char* smem_bytes_at(uint32_t offset) {
  return reinterpret_cast<const unsigned char*>(g_grid->smem + offset);
}

void smem_read(uint32_t offset, int tid, const char* what, const void* site) {
  Grid& g = *g_grid;
  Chunk& c = chunk(offset, what, site, tid);
  const std::string at = std::string(what) + " at shared offset " + std::to_string(offset);
  if (c.pending >= 0)
    fail("race", at + " reads bytes whose cp.async (thread " + std::to_string(c.pending) +
                     ") has not been waited for (read after write)",
         site, tid);
  if (c.writer < 0) fail("uninitialised", at + " reads shared memory that nothing wrote in this block", site, tid);
  if (c.writer != tid && c.write_epoch == g.epoch)
    fail("race", at + " reads bytes that thread " + std::to_string(c.writer) +
                     " wrote with no __syncthreads in between (read after write)",
         site, tid);
  c.reader = (c.read_epoch == g.epoch && c.reader != tid) ? -2 : tid;
  c.read_epoch = g.epoch;
}

void __attribute__((noinline)) cp_async(uint32_t dst, const void* src, int src_bytes) {
  const void* site = __builtin_return_address(0);
  Grid& g = *g_grid;
  Fiber& f = *g_fiber;
  if (src_bytes < 0 || src_bytes > 16)
    fail("cp.async", "cp.async src-size " + std::to_string(src_bytes) + " is not in [0, 16]", site);
  Chunk& c = chunk(dst, "cp.async destination", site);
  if (src_bytes) {
    if (reinterpret_cast<uintptr_t>(src) % 16)
      fail("alignment", "cp.async source " + hex(src) + " is not 16-byte aligned", site);
    const Buffer* b = find_buffer(src, false);
    if (!b || static_cast<const char*>(src) + src_bytes > b->data + b->bytes)
      fail("bounds", "cp.async reads " + std::to_string(src_bytes) + " bytes at " + describe_address(src) +
                         (b ? " (tensor '" + b->name + "' ends inside them)" : ""),
           site);
  }
  const std::string at = "cp.async into shared offset " + std::to_string(dst);
  if (c.pending >= 0)
    fail("race", at + ": an earlier cp.async of thread " + std::to_string(c.pending) +
                     " into it is not yet waited for (write after write)",
         site);
  if (c.read_epoch == g.epoch && c.reader != f.tid)
    fail("race", at + ": " + (c.reader >= 0 ? "thread " + std::to_string(c.reader) : std::string("other threads")) +
                     " read it since the last __syncthreads (write after read)",
         site);
  if (c.writer >= 0 && c.writer != f.tid && c.write_epoch == g.epoch)
    fail("race", at + ": thread " + std::to_string(c.writer) +
                     " wrote it since the last __syncthreads (write after write)",
         site);
  c.pending = static_cast<int16_t>(f.tid);
  Copy copy{dst, src, src_bytes, false, site};
  if (g_config.schedule == kAtIssue || (g_config.schedule == kRandom && coin())) land(copy);
  f.uncommitted.push_back(copy);
}

void __attribute__((noinline)) cp_async_commit() {
  Fiber& f = *g_fiber;
  f.groups.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

void __attribute__((noinline)) cp_async_wait(int pending) {
  Grid& g = *g_grid;
  Fiber& f = *g_fiber;
  while (static_cast<int>(f.groups.size()) > pending) {
    for (Copy& c : f.groups.front()) {
      if (!c.landed) land(c);
      Chunk& s = g.shadow[c.dst / 16];
      s.pending = -1;
      s.writer = static_cast<int16_t>(f.tid);
      s.write_epoch = g.epoch;
    }
    f.groups.pop_front();
  }
}

void land_copies(Fiber& f, bool all) {
  for (auto& group : f.groups)
    for (Copy& c : group)
      if (!c.landed && (all || coin())) land(c);
  for (Copy& c : f.uncommitted)
    if (!c.landed && (all || coin())) land(c);
}

void check_exit_copies(Fiber& f) {
  const Copy* first = nullptr;
  for (const auto& g : f.groups)
    if (!first && !g.empty()) first = &g.front();
  if (!first && !f.uncommitted.empty()) first = &f.uncommitted.front();
  if (first) fail("cp.async", "thread exits with " + in_flight(f) + " cp.async copies never waited for", first->site);
}

uint32_t __attribute__((noinline)) smem_offset(const void* generic) {
  const char* c = static_cast<const char*>(generic);
  const Grid& g = *g_grid;
  if (c < g.smem || c > g.smem + g.smem_bytes)
    fail("bounds", "__cvta_generic_to_shared of " + describe_address(generic) + ", not shared memory",
         __builtin_return_address(0));
  return static_cast<uint32_t>(c - g.smem);
}

void* dynamic_smem() { return g_grid->smem; }

std::string code_location(const void* pc) {
  Dl_info info;
  if (pc && dladdr(pc, &info) && info.dli_fname) {
    char s[64];
    snprintf(s, sizeof s, "+0x%lx", static_cast<unsigned long>(static_cast<const char*>(pc) - 1 -
                                                               static_cast<const char*>(info.dli_fbase)));
    return info.dli_fname + std::string(s);
  }
  return "";
}

}  // namespace simt

extern "C" void* simt_alloc(size_t bytes, const char* name) {
  char* map;
  size_t map_bytes;
  const size_t padded = simt::round_up(bytes ? bytes : 1, 16);
  char* data = simt::map_guarded(padded, &map, &map_bytes);
  if (!data) return nullptr;
  simt::g_buffers.push_back({name, map, map_bytes, data, bytes});
  return data;
}

extern "C" void simt_free(void* data) {
  for (size_t i = 0; i < simt::g_buffers.size(); ++i) {
    if (simt::g_buffers[i].data == data) {
      munmap(simt::g_buffers[i].map, simt::g_buffers[i].map_bytes);
      simt::g_buffers.erase(simt::g_buffers.begin() + i);
      return;
    }
  }
}
