// Compile-time tile shapes of the S2 kernels.
//
// Forward: a CTA owns kBlockM query rows (16 or 32 per warp) of one (batch, head) and walks
// the key tiles of kBlockN keys that those rows can see.
// Backward: a CTA owns kBlockN keys (16 per warp) of one (batch, kv head) and walks,
// for every query head sharing that kv head, the query tiles of kBlockM rows that can
// see them.
// Shared-memory rows are padded by 8 elements (16 bytes) so that fragment loads hit
// distinct banks and every row stays 16-byte aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace longlora::attention::kernel {

// Softmax in base 2: exp(x) = exp2(x * log2(e)); the LSE is stored in natural log.
constexpr float kS2Log2e = 1.4426950408889634f;
constexpr float kS2Ln2 = 0.6931471805599453f;

template <typename T_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct S2FwdTraits {
  using T = T_;
  static constexpr bool kWgmma = false;  // s2_fwd_kernel (below: S2FwdWgmmaTraits)
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  // Query rows per warp: 16 (one mma row block) or 32 (two, each K/V fragment read
  // from shared memory feeds two mmas; Q is then re-read from shared memory instead
  // of held in registers).
  static constexpr int kRowsPerWarp = kBlockM / kNWarps;
  static constexpr int kMTiles = kRowsPerWarp / 16;
  static constexpr bool kQInRegs = kMTiles == 1;
  static constexpr int kPad = 8;
  static constexpr int kLd = kHeadDim + kPad;  // row stride of sQ, sK, sV
  static constexpr int kSmemQ = kBlockM * kLd;
  static constexpr int kSmemKV = kBlockN * kLd;
  static constexpr int kSmemBytes = (kSmemQ + 2 * kSmemKV) * static_cast<int>(sizeof(T));

  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dim must be 64 or 128");
  static_assert(kBlockM == 16 * kNWarps || kBlockM == 32 * kNWarps,
                "forward: each warp owns 16 or 32 query rows");
  static_assert(kBlockN % 16 == 0 && kBlockN >= 16, "key tile: multiple of 16");
  static_assert(kLd % 8 == 0, "padded rows must stay 16-byte aligned");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 limit");
};

// Forward on Hopper's wgmma (s2_fwd_wgmma_kernel.cuh, sm_90a): two warpgroups of 64
// query rows, key tiles of 128; Q, two stages of K and kVStages of V, in the
// 128-byte-swizzled layout (unpadded), plus 1 KB to align them to 1024 bytes.
// kPipelined_ (S2FwdWgmmaPipeTraits below): pipelined within each warpgroup, which reads
// V of the previous tile while the next one is copied: a third stage of V.
// kStagger_ (S2FwdWgmmaStaggerTraits): the second warpgroup issues a tile's S = Q K^T
// only once the first one's is done, so that each one's softmax runs while the other
// one's products keep the tensor cores busy (a named barrier per tile).
template <typename T_, int kHeadDim_, bool kPipelined_ = false, bool kStagger_ = false>
struct S2FwdWgmmaTraits {
  using T = T_;
  static constexpr bool kWgmma = true;
  static constexpr bool kPipelined = kPipelined_;
  static constexpr bool kStagger = kStagger_;
  static_assert(!(kPipelined && kStagger), "the staggered forward is the unpipelined one");
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kNWarps = 8;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kVStages = kPipelined ? 3 : 2;
  static constexpr int kSmemBytes =
      (kBlockM + (2 + kVStages) * kBlockN) * kHeadDim * static_cast<int>(sizeof(T)) + 1024;

  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dim must be 64 or 128");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 limit");
};
template <typename T, int D>
using S2FwdWgmmaPipeTraits = S2FwdWgmmaTraits<T, D, true>;
template <typename T, int D>
using S2FwdWgmmaStaggerTraits = S2FwdWgmmaTraits<T, D, false, true>;

