// The fused decoder-layer CUDA kernels (RMSNorm, rotary embedding, SwiGLU) against
// autograd through the plain LibTorch expressions they replace, forward and
// backward, bf16 and fp16; then a whole training step of the golden model with the
// fused path on and off. GPU only: they skip where no CUDA device exists.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "golden_step.h"
#include "longlora/model/fused.h"
#include "longlora/model/llama.h"
#include "test_util.h"

namespace {

using namespace longlora;

#define REQUIRE_FUSED()                                                                 \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: runs on the GPU machine"; \
  if (!model::fused::enabled(torch::zeros({1}, torch::dtype(torch::kBFloat16).device(torch::kCUDA)))) \
    GTEST_SKIP() << "this build has no fused kernels (or LONGLORA_FUSED_OPS=0)"

// Re-enables the fused path whatever a test did.
struct FusedSwitch {
  ~FusedSwitch() { model::fused::set_enabled(true); }
};

// |a - b| within `ulps` units of the storage type's precision at b's scale, so an
// indexing or formula error (an O(1) difference) fails while rounding-order noise passes.
void expect_close(const torch::Tensor& a, const torch::Tensor& b, double ulps, const std::string& what) {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const double eps = b.scalar_type() == torch::kBFloat16 ? 1.0 / 128 : b.scalar_type() == torch::kHalf ? 1.0 / 1024 : 1e-6;
  const auto bf = b.to(torch::kCPU, torch::kFloat64), af = a.to(torch::kCPU, torch::kFloat64);
  const double scale = bf.abs().max().item<double>() + 1e-12;
  const double diff = (af - bf).abs().max().item<double>();
  const double same = af.eq(bf).to(torch::kFloat64).mean().item<double>();
  std::cout << what << ": max abs diff " << diff << " (scale " << scale << "), bit-equal " << same << std::endl;
  EXPECT_LE(diff, ulps * eps * scale) << what;
  EXPECT_FALSE(af.isnan().any().item<bool>()) << what;
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
}

class FusedDtype : public ::testing::TestWithParam<torch::ScalarType> {};

TEST_P(FusedDtype, RmsNormMatchesLibTorchForwardAndBackward) {
  REQUIRE_FUSED();
  FusedSwitch restore;
  const auto dt = GetParam();
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 64}, {333, 4096}, {70, 8200}}) {
    torch::manual_seed(rows + cols);
    auto opts = torch::dtype(dt).device(torch::kCUDA);
    auto x0 = (torch::randn({rows, cols}, opts) * 3).requires_grad_(true);
    auto g = torch::randn({rows, cols}, opts);
    model::RMSNorm norm(1e-6);
    norm->to(torch::kCUDA);
    norm->weight = (1 + 0.1 * torch::randn({cols}, torch::device(torch::kCUDA))).requires_grad_(true);
    auto run = [&](bool fused) {
      model::fused::set_enabled(fused);
      auto x = x0.detach().clone().requires_grad_(true);
      norm->weight.mutable_grad() = torch::Tensor();
      auto y = norm(x);
      y.backward(g);
      return std::make_tuple(y.detach(), x.grad(), norm->weight.grad().clone());
    };
    auto [y_ref, gx_ref, gw_ref] = run(false);
    auto [y, gx, gw] = run(true);
    const std::string tag = " rows=" + std::to_string(rows) + " cols=" + std::to_string(cols);
    expect_close(y, y_ref, 1.0, "rmsnorm y" + tag);
    expect_close(gx, gx_ref, 2.0, "rmsnorm dx" + tag);
    expect_close(gw, gw_ref, 1e-3 / 1e-6, "rmsnorm dw (fp32 sums)" + tag);  // 1e-3 relative
    {
      torch::NoGradGuard ng;  // the no-grad path (checkpointed forward) too
      model::fused::set_enabled(true);
      expect_close(norm(x0.detach()), y_ref, 1.0, "rmsnorm y, no grad" + tag);
    }
  }
}

