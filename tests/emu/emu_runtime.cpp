// The scheduler of the CUDA emulation (cuda_emulation.h): launch checks, one block at a time in
// the schedule's block order, the block's threads as fibers that run until their next barrier
// or warp collective in the schedule's thread order, shared memory per block, and the few
// runtime API functions. Any misuse a GPU would hang on or leave undefined (a barrier not
// reached by every thread, a warp collective whose mask names a lane that never arrives, lanes
// of one warp at different collectives) is a fatal error naming the block, threads and site.
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <queue>
#include <string>
#include <vector>

#include "cuda_emulation.h"
#include "emu_record.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace emu {

uint3 g_thread_idx{0, 0, 0}, g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

DeviceProps& device() {
  static DeviceProps d;
  return d;
}

const char* g_block_kernel_name();
namespace {
Schedule g_schedule;
cudaError_t g_last_error = cudaSuccess;
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
std::vector<LaunchRecord> g_launches;
}  // namespace

void set_schedule(const Schedule& s) { g_schedule = s; }
const Schedule& schedule() { return g_schedule; }
std::vector<LaunchRecord>& launches() { return g_launches; }

void fatal(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "emu: FATAL: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  fflush(stderr);
  fflush(stdout);
  _exit(3);
}

// ---- unreadable pages and the SIGSEGV handler ----
namespace {
struct Span {
  uintptr_t begin, end;
};
std::vector<Span> g_unreadable;

void on_segv(int, siginfo_t* info, void*) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
  const char* what = "an address outside every unreadable page (a wild access)";
  for (const Span& s : g_unreadable) {
    if (a >= s.begin && a < s.end) {
      what = "a page the driver made unreadable (data of inactive modules, or every page when "
             "found_inf is set): the kernel read memory it must skip";
      break;
    }
  }
  char msg[400];
  const int len = snprintf(msg, sizeof msg, "emu: FATAL: SIGSEGV at %p in %s block (%u,%u,%u) thread (%u,%u,%u): %s\n",
                           info->si_addr, g_block_kernel_name(), g_block_idx.x, g_block_idx.y,
                           g_block_idx.z, g_thread_idx.x, g_thread_idx.y, g_thread_idx.z, what);
  if (write(2, msg, len) < 0) {
  }
#if EMU_ASAN
  __sanitizer_print_stack_trace();
#endif
  _exit(3);
}

struct SegvHandler {
  SegvHandler() {
    static char alt[1 << 16];
    stack_t ss{};
    ss.ss_sp = alt;
    ss.ss_size = sizeof alt;
    sigaltstack(&ss, nullptr);
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
  }
} g_segv_handler;
}  // namespace

void note_unreadable(const void* begin, size_t bytes) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(begin);
  g_unreadable.push_back({b, b + bytes});
}
void forget_unreadable(const void* begin, size_t bytes) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(begin), e = b + bytes;
  size_t k = 0;
  for (const Span& s : g_unreadable) {
    if (s.begin >= b && s.end <= e) continue;
    g_unreadable[k++] = s;
  }
  g_unreadable.resize(k);
}

cudaError_t take_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
cudaError_t peek_last_error() { return g_last_error; }

static uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ---------------------------------------------------------------------------------------------
// Fibers: a hand-rolled x86-64 switch (callee-saved registers + stack pointer; no signal-mask
// syscall as in swapcontext, which would dominate the run time), ucontext elsewhere.
// ---------------------------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
.text
.globl emu_switch_stack
.type emu_switch_stack,@function
emu_switch_stack:
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
.size emu_switch_stack,.-emu_switch_stack
.section .note.GNU-stack,"",@progbits
.text
)");
#endif

