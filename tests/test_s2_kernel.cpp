// The S2-Attention CUDA kernels, as the dispatch picks them for the GPU at hand (wgmma on
// H100/H200; LONGLORA_S2_FWD_MMA, LONGLORA_S2_BWD_MMA, LONGLORA_S2_*_ALT,
// LONGLORA_S2_BWD_2D, LONGLORA_S2_*_PIPE and LONGLORA_S2_BWD_BULKDQ select the others, as
// scripts/gpu-check.sh does), against
// attention_reference: out, dq, dk, dv (oracle and tolerance: s2_compare.h). The same
// kernels on the CPU emulation: test_s2_emulated.cpp.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "longlora/attention/attention.h"
#include "longlora/common/error.h"
#include "s2_compare.h"

#ifdef LONGLORA_WITH_CUDA
#include <utility>

#include <cstdlib>

#include "../src/attention/kernel/s2_mask.cuh"  // white-box: the kernels' index rules
#include "longlora/attention/kernel/s2_params.h"
#endif

namespace {

namespace la = longlora::attention;

using s2test::case_name;
using s2test::S2Case;

// The kernel on (q, k, v, dout) against the fp32 oracle (s2_compare.h).
void expect_matches_reference(const std::string& name, const torch::Tensor& q,
                              const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& dout, la::Mode mode, int64_t G) {
  s2test::expect_matches_reference(name, q, k, v, dout, mode, G,
                                   s2test::run(&la::attention_kernel, q, k, v, dout, mode, G));
}

class S2KernelVsReference : public ::testing::TestWithParam<S2Case> {};

TEST_P(S2KernelVsReference, OutAndGradsMatch) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: S2 kernel tests run on the GPU machine";
  const S2Case c = GetParam();
  const auto in = s2test::random_inputs(c, torch::kCUDA);
  expect_matches_reference(case_name(c), in.q, in.k, in.v, in.dout, c.mode, c.G);
}

std::vector<S2Case> s2_cases() {
  using la::Mode;
  const auto bf16 = torch::kBFloat16;
  const auto fp16 = torch::kHalf;
  std::vector<S2Case> cs;
  // Every mode x dtype x head dim on a tiny MHA and a small GQA (B = 2) problem.
  for (Mode m : {Mode::Full, Mode::Segments, Mode::Roll})
    for (auto dt : {bf16, fp16})
      for (int64_t D : {64, 128}) {
        cs.push_back({1, 4, 4, 64, D, 16, m, dt});
        cs.push_back({2, 8, 2, 256, D, 64, m, dt});
      }
  // Ragged shapes: L not a multiple of the 64-row tiles, half-groups not tile-aligned,
  // tiny groups, G == L (plain causal in every mode), Hkv = 1.
  for (Mode m : {Mode::Segments, Mode::Roll}) {
    cs.push_back({1, 4, 1, 96, 64, 32, m, bf16});
    cs.push_back({1, 2, 2, 48, 128, 16, m, fp16});
    cs.push_back({1, 4, 2, 192, 128, 96, m, bf16});
    cs.push_back({1, 2, 1, 160, 64, 160, m, bf16});
    cs.push_back({1, 2, 2, 512, 64, 16, m, fp16});
    cs.push_back({1, 8, 1, 320, 128, 40, m, bf16});
  }
  // Larger sequences (fewer at the big end).
  cs.push_back({1, 8, 2, 1024, 128, 256, Mode::Roll, bf16});
  cs.push_back({1, 8, 2, 1024, 128, 256, Mode::Segments, bf16});
  cs.push_back({1, 4, 4, 2048, 64, 512, Mode::Segments, fp16});
  cs.push_back({1, 4, 4, 2048, 64, 0, Mode::Full, bf16});
  cs.push_back({1, 4, 2, 4096, 128, 1024, Mode::Roll, bf16});
  cs.push_back({1, 2, 1, 8192, 64, 2048, Mode::Segments, bf16});
  cs.push_back({1, 2, 2, 16384, 128, 4096, Mode::Roll, bf16});
  cs.push_back({1, 2, 1, 16384, 64, 4096, Mode::Segments, fp16});
  return cs;
}

