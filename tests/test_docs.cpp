// The README documents every config key, the configs in configs/ load, and the scripts
// beside the binary (bench sweep, loss plot, demo results) do what the docs say.
#include <algorithm>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "longlora/train/config.h"
#include "test_util.h"

TEST(Docs, ReadmeDocumentsEveryConfigKey) {
  const std::string readme = testutil::read_file(testutil::data("../../README.md"));
  ASSERT_FALSE(readme.empty());
  const std::string ref = longlora::train::config_reference();
  // Key, type and default as the program has them (the meaning may be worded otherwise).
  std::regex row_re("\\| `([a-z_.]+)` \\| ([^`]*) \\| `([^`]*)` \\|");
  int n = 0;
  for (auto it = std::sregex_iterator(ref.begin(), ref.end(), row_re); it != std::sregex_iterator(); ++it, ++n)
    EXPECT_NE(readme.find((*it)[0].str()), std::string::npos)
        << (*it)[1] << ": README's configuration reference lacks the row " << (*it)[0];
  EXPECT_GT(n, 30);
  // Every row of the table has its four cells: a bare "|" between choices split a
  // row into more on GitHub, shifting the default into the meaning's place.
  std::istringstream lines(readme);
  int rows = 0;
  for (std::string line; std::getline(lines, line);) {
    if (!std::regex_search(line, std::regex("^\\| `[a-z_.]+` \\|"))) continue;  // a config key's row
    int bars = 0;
    for (size_t i = 0; i < line.size(); ++i) bars += line[i] == '|' && (i == 0 || line[i - 1] != '\\');
    EXPECT_EQ(bars, 5) << line;
    ++rows;
  }
  EXPECT_GE(rows, n);
}

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
}

TEST(Bench, TrainBenchRunsOnCpuAndReportsEveryFigure) {
  auto r = testutil::run_cli("bench --shape " + testutil::data("../../configs/shapes/tiny-cpu.json") +
                             " --seq-len 64 --steps 1 --warmup 0 --device cpu --json");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  for (const char* k : {"device", "tokens_per_s", "step_ms", "model_tflops", "peak_mem_gib", "breakdown_ms"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_GT(j["tokens_per_s"].get<double>(), 0);
  EXPECT_EQ(j["seq_len"], 64);
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
