// The README documents every config key, the configs in configs/ load, and the scripts
// beside the binary (bench sweep, loss plot, demo results) do what the docs say.
#include <algorithm>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "longlora/io/hf_config.h"
#include "longlora/train/config.h"
#include "longlora/train/setup.h"
#include "test_util.h"

TEST(Docs, ReadmeDocumentsEveryConfigKey) {
  const std::string readme = testutil::read_file(testutil::data("../../README.md"));
  ASSERT_FALSE(readme.empty());
  const std::string ref = longlora::train::config_reference();
  // Key, type and default as the program has them (a row at a time, to name the first that differs).
  std::regex row_re("\\| `([a-z0-9_.]+)` \\| ([^`]*) \\| `([^`]*)` \\|");
  int n = 0;
  for (auto it = std::sregex_iterator(ref.begin(), ref.end(), row_re); it != std::sregex_iterator(); ++it, ++n)
    EXPECT_NE(readme.find((*it)[0].str()), std::string::npos)
        << (*it)[1] << ": README's configuration reference lacks the row " << (*it)[0];
  EXPECT_GT(n, 30);
  // README's table is the program's `--config-reference`, to the letter (their meanings
  // had drifted apart: the README's said more for seven keys).
  EXPECT_NE(readme.find(ref), std::string::npos) << "README's configuration table is not --config-reference's:\n" << ref;
  // Every row of the table has its four cells: a bare "|" between choices split a
  // row into more on GitHub, shifting the default into the meaning's place.
  std::istringstream lines(readme);
  int rows = 0;
  for (std::string line; std::getline(lines, line);) {
    if (!std::regex_search(line, std::regex("^\\| `[a-z0-9_.]+` \\|"))) continue;  // a config key's row
    int bars = 0;
    for (size_t i = 0; i < line.size(); ++i) bars += line[i] == '|' && (i == 0 || line[i - 1] != '\\');
    EXPECT_EQ(bars, 5) << line;
    ++rows;
  }
  EXPECT_GE(rows, n);
}

