// S2-Attention forward on Hopper's warpgroup MMA (wgmma, sm_90a).
//
// Same contract, inputs and outputs as s2_fwd_kernel.cuh (o and the natural-log lse);
// the mask and the tile walk are the same (S2HeadMask, s2_key_tiles). What differs is
// the matrix engine:
//   - a CTA of two warpgroups owns BM = 128 query rows, 64 per warpgroup (wgmma's M);
//   - S = Q K^T is one m64n128k16 wgmma per 16 dims, both operands read by the tensor
//     cores from shared memory through descriptors (s2_wgmma.cuh), no ldmatrix;
//   - O += P V takes P from registers (S's accumulators rounded to T are exactly the A
//     operand's layout) and V from shared memory, transposed by the descriptor;
//   - Q, K and V live in the 128-byte-swizzled layout wgmma reads without bank
//     conflicts; K and V are double-buffered: the copies of tile n + 1 run while tile n
//     is computed, with one barrier per tile (and, staggered, a named one between the
//     warpgroups).
// Pipelined (Traits::kPipelined: S2FwdWgmmaPipeTraits, LONGLORA_S2_FWD_PIPE=1; an
// experiment, 3-5% slower on the H100, so off by default): each warpgroup's tensor cores compute P V of the
// previous tile while it does this tile's softmax, instead of idling through it; V then
// needs a third stage (Q, 2 K and 3 V tiles: 193 KB at D = 128 in bf16).
// Staggered (Traits::kStagger: S2FwdWgmmaStaggerTraits, the default on H100/H200;
// LONGLORA_S2_FWD_STAGGER=0 turns it off; 4.5 against 4.9 ms at L = 32768 on the H200): the
// second warpgroup issues a tile's S only once the first one's is done (named barrier 1:
// the first arrives, the second syncs), so that the warpgroups take turns: one's
// softmax runs while the other's S or P V keeps the tensor cores busy, where both
// used to do their softmax at once with the tensor cores idle.
// The mask, the online softmax and the epilogue are the mma.sync kernel's
// (s2_mask_block, s2_online_softmax, s2_store_out_block in s2_fwd_kernel.cuh).
#pragma once

#include <cmath>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_fwd_kernel.cuh"  // s2_fwd_main_kernel picks either
#include "s2_mask.cuh"
#include "s2_mma.cuh"
#include "s2_traits.cuh"
#include "s2_wgmma.cuh"

