// A CPU emulation of the CUDA execution model the S2 kernels rely on, so that their
// device code (s2_fwd_kernel.cuh, s2_bwd_kernel.cuh, s2_bwd2d_kernel.cuh) runs,
// unchanged, on a machine without a GPU and is checked against the reference in CI
// (tests/test_s2_emulated.cpp).
// It checks what the code computes (fragment layouts, masks, tile pruning, pipeline
// hazards, unwritten outputs); it says nothing about speed.
//
// Model
//   - A CTA runs at a time. Each of its threads is a fiber (ucontext) on one OS thread,
//     scheduled round-robin, warp w in every (w % 3 + 1)-th round (skewed, to expose
//     missing barriers); a fiber runs until it reaches a synchronization point.
//   - __syncthreads waits for every thread of the CTA. Warp primitives (ldmatrix, mma,
//     __shfl_xor_sync, __any_sync) exchange values through per-warp tables and a warp
//     barrier, so all 32 lanes must reach them, as the hardware requires.
//   - mma.sync m16n8k16 multiplies in fp32 from the lanes' fragments (PTX ISA layouts,
//     as documented in s2_mma.cuh); the hardware's accumulation order differs, so
//     results agree to rounding, not bit for bit.
//   - wgmma.mma_async runs at the wgmma.wait_group that retires its commit group, the
//     latest the hardware may read its operands, so writes to them in between show.
//   - cp.reduce.async.bulk (dQ's bulk adds) runs at the cp.async.bulk.wait_group that
//     retires its group, and throws if its shared-memory source changed after the issue.
//   - bar.sync with an id (a named barrier over n threads) as __syncthreads over n;
//     bar.arrive counts a thread there without waiting; __syncwarp waits for the warp.
//     Neither carries data here: a missing arrive deadlocks (and throws), a missing
//     sync shows only where it orders shared-memory writes the scheduler reorders.
//   - cp.async copies at once; commit and wait are no-ops. A kernel that overwrites a
//     stage still being read is therefore caught here as often as on the GPU, or more.
//   - Shared memory is filled with 0xff bytes (NaN in bf16/fp16/fp32) before each CTA,
//     so a read of a never-written element shows up as NaN in the outputs.
//   - A deadlock (threads waiting at different barriers for ever) throws, and so does
//     launch() with an exception any thread threw (a bad operand, a changed bulk source).
//
// Use: include this header, define LONGLORA_S2_EMULATE, then include the kernel
// headers, and run a kernel with emu::launch(grid, threads, [&] { kernel(params); }).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace longlora::attention::kernel {

// The dynamic shared memory of the kernels (`extern __shared__ ... s2_smem[]` in the
// kernel bodies refers to this array): one CTA at a time uses it.
constexpr int kS2EmuSmemBytes = 228 * 1024;
// 1024-byte aligned, so that offsets from it swizzle as the hardware's shared addresses do.
alignas(1024) inline unsigned char s2_smem[kS2EmuSmemBytes];

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// Asynchronous operations of one thread in commit groups (wgmma.commit_group,
// cp.async.bulk.commit_group): issued into `open`, committed as a group, run oldest group
// first by the wait that leaves at most n groups pending.
struct AsyncGroups {
  std::vector<std::function<void()>> open;
  std::vector<std::vector<std::function<void()>>> groups;
  void commit() {
    groups.push_back(std::move(open));
    open.clear();
  }
  void wait(int n) {
    while (static_cast<int>(groups.size()) > n) {
      auto group = std::move(groups.front());
      groups.erase(groups.begin());
      for (auto& op : group) op();
    }
  }
  bool idle() const { return open.empty() && groups.empty(); }
};

struct Fiber {
  ucontext_t ctx;
  Dim3 tid;
  bool done = false;
  const uint64_t* wait_gen = nullptr;  // waiting at a barrier until *wait_gen != wait_val
  uint64_t wait_val = 0;
  unsigned warp_ops = 0;  // warp primitives so far: which of the two exchange tables
  // wgmma.mma_async issued since this thread's last commit, and the committed groups
  // not yet waited for: they run at the wait that retires them (emu::wgmma_wait).
  AsyncGroups wgmma;
  AsyncGroups bulk;  // cp.reduce.async.bulk operations, the same way
};

