// S2-Attention forward, device code (flash-attention-2 style).
//
// Contract
//   q (B, H, L, D), k v (B, Hkv, L, D), bf16/fp16, D in {64, 128}; query head h reads
//   kv head h / (H / Hkv).
//   o   (B, H, L, D)  = softmax(scale * q k^T + mask) v          (overwritten)
//   lse (B, H, L)     = log(sum_j exp(scale * q_i . k_j)) over visible j, fp32 (overwritten)
//   mask: S2HeadMask (s2_mask.cuh): Full / Segments / Roll, per head.
//
// Grid (ceil(L / kBlockM), H, B); a CTA of kNWarps warps owns kBlockM query rows,
// 16 per warp (Q fragments held in registers) or 32 (two row blocks sharing every K/V
// fragment; Q fragments re-read from shared memory). For each key tile listed by
// s2_key_tiles, K and V are staged in shared memory, S = Q K^T and O += P V run on
// mma.sync with the online softmax in fp32 registers (base-2 exponentials of the
// scaled scores). Only tiles flagged by s2_tile_needs_mask evaluate the mask.
//
// Pipeline (cp.async, one buffer each for K and V): V of tile n is copied while S of
// tile n and its softmax are computed, K of tile n+1 while O += P V of tile n runs.
// Measured steps and profiles: docs/benchmarks.md, "The S2 kernel on the H100".
#pragma once

#include <cmath>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_mask.cuh"
#include "s2_mma.cuh"
#include "s2_traits.cuh"

namespace longlora::attention::kernel {

// What both forward kernels (this one, s2_fwd_wgmma_kernel.cuh) do with one 16-row block
// of a warp's score and output accumulators, in the mma.sync C layout: s[nt][e] is row
// row0 (e < 2) or row0 + 8 (e >= 2), key k0 + 8 nt + 2 t + (e & 1).

// Boundary tiles only: one interval pair per row, then two compares per element.
template <int kNS>
__device__ __forceinline__ void s2_mask_block(float (&s)[kNS][4], const S2HeadMask& mask, int row0, int k0) {
  const int t = lane_t();
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const S2Bounds keys = mask.row_keys(row0 + rr * 8);
#pragma unroll
    for (int nt = 0; nt < kNS; ++nt)
#pragma unroll
      for (int e = 2 * rr; e < 2 * rr + 2; ++e)
        if (!keys.contains(k0 + nt * 8 + 2 * t + (e & 1))) s[nt][e] = -INFINITY;
  }
}

// Online softmax on the raw scores, in place (s becomes exp2(s * scale_log2 - m)): the
// scale is folded into the exponent, one FFMA. A row's 4 owners are lanes 4g..4g+3 (xor
// 1, 2). Max and sum reduce as trees (a serial chain of dependent instructions was the
// largest stall). m_run and l_run are the running max (base-2, scaled) and this thread's
// partial row sum; alpha the factor for O. Returns whether a row has a new max: O needs
// rescaling only then (exact: otherwise every factor is 1).
template <int kNS>
__device__ __forceinline__ bool s2_online_softmax(float (&s)[kNS][4], float (&m_run)[2], float (&l_run)[2],
                                                  float (&alpha)[2], float scale_log2) {
  bool rescale = false;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float mx[kNS];
#pragma unroll
    for (int nt = 0; nt < kNS; ++nt) mx[nt] = fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]);
#pragma unroll
    for (int w = 1; w < kNS; w *= 2)
#pragma unroll
      for (int nt = 0; nt + w < kNS; nt += 2 * w) mx[nt] = fmaxf(mx[nt], mx[nt + w]);
    float m = mx[0];
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    const float m_new = fmaxf(m_run[rr], m * scale_log2);  // base-2 units
    // A row with nothing visible so far keeps max -inf: subtract 0, not -inf.
    const float m_use = (m_new == -INFINITY) ? 0.f : m_new;
    alpha[rr] = s2_exp2(m_run[rr] - m_use);
    rescale |= m_new != m_run[rr];
    m_run[rr] = m_new;
    float sum[kNS];
#pragma unroll
    for (int nt = 0; nt < kNS; ++nt) {
#pragma unroll
      for (int e = 2 * rr; e < 2 * rr + 2; ++e) s[nt][e] = s2_exp2(fmaf(s[nt][e], scale_log2, -m_use));
      sum[nt] = s[nt][2 * rr] + s[nt][2 * rr + 1];
    }
#pragma unroll
    for (int w = 1; w < kNS; w *= 2)
#pragma unroll
      for (int nt = 0; nt + w < kNS; nt += 2 * w) sum[nt] += sum[nt + w];
    l_run[rr] = l_run[rr] * alpha[rr] + sum[0];
  }
  return rescale;
}