namespace {

constexpr size_t kStackBytes = 256 * 1024;

enum class State { kReady, kBarrier, kWarp, kDone };

struct Fiber {
  char* stack = nullptr;  // mmap'd, with a PROT_NONE guard page below
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  void* fake_stack = nullptr;  // ASan's fake stack of this fiber while switched out
  State state = State::kReady;
  uint3 tid{0, 0, 0};
  // pending barrier
  BarKind bar_kind = BarKind::kSync;
  int bar_pred = 0, bar_result = 0;
  // pending warp collective
  WarpOp wop = WarpOp::kSyncwarp;
  unsigned wmask = 0;
  uint64_t wvalue = 0, wresult = 0;
  int warg = 0, wwidth = 32;
};

struct Block {
  std::vector<Fiber> fibers;  // reused across blocks and launches
  int nthreads = 0;
  int exited = 0, at_barrier = 0;
  int current = -1;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  // ready threads: a min-heap (forward), a max-heap (reverse) or a bag (random)
  std::priority_queue<int, std::vector<int>, std::greater<int>> ready_min;
  std::priority_queue<int> ready_max;
  std::vector<int> ready_bag;
  uint64_t rng = 0;
  // shared memory
  std::map<std::pair<const char*, int>, void*> static_sites;
  size_t static_bytes = 0;
  void* dynamic = nullptr;
  size_t dynamic_bytes = 0;
  size_t smem_allowed = 0;
  const char* kernel = "";
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  void* sched_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
};

Block g_block;
}  // namespace
const char* g_block_kernel_name() { return g_block.current >= 0 ? g_block.kernel : "(host code)"; }
namespace {

void push_ready(int t) {
  g_block.fibers[t].state = State::kReady;
  switch (g_schedule.order) {
    case Order::kForward: g_block.ready_min.push(t); break;
    case Order::kReverse: g_block.ready_max.push(t); break;
    case Order::kRandom: g_block.ready_bag.push_back(t); break;
  }
}

bool pop_ready(int* t) {
  switch (g_schedule.order) {
    case Order::kForward:
      if (g_block.ready_min.empty()) return false;
      *t = g_block.ready_min.top();
      g_block.ready_min.pop();
      return true;
    case Order::kReverse:
      if (g_block.ready_max.empty()) return false;
      *t = g_block.ready_max.top();
      g_block.ready_max.pop();
      return true;
    case Order::kRandom: {
      auto& bag = g_block.ready_bag;
      if (bag.empty()) return false;
      const size_t i = splitmix64(g_block.rng) % bag.size();
      *t = bag[i];
      bag[i] = bag.back();
      bag.pop_back();
      return true;
    }
  }
  return false;
}

// Switches from the running fiber back to the scheduler (the fiber's state says why).
void yield_to_scheduler(bool dying) {
  Fiber& f = g_block.fibers[g_block.current];
#if EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake_stack, g_block.sched_stack_bottom,
                                 g_block.sched_stack_size);
#else
  (void)dying;
#endif
#if defined(__x86_64__)
  emu_switch_stack(&f.sp, g_block.sched_sp);
#else
  swapcontext(&f.ctx, &g_block.sched_ctx);
#endif
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

extern "C" void emu_fiber_entry() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_block.sched_stack_bottom, &g_block.sched_stack_size);
#endif
  g_block.body(g_block.body_ctx);
  g_block.fibers[g_block.current].state = State::kDone;
  yield_to_scheduler(true);
  fatal("a finished fiber was resumed");
}

void init_fiber(Fiber& f) {
  if (f.stack == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) fatal("cannot map a fiber stack");
    mprotect(mem, page, PROT_NONE);  // a stack overflow faults
    f.stack = static_cast<char*>(mem) + page;
  }
#if EMU_ASAN
  __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
  f.fake_stack = nullptr;
#if defined(__x86_64__)
  // Initial frame for emu_switch_stack: control word slot, r15..rbp, return address = entry.
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 9;
  // sp[0]: mxcsr | fcw<<32 ; sp[1..6]: r15 r14 r13 r12 rbx rbp ; sp[7]: entry ; sp[8]: the
  // entry's (never used) return address
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fcw) << 32);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&emu_fiber_entry);
  sp[8] = 0;
  // after the pops and ret, rsp = sp + 8 words = top - 8: the entry sees rsp % 16 == 8, as
  // after a call
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&emu_fiber_entry), 0);
#endif
}