// Two exchange tables used alternately: a lane writes table k of its next primitive
// only after the barrier of the current one (table k ^ 1), which every lane reaches
// after reading table k of the previous one. So one barrier per primitive suffices.
struct Warp {
  int arrived = 0;
  uint64_t gen = 0;
  const void* ptr[2][32];
  uint32_t u[2][32][6];
};

struct Cta {
  Dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int current = 0;
  int arrived = 0;
  uint64_t gen = 0;
  int named_arrived[16] = {};  // bar.sync id, n (id 0 is __syncthreads)
  uint64_t named_gen[16] = {};
  // An exception thrown in a fiber (none may unwind out of a ucontext fiber): caught at
  // the fiber's entry, thrown again by launch(), which abandons the CTA.
  std::string error;
  bool progress = false;
  ucontext_t sched;
  std::function<void()> body;
};

inline Cta*& cta() {
  static Cta* c = nullptr;
  return c;
}
inline Fiber& fiber() { return cta()->fibers[cta()->current]; }
inline int lane() { return static_cast<int>(fiber().tid.x & 31); }
inline Warp& warp() { return cta()->warps[fiber().tid.x / 32]; }

// The exchange table of this lane's next warp primitive.
inline int next_table() { return static_cast<int>(fiber().warp_ops++ & 1u); }

inline void yield() { swapcontext(&fiber().ctx, &cta()->sched); }
// A yield that is progress (not a wait): lets other warps run between two steps of this one.
inline void yield_running() {
  cta()->progress = true;
  yield();
}

// Barrier over `n` threads with the counter/generation pair (arrived, gen).
inline void barrier(int& arrived, uint64_t& gen, int n) {
  Cta& c = *cta();
  c.progress = true;
  const uint64_t g = gen;
  if (++arrived == n) {
    arrived = 0;
    ++gen;
    return;
  }
  Fiber& f = fiber();
  f.wait_gen = &gen;  // the scheduler skips this fiber until the barrier completes
  f.wait_val = g;
  while (gen == g) yield();
  f.wait_gen = nullptr;
}
inline void warp_sync() {
  Warp& w = warp();
  barrier(w.arrived, w.gen, 32);
}
inline void syncthreads() {
  Cta& c = *cta();
  barrier(c.arrived, c.gen, static_cast<int>(c.fibers.size()));
}
// bar.sync id, n: the first n threads to arrive at barrier id (1..15) wait for each other.
inline void named_barrier(int id, int n) {
  Cta& c = *cta();
  if (id <= 0 || id >= 16) throw std::runtime_error("emu::named_barrier: id must be in 1..15");
  barrier(c.named_arrived[id], c.named_gen[id], n);
}
// bar.arrive id, n: counts this thread at barrier id without waiting for it.
inline void named_barrier_arrive(int id, int n) {
  Cta& c = *cta();
  if (id <= 0 || id >= 16) throw std::runtime_error("emu::named_barrier_arrive: id must be in 1..15");
  c.progress = true;
  if (++c.named_arrived[id] == n) {
    c.named_arrived[id] = 0;
    ++c.named_gen[id];
  }
}

template <typename T>
inline float elem_to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  }
}
inline uint16_t half_of(uint32_t reg, int hi) { return static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffff); }

