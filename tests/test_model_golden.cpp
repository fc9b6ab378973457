// The LLaMA forward pass against Hugging Face transformers (golden, fp32, CPU).
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "longlora/common/error.h"
#include "longlora/data/tokens.h"
#include "longlora/io/hf_config.h"
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

// transformers' sharded PyTorch pickles (tests/data/pickled-model/make.py: a plain dict
// per shard, with the inv_freq buffers 4.28-4.30 saved) give transformers' logits, and
// the same weights, bit for bit, as the safetensors shards they were made from.
TEST(ModelGolden, PickledShardsLoadAsTransformersSavedThem) {
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  auto m = model::load_model(testutil::data("pickled-model"), {});
  expect_logits(m, g["input_ids"], g["logits"]);
  auto want = tiny();
  const auto got_params = m->named_parameters();
  for (const auto& p : want->named_parameters())
    EXPECT_TRUE(torch::equal(got_params[p.key()], p.value())) << p.key();
  // The same eval from the command line, as a user points it at such a folder.
  const std::string eval = " --data " + testutil::golden("tiny-llama/eval.bin") + " --seq-len 64 --device cpu --json";
  const auto a = testutil::run_cli("eval --model " + testutil::data("pickled-model") + eval);
  const auto b = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + eval);
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  // One pytorch_model.bin (transformers saves a model under its shard size so), written
  // here by LibTorch's pickler from the safetensors weights.
  const auto one = testutil::temp_dir("pickled-one");
  std::filesystem::copy_file(testutil::golden("tiny-llama/model/config.json"), one + "/config.json");
  c10::Dict<std::string, torch::Tensor> all;
  for (const auto& [name, t] : testutil::load(testutil::golden("tiny-llama/model"))) all.insert(name, t.clone());
  testutil::write_pickle(one + "/pytorch_model.bin", all);
  auto single = model::load_model(one, {});
  expect_logits(single, g["input_ids"], g["logits"]);
  longlora::remove_tree(one);
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

// --protocol longlora is LongLoRA's eval.py. One window left (starts range(0, n - L,
// 256) without the last): its 127 next tokens scored from transformers' logits of the
// first 128 tokens.
TEST(EvalGolden, LongLorasProtocolScoresAWindowsOwnNextTokens) {
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  auto tokens = data::read_bin(testutil::golden("tiny-llama/eval.bin"));
  const auto dir = testutil::temp_dir("eval-longlora");
  data::write_bin(dir + "/one.bin", std::vector<int32_t>(tokens.begin(), tokens.begin() + 128 + 300));
  auto r = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --data " + dir +
                             "/one.bin --seq-len 128 --protocol longlora --json --device cpu");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  const auto ids = g["input_ids"];
  const auto logp = torch::log_softmax(g["logits"][0].slice(0, 0, 127), -1);
  const double want = -logp.gather(1, ids[0].slice(0, 1, 128).unsqueeze(1)).mean().item<double>();
  EXPECT_NEAR(j["loss"].get<double>(), want, 1e-5 * want);
  EXPECT_EQ(j["windows"], 1);
  EXPECT_EQ(j["tokens"], 127);
  EXPECT_EQ(j["protocol"], "longlora");
  EXPECT_DOUBLE_EQ(j["perplexity"].get<double>(), std::pow(2.71828, j["loss"].get<double>()));
  // A stride that leaves no start once the last is dropped: one line, before any row.
  r = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --data " + dir +
                        "/one.bin --seq-len 64,128 --protocol longlora --stride 300 --device cpu");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_NE(r.err.find("one.bin: 428 tokens leave no window of seq_len 128 under LongLoRA's protocol"),
            std::string::npos)
      << r.err;

  // Batches weigh the average: windows at 0, 100, 200 (300 dropped) in batches of 2 are
  // ((w0 + w1) / 2 + w2) / 2, each window's loss that of the plain protocol on its own
  // L - 1 inputs.
  data::write_bin(dir + "/three.bin", std::vector<int32_t>(tokens.begin(), tokens.begin() + 128 + 301));
  std::vector<double> w;
  for (int s : {0, 100, 200}) {
    data::write_bin(dir + "/w.bin", std::vector<int32_t>(tokens.begin() + s, tokens.begin() + s + 128));
    auto p = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --data " + dir +
                               "/w.bin --seq-len 127 --json --device cpu");
    ASSERT_EQ(p.code, 0) << p.err;
    w.push_back(nlohmann::json::parse(p.out)["loss"].get<double>());
  }
  r = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --data " + dir +
                        "/three.bin --seq-len 128 --protocol longlora --stride 100 --batch-size 2 --json --device cpu");
  ASSERT_EQ(r.code, 0) << r.err;
  const double got = nlohmann::json::parse(r.out)["loss"].get<double>();
  EXPECT_NEAR(got, ((w[0] + w[1]) / 2 + w[2]) / 2, 1e-6 * got);
  EXPECT_GT(std::abs(got - (w[0] + w[1] + w[2]) / 3), 1e-5 * got);  // not the plain mean
  EXPECT_EQ(nlohmann::json::parse(r.out)["windows"], 3);
  longlora::remove_tree(dir);
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