void resume(int t) {
  Fiber& f = g_block.fibers[t];
  g_block.current = t;
  g_thread_idx = f.tid;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&g_block.sched_fake_stack, f.stack, kStackBytes);
#endif
#if defined(__x86_64__)
  emu_switch_stack(&g_block.sched_sp, f.sp);
#else
  swapcontext(&g_block.sched_ctx, &f.ctx);
#endif
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(g_block.sched_fake_stack, nullptr, nullptr);
#endif
  g_block.current = -1;
}

const char* state_name(State s) {
  switch (s) {
    case State::kReady: return "ready";
    case State::kBarrier: return "at __syncthreads";
    case State::kWarp: return "at a warp collective";
    case State::kDone: return "exited";
  }
  return "?";
}

std::string block_desc() {
  char b[160];
  snprintf(b, sizeof b, "kernel %s block (%u,%u,%u)", g_block.kernel, g_block_idx.x, g_block_idx.y,
           g_block_idx.z);
  return b;
}

// ---- block barrier ----
void try_release_barrier() {
  Block& B = g_block;
  if (B.at_barrier == 0) return;
  if (B.at_barrier + B.exited < B.nthreads) return;
  if (B.exited > 0) {
    fatal("%s: %d threads wait at __syncthreads while %d threads have exited (a barrier in "
          "divergent code)",
          block_desc().c_str(), B.at_barrier, B.exited);
  }
  BarKind kind = B.fibers[0].bar_kind;
  int orv = 0, andv = 1, count = 0;
  for (int t = 0; t < B.nthreads; ++t) {
    const Fiber& f = B.fibers[t];
    if (f.bar_kind != kind) {
      fatal("%s: threads 0 and %d wait at different barrier kinds (__syncthreads vs _or/_and/_count)",
            block_desc().c_str(), t);
    }
    orv |= f.bar_pred;
    andv &= f.bar_pred;
    count += f.bar_pred;
  }
  const int result = kind == BarKind::kOr ? orv : kind == BarKind::kAnd ? andv : count;
  B.at_barrier = 0;
  for (int t = 0; t < B.nthreads; ++t) {
    B.fibers[t].bar_result = result;
    push_ready(t);
  }
}

// ---- warp collectives ----
int lane_count_of_warp(int w) { return std::min(32, g_block.nthreads - 32 * w); }

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kSyncwarp: return "__syncwarp";
  }
  return "?";
}

// Completes warp w's collective when every lane its mask names has arrived.
void try_complete_warp(int w, int arriving_lane) {
  Block& B = g_block;
  const Fiber& a = B.fibers[32 * w + arriving_lane];
  const unsigned mask = a.wmask;
  const int lanes = lane_count_of_warp(w);
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (l >= lanes) {
      fatal("%s: %s mask 0x%08x names lane %d of warp %d, which does not exist (block of %d threads)",
            block_desc().c_str(), warp_op_name(a.wop), mask, l, w, B.nthreads);
    }
    const Fiber& f = B.fibers[32 * w + l];
    if (f.state == State::kDone || f.state == State::kBarrier) {
      fatal("%s: %s mask 0x%08x names lane %d of warp %d, which is %s and never arrives",
            block_desc().c_str(), warp_op_name(a.wop), mask, l, w, state_name(f.state));
    }
    if (f.state != State::kWarp) return;  // not there yet
  }
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Fiber& f = B.fibers[32 * w + l];
    if (f.wop != a.wop || f.wmask != mask) {
      fatal("%s: lanes %d and %d of warp %d meet at different collectives (%s mask 0x%08x vs %s "
            "mask 0x%08x)",
            block_desc().c_str(), arriving_lane, l, w, warp_op_name(a.wop), mask,
            warp_op_name(f.wop), f.wmask);
    }
    if (f.wop == WarpOp::kBallot || f.wop == WarpOp::kAny || f.wop == WarpOp::kAll) {
      if (f.wvalue) ballot |= 1ull << l;
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& f = B.fibers[32 * w + l];
    const int width = f.wwidth;
    const int seg = l & ~(width - 1);
    int src = l;
    switch (f.wop) {
      case WarpOp::kShflIdx: src = seg + (f.warg & (width - 1)); break;
      case WarpOp::kShflUp: src = (l - seg) >= f.warg ? l - f.warg : l; break;
      case WarpOp::kShflDown: src = (l - seg) + f.warg < width ? l + f.warg : l; break;
      case WarpOp::kShflXor: {
        const int s = l ^ f.warg;
        src = (s >= seg + width || s >= 32) ? l : s;
        break;
      }
      default: break;
    }
    switch (f.wop) {
      case WarpOp::kShflIdx:
      case WarpOp::kShflUp:
      case WarpOp::kShflDown:
      case WarpOp::kShflXor:
        if (!(mask >> src & 1u)) {
          fatal("%s: %s: lane %d of warp %d reads lane %d, which the mask 0x%08x does not name "
                "(undefined value)",
                block_desc().c_str(), warp_op_name(f.wop), l, w, src, mask);
        }
        f.wresult = B.fibers[32 * w + src].wvalue;
        break;
      case WarpOp::kBallot: f.wresult = ballot; break;
      case WarpOp::kAny: f.wresult = ballot != 0; break;
      case WarpOp::kAll: f.wresult = ballot == (mask & ((lanes == 32) ? 0xffffffffull : ((1ull << lanes) - 1))); break;
      case WarpOp::kSyncwarp: f.wresult = 0; break;
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (mask >> l & 1u) push_ready(32 * w + l);
  }
}