namespace longlora::attention::kernel {

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) s2_fwd_wgmma_kernel(const S2FwdParams p) {
  using T = typename Traits::T;
  constexpr int D = Traits::kHeadDim;
  constexpr int BM = Traits::kBlockM;
  constexpr int BN = Traits::kBlockN;
  constexpr int kNS = BN / 8;  // 8-key column tiles of S
  constexpr int kNO = D / 8;   // 8-dim column tiles of O
  constexpr int kVStages = Traits::kVStages;  // 3 when pipelined (s2_traits.cuh)

  extern __shared__ __align__(16) unsigned char s2_smem[];
  // Every tile 1024-byte aligned in the shared window (the swizzle repeats every 1024
  // bytes of the absolute address); kSmemBytes has room for the shift.
  T* sQ = reinterpret_cast<T*>(s2_smem + ((1024u - (smem_addr(s2_smem) & 1023u)) & 1023u));
  T* const sK0 = sQ + BM * D;       // K of the i-th tile of the walk: sK0 + (i % 2) BN D
  T* const sV0 = sK0 + 2 * BN * D;  // V of the i-th tile: sV0 + (i % kVStages) BN D

  const int m_block = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / (p.H / p.Hkv);
  const int q0 = m_block * BM;
  const int warp = threadIdx.x / 32;
  const int wg = warp / 4;  // warpgroup: query rows 64 wg .. of the tile
  const int g = lane_g();

  const T* qp = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head;
  const T* kp = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
  const T* vp = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;
  T* op = static_cast<T*>(p.o) + b * p.o_stride.batch + h * p.o_stride.head;
  float* lse = p.lse + (static_cast<int64_t>(b) * p.H + h) * p.L;

  const S2HeadMask mask = S2HeadMask::make(p.L, p.group, p.mode, h, p.H);
  const float scale_log2 = p.softmax_scale * kS2Log2e;
  const S2TileSpan span = s2_key_tiles(mask, q0, BM, BN);

  // K and V of key tile n_block, the i-th of the walk, into their stages; one cp.async group.
  auto load_kv = [&](int i, int n_block) {
    const int k0 = n_block * BN;
    load_tile_sw128_async<BN, D, Traits::kThreads>(sK0 + (i % 2) * BN * D, kp + k0 * p.k_stride.row,
                                                   p.k_stride.row, p.L - k0);
    load_tile_sw128_async<BN, D, Traits::kThreads>(sV0 + (i % kVStages) * BN * D, vp + k0 * p.v_stride.row,
                                                   p.v_stride.row, p.L - k0);
    cp_async_commit();
  };
  load_tile_sw128_async<BM, D, Traits::kThreads>(sQ, qp + q0 * p.q_stride.row, p.q_stride.row, p.L - q0);
  int n_block = s2_span_first(span);
  if (n_block >= 0) load_kv(0, n_block);
  else cp_async_commit();

  // Descriptors. Q (K-major A): this warpgroup's 64 rows, k-step kk at column block
  // kk / 4, byte (kk % 4) * 32 of the row. K (K-major B): likewise over BN rows.
  // V (MN-major B): k-step kk = keys 16 kk .. at byte 16 kk * 128; LBO = one column block.
  auto desc_q = [&](int kk) {
    return wgmma_desc(sQ + (kk / 4) * BM * 64 + wg * 64 * 64 + (kk % 4) * 16, 16, 1024);
  };
  auto desc_k = [&](int i, int kk) {
    return wgmma_desc(sK0 + (i % 2) * BN * D + (kk / 4) * BN * 64 + (kk % 4) * 16, 16, 1024);
  };
  auto desc_v = [&](int i, int kk) {
    return wgmma_desc(sV0 + (i % kVStages) * BN * D + kk * 16 * 64, BN * 128, 1024);
  };

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  // Running max (base-2, scaled) and partial row sum of this thread's columns, for rows
  // row0 (rr = 0, accumulator elements 4j, 4j+1) and row0 + 8 (rr = 1, 4j+2, 4j+3).
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2];
  const int row0 = q0 + wg * 64 + (warp % 4) * 16 + g;

  // S = Q K^T of the i-th tile (64 rows of this warpgroup x BN keys), D / 16 wgmmas, one group.
  float s[BN / 2];
  auto issue_s = [&](int i) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_ss<T, BN>(s, desc_q(kk), desc_k(i, kk), kk > 0);
    wgmma_commit();
  };
  // O += P V of the i-th tile: P rounded to T as A fragments (16 keys each), V transposed
  // by its descriptor; one group.
  uint32_t pa[BN / 16][4];
  auto issue_pv = [&](int i) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs<T, D>(o, pa[kk], desc_v(i, kk), 1);
    wgmma_commit();
  };
  // Mask and online softmax of the tile at k0 in s, as in s2_fwd_kernel.cuh, on the same
  // accumulator layout (the wgmma accumulator is the mma.sync C layout over kNS column
  // tiles); whether O needs rescaling by alpha.
  auto& s4 = reinterpret_cast<float(&)[kNS][4]>(s);
  auto softmax = [&](int k0) {
    if (s2_tile_needs_mask(mask, q0, k0, BM, BN)) s2_mask_block(s4, mask, row0, k0);
    return __any_sync(0xffffffffu, s2_online_softmax(s4, m_run, l_run, alpha, scale_log2));
  };
  auto rescale_o = [&] {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i / 2) % 2];
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) pack_a_from_acc<T>(pa[kk], s4[2 * kk], s4[2 * kk + 1]);
  };

  int i = 0;  // walk index of tile n_block
  while (n_block >= 0) {
    const int k0 = n_block * BN;
    const int n_next = s2_span_next(span, n_block);
    cp_async_wait<0>();   // this thread's copies of tile i (and Q) have landed
    fence_proxy_async();  // ... and are visible to the tensor cores
    __syncthreads();      // ... for every thread; every warpgroup has retired iteration
                          // i - 1's wgmmas, so the stages tile i + 1 goes to are free
    // Tile i + 1's copies are issued once this tile's first product is: their address
    // arithmetic then runs while the tensor cores work, where issuing them first left the
    // tensor cores idle after every barrier.
    auto prefetch = [&] {
      if (n_next >= 0) load_kv(i + 1, n_next);
    };

    if constexpr (!Traits::kPipelined) {
      // Product, wait, softmax, product, wait: the tensor cores idle during the softmax
      // (unless staggered).
      if constexpr (Traits::kStagger) {
        if (wg == 1) {
          prefetch();  // while waiting for its turn
          named_barrier_sync<1>(Traits::kThreads);  // the first warpgroup's S is done
        }
      }
      wgmma_fence();
      issue_s(i);
      if (!Traits::kStagger || wg == 0) prefetch();
      wgmma_wait<0>();
      wgmma_reg_fence(s);
      if constexpr (Traits::kStagger)
        if (wg == 0) named_barrier_arrive<1>(Traits::kThreads);
      if (softmax(k0)) rescale_o();
      pack_p();
      wgmma_fence();
      issue_pv(i);
      wgmma_wait<0>();
      wgmma_reg_fence(o);
      wgmma_reg_fence(pa);  // P's registers stay untouched until the wgmmas reading them are done
    } else {
      // Flash-attention 3's intra-warpgroup pipelining: S_i, then P_{i-1} V_{i-1} with
      // P of the previous tile still in registers; wait for S_i alone, and do tile i's
      // softmax while P V runs; then rescale O and pack P_i. The last P V follows the loop.
      wgmma_fence();  // pa and the rescaled o of iteration i - 1, before the wgmmas read them
      issue_s(i);
      if (i > 0) {
        wgmma_fence();  // as flash-attention 3 does before each product; ptxas adds it otherwise
        issue_pv(i - 1);
        prefetch();
        wgmma_wait<1>();  // S_i done; P_{i-1} V_{i-1} may still run
      } else {
        prefetch();
        wgmma_wait<0>();
      }
      wgmma_reg_fence(s);
      const bool rescale = softmax(k0);
      wgmma_wait<0>();
      wgmma_reg_fence(o);
      wgmma_reg_fence(pa);
      if (rescale) rescale_o();
      pack_p();
    }
    ++i;
    n_block = n_next;
  }
  if constexpr (Traits::kPipelined) {
    if (i > 0) {  // the last tile's P V
      wgmma_fence();
      issue_pv(i - 1);
      wgmma_wait<0>();
      wgmma_reg_fence(o);
    }
  }

  // Epilogue: normalize, store O and the natural-log LSE.
  s2_store_out_block(reinterpret_cast<const float(&)[kNO][4]>(o), m_run, l_run, row0, p, op, lse);
}

// The forward kernel a traits type selects (s2_launch.cuh, the emulated tests).
template <typename Traits>
constexpr auto s2_fwd_main_kernel() {
  if constexpr (Traits::kWgmma) return s2_fwd_wgmma_kernel<Traits>;
  else return s2_fwd_kernel<Traits>;
}

}  // namespace longlora::attention::kernel
