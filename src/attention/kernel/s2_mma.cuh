// Warp-level tensor-core helpers for the S2 kernels: mma.sync m16n8k16 (bf16/fp16 in,
// fp32 accumulate), fragment loads from shared memory, tile copies global -> shared.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, per lane: g = lane / 4, t = lane % 4):
//   A 16x16 (row): a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]
//                  a[2] = A[g][2t+8..2t+9]  a[3] = A[g+8][2t+8..2t+9]
//   B 16x8  (col): b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
//   C 16x8  (f32): c[0..1] = C[g][2t..2t+1] c[2..3] = C[g+8][2t..2t+1]
// Two adjacent C tiles (n = 0..7, 8..15) of a 16x16 product are exactly the A fragment
// of that 16x16 block used as the next product's left operand (pack_a_from_acc).
// In each packed 32-bit register the lower-index element sits in the low 16 bits.
//
// With LONGLORA_S2_EMULATE defined (and s2_emulate.h included first), the PTX below is
// replaced by the CPU emulation the tests run the kernels with (s2_emulate.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace longlora::attention::kernel {

template <typename T>
struct S2Elem;
template <>
struct S2Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) {
    return __bfloat162float(x);
  }
};
template <>
struct S2Elem<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
};

// c += a * b for one 16x8x16 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);
#ifdef LONGLORA_S2_EMULATE
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4],
                                                         const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  emu::mma_16816<__nv_bfloat16>(c, a, b);
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  emu::mma_16816<__half>(c, a, b);
}
#else
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4],
                                                         const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

__device__ __forceinline__ int lane_g() { return (threadIdx.x & 31) >> 2; }
__device__ __forceinline__ int lane_t() { return threadIdx.x & 3; }

// 2^x by the special-function unit alone (ex2.approx.ftz): exp2f adds a compare and two
// multiplies around it per element to keep results below 2^-126, which the kernels'
// softmax arguments (<= 0) only produce for probabilities that round to 0 anyway.
__device__ __forceinline__ float s2_exp2(float x) {
#if defined(__CUDA_ARCH__) && !defined(LONGLORA_S2_EMULATE)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// Fragment loads use ldmatrix: one instruction moves two or four 8x8 blocks of 16-bit
// elements from shared memory into exactly the mma fragment layout (lane l supplies
// the address of row l % 8 of block l / 8; every row address must be 16-byte aligned,
// which the padded row strides and the 8-element column offsets of all callers keep).
// With .trans each block arrives transposed. (Scalar loads took 4-8 shared-memory
// instructions per fragment and left the first kernel load-bound on an H200.)
#ifdef LONGLORA_S2_EMULATE
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return emu::smem_addr(p); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            const void* row) {
  emu::ldmatrix_x4(r0, r1, r2, r3, row, /*trans=*/false);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3, const void* row) {
  emu::ldmatrix_x4(r0, r1, r2, r3, row, /*trans=*/true);
}
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// This lane's row address in; register i = the lane's two elements of block i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(row)));
}
#endif

// A(m, k) = s[m * ld + k]: a 16x16 row-major block (k contiguous).
// Blocks: 0 = rows 0-7 / cols 0-7, 1 = rows 8-15 / cols 0-7, 2 = rows 0-7 / cols 8-15,
// 3 = rows 8-15 / cols 8-15, i.e. a[0..3] of the fragment layout above.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* s, int ld) {
  const int l = threadIdx.x & 31;
  const T* row = s + ((l & 7) + ((l >> 3) & 1) * 8) * ld + (l >> 4) * 8;
  ldmatrix_x4(a[0], a[1], a[2], a[3], row);
}

// The same 16x16 A block stored transposed, A(m, k) = s[k * ld + m] (m contiguous),
// e.g. dS for dQ = dS K from a key-major dS^T; the blocks arrive transposed.
template <typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* s, int ld) {
  const int l = threadIdx.x & 31;
  const T* row = s + ((l & 7) + (l >> 4) * 8) * ld + ((l >> 3) & 1) * 8;
  ldmatrix_x4_trans(a[0], a[1], a[2], a[3], row);
}

