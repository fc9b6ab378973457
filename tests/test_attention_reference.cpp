// S2-Attn reference: against the golden (roll mode, computed in PyTorch with the
// roll formulation LongLoRA publishes) and against brute-force masked attention.
#include <cmath>

#include "longlora/attention/attention.h"
#include "longlora/common/error.h"
#include "test_util.h"

using namespace longlora::attention;
using torch::indexing::Slice;

namespace {

struct Grads {
  torch::Tensor out, dq, dk, dv;
};

Grads run(const torch::Tensor& q0, const torch::Tensor& k0, const torch::Tensor& v0,
          const torch::Tensor& dout, Mode mode, int64_t G, Backend b = Backend::Reference) {
  auto q = q0.clone().requires_grad_(true), k = k0.clone().requires_grad_(true),
       v = v0.clone().requires_grad_(true);
  Options o;
  o.mode = mode;
  o.group = G;
  o.backend = b;
  auto out = attention(q, k, v, o);
  out.backward(dout);
  return {out.detach(), q.grad(), k.grad(), v.grad()};
}

// Independent oracle: full L x L scores with an explicit visibility rule per head
// (issue #3's definitions of segments and roll).
torch::Tensor brute_force(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          Mode mode, int64_t G) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1);
  auto out = torch::zeros_like(q);
  for (int64_t h = 0; h < H; ++h) {
    auto mask = torch::zeros({L, L}, torch::kBool);  // true = visible
    auto acc = mask.accessor<bool, 2>();
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = 0; j < L; ++j) {
        bool vis;
        if (mode == Mode::Full || G == L) vis = j <= i;
        else if (h < H / 2) vis = j <= i && i / G == j / G;
        else if (mode == Mode::Segments) {  // [0,G/2), [G/2, 3G/2), ...
          auto seg = [&](int64_t t) { return t < G / 2 ? -1 : (t - G / 2) / G; };
          vis = j <= i && seg(i) == seg(j);
        } else {  // roll by -G/2, causal groups of G in rolled order (the last one wraps)
          const int64_t ri = (i - G / 2 + L) % L, rj = (j - G / 2 + L) % L;
          vis = rj <= ri && ri / G == rj / G;
        }
        acc[i][j] = vis;
      }
    auto kh = k.index({Slice(), h / (H / Hkv)}), vh = v.index({Slice(), h / (H / Hkv)});
    auto s = torch::matmul(q.index({Slice(), h}), kh.transpose(-1, -2)) / std::sqrt(double(D));
    s = s.masked_fill(~mask, -INFINITY);
    out.index_put_({Slice(), h}, torch::matmul(torch::softmax(s, -1), vh));
  }
  (void)B;
  return out;
}

}  // namespace

class S2Golden : public ::testing::TestWithParam<std::string> {};

TEST_P(S2Golden, RollModeMatchesLongLoRA) {
  auto g = testutil::load(testutil::golden("s2_attention/golden.safetensors"));
  const std::string p = GetParam() + ".";
  auto r = run(g[p + "q"], g[p + "k"], g[p + "v"], g[p + "dout"], Mode::Roll, 16);
  for (auto [name, t] : std::vector<std::pair<std::string, torch::Tensor>>{
           {"out", r.out}, {"dq", r.dq}, {"dk", r.dk}, {"dv", r.dv}}) {
    const double d = testutil::max_abs_diff(t, g[p + name]);
    EXPECT_LE(d, 1e-5) << p << name << " max abs diff " << d;
  }
}
INSTANTIATE_TEST_SUITE_P(MhaGqa, S2Golden, ::testing::Values("mha", "gqa"));

TEST(S2Reference, RollDiffersFromSegments) {
  // The wrap-around of roll mode is visible: guards against the two modes collapsing.
  auto g = testutil::load(testutil::golden("s2_attention/golden.safetensors"));
  auto a = run(g["mha.q"], g["mha.k"], g["mha.v"], g["mha.dout"], Mode::Segments, 16);
  EXPECT_GT(testutil::max_abs_diff(a.out, g["mha.out"]), 1e-3);
}

struct BruteCase {
  int64_t H, Hkv, L, G;
  Mode mode;
};

class S2Brute : public ::testing::TestWithParam<BruteCase> {};