// A lane exited: a collective of its warp waiting for it can never complete.
void check_warp_after_exit(int t) {
  Block& B = g_block;
  const int w = t / 32, l = t % 32;
  for (int k = 0; k < lane_count_of_warp(w); ++k) {
    const Fiber& f = B.fibers[32 * w + k];
    if (f.state == State::kWarp && (f.wmask >> l & 1u)) {
      fatal("%s: lane %d of warp %d exited, but lane %d waits for it at %s mask 0x%08x",
            block_desc().c_str(), l, w, k, warp_op_name(f.wop), f.wmask);
    }
  }
}

void garbage_fill(void* p, size_t bytes) {
  // Uninitialised shared memory: different bytes under every schedule, so a read before a
  // write makes the schedules disagree.
  uint64_t s = g_schedule.seed * 0x9E37u + static_cast<uint64_t>(g_schedule.order) + 0x51ull;
  unsigned char* c = static_cast<unsigned char*>(p);
  for (size_t i = 0; i < bytes; ++i) c[i] = static_cast<unsigned char>(splitmix64(s) | 0x80);
}

void* aligned_exact(size_t bytes, size_t align) {
  void* p = nullptr;
  if (posix_memalign(&p, std::max<size_t>(align, sizeof(void*)), bytes) != 0) fatal("out of memory");
  return p;
}

void run_block(void (*body)(void*), void* ctx) {
  Block& B = g_block;
  const int n = B.nthreads;
  if (static_cast<int>(B.fibers.size()) < n) B.fibers.resize(n);
  B.body = body;
  B.body_ctx = ctx;
  B.exited = 0;
  B.at_barrier = 0;
  B.ready_bag.clear();
  for (int t = 0; t < n; ++t) {
    Fiber& f = B.fibers[t];
    init_fiber(f);
    f.tid = uint3{t % g_block_dim.x, (t / g_block_dim.x) % g_block_dim.y,
                  t / (g_block_dim.x * g_block_dim.y)};
    push_ready(t);
  }
  B.static_sites.clear();
  B.static_bytes = 0;
  B.dynamic = aligned_exact(B.dynamic_bytes, 16);
  garbage_fill(B.dynamic, B.dynamic_bytes);
  while (true) {
    int t;
    if (!pop_ready(&t)) {
      if (B.exited == n) break;
      std::string states;
      for (int k = 0; k < n && states.size() < 600; ++k) {
        states += " t" + std::to_string(k) + ":" + state_name(B.fibers[k].state);
      }
      fatal("%s: deadlock: no thread can run (%d exited, %d at __syncthreads):%s",
            block_desc().c_str(), B.exited, B.at_barrier, states.c_str());
    }
    resume(t);
    Fiber& f = B.fibers[t];
    switch (f.state) {
      case State::kDone:
        ++B.exited;
        check_warp_after_exit(t);
        try_release_barrier();
        break;
      case State::kBarrier:
        ++B.at_barrier;
        try_release_barrier();
        break;
      case State::kWarp:
        try_complete_warp(t / 32, t % 32);
        break;
      case State::kReady:
        fatal("a fiber yielded without a reason");
    }
  }
  for (auto& kv : B.static_sites) free(kv.second);
  B.static_sites.clear();
  free(B.dynamic);
  B.dynamic = nullptr;
}

}  // namespace

