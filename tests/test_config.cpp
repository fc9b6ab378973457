// Run config and model config.json: validation names the file, key and expectation.
#include <nlohmann/json.hpp>

#include "longlora/common/error.h"
#include "longlora/io/hf_config.h"
#include "longlora/model/loader.h"
#include "longlora/train/config.h"
#include "test_util.h"

using namespace longlora;
using nlohmann::json;


TEST(RunConfig, DefaultsAreLongLoRAsRecipe) {
  train::RunConfig c;
  EXPECT_EQ(c.lora.r, 8);
  EXPECT_EQ(c.lora.alpha, 16);
  EXPECT_EQ(c.lora.dropout, 0.0);
  EXPECT_EQ(c.lora.targets, (std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"}));
  EXPECT_EQ(c.trainable_params, "embed,norm");
  EXPECT_EQ(c.attention.group_ratio, 0.25);
  EXPECT_EQ(c.train.lr, 2e-5);
  EXPECT_EQ(c.train.weight_decay, 0.0);
  EXPECT_EQ(c.train.warmup_steps, 20);
  EXPECT_EQ(c.train.scheduler, "constant_with_warmup");
  EXPECT_EQ(c.train.optimizer, "adamw");
}

TEST(RunConfig, ErrorsNameFileKeyAndExpectation) {
  auto e = testutil::error_of([] { train::parse_run_config(json::parse(R"({"lora": {"rnk": 4}})"), "my.json"); });
  EXPECT_EQ(e, "my.json: lora.rnk: unknown key");
  e = testutil::error_of([] { train::parse_run_config(json::parse(R"({"lora": {"r": "eight"}})"), "my.json"); });
  EXPECT_NE(e.find("my.json: lora.r: expected an integer"), std::string::npos) << e;
  e = testutil::error_of([] { train::parse_run_config(json::parse(R"({"lora": {"r": 0}})"), "my.json"); });
  EXPECT_NE(e.find("lora.r: expected an integer >= 1"), std::string::npos) << e;
  e = testutil::error_of([] { train::parse_run_config(json::parse(R"({"attention": {"group_ratio": 1.5}})"), "c.json"); });
  EXPECT_NE(e.find("c.json: attention.group_ratio"), std::string::npos) << e;
  e = testutil::error_of([] { train::parse_run_config(json::parse(R"({"train": {"scheduler": "step"}})"), "c.json"); });
  EXPECT_NE(e.find("train.scheduler: expected one of constant_with_warmup | cosine | linear"), std::string::npos) << e;
  e = testutil::error_of([] { train::parse_run_config(json::parse(R"({"lora": {"targets": ["q_proj", "qkv"]}})"), "c.json"); });
  EXPECT_NE(e.find("lora.targets"), std::string::npos) << e;
  e = testutil::error_of([] { train::parse_run_config(json::parse(R"({"lora": 3})"), "c.json"); });
  EXPECT_NE(e.find("c.json: lora: expected an object"), std::string::npos) << e;
}

TEST(RunConfig, OverridesUseTheSameValidation) {
  train::RunConfig c;
  train::apply_override(c, "lora.r=16");
  train::apply_override(c, "attention.shift_mode=roll");
  train::apply_override(c, "lora.targets=[\"q_proj\",\"v_proj\"]");
  EXPECT_EQ(c.lora.r, 16);
  EXPECT_EQ(c.attention.shift_mode, "roll");
  EXPECT_EQ(c.lora.targets.size(), 2u);
  EXPECT_NE(testutil::error_of([&] { train::apply_override(c, "lora.r=abc"); }).find("--set lora.r: expected an integer"),
            std::string::npos);
  EXPECT_NE(testutil::error_of([&] { train::apply_override(c, "lora.rank=4"); }).find("--set lora.rank: unknown key"),
            std::string::npos);
  EXPECT_NE(testutil::error_of([&] { train::apply_override(c, "lora.r"); }).find("key.path=value"), std::string::npos);
  // A factor below 1 trained, then eval and export refused the checkpoint it left.
  EXPECT_NE(testutil::error_of([&] { train::apply_override(c, "model.rope_factor=0.5"); })
                .find("--set model.rope_factor: expected 0 or a number in [1, 1024], got 0.5"),
            std::string::npos);
  for (const char* ok : {"model.rope_factor=0", "model.rope_factor=1", "model.rope_factor=1024"})
    EXPECT_EQ(testutil::error_of([&] { train::apply_override(c, ok); }), "") << ok;
  // A fixed loss scale below 1 shrinks fp16 gradients into underflow, silently.
  EXPECT_NE(testutil::error_of([&] { train::apply_override(c, "train.loss_scale=0.001"); })
                .find("--set train.loss_scale: expected 0 or a number in [1, 1e+30], got 0.001"),
            std::string::npos);
  for (const char* ok : {"train.loss_scale=0", "train.loss_scale=1", "train.loss_scale=1024"})
    EXPECT_EQ(testutil::error_of([&] { train::apply_override(c, ok); }), "") << ok;
}

TEST(RunConfig, JsonRoundTripAndReference) {
  train::RunConfig c;
  c.lora.r = 4;
  c.data.train = "x.bin";
  auto back = train::parse_run_config(train::to_json(c), "roundtrip");
  EXPECT_EQ(train::to_json(back), train::to_json(c));
  EXPECT_NE(train::config_reference().find("`lora.r`"), std::string::npos);
}

TEST(RunConfig, CliDryRunAndErrors) {
  const auto dir = testutil::temp_dir("cfg-cli");
  std::filesystem::create_directories(dir + "/m");
  testutil::write_file(dir + "/d.bin", "");
  testutil::write_file(dir + "/ok.json", R"({"model": {"path": ")" + dir + R"(/m"}, "data": {"train": ")" + dir +
                                             R"(/d.bin", "seq_len": 64}, "output": {"dir": ")" + dir + R"(/out"}})");
  auto r = testutil::run_cli("--config " + dir + "/ok.json --set lora.r=4 --dry-run");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = json::parse(r.out);
  EXPECT_EQ(j["lora"]["r"], 4);
  EXPECT_EQ(j["data"]["seq_len"], 64);
  testutil::write_file(dir + "/bad.json", R"({"train": {"lr": -1}})");
  r = testutil::run_cli("--config " + dir + "/bad.json --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("bad.json: train.lr"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set data.seq_len=100 --dry-run");
  EXPECT_EQ(r.code, 1);  // 100 * 1/4 = 25: odd group
  EXPECT_NE(r.err.find("ok.json: attention.group_ratio"), std::string::npos) << r.err;
  // The value at fault came from --set, not from the file.
  r = testutil::run_cli("--config " + dir + "/ok.json --set attention.group_ratio=0.3 --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set attention.group_ratio: seq_len 64"), std::string::npos) << r.err;
  // A dry run checks what a run would open first.
  r = testutil::run_cli("--config " + dir + "/ok.json --set data.train=" + dir + "/missing.bin --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set data.train: " + dir + "/missing.bin: no such file"), std::string::npos) << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set output.dir=" + dir + "/d.bin --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("exists and is not a directory"), std::string::npos) << r.err;
  // JSON parsers keep the last of two equal keys; in a run config that hides a typo'd copy.
  testutil::write_file(dir + "/dup.json", R"({"train": {"lr": 0.001, "max_steps": 5, "lr": 5}})");
  r = testutil::run_cli("--config " + dir + "/dup.json --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("dup.json: train.lr: appears twice"), std::string::npos) << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set 'lora.targets=[\"q_proj\",\"q_proj\"]' --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set lora.targets: expected each layer name once"), std::string::npos) << r.err;
  r = testutil::run_cli("--version");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("longlora-train"), std::string::npos);
}