// Epilogue: O / l as T to rows row0, row0 + 8 (those < L) of op, and their natural-log LSE.
template <typename T, int kNO>
__device__ __forceinline__ void s2_store_out_block(const float (&o)[kNO][4], const float (&m_run)[2],
                                                   const float (&l_run)[2], int row0, const S2FwdParams& p,
                                                   T* op, float* lse) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = l_run[rr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int i = row0 + rr * 8;
    if (i < p.L) {
      store_acc_row(op + i * p.o_stride.row, o, rr, inv);
      if (lane_t() == 0) lse[i] = l > 0.f ? m_run[rr] * kS2Ln2 + logf(l) : -INFINITY;
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) s2_fwd_kernel(const S2FwdParams p) {
  using T = typename Traits::T;
  constexpr int D = Traits::kHeadDim;
  constexpr int BM = Traits::kBlockM;
  constexpr int BN = Traits::kBlockN;
  constexpr int LD = Traits::kLd;
  constexpr int kMT = Traits::kMTiles;  // 16-row blocks per warp
  constexpr int kKSteps = D / 16;       // k-steps of S = Q K^T
  constexpr int kNS = BN / 8;           // n-tiles of S
  constexpr int kNO = D / 8;            // n-tiles of O

  extern __shared__ __align__(16) unsigned char s2_smem[];
  T* sQ = reinterpret_cast<T*>(s2_smem);
  T* sK = sQ + Traits::kSmemQ;
  T* sV = sK + Traits::kSmemKV;

  const int m_block = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / (p.H / p.Hkv);
  const int q0 = m_block * BM;
  const int warp = threadIdx.x / 32;
  const int g = lane_g();
  const T* sQw = sQ + warp * Traits::kRowsPerWarp * LD;  // this warp's rows

  const T* qp = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head;
  const T* kp = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
  const T* vp = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;
  T* op = static_cast<T*>(p.o) + b * p.o_stride.batch + h * p.o_stride.head;
  float* lse = p.lse + (static_cast<int64_t>(b) * p.H + h) * p.L;

  const S2HeadMask mask = S2HeadMask::make(p.L, p.group, p.mode, h, p.H);
  const float scale_log2 = p.softmax_scale * kS2Log2e;

  const S2TileSpan span = s2_key_tiles(mask, q0, BM, BN);
  // Copies key tile n_block of K or V into its shared-memory buffer, one group.
  auto load_kv = [&](T* s, const T* g, int64_t row_stride, int n_block) {
    const int k0 = n_block * BN;
    load_tile_async<BN, D, Traits::kThreads>(s, LD, g + k0 * row_stride, row_stride, p.L - k0);
    cp_async_commit();
  };

  load_tile_async<BM, D, Traits::kThreads>(sQ, LD, qp + q0 * p.q_stride.row, p.q_stride.row,
                                           p.L - q0);
  cp_async_commit();
  int n_block = s2_span_first(span);
  if (n_block >= 0) load_kv(sK, kp, p.k_stride.row, n_block);
  cp_async_wait<0>();
  __syncthreads();
  // One 16-row warp keeps its Q fragments in registers; two re-read them per k-step.
  uint32_t qf[Traits::kQInRegs ? kKSteps : 1][4];
  if constexpr (Traits::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) load_a(qf[kk], sQw + kk * 16, LD);
  }

  float o[kMT][kNO][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nd = 0; nd < kNO; ++nd)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][nd][e] = 0.f;
  // Running max (base-2, scaled) and partial row sum of this thread's columns, for
  // rows row0(mt) (rr = 0, accumulator elements 0..1) and row0(mt) + 8 (rr = 1, 2..3).
  float m_run[kMT][2], l_run[kMT][2], alpha[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      m_run[mt][rr] = -INFINITY;
      l_run[mt][rr] = 0.f;
    }
  const int row0 = q0 + warp * Traits::kRowsPerWarp + g;  // + mt * 16 + rr * 8

  while (n_block >= 0) {
    const int k0 = n_block * BN;
    const int n_next = s2_span_next(span, n_block);
    cp_async_wait<0>();  // K of this tile has landed
    __syncthreads();     // ... for every thread; every warp is done with sV (last P V)
    load_kv(sV, vp, p.v_stride.row, n_block);

    // S = Q K^T for this warp's rows x BN keys; each K fragment feeds kMT mmas.
    float s[kMT][kNS][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t qa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if constexpr (Traits::kQInRegs) {
#pragma unroll
          for (int x = 0; x < 4; ++x) qa[mt][x] = qf[kk][x];
        } else {
          load_a(qa[mt], sQw + mt * 16 * LD + kk * 16, LD);
        }
      }
      // All of a k-step's fragments first, so the loads overlap and the mmas issue back to back.
      uint32_t bf[kNS][2];
#pragma unroll
      for (int nt = 0; nt < kNS; nt += 2)
        load_b_nk2(bf[nt], bf[nt + 1], sK + nt * 8 * LD + kk * 16, LD);
#pragma unroll
      for (int nt = 0; nt < kNS; ++nt)
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) mma_16816<T>(s[mt][nt], qa[mt], bf[nt]);
    }

    // Boundary tiles only, in a branch of its own so that the common unmasked tile runs
    // straight-line code.
    if (s2_tile_needs_mask(mask, q0, k0, BM, BN)) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) s2_mask_block(s[mt], mask, row0 + mt * 16, k0);
    }

    bool rescale = false;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) rescale |= s2_online_softmax(s[mt], m_run[mt], l_run[mt], alpha[mt], scale_log2);
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nd = 0; nd < kNO; ++nd)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[mt][nd][e] *= alpha[mt][e / 2];
    }

    cp_async_wait<0>();  // V of this tile has landed
    __syncthreads();     // ... for every thread; every warp is done with sK
    if (n_next >= 0) load_kv(sK, kp, p.k_stride.row, n_next);

    // O += P V (P rounded to T, as the A operand built from the S accumulators); each
    // V fragment feeds kMT mmas.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) pack_a_from_acc<T>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
      for (int nd = 0; nd < kNO; nd += 2) {
        uint32_t b0[2], b1[2];
        load_b_kn2(b0, b1, sV + kk * 16 * LD + nd * 8, LD);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(o[mt][nd], a[mt], b0);
          mma_16816<T>(o[mt][nd + 1], a[mt], b1);
        }
      }
    }
    n_block = n_next;
  }

  // Epilogue: normalize, store O and the natural-log LSE.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) s2_store_out_block(o[mt], m_run[mt], l_run[mt], row0 + mt * 16, p, op, lse);
}

}  // namespace longlora::attention::kernel