// Every shipped run config parses, and each GPU recipe (configs/llamaNb_*.json) is one
// a run accepts: the run's own checks (`--dry-run`: files, RoPE factor, S2 grouping
// against the heads, trainable_params on the model's layers, data format) pass against
// the LLaMA-2 shape in configs/shapes/ it is for, and its S2 group and RoPE factor are
// what LongLoRA's arithmetic gives.
TEST(Docs, ShippedConfigsLoad) {
  const auto dir = testutil::data("../../configs");
  int n = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    const auto p = e.path();
    if (p.extension() != ".json" || p.parent_path().filename() == "shapes" || p.filename() == "config.json")
      continue;
    EXPECT_NO_THROW(longlora::train::load_run_config(p.string())) << p;
    ++n;
  }
  EXPECT_GE(n, 6);

  const auto tmp = testutil::temp_dir("recipes");
  // Token data of the kind the recipes name (.bin: little-endian uint16 ids); a dry run
  // checks the file's format and that it holds a row of the recipe's length, not the
  // ids (a sparse file of 256k zero ids).
  std::string ids;
  for (int i = 0; i < 64; ++i) ids += {static_cast<char>(i), '\0'};
  testutil::write_file(tmp + "/train.bin", ids);
  std::filesystem::resize_file(tmp + "/train.bin", 2 * 262144);
  const std::regex name_re("llama([0-9]+)b_([0-9]+)k\\.json");
  std::set<std::string> recipes;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    std::smatch m;
    if (!std::regex_match(name, m, name_re)) continue;
    SCOPED_TRACE(name);
    recipes.insert(name);
    const std::string size = m[1].str() + "b";
    // llama7b_* is for LLaMA-2-7B: configs/shapes/llama2-7b.json, models/Llama-2-7b-hf.
    const std::string shape_path = dir + "/shapes/llama2-" + size + ".json";
    ASSERT_TRUE(std::filesystem::exists(shape_path)) << shape_path;
    const auto recipe = testutil::read_json(e.path().string());
    const auto shape = testutil::read_json(shape_path);
    EXPECT_NE(recipe.at("model").at("path").get<std::string>().find("Llama-2-" + size + "-hf"), std::string::npos)
        << recipe.at("model").at("path");

    // The arithmetic, from the two files alone (the recipes give every key it needs).
    const int64_t L = recipe.at("data").at("seq_len").get<int64_t>();
    EXPECT_EQ(L / 1000, std::stoll(m[2].str())) << "the name's context against data.seq_len " << L;
    ASSERT_TRUE(recipe.at("attention").at("s2").get<bool>());
    const double g = static_cast<double>(L) * recipe.at("attention").at("group_ratio").get<double>();
    const auto G = static_cast<int64_t>(g);
    EXPECT_EQ(static_cast<double>(G), g) << "S2 group of " << g << " tokens: not whole";
    EXPECT_EQ(G % 2, 0) << "S2 group " << G << ": the shift of half a group needs it even";
    EXPECT_GT(G, 0);
    EXPECT_LT(G, L);
    EXPECT_EQ(L % G, 0) << "S2 group " << G << " does not divide seq_len " << L;
    const int64_t H = shape.at("num_attention_heads").get<int64_t>(), Hkv = shape.at("num_key_value_heads").get<int64_t>();
    EXPECT_EQ(H % 2, 0) << H << " heads: S2 shifts half of them";
    EXPECT_EQ(H % Hkv, 0) << H << " heads over " << Hkv << " kv heads";
    // Position interpolation: seq_len over the model's positions, rounded up.
    const int64_t P = shape.at("max_position_embeddings").get<int64_t>();
    const int64_t factor = (L + P - 1) / P;
    EXPECT_GE(factor * P, L);
    EXPECT_LT((factor - 1) * P, L);
    EXPECT_LE(factor, 1024);
    EXPECT_FALSE(recipe.at("model").contains("rope_factor"));  // the factor is derived, as LongLoRA's
    longlora::train::RunConfig cfg;
    ASSERT_NO_THROW(cfg = longlora::train::load_run_config(e.path().string()));
    double rope = 0;  // the run's own resolution, which refuses a factor past 1024
    EXPECT_NO_THROW(rope = longlora::train::resolve_rope_factor(cfg, longlora::io::load_model_config(shape_path)));
    EXPECT_EQ(rope, static_cast<double>(factor));

    // The run's checks. The weights are not there: a model directory with the shape
    // as its config.json, on the CPU, where a pretrained checkpoint is mapped, not
    // sized against memory (random weights would be: 7B and up do not fit this
    // machine in fp32, and sizing is no property of the recipe).
    const std::string run = tmp + "/" + e.path().stem().string();
    std::filesystem::create_directories(run + "/model");
    std::filesystem::copy_file(shape_path, run + "/model/config.json");
    const auto r = testutil::run_cli("--config " + e.path().string() + " --set model.path=" + run +
                                     "/model --set data.train=" + tmp + "/train.bin --set output.dir=" + run +
                                     "/out --set device=cpu --dry-run");
    ASSERT_EQ(r.code, 0) << r.err;
    // The config it printed: the recipe's, with the four keys set here.
    auto want = longlora::train::to_json(cfg);
    want["model"]["path"] = run + "/model";
    want["data"]["train"] = tmp + "/train.bin";
    want["output"]["dir"] = run + "/out";
    want["device"] = "cpu";
    EXPECT_EQ(nlohmann::json::parse(r.out), want);
  }
  // The recipes checked are the ones README offers.
  const std::string readme = testutil::read_file(testutil::data("../../README.md"));
  const std::regex listed_re("`(?:configs/)?(llama[0-9]+b_[0-9]+k\\.json)`");
  std::set<std::string> listed;
  for (auto it = std::sregex_iterator(readme.begin(), readme.end(), listed_re); it != std::sregex_iterator(); ++it)
    listed.insert((*it)[1].str());
  EXPECT_GE(listed.size(), 5u);
  EXPECT_EQ(recipes, listed);
}

