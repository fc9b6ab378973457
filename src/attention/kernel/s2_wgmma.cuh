// Hopper warpgroup matrix multiply-accumulate (wgmma, sm_90a) for the S2 kernels
// (s2_fwd_wgmma_kernel.cuh, s2_bwd_wgmma_kernel.cuh): the 128-byte-swizzled
// shared-memory tile layout, its matrix descriptors, the wgmma instructions and their
// ordering fences.
//
// Tile layout "SW128" of a (rows x cols) tile, cols a multiple of 64 (16-bit elements):
// column blocks of 64 elements, each (rows x 128 bytes) and stored one after the other;
// row r of a block at r * 128 bytes, its 16-byte chunk c at chunk position c ^ (r % 8).
// Every block starts 1024-byte aligned, so the pattern is the hardware's 128-byte
// swizzle of the absolute shared address (bits 4-6 ^= bits 7-9).
//
// Descriptors (PTX ISA, "matrix descriptor" of wgmma): start address, leading and
// stride byte offsets (all >> 4) and the swizzle mode (1 = 128 bytes, bits 62-63).
// With 128-byte swizzle:
//   K-major operand (k contiguous, e.g. Q and K as the A and B of S = Q K^T): 8 rows of 128
//     bytes form a 1024-byte atom; SBO = 1024 (the next 8 rows); LBO unused. The 16 k of
//     one instruction are 32 bytes of a row: k-step kk starts at (kk % 4) * 32 bytes of
//     column block kk / 4.
//   MN-major operand (m or n contiguous, e.g. V as the B of O = P V, read transposed): a
//     row is one k (key) and 64 n (dims); SBO = 1024 (the next 8 keys), LBO = the
//     column-block size (the next 64 dims). k-step kk (16 keys) starts at kk * 16 * 128
//     bytes.
//
// Register layouts (per warp w of the warpgroup, g = lane / 4, t = lane % 4): the
// accumulator of m64nN holds rows 16 w + g (elements 4j, 4j+1) and 16 w + g + 8
// (4j+2, 4j+3) at columns 8 j + 2 t, +1: the mma.sync C layout of s2_mma.cuh repeated
// over the N / 8 column tiles. An A operand in registers is the mma.sync m16n8k16 A
// fragment of the warp's 16 rows, so S's accumulators become P's A operand as in
// the mma.sync kernel (pack_a_from_acc).
//
// wgmma runs asynchronously: registers it reads or writes must not be touched between
// the instruction and wgmma_wait. The compiler does not know that; wgmma_reg_fence
// after the wait ties every later use of those registers to the wait.
//
// Compiled only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); other targets get a trap, and
// the dispatch (s2_fwd.cu, s2_bwd.cu) launches these kernels only where a probe kernel
// reports sm_90a code on an sm_90 device (s2_wgmma_available). With LONGLORA_S2_EMULATE the CPU emulation stands in.
#pragma once

#include <cstdint>

#include "s2_mma.cuh"

namespace longlora::attention::kernel {

// Element offset of 16-byte chunk `chunk` (0 .. cols / 8 - 1) of row `row` in an SW128
// tile of `rows` rows.
__host__ __device__ __forceinline__ int sw128_offset(int row, int chunk, int rows) {
  return (chunk / 8) * rows * 64 + row * 64 + ((chunk % 8) ^ (row % 8)) * 8;
}

// cp.async of a (kRows x kCols) tile into SW128 layout; rows >= `rows` are zero-filled.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile_sw128_async(T* s, const T* gp, int64_t gstride, int rows) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kCols % 64 == 0 && kRows % 8 == 0, "SW128 tiles: 64-element column blocks of 8-row atoms");
  constexpr int kRowStep = kThreads / kChunksPerRow;
  if constexpr (kThreads % kChunksPerRow == 0 && kChunks % kThreads == 0 && kRowStep % 8 == 0) {
    // Each thread copies one chunk column of rows r0, r0 + kRowStep, ...; the swizzle
    // repeats every 8 rows, so both addresses advance by constants (a 64-bit multiply per
    // chunk was most of the kernels' copy cost).
    const int r0 = static_cast<int>(threadIdx.x) / kChunksPerRow;
    const int chunk = static_cast<int>(threadIdx.x) % kChunksPerRow;
    T* dst = s + sw128_offset(r0, chunk, kRows);
    const T* src = gp + r0 * gstride + chunk * 8;
    const int64_t step = kRowStep * gstride;
#pragma unroll
    for (int it = 0; it < kChunks / kThreads; ++it) {
      const bool in = r0 + it * kRowStep < rows;
      cp_async_16(dst + it * kRowStep * 64, in ? src : gp, in);
      src += step;
    }
  } else {
#pragma unroll
    for (int it = 0; it < (kChunks + kThreads - 1) / kThreads; ++it) {
      const int c = threadIdx.x + it * kThreads;
      if (kChunks % kThreads == 0 || c < kChunks) {
        const int r = c / kChunksPerRow;
        const int chunk = c % kChunksPerRow;
        const bool in = r < rows;
        cp_async_16(s + sw128_offset(r, chunk, kRows), gp + (in ? r * gstride : 0) + chunk * 8, in);
      }
    }
  }
}