TEST_P(S2Brute, MatchesMaskedAttention) {
  auto c = GetParam();
  torch::manual_seed(7);
  // (B, L, H, D) memory viewed as (B, H, L, D), as the model's projections give them,
  // for B = 2 and B = 1 (where the sdpa path's groups are pure views).
  for (int64_t B : {2, 1}) {
    auto q = torch::randn({B, c.L, c.H, 8}, torch::kFloat64).transpose(1, 2);
    auto k = torch::randn({B, c.L, c.Hkv, 8}, torch::kFloat64).transpose(1, 2);
    auto v = torch::randn({B, c.L, c.Hkv, 8}, torch::kFloat64).transpose(1, 2);
    auto dout = torch::randn_like(q);
    auto qa = q.clone().requires_grad_(true), ka = k.clone().requires_grad_(true),
         va = v.clone().requires_grad_(true);
    auto want = brute_force(qa, ka, va, c.mode, c.G);
    want.backward(dout);
    for (Backend b : {Backend::Reference, Backend::Sdpa}) {
      Options o;
      o.mode = c.mode;
      o.group = c.G;
      o.backend = b;
      auto qb = q.detach().requires_grad_(true), kb = k.detach().requires_grad_(true),
           vb = v.detach().requires_grad_(true);
      auto got = attention(qb, kb, vb, o);
      const std::string at = "backend " + to_string(b) + " B=" + std::to_string(B);
      EXPECT_LE(testutil::max_abs_diff(got, want), 1e-9) << at;
      got.backward(dout);  // gradients against the brute force's autograd
      EXPECT_LE(testutil::max_abs_diff(qa.grad(), qb.grad()), 1e-9) << at << " dq";
      EXPECT_LE(testutil::max_abs_diff(ka.grad(), kb.grad()), 1e-9) << at << " dk";
      EXPECT_LE(testutil::max_abs_diff(va.grad(), vb.grad()), 1e-9) << at << " dv";
    }
  }
}

// The sdpa path hands dq, dk, dv back in the (B, L, H, D) memory order the
// projections produced them in, so their matmuls take the gradient without a copy
// (it used to return (B, H, L, D)-ordered sums of zero-padded per-view gradients).
TEST(S2Sdpa, GradientsKeepTheProjectionsMemoryOrder) {
  for (Mode mode : {Mode::Segments, Mode::Roll}) {
    const int64_t B = 1, L = 32, H = 4, Hkv = 4, D = 8;
    auto base_q = torch::randn({B, L, H, D}, torch::kFloat64).requires_grad_(true);
    auto base_k = torch::randn({B, L, Hkv, D}, torch::kFloat64).requires_grad_(true);
    auto base_v = torch::randn({B, L, Hkv, D}, torch::kFloat64).requires_grad_(true);
    auto q = base_q.transpose(1, 2), k = base_k.transpose(1, 2), v = base_v.transpose(1, 2);
    Options o;
    o.mode = mode;
    o.group = 8;
    o.backend = Backend::Sdpa;
    auto out = attention(q, k, v, o);
    EXPECT_TRUE(out.transpose(1, 2).is_contiguous()) << "output in (B, L, H, D) memory";
    auto g = torch::autograd::grad({out}, {q, k, v}, {torch::randn_like(out)});
    for (const auto& t : g) EXPECT_TRUE(t.transpose(1, 2).is_contiguous()) << to_string(mode) << " " << t.strides();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, S2Brute,
    ::testing::Values(BruteCase{4, 4, 32, 8, Mode::Segments}, BruteCase{4, 2, 32, 8, Mode::Segments},
                      BruteCase{8, 2, 64, 16, Mode::Segments}, BruteCase{4, 1, 24, 6, Mode::Segments},
                      BruteCase{2, 2, 16, 16, Mode::Segments}, BruteCase{4, 2, 32, 32, Mode::Roll},
                      BruteCase{4, 4, 32, 8, Mode::Roll}, BruteCase{4, 1, 24, 6, Mode::Roll},
                      BruteCase{2, 2, 16, 4, Mode::Roll}, BruteCase{4, 2, 40, 8, Mode::Full}));

TEST(S2Reference, ShapeErrorsAreClear) {
  auto q = torch::zeros({1, 4, 30, 8}), k = torch::zeros({1, 2, 30, 8});
  try {
    attention_reference(q, k, k, Mode::Segments, 8);
    FAIL() << "L % G != 0 accepted";
  } catch (const longlora::Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a multiple"), std::string::npos) << e.what();
  }
  try {
    attention_reference(q, k, k, Mode::Segments, 5);
    FAIL() << "odd G accepted";
  } catch (const longlora::Error& e) {
    EXPECT_NE(std::string(e.what()).find("odd"), std::string::npos) << e.what();
  }
  auto q3 = torch::zeros({1, 3, 32, 8}), k3 = torch::zeros({1, 3, 32, 8});
  EXPECT_THROW(attention_reference(q3, k3, k3, Mode::Roll, 8), longlora::Error);
  EXPECT_NO_THROW(attention_reference(q3, k3, k3, Mode::Full, 0));
}

// Auto runs LibTorch's fused sdpa on a GPU (measured faster than our kernel, see
// docs/benchmarks.md) and the reference on the CPU; an explicit choice is kept.
TEST(AttentionDispatch, AutoIsSdpaOnGpuReferenceOnCpu) {
  using longlora::attention::Backend;
  using longlora::attention::resolve_backend;
  EXPECT_EQ(resolve_backend(Backend::Auto, true), Backend::Sdpa);
  EXPECT_EQ(resolve_backend(Backend::Auto, false), Backend::Reference);
  EXPECT_EQ(resolve_backend(Backend::Kernel, true), Backend::Kernel);
  EXPECT_EQ(resolve_backend(Backend::Sdpa, false), Backend::Sdpa);
}