template <typename T_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct S2BwdTraits {
  using T = T_;
  static constexpr bool kTiled2D = false;  // s2_bwd_kernel (below: S2Bwd2DTraits)
  static constexpr bool kWgmma = false;    // (below: S2BwdWgmmaTraits)
  static constexpr bool kSwizzled = false;  // padded rows, not the wgmma tile layout
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per step
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kPad = 8;
  static constexpr int kLd = kHeadDim + kPad;  // sQ, sK, sV, sdO
  static constexpr int kLdS = kBlockM + kPad;  // sdS: dS^T (kBlockN x kBlockM)
  // dQ = dS K: warps tile the (kBlockM x kHeadDim) product as kRowBlocks x kColSplits.
  static constexpr int kRowBlocks = kBlockM / 16;
  static constexpr int kColSplits = kNWarps / kRowBlocks;
  static constexpr int kDqCols = kHeadDim / kColSplits;

  static constexpr int kSmemK = kBlockN * kLd;
  static constexpr int kSmemQ = kBlockM * kLd;
  static constexpr int kSmemS = kBlockN * kLdS;
  // K, V; two stages each of Q and dO; dS; then fp32 lse and delta, two stages each.
  static constexpr int kSmemElems = 2 * kSmemK + 4 * kSmemQ + kSmemS;
  static constexpr int kSmemBytes =
      kSmemElems * static_cast<int>(sizeof(T)) + 4 * kBlockM * static_cast<int>(sizeof(float));

  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dim must be 64 or 128");
  static_assert(kBlockN == 16 * kNWarps, "backward: each warp owns 16 keys");
  static_assert(kBlockM % 16 == 0 && kBlockM >= 16, "query step: multiple of 16");
  static_assert(kNWarps % kRowBlocks == 0, "dQ warp tiling: warps per row block");
  static_assert(kDqCols % 16 == 0 && kDqCols * kColSplits == kHeadDim,
                "dQ column split (pairs of 8-wide tiles per ldmatrix.x4)");
  static_assert(kLd % 8 == 0 && kLdS % 8 == 0, "padded rows must stay 16-byte aligned");
  static_assert((kSmemElems * sizeof(T)) % 16 == 0, "fp32 scratch must stay aligned");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 limit");
};

// Backward with the warps tiled in two dimensions (flash-attention 2's layout),
// s2_bwd2d_kernel.cuh. A CTA owns kBlockN = 128 keys of one kv head and walks query
// steps of kBlockM = 64 rows with 8 warps:
//   S = Q K^T, dP = dO V^T (64 x 128): warp (wm, wn) = (warp / 4, warp % 4) computes
//     queries 32 wm .. +32 x keys 32 wn .. +32; P and dS go to shared memory;
//   dV += P^T dO, dK += dS^T Q (128 x D): warp (wk, wd) = (warp / 2, warp % 2) owns
//     keys 32 wk .. +32 x dims (D/2) wd .. +D/2, in registers for the whole CTA;
//   dQ = dS K (64 x D): warp (wm, wn) computes queries 32 wm .. x dims (D/4) wn ..
template <typename T_, int kHeadDim_>
struct S2Bwd2DTraits {
  using T = T_;
  static constexpr bool kTiled2D = true;
  static constexpr bool kWgmma = false;
  static constexpr bool kSwizzled = false;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 128;
  static constexpr int kNWarps = 8;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kDimsDkv = kHeadDim / 2;  // dims of dK, dV per warp
  static constexpr int kDimsDq = kHeadDim / 4;   // dims of dQ per warp
  static constexpr int kPad = 8;
  static constexpr int kLd = kHeadDim + kPad;   // sQ, sK, sV, sdO
  static constexpr int kLdP = kBlockN + kPad;   // sP, sdS: (kBlockM x kBlockN), query-major
  static constexpr int kSmemK = kBlockN * kLd;
  static constexpr int kSmemQ = kBlockM * kLd;
  static constexpr int kSmemP = kBlockM * kLdP;
  // K, V; two stages each of Q and dO; P, dS; then fp32 lse and delta, two stages each.
  static constexpr int kSmemElems = 2 * kSmemK + 4 * kSmemQ + 2 * kSmemP;
  static constexpr int kSmemBytes =
      kSmemElems * static_cast<int>(sizeof(T)) + 4 * kBlockM * static_cast<int>(sizeof(float));

  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dim must be 64 or 128");
  static_assert(kDimsDq % 16 == 0, "dQ: pairs of 8-wide tiles per ldmatrix.x4");
  static_assert((kSmemElems * sizeof(T)) % 16 == 0, "fp32 scratch must stay aligned");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 limit");
};