TEST_P(FusedDtype, RopeMatchesLibTorchOnStridedHeads) {
  REQUIRE_FUSED();
  const auto dt = GetParam();
  for (int64_t D : {64, 128}) {
    const int64_t B = 2, L = 37, H = 3;
    io::ModelConfig c;
    c.head_dim = D;
    c.rope_theta = 10000;
    c.rope_factor = 4;
    auto [cos, sin] = model::rope_tables(c, 5, L, torch::kCUDA);
    cos = cos.to(dt);
    sin = sin.to(dt);
    auto opts = torch::dtype(dt).device(torch::kCUDA);
    // As the attention makes q: (B, L, H, D) memory seen as (B, H, L, D).
    auto base = torch::randn({B, L, H, D}, opts);
    auto x = base.transpose(1, 2);
    auto xr = x.detach().clone().requires_grad_(true);
    auto ref = xr * cos + rotate_half(xr) * sin;
    auto g = torch::randn({B, H, L, D}, opts);
    ref.backward(g);
    const std::string tag = " D=" + std::to_string(D);
    auto out = model::fused::rope(x, cos, sin, /*backward=*/false);
    EXPECT_EQ(out.strides(), x.strides()) << "keeps the (B, L, H, D) layout";
    expect_close(out, ref.detach(), 1.0, "rope" + tag);
    expect_close(model::fused::rope(g, cos, sin, /*backward=*/true), xr.grad(), 1.0, "rope grad" + tag);
    // A gradient in an odd layout (not 8-aligned strides) is copied, not misread.
    auto g_odd = torch::randn({B, H, L, D + 1}, opts).narrow(-1, 1, D);
    auto xr2 = x.detach().clone().requires_grad_(true);
    (xr2 * cos + rotate_half(xr2) * sin).backward(g_odd);
    expect_close(model::fused::rope(g_odd, cos, sin, true), xr2.grad(), 1.0, "rope grad, odd layout" + tag);
  }
}

TEST_P(FusedDtype, SwiGluMatchesLibTorchForwardAndBackward) {
  REQUIRE_FUSED();
  const auto dt = GetParam();
  auto opts = torch::dtype(dt).device(torch::kCUDA);
  auto a = (torch::randn({3, 50, 1104}, opts) * 4).requires_grad_(true);
  auto b = torch::randn({3, 50, 1104}, opts).requires_grad_(true);
  auto g = torch::randn({3, 50, 1104}, opts);
  auto ref = torch::silu(a) * b;
  ref.backward(g);
  torch::NoGradGuard ng;
  expect_close(model::fused::swiglu_forward(a, b), ref, 1.0, "swiglu");
  auto [da, db] = model::fused::swiglu_backward(g, a, b);
  expect_close(da, a.grad(), 1.0, "swiglu da");
  expect_close(db, b.grad(), 1.0, "swiglu db");
}

INSTANTIATE_TEST_SUITE_P(Dtypes, FusedDtype, ::testing::Values(torch::kBFloat16, torch::kHalf),
                         [](const auto& info) { return info.param == torch::kBFloat16 ? "bf16" : "fp16"; });

// A whole checkpointed training step of the golden model in bf16 on the GPU: loss and
// every trainable gradient with the fused kernels as without them.
TEST(FusedOps, GoldenStepFusedEqualsUnfused) {
  REQUIRE_FUSED();
  FusedSwitch restore;
  // The golden model's shapes (hidden 64, head dim 16, MLP 176) take every fused
  // kernel, so the two runs below go through different code.
  auto bf16 = torch::dtype(torch::kBFloat16).device(torch::kCUDA);
  ASSERT_TRUE(model::fused::rms_norm_fits(torch::zeros({1, 128, 64}, bf16)));
  ASSERT_TRUE(model::fused::rope_fits(torch::zeros({1, 4, 128, 16}, bf16)));
  ASSERT_TRUE(model::fused::swiglu_fits(torch::zeros({1, 48, 176}, bf16)));
  testutil::StepOptions so;
  so.device = torch::kCUDA;
  so.dtype = torch::kBFloat16;
  so.checkpointing = true;
  so.mlp_chunk = 48;
  std::map<std::string, torch::Tensor> g_ref, g;
  model::fused::set_enabled(false);
  const double loss_ref = testutil::golden_step(attention::Mode::Segments, so, &g_ref);
  model::fused::set_enabled(true);
  const double loss = testutil::golden_step(attention::Mode::Segments, so, &g);
  EXPECT_NEAR(loss, loss_ref, 2e-3 * std::abs(loss_ref));
  ASSERT_EQ(g.size(), g_ref.size());
  for (const auto& [name, t] : g_ref) {
    const double scale = t.abs().max().item<double>() + 1e-12;
    // bf16 activations: a few rounding steps apart through two layers.
    EXPECT_LE(testutil::max_abs_diff(g.at(name), t), 0.05 * scale) << name;
  }
}

}  // namespace