TEST(EvalGolden, OverlappingWindowsWithAStrideBelowSeqLen) {
  // eval --stride 32 at seq-len 64: windows at 0, 32, 64, ... while start + 65 <= n, the
  // loss the mean NLL of every prediction of every window (overlaps counted again),
  // computed here from the model's logits window by window.
  const int64_t L = 64, S = 32;
  const auto tokens = data::read_bin(testutil::golden("tiny-llama/eval.bin"));
  const auto n = static_cast<int64_t>(tokens.size());
  auto m = tiny();
  torch::NoGradGuard ng;
  double nll = 0;
  int64_t windows = 0;
  for (int64_t s = 0; s + L + 1 <= n; s += S, ++windows) {
    auto w = torch::tensor(std::vector<int64_t>(tokens.begin() + s, tokens.begin() + s + L + 1)).unsqueeze(0);
    auto logp = torch::log_softmax(m->forward(w.slice(1, 0, L), {}).to(torch::kFloat64), -1);
    nll -= logp.gather(-1, w.slice(1, 1, L + 1).unsqueeze(-1)).sum().item<double>();
  }
  ASSERT_GT(windows, 2 * (n / L) - 3);  // about twice the windows of stride L
  const double want = nll / static_cast<double>(windows * L);
  auto r = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --data " +
                             testutil::golden("tiny-llama/eval.bin") + " --seq-len 64 --stride 32 --json --device cpu");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto out = nlohmann::json::parse(r.out);
  EXPECT_EQ(out["windows"].get<int64_t>(), windows);
  EXPECT_EQ(out["tokens"].get<int64_t>(), windows * L);
  EXPECT_NEAR(out["loss"].get<double>(), want, 1e-5 * want);
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

// ---------------------------------------------------------------------------
// Bad config.json, adapter_config.json and training checkpoints: one line that
// names the file and the field, never nlohmann's bare type error, never a value
// silently ignored.

namespace {

nlohmann::json golden_config() { return testutil::read_json(testutil::golden("tiny-llama/model/config.json")); }

// The error parse_model_config gives for the golden config.json changed by `edit`.
std::string config_error(const std::function<void(nlohmann::json&)>& edit) {
  auto j = golden_config();
  edit(j);
  return testutil::error_of([&] { io::parse_model_config(j, "m/config.json"); });
}

// A copy of the golden adapter whose adapter_config.json is changed by `edit`,
// plus `extra` files (name -> content).
std::string adapter_copy(const std::string& name, const std::function<void(nlohmann::json&)>& edit,
                         const std::map<std::string, std::string>& extra = {}) {
  const auto dir = testutil::temp_dir(name);
  std::filesystem::copy(testutil::golden("tiny-llama/adapter/adapter_model.safetensors"),
                        dir + "/adapter_model.safetensors");
  auto cfg = testutil::read_json(testutil::golden("tiny-llama/adapter/adapter_config.json"));
  edit(cfg);
  testutil::write_file(dir + "/adapter_config.json", cfg.dump());
  for (const auto& [f, text] : extra) testutil::write_file(dir + "/" + f, text);
  return dir;
}

std::string adapter_error(const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
  const auto dir = adapter_copy(name, edit);
  auto m = tiny();
  return testutil::error_of([&] { model::apply_adapter(*m, dir); });
}

}  // namespace

