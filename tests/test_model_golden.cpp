// The LLaMA forward pass against Hugging Face transformers (golden, fp32, CPU).
#include <nlohmann/json.hpp>

#include "longlora/data/tokens.h"
#include "longlora/eval/perplexity.h"
#include "longlora/model/loader.h"
#include "test_util.h"

using namespace longlora;

namespace {

model::LlamaForCausalLM tiny(std::optional<double> rope_factor = std::nullopt) {
  model::LoadOptions o;
  o.rope_factor = rope_factor;
  return model::load_model(testutil::golden("tiny-llama/model"), o);
}

void expect_logits(model::LlamaForCausalLM& m, const torch::Tensor& ids, const torch::Tensor& want) {
  torch::NoGradGuard g;
  auto got = m->forward(ids, {});
  ASSERT_EQ(got.sizes(), want.sizes());
  const double d = testutil::max_abs_diff(got, want);
  EXPECT_LE(d, 1e-4) << "max abs diff " << d;
}

}  // namespace

TEST(ModelGolden, LogitsMatchTransformers) {
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  auto m = tiny();
  expect_logits(m, g["input_ids"], g["logits"]);
}

TEST(ModelGolden, PositionInterpolationFactor2At256Tokens) {
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  auto m = tiny(2.0);
  expect_logits(m, g["input_ids_pi"], g["logits_pi"]);
  // Without interpolation the same input gives other logits: the factor is live.
  auto plain = tiny();
  torch::NoGradGuard ng;
  EXPECT_GT(testutil::max_abs_diff(plain->forward(g["input_ids_pi"], {}), g["logits_pi"]), 1e-2);
}

TEST(ModelGolden, LogitsWithPeftAdapter) {
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  auto m = tiny();
  model::apply_adapter(*m, testutil::golden("tiny-llama/adapter"));
  expect_logits(m, g["input_ids"], g["logits_lora"]);
}

TEST(ModelGolden, MergedCheckpointLoadsInTransformers5Form) {
  // merged/config.json uses rope_parameters (transformers 5) and a single file.
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  auto m = model::load_model(testutil::golden("tiny-llama/merged"), {});
  expect_logits(m, g["input_ids"], g["logits_lora"]);
}

TEST(ModelGolden, ChunkedNllEqualsFullCrossEntropy) {
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  auto m = tiny();
  torch::NoGradGuard ng;
  auto ids = g["input_ids"];
  auto h = m->hidden(ids.slice(1, 0, 127), {});
  auto targets = ids.slice(1, 1, 128);
  auto [sum, n] = model::chunked_nll(*m, h, targets, 5);
  auto ce = torch::nn::functional::cross_entropy(m->logits(h).view({-1, 512}), targets.reshape({-1}));
  EXPECT_EQ(n, 127);
  EXPECT_NEAR(sum.item<double>() / n, ce.item<double>(), 1e-5);
}


TEST(EvalGolden, PerplexityFunctionReproducesEvalLoss) {
  auto j = testutil::golden_json();
  auto tokens = data::read_bin(testutil::golden("tiny-llama/eval.bin"));
  auto m = tiny();
  auto r = eval::perplexity(*m, tokens, 128, 128, "eval.bin");
  EXPECT_NEAR(r.loss, j["eval_loss"].get<double>(), 1e-4 * j["eval_loss"].get<double>());
  EXPECT_EQ(r.tokens, j["eval_tokens"].get<int64_t>());
}

TEST(EvalGolden, CliReproducesAllThreeLosses) {
  auto j = testutil::golden_json();
  const std::string model = testutil::golden("tiny-llama/model");
  const std::string data = testutil::golden("tiny-llama/eval.bin");
  struct Case {
    std::string args, key;
    int64_t seq;
  };
  for (const auto& c : std::vector<Case>{
           {"", "eval_loss", 128},
           {"--rope-factor 2", "eval_loss_pi", 256},
           {"--adapter " + testutil::golden("tiny-llama/adapter"), "eval_loss_lora", 128}}) {
    auto r = testutil::run_cli("eval --model " + model + " --data " + data + " --seq-len " +
                               std::to_string(c.seq) + " --json --device cpu " + c.args);
    ASSERT_EQ(r.code, 0) << r.err;
    auto out = nlohmann::json::parse(r.out);
    const double want = j[c.key].get<double>();
    EXPECT_NEAR(out["loss"].get<double>(), want, 1e-4 * want) << c.key;
    EXPECT_NEAR(out["perplexity"].get<double>(), std::exp(want), 1e-3 * std::exp(want)) << c.key;
    EXPECT_EQ(out["seq_len"].get<int64_t>(), c.seq);
    EXPECT_EQ(out["tokens"].get<int64_t>(), 16384);
    EXPECT_EQ(out["windows"].get<int64_t>(), 16384 / c.seq);
  }
}

TEST(EvalGolden, TooShortDataIsAClearError) {
  const std::string dir = testutil::temp_dir("short");
  data::write_bin(dir + "/short.bin", {1, 5, 7, 9});
  auto r = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --data " + dir +
                             "/short.bin --seq-len 128");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("short.bin"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("too few"), std::string::npos) << r.err;
}

TEST(EvalGolden, WindowsFollowTheStride) {
  EXPECT_EQ(data::window_starts(10, 4, 4), (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(data::window_starts(9, 4, 4), (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(data::window_starts(8, 4, 4), (std::vector<int64_t>{0}));
  EXPECT_EQ(data::window_starts(10, 4, 2), (std::vector<int64_t>{0, 2, 4}));
  EXPECT_TRUE(data::window_starts(4, 4, 4).empty());
}
