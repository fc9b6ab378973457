// Run config and model config.json: validation names the file, key and expectation.
#include <chrono>
#include <functional>
#include <regex>
#include <set>
#include <sstream>
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
  EXPECT_NE(e.find("lora.r: expected an integer in [1, 65536]"), std::string::npos) << e;
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

// to_json writes the members under their documented keys (checked against literals,
// not through the schema that also parses them), and what it writes parses back.
TEST(RunConfig, JsonRoundTripAndReference) {
  train::RunConfig c;
  c.lora.r = 4;
  c.data.train = "x.bin";
  const auto j = train::to_json(c);
  EXPECT_EQ(j["lora"]["r"], 4);
  EXPECT_EQ(j["data"]["train"], "x.bin");
  EXPECT_EQ(j["lora"]["alpha"], 16.0);  // defaults: LongLoRA's
  EXPECT_EQ(j["trainable_params"], "embed,norm");
  auto back = train::parse_run_config(j, "roundtrip");
  EXPECT_EQ(back.lora.r, 4);
  EXPECT_EQ(back.data.train, "x.bin");
  EXPECT_EQ(train::to_json(back), j);
}

// Every key of the reference, each given a non-default value (pairwise distinct where
// not boolean), lands in its own struct member: read here from the members themselves,
// not through the schema that parses and prints them (a key bound to the wrong member
// round-trips through to_json unnoticed). A key added to the schema and not here fails
// the first check.
TEST(RunConfig, EveryKeyLandsInItsOwnMember) {
  const auto dir = testutil::temp_dir("cfg-every-key");
  std::filesystem::create_directories(dir + "/out");
  std::string ids;
  for (int i = 0; i < 100; ++i) ids += {static_cast<char>(i), '\0'};
  testutil::write_file(dir + "/train.bin", ids);
  testutil::write_file(dir + "/eval.bin", ids);
  struct Key {
    std::string key;
    json value;
    std::function<json(const train::RunConfig&)> member;
  };
  using C = const train::RunConfig&;
  const std::vector<Key> keys = {
      {"model.path", testutil::golden("tiny-llama/model"), [](C c) { return json(c.model.path); }},
      {"model.init", "random", [](C c) { return json(c.model.init); }},
      {"model.config", testutil::golden("tiny-llama/model/config.json"), [](C c) { return json(c.model.config); }},
      {"model.dtype", "bf16", [](C c) { return json(c.model.dtype); }},
      {"model.rope_factor", 2.5, [](C c) { return json(c.model.rope_factor); }},
      {"lora.enabled", false, [](C c) { return json(c.lora.enabled); }},
      {"lora.r", 7, [](C c) { return json(c.lora.r); }},
      {"lora.alpha", 12.5, [](C c) { return json(c.lora.alpha); }},
      {"lora.dropout", 0.05, [](C c) { return json(c.lora.dropout); }},
      {"lora.targets", json::array({"v_proj", "down_proj"}), [](C c) { return json(c.lora.targets); }},
      {"trainable_params", "norm", [](C c) { return json(c.trainable_params); }},
      {"attention.s2", false, [](C c) { return json(c.attention.s2); }},
      {"attention.group_ratio", 0.125, [](C c) { return json(c.attention.group_ratio); }},
      {"attention.shift_mode", "roll", [](C c) { return json(c.attention.shift_mode); }},
      {"attention.backend", "sdpa", [](C c) { return json(c.attention.backend); }},
      {"data.train", dir + "/train.bin", [](C c) { return json(c.data.train); }},
      {"data.format", "tokens", [](C c) { return json(c.data.format); }},
      {"data.seq_len", 48, [](C c) { return json(c.data.seq_len); }},
      {"data.sft_prompt", "none", [](C c) { return json(c.data.sft_prompt); }},
      {"data.shuffle", false, [](C c) { return json(c.data.shuffle); }},
      {"data.eval", dir + "/eval.bin", [](C c) { return json(c.data.eval); }},
      // adamw is the only choice, so the default: see below.
      {"train.optimizer", "adamw", [](C c) { return json(c.train.optimizer); }},
      {"train.lr", 3.5e-4, [](C c) { return json(c.train.lr); }},
      {"train.weight_decay", 0.02, [](C c) { return json(c.train.weight_decay); }},
      {"train.betas", json::array({0.8, 0.95}), [](C c) { return json(c.train.betas); }},
      {"train.eps", 1e-7, [](C c) { return json(c.train.eps); }},
      {"train.warmup_steps", 3, [](C c) { return json(c.train.warmup_steps); }},
      {"train.scheduler", "cosine", [](C c) { return json(c.train.scheduler); }},
      {"train.max_steps", 11, [](C c) { return json(c.train.max_steps); }},
      {"train.micro_batch_size", 5, [](C c) { return json(c.train.micro_batch_size); }},
      {"train.grad_accum", 6, [](C c) { return json(c.train.grad_accum); }},
      {"train.max_grad_norm", 0.75, [](C c) { return json(c.train.max_grad_norm); }},
      {"train.seed", 13, [](C c) { return json(c.train.seed); }},
      {"train.activation_checkpointing", false, [](C c) { return json(c.train.activation_checkpointing); }},
      {"train.offload_activations", false, [](C c) { return json(c.train.offload_activations); }},
      {"train.mlp_chunk", 17, [](C c) { return json(c.train.mlp_chunk); }},
      {"train.max_bad_steps", 19, [](C c) { return json(c.train.max_bad_steps); }},
      {"train.loss_scale", 128.0, [](C c) { return json(c.train.loss_scale); }},
      {"train.initial_loss_scale", 4096.0, [](C c) { return json(c.train.initial_loss_scale); }},
      {"train.loss_scale_window", 23, [](C c) { return json(c.train.loss_scale_window); }},
      {"train.loss_chunk", 29, [](C c) { return json(c.train.loss_chunk); }},
      {"output.dir", dir + "/out", [](C c) { return json(c.output.dir); }},
      {"output.save_steps", 31, [](C c) { return json(c.output.save_steps); }},
      {"output.keep_last", 37, [](C c) { return json(c.output.keep_last); }},
      {"output.log_steps", 41, [](C c) { return json(c.output.log_steps); }},
      {"device", "cpu", [](C c) { return json(c.device); }},
  };

  // The keys here are the reference's, each once.
  const std::string ref = train::config_reference();
  std::set<std::string> documented, here;
  std::istringstream lines(ref);
  std::string optimizer_row;
  for (std::string line; std::getline(lines, line);) {
    std::smatch m;
    if (!std::regex_search(line, m, std::regex("^\\| `([a-z0-9_.]+)` \\|"))) continue;
    EXPECT_TRUE(documented.insert(m[1]).second) << m[1];
    if (m[1] == "train.optimizer") optimizer_row = line;
  }
  for (const auto& k : keys) EXPECT_TRUE(here.insert(k.key).second) << k.key;
  EXPECT_EQ(here, documented);
  EXPECT_GT(documented.size(), 40u);
  // Non-default values: all but train.optimizer, whose one choice is its default (a
  // second optimizer must be given here).
  const train::RunConfig d;
  for (const auto& k : keys)
    if (k.key != "train.optimizer") EXPECT_NE(k.member(d), k.value) << k.key << " is given its default";
  EXPECT_EQ(optimizer_row.rfind("| `train.optimizer` | adamw | `\"adamw\"` |", 0), 0u) << optimizer_row;
  // Distinct, so that a key read into another member of its type shows.
  for (size_t a = 0; a < keys.size(); ++a)
    for (size_t b = a + 1; b < keys.size(); ++b)
      if (!keys[a].value.is_boolean()) EXPECT_NE(keys[a].value, keys[b].value) << keys[a].key << ", " << keys[b].key;

  // One file with every key, loaded as a run loads it.
  json file = json::object();
  for (const auto& k : keys) {
    std::string ptr = "/" + k.key;
    std::replace(ptr.begin(), ptr.end(), '.', '/');
    file[json::json_pointer(ptr)] = k.value;
  }
  testutil::write_file(dir + "/every.json", file.dump(2));
  const auto c = train::load_run_config(dir + "/every.json");
  for (const auto& k : keys) EXPECT_EQ(k.member(c), k.value) << k.key;
  // What to_json writes of it reads back into the same members (the writing side's
  // binding, which the round trip of a default config cannot see).
  const auto back = train::parse_run_config(train::to_json(c), "to_json");
  for (const auto& k : keys) EXPECT_EQ(k.member(back), k.value) << k.key << " after to_json";
  // Each key alone, as --set gives it: its member takes the value and no other member
  // moves off its default (booleans, all false here, show a swap only this way).
  for (const auto& k : keys) {
    train::RunConfig one;
    EXPECT_EQ(train::apply_override(one, k.key + "=" + k.value.dump()), k.key);
    EXPECT_EQ(k.member(one), k.value) << "--set " << k.key;
    for (const auto& other : keys)
      if (other.key != k.key) EXPECT_EQ(other.member(one), other.member(d)) << "--set " << k.key << " moved " << other.key;
  }
  // And the values are a run's: a dry run accepts the file and prints it back.
  const auto r = testutil::run_cli("--config " + dir + "/every.json --dry-run");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out), train::to_json(c));
}