TEST(LoadErrors, ConfigJsonWrongTypesNameTheField) {
  const std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>> cases = {
      {[](auto& j) { j["tie_word_embeddings"] = "no"; }, "tie_word_embeddings: expected true or false, got \"no\""},
      {[](auto& j) { j["attention_bias"] = "true"; }, "attention_bias: expected true or false, got \"true\""},
      {[](auto& j) { j["pretraining_tp"] = "2"; }, "pretraining_tp: expected an integer, got \"2\""},
      {[](auto& j) { j["torch_dtype"] = "float8"; }, "torch_dtype: expected one of float32, float16, bfloat16"},
      {[](auto& j) { j["torch_dtype"] = 32; }, "torch_dtype: expected a string, got 32"},
      {[](auto& j) { j["eos_token_id"] = nlohmann::json::array({"2"}); }, "eos_token_id: expected an integer >= 0"},
      {[](auto& j) { j["rope_scaling"] = {{"type", 5}, {"factor", 2}}; }, "rope_scaling.type: expected a string, got 5"},
      {[](auto& j) { j["rope_parameters"] = {{"rope_type", 7}}; }, "rope_parameters.rope_type: expected a string, got 7"},
      {[](auto& j) { j["rope_scaling"] = {{"type", "linear"}, {"factor", "2"}}; }, "rope_scaling.factor: expected a number"},
      {[](auto& j) { j["hidden_size"] = 9223372036854775808ull; }, "hidden_size: expected an integer"},
      // transformers 4 follows `type`, 5 follows `rope_type`: a conflict has no safe reading.
      {[](auto& j) { j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8}, {"type", "linear"}}; },
       "rope_scaling.rope_type: 'llama3' but type is 'linear'"},
  };
  for (const auto& [edit, want] : cases) {
    const auto err = config_error(edit);
    EXPECT_NE(err.find("m/config.json: " + want), std::string::npos) << "want '" << want << "', got: " << err;
  }
  // The values these checks must still take.
  EXPECT_EQ(config_error([](auto& j) { j["eos_token_id"] = {2, 7}; }), "");
  EXPECT_EQ(config_error([](auto& j) { j["torch_dtype"] = "bfloat16"; }), "");
  EXPECT_EQ(config_error([](auto& j) { j["rope_scaling"] = {{"rope_type", "linear"}, {"type", "linear"}, {"factor", 2}}; }), "");
}