// ldmatrix.sync.aligned.m8n8.x4[.trans].b16: lane l gives the address of row l % 8 of
// block l / 8; register i receives, of block i, row l / 4, elements 2 (l % 4) and
// 2 (l % 4) + 1, or with .trans the transposed block's (element l / 4 of rows
// 2 (l % 4) and 2 (l % 4) + 1).
inline void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* row,
                        bool trans) {
  Warp& w = warp();
  const int l = lane(), k = next_table();
  w.ptr[k][l] = row;
  warp_sync();
  uint32_t r[4];
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const auto* p = static_cast<const uint16_t*>(w.ptr[k][8 * i + l / 4]);
      lo = p[2 * (l % 4)];
      hi = p[2 * (l % 4) + 1];
    } else {
      lo = static_cast<const uint16_t*>(w.ptr[k][8 * i + 2 * (l % 4)])[l / 4];
      hi = static_cast<const uint16_t*>(w.ptr[k][8 * i + 2 * (l % 4) + 1])[l / 4];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: c += A B with, per lane (g = l / 4,
// t = l % 4): a[0] = A[g][2t, 2t+1], a[1] = A[g+8][...], a[2] = A[g][2t+8, 2t+9],
// a[3] = A[g+8][2t+8, 2t+9]; b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g];
// c[0..1] = C[g][2t, 2t+1], c[2..3] = C[g+8][2t, 2t+1].
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Warp& w = warp();
  const int l = lane(), tb = next_table();
  auto& u = w.u[tb];
  for (int i = 0; i < 4; ++i) u[l][i] = a[i];
  u[l][4] = b[0];
  u[l][5] = b[1];
  warp_sync();
  auto A = [&](int m, int k) {
    const int src = (m % 8) * 4 + (k % 8) / 2;
    const int reg = (m >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return elem_to_float<T>(half_of(u[src][reg], k % 2));
  };
  auto B = [&](int k, int n) {
    const int src = n * 4 + (k % 8) / 2;
    return elem_to_float<T>(half_of(u[src][4 + (k >= 8 ? 1 : 0)], k % 2));
  };
  const int g = l / 4, t = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int m = g + (e >= 2 ? 8 : 0), n = 2 * t + (e % 2);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A(m, k) * B(k, n);
    c[e] += acc;
  }
}

// The shared-memory address of p: its offset in s2_smem (1024-byte aligned, as the
// 128-byte swizzle of wgmma descriptors requires of the real window).
inline uint32_t smem_addr(const void* p) {
  const auto off = static_cast<const unsigned char*>(p) - s2_smem;
  if (off < 0 || off >= kS2EmuSmemBytes) throw std::runtime_error("emu::smem_addr: not a shared-memory address");
  return static_cast<uint32_t>(off);
}

// One 16-bit element of a wgmma operand at (mn, k) of the 64 x 16 (A) or 16 x N (B) tile a
// descriptor describes, with the PTX ISA's canonical 128-byte-swizzled layouts, written
// from their definition (not from the kernels' tile writer, s2_wgmma.cuh):
//   K-major:  byte start + (mn / 8) SBO + (mn % 8) 128 + 2 k
//   MN-major: byte start + (mn / 64) LBO + 2 (mn % 64) + (k / 8) SBO + (k % 8) 128
// then the swizzle of the absolute address: bits 4-6 ^= bits 7-9.
inline uint16_t wgmma_operand(uint64_t desc, int mn, int k, bool mn_major) {
  if ((desc >> 62) != 1) throw std::runtime_error("emu::wgmma: only the 128-byte swizzle is emulated");
  const uint32_t start = static_cast<uint32_t>(desc & 0x3fff) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3fff) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4;
  uint32_t a = mn_major ? start + (mn / 64) * lbo + 2 * (mn % 64) + (k / 8) * sbo + (k % 8) * 128
                        : start + (mn / 8) * sbo + (mn % 8) * 128 + 2 * k;
  a ^= ((a >> 7) & 7u) << 4;
  if (a + 2 > static_cast<uint32_t>(kS2EmuSmemBytes)) throw std::runtime_error("emu::wgmma: operand outside shared memory");
  uint16_t v;
  std::memcpy(&v, s2_smem + a, 2);
  return v;
}