// Every count and rate of the report, against arithmetic from the shape file and the
// report's own step time (the breakdown's two timings are measurements: only that they
// are there and how "rest" follows from them). Batch 2, so that the counts must take the batch; S2 in roll mode,
// where each head's visible (query, key) pairs are exactly L (G + 1) / 2 (segments
// mode's shifted half sees fewer: TrainBenchHonoursTheMicroBatch counts those).
TEST(Bench, TrainBenchRunsOnCpuAndReportsEveryFigure) {
  const std::string shape_path = testutil::data("../../configs/shapes/tiny-cpu.json");
  auto r = testutil::run_cli("bench --shape " + shape_path +
                             " --seq-len 64 --steps 1 --warmup 0 --device cpu --json"
                             " --set train.micro_batch_size=2 --set attention.shift_mode=roll");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  for (const char* k : {"device", "tokens_per_s", "step_ms", "model_tflops", "peak_mem_gib", "breakdown_ms"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["seq_len"], 64);
  EXPECT_EQ(j["micro_batch_size"], 2);
  EXPECT_EQ(j["tokens_per_step"], 2 * 64);
  EXPECT_EQ(j["dtype"], "fp32");                    // auto on the CPU
  EXPECT_EQ(j["attention_backend"], "reference");  // auto on the CPU
  EXPECT_EQ(j["device"].get<std::string>().rfind("CPU (", 0), 0u) << j["device"];
  EXPECT_TRUE(j["mfu"].is_null()) << j["mfu"];  // no known peak for a CPU
  EXPECT_GT(j["peak_mem_gib"].get<double>(), 0);

  const double step_ms = j["step_ms"].get<double>(), step_s = step_ms / 1000;
  ASSERT_GT(step_ms, 0);
  const double B = 2, L = 64, G = L / 4;  // LongLoRA's group: a quarter of seq_len
  EXPECT_NEAR(j["tokens_per_s"].get<double>(), B * L / step_s, 1e-9 * B * L / step_s);
  // Model FLOPs of one row: 6 per weight of every matrix product and token (2 forward,
  // 4 backward): q, k, v, o, gate, up, down in each layer and the output layer (the
  // embedding is a lookup); and per layer, head and visible (query, key) pair, 4 D in
  // the forward (scores, weighted sum), 3x that with the backward. Recomputation does
  // not count (model FLOPs, not hardware FLOPs).
  const auto shape = testutil::read_json(shape_path);
  auto num = [&](const char* k) { return shape.at(k).get<double>(); };
  const double h = num("hidden_size"), I = num("intermediate_size"), layers = num("num_hidden_layers"),
               H = num("num_attention_heads"), Hkv = num("num_key_value_heads"), V = num("vocab_size");
  const double D = h / H;
  const double N = layers * (h * H * D + 2 * h * Hkv * D + H * D * h + 3 * h * I) + h * V;
  const double pairs = (L / G) * G * (G + 1) / 2;  // causal inside each group, per head
  const double flops = 6 * N * L + layers * H * 3 * 4 * D * pairs;
  const double tflops = B * flops / step_s / 1e12;
  EXPECT_NEAR(j["model_tflops"].get<double>(), tflops, 1e-9 * tflops);
  // The breakdown: isolated timings of attention and the linear layers; "rest" is what
  // the step took beyond them (none where they add up to more).
  const auto& bd = j["breakdown_ms"];
  EXPECT_EQ(bd.size(), 3u) << bd;
  const double attn = bd.at("attention").get<double>(), lin = bd.at("linear").get<double>(),
               rest = bd.at("rest").get<double>();
  EXPECT_GT(attn, 0);
  EXPECT_GT(lin, 0);
  EXPECT_NEAR(rest, std::max(0.0, step_ms - attn - lin), 1e-9 * step_ms);
}

// A --set of the micro batch is honoured (it was once ignored: always batch 1), and the
// throughput counts every row of it.
TEST(Bench, TrainBenchHonoursTheMicroBatch) {
  auto r = testutil::run_cli("bench --shape " + testutil::data("../../configs/shapes/tiny-cpu.json") +
                             " --seq-len 64 --steps 1 --warmup 0 --device cpu --json --set train.micro_batch_size=3");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["micro_batch_size"], 3);
  // The batch the step ran (bench counts its tensor), and the rate over it.
  EXPECT_EQ(j["tokens_per_step"], 3 * 64);
  EXPECT_NEAR(j["tokens_per_s"].get<double>(), 3 * 64 / (j["step_ms"].get<double>() / 1000.0),
              1e-6 * j["tokens_per_s"].get<double>());
  // In segments mode (the default) the shifted half of the heads sees fewer pairs: its
  // segments are [0, G/2), [G/2, 3G/2), ..., [L - G/2, L). Counted here by brute force
  // from that rule (bench once counted every head as unshifted).
  const auto shape = testutil::read_json(testutil::data("../../configs/shapes/tiny-cpu.json"));
  auto num = [&](const char* k) { return shape.at(k).get<double>(); };
  const double h = num("hidden_size"), I = num("intermediate_size"), layers = num("num_hidden_layers"),
               H = num("num_attention_heads"), Hkv = num("num_key_value_heads"), V = num("vocab_size");
  const double D = h / H;
  const int64_t L = 64, G = 16;
  double pairs = 0;
  for (int64_t head = 0; head < H; ++head) {
    const bool shifted = head >= H / 2;
    auto segment = [&](int64_t t) { return shifted ? (t + G / 2) / G : t / G; };
    for (int64_t i = 0; i < L; ++i)
      for (int64_t k = 0; k <= i; ++k) pairs += segment(i) == segment(k);
  }
  const double N = layers * (h * H * D + 2 * h * Hkv * D + H * D * h + 3 * h * I) + h * V;
  const double flops = 3 * (6 * N * L + layers * 3 * 4 * D * pairs);
  const double tflops = flops / (j["step_ms"].get<double>() / 1000.0) / 1e12;
  EXPECT_NEAR(j["model_tflops"].get<double>(), tflops, 1e-9 * tflops);
}