TEST(LoadErrors, AdapterConfigFieldsAreCheckedNotIgnored) {
  const std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>> cases = {
      {[](auto& j) { j["lora_alpha"] = 0; }, "lora_alpha: expected a number > 0"},
      {[](auto& j) { j["lora_alpha"] = -8; }, "lora_alpha: expected a number > 0"},
      {[](auto& j) { j["lora_alpha"] = 1e308; }, "lora_alpha: expected a number > 0 that fits in float32"},
      {[](auto& j) { j["use_rslora"] = "true"; }, "use_rslora: expected true or false, got \"true\""},
      {[](auto& j) { j["lora_dropout"] = "0.1"; }, "lora_dropout: expected a number, got \"0.1\""},
      {[](auto& j) { j["lora_dropout"] = 1.5; }, "lora_dropout: expected a number in [0, 1)"},
      {[](auto& j) { j["peft_type"] = 1; }, "peft_type: expected a string, got 1"},
      {[](auto& j) { j["exclude_modules"] = {"q_proj"}; }, "exclude_modules: not supported"},
      {[](auto& j) { j["exclude_modules"] = "q_.*"; }, "exclude_modules: not supported"},
      {[](auto& j) { j["lora_bias"] = true; }, "lora_bias: true is not supported"},
      {[](auto& j) { j["layer_replication"] = {{0, 2}}; }, "layer_replication: not supported"},
      {[](auto& j) { j["target_parameters"] = {"experts.w"}; }, "target_parameters: not supported"},
      {[](auto& j) { j["trainable_token_indices"] = {1, 2}; }, "trainable_token_indices: not supported"},
      {[](auto& j) { j["use_dora"] = "false"; }, "use_dora: expected true or false"},
      {[](auto& j) { j["target_modules"] = {"q_proj", 3}; }, "target_modules: expected a list of strings"},
      // These inits move their first B·A out of the base weights: the factors are not for W.
      {[](auto& j) { j["init_lora_weights"] = "pissa"; }, "init_lora_weights: \"pissa\" factors apply to a base"},
      {[](auto& j) { j["init_lora_weights"] = "pissa_niter_4"; }, "init_lora_weights: \"pissa_niter_4\" factors"},
      {[](auto& j) { j["init_lora_weights"] = "olora"; }, "init_lora_weights: \"olora\" factors"},
      {[](auto& j) { j["init_lora_weights"] = "corda"; }, "init_lora_weights: \"corda\" factors"},
      {[](auto& j) { j["init_lora_weights"] = "loftq"; }, "init_lora_weights: \"loftq\" factors"},
      {[](auto& j) { j["init_lora_weights"] = "kaiming"; }, "init_lora_weights: unknown value \"kaiming\""},
      {[](auto& j) { j["init_lora_weights"] = 1; }, "init_lora_weights: expected true, false or a string, got 1"},
      // Options newer peft versions add build other models: each only at its default.
      {[](auto& j) { j["use_qalora"] = true; }, "use_qalora: not supported (expected false), got true"},
      {[](auto& j) { j["use_bdlora"] = {{"nblocks", 2}}; }, "use_bdlora: not supported (expected null)"},
      {[](auto& j) { j["arrow_config"] = {{"top_k", 3}}; }, "arrow_config: not supported (expected null)"},
      {[](auto& j) { j["lora_ga_config"] = nlohmann::json::object(); }, "lora_ga_config: not supported (expected null)"},
      {[](auto& j) { j["ensure_weight_tying"] = true; }, "ensure_weight_tying: not supported (expected false)"},
      {[](auto& j) { j["megatron_config"] = {{"tensor_model_parallel_size", 2}}; }, "megatron_config: not supported"},
      // And one no peft version we know of has: refused unless it is off.
      {[](auto& j) { j["use_hyper_lora"] = true; }, "use_hyper_lora: not supported (an option this loader does not know"},
      {[](auto& j) { j["hyper_config"] = {{"k", 1}}; }, "hyper_config: not supported"},
      {[](auto& j) { j["hyper_mode"] = "fast"; }, "hyper_mode: not supported"},
      {[](auto& j) { j["hyper_groups"] = 0; }, "hyper_groups: not supported"},
  };
  int i = 0;
  for (const auto& [edit, want] : cases) {
    const auto err = adapter_error("adapter-bad-" + std::to_string(i++), edit);
    EXPECT_NE(err.find("adapter_config.json: " + want), std::string::npos) << "want '" << want << "', got: " << err;
  }
  // An r the saved factors do not have: 2^40 made add_lora ask for petabytes, and the
  // message named no file.
  for (const int64_t r : {int64_t{1} << 40, int64_t{2}}) {
    const auto err = adapter_error("adapter-r", [&](auto& j) { j["r"] = r; });
    EXPECT_NE(err.find("adapter_model.safetensors: tensor 'base_model.model.model.layers."), std::string::npos) << err;
    EXPECT_NE(err.find(".lora_A.weight': shape [4, 64] but r is " + std::to_string(r) + " in "), std::string::npos)
        << err;
  }
  // ... and without any factor to confirm r, r went to add_lora unchecked (2^40 asked
  // for 256 TB, and the message named no file).
  {
    const auto dir = adapter_copy("adapter-no-factors", [](auto& j) { j["r"] = int64_t{1} << 40; });
    auto all = io::load_tensors(dir + "/adapter_model.safetensors");
    std::vector<std::pair<std::string, torch::Tensor>> kept;
    for (const auto& [name, t] : all)
      if (name.find(".lora_") == std::string::npos) kept.emplace_back(name, t.clone());
    io::save_tensors(dir + "/adapter_model.safetensors", kept);
    auto m = tiny();
    EXPECT_EQ(testutil::error_of([&] { model::apply_adapter(*m, dir); }),
              dir + "/adapter_model.safetensors: no LoRA factors (lora_A, lora_B), but " + dir +
                  "/adapter_config.json targets modules with them");
  }
  // Finite weights whose activations overflow in fp32: the message blamed fp16.
  {
    const auto dir = adapter_copy("adapter-alpha-huge", [](auto& j) { j["lora_alpha"] = 1e38; });
    auto m = tiny();
    model::apply_adapter(*m, dir);
    const auto why = model::explain_non_finite(*m);
    EXPECT_EQ(why.rfind("every weight is finite, yet the activations overflowed; the largest weight is ", 0), 0u) << why;
    EXPECT_NE(why.find("(LoRA scale lora_alpha / r: 2.5e+37)"), std::string::npos) << why;
  }
  // Defaults written out in full are fine.
  EXPECT_EQ(adapter_error("adapter-defaults", [](auto& j) {
              j["exclude_modules"] = nlohmann::json::array();
              j["target_parameters"] = nullptr;
              j["use_rslora"] = false;
            }),
            "");
  // Unknown keys that are off, and harmless ones at any value (peft 0.2's enable_lora /
  // merge_weights among them).
  EXPECT_EQ(adapter_error("adapter-off", [](auto& j) {
              j["enable_lora"] = nullptr;
              j["merge_weights"] = false;
              j["use_hyper_lora"] = false;
              j["hyper_config"] = nlohmann::json::object();
              j["hyper_layers"] = nlohmann::json::array();
              j["use_qalora"] = nullptr;
              j["qalora_group_size"] = 64;
              j["megatron_core"] = "my.megatron";
              j["auto_mapping"] = {{"base_model_class", "LlamaForCausalLM"}};
              j["task_type"] = "FEATURE_EXTRACTION";
              j["eva_config"] = {{"rho", 2.0}};
            }),
            "");
  // Inits that leave the base as it is load as plain LoRA.
  for (const nlohmann::json v : {nlohmann::json(false), nlohmann::json("gaussian"), nlohmann::json("eva"),
                                 nlohmann::json("orthogonal")})
    EXPECT_EQ(adapter_error("adapter-init-" + v.dump(), [&](auto& j) { j["init_lora_weights"] = v; }), "") << v;
}