int block_barrier(BarKind kind, int pred) {
  if (g_block.current < 0) fatal("__syncthreads outside a kernel");
  Fiber& f = g_block.fibers[g_block.current];
  f.state = State::kBarrier;
  f.bar_kind = kind;
  f.bar_pred = pred;
  yield_to_scheduler(false);
  return f.bar_result;
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
  if (g_block.current < 0) fatal("warp collective outside a kernel");
  const int t = g_block.current;
  Fiber& f = g_block.fibers[t];
  if (!(mask >> (t % 32) & 1u)) {
    fatal("%s: thread %d calls %s with mask 0x%08x, which does not name its own lane %d",
          block_desc().c_str(), t, warp_op_name(op), mask, t % 32);
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fatal("%s: %s width %d is not a power of two in [1, 32]", block_desc().c_str(),
          warp_op_name(op), width);
  }
  f.state = State::kWarp;
  f.wop = op;
  f.wmask = mask;
  f.wvalue = value;
  f.warg = arg;
  f.wwidth = width;
  yield_to_scheduler(false);
  return f.wresult;
}

void* shared_site(const char* file, int line, size_t bytes, size_t align) {
  Block& B = g_block;
  if (B.current < 0) fatal("__shared__ outside a kernel");
  auto key = std::make_pair(file, line);
  auto it = B.static_sites.find(key);
  if (it != B.static_sites.end()) return it->second;
  B.static_bytes += bytes;
  if (B.static_bytes + B.dynamic_bytes > B.smem_allowed) {
    fatal("%s: %zu bytes of static + %zu bytes of dynamic shared memory exceed the %zu bytes "
          "allowed",
          block_desc().c_str(), B.static_bytes, B.dynamic_bytes, B.smem_allowed);
  }
  void* p = aligned_exact(bytes, align);
  garbage_fill(p, bytes);
  B.static_sites.emplace(key, p);
  return p;
}

void* dynamic_shared_base() {
  if (g_block.current < 0) fatal("extern __shared__ outside a kernel");
  return g_block.dynamic;
}

// pretty: GCC's "const char* emu::instance_pretty() [with auto F = (& ns::k<float, true>)]" ->
// "k<float, true>" on the last launch record.
void note_instance(const char* pretty) {
  if (g_launches.empty()) return;
  std::string s(pretty);
  const size_t at = s.find("F = ");
  if (at != std::string::npos) s = s.substr(at + 4);
  while (!s.empty() && (s.back() == ']' || s.back() == ')')) s.pop_back();
  while (!s.empty() && (s.front() == '(' || s.front() == '&' || s.front() == ' ')) s.erase(0, 1);
  const size_t lt = s.find('<');
  const size_t q = s.rfind("::", lt == std::string::npos ? s.size() : lt);
  if (q != std::string::npos) s = s.substr(q + 2);
  g_launches.back().instance = s;
}

cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > device().max_smem_optin) return cudaErrorInvalidValue;
    g_max_dynamic_smem[fn] = value;
  }
  return cudaSuccess;
}

namespace {
LaunchRecord g_pending;
}