// --profile: one more step under the profiler, a table of where its time went. On the
// CPU, self time per op; the model's matrix products must be among the rows.
TEST(Bench, ProfilePrintsWhereTheStepTimeGoes) {
  auto r = testutil::run_cli("bench --shape " + testutil::data("../../configs/shapes/tiny-cpu.json") +
                             " --seq-len 64 --steps 1 --warmup 0 --device cpu --profile 40");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("CPU self time by op (total "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| op | ms | % | calls |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| aten::mm |"), std::string::npos) << r.out;
  // At most 40 rows under the header.
  const auto table = r.out.substr(r.out.find("|---|"));
  EXPECT_LE(std::count(table.begin(), table.end(), '\n'), 41);
}

// scripts/bench.sh: one table row per length, a failing length reported in its row
// (seq_len 10 is no multiple of its S2 group, 3 tokens) while the sweep goes on.
TEST(Bench, SweepScriptAppendsOneRowPerLength) {
  const auto dir = testutil::temp_dir("bench-sweep");
  const std::string md = dir + "/bench.md";
  const std::string cmd = "BIN=" + std::string(LONGLORA_BINARY) +
                          " SHAPE=" + testutil::data("../../configs/shapes/tiny-cpu.json") +
                          " LENS='64 10' STEPS=1 WARMUP=0 DEVICE=cpu OUT_MD=" + md + " bash " +
                          testutil::data("../../scripts/bench.sh") + " 2>/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  const std::string text = testutil::read_file(md);
  EXPECT_NE(text.find("tiny-cpu.json on CPU"), std::string::npos) << text;
  EXPECT_TRUE(std::regex_search(text, std::regex("\\| 64 \\| reference \\| [0-9]+ \\|"))) << text;
  EXPECT_TRUE(std::regex_search(text, std::regex("\\| 10 \\| \\| failed: .*group"))) << text;
}

// The demo's loss picture: labels with spaces (the demo's "base (256)") must not shift
// the columns, which once put the steps on the y axis.
TEST(Docs, LossPlotKeepsStepsOnTheXAxis) {
  const auto dir = testutil::temp_dir("loss-plot");
  testutil::write_file(dir + "/a.jsonl", "{\"step\":10,\"loss\":3.5}\n{\"step\":20,\"loss\":2.5}\n"
                                         "{\"step\":20,\"eval_loss\":2.9}\n");
  testutil::write_file(dir + "/b.jsonl", "{\"step\":5,\"loss\":4.0}\n{\"step\":40,\"loss\":1.0}\n");
  const std::string svg = dir + "/loss.svg";
  const std::string cmd = "bash " + testutil::data("../../scripts/plot_loss.sh") + " " + svg + " 'base (256)=" +
                          dir + "/a.jsonl' 'LongLoRA (1024)=" + dir + "/b.jsonl'";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  const std::string text = testutil::read_file(svg);
  EXPECT_NE(text.find(">40</text>"), std::string::npos) << text;  // x axis ends at the last step
  EXPECT_NE(text.find(">base (256)</text>"), std::string::npos) << text;
  EXPECT_NE(text.find(">LongLoRA (1024)</text>"), std::string::npos) << text;
  // Each series' points where the chart puts them: x = 60 + 640 step / 40, y = 370 -
  // 340 loss / 4 (axes from 0 to the last step and to the highest loss). The eval
  // record is not a point.
  EXPECT_NE(text.find("points=\"220.0,72.5 380.0,157.5 \""), std::string::npos) << text;
  EXPECT_NE(text.find("points=\"140.0,30.0 700.0,285.0 \""), std::string::npos) << text;
}

namespace {
// What scripts/demo.sh's evals write: perplexity rows and passkey accuracies.
void write_demo_evals(const std::string& dir, const std::map<std::string, std::array<double, 4>>& m) {
  for (const auto& [key, v] : m) {
    testutil::write_file(dir + "/ppl_" + key + ".jsonl",
                         "{\"seq_len\":256,\"perplexity\":" + std::to_string(v[0]) + "}\n{\"seq_len\":1024,\"perplexity\":" +
                             std::to_string(v[1]) + "}\n");
    testutil::write_file(dir + "/passkey_" + key + ".json", "{\"lengths\":[256,1024],\"accuracy\":[" +
                                                                std::to_string(v[2]) + "," + std::to_string(v[3]) + "]}");
  }
}
std::string demo_results(const std::string& dir) {
  const std::string cmd = "python3 " + testutil::data("../../scripts/demo_results.py") + " " + dir + " > /dev/null";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  return testutil::read_file(dir + "/results.md");
}
}  // namespace

// The demo's results say which of its claims hold: all three for README's run, and for
// a base model that never learned to copy, the passkey claim fails with the reason.
TEST(Docs, DemoResultsCheckTheClaimsOnTheRunsNumbers) {
  const auto ok = testutil::temp_dir("demo-results-ok");
  write_demo_evals(ok, {{"base", {1.229, 1.784, 1.0, 0.07}},
                        {"base_pi", {2.920, 2.863, 0.0, 0.0}},
                        {"longlora", {1.088, 1.108, 1.0, 0.54}}});
  std::string md = demo_results(ok);
  EXPECT_NE(md.find("| LongLoRA fine-tuned (S2-Attn, LoRA, embed/norm*, PI x4) | 1.088 | 1.108 | 100% | 54% |"),
            std::string::npos) << md;
  EXPECT_NE(md.find("- yes: LongLoRA's perplexity at 4x against its 1x: +2%"), std::string::npos) << md;
  EXPECT_NE(md.find("- yes: the untrained models' perplexity at 4x against LongLoRA's: +61% or more"),
            std::string::npos) << md;
  EXPECT_NE(md.find("- yes: passkey @ 1024: LongLoRA 54% against the base's 7%"), std::string::npos) << md;
  EXPECT_EQ(md.find("NO"), std::string::npos) << md;
  EXPECT_EQ(md.find("did not learn"), std::string::npos) << md;

  // A base seed without copying (docs/demo.md), and a LongLoRA stage 20% worse at 4x.
  const auto bad = testutil::temp_dir("demo-results-bad");
  write_demo_evals(bad, {{"base", {1.30, 1.90, 0.02, 0.0}},
                         {"base_pi", {2.9, 2.9, 0.0, 0.0}},
                         {"longlora", {1.10, 1.32, 0.05, 0.01}}});
  md = demo_results(bad);
  EXPECT_NE(md.find("- NO: LongLoRA's perplexity at 4x against its 1x: +20%"), std::string::npos) << md;
  EXPECT_NE(md.find("- yes: the untrained models' perplexity at 4x against LongLoRA's: +44% or more"),
            std::string::npos) << md;
  EXPECT_NE(md.find("- NO: passkey @ 1024: LongLoRA 1% against the base's 0%"), std::string::npos) << md;
  EXPECT_NE(md.find("the base model found 2% of the keys at its own 256 tokens: it did not learn ordered copying"),
            std::string::npos) << md;
}