TEST(ModelGolden, Peft017AdapterConfigLoads) {
  // adapter_config.json as peft 0.17 writes it, every field spelled out (the golden
  // one is 0.21's); the weights are the golden adapter's.
  const auto dir = adapter_copy("adapter-peft017", [](auto& j) {
    j = nlohmann::json::parse(R"({
      "alora_invocation_tokens": null, "alpha_pattern": {}, "auto_mapping": null,
      "base_model_name_or_path": "/models/tiny-llama", "bias": "none", "corda_config": null,
      "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true,
      "init_lora_weights": true, "layer_replication": null, "layers_pattern": null,
      "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false,
      "lora_dropout": 0.0, "megatron_config": null, "megatron_core": "megatron.core",
      "modules_to_save": ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"],
      "peft_type": "LORA", "peft_version": "0.17.1", "qalora_group_size": 16, "r": 4,
      "rank_pattern": {}, "revision": null, "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj"],
      "target_parameters": null, "task_type": "CAUSAL_LM", "trainable_token_indices": null,
      "use_dora": false, "use_qalora": false, "use_rslora": false})");
  });
  const auto c = io::load_adapter_config(dir + "/adapter_config.json");
  EXPECT_EQ(c.r, 4);
  EXPECT_EQ(c.base_model_name_or_path, "/models/tiny-llama");
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  auto m = tiny();
  model::apply_adapter(*m, dir);
  expect_logits(m, g["input_ids"], g["logits_lora"]);
  longlora::remove_tree(dir);
}

TEST(LoadErrors, DuplicateTargetModuleIsOneTargetAsInPeft) {
  // peft keeps target_modules as a set; the adapter is the golden one.
  const auto dir = adapter_copy("adapter-dup-target", [](auto& j) { j["target_modules"].push_back("q_proj"); });
  EXPECT_EQ(io::load_adapter_config(dir + "/adapter_config.json").target_modules.size(), 4u);
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  auto m = tiny();
  model::apply_adapter(*m, dir);
  expect_logits(m, g["input_ids"], g["logits_lora"]);
}

TEST(ModelGolden, PeftNameMatchingOfModulesToSaveAndTargets) {
  // peft wraps every module whose full name ends with a modules_to_save entry, with no
  // dot boundary (utils/other.py _set_trainable), so ["embed_tokens", "norm"] also
  // saves input_layernorm and post_attention_layernorm: the golden adapter's modules.
  // A target_modules entry names a module whose full name is it or ends with "." + it
  // (tuners_utils check_target_module_exists), so "self_attn.q_proj" is q_proj.
  // Either way the adapter is the golden one, whose logits peft computed.
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  const std::vector<std::pair<std::string, std::function<void(nlohmann::json&)>>> same = {
      {"adapter-mts-suffix", [](auto& j) { j["modules_to_save"] = {"embed_tokens", "norm"}; }},
      {"adapter-target-path",
       [](auto& j) { j["target_modules"] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "o_proj"}; }},
      // Two names of one layer are one LoRA, as in peft.
      {"adapter-target-both", [](auto& j) { j["target_modules"].push_back("self_attn.q_proj"); }},
      {"adapter-target-full",
       [](auto& j) {
         j["target_modules"] = {"k_proj", "v_proj", "o_proj", "model.layers.0.self_attn.q_proj",
                                "model.layers.1.self_attn.q_proj"};
       }},
  };
  for (const auto& [name, edit] : same) {
    SCOPED_TRACE(name);
    const auto dir = adapter_copy(name, edit);
    auto m = tiny();
    EXPECT_EQ(testutil::error_of([&] { model::apply_adapter(*m, dir); }), "");
    if (!HasFailure()) expect_logits(m, g["input_ids"], g["logits_lora"]);
    longlora::remove_tree(dir);
  }
  // Still refused: a target that names no layer (the tail must start at a dot), and a
  // saved weight whose module no entry ends.
  EXPECT_NE(adapter_error("adapter-target-tail", [](auto& j) { j["target_modules"].push_back("attn.q_proj"); })
                .find("adapter_config.json: target_modules: 'attn.q_proj' matches no layer"),
            std::string::npos);
  // LoRA on lm_head: our logits read its weight alone, so it would be left out.
  EXPECT_NE(adapter_error("adapter-target-head", [](auto& j) { j["target_modules"].push_back("lm_head"); })
                .find("adapter_config.json: target_modules: 'lm_head' is a LoRA target, which is not supported"),
            std::string::npos);
  EXPECT_NE(adapter_error("adapter-mts-missing", [](auto& j) { j["modules_to_save"] = {"embed_tokens", "model.norm"}; })
                .find("adapter_model.safetensors: tensor 'base_model.model.model.layers.0.input_layernorm.weight': "
                      "replaces a base weight but its module is not in modules_to_save"),
            std::string::npos);
}