// Backward on Hopper's wgmma (s2_bwd_wgmma_kernel.cuh, sm_90a, D = 128): a CTA owns
// kBlockN = 128 keys, 64 per warpgroup, and walks query steps of kBlockM = 64 rows.
// K, V, two stages of Q and dO, and dS^T in the 128-byte-swizzled layout (unpadded),
// then fp32 lse and delta (two stages each), plus 1 KB to align the tiles to 1024 bytes.
// kPipelined_ (S2BwdWgmmaPipeTraits below): S^T and dP^T in two commit groups, the
// elementwise work overlapping the products (s2_bwd_wgmma_kernel.cuh).
// kBulkDq_: dQ's fp32 rows staged in shared memory (kDqLd floats a row, padded against
// bank conflicts) and added to dq_accum by the bulk-copy engine, a row per
// cp.reduce.async.bulk, instead of by the threads' atomics.
// kDqRows_: each warp passes its 16 x 64 block of dQ through shared memory (kDqLd floats a
// row) and adds it in 16-byte atomics that cover whole 128-byte lines (two rows of 64
// floats a warp instruction): 4 lines an instruction instead of 8 rows' 32-byte pieces.
template <typename T_, int kHeadDim_, bool kPipelined_ = false, bool kBulkDq_ = false, bool kDqRows_ = false>
struct S2BwdWgmmaTraits {
  using T = T_;
  static constexpr bool kTiled2D = false;
  static constexpr bool kWgmma = true;
  static constexpr bool kSwizzled = true;
  static constexpr bool kPipelined = kPipelined_;
  static constexpr bool kBulkDq = kBulkDq_;
  static constexpr bool kDqRows = kDqRows_;
  static_assert(!(kBulkDq && kDqRows), "one dQ path");
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 128;
  static constexpr int kNWarps = 8;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kLd = kHeadDim;  // unpadded (S2BwdSteps)
  static constexpr int kSmemK = kBlockN * kHeadDim;
  static constexpr int kSmemQ = kBlockM * kHeadDim;
  static constexpr int kSmemDs = kBlockN * kBlockM;
  static constexpr int kSmemElems = 2 * kSmemK + 4 * kSmemQ + kSmemDs;
  // dQ staging (kBulkDq): per warpgroup kBlockM rows of its 64 dims. A row of 72 floats
  // puts the float2 stores of a half-warp (4 rows x 4 column pairs) in 32 distinct banks.
  static constexpr int kDqLd = 72;
  static constexpr int kSmemDqFloats = (kBulkDq || kDqRows) ? 2 * kBlockM * kDqLd : 0;
  static constexpr int kSmemBytes = kSmemElems * static_cast<int>(sizeof(T)) +
                                    (4 * kBlockM + kSmemDqFloats) * static_cast<int>(sizeof(float)) + 1024;

  static_assert(kHeadDim == 128, "wgmma backward: head dim 128 (dQ's 64 dims per warpgroup)");
  static_assert((kSmemQ * sizeof(T)) % 1024 == 0, "every tile 1024-byte aligned");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 limit");
};

template <typename T, int D>
using S2BwdWgmmaPipeTraits = S2BwdWgmmaTraits<T, D, true>;
template <typename T, int D>
using S2BwdWgmmaBulkTraits = S2BwdWgmmaTraits<T, D, false, true>;
template <typename T, int D>
using S2BwdWgmmaPipeBulkTraits = S2BwdWgmmaTraits<T, D, true, true>;
template <typename T, int D>
using S2BwdWgmmaPipeRowsTraits = S2BwdWgmmaTraits<T, D, true, false, true>;

// The mma.sync configurations the dispatch instantiates (on H100/H200 the wgmma kernels
// above replace them: S2FwdWgmmaTraits, and S2BwdWgmmaTraits at D = 128), the fastest
// measured on an H100 at L = 32768 (docs/benchmarks.md): forward 32 query rows per warp, 4 warps, key tiles of
// 32 (D = 128) or 64 (D = 64); backward the 2-D-tiled kernel (D = 128: 22.9 ms against
// 24.3 ms for 8 warps x 16 keys, 2026-11-27) or 4 warps x 16 keys (D = 64, where the
// 2-D kernel is correct but has not been timed).
template <typename T, int D>
using S2FwdConfig = S2FwdTraits<T, D, 128, (D == 128 ? 32 : 64), 4>;
template <typename T, int D>
using S2BwdConfig = std::conditional_t<D == 128, S2Bwd2DTraits<T, D>, S2BwdTraits<T, D, 64, 64, 4>>;
// The alternatives (LONGLORA_S2_FWD_ALT=1, LONGLORA_S2_BWD_ALT=1), kept correct by the
// tests: 16 rows per warp with Q held in registers; the other backward key tile.
template <typename T, int D>
using S2FwdAltConfig = S2FwdTraits<T, D, 64, 64, 4>;
template <typename T, int D>
using S2BwdAltConfig = S2BwdTraits<T, D, (D == 64 ? 64 : 32), (D == 128 ? 64 : 128), (D == 128 ? 4 : 8)>;

}  // namespace longlora::attention::kernel
