// Helpers shared by the tests: golden data, tensor comparison, running the binary.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>
#include <torch/torch.h>

#include <array>
#include <thread>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <fstream>
#include <iterator>
#include <map>
#include <string>

#include <nlohmann/json.hpp>
#include <vector>

#include "longlora/common/error.h"
#include "longlora/common/fs.h"
#include "longlora/io/tensors.h"

namespace testutil {

inline std::string data(const std::string& rel) { return std::string(LONGLORA_TEST_DATA) + "/" + rel; }
inline std::string golden(const std::string& rel) { return data("golden/" + rel); }

inline std::map<std::string, torch::Tensor> load(const std::string& path) {
  return longlora::io::load_tensors(path);
}

inline nlohmann::json read_json(const std::string& path) { return nlohmann::json::parse(std::ifstream(path)); }
// The golden scalars (losses) made with transformers + peft.
inline nlohmann::json golden_json() { return read_json(golden("tiny-llama/golden.json")); }

// The training losses of a metrics.jsonl, in step order (eval records skipped).
// metrics.jsonl's step records (those with a loss; eval records have none).
inline std::vector<nlohmann::json> metric_records(const std::string& metrics) {
  std::vector<nlohmann::json> out;
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) out.push_back(std::move(j));
  }
  return out;
}

inline std::vector<double> metric_losses(const std::string& metrics) {
  std::vector<double> out;
  for (const auto& j : metric_records(metrics)) out.push_back(j["loss"].get<double>());
  return out;
}

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kCPU, torch::kFloat64) - b.to(torch::kCPU, torch::kFloat64)).abs().max().item<double>();
}

// A fresh empty directory under the system temp dir.
inline std::string temp_dir(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() /
           ("longlora-test-" + name + "-" + std::to_string(::getpid()));
  longlora::remove_tree(p.string());  // not std::filesystem::remove_all: see common/fs.h
  std::filesystem::create_directories(p);
  return p.string();
}

inline void write_file(const std::string& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
}

// A torch.save file of named tensors (LibTorch's pickler: a plain dict, as Python's
// torch.save of one writes it).
inline void write_pickle(const std::string& path, const c10::Dict<std::string, torch::Tensor>& tensors) {
  const auto bytes = torch::pickle_save(tensors);
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A copy of the golden tiny model at `dst` whose weight `name` is edited in place.
inline std::string golden_model_with(const std::string& dst, const std::string& name,
                                     const std::function<void(torch::Tensor&)>& edit) {
  std::filesystem::copy(golden("tiny-llama/model"), dst);
  bool found = false;
  for (const auto& e : std::filesystem::directory_iterator(dst)) {
    if (e.path().extension() != ".safetensors") continue;
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    for (auto& [n, t] : longlora::io::load_tensors(e.path().string())) {
      auto c = t.clone();  // the loaded tensors view a read-only mapping
      if (n == name) edit(c), found = true;
      ts.emplace_back(n, c);
    }
    longlora::io::save_tensors(e.path().string(), ts);
  }
  EXPECT_TRUE(found) << name;
  return dst;
}

// A copy of the golden tiny model at `dst` with one NaN in the weight `name`.
inline std::string golden_model_with_a_nan(const std::string& dst, const std::string& name) {
  return golden_model_with(dst, name, [](torch::Tensor& w) { w.view(-1)[7] = std::nanf(""); });
}

// Starts the binary in the background: `env` is put before it on the shell line
// ("LONGLORA_TEST_SAVE_PAUSE_MS=3000"), stdout goes to /dev/null and stderr to `errf`.
// SIGINT, SIGTERM and SIGHUP are reset to their defaults first: a test runner started
// in the background (or under nohup) hands its children those ignored, and the binary
// keeps ignoring a signal it was started with ignored.
inline pid_t spawn_cli(const std::string& args, const std::string& env = "", const std::string& errf = "/dev/null") {
  const pid_t pid = ::fork();
  if (pid == 0) {
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) std::signal(sig, SIG_DFL);
    const std::string cmd = env + " exec " + LONGLORA_BINARY + " " + args + " >/dev/null 2>" + errf;
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

// Polls `f` every 50 ms for up to `seconds`.
inline bool wait_until(const std::function<bool()>& f, int seconds) {
  for (int i = 0; i < seconds * 20; ++i) {
    if (f()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

// Waits for the process `pid`: its exit status, or 1000 + the signal that killed it
// (never a valid exit status, so a comparison with one fails and shows which).
inline int wait_exit(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1000 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

struct RunResult {
  int code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs the longlora-train binary with `args` (shell-quoted by the caller), after the
// shell commands in `shell_prefix` (e.g. "ulimit -f 400;").
inline RunResult run_cli(const std::string& args, const std::string& shell_prefix = "") {
  static int n = 0;
  const auto errf = std::filesystem::temp_directory_path() /
                    ("longlora-stderr-" + std::to_string(::getpid()) + "-" + std::to_string(n++));
  const std::string cmd = shell_prefix + std::string(LONGLORA_BINARY) + " " + args + " 2>" + errf.string();
  RunResult r;
  FILE* p = ::popen(cmd.c_str(), "r");
  std::array<char, 4096> buf{};
  size_t got;
  while ((got = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), got);
  const int status = ::pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream e(errf);
  r.err.assign((std::istreambuf_iterator<char>(e)), std::istreambuf_iterator<char>());
  std::filesystem::remove(errf);
  return r;
}

// The message of the longlora::Error `f` throws ("" when it throws none); such a
// message must be one line.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const longlora::Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
    return msg;
  }
  return "";
}

}  // namespace testutil