TEST(ModelGolden, RsLoraScalesByAlphaOverSqrtR) {
  // peft's use_rslora scales by lora_alpha / sqrt(r). The golden adapter (r 4, alpha 8)
  // is scaled by 8 / 4 = 2; with use_rslora and alpha 4, 4 / sqrt(4) is 2 again, so the
  // logits are the golden ones; plain LoRA at alpha 4 (scale 1) gives others.
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  const auto rs = adapter_copy("adapter-rslora", [](auto& j) {
    j["use_rslora"] = true;
    j["lora_alpha"] = 4;
  });
  auto m = tiny();
  model::apply_adapter(*m, rs);
  expect_logits(m, g["input_ids"], g["logits_lora"]);
  const auto plain = adapter_copy("adapter-alpha4", [](auto& j) { j["lora_alpha"] = 4; });
  auto p = tiny();
  model::apply_adapter(*p, plain);
  torch::NoGradGuard ng;
  EXPECT_GT(testutil::max_abs_diff(p->forward(g["input_ids"], {}), g["logits_lora"]), 1e-2);
  longlora::remove_tree(rs);
  longlora::remove_tree(plain);
}

TEST(LoadErrors, TrainingCheckpointAsAdapterIsChecked) {
  const std::string model = testutil::golden("tiny-llama/model");
  auto noop = [](nlohmann::json&) {};
  auto load = [&](const std::string& ck) {
    return testutil::error_of([&] { model::load_for_inference(model, ck, "cpu", "fp32", 0); });
  };
  // trainer_state.json's rope_factor, the rule export applies: a number in [1, 1024].
  for (const std::string v : {"0", "-1", "0.5", "\"x\"", "null"}) {
    const auto ck = adapter_copy("ck-factor", noop,
                                 {{"trainer_state.json", "{\"step\": 2, \"rope_factor\": " + v + "}"}, {"COMPLETE", "ok\n"}});
    EXPECT_NE(load(ck).find(ck + "/trainer_state.json: rope_factor: expected a number in [1, 1024], got " + v),
              std::string::npos)
        << v << ": " << load(ck);
  }
  auto ck = adapter_copy("ck-array", noop, {{"trainer_state.json", "[1]"}, {"COMPLETE", "ok\n"}});
  EXPECT_NE(load(ck).find(ck + "/trainer_state.json: expected a JSON object"), std::string::npos) << load(ck);
  // An interrupted save has no COMPLETE: refused, as export refuses it.
  ck = adapter_copy("ck-incomplete", noop, {{"trainer_state.json", R"({"format_version": 2, "step": 2, "rope_factor": 2})"}});
  EXPECT_NE(load(ck).find(ck + ": COMPLETE: missing"), std::string::npos) << load(ck);
  // A complete one runs at its trained factor; a peft adapter has no COMPLETE and loads.
  ck = adapter_copy("ck-good", noop, {{"trainer_state.json", R"({"step": 2, "rope_factor": 2})"}, {"COMPLETE", "ok\n"}});
  EXPECT_EQ(model::load_for_inference(model, ck, "cpu", "fp32", 0)->cfg.rope_factor, 2.0);
  EXPECT_EQ(model::load_for_inference(model, testutil::golden("tiny-llama/adapter"), "cpu", "fp32", 0)->cfg.rope_factor,
            1.0);
  // The adapter where the model goes said only "config.json: cannot open".
  const std::string adapter = testutil::golden("tiny-llama/adapter");
  EXPECT_EQ(testutil::error_of([&] { model::load_for_inference(adapter, "", "cpu", "fp32", 0); }),
            adapter + ": holds an adapter (adapter_config.json), not a model: give it as the adapter (--adapter) and "
                      "its base model as the model");
}

TEST(LoadErrors, CliRefusesAZeroRopeFactorInOneLine) {
  // rope_factor 0 used to print "loss -nan" and exit 0.
  const auto ck = adapter_copy("ck-cli", [](nlohmann::json&) {},
                               {{"trainer_state.json", R"({"step": 2, "rope_factor": 0})"}, {"COMPLETE", "ok\n"}});
  auto r = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --adapter " + ck +
                             " --data " + testutil::golden("tiny-llama/eval.bin") + " --seq-len 128 --device cpu");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err, "error: " + ck + "/trainer_state.json: rope_factor: expected a number in [1, 1024], got 0\n");
}