// Two adjacent 16x8 B fragments (n 0-7 -> b0, n 8-15 -> b1) per instruction.
// B(k, n) = s[n * ld + k]: stored n-major (k contiguous), e.g. K rows for S = Q K^T.
// Blocks: 0 = n 0-7 / k 0-7, 1 = n 0-7 / k 8-15, 2 = n 8-15 / k 0-7, 3 = n 8-15 / k 8-15.
template <typename T>
__device__ __forceinline__ void load_b_nk2(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* s,
                                           int ld) {
  const int l = threadIdx.x & 31;
  const T* row = s + ((l & 7) + (l >> 4) * 8) * ld + ((l >> 3) & 1) * 8;
  ldmatrix_x4(b0[0], b0[1], b1[0], b1[1], row);
}

// B(k, n) = s[k * ld + n]: stored k-major (n contiguous), e.g. V rows for O = P V;
// the blocks arrive transposed. Blocks: 0 = k 0-7 / n 0-7, 1 = k 8-15 / n 0-7,
// 2 = k 0-7 / n 8-15, 3 = k 8-15 / n 8-15.
template <typename T>
__device__ __forceinline__ void load_b_kn2(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* s,
                                           int ld) {
  const int l = threadIdx.x & 31;
  const T* row = s + ((l & 7) + ((l >> 3) & 1) * 8) * ld + (l >> 4) * 8;
  ldmatrix_x4_trans(b0[0], b0[1], b1[0], b1[1], row);
}

// The A fragment of the 16x16 block formed by accumulator tiles c0 (cols 0..7) and
// c1 (cols 8..15), rounded to T.
template <typename T>
__device__ __forceinline__ void pack_a_from_acc(uint32_t (&a)[4], const float (&c0)[4],
                                                const float (&c1)[4]) {
  a[0] = S2Elem<T>::pack(c0[0], c0[1]);
  a[1] = S2Elem<T>::pack(c0[2], c0[3]);
  a[2] = S2Elem<T>::pack(c1[0], c1[1]);
  a[3] = S2Elem<T>::pack(c1[2], c1[3]);
}

// Row rr (0: g, 1: g + 8) of an accumulator of kN 8-column C tiles, times `scale`, as T
// to this thread's columns 8 nd + 2 t, + 1 of `row` (one 32-bit store per tile).
template <typename T, int kN>
__device__ __forceinline__ void store_acc_row(T* row, const float (&acc)[kN][4], int rr, float scale = 1.f) {
  const int t = lane_t();
#pragma unroll
  for (int nd = 0; nd < kN; ++nd)
    *reinterpret_cast<uint32_t*>(row + nd * 8 + 2 * t) =
        S2Elem<T>::pack(acc[nd][2 * rr] * scale, acc[nd][2 * rr + 1] * scale);
}

// Asynchronous copies global -> shared (cp.async, sm_80+): the copy engine moves the
// bytes while the warp computes, and registers are not involved. A group of copies is
// closed by cp_async_commit; cp_async_wait<N> blocks until at most N of this thread's
// groups are still in flight (a __syncthreads must follow before other threads read).
// src_bytes 0 writes zeros and reads nothing.
#ifdef LONGLORA_S2_EMULATE
// Emulated: the copy happens at once (zeros where out of range); commit/wait are no-ops.
__device__ __forceinline__ void cp_async_16(void* s, const void* g, bool in_range) {
  emu::copy_or_zero(s, g, 16, in_range);
}
__device__ __forceinline__ void cp_async_4(void* s, const void* g, bool in_range) {
  emu::copy_or_zero(s, g, 4, in_range);
}
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}
#else
__device__ __forceinline__ void cp_async_16(void* s, const void* g, bool in_range) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(s)), "l"(g),
               "r"(in_range ? 16 : 0));
}
__device__ __forceinline__ void cp_async_4(void* s, const void* g, bool in_range) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(s)), "l"(g),
               "r"(in_range ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// load_tile with cp.async: all of a thread's copies are issued at once (fully unrolled),
// so one tile costs one memory latency, not one per 16-byte chunk. Rows >= `rows` are
// zero-filled (their source address is the tile's first row, never dereferenced).
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* s, int ld, const T* gp, int64_t gstride,
                                                int rows) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kCols % 8 == 0, "tile width must be a multiple of 8 elements");
#pragma unroll
  for (int it = 0; it < (kChunks + kThreads - 1) / kThreads; ++it) {
    const int c = threadIdx.x + it * kThreads;
    if (kChunks % kThreads == 0 || c < kChunks) {
      const int r = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const bool in = r < rows;
      cp_async_16(s + r * ld + col, gp + (in ? r * gstride : 0) + col, in);
    }
  }
}

}  // namespace longlora::attention::kernel