INSTANTIATE_TEST_SUITE_P(S2Kernel, S2KernelVsReference, ::testing::ValuesIn(s2_cases()),
                         [](const ::testing::TestParamInfo<S2Case>& info) {
                           return case_name(info.param);
                         });

// Views whose strides are not (B, H, L, D)-contiguous: q k v made (B, L, H, D) and
// transposed, as a model's projection produces them.
TEST(S2Kernel, StridedViewsMatch) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: S2 kernel tests run on the GPU machine";
  const S2Case c{2, 4, 2, 256, 64, 64, la::Mode::Roll, torch::kBFloat16};
  const auto in = s2test::random_inputs(c, torch::kCUDA, /*strided=*/true, /*seed=*/7);
  ASSERT_FALSE(in.q.is_contiguous());
  expect_matches_reference("strided_views", in.q, in.k, in.v, in.dout, c.mode, c.G);
}

TEST(S2Kernel, RejectsBadInputs) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: S2 kernel tests run on the GPU machine";
  if (!la::kernel_compiled()) GTEST_SKIP() << "build without CUDA kernels";
  const auto o = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  const auto q = torch::randn({1, 2, 64, 64}, o);
  // Head dim 96, fp32, CPU tensors, H % Hkv != 0: TORCH_CHECK (c10::Error).
  const auto q96 = torch::randn({1, 2, 64, 96}, o);
  EXPECT_THROW(la::attention_kernel(q96, q96, q96, la::Mode::Full, 0), c10::Error);
  const auto q32 = q.to(torch::kFloat32);
  EXPECT_THROW(la::attention_kernel(q32, q32, q32, la::Mode::Full, 0), c10::Error);
  const auto qc = q.cpu();
  EXPECT_THROW(la::attention_kernel(qc, qc, qc, la::Mode::Full, 0), c10::Error);
  const auto k3 = torch::randn({1, 3, 64, 64}, o);
  EXPECT_THROW(la::attention_kernel(q, k3, k3, la::Mode::Full, 0), c10::Error);
  // S2 shape rules: L % G != 0 (longlora::Error from check_s2_shape).
  EXPECT_THROW(la::attention_kernel(q, q, q, la::Mode::Segments, 24), longlora::Error);
}

#ifdef LONGLORA_WITH_CUDA
// The kernels' index rules against the definition in attention.h (Roll via the rolled
// index itself), exhaustively on small shapes; and the tile pruning: the listed tiles
// are exactly those holding a visible pair, and unmasked tiles are wholly visible.
// Host-only: runs without a GPU.
namespace kn = longlora::attention::kernel;

bool defined_visible(int L, int G, kn::S2Mode mode, int h, int H, int i, int j) {
  if (i >= L || j >= L) return false;
  if (mode == kn::S2Mode::Full || G == L) return j <= i;
  const int half = G / 2;
  if (h < H / 2) return i / G == j / G && j <= i;
  if (mode == kn::S2Mode::Segments) {
    auto seg = [&](int x) { return x < half ? -1 : (x - half) / G; };
    return seg(i) == seg(j) && j <= i;
  }
  const int ri = (i - half + L) % L, rj = (j - half + L) % L;  // roll by -G/2
  return ri / G == rj / G && rj <= ri;
}

