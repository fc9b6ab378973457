// The README documents every config key and the configs in configs/ load.
#include <nlohmann/json.hpp>
#include <regex>

#include "longlora/train/config.h"
#include "test_util.h"

TEST(Docs, ReadmeDocumentsEveryConfigKey) {
  std::ifstream in(testutil::data("../../README.md"));
  const std::string readme((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
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