// wgmma.mma_async m64nNk16, f32 accumulate, for this warp's 16 rows of the warpgroup's 64
// (warp w % 4 owns rows 16 (w % 4) ..): d = (accumulate ? d : 0) + A B. A from the
// warp's registers (mma.sync m16n8k16 A fragments; a != nullptr) or from a K-major or
// MN-major descriptor; B from a K-major or an MN-major descriptor. d[i] is row g + 8 ((i / 2) % 2),
// column 8 (i / 4) + 2 t + i % 2. This runs it; emu::wgmma issues it.
template <typename T, int N>
inline void wgmma_run(float (&d)[N / 2], const uint32_t* a, uint64_t desc_a, bool a_mn_major, uint64_t desc_b,
                      bool b_mn_major, bool accumulate) {
  yield_running();
  Warp& w = warp();
  const int l = lane();
  // Only an A in registers goes through an exchange table (and its barrier); from
  // shared memory every lane reads what it needs itself.
  auto& u = w.u[a != nullptr ? next_table() : 0];
  if (a != nullptr) {
    for (int i = 0; i < 4; ++i) u[l][i] = a[i];
    warp_sync();
  }
  const int wq = static_cast<int>(fiber().tid.x / 32) % 4;
  auto A = [&](int m, int k) {  // m in 0..15 of this warp's rows
    if (a == nullptr) return elem_to_float<T>(wgmma_operand(desc_a, 16 * wq + m, k, a_mn_major));
    const int src = (m % 8) * 4 + (k % 8) / 2;
    const int reg = (m >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return elem_to_float<T>(half_of(u[src][reg], k % 2));
  };
  const int g = l / 4, t = l % 4;
  float arow[2][16];
  for (int r = 0; r < 2; ++r)
    for (int k = 0; k < 16; ++k) arow[r][k] = A(g + 8 * r, k);
  for (int i = 0; i < N / 2; ++i) {
    const int r = (i / 2) % 2, n = 8 * (i / 4) + 2 * t + i % 2;
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += arow[r][k] * elem_to_float<T>(wgmma_operand(desc_b, n, k, b_mn_major));
    d[i] = (accumulate ? d[i] : 0.f) + acc;
  }
}

// The hardware runs a wgmma asynchronously, some time between its issue and the
// wgmma.wait_group that retires its commit group, reading its operands (shared memory,
// A's registers, the accumulator) then. The emulation runs it as late as that allows:
// at the wait. A kernel that overwrites an operand, or touches the accumulator, before
// the wait gets wrong results here, and a wgmma never committed and waited for throws.
template <typename T, int N>
inline void wgmma(float (&d)[N / 2], const uint32_t* a, uint64_t desc_a, bool a_mn_major, uint64_t desc_b,
                  bool b_mn_major, bool accumulate) {
  // Each wgmma is a scheduling point, as on the GPU, where warps drift apart between
  // barriers: with A from shared memory nothing else would make this fiber yield, and a
  // warp could never get ahead of a slower one's shared-memory stores.
  yield_running();
  fiber().wgmma.open.push_back([&d, a, desc_a, a_mn_major, desc_b, b_mn_major, accumulate] {
    wgmma_run<T, N>(d, a, desc_a, a_mn_major, desc_b, b_mn_major, accumulate);
  });
}
inline void wgmma_commit() { fiber().wgmma.commit(); }
// Retires committed groups, oldest first, until at most n are in flight.
inline void wgmma_wait(int n) { fiber().wgmma.wait(n); }

// cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32: dst[i] += src[i] for
// bytes / 4 floats, asynchronously. The hardware reads the shared-memory source at some
// time between the issue and the cp.async.bulk.wait_group(.read) that retires its bulk
// group. The emulation keeps the source as it was at the issue and, at that wait,
// throws if it has changed since (a store not ordered before the issue, or one made
// before the wait); else it adds then. A bulk group never waited for fails the launch.
inline void bulk_reduce_add_f32(float* dst, const float* src, int bytes) {
  if (bytes <= 0 || bytes % 16 != 0) throw std::runtime_error("emu::bulk_reduce_add: size must be a positive multiple of 16");
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || smem_addr(src) % 16 != 0)
    throw std::runtime_error("emu::bulk_reduce_add: addresses must be 16-byte aligned");
  smem_addr(src + bytes / 4 - 1);  // the whole source in shared memory
  yield_running();
  std::vector<float> at_issue(src, src + bytes / 4);
  fiber().bulk.open.push_back([dst, src, at_issue = std::move(at_issue)] {
    if (std::memcmp(at_issue.data(), src, at_issue.size() * 4) != 0)
      throw std::runtime_error("emu::bulk_reduce_add: thread " + std::to_string(fiber().tid.x) +
                               ": its shared-memory source changed between issue and wait");
    for (size_t i = 0; i < at_issue.size(); ++i) dst[i] += at_issue[i];
  });
}
inline void bulk_commit() { fiber().bulk.commit(); }
// Retires this thread's committed bulk groups, oldest first, until at most n are pending.
inline void bulk_wait(int n) { fiber().bulk.wait(n); }

template <typename V>
inline V shfl_xor(V v, int lane_mask) {
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  Warp& w = warp();
  const int l = lane(), k = next_table();
  std::memcpy(&w.u[k][l][0], &v, 4);
  warp_sync();
  V out;
  std::memcpy(&out, &w.u[k][l ^ lane_mask][0], 4);
  return out;
}

inline bool any(bool pred) {
  Warp& w = warp();
  const int l = lane(), k = next_table();
  w.u[k][l][0] = pred ? 1u : 0u;
  warp_sync();
  bool out = false;
  for (int i = 0; i < 32; ++i) out = out || w.u[k][i][0] != 0;
  return out;
}

inline void copy_or_zero(void* dst, const void* src, int bytes, bool in_range) {
  if (in_range)
    std::memcpy(dst, src, bytes);
  else
    std::memset(dst, 0, bytes);
}

