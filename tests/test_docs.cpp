// The README documents every config key and the configs in configs/ load.
#include <algorithm>
#include <nlohmann/json.hpp>
#include <regex>

#include "longlora/train/config.h"
#include "test_util.h"

TEST(Docs, ReadmeDocumentsEveryConfigKey) {
  const std::string readme = testutil::read_file(testutil::data("../../README.md"));
  ASSERT_FALSE(readme.empty());
  const std::string ref = longlora::train::config_reference();
  std::regex key_re("\\| `([a-z_.]+)` \\|");
  int n = 0;
  for (auto it = std::sregex_iterator(ref.begin(), ref.end(), key_re); it != std::sregex_iterator(); ++it, ++n)
    EXPECT_NE(readme.find("| `" + (*it)[1].str() + "` |"), std::string::npos)
        << (*it)[1] << " is not in README's configuration reference";
  EXPECT_GT(n, 30);
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
  std::smatch m;
  ASSERT_TRUE(std::regex_search(text, m, std::regex("polyline[^>]*points=\"([^\"]*)\""))) << text;
  const std::string pts = m[1].str();
  EXPECT_EQ(std::count(pts.begin(), pts.end(), ','), 2) << pts;  // two points each
}