// ---------------------------------------------------------------------------
// peft's save_pretrained(save_embedding_layers=True, or "auto" with a resized vocabulary
// or targeted embeddings) writes the whole embed_tokens and lm_head beside the LoRA
// factors, not listed in modules_to_save; peft's load puts them into the base model.

namespace {

using Named = std::vector<std::pair<std::string, torch::Tensor>>;

// Writes fp32 tensors with the project's safetensors writer.
void write_fp32(const std::string& path, const Named& ts) {
  std::vector<io::TensorToWrite> entries;
  for (const auto& [name, t] : ts) {
    auto c = t.to(torch::kFloat32).contiguous();
    io::TensorToWrite e;
    e.name = name;
    e.dtype = io::DType::F32;
    e.shape = c.sizes().vec();
    e.write = [c](const std::function<void(const void*, size_t)>& sink) { sink(c.data_ptr(), c.numel() * 4); };
    entries.push_back(std::move(e));
  }
  io::write_safetensors(path, entries, {{"format", "pt"}});
}

// The golden adapter with embed_tokens out of modules_to_save (as peft writes it when
// only save_embedding_layers saved the layer), its safetensors holding `embed` and
// `head` (when defined) under peft's keys.
std::string adapter_with_saved_embeddings(const std::string& name, const torch::Tensor& embed, const torch::Tensor& head) {
  const std::string pre = io::kPeftPrefix;
  const auto dir = adapter_copy(name, [](auto& j) { j["modules_to_save"] = {"input_layernorm", "post_attention_layernorm", "norm"}; });
  Named ts;
  for (auto& [n, t] : testutil::load(testutil::golden("tiny-llama/adapter/adapter_model.safetensors")))
    if (n != pre + "model.embed_tokens.weight") ts.emplace_back(n, t);
  if (embed.defined()) ts.emplace_back(pre + "model.embed_tokens.weight", embed);
  if (head.defined()) ts.emplace_back(pre + "lm_head.weight", head);
  write_fp32(dir + "/adapter_model.safetensors", ts);
  return dir;
}

torch::Tensor golden_adapter_tensor(const std::string& param) {
  return testutil::load(testutil::golden("tiny-llama/adapter/adapter_model.safetensors"))[io::kPeftPrefix + param];
}

}  // namespace

// LongLoRA's scripts leave an adapter as adapter_model.bin (torch.save of a plain dict)
// and trainable_params.bin (the embedding and norms, by the base's names), which they
// load into the base before PeftModel. tests/data/longlora-adapter is the golden
// adapter so split (its make.py): it must give peft's logits of the golden adapter.
TEST(ModelGolden, LongLorasAdapterFilesLoadAsItsScriptsLoadThem) {
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  const std::string dir = testutil::data("longlora-adapter");
  {
    auto m = tiny();
    model::apply_adapter(*m, dir);
    expect_logits(m, g["input_ids"], g["logits_lora"]);
  }
  // Saved from a GPU (storages on "cuda:0"): read onto the CPU, the same factors.
  {
    auto a = tiny(), b = tiny();
    model::apply_adapter(*a, dir);
    model::apply_adapter(*b, dir + "/cuda");
    auto pb = b->named_parameters();
    int n = 0;
    for (const auto& p : a->named_parameters())
      if (p.key().find("lora_") != std::string::npos) {
        EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << p.key();
        ++n;
      }
    EXPECT_EQ(n, 16);
  }
  // A state_dict() saved as it is (an OrderedDict) is one line, with the Python fix.
  auto m = tiny();
  EXPECT_NE(testutil::error_of([&] { model::apply_adapter(*m, dir + "/ordered"); })
                .find(dir + "/ordered/adapter_model.bin: holds an OrderedDict"),
            std::string::npos);
  // A trainable weight the base lacks, or of another shape, is named.
  const auto bad = testutil::temp_dir("longlora-bad-trainable");
  for (const auto& f : {"adapter_config.json", "adapter_model.bin"})
    std::filesystem::copy_file(dir + "/" + f, bad + "/" + f);
  for (const auto& [name, shape, want] :
       std::vector<std::tuple<std::string, std::vector<int64_t>, std::string>>{
           {"model.layers.9.input_layernorm.weight", {64}, "not a weight of the base model"},
           {"model.norm.weight", {32}, "shape [32] but the model needs [64]"}}) {
    c10::Dict<std::string, torch::Tensor> d;
    d.insert(name, torch::ones(shape));
    testutil::write_pickle(bad + "/trainable_params.bin", d);
    auto mb = tiny();
    const auto err = testutil::error_of([&] { model::apply_adapter(*mb, bad); });
    EXPECT_NE(err.find(bad + "/trainable_params.bin: tensor '" + name + "': " + want), std::string::npos) << err;
  }
  longlora::remove_tree(bad);
}