TEST(S2KernelMask, IndexRulesAndTilePruning) {
  const int H = 2;
  for (int L : {16, 48, 64, 96, 160, 192}) {
    for (int G = 2; G <= L; G += 2) {
      if (L % G != 0) continue;
      for (auto mode : {kn::S2Mode::Full, kn::S2Mode::Segments, kn::S2Mode::Roll}) {
        for (int h = 0; h < H; ++h) {
          const auto m = kn::S2HeadMask::make(L, G, mode, h, H);
          const std::string at = "L=" + std::to_string(L) + " G=" + std::to_string(G) +
                                 " mode=" + std::to_string(static_cast<int>(mode)) +
                                 " h=" + std::to_string(h);
          for (int i = 0; i < L + 3; ++i)
            for (int j = 0; j < L + 3; ++j) {
              const bool want = defined_visible(L, G, mode, h, H, i, j);
              ASSERT_EQ(m.visible(i, j), want) << at << " i=" << i << " j=" << j;
              // The interval forms the kernels mask with.
              ASSERT_EQ(m.row_keys(i).contains(j), want) << at << " row_keys i=" << i << " j=" << j;
              ASSERT_EQ(m.key_rows(j).contains(i), want) << at << " key_rows i=" << i << " j=" << j;
            }
          for (auto [BM, BN] : {std::pair{32, 64}, std::pair{64, 64}, std::pair{128, 64},
                                std::pair{32, 128}, std::pair{64, 128}}) {
            const int nq = (L + BM - 1) / BM, nk = (L + BN - 1) / BN;
            auto any_visible = [&](int qt, int kt) {
              for (int i = qt * BM; i < (qt + 1) * BM; ++i)
                for (int j = kt * BN; j < (kt + 1) * BN; ++j)
                  if (m.visible(i, j)) return true;
              return false;
            };
            // The tiles in the order the kernels walk them (s2_span_first / next):
            // must be each visible tile once, ascending.
            auto listed = [](const kn::S2TileSpan& s) {
              std::vector<int> out;
              for (int x = kn::s2_span_first(s); x >= 0 && out.size() < 1000;
                   x = kn::s2_span_next(s, x))
                out.push_back(x);
              return out;
            };
            for (int qt = 0; qt < nq; ++qt) {
              std::vector<int> want;
              for (int kt = 0; kt < nk; ++kt) {
                if (any_visible(qt, kt)) want.push_back(kt);
                if (!kn::s2_tile_needs_mask(m, qt * BM, kt * BN, BM, BN))
                  for (int i = qt * BM; i < (qt + 1) * BM; ++i)
                    for (int j = kt * BN; j < (kt + 1) * BN; ++j)
                      ASSERT_TRUE(m.visible(i, j)) << at << " unmasked tile, i=" << i
                                                   << " j=" << j;
              }
              ASSERT_EQ(listed(kn::s2_key_tiles(m, qt * BM, BM, BN)), want)
                  << at << " key tiles of query tile " << qt << " (BM=" << BM << ")";
            }
            for (int kt = 0; kt < nk; ++kt) {
              std::vector<int> want;
              for (int qt = 0; qt < nq; ++qt)
                if (any_visible(qt, kt)) want.push_back(qt);
              ASSERT_EQ(listed(kn::s2_query_tiles(m, kt * BN, BM, BN)), want)
                  << at << " query tiles of key tile " << kt << " (BM=" << BM << ")";
            }
          }
        }
      }
    }
  }
}
#endif

#ifdef LONGLORA_WITH_CUDA
// Without a CUDA device the dispatch's probe for sm_90a code answers false (it does not
// throw) and the kernels named are the mma.sync defaults: 2-D-tiled backward at D=128,
// one-dimensional at 64. (On the GPU machine bench attention prints the names.)
TEST(S2KernelDispatch, WithoutAGpuNamesTheMmaKernels) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "a CUDA device: the names depend on it";
  for (const char* flag : {"LONGLORA_S2_FWD_ALT", "LONGLORA_S2_BWD_ALT", "LONGLORA_S2_BWD_2D"})
    if (std::getenv(flag) != nullptr) GTEST_SKIP() << flag << " is set";
  namespace kn = longlora::attention::kernel;
  EXPECT_STREQ(kn::s2_fwd_kernel_name(128), "mma.sync");
  EXPECT_STREQ(kn::s2_bwd_kernel_name(128), "mma.sync 2-D");
  EXPECT_STREQ(kn::s2_bwd_kernel_name(64), "mma.sync");
}
#endif

// Runs everywhere: a build without CUDA kernels throws longlora::Error from the stub;
// a CUDA build rejects CPU tensors.
TEST(S2Kernel, StubOrCpuTensorsThrow) {
  const auto q = torch::randn({1, 2, 64, 64}).to(torch::kBFloat16);
  if (!la::kernel_compiled()) {
    EXPECT_THROW(la::attention_kernel(q, q, q, la::Mode::Full, 0), longlora::Error);
  } else {
    EXPECT_ANY_THROW(la::attention_kernel(q, q, q, la::Mode::Full, 0));
  }
}

}  // namespace