__device__ __forceinline__ uint64_t wgmma_desc(const void* p, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((smem_addr(p) & 0x3ffffu) >> 4) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3fffu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3fffu) << 32) | (1ull << 62);
}

// d (64 x N, fp32) = (scale_d ? d : 0) + A B, k = 16. wgmma_ss: A from shared memory;
// wgmma_rs: A from registers. kTransA / kTransB: 0 = K-major, 1 = MN-major operand
// (wgmma_rs: B is MN-major).
template <typename T, int N>
struct S2Wgmma;  // the instructions: ss<kTransA, kTransB>(d, desc_a, desc_b, scale_d), rs(d, a, desc_b, scale_d)

#if defined(LONGLORA_S2_EMULATE)
template <typename T, int N>
struct S2Wgmma {
  template <int kTransA, int kTransB>
  static void ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    emu::wgmma<T, N>(d, nullptr, desc_a, kTransA != 0, desc_b, kTransB != 0, scale_d != 0);
  }
  static void rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
    emu::wgmma<T, N>(d, a, 0, false, desc_b, /*b_mn_major=*/true, scale_d != 0);
  }
};
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() { emu::wgmma_commit(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  emu::wgmma_wait(N);
}
__device__ __forceinline__ void fence_proxy_async() {}
template <int N>
__device__ __forceinline__ void wgmma_reg_fence(float (&)[N]) {}
template <int N>
__device__ __forceinline__ void wgmma_reg_fence(uint32_t (&)[N][4]) {}
__device__ __forceinline__ void bulk_reduce_add_f32(float* g, const float* s, int bytes) {
  emu::bulk_reduce_add_f32(g, s, bytes);
}
__device__ __forceinline__ void bulk_commit() { emu::bulk_commit(); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  emu::bulk_wait(N);
}
template <int N>
__device__ __forceinline__ void bulk_wait() {
  emu::bulk_wait(N);
}
template <int kId>
__device__ __forceinline__ void named_barrier_sync(int n) {
  emu::named_barrier(kId, n);
}
template <int kId>
__device__ __forceinline__ void named_barrier_arrive(int n) {
  emu::named_barrier_arrive(kId, n);
}
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The accumulator of a wgmma: its 32 (N = 64) or 64 (N = 128) fp32 registers as named
// in the instruction (operands %0 ..), and the output operands binding them to d.
#define S2_WGMMA_REGS32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define S2_WGMMA_REGS64 \
  S2_WGMMA_REGS32 ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define S2_WGMMA_ACC32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define S2_WGMMA_ACC64 \
  S2_WGMMA_ACC32, \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// The m64n64k16 instructions for element type TNAME, named TY in PTX ("bf16", "f16").
#define S2_WGMMA_N64(TNAME, TY) \
  template <> \
  struct S2Wgmma<TNAME, 64> { \
    template <int kTransA, int kTransB> \
    static __device__ __forceinline__ void ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) { \
      asm volatile( \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
          "{" S2_WGMMA_REGS32 "}, %32, %33, p, 1, 1, %35, %36;\n}\n" \
          : S2_WGMMA_ACC32 \
          : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB)); \
    } \
    static __device__ __forceinline__ void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) { \
      asm volatile( \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
          "{" S2_WGMMA_REGS32 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n" \
          : S2_WGMMA_ACC32 \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d)); \
    } \
  };
// The m64n128k16 instructions for element type TNAME, named TY in PTX ("bf16", "f16").
#define S2_WGMMA_N128(TNAME, TY) \
  template <> \
  struct S2Wgmma<TNAME, 128> { \
    template <int kTransA, int kTransB> \
    static __device__ __forceinline__ void ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) { \
      asm volatile( \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
          "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
          "{" S2_WGMMA_REGS64 "}, %64, %65, p, 1, 1, %67, %68;\n}\n" \
          : S2_WGMMA_ACC64 \
          : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB)); \
    } \
    static __device__ __forceinline__ void rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) { \
      asm volatile( \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
          "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
          "{" S2_WGMMA_REGS64 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n" \
          : S2_WGMMA_ACC64 \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d)); \
    } \
  };
S2_WGMMA_N64(__nv_bfloat16, "bf16")
S2_WGMMA_N128(__nv_bfloat16, "bf16")
S2_WGMMA_N64(__half, "f16")
S2_WGMMA_N128(__half, "f16")
#undef S2_WGMMA_N64
#undef S2_WGMMA_N128
#undef S2_WGMMA_REGS32
#undef S2_WGMMA_REGS64
#undef S2_WGMMA_ACC32
#undef S2_WGMMA_ACC64

// Orders this warp's register writes before the wgmma that reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed groups are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's shared-memory writes (cp.async included) visible to the async
// proxy the tensor cores read through; a barrier must follow before other warps' wgmma.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_reg_fence(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void wgmma_reg_fence(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}
// g[i] += s[i] for bytes / 4 floats (bytes a multiple of 16, both 16-byte aligned), by
// the bulk-copy engine, element-wise atomic against other adds; s is read
// asynchronously until bulk_wait_read retires the bulk group (bulk_commit) it is in.
__device__ __forceinline__ void bulk_reduce_add_f32(float* g, const float* s, int bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(g),
               "r"(smem_addr(s)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until at most N of this thread's bulk groups are pending: their sources read (_read),
// or their writes done.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
// Barrier kId (1..15; 0 is __syncthreads) over n threads, a multiple of 32. The id is
// an immediate: with one in a register, ptxas reserves all 16 barriers.
template <int kId>
__device__ __forceinline__ void named_barrier_sync(int n) {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "r"(n) : "memory");
}
// Counts this thread's arrival at barrier kId (of n threads) without waiting: the
// threads that bar.sync there go on once n have arrived or synced.
template <int kId>
__device__ __forceinline__ void named_barrier_arrive(int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "r"(n) : "memory");
}
#else
// Not sm_90a: never launched (the dispatch probes for sm_90a code first).
template <typename T, int N>
struct S2Wgmma {
  template <int kTransA, int kTransB>
  static __device__ __forceinline__ void ss(float (&)[N / 2], uint64_t, uint64_t, int) { __trap(); }
  static __device__ __forceinline__ void rs(float (&)[N / 2], const uint32_t (&)[4], uint64_t, int) { __trap(); }
};
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() {}
template <int N>
__device__ __forceinline__ void wgmma_wait() {}
__device__ __forceinline__ void fence_proxy_async() {}
template <int N>
__device__ __forceinline__ void wgmma_reg_fence(float (&)[N]) {}
template <int N>
__device__ __forceinline__ void wgmma_reg_fence(uint32_t (&)[N][4]) {}
__device__ __forceinline__ void bulk_reduce_add_f32(float*, const float*, int) { __trap(); }
__device__ __forceinline__ void bulk_commit() {}
template <int N>
__device__ __forceinline__ void bulk_wait_read() {}
template <int N>
__device__ __forceinline__ void bulk_wait() {}
template <int kId>
__device__ __forceinline__ void named_barrier_sync(int) {}
template <int kId>
__device__ __forceinline__ void named_barrier_arrive(int) {}
#endif

template <typename T, int N, int kTransA = 0, int kTransB = 0>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  S2Wgmma<T, N>::template ss<kTransA, kTransB>(d, desc_a, desc_b, scale_d);
}
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  S2Wgmma<T, N>::rs(d, a, desc_b, scale_d);
}

}  // namespace longlora::attention::kernel