TEST(ModelGolden, SavedEmbeddingLayersReplaceTheBaseWeights) {
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  const torch::Tensor trained_embed = golden_adapter_tensor("model.embed_tokens.weight");
  // The golden embedding saved this way is the golden adapter again.
  {
    const auto dir = adapter_with_saved_embeddings("adapter-saved-embed-golden", trained_embed, {});
    auto m = tiny();
    model::apply_adapter(*m, dir);
    expect_logits(m, g["input_ids"], g["logits_lora"]);
    longlora::remove_tree(dir);
  }
  // Other values of both layers: the model holds them, and its logits are those of the
  // golden adapter with both matrices set to them.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const auto embed = trained_embed + at::normal(0.0, 0.05, trained_embed.sizes().vec(), gen);
  const auto head = at::normal(0.0, 0.1, {512, 64}, gen);
  const auto dir = adapter_with_saved_embeddings("adapter-saved-embed", embed, head);
  auto m = tiny();
  ASSERT_EQ(testutil::error_of([&] { model::apply_adapter(*m, dir); }), "");
  EXPECT_TRUE(torch::equal(m->model->embed_tokens->weight, embed));
  EXPECT_TRUE(torch::equal(m->lm_head->weight, head));
  auto want = tiny();
  model::apply_adapter(*want, testutil::golden("tiny-llama/adapter"));
  want->model->embed_tokens->weight.set_data(embed.clone());
  want->lm_head->weight.set_data(head.clone());
  torch::NoGradGuard ng;
  const auto got = m->forward(g["input_ids"], {});
  EXPECT_LE(testutil::max_abs_diff(got, want->forward(g["input_ids"], {})), 1e-5);
  EXPECT_GT(testutil::max_abs_diff(got, g["logits_lora"]), 1e-2);
  longlora::remove_tree(dir);
}

TEST(LoadErrors, SavedEmbeddingOfAnotherVocabularyIsRefused) {
  const auto embed = golden_adapter_tensor("model.embed_tokens.weight");
  const std::string pre = io::kPeftPrefix;
  for (const bool is_head : {false, true}) {
    const auto big = torch::cat({embed, torch::zeros({8, 64})});
    const auto dir = adapter_with_saved_embeddings("adapter-vocab", is_head ? embed : big, is_head ? big : torch::Tensor());
    auto m = tiny();
    const auto err = testutil::error_of([&] { model::apply_adapter(*m, dir); });
    const std::string key = pre + (is_head ? "lm_head.weight" : "model.embed_tokens.weight");
    EXPECT_NE(err.find(dir + "/adapter_model.safetensors: tensor '" + key +
                       "': shape [520, 64] but the base model's is [512, 64]: the adapter's vocabulary differs"),
              std::string::npos)
        << err;
    EXPECT_NE(err.find("resizing the embeddings, which is not supported"), std::string::npos) << err;
    longlora::remove_tree(dir);
  }
}

TEST(ModelGolden, SavedEmbeddingLayersOfATiedBaseAreItsOneMatrix) {
  // With tie_word_embeddings peft saves both layers as copies of the one matrix.
  const auto base = testutil::temp_dir("tied-base");
  for (const auto& e : std::filesystem::directory_iterator(testutil::golden("tiny-llama/model")))
    std::filesystem::copy_file(e.path(), base + "/" + e.path().filename().string());
  auto cfg = golden_config();
  cfg["tie_word_embeddings"] = true;
  testutil::write_file(base + "/config.json", cfg.dump());
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto embed = at::normal(0.0, 0.1, {512, 64}, gen);
  for (const int which : {0, 1, 2}) {  // both, embed_tokens only, lm_head only
    SCOPED_TRACE(which);
    const auto dir = adapter_with_saved_embeddings("adapter-tied", which != 2 ? embed : torch::Tensor(),
                                                   which != 1 ? embed.clone() : torch::Tensor());
    auto m = model::load_model(base, {});
    ASSERT_EQ(testutil::error_of([&] { model::apply_adapter(*m, dir); }), "");
    EXPECT_TRUE(torch::equal(m->head_weight(), embed));
    longlora::remove_tree(dir);
  }
  // Two different matrices cannot both be the one.
  const auto dir = adapter_with_saved_embeddings("adapter-tied-differ", embed, embed * 2);
  auto m = model::load_model(base, {});
  EXPECT_NE(testutil::error_of([&] { model::apply_adapter(*m, dir); })
                .find("tensor 'base_model.model.lm_head.weight': differs from "
                      "'base_model.model.model.embed_tokens.weight', but the base model ties the two"),
            std::string::npos);
  longlora::remove_tree(dir);
  longlora::remove_tree(base);
}