TEST(RunConfig, CliDryRunAndErrors) {
  const auto dir = testutil::temp_dir("cfg-cli");
  std::filesystem::create_directories(dir + "/m");
  std::filesystem::copy_file(testutil::golden("tiny-llama/model/config.json"), dir + "/m/config.json");
  testutil::write_file(dir + "/d.bin", std::string(2 * 64, '\0'));  // one row of 64 token ids
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
  EXPECT_NE(r.err.find("error: --set attention.group_ratio 0.3 with " + dir +
                       "/ok.json: data.seq_len 64: the S2 group (19.2 tokens) is not a whole number"),
            std::string::npos)
      << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set attention.group_ratio=1e-300 --dry-run");
  EXPECT_EQ(r.code, 1);  // rounds to a group of 0 tokens; the run failed only after loading the model
  EXPECT_NE(r.err.find("--set attention.group_ratio 1e-300 with " + dir +
                       "/ok.json: data.seq_len 64: S2 group size 0 must be in [1, seq_len 64]"),
            std::string::npos)
      << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set attention.group_ratio=0.75 --dry-run");
  EXPECT_EQ(r.code, 1);  // a whole group of 48 that does not divide 64
  EXPECT_NE(r.err.find("sequence length 64 is not a multiple of the S2 group size 48"), std::string::npos) << r.err;
  // Heads come from config.json: an odd count cannot be split in two halves.
  std::filesystem::create_directories(dir + "/m3");
  auto odd_heads = testutil::read_json(dir + "/m/config.json");
  odd_heads["num_attention_heads"] = 3;
  odd_heads["num_key_value_heads"] = 1;
  odd_heads["head_dim"] = 16;
  testutil::write_file(dir + "/m3/config.json", odd_heads.dump());
  r = testutil::run_cli("--config " + dir + "/ok.json --set model.path=" + dir + "/m3 --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(dir + "/m3/config.json: attention: S2-Attn shifts half of the heads; 3 query heads is odd"),
            std::string::npos)
      << r.err;
  // Text data is read with the model's tokenizer; the run found it missing after loading.
  testutil::write_file(dir + "/d.txt", "some text");
  r = testutil::run_cli("--config " + dir + "/ok.json --set data.train=" + dir + "/d.txt --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(dir + "/d.txt: text data needs the model's tokenizer.model (none in " + dir + "/m)"),
            std::string::npos)
      << r.err;
  if (!torch::cuda::is_available()) {
    r = testutil::run_cli("--config " + dir + "/ok.json --set device=cuda --dry-run");
    EXPECT_EQ(r.code, 1);
    EXPECT_NE(r.err.find("--set device: cuda, and no CUDA device is available"), std::string::npos) << r.err;
  }
  // A dry run checks what a run would open first.
  r = testutil::run_cli("--config " + dir + "/ok.json --set data.train=" + dir + "/missing.bin --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set data.train: " + dir + "/missing.bin: no such file"), std::string::npos) << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set output.dir=" + dir + "/d.bin --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("exists and is not a directory"), std::string::npos) << r.err;
  // What it can see of the data without reading it all: a .bin's size, a .jsonl's first
  // record (the run found these after loading the model). Text needs a tokenizer: mt.
  std::filesystem::create_directories(dir + "/mt");
  std::filesystem::copy_file(testutil::golden("tiny-llama/model/config.json"), dir + "/mt/config.json");
  std::filesystem::copy_file(testutil::golden("tiny-llama/model/tokenizer.model"), dir + "/mt/tokenizer.model");
  const std::string mt = " --set model.path=" + dir + "/mt";
  testutil::write_file(dir + "/odd.bin", "abc");
  r = testutil::run_cli("--config " + dir + "/ok.json --set data.train=" + dir + "/odd.bin --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(dir + "/odd.bin: odd byte count 3: not a uint16 token file"), std::string::npos) << r.err;
  testutil::write_file(dir + "/short.bin", std::string(2 * 63, '\0'));
  r = testutil::run_cli("--config " + dir + "/ok.json --set data.train=" + dir + "/short.bin --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(dir + "/short.bin: 63 tokens make no complete row of seq_len 64"), std::string::npos) << r.err;
  testutil::write_file(dir + "/notext.jsonl", "\n{\"foo\": \"bar\"}\n");
  r = testutil::run_cli("--config " + dir + "/ok.json" + mt + " --set data.train=" + dir + "/notext.jsonl --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(dir + "/notext.jsonl:2: text: missing or not a string"), std::string::npos) << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json" + mt + " --set data.eval=" + dir + "/notext.jsonl --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set data.eval: " + dir + "/notext.jsonl:2: text: missing or not a string"), std::string::npos)
      << r.err;
  testutil::write_file(dir + "/sft.jsonl", R"({"instruction": "a", "input": "b", "output": "c"})" "\n");
  r = testutil::run_cli("--config " + dir + "/ok.json" + mt + " --set data.train=" + dir + "/sft.jsonl --dry-run");
  EXPECT_EQ(r.code, 0) << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json" + mt + " --set data.train=" + dir +
                        "/sft.jsonl --set data.sft_prompt=none --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(dir + "/sft.jsonl:1: input: not empty, but data.sft_prompt \"none\""), std::string::npos)
      << r.err;
  // A file on the way to it is not a permission problem (access() said so).
  r = testutil::run_cli("--config " + dir + "/ok.json --set output.dir=" + dir + "/d.bin/sub --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set output.dir: " + dir + "/d.bin/sub: " + dir + "/d.bin is a file, not a directory"),
            std::string::npos)
      << r.err;
  // JSON parsers keep the last of two equal keys; in a run config that hides a typo'd copy.
  testutil::write_file(dir + "/dup.json", R"({"train": {"lr": 0.001, "max_steps": 5, "lr": 5}})");
  r = testutil::run_cli("--config " + dir + "/dup.json --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("dup.json: train.lr: appears twice"), std::string::npos) << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set 'lora.targets=[\"q_proj\",\"q_proj\"]' --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set lora.targets: expected each layer name once"), std::string::npos) << r.err;
  // What the run refused only after loading the model, a dry run refuses too, naming
  // where the value came from.
  r = testutil::run_cli("--config " + dir + "/ok.json --set trainable_params=embed,nrom --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set trainable_params: \"nrom\" is in no parameter name of the model"), std::string::npos)
      << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set trainable_params=layers.1.input_layernorm --dry-run");
  EXPECT_EQ(r.code, 0) << r.err;  // the stand-in model has the real one's layers
  r = testutil::run_cli("--config " + dir + "/ok.json --set trainable_params=layers.2.input_layernorm --dry-run");
  EXPECT_EQ(r.code, 1) << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set data.format=text --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("d.bin: data.format: text does not read a '.bin' file"), std::string::npos) << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set data.seq_len=100000000 --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set data.seq_len: 100000000 needs a RoPE factor"), std::string::npos) << r.err;
  // A NUL cut the path the OS opened short of the one whose extension chose the
  // reader; bytes that are not UTF-8 failed the first save, after the training.
  testutil::write_file(dir + "/nul.json", R"({"data": {"train": "x.jsonl\u0000.txt"}})");
  r = testutil::run_cli("--config " + dir + "/nul.json --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("nul.json: data.train: holds a NUL byte"), std::string::npos) << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set 'output.dir=" + dir + "/o\xff' --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set output.dir: not valid UTF-8 at byte"), std::string::npos) << r.err;
  // The working directory goes into run_config.json with every relative path.
  const std::string odd = dir + "/w\xff";
  std::filesystem::create_directories(odd);
  r = testutil::run_cli("--config " + dir + "/ok.json --set output.dir=out --dry-run", "cd '" + odd + "' &&");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set output.dir: " + dir + "/w"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("not valid UTF-8"), std::string::npos) << r.err;
  // A key given dotted and nested is given twice.
  testutil::write_file(dir + "/dot.json", R"({"train": {"lr": 0.001}, "train.lr": 5})");
  r = testutil::run_cli("--config " + dir + "/dot.json --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("dot.json: train.lr: appears twice"), std::string::npos) << r.err;
  // nlohmann's dump() recursed once per level: printing this value overflowed the stack.
  // Nothing nested past 64 levels is read; below that the value is named, cut short.
  testutil::write_file(dir + "/deep.json", R"({"train": {"lr": )" + std::string(100000, '[') +
                                               std::string(100000, ']') + "}}");
  r = testutil::run_cli("--config " + dir + "/deep.json --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("deep.json: JSON nested deeper than 64 levels: refused"), std::string::npos) << r.err;
  testutil::write_file(dir + "/deep.json", R"({"train": {"lr": )" + std::string(60, '[') + std::string(60, ']') + "}}");
  r = testutil::run_cli("--config " + dir + "/deep.json --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("deep.json: train.lr: expected a number in (0, 10], got [[[["), std::string::npos) << r.err;
  EXPECT_LT(r.err.size(), 200u) << r.err;
  r = testutil::run_cli("--config " + dir + "/ok.json --set lora.targets=" + std::string(100, '[') +
                        std::string(100, ']') + " --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set lora.targets: JSON nested deeper than 64 levels: refused"), std::string::npos) << r.err;
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

// Values config.json can hold but no LLaMA has: each failed later, inside LibTorch
// naming no file, or not at all (an odd head_dim broadcast against the rotary tables).
TEST(ModelConfig, SizesAndRopeValuesAreBounded) {
  const auto base = json::parse(R"({"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "model_type": "llama"})");
  EXPECT_EQ(testutil::error_of([&] { io::parse_model_config(base, "c.json"); }), "");
  struct Case {
    std::function<void(json&)> edit;
    std::string want;
  };
  const Case cases[] = {
      {[](json& j) { j["num_hidden_layers"] = 1000000000000000LL; },
       "c.json: num_hidden_layers: 1000000000000000 is past the limit of 65536"},
      {[](json& j) { j["vocab_size"] = int64_t{1} << 62; }, "c.json: vocab_size: 4611686018427387904 is past the limit"},
      {[](json& j) { j["intermediate_size"] = int64_t{1} << 40; }, "c.json: intermediate_size: "},
      {[](json& j) { j["head_dim"] = 15; }, "c.json: head_dim: gives a head_dim of 15, odd"},
      {[](json& j) {
         j["hidden_size"] = 63;
         j["num_attention_heads"] = 3;
         j["num_key_value_heads"] = 3;
       },
       "c.json: hidden_size: gives a head_dim of 21, odd"},
      {[](json& j) { j["rope_theta"] = 1e-300; }, "c.json: rope_theta: expected a number in [1, 1e30]"},
      {[](json& j) { j["rope_theta"] = 1e308; }, "c.json: rope_theta: expected a number in [1, 1e30]"},
      {[](json& j) { j["rope_scaling"] = {{"type", "linear"}, {"factor", 1e300}}; },
       "c.json: rope_scaling.factor: expected a number in [1, 1024], got 1e+300"},
      // 1e300 zeroed every hidden state: eval printed ln(vocab) and exited 0.
      {[](json& j) { j["rms_norm_eps"] = 1e300; }, "c.json: rms_norm_eps: expected a number in (0, 1), got 1e+300"},
      {[](json& j) { j["rms_norm_eps"] = 0; }, "c.json: rms_norm_eps: expected a number in (0, 1), got 0"},
  };
  for (const auto& c : cases) {
    auto j = base;
    c.edit(j);
    const auto e = testutil::error_of([&] { io::parse_model_config(j, "c.json"); });
    EXPECT_EQ(e.rfind(c.want, 0), 0u) << e;
  }
}

// The weights alone past all of the device's memory: said before anything is built
// (10^6 layers of hidden 4096 grew memory for minutes; 70B in bf16 on one 80 GB GPU
// loaded for minutes first).
TEST(ModelConfig, WeightsLargerThanTheDeviceAreRefusedAtOnce) {
  auto j = json::parse(R"({"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "model_type": "llama"})");
  const auto c = io::parse_model_config(j, "70b.json");
  EXPECT_EQ(model::parameter_count(c), 68976648192.0);  // LLaMA-2-70B, as transformers counts it
  j["tie_word_embeddings"] = true;
  EXPECT_EQ(model::parameter_count(io::parse_model_config(j, "70b.json")), 68976648192.0 - 32000.0 * 8192);
  // 65536 layers of LLaMA-3-405B's width: 760 TiB in fp32, past any machine's memory.
  j["num_hidden_layers"] = 65536;
  j["hidden_size"] = 16384;
  j["num_attention_heads"] = 128;
  j["intermediate_size"] = 53248;
  const auto huge = io::parse_model_config(j, "huge.json");
  model::LoadOptions lo;  // CPU, fp32
  const auto t0 = std::chrono::steady_clock::now();
  const auto e = testutil::error_of([&] { (void)model::random_model(huge, lo, "huge.json"); });
  EXPECT_EQ(e.rfind("huge.json: the weights alone take 7.78e+05 GiB in fp32 (2.09e+05B parameters), more than the ", 0),
            0u)
      << e;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
}

// Flags whose values were dropped or misread without a word.
TEST(Cli, FlagsAreNotSilentlyDroppedOrMisread) {
  const std::string model = testutil::golden("tiny-llama/model"), data = testutil::golden("tiny-llama/eval.bin");
  struct Case {
    std::string args, want;
  };
  const Case cases[] = {
      // CLI::Range let NaN through; the model's own factor was used instead.
      {"eval --model " + model + " --data " + data + " --seq-len 16 --rope-factor nan",
       "--rope-factor: expected a number in [1, 1024], got 'nan'"},
      {"make-data --tokenizer " + model + "/tokenizer.model --out x.jsonl --copy-frac nan",
       "--copy-frac: expected a number in [0, 1], got 'nan'"},
      // Training flags before a subcommand were parsed and ignored.
      {"--config " + model + "/config.json eval --model " + model + " --data " + data + " --seq-len 16",
       "error: --config: a training flag, which does not go with the eval subcommand"},
      {"bench --shape " + model + "/config.json attention --seq-len 64",
       "error: bench --shape: not a flag of `bench attention`"},
      // An empty value read as "not given".
      {"eval --model " + model + " --adapter '' --data " + data + " --seq-len 16", "error: eval --adapter: empty value"},
      {"--config " + model + "/config.json --resume-from ''", "error: --resume-from: empty value"},
      // bench reported the --shape it did not time.
      {"bench --shape " + model + "/config.json --seq-len 16 --set model.config=" + model + "/config.json",
       "error: bench --set model.config: set by bench's flags"},
      {"bench --shape " + model + "/config.json --seq-len 16 --set device=cpu", "error: bench --set device: set by bench's flags"},
      {"bench --shape " + model + "/config.json --seq-len 16 --set data.train=x.bin",
       "error: bench --set data.train: bench trains on random tokens and reads no data"},
      {"eval --task PASSKEY --model " + model + " --lengths 64", "error: --task: expected one of perplexity, passkey, got 'PASSKEY'"},
      // --config-reference prints and exits: a --config beside it was ignored.
      {"--config-reference --config " + model + "/config.json",
       "error: --config: not a flag of --config-reference, which prints the keys and exits"},
  };
  for (const auto& c : cases) {
    const auto r = testutil::run_cli(c.args);
    // Flags where they do not belong and empty values are a command line that does not
    // parse, as CLI11's refusals (exit 2); --set values are checked as the config's (1).
    const bool usage = c.want.find("--set") == std::string::npos;
    EXPECT_EQ(r.code, usage ? 2 : 1) << c.args;
    EXPECT_NE(r.err.find(c.want), std::string::npos) << c.args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
}