TEST(ModelConfig, BothRopeForms) {
  auto base = json::parse(R"({"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "model_type": "llama"})");
  auto j4 = base;
  j4["rope_theta"] = 500000.0;
  j4["rope_scaling"] = {{"type", "linear"}, {"factor", 8.0}};
  auto c4 = io::parse_model_config(j4, "c4");
  EXPECT_EQ(c4.rope_factor, 8.0);
  EXPECT_EQ(c4.rope_theta, 500000.0);
  EXPECT_EQ(c4.head_dim, 16);
  auto j5 = base;
  j5["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 4.0}, {"rope_theta", 1e6}};
  auto c5 = io::parse_model_config(j5, "c5");
  EXPECT_EQ(c5.rope_factor, 4.0);
  EXPECT_EQ(c5.rope_theta, 1e6);
  // Both forms: transformers 4 reads rope_scaling alone, 5 `rope_scaling or
  // rope_parameters`; rope_scaling wins in both, and a null or {} one is no form at all.
  auto j45 = j5;
  j45["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  j45["rope_theta"] = 1e6;
  EXPECT_EQ(io::parse_model_config(j45, "c45").rope_factor, 2.0);
  for (const json empty : {json(nullptr), json::object()}) {
    j45["rope_scaling"] = empty;
    EXPECT_EQ(io::parse_model_config(j45, "c45").rope_factor, 4.0) << empty;
  }
  // rope_parameters that rope_scaling leaves unread, its theta another than the one used.
  j45["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  j45["rope_parameters"]["rope_theta"] = 5e5;
  EXPECT_NE(testutil::error_of([&] { io::parse_model_config(j45, "c45.json"); })
                .find("c45.json: rope_parameters.rope_theta: differs from the rope_theta used (1000000.0)"),
            std::string::npos);
  j45 = j5;
  j45["rope_theta"] = 1e6;
  j45["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}, {"rope_theta", 5e5}};
  EXPECT_NE(testutil::error_of([&] { io::parse_model_config(j45, "c45.json"); })
                .find("c45.json: rope_scaling.rope_theta: differs from rope_theta"),
            std::string::npos);
  // dtype (transformers 5) over torch_dtype, as transformers 5 keeps it.
  auto jd = base;
  jd["torch_dtype"] = "float32";
  jd["dtype"] = "bfloat16";
  EXPECT_EQ(io::parse_model_config(jd, "cd").torch_dtype, "bfloat16");
  auto j6 = base;
  j6["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  EXPECT_NE(testutil::error_of([&] { io::parse_model_config(j6, "c6.json"); }).find("c6.json: rope_parameters.rope_type"),
            std::string::npos);
  auto j7 = base;
  j7["attention_bias"] = true;
  EXPECT_NE(testutil::error_of([&] { io::parse_model_config(j7, "c7.json"); }).find("c7.json: attention_bias"),
            std::string::npos);
  auto j8 = base;
  j8["model_type"] = "mistral";
  EXPECT_NE(testutil::error_of([&] { io::parse_model_config(j8, "c8.json"); }).find("model_type"), std::string::npos);
  // initializer_range: the std of a random init, as transformers draws it.
  auto j10 = base;
  j10["initializer_range"] = 0.1;
  auto c10 = io::parse_model_config(j10, "c10");
  EXPECT_EQ(c10.initializer_range, 0.1);
  EXPECT_EQ(io::parse_model_config(io::model_config_to_json(c10), "back").initializer_range, 0.1);
  EXPECT_EQ(io::parse_model_config(base, "c").initializer_range, 0.02);
  model::LoadOptions lo;
  lo.compute_dtype = torch::kFloat32;
  for (const auto* c : {&c4, &c10}) {
    auto m = model::random_model(*c, lo);
    for (const auto& w : {m->model->embed_tokens->weight, m->model->layer_list[1]->mlp->down_proj->weight})
      EXPECT_NEAR(w.std().item<double>(), c->initializer_range, 0.03 * c->initializer_range);
    EXPECT_TRUE(torch::equal(m->model->norm->weight, torch::ones_like(m->model->norm->weight)));
  }
  j10["initializer_range"] = 0;
  EXPECT_NE(testutil::error_of([&] { io::parse_model_config(j10, "c10.json"); }).find("c10.json: initializer_range"),
            std::string::npos);
  auto j9 = base;
  j9.erase("hidden_size");
  EXPECT_NE(testutil::error_of([&] { io::parse_model_config(j9, "c9.json"); }).find("c9.json: hidden_size: missing"),
            std::string::npos);
}