// Runs body() as every thread of every CTA of the grid, one CTA at a time.
inline void launch(Dim3 grid, int threads, const std::function<void()>& body) {
  if (threads <= 0 || threads % 32 != 0) throw std::runtime_error("emu::launch: threads must be a multiple of 32");
  constexpr size_t kStack = 128 * 1024;
  static std::vector<std::vector<char>> stacks;
  while (stacks.size() < static_cast<size_t>(threads)) stacks.emplace_back(kStack);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Cta c;
        c.block_idx = {x, y, z};
        c.block_dim = {static_cast<unsigned>(threads), 1, 1};
        c.grid_dim = grid;
        c.fibers.resize(threads);
        c.warps.resize(threads / 32);
        c.body = body;
        cta() = &c;
        std::memset(s2_smem, 0xff, sizeof s2_smem);
        for (int i = 0; i < threads; ++i) {
          Fiber& f = c.fibers[i];
          f.tid = {static_cast<unsigned>(i), 0, 0};
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stacks[i].data();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &c.sched;
          makecontext(&f.ctx, +[] {
            Cta& cc = *cta();
            try {
              cc.body();
            } catch (const std::exception& e) {
              cc.error = e.what();
            }
            cc.fibers[cc.current].done = true;
            cc.progress = true;
          }, 0);
        }
        // Warps run at different speeds: warp w only in every (w % 3 + 1)-th round, so
        // between two __syncthreads some warps are up to three sync points ahead of
        // others, and a missing barrier lets them overwrite what the slow ones read.
        int idle_rounds = 0;
        for (int live = threads, round = 0; live > 0; ++round) {
          c.progress = false;
          live = 0;
          for (int i = 0; i < threads; ++i) {
            if (c.fibers[i].done) continue;
            ++live;
            if (round % ((i / 32) % 3 + 1) != 0) continue;
            const Fiber& f = c.fibers[i];
            if (f.wait_gen != nullptr && *f.wait_gen == f.wait_val) continue;
            c.current = i;
            swapcontext(&c.sched, &c.fibers[i].ctx);
            if (!c.error.empty()) {
              cta() = nullptr;  // the other fibers are abandoned with this CTA
              throw std::runtime_error(c.error + " (CTA " + std::to_string(x) + ", " + std::to_string(y) + ", " +
                                       std::to_string(z) + ")");
            }
            live -= c.fibers[i].done ? 1 : 0;
          }
          idle_rounds = c.progress ? 0 : idle_rounds + 1;
          if (live > 0 && idle_rounds > 6) {  // every warp had its turn without progress
            cta() = nullptr;  // the fibers are abandoned with this CTA
            throw std::runtime_error("emu::launch: deadlock in CTA (" + std::to_string(x) + ", " +
                                     std::to_string(y) + ", " + std::to_string(z) + "): " +
                                     std::to_string(live) + " threads wait at barriers that never complete");
          }
        }
        for (const Fiber& f : c.fibers)
          if (!f.wgmma.idle() || !f.bulk.idle()) {
            cta() = nullptr;
            throw std::runtime_error("emu::launch: thread " + std::to_string(f.tid.x) + " ended with " +
                                     (f.bulk.idle() ? "wgmmas" : "bulk copies") +
                                     " it never committed and waited for");
          }
        cta() = nullptr;
      }
}

}  // namespace emu
}  // namespace longlora::attention::kernel

// The CUDA built-ins the kernels use, on the emulation above.
#define threadIdx (::longlora::attention::kernel::emu::fiber().tid)
#define blockIdx (::longlora::attention::kernel::emu::cta()->block_idx)
#define blockDim (::longlora::attention::kernel::emu::cta()->block_dim)
#define gridDim (::longlora::attention::kernel::emu::cta()->grid_dim)
#define __syncthreads() ::longlora::attention::kernel::emu::syncthreads()
#define __shfl_xor_sync(mask, v, m) ::longlora::attention::kernel::emu::shfl_xor((v), (m))
#define __any_sync(mask, p) ::longlora::attention::kernel::emu::any(p)
#define __syncwarp(...) ::longlora::attention::kernel::emu::warp_sync()
#define __launch_bounds__(...)
inline float atomicAdd(float* p, float v) {  // one OS thread: no other fiber runs meanwhile
  const float old = *p;
  *p = old + v;
  return old;
}