bool begin_launch(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem,
                  size_t param_bytes) {
  LaunchRecord r;
  r.name = name;
  r.grid = grid;
  r.block = block;
  r.smem = smem;
  r.param_bytes = param_bytes;
  const DeviceProps& d = device();
  if (param_bytes > param_limit()) {
    // nvcc refuses to compile such a kernel: a harness failure, not a launch error.
    fatal("kernel %s takes %zu bytes of parameters, more than CUDA's %zu", name, param_bytes,
          param_limit());
  }
  cudaError_t err = cudaSuccess;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0 ||
      grid.x > d.max_grid_dim[0] || grid.y > d.max_grid_dim[1] || grid.z > d.max_grid_dim[2] ||
      block.x > static_cast<unsigned>(d.max_block_dim[0]) ||
      block.y > static_cast<unsigned>(d.max_block_dim[1]) ||
      block.z > static_cast<unsigned>(d.max_block_dim[2]) ||
      threads > static_cast<uint64_t>(d.max_threads_per_block)) {
    err = cudaErrorInvalidConfiguration;
  }
  size_t allowed = static_cast<size_t>(d.smem_per_block);
  auto it = g_max_dynamic_smem.find(fn);
  if (it != g_max_dynamic_smem.end()) allowed = std::max(allowed, static_cast<size_t>(it->second));
  if (err == cudaSuccess && smem > allowed) err = cudaErrorInvalidValue;
  r.error = err;
  g_launches.push_back(r);
  if (err != cudaSuccess) {
    g_last_error = err;
    return false;
  }
  g_pending = r;
  g_block.smem_allowed = allowed;
  g_block.dynamic_bytes = smem;
  g_block.kernel = name;
  g_block_dim = block;
  g_grid_dim = grid;
  g_block.nthreads = static_cast<int>(threads);
  return true;
}

void run_grid(void (*thread_body)(void*), void* ctx) {
  const uint64_t nblocks = static_cast<uint64_t>(g_grid_dim.x) * g_grid_dim.y * g_grid_dim.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  uint64_t s = g_schedule.seed ^ (0xD1B54A32D192ED03ull * (g_launches.size() + 1));
  if (g_schedule.order == Order::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (g_schedule.order == Order::kRandom) {
    for (uint64_t i = nblocks; i > 1; --i) std::swap(order[i - 1], order[splitmix64(s) % i]);
  }
  g_block.rng = splitmix64(s);
  for (uint64_t b : order) {
    g_block_idx = uint3{static_cast<unsigned>(b % g_grid_dim.x),
                        static_cast<unsigned>((b / g_grid_dim.x) % g_grid_dim.y),
                        static_cast<unsigned>(b / (static_cast<uint64_t>(g_grid_dim.x) * g_grid_dim.y))};
    run_block(thread_body, ctx);
  }
  g_launches.back().ran = true;
}

}  // namespace emu

// ---- runtime API ----
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  const emu::DeviceProps& d = emu::device();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = d.max_threads_per_block; break;
    case cudaDevAttrMaxBlockDimX: *value = d.max_block_dim[0]; break;
    case cudaDevAttrMaxGridDimX: *value = static_cast<int>(d.max_grid_dim[0]); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = d.smem_per_block; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; break;
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = d.minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_sm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.max_smem_optin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  const emu::DeviceProps& d = emu::device();
  memset(prop, 0, sizeof *prop);
  snprintf(prop->name, sizeof prop->name, "emulated sm_%d%d", d.major, d.minor);
  prop->totalGlobalMem = size_t(80) << 30;
  prop->sharedMemPerBlock = static_cast<size_t>(d.smem_per_block);
  prop->sharedMemPerBlockOptin = static_cast<size_t>(d.max_smem_optin);
  prop->sharedMemPerMultiprocessor = static_cast<size_t>(d.smem_per_sm);
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = d.max_threads_per_block;
  for (int i = 0; i < 3; ++i) {
    prop->maxThreadsDim[i] = d.max_block_dim[i];
    prop->maxGridSize[i] = static_cast<int>(d.max_grid_dim[i]);
  }
  prop->multiProcessorCount = d.sm_count;
  prop->major = d.major;
  prop->minor = d.minor;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = nullptr;
  if (posix_memalign(p, 256, bytes == 0 ? 1 : bytes) != 0) return cudaErrorMemoryAllocation;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) {
  memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
